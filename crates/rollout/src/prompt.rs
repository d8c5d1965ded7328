//! From a leased record to model input: the record is parsed and checked, the template gives
//! the text, and the model's chat template turns text and images into token ids.

use medrl_model::image::ProcessedImage;
use medrl_model::pipeline::{EncodedPrompt, Vlm};
use medrl_vqa::{Prompt, PromptTemplate, VqaRecord};

use crate::error::PromptError;

/// Parses and checks `record_json` from a lease; the coordinator is a peer, so nothing in it is
/// trusted to be well formed.
pub fn parse_record(prompt_id: &str, record_json: &str) -> Result<VqaRecord, PromptError> {
    let bad = |problem: String| PromptError::Record { prompt_id: prompt_id.to_string(), problem };
    let record: VqaRecord = serde_json::from_str(record_json).map_err(|e| bad(e.to_string()))?;
    record.validate().map_err(bad)?;
    if record.id != prompt_id {
        return Err(bad(format!("the record's id is {:?}", record.id)));
    }
    Ok(record)
}

/// The prompt text of a record; `system` replaces the template's system turn when set.
pub fn prompt_text(template: PromptTemplate, system: Option<&str>, record: &VqaRecord) -> Prompt {
    let mut prompt = template.build(&record.question, &record.options);
    if let Some(s) = system {
        prompt.system = Some(s.to_string());
    }
    prompt
}

/// Token ids of the chat-formatted prompt with its images, refused when longer than `max_tokens`.
pub fn encode(vlm: &Vlm, prompt_id: &str, prompt: &Prompt, images: Vec<ProcessedImage>, max_tokens: usize) -> Result<EncodedPrompt, PromptError> {
    let encoded = vlm
        .user_prompt(prompt.system.as_deref(), images, &prompt.user)
        .map_err(|cause| PromptError::Model { prompt_id: prompt_id.to_string(), cause })?;
    if encoded.ids.len() > max_tokens {
        return Err(PromptError::TooLong { prompt_id: prompt_id.to_string(), tokens: encoded.ids.len(), max: max_tokens });
    }
    Ok(encoded)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record_json(id: &str) -> String {
        serde_json::json!({
            "id": id, "dataset": "synthetic", "question": "Which shape?",
            "options": ["circle", "square"], "answer_label": "B", "answer": "square"
        })
        .to_string()
    }

    #[test]
    fn records_are_checked() {
        assert!(parse_record("s/1", &record_json("s/1")).is_ok());
        let e = parse_record("s/2", &record_json("s/1")).expect_err("id mismatch").to_string();
        assert!(e.contains("record_json") && e.contains("s/1"), "{e}");
        let e = parse_record("s/1", "{not json").expect_err("not json").to_string();
        assert!(e.contains("record_json"), "{e}");
        let inconsistent = record_json("s/1").replace("\"B\"", "\"A\"");
        assert!(parse_record("s/1", &inconsistent).is_err());
    }

    #[test]
    fn system_prompt_overrides_the_template() {
        let record = parse_record("s/1", &record_json("s/1")).expect("record");
        let plain = prompt_text(PromptTemplate::R1v, None, &record);
        assert_eq!(plain.system, None);
        assert!(plain.user.contains("A. circle") && plain.user.contains("<answer>"));
        let with = prompt_text(PromptTemplate::MedVlThinker, Some("Be brief."), &record);
        assert_eq!(with.system.as_deref(), Some("Be brief."));
    }
}
