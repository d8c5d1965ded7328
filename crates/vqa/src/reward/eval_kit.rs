//! The MedBridgeRL eval kit's answer parsing (`inference.py`), used for Acc@1 / Pass@K and
//! available as a reward.
//!
//! Python's `re.IGNORECASE` matches a few non-ASCII letters that Rust's case folding does not
//! (`i` also matches U+0130 `İ` and U+0131 `ı`, `s` matches U+017F `ſ`, and `[A-Z]` matches
//! all of these plus U+212A KELVIN SIGN), so case-insensitive pieces are spelled out as
//! explicit classes rather than `(?i)`.

use std::sync::LazyLock;

use regex::Regex;

use super::Gold;
use crate::pytext;

/// `answer` under Python's IGNORECASE.
const ANSWER_WORD: &str = r"[aA][nN][sS\x{17F}][wW][eE][rR]";

/// `final` under Python's IGNORECASE.
const FINAL_WORD: &str = r"[fF][iI\x{130}\x{131}][nN][aA][lL]";

/// `[A-Z]` under Python's IGNORECASE.
const LETTER: &str = r"[A-Za-z\x{130}\x{131}\x{17F}\x{212A}]";

/// `<answer>\s*(.*?)\s*</answer>`, IGNORECASE | DOTALL.
static STRICT_TAG: LazyLock<Regex> = LazyLock::new(|| {
    pytext::regex(&format!(
        r"(?s)<{a}>{ws}*(.*?){ws}*</{a}>",
        a = ANSWER_WORD,
        ws = pytext::WS
    ))
});

/// `<answer>\s*(.*)$`, IGNORECASE | DOTALL.
static LOOSE_TAG: LazyLock<Regex> = LazyLock::new(|| {
    pytext::regex(&format!(
        r"(?s)<{a}>{ws}*(.*)\z",
        a = ANSWER_WORD,
        ws = pytext::WS
    ))
});

/// `\b([A-Z])\b`, case-sensitive; the boundaries consume a neighbour, which is harmless because
/// only the first match is used.
static LONE_CAPITAL: LazyLock<Regex> = LazyLock::new(|| {
    pytext::regex(&format!(
        r"(?:\A|{nw})([A-Z])(?:{nw}|\z)",
        nw = pytext::NON_WORD
    ))
});

/// `(answer|final)\s*[:\-]?\s*([A-Z])\b`, IGNORECASE.
static LABELLED_LETTER: LazyLock<Regex> = LazyLock::new(|| {
    pytext::regex(&format!(
        r"(?:{ANSWER_WORD}|{FINAL_WORD}){ws}*[:\-]?{ws}*({LETTER})(?:{nw}|\z)",
        ws = pytext::WS,
        nw = pytext::NON_WORD
    ))
});

/// `^(answer|final)\s*[:\-]\s*`, IGNORECASE.
static ANSWER_PREFIX: LazyLock<Regex> = LazyLock::new(|| {
    pytext::regex(&format!(
        r"\A(?:{ANSWER_WORD}|{FINAL_WORD}){ws}*[:\-]{ws}*",
        ws = pytext::WS
    ))
});

/// `^[\s\W_]+|[\s\W_]+$`: leading and trailing runs of anything but letters and digits.
static EDGE_JUNK: LazyLock<Regex> =
    LazyLock::new(|| pytext::regex(r"\A[^\p{L}\p{N}]+|[^\p{L}\p{N}]+\z"));

/// `\s+`.
static WHITESPACE_RUN: LazyLock<Regex> =
    LazyLock::new(|| pytext::regex(&format!("{}+", pytext::WS)));

/// How the eval kit judged one completion.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EvalKitJudgement {
    /// Parsed prediction: an option letter for MCQ items, normalised text otherwise; empty when
    /// nothing could be parsed.
    pub prediction: String,
    /// Whether the prediction equals the gold answer.
    pub correct: bool,
    /// Whether the kit counts this sample as having used the `<answer>` tag.
    pub used_answer_tag: bool,
}

/// `extract_answer_tag`: content of the first `<answer>…</answer>` (any case, stripped); else,
/// after an unclosed `<answer>`, the first non-blank line; else `None`.
///
/// The eval kit takes the first tag; the RL accuracy reward takes the last.
pub fn extract_answer_tag(text: &str) -> Option<&str> {
    if let Some(m) = STRICT_TAG.captures(text).and_then(|c| c.get(1)) {
        return Some(pytext::strip(m.as_str()));
    }
    let rest = LOOSE_TAG.captures(text).and_then(|c| c.get(1))?;
    pytext::split_lines(pytext::strip(rest.as_str()))
        .map(pytext::strip)
        .find(|line| !line.is_empty())
}

/// Whether `letter` is one of the first `num_options` letters `A`, `B`, ...
fn is_option_letter(letter: char, num_options: usize) -> bool {
    u32::from(letter)
        .checked_sub(u32::from('A'))
        .and_then(|i| usize::try_from(i).ok())
        .is_some_and(|i| i < num_options)
}

/// `candidate.upper()` if it is a single valid option letter.
fn as_option_letter(candidate: &str, num_options: usize) -> Option<char> {
    let mut upper = candidate.chars().flat_map(char::to_uppercase);
    match (upper.next(), upper.next()) {
        (Some(letter), None) if is_option_letter(letter, num_options) => Some(letter),
        _ => None,
    }
}

/// First lone capital `A`..`Z` in `text` (Python `\b([A-Z])\b`).
fn lone_capital(text: &str) -> Option<&str> {
    LONE_CAPITAL
        .captures(text)
        .and_then(|c| c.get(1))
        .map(|m| m.as_str())
}

/// `parse_mcq_letter`: the option letter a completion chose, by the kit's cascade.
///
/// 1. the first lone capital of the upper-cased `<answer>` content, if non-empty;
/// 2. else the letter after the first `answer`/`final` (any case, optional `:`/`-`);
/// 3. else the first lone capital of the whole text.
///
/// Each step yields only if its letter is among the first `num_options`; an invalid letter
/// falls through to the next step rather than retrying later matches of the same step.
pub fn parse_mcq_letter(text: &str, num_options: usize) -> Option<char> {
    if let Some(tagged) = extract_answer_tag(text).filter(|t| !t.is_empty()) {
        let upper = pytext::strip(tagged).to_uppercase();
        if let Some(letter) = lone_capital(&upper).and_then(|c| as_option_letter(c, num_options)) {
            return Some(letter);
        }
    }
    let labelled = LABELLED_LETTER.captures(text).and_then(|c| c.get(1));
    if let Some(letter) = labelled.and_then(|m| as_option_letter(m.as_str(), num_options)) {
        return Some(letter);
    }
    lone_capital(pytext::strip(text)).and_then(|c| as_option_letter(c, num_options))
}

/// `normalize_text`: strip, lower-case, trim leading/trailing non-alphanumerics, collapse
/// whitespace runs to one space.
pub fn normalize_text(text: &str) -> String {
    let lower = pytext::strip(text).to_lowercase();
    let trimmed = EDGE_JUNK.replace_all(&lower, "");
    WHITESPACE_RUN.replace_all(&trimmed, " ").into_owned()
}

/// Strips a leading `answer:`/`final -` style prefix and the whitespace around it.
fn drop_answer_prefix(text: &str) -> String {
    pytext::strip(&ANSWER_PREFIX.replace(text, "")).to_owned()
}

/// `parse_freeform`: the normalised free-form prediction and whether it came from the tag.
///
/// A non-empty tag wins; otherwise the last non-blank line of the text is used and the sample
/// counts as not using the tag, even when an empty `<answer></answer>` was present.
pub fn parse_freeform(text: &str) -> (String, bool) {
    if let Some(tagged) = extract_answer_tag(text).filter(|t| !t.is_empty()) {
        return (normalize_text(&drop_answer_prefix(tagged)), true);
    }
    match pytext::split_lines(text)
        .map(pytext::strip)
        .rfind(|line| !line.is_empty())
    {
        Some(last) => (normalize_text(&drop_answer_prefix(last)), false),
        None => (String::new(), false),
    }
}

/// Judges one completion as the eval kit does (`eval_one_row`).
///
/// An item is MCQ when it has a label and options (the kit needs both; with no options its
/// prompt is free-form too). MCQ: the parsed letter against `label.strip().upper()`; a blank
/// label is never matched.
/// Free-form: `normalize_text` of both sides; an empty normalised gold is never matched.
pub fn eval_kit_judge(completion: &str, gold: &Gold<'_>) -> EvalKitJudgement {
    match gold.label {
        Some(label) if !gold.options.is_empty() => {
            let expected = pytext::strip(label).to_uppercase();
            let prediction = parse_mcq_letter(completion, gold.options.len())
                .map(String::from)
                .unwrap_or_default();
            EvalKitJudgement {
                // A blank label names no option, so nothing matches it; without this guard the
                // empty prediction of an unparseable completion would.
                correct: !expected.is_empty() && prediction == expected,
                prediction,
                used_answer_tag: extract_answer_tag(completion).is_some(),
            }
        }
        _ => {
            let expected = normalize_text(gold.answer);
            let (prediction, used_answer_tag) = parse_freeform(completion);
            EvalKitJudgement {
                correct: !expected.is_empty() && prediction == expected,
                prediction,
                used_answer_tag,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn abcd() -> Vec<String> {
        ["w", "x", "y", "z"].map(String::from).to_vec()
    }

    #[test]
    fn extract_prefers_the_first_closed_tag_any_case() {
        assert_eq!(
            extract_answer_tag("<answer> B </answer><answer>C</answer>"),
            Some("B")
        );
        assert_eq!(extract_answer_tag("<ANSWER>\n c \n</Answer>"), Some("c"));
        assert_eq!(extract_answer_tag("<anſwer>D</ANSWER>"), Some("D"));
        assert_eq!(extract_answer_tag("<answer></answer>"), Some(""));
        assert_eq!(
            extract_answer_tag("<answer><answer>A</answer></answer>"),
            Some("<answer>A")
        );
    }

    #[test]
    fn extract_falls_back_to_the_first_line_after_an_unclosed_tag() {
        assert_eq!(
            extract_answer_tag("<think>..</think><answer>\n\n  B. x \nmore"),
            Some("B. x")
        );
        assert_eq!(extract_answer_tag("<answer>B\u{2028}C"), Some("B"));
        assert_eq!(extract_answer_tag("<answer> \n\t"), None);
        assert_eq!(extract_answer_tag("no tag at all"), None);
        assert_eq!(extract_answer_tag("</answer>A<answer>"), None);
        assert_eq!(extract_answer_tag(""), None);
    }

    #[test]
    fn mcq_step_one_reads_the_tag_upper_cased() {
        assert_eq!(parse_mcq_letter("<answer>b</answer>", 4), Some('B'));
        assert_eq!(parse_mcq_letter("<answer>C. y</answer>", 4), Some('C'));
        assert_eq!(parse_mcq_letter("<answer>(d)</answer>", 4), Some('D'));
        // "AB" has no lone capital, nor does the rest of the text.
        assert_eq!(parse_mcq_letter("<answer>AB</answer>", 4), None);
        assert_eq!(parse_mcq_letter("<answer>AB</answer> so B", 4), Some('B'));
    }

    #[test]
    fn mcq_invalid_tag_letter_falls_through() {
        // Tag says E with 4 options; step 2 finds nothing ("answer" is followed by ">"); step 3
        // finds "I", also invalid.
        assert_eq!(parse_mcq_letter("I think <answer>E</answer>", 4), None);
        assert_eq!(parse_mcq_letter("So B. <answer>E</answer>", 4), Some('B'));
    }

    #[test]
    fn mcq_step_two_reads_answer_or_final() {
        assert_eq!(parse_mcq_letter("The final answer: c", 4), Some('C'));
        assert_eq!(parse_mcq_letter("FINAL - d.", 4), Some('D'));
        assert_eq!(parse_mcq_letter("answer\n:\nb", 4), Some('B'));
        // Python's IGNORECASE lets "fİnal" match and "ı" stand for the letter I.
        assert_eq!(parse_mcq_letter("fİnal: b", 4), Some('B'));
        assert_eq!(parse_mcq_letter("answer: ı", 9), Some('I'));
        assert_eq!(parse_mcq_letter("answer \u{17F}; answer: c", 26), Some('S'));
        // The first labelled letter is a KELVIN SIGN (invalid); the step does not retry "c".
        assert_eq!(parse_mcq_letter("answer \u{212A}; answer: c", 4), None);
        // Letter glued to a word is not a lone letter.
        assert_eq!(parse_mcq_letter("answer: bee", 4), None);
    }

    #[test]
    fn mcq_step_three_takes_the_first_lone_capital() {
        assert_eq!(parse_mcq_letter("It is B, not C", 4), Some('B'));
        assert_eq!(parse_mcq_letter("x_A B", 4), Some('B'));
        assert_eq!(parse_mcq_letter("éA B", 4), Some('B'));
        assert_eq!(parse_mcq_letter("²A B", 4), Some('B'));
        // A combining mark is not a word character in Python: "A\u{301}" still has a lone A.
        assert_eq!(parse_mcq_letter("A\u{301} B", 4), Some('A'));
        assert_eq!(parse_mcq_letter("lower b only", 4), None);
        assert_eq!(parse_mcq_letter("", 4), None);
        assert_eq!(parse_mcq_letter("A", 0), None);
    }

    #[test]
    fn normalize_trims_junk_and_collapses_space() {
        assert_eq!(normalize_text("  **Left   Lung!!**\n"), "left lung");
        assert_eq!(normalize_text("_x_"), "x");
        assert_eq!(normalize_text("?!"), "");
        assert_eq!(normalize_text("a\u{1C}\u{3000}b"), "a b");
        assert_eq!(normalize_text("Ünïcödé 肺."), "ünïcödé 肺");
        assert_eq!(normalize_text(""), "");
    }

    #[test]
    fn freeform_prefers_the_tag_then_the_last_line() {
        assert_eq!(
            parse_freeform("<answer>Answer: Left Lung.</answer>"),
            ("left lung".into(), true)
        );
        assert_eq!(
            parse_freeform("reasoning\nFinal - Yes\n\n"),
            ("yes".into(), false)
        );
        assert_eq!(
            parse_freeform("line\n<answer></answer>"),
            ("answer></answer".into(), false)
        );
        assert_eq!(parse_freeform(" \n "), (String::new(), false));
    }

    #[test]
    fn judge_mcq_against_the_label() {
        let options = abcd();
        let gold = Gold {
            answer: "y",
            label: Some(" c "),
            options: &options,
        };
        let j = eval_kit_judge("<think>..</think><answer>C</answer>", &gold);
        assert_eq!(
            j,
            EvalKitJudgement {
                prediction: "C".into(),
                correct: true,
                used_answer_tag: true
            }
        );
        let j = eval_kit_judge("answer is y", &gold);
        assert_eq!(
            j,
            EvalKitJudgement {
                prediction: String::new(),
                correct: false,
                used_answer_tag: false
            }
        );
        let j = eval_kit_judge("<answer></answer> C", &gold);
        assert_eq!(
            j,
            EvalKitJudgement {
                prediction: "C".into(),
                correct: true,
                used_answer_tag: true
            }
        );
    }

    #[test]
    fn judge_mcq_never_matches_a_blank_label() {
        let options = abcd();
        for label in ["", " ", "\t\n"] {
            let gold = Gold {
                answer: "y",
                label: Some(label),
                options: &options,
            };
            for completion in ["", "no idea", "<answer></answer>", "<answer>C</answer>", "<answer> </answer>"] {
                let j = eval_kit_judge(completion, &gold);
                assert!(!j.correct, "label {label:?}, completion {completion:?}: {j:?}");
            }
        }
    }

    #[test]
    fn judge_freeform_without_options() {
        let gold = Gold {
            answer: "Left lung",
            label: None,
            options: &[],
        };
        let j = eval_kit_judge("<answer>left  lung.</answer>", &gold);
        assert_eq!(
            j,
            EvalKitJudgement {
                prediction: "left lung".into(),
                correct: true,
                used_answer_tag: true
            }
        );
        let empty = Gold {
            answer: "",
            label: None,
            options: &[],
        };
        assert!(!eval_kit_judge("", &empty).correct);
    }
}
