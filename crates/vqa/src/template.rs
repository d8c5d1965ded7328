//! Prompt templates, chosen by name in the run config.
//!
//! Every string here is copied verbatim from the code that produced the reference numbers
//! (see `shared/reference/paper-recipe.md` §6, §7.2, §11), typos included, because the models
//! were trained and evaluated on exactly these bytes.

use serde::{Deserialize, Serialize};

use crate::pytext;

/// What the released GRPO-CARE `grpo.py` puts after the question (R1-V wording, leading space
/// included: the template is `"{Question} First think ..."`).
pub const R1V_SUFFIX: &str = " First think about the reasoning process in the mind and then provide the user with the answer. The reasoning process and answer are enclosed within <think> </think> and <answer> </answer> tags, respectively, i.e., <think> reasoning process here </think><answer> answer here </answer>";

/// Instruction the MedBridgeRL eval kit (`inference.py`) appends to multiple-choice items
/// ("tags,Then" without a space is in the original).
pub const EVAL_KIT_MCQ_INSTRUCTION: &str = "First output the thinking process in <think> </think> tags,Then output the final answer in <answer> </answer> tags.\nIMPORTANT: In <answer>, output ONLY the single option letter, for example <answer>A</answer>";

/// Instruction the MedBridgeRL eval kit appends to items without options.
pub const EVAL_KIT_FREE_FORM_INSTRUCTION: &str = "First output the thinking process in <think> </think> tags.\nThen output the final answer in <answer> </answer> tags.\nIMPORTANT: In <answer>, output ONLY the short final answer, no extra words.";

/// MedVLThinker's system prompt as its README passes it to the released models (a real newline).
pub const MED_VL_THINKER_SYSTEM: &str = "You will solve a problem/request. You should provide your thoughts within <think> </think> tags before providing the answer.\nWrite your final answer within <answer> </answer> tags.";

/// MedVLThinker's instruction as its training and eval code inline it in the user turn.
///
/// The Python source is a raw string (`r"...\nWrite ..."`), so the "newline" is the two
/// characters `\` `n`; the released MedVLThinker checkpoints were trained on that.
pub const MED_VL_THINKER_INLINE_INSTRUCTION: &str = r"You will solve a problem/request. You should provide your thoughts within <think> </think> tags before providing the answer.\nWrite your final answer within <answer> </answer> tags.";

/// A prompt template, named in config by its snake_case name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PromptTemplate {
    /// `r1v`: the paper's RL run (GRPO-CARE `grpo.py`): question, then [`R1V_SUFFIX`].
    #[default]
    R1v,
    /// `eval_kit`: the MedBridgeRL eval kit's prompt (MCQ form, free-form form when no options).
    EvalKit,
    /// `med_vl_thinker`: MedVLThinker's system prompt plus its `Question:/Options:` user text.
    MedVlThinker,
    /// `med_vl_thinker_inline`: MedVLThinker as its released train/eval code builds it: the
    /// instruction (literal `\n`) inlined before the `Question:/Options:` user text, no system turn.
    MedVlThinkerInline,
    /// `bare`: the question (and options) alone, no instruction and the shortest system turn; for
    /// models that learn the answer format from SFT, like the tiny default model, whose few
    /// layers find the image sooner in a short prompt.
    Bare,
}

/// System turn of the `bare` template (the chat template's default would add ~27 tokens).
pub const BARE_SYSTEM: &str = "Answer about the image.";

/// The text parts of one prompt; images are placed by the chat template, not here.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Prompt {
    /// System turn text; `None` leaves the chat template's default system prompt in place.
    pub system: Option<String>,
    /// User turn text.
    pub user: String,
}

/// Letter of the option at `index`, as Python's `chr(ord("A") + index)` gives it.
///
/// Past `Z` this continues into `[`, `\`, ... exactly like the reference code; `None` only where
/// Python's `chr` would raise (no such Unicode scalar value).
pub fn option_letter(index: usize) -> Option<char> {
    u32::try_from(index)
        .ok()
        .and_then(|i| u32::from('A').checked_add(i))
        .and_then(char::from_u32)
}

/// `"{letter}. {option}"` lines, one per option, joined by `separator`.
pub(crate) fn option_lines<S: AsRef<str>>(options: &[S], separator: &str) -> String {
    let mut out = String::new();
    for (i, option) in options.iter().enumerate() {
        if i > 0 {
            out.push_str(separator);
        }
        out.push(option_letter(i).unwrap_or(char::REPLACEMENT_CHARACTER));
        out.push_str(". ");
        out.push_str(option.as_ref());
    }
    out
}

impl PromptTemplate {
    /// The name this template has in config files.
    pub fn name(self) -> &'static str {
        match self {
            Self::R1v => "r1v",
            Self::EvalKit => "eval_kit",
            Self::MedVlThinker => "med_vl_thinker",
            Self::MedVlThinkerInline => "med_vl_thinker_inline",
            Self::Bare => "bare",
        }
    }

    /// Builds the prompt text for a question and its options (empty slice for free-form items).
    pub fn build<S: AsRef<str>>(self, question: &str, options: &[S]) -> Prompt {
        match self {
            Self::R1v => Prompt {
                system: None,
                user: r1v_user(question, options),
            },
            Self::EvalKit => Prompt {
                system: None,
                user: eval_kit_user(question, options),
            },
            Self::MedVlThinker => Prompt {
                system: Some(MED_VL_THINKER_SYSTEM.to_owned()),
                user: med_vl_thinker_user(question, options),
            },
            Self::MedVlThinkerInline => Prompt {
                system: None,
                user: format!(
                    "{MED_VL_THINKER_INLINE_INSTRUCTION}\n\n{}",
                    med_vl_thinker_user(question, options)
                ),
            },
            Self::Bare => Prompt {
                system: Some(BARE_SYSTEM.to_owned()),
                user: bare_user(question, options),
            },
        }
    }
}

/// R1-V user text.
///
/// `grpo.py` removes `<image>` from the record's question and does not strip it. Its records
/// carry the options inside the question in an unpublished layout; when we get them separately
/// we render them as the eval kit does (`\n\nOptions:\nA. ...`), so training and evaluation show
/// the model the same option layout (our choice, unverified against the paper's data).
fn r1v_user<S: AsRef<str>>(question: &str, options: &[S]) -> String {
    let question = question.replace("<image>", "");
    if options.is_empty() {
        format!("{question}{R1V_SUFFIX}")
    } else {
        format!(
            "{question}\n\nOptions:\n{}{R1V_SUFFIX}",
            option_lines(options, "\n")
        )
    }
}

/// `bare` user text: the question without `<image>` (the chat template places images), then the
/// options as the eval kit renders them.
fn bare_user<S: AsRef<str>>(question: &str, options: &[S]) -> String {
    let question = question.replace("<image>", "");
    if options.is_empty() { question } else { format!("{question}\n\nOptions:\n{}", option_lines(options, "\n")) }
}

/// Eval kit user text (`build_prompt_with_tags`): the question is stripped; no options means
/// the free-form instruction, as the kit's `if options:` does.
fn eval_kit_user<S: AsRef<str>>(question: &str, options: &[S]) -> String {
    let question = pytext::strip(question);
    if options.is_empty() {
        format!("{question}\n\n{EVAL_KIT_FREE_FORM_INSTRUCTION}")
    } else {
        format!(
            "{question}\n\nOptions:\n{}\n{EVAL_KIT_MCQ_INSTRUCTION}",
            option_lines(options, "\n")
        )
    }
}

/// MedVLThinker user text: `Question: {q}\n\nOptions:` then `\n\n{letter}. {option}` per option.
///
/// The released code only handles MCQ items; with no options it still writes the `Options:`
/// header, and so do we.
fn med_vl_thinker_user<S: AsRef<str>>(question: &str, options: &[S]) -> String {
    let mut user = format!("Question: {question}\n\nOptions:");
    if !options.is_empty() {
        user.push_str("\n\n");
        user.push_str(&option_lines(options, "\n\n"));
    }
    user
}

#[cfg(test)]
mod tests {
    use super::*;

    const OPTS: [&str; 2] = ["Left lung", "Right lung"];
    const NONE: [&str; 0] = [];

    #[test]
    fn r1v_matches_released_template() {
        let p = PromptTemplate::R1v.build("<image>Which side?", &NONE);
        assert_eq!(p.system, None);
        assert_eq!(
            p.user,
            "Which side? First think about the reasoning process in the mind and then provide the user with the answer. The reasoning process and answer are enclosed within <think> </think> and <answer> </answer> tags, respectively, i.e., <think> reasoning process here </think><answer> answer here </answer>"
        );
    }

    #[test]
    fn r1v_keeps_surrounding_whitespace_and_renders_options() {
        let p = PromptTemplate::R1v.build(" Q?\n", &OPTS);
        assert_eq!(
            p.user,
            format!(" Q?\n\n\nOptions:\nA. Left lung\nB. Right lung{R1V_SUFFIX}")
        );
    }

    #[test]
    fn bare_is_the_question_with_a_short_system_turn() {
        let p = PromptTemplate::Bare.build("<image>Which side?", &NONE);
        assert_eq!(p.system.as_deref(), Some(BARE_SYSTEM));
        assert_eq!(p.user, "Which side?");
        let p = PromptTemplate::Bare.build("Which side?", &OPTS);
        assert_eq!(p.user, "Which side?\n\nOptions:\nA. Left lung\nB. Right lung");
        assert_eq!(PromptTemplate::Bare.name(), "bare");
    }

    #[test]
    fn eval_kit_mcq_matches_kit_bytes() {
        let p = PromptTemplate::EvalKit.build("  Which side is abnormal?\n", &OPTS);
        assert_eq!(p.system, None);
        assert_eq!(
            p.user,
            "Which side is abnormal?\n\nOptions:\nA. Left lung\nB. Right lung\nFirst output the thinking process in <think> </think> tags,Then output the final answer in <answer> </answer> tags.\nIMPORTANT: In <answer>, output ONLY the single option letter, for example <answer>A</answer>"
        );
    }

    #[test]
    fn eval_kit_free_form_without_options() {
        let p = PromptTemplate::EvalKit.build("What organ?", &NONE);
        assert_eq!(
            p.user,
            "What organ?\n\nFirst output the thinking process in <think> </think> tags.\nThen output the final answer in <answer> </answer> tags.\nIMPORTANT: In <answer>, output ONLY the short final answer, no extra words."
        );
    }

    #[test]
    fn med_vl_thinker_system_and_user() {
        let p = PromptTemplate::MedVlThinker.build("Which side?", &OPTS);
        assert_eq!(
            p.system.as_deref(),
            Some(
                "You will solve a problem/request. You should provide your thoughts within <think> </think> tags before providing the answer.\nWrite your final answer within <answer> </answer> tags."
            )
        );
        assert_eq!(
            p.user,
            "Question: Which side?\n\nOptions:\n\nA. Left lung\n\nB. Right lung"
        );
    }

    #[test]
    fn med_vl_thinker_inline_has_literal_backslash_n() {
        let p = PromptTemplate::MedVlThinkerInline.build("Q", &OPTS);
        assert_eq!(p.system, None);
        assert!(p.user.contains("answer.\\nWrite"));
        assert_eq!(
            p.user,
            format!(
                "{MED_VL_THINKER_INLINE_INSTRUCTION}\n\nQuestion: Q\n\nOptions:\n\nA. Left lung\n\nB. Right lung"
            )
        );
    }

    #[test]
    fn unicode_and_empty_inputs_do_not_panic() {
        for t in [
            PromptTemplate::R1v,
            PromptTemplate::EvalKit,
            PromptTemplate::MedVlThinker,
            PromptTemplate::MedVlThinkerInline,
        ] {
            let p = t.build("", &[""]);
            assert!(p.user.contains("A. "));
            let p = t.build("肺 🫁 ¿qué?", &["é", "ß"]);
            assert!(p.user.contains("B. ß"));
        }
    }

    #[test]
    fn option_letters_follow_python_chr() {
        assert_eq!(option_letter(0), Some('A'));
        assert_eq!(option_letter(25), Some('Z'));
        assert_eq!(option_letter(26), Some('['));
        assert_eq!(option_letter(0xD800 - 0x41), None);
        assert_eq!(option_letter(usize::MAX), None);
    }

    #[test]
    fn serde_names_are_snake_case() -> Result<(), serde_json::Error> {
        for t in [
            PromptTemplate::R1v,
            PromptTemplate::EvalKit,
            PromptTemplate::MedVlThinker,
            PromptTemplate::MedVlThinkerInline,
        ] {
            assert_eq!(serde_json::to_string(&t)?, format!("\"{}\"", t.name()));
            assert_eq!(
                serde_json::from_str::<PromptTemplate>(&format!("\"{}\"", t.name()))?,
                t
            );
        }
        assert!(serde_json::from_str::<PromptTemplate>("\"r1_v\"").is_err());
        assert_eq!(PromptTemplate::default(), PromptTemplate::R1v);
        Ok(())
    }
}
