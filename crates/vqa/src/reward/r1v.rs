//! The rule rewards of the paper's RL run, ported from the released GRPO-CARE `grpo.py`:
//! `format_reward`, `default_accuracy_reward` and its `clean_text`.

use std::sync::LazyLock;

use regex::Regex;

use crate::pytext;

/// `re.fullmatch(r"<think>.*?</think>\s*<answer>.*?</answer>", s, re.DOTALL)`.
static FORMAT: LazyLock<Regex> = LazyLock::new(|| {
    pytext::regex(&format!(
        r"\A(?s:<think>.*?</think>{ws}*<answer>.*?</answer>)\z",
        ws = pytext::WS
    ))
});

/// `<answer>(.*?)</answer>` with DOTALL, as the completion side and `clean_text` use it.
static ANSWER_DOTALL: LazyLock<Regex> =
    LazyLock::new(|| pytext::regex(r"(?s)<answer>(.*?)</answer>"));

/// `<answer>(.*?)</answer>` without DOTALL, as the gold side uses it.
static ANSWER_ONE_LINE: LazyLock<Regex> =
    LazyLock::new(|| pytext::regex(r"<answer>(.*?)</answer>"));

/// Format reward: 1.0 when the whole completion is `<think>…</think>`, optional whitespace,
/// `<answer>…</answer>` and nothing else (DOTALL, case-sensitive tags), else 0.0.
///
/// As with Python's `fullmatch`, a trailing newline after `</answer>` fails the match.
pub fn format_reward(completion: &str) -> f64 {
    if FORMAT.is_match(completion) {
        1.0
    } else {
        0.0
    }
}

/// Content of the last `<answer>…</answer>` (DOTALL), or `None` when there is none.
fn last_answer(text: &str) -> Option<&str> {
    ANSWER_DOTALL
        .captures_iter(text)
        .last()
        .and_then(|c| c.get(1))
        .map(|m| m.as_str())
}

/// `clean_text` of the released code: last `<answer>` content if any, line breaks folded, then
/// `strip().rstrip('.').lower()`.
///
/// For `\n` and then `\r`: an occurrence preceded by whitespace is deleted, any other becomes
/// one space. Only trailing dots are removed after stripping, so `"A ."` cleans to `"a "`.
pub fn clean_text(text: &str) -> String {
    let text = last_answer(text).unwrap_or(text);
    let text = fold_line_break(text, '\n');
    let text = fold_line_break(&text, '\r');
    pytext::strip(&text).trim_end_matches('.').to_lowercase()
}

/// One `exclue_chars` step of `clean_text`, both of its `re.sub` passes at once.
///
/// The second pass sees the first pass's output, but only line breaks (whitespace) are deleted,
/// so a surviving break still has its original, non-whitespace predecessor: judging every
/// break by its predecessor in the input is the same thing.
fn fold_line_break(text: &str, line_break: char) -> String {
    let mut out = String::with_capacity(text.len());
    let mut previous: Option<char> = None;
    for c in text.chars() {
        if c != line_break {
            out.push(c);
        } else if !previous.is_some_and(pytext::is_space) {
            out.push(' ');
        }
        previous = Some(c);
    }
    out
}

/// Accuracy reward of the released run: 1.0 when the cleaned prediction equals the cleaned gold
/// string exactly, else 0.0.
///
/// Prediction: the last `<answer>…</answer>` of the completion (DOTALL), else the whole
/// completion. Gold: the first single-line `<answer>…</answer>` of `gold`, else all of it.
/// Like the released code, an empty completion scores 1.0 against an empty gold.
pub fn accuracy_reward(completion: &str, gold: &str) -> f64 {
    let truth = ANSWER_ONE_LINE
        .captures(gold)
        .and_then(|c| c.get(1))
        .map_or(gold, |m| m.as_str());
    let prediction = last_answer(completion).unwrap_or(completion);
    let same = clean_text(pytext::strip(prediction)) == clean_text(pytext::strip(truth));
    if same { 1.0 } else { 0.0 }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn format_accepts_the_canonical_shape() {
        assert_eq!(format_reward("<think>x</think><answer>A</answer>"), 1.0);
        assert_eq!(format_reward("<think></think>\n \t<answer></answer>"), 1.0);
        assert_eq!(
            format_reward("<think>a\nb\r\n</think>\n<answer>\nA\n</answer>"),
            1.0
        );
        // Python's \s includes U+001C..U+001F and U+3000.
        assert_eq!(
            format_reward("<think>x</think>\u{1C}\u{3000}<answer>A</answer>"),
            1.0
        );
    }

    #[test]
    fn format_rejects_anything_outside_the_tags() {
        assert_eq!(format_reward("<think>x</think><answer>A</answer>\n"), 0.0);
        assert_eq!(format_reward(" <think>x</think><answer>A</answer>"), 0.0);
        assert_eq!(format_reward("<think>x</think> so <answer>A</answer>"), 0.0);
        assert_eq!(format_reward("<think>x</think><answer>A"), 0.0);
        assert_eq!(format_reward("<think>x<answer>A</answer>"), 0.0);
        assert_eq!(format_reward("<THINK>x</THINK><ANSWER>A</ANSWER>"), 0.0);
        assert_eq!(format_reward("<answer>A</answer>"), 0.0);
        assert_eq!(format_reward(""), 0.0);
        // Only whitespace may separate the two blocks.
        assert_eq!(format_reward("<think>x</think>.<answer>A</answer>"), 0.0);
    }

    #[test]
    fn format_lets_lazy_groups_stretch_over_extra_tags() {
        // fullmatch backtracks: `.*?` may swallow inner closing tags.
        assert_eq!(
            format_reward("<think>a</think>b</think><answer>A</answer>"),
            1.0
        );
        assert_eq!(
            format_reward("<think><think>a</think></think><answer>A</answer>"),
            1.0
        );
        assert_eq!(
            format_reward("<think>a</think><answer>A</answer><answer>B</answer>"),
            1.0
        );
        assert_eq!(format_reward("<think>🧠 ñ</think><answer>肺</answer>"), 1.0);
    }

    #[test]
    fn clean_text_folds_line_breaks_like_python() {
        assert_eq!(clean_text("A\nB"), "a b");
        assert_eq!(clean_text("A \nB"), "a b");
        assert_eq!(clean_text("A\n\nB"), "a b");
        assert_eq!(clean_text("A\r\nB"), "a b");
        assert_eq!(clean_text("A\n\rB"), "a b");
        assert_eq!(clean_text("\nA"), "a");
        assert_eq!(clean_text("A\t\nB"), "a\tb");
        assert_eq!(clean_text("A\u{1F}\nB"), "a\u{1f}b");
    }

    #[test]
    fn clean_text_strips_then_drops_trailing_dots_only() {
        assert_eq!(clean_text("  The Left Lung...  "), "the left lung");
        assert_eq!(clean_text("A ."), "a ");
        assert_eq!(clean_text(".A."), ".a");
        assert_eq!(clean_text("<answer> B. </answer>"), "b");
        assert_eq!(clean_text("<answer>x</answer><answer>Y\n</answer>"), "y");
        assert_eq!(clean_text("ΟΔΟΣ"), "οδος");
        assert_eq!(clean_text("İ"), "i\u{307}");
        assert_eq!(clean_text(""), "");
    }

    #[test]
    fn accuracy_uses_the_last_answer_tag() {
        assert_eq!(
            accuracy_reward("<think>A?</think><answer>A</answer>", "A"),
            1.0
        );
        assert_eq!(
            accuracy_reward("<answer>A</answer> then <answer>B</answer>", "B"),
            1.0
        );
        assert_eq!(
            accuracy_reward("<answer>A</answer> then <answer>B</answer>", "A"),
            0.0
        );
    }

    #[test]
    fn accuracy_normalises_case_whitespace_and_trailing_dot() {
        assert_eq!(accuracy_reward("<answer>\n  b.\n</answer>", "B"), 1.0);
        assert_eq!(
            accuracy_reward("<answer>Left\nLung</answer>", "left lung"),
            1.0
        );
        assert_eq!(
            accuracy_reward("<answer>Left \n Lung</answer>", "left lung"),
            0.0
        );
        assert_eq!(accuracy_reward("<answer>A .</answer>", "A"), 0.0);
        assert_eq!(accuracy_reward("<answer>A</answer>", "A. Left lung"), 0.0);
    }

    #[test]
    fn accuracy_without_tags_compares_the_whole_completion() {
        assert_eq!(accuracy_reward("  a  ", "A"), 1.0);
        assert_eq!(accuracy_reward("The answer is A", "A"), 0.0);
        // An unclosed tag is not a match: the whole text is compared.
        assert_eq!(accuracy_reward("<answer>A", "A"), 0.0);
        assert_eq!(accuracy_reward("", "A"), 0.0);
        // Mirrors the released code: empty against empty is a match.
        assert_eq!(accuracy_reward("", ""), 1.0);
    }

    #[test]
    fn accuracy_with_nested_tags_keeps_the_inner_opening_tag() {
        // findall pairs the first <answer> with the first </answer>: "<answer>A".
        assert_eq!(
            accuracy_reward("<answer><answer>A</answer></answer>", "A"),
            0.0
        );
        assert_eq!(
            accuracy_reward("<answer><answer>A</answer></answer>", "<answer>A"),
            1.0
        );
    }

    #[test]
    fn accuracy_gold_side_reads_single_line_tags() {
        assert_eq!(
            accuracy_reward("<answer>C</answer>", "<answer> C </answer>"),
            1.0
        );
        // Without DOTALL the gold tag spanning a newline is not extracted; clean_text then
        // still finds it (DOTALL) and keeps "\nC\n" -> "c".
        assert_eq!(
            accuracy_reward("<answer>C</answer>", "<answer>\nC\n</answer>"),
            1.0
        );
        assert_eq!(
            accuracy_reward("<answer>C</answer>", "x <answer>C</answer> y"),
            1.0
        );
    }

    #[test]
    fn accuracy_handles_unicode() {
        assert_eq!(
            accuracy_reward("<answer>ΠΝΕΥΜΟΝΑΣ</answer>", "πνευμονας"),
            1.0
        );
        assert_eq!(accuracy_reward("<answer>肺。</answer>", "肺"), 0.0);
        assert_eq!(accuracy_reward("<answer>🫁</answer>", "🫁"), 1.0);
    }
}
