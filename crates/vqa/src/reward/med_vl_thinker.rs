//! MedVLThinker's format-gated accuracy (`train/my_reward.py`, `compute_score`).

use std::sync::LazyLock;

use regex::Regex;

use super::format_reward;
use crate::pytext;

/// `re.search(r"<answer>(.*?)</answer>", predict)`: first tag, no DOTALL.
static FIRST_ONE_LINE_ANSWER: LazyLock<Regex> =
    LazyLock::new(|| pytext::regex(r"<answer>(.*?)</answer>"));

/// MedVLThinker's reward: 0.0 unless [`format_reward`] passes; then 1.0 when the answer equals,
/// ignoring case and surrounding whitespace, `"{label}. {answer}"`, the label, or the answer text.
///
/// The answer is the first `<answer>…</answer>` that does not span a newline (the original
/// searches without DOTALL); when every tag spans one, the whole completion is compared, which
/// practically never matches. `label` is the option letter; `None` compares the text only.
/// A blank gold is matched by a blank answer, as the released code does (see `grade_answer`).
pub fn med_vl_thinker_accuracy(completion: &str, answer: &str, label: Option<&str>) -> f64 {
    if format_reward(completion) == 0.0 {
        return 0.0;
    }
    let given = FIRST_ONE_LINE_ANSWER
        .captures(completion)
        .and_then(|c| c.get(1))
        .map_or(completion, |m| m.as_str());
    if grade_answer(pytext::strip(given), answer, label) {
        1.0
    } else {
        0.0
    }
}

/// `grade_answer`: case-insensitive equality with the letter-and-text form, the letter, or the text.
///
/// A blank gold is matched, as in the released grader: a blank label, or a blank answer, is
/// equal to the blank prediction of `<answer></answer>` (and a blank answer with label `B` to
/// `B.`). Kept for parity with MedVLThinker's reward, unlike [`super::eval_kit_judge`], which
/// never matches a blank label; validated records cannot carry a blank label, but a record
/// without options may carry a blank answer.
fn grade_answer(prediction: &str, answer: &str, label: Option<&str>) -> bool {
    let norm = |s: &str| pytext::strip(s).to_lowercase();
    let prediction = norm(prediction);
    if let Some(label) = label
        && (prediction == norm(&format!("{label}. {answer}")) || prediction == norm(label))
    {
        return true;
    }
    prediction == norm(answer)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn score(completion: &str) -> f64 {
        med_vl_thinker_accuracy(completion, "Left lung", Some("B"))
    }

    #[test]
    fn accepts_letter_letter_text_and_text() {
        assert_eq!(score("<think>r</think><answer>B</answer>"), 1.0);
        assert_eq!(score("<think>r</think><answer> b </answer>"), 1.0);
        assert_eq!(score("<think>r</think><answer>B. Left lung</answer>"), 1.0);
        assert_eq!(score("<think>r</think>\n<answer>LEFT LUNG</answer>"), 1.0);
    }

    #[test]
    fn rejects_near_misses() {
        assert_eq!(score("<think>r</think><answer>B: Left lung</answer>"), 0.0);
        assert_eq!(score("<think>r</think><answer>B.Left lung</answer>"), 0.0);
        assert_eq!(score("<think>r</think><answer>Left lung.</answer>"), 0.0);
        assert_eq!(score("<think>r</think><answer>A</answer>"), 0.0);
        assert_eq!(score("<think>r</think><answer></answer>"), 0.0);
    }

    #[test]
    fn is_gated_by_format() {
        assert_eq!(score("<answer>B</answer>"), 0.0);
        assert_eq!(score("<think>r</think><answer>B</answer>\n"), 0.0);
        assert_eq!(score("<think>r<answer>B</answer>"), 0.0);
        assert_eq!(score("<think>r</think><answer>B"), 0.0);
        assert_eq!(score("B"), 0.0);
        assert_eq!(score(""), 0.0);
    }

    #[test]
    fn takes_the_first_single_line_tag() {
        assert_eq!(
            score("<think>r</think><answer>B</answer><answer>A</answer>"),
            1.0
        );
        assert_eq!(
            score("<think>r</think><answer>A</answer><answer>B</answer>"),
            0.0
        );
        // A multi-line answer is not found without DOTALL: the whole completion is compared.
        assert_eq!(score("<think>r</think><answer>\nB\n</answer>"), 0.0);
        // ...unless a later single-line tag exists (format still passes: .*? spans it).
        assert_eq!(
            score("<think>r</think><answer>\nA\n</answer><answer>B</answer>"),
            1.0
        );
    }

    #[test]
    fn a_blank_gold_is_matched_by_a_blank_answer_as_in_the_released_grader() {
        // Each expectation is what MedVLThinker's `compute_score` (train/my_reward.py) returns
        // for the same completion, answer and answer_label.
        let cases = [
            ("<answer></answer>", "Left lung", Some(""), 1.0),
            ("<answer> </answer>", "Left lung", Some("  "), 1.0),
            ("<answer>A</answer>", "Left lung", Some(""), 0.0),
            ("<answer></answer>", "", Some("B"), 1.0),
            ("<answer>B.</answer>", "", Some("B"), 1.0),
            ("<answer>B</answer>", "", Some("B"), 1.0),
            ("<answer></answer>", "", None, 1.0),
            ("<answer>x</answer>", "", None, 0.0),
            // Not found without DOTALL: the whole completion is compared, and is not blank.
            ("<answer>\n</answer>", "", None, 0.0),
        ];
        for (answer_tag, answer, label, expected) in cases {
            let completion = format!("<think>r</think>{answer_tag}");
            assert_eq!(
                med_vl_thinker_accuracy(&completion, answer, label),
                expected,
                "{completion:?}, answer {answer:?}, label {label:?}"
            );
        }
        // The format gate still comes first.
        assert_eq!(med_vl_thinker_accuracy("", "", None), 0.0);
        assert_eq!(med_vl_thinker_accuracy("<answer></answer>", "", Some("")), 0.0);
    }

    #[test]
    fn without_label_compares_text_only() {
        let c = "<think>r</think><answer>B</answer>";
        assert_eq!(med_vl_thinker_accuracy(c, "Left lung", None), 0.0);
        let c = "<think>r</think><answer>left LUNG</answer>";
        assert_eq!(med_vl_thinker_accuracy(c, "Left lung", None), 1.0);
        let c = "<think>r</think><answer>Ωμέγα</answer>";
        assert_eq!(med_vl_thinker_accuracy(c, "ΩΜΈΓΑ", None), 1.0);
    }
}
