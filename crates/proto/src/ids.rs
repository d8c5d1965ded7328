//! Identifiers shared by every role: rollout group ids and content addresses.

use std::fmt;

/// Length of an `ncclUniqueId` in bytes.
pub const NCCL_UNIQUE_ID_LEN: usize = 128;

/// The idempotency key of a rollout group: one per (epoch, prompt, lease attempt).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct GroupId {
    /// Epoch of the prompt.
    pub epoch: u32,
    /// Record id of the prompt.
    pub prompt_id: String,
    /// `LeasedPrompt.attempt` of the grant that produced the group.
    pub attempt: u64,
}

/// The wire form `"{epoch}/{attempt}/{prompt_id}"` of a group id.
pub fn group_id(epoch: u32, prompt_id: &str, attempt: u64) -> String {
    // The prompt id goes last because record ids may themselves contain '/'.
    format!("{epoch}/{attempt}/{prompt_id}")
}

impl GroupId {
    /// Parses the wire form written by [`group_id`].
    pub fn parse(text: &str) -> Option<GroupId> {
        let mut parts = text.splitn(3, '/');
        let epoch = parts.next()?.parse().ok()?;
        let attempt = parts.next()?.parse().ok()?;
        let prompt_id = parts.next()?;
        if prompt_id.is_empty() {
            return None;
        }
        Some(GroupId { epoch, prompt_id: prompt_id.to_string(), attempt })
    }
}

impl fmt::Display for GroupId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&group_id(self.epoch, &self.prompt_id, self.attempt))
    }
}

/// True for a lowercase hex sha256 digest (64 characters `0-9a-f`).
pub fn is_sha256_hex(text: &str) -> bool {
    text.len() == 64 && text.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn group_ids_round_trip_with_slashes_in_prompt_ids() {
        let id = group_id(3, "pmc-vqa/train/12", (2u64 << 32) | 5);
        let parsed = GroupId::parse(&id).expect("parses");
        assert_eq!(parsed, GroupId { epoch: 3, prompt_id: "pmc-vqa/train/12".into(), attempt: (2u64 << 32) | 5 });
        assert_eq!(parsed.to_string(), id);
        assert!(GroupId::parse("x/1/p").is_none());
        assert!(GroupId::parse("1/2/").is_none());
        assert!(GroupId::parse("1/2").is_none());
    }

    #[test]
    fn sha256_hex_is_checked() {
        assert!(is_sha256_hex(&"a".repeat(64)));
        assert!(!is_sha256_hex(&"A".repeat(64)));
        assert!(!is_sha256_hex(&"a".repeat(63)));
        assert!(!is_sha256_hex("../../etc/passwd"));
    }
}
