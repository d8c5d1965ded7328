//! Structural checks of a rollout group from a worker, before it may enter the buffer: every field
//! the step relies on is present, consistent and in range, so a bad peer costs a refusal, never a
//! panic or a failed step. Each problem names the field.

use medrl_proto::v1::RolloutGroup;
use medrl_proto::{GroupId, is_sha256_hex};
use medrl_vqa::VqaRecord;

/// Longest id (prompt, lease, worker) accepted, in bytes.
const MAX_ID_BYTES: usize = 1024;

/// Limits a group is checked against.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Rows of the model's embedding: token ids must be below it.
    pub vocab_size: usize,
    /// Completions per group.
    pub max_completions: usize,
    /// Prompt plus completion tokens of one sequence.
    pub max_sequence_tokens: usize,
    /// Size of one image.
    pub max_image_bytes: u64,
    /// The model's `Config::placeholder_token_ids`, which no completion may hold.
    pub placeholder_ids: [u32; 3],
}

fn check_ids(field: &str, ids: &[u32], vocab: usize) -> Result<(), String> {
    match ids.iter().position(|&id| id as usize >= vocab) {
        Some(i) => Err(format!("field `{field}[{i}]`: token id {} is outside the vocabulary of {vocab}", ids[i])),
        None => Ok(()),
    }
}

fn check_id_str(field: &str, value: &str) -> Result<(), String> {
    if value.len() > MAX_ID_BYTES {
        return Err(format!("field `{field}`: {} bytes, at most {MAX_ID_BYTES}", value.len()));
    }
    Ok(())
}

/// Checks `group` sampled at a version the learner has published (`<= current_version`) and
/// returns its parsed record.
pub fn validate_group(group: &RolloutGroup, limits: &Limits, current_version: u64) -> Result<VqaRecord, String> {
    if group.prompt_id.is_empty() {
        return Err("field `prompt_id`: must not be empty".into());
    }
    check_id_str("prompt_id", &group.prompt_id)?;
    check_id_str("lease_id", &group.lease_id)?;
    check_id_str("worker_id", &group.worker_id)?;
    let expected = GroupId { epoch: group.epoch, prompt_id: group.prompt_id.clone(), attempt: group.attempt };
    match GroupId::parse(&group.group_id) {
        Some(parsed) if parsed == expected => {}
        _ => return Err(format!("field `group_id`: {:?} is not {:?} (epoch/attempt/prompt_id)", group.group_id, expected.to_string())),
    }
    if group.policy_version > current_version {
        return Err(format!("field `policy_version`: {} does not exist yet (the newest is {current_version})", group.policy_version));
    }
    if group.prompt_token_ids.is_empty() {
        return Err("field `prompt_token_ids`: must not be empty".into());
    }
    check_ids("prompt_token_ids", &group.prompt_token_ids, limits.vocab_size)?;
    if group.completions.is_empty() {
        return Err("field `completions`: expected at least one completion".into());
    }
    if group.completions.len() > limits.max_completions {
        return Err(format!("field `completions`: {} completions, at most {}", group.completions.len(), limits.max_completions));
    }
    for (i, c) in group.completions.iter().enumerate() {
        if c.token_ids.is_empty() {
            return Err(format!("field `completions[{i}].token_ids`: must not be empty"));
        }
        if c.logprobs.len() != c.token_ids.len() {
            return Err(format!("field `completions[{i}].logprobs`: {} values for {} tokens", c.logprobs.len(), c.token_ids.len()));
        }
        check_ids(&format!("completions[{i}].token_ids"), &c.token_ids, limits.vocab_size)?;
        if let Some(j) = c.token_ids.iter().position(|id| limits.placeholder_ids.contains(id)) {
            return Err(format!("field `completions[{i}].token_ids[{j}]`: {} is an image placeholder token, which a completion cannot hold", c.token_ids[j]));
        }
        if let Some(j) = c.logprobs.iter().position(|lp| !lp.is_finite()) {
            return Err(format!("field `completions[{i}].logprobs[{j}]`: {} is not finite", c.logprobs[j]));
        }
        let len = group.prompt_token_ids.len() + c.token_ids.len();
        if len > limits.max_sequence_tokens {
            return Err(format!("field `completions[{i}]`: {len} prompt and completion tokens, at most {}", limits.max_sequence_tokens));
        }
    }
    let record: VqaRecord = serde_json::from_str(&group.record_json).map_err(|e| format!("field `record_json`: {e}"))?;
    record.validate().map_err(|e| format!("field `record_json`: {e}"))?;
    if record.id != group.prompt_id {
        return Err(format!("field `record_json`: record id {:?} is not the group's prompt {:?}", record.id, group.prompt_id));
    }
    if group.images.len() != record.images.len() {
        return Err(format!("field `images`: {} references for the record's {} images", group.images.len(), record.images.len()));
    }
    for (i, image) in group.images.iter().enumerate() {
        if !is_sha256_hex(&image.sha256) {
            return Err(format!("field `images[{i}].sha256`: expected 64 lowercase hex digits"));
        }
        if image.size_bytes > limits.max_image_bytes {
            return Err(format!("field `images[{i}].size_bytes`: {} bytes, at most {}", image.size_bytes, limits.max_image_bytes));
        }
    }
    Ok(record)
}

#[cfg(test)]
mod tests {
    use medrl_proto::v1::{Completion, ImageRef};

    use super::*;

    const LIMITS: Limits = Limits { vocab_size: 100, max_completions: 4, max_sequence_tokens: 64, max_image_bytes: 1000, placeholder_ids: [97, 98, 99] };

    fn group() -> RolloutGroup {
        let record = VqaRecord {
            id: "p/1".into(),
            dataset: "synthetic".into(),
            modality: "shape".into(),
            images: vec!["img/1.png".into()],
            question: "Which?".into(),
            options: vec!["circle".into(), "square".into()],
            answer_label: Some("A".into()),
            answer: "circle".into(),
        };
        RolloutGroup {
            group_id: medrl_proto::group_id(0, "p/1", 3),
            prompt_id: "p/1".into(),
            epoch: 0,
            attempt: 3,
            policy_version: 2,
            prompt_token_ids: vec![1, 2, 3],
            completions: vec![Completion { token_ids: vec![4, 5], logprobs: vec![-0.5, -1.0], ..Default::default() }],
            record_json: serde_json::to_string(&record).expect("json"),
            images: vec![ImageRef { sha256: "a".repeat(64), size_bytes: 10, name: "img/1.png".into() }],
            ..Default::default()
        }
    }

    fn problem(edit: impl FnOnce(&mut RolloutGroup)) -> String {
        let mut g = group();
        edit(&mut g);
        validate_group(&g, &LIMITS, 2).expect_err("must be refused")
    }

    #[test]
    fn a_good_group_passes_and_each_defect_is_named() {
        assert_eq!(validate_group(&group(), &LIMITS, 2).expect("valid").answer, "circle");
        assert!(problem(|g| g.group_id = "0/4/p/1".into()).contains("group_id"));
        assert!(problem(|g| g.policy_version = 3).contains("policy_version"));
        assert!(problem(|g| g.prompt_token_ids.clear()).contains("prompt_token_ids"));
        assert!(problem(|g| g.prompt_token_ids[1] = 100).contains("prompt_token_ids[1]"));
        assert!(problem(|g| g.completions.clear()).contains("completions"));
        assert!(problem(|g| g.completions[0].logprobs.truncate(1)).contains("logprobs"));
        assert!(problem(|g| g.completions[0].logprobs[0] = f32::NAN).contains("logprobs[0]"));
        assert!(problem(|g| g.completions[0].token_ids[0] = 500).contains("token_ids[0]"));
        assert!(problem(|g| g.completions[0].token_ids[1] = 98).contains("token_ids[1]`: 98 is an image placeholder"));
        assert!(problem(|g| g.completions = vec![g.completions[0].clone(); 5]).contains("at most 4"));
        assert!(problem(|g| {
            g.completions[0].token_ids = vec![1; 70];
            g.completions[0].logprobs = vec![-1.0; 70];
        })
        .contains("prompt and completion tokens"));
        assert!(problem(|g| g.record_json = "{".into()).contains("record_json"));
        assert!(problem(|g| g.prompt_id = "p/2".into()).contains("group_id"));
        assert!(problem(|g| g.images.clear()).contains("images"));
        assert!(problem(|g| g.images[0].sha256 = "../etc/passwd".into()).contains("sha256"));
        assert!(problem(|g| g.images[0].size_bytes = 5000).contains("size_bytes"));
    }
}
