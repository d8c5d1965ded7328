//! Where the answer is inside a completion: the token positions whose reference log-probs give
//! GRPO-CARE's confidence.
//!
//! Two finders. [`released_answer_span`] reproduces the released trainer's rule on token
//! strings, quirks included, and is the one CARE uses for parity: the confidence is a geometric
//! mean over the span, so which tokens it covers changes the number. [`tagged_answer_span`] is the
//! plain reading (the tokens strictly between `<answer>` and `</answer>` id sequences) for other
//! uses; it is exact only when the tags tokenize the same way in context, which byte-level BPE
//! does not promise (a tag can merge with a neighbouring space or newline), which is why the
//! released rule looks at concatenated token strings instead.

use std::ops::Range;

/// The answer span as the released `get_thinking_answer_masks` finds it, in completion positions.
///
/// `completion` holds the completion's token strings (as `convert_ids_to_tokens` /
/// `id_to_token` give them) without trailing padding; `prompt_last_token` is the last prompt
/// token, which the rule sees as the left neighbour of position 0; `first_eos` is the position of
/// the first EOS in the completion, if any.
///
/// The rule: take the last position `a` whose token contains `answer` and where the previous,
/// this and the next token strings concatenated contain `<answer>`; the released scan never
/// looks at the last two tokens (its slice window is empty there), so `a ≤ n − 3`. Positions
/// after the first EOS are ignored (the released code sees only padding there). The span is
/// `a < t < max(a + 1, eos − 3)`, where `eos` is the first EOS position or the completion length:
/// with `<answer>` tokenized as `<`, `answer`, `>` it starts at the opening tag's `>` and stops
/// before the three tokens ahead of EOS (`</`, `answer`, `>` for a well-formed ending).
///
/// `None` when no such token exists in the completion (an `<answer>` in the prompt template
/// does not count); the released code then averages over no tokens and gets confidence 1.
///
/// One deliberate difference: without EOS the released code bounds the span by the padded
/// batch width, we by the completion's own length. They agree for completions cut at the length
/// limit; they differ only for a completion that stopped on another stop token (e.g. Qwen's
/// `<|endoftext|>`, which is also its pad token), where the released span would run into padding.
pub fn released_answer_span<S: AsRef<str>>(
    completion: &[S],
    prompt_last_token: Option<&str>,
    first_eos: Option<usize>,
) -> Option<Range<usize>> {
    let n = first_eos.map_or(completion.len(), |e| (e + 1).min(completion.len()));
    let last = n.checked_sub(3)?;
    let a = (0..=last).rev().find(|&a| {
        let this = completion[a].as_ref();
        if !this.contains("answer") {
            return false;
        }
        let prev = if a == 0 {
            prompt_last_token.unwrap_or("")
        } else {
            completion[a - 1].as_ref()
        };
        let window = format!("{prev}{this}{}", completion[a + 1].as_ref());
        window.contains("<answer>")
    })?;
    let eos = first_eos.unwrap_or(n);
    let end = (a + 1).max(eos.saturating_sub(3));
    Some(a + 1..end)
}

/// The tokens strictly between the last `open` id sequence before the first EOS and the first
/// `close` sequence after it (or the EOS / the end when the answer is not closed).
///
/// `None` when `open` does not occur or is empty.
pub fn tagged_answer_span(
    ids: &[u32],
    open: &[u32],
    close: &[u32],
    eos_ids: &[u32],
) -> Option<Range<usize>> {
    if open.is_empty() {
        return None;
    }
    let n = crate::mask::first_eos(ids, eos_ids).unwrap_or(ids.len());
    let ids = &ids[..n];
    let start = ids.windows(open.len()).rposition(|w| w == open)? + open.len();
    let end = if close.is_empty() {
        n
    } else {
        ids[start..]
            .windows(close.len())
            .position(|w| w == close)
            .map_or(n, |p| start + p)
    };
    Some(start..end)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `<think>x</think> <answer>B</answer><|im_end|>` split the way byte-level BPE tends to.
    fn tokens() -> Vec<&'static str> {
        vec![
            "<",
            "think",
            ">",
            "x",
            "</",
            "think",
            ">",
            "Ġ<",
            "answer",
            ">",
            "B",
            "</",
            "answer",
            ">",
            "<|im_end|>",
        ]
    }

    #[test]
    fn released_span_starts_at_the_opening_gt_and_stops_before_the_closing_tag() {
        let t = tokens();
        // `answer` at 8, EOS at 14: span 9..11 = `>`, `B`.
        assert_eq!(released_answer_span(&t, None, Some(14)), Some(9..11));
    }

    #[test]
    fn closing_tag_is_not_an_opening_tag() {
        // Only `</answer>` present: `</` + `answer` + `>` does not contain `<answer>`.
        let t = vec!["x", "</", "answer", ">", "y", "<|im_end|>"];
        assert_eq!(released_answer_span(&t, None, Some(5)), None);
    }

    #[test]
    fn last_of_several_answers_wins() {
        let t = vec![
            "<",
            "answer",
            ">",
            "A",
            "</",
            "answer",
            ">",
            "<",
            "answer",
            ">",
            "C",
            "</",
            "answer",
            ">",
            "<|im_end|>",
        ];
        assert_eq!(released_answer_span(&t, None, Some(14)), Some(9..11));
    }

    #[test]
    fn position_zero_sees_the_last_prompt_token() {
        // The completion starts with `answer>` after a prompt ending in `<`.
        let t = vec!["answer", ">", "A", "</", "answer", ">", "<|im_end|>"];
        assert_eq!(released_answer_span(&t, Some("<"), Some(6)), Some(1..3));
        assert_eq!(released_answer_span(&t, Some("\n"), Some(6)), None);
    }

    #[test]
    fn the_last_two_tokens_are_never_scanned() {
        // `<answer>` right at the end without EOS: `answer` is the second-to-last token.
        let t = vec!["x", "<", "answer", ">"];
        assert_eq!(released_answer_span(&t, None, None), None);
        // One token later it is found, and the span is empty (max(a+1, n−3) = a+1).
        let t = vec!["x", "<", "answer", ">", "y"];
        assert_eq!(released_answer_span(&t, None, None), Some(3..3));
    }

    #[test]
    fn without_eos_the_span_ends_three_before_the_end() {
        let t = vec!["<", "answer", ">", "a", "b", "c", "d", "e"];
        assert_eq!(released_answer_span(&t, None, None), Some(2..5));
    }

    #[test]
    fn tokens_after_the_first_eos_are_ignored() {
        let mut t = tokens();
        t.extend(["<", "answer", ">", "Z", "</", "answer", ">"]);
        assert_eq!(released_answer_span(&t, None, Some(14)), Some(9..11));
    }

    #[test]
    fn tagged_span_by_ids() {
        // open = [5, 6], close = [7, 6], eos = 0.
        let ids = [1, 5, 6, 2, 3, 7, 6, 0, 5, 6, 9];
        assert_eq!(tagged_answer_span(&ids, &[5, 6], &[7, 6], &[0]), Some(3..5));
        // Not closed: runs to the EOS.
        assert_eq!(
            tagged_answer_span(&[5, 6, 2, 3, 0], &[5, 6], &[7, 6], &[0]),
            Some(2..4)
        );
        assert_eq!(tagged_answer_span(&[1, 2, 3], &[5, 6], &[7, 6], &[0]), None);
    }
}
