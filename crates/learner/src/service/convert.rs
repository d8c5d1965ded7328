//! An accepted rollout group as the trainer's [`Group`]: the worker's prompt ids with the record's
//! images preprocessed here, the gold answer from the record, and completions whose text the
//! learner decodes itself, so rewards read exactly the tokens the loss trains on.

use medrl_model::image::ProcessedImage;
use medrl_model::pipeline::{EncodedPrompt, Vlm};

use crate::batch::{Completion, Group};
use crate::service::buffer::Accepted;

/// Builds the trainer's group, moving the wire vectors rather than copying them. `keep_logprobs`
/// passes the sampling log-probs on (needed for the importance ratio when groups may be stale;
/// strictly on-policy, the released loss uses ratio 1).
pub fn to_batch_group(accepted: Accepted, images: Vec<ProcessedImage>, vlm: &Vlm, keep_logprobs: bool) -> Result<Group, String> {
    let Accepted { group: g, record } = accepted;
    // The prompt must hold exactly one <|image_pad|> per merged patch of its images, or the
    // vision features cannot be placed.
    let config = &vlm.model.config;
    let merge = config.vision.spatial_merge_size;
    let wanted: usize = images.iter().map(|im| im.merged_tokens(merge)).sum();
    let found = g.prompt_token_ids.iter().filter(|&&id| id == config.image_token_id).count();
    if wanted != found {
        return Err(format!(
            "field `prompt_token_ids`: {found} image tokens, but the {} image(s) processed here need {wanted} (worker and learner image settings differ?)",
            images.len()
        ));
    }
    let mut completions = Vec::with_capacity(g.completions.len());
    for (i, c) in g.completions.into_iter().enumerate() {
        let text = vlm.prompts.decode(&c.token_ids, true).map_err(|e| format!("field `completions[{i}].token_ids`: cannot decode: {e}"))?;
        if text != c.text {
            tracing::debug!(group = %g.group_id, completion = i, "the worker's text differs from the learner's decoding; using the learner's");
        }
        completions.push(Completion { ids: c.token_ids, text, sampling_logprobs: keep_logprobs.then_some(c.logprobs) });
    }
    Ok(Group {
        prompt: EncodedPrompt { ids: g.prompt_token_ids, images },
        answer: record.answer,
        answer_label: record.answer_label,
        options: record.options,
        completions,
        version: g.policy_version,
    })
}

#[cfg(test)]
mod tests {
    use candle_core::{DType, Device};
    use medrl_model::tiny::{TinySpec, create_tiny};
    use medrl_proto::v1::{Completion as WireCompletion, RolloutGroup};
    use medrl_vqa::VqaRecord;

    use super::*;

    fn record() -> VqaRecord {
        VqaRecord {
            id: "p/1".into(),
            dataset: "synthetic".into(),
            modality: "shape".into(),
            images: vec!["img/1.png".into()],
            question: "Which shape?".into(),
            options: vec!["circle".into(), "square".into()],
            answer_label: Some("B".into()),
            answer: "square".into(),
        }
    }

    #[test]
    fn logprobs_pass_only_for_off_policy_runs_and_image_tokens_must_match() {
        let dir = tempfile::tempdir().expect("tempdir");
        create_tiny(dir.path(), &TinySpec::default()).expect("tiny model");
        let vlm = Vlm::load(dir.path(), DType::F32, &Device::Cpu).expect("vlm");
        let picture = image::DynamicImage::ImageRgb8(image::RgbImage::from_fn(56, 56, |x, y| image::Rgb([x as u8 * 4, y as u8 * 4, 90])));
        let images = vec![vlm.images.process_image(&picture, "test").expect("image")];
        let prompt = vlm.user_prompt(None, images.clone(), "Which shape?").expect("prompt");
        let ids = vlm.prompts.encode_completion("<answer>B</answer>").expect("tokens");
        let group = RolloutGroup {
            prompt_token_ids: prompt.ids.clone(),
            completions: vec![WireCompletion { token_ids: ids.clone(), logprobs: vec![-0.5; ids.len()], text: "what the worker says".into(), ..Default::default() }],
            policy_version: 4,
            ..Default::default()
        };
        let accepted = Accepted { group, record: record() };

        let on_policy = to_batch_group(accepted.clone(), images.clone(), &vlm, false).expect("converts");
        assert_eq!(on_policy.completions[0].sampling_logprobs, None, "strictly on-policy: ratio 1, no old log-probs");
        assert_eq!(on_policy.completions[0].text, vlm.prompts.decode(&ids, true).expect("decode"));
        assert_eq!((on_policy.answer.as_str(), on_policy.answer_label.as_deref(), on_policy.version), ("square", Some("B"), 4));
        assert_eq!(on_policy.prompt.ids, prompt.ids);

        let off_policy = to_batch_group(accepted.clone(), images, &vlm, true).expect("converts");
        assert_eq!(off_policy.completions[0].sampling_logprobs.as_deref(), Some(vec![-0.5; ids.len()].as_slice()));

        let err = to_batch_group(accepted, Vec::new(), &vlm, false).expect_err("image tokens without images");
        assert!(err.contains("image tokens"), "{err}");
    }
}
