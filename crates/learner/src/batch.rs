//! What one optimizer step consumes: prompt groups with their completions (token ids, texts and
//! sampling log-probs), and the replay file format (`GROUPS.jsonl`) that records them.

use std::path::{Path, PathBuf};

use medrl_model::pipeline::{EncodedPrompt, Vlm};
use medrl_vqa::record::for_each_line;
use serde::Deserialize;

use crate::{Error, Result};

/// One sampled completion.
#[derive(Debug, Clone, PartialEq)]
pub struct Completion {
    pub ids: Vec<u32>,
    pub text: String,
    /// Log-probs of `ids` under the sampling policy; `None` means on-policy (ratio 1).
    pub sampling_logprobs: Option<Vec<f32>>,
}

/// The completions of one prompt, with what the rewards need.
#[derive(Debug, Clone)]
pub struct Group {
    pub prompt: EncodedPrompt,
    pub answer: String,
    pub answer_label: Option<String>,
    pub options: Vec<String>,
    pub completions: Vec<Completion>,
    /// Policy version the completions were sampled with.
    pub version: u64,
}

/// One line of a replay file.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct GroupLine {
    #[serde(default)]
    images: Vec<String>,
    prompt: String,
    answer: String,
    #[serde(default)]
    answer_label: Option<String>,
    #[serde(default)]
    options: Vec<String>,
    completions: Vec<String>,
    #[serde(default)]
    sampling_logprobs: Option<Vec<Vec<f32>>>,
}

/// Reads a replay file: each line a group whose prompt is one user turn (images first, then the
/// text) through the model's chat template, and whose completions are tokenised without special
/// tokens (end one with `<|im_end|>` to include the EOS, as sampled completions do).
pub fn read_groups(path: &Path, vlm: &Vlm, system: Option<&str>) -> Result<Vec<Group>> {
    let base = path.parent().map(Path::to_path_buf).unwrap_or_else(|| PathBuf::from("."));
    let mut groups = Vec::new();
    for_each_line(path, |source| Error::Io { path: path.to_path_buf(), source }, |line_no, line| {
        let at = |problem: String| Error::Input(format!("{}:{line_no}: {problem}", path.display()));
        let g: GroupLine = serde_json::from_str(line).map_err(|e| at(e.to_string()))?;
        if g.completions.is_empty() {
            return Err(at("field `completions`: expected at least one completion".into()));
        }
        let images = vlm.load_images(&g.images.iter().map(|p| base.join(p)).collect::<Vec<_>>()).map_err(|e| at(e.to_string()))?;
        let prompt = vlm.user_prompt(system, images, &g.prompt).map_err(|e| at(e.to_string()))?;
        if let Some(lps) = &g.sampling_logprobs
            && lps.len() != g.completions.len()
        {
            return Err(at(format!("field `sampling_logprobs`: {} lists for {} completions", lps.len(), g.completions.len())));
        }
        let mut completions = Vec::new();
        for (i, raw) in g.completions.iter().enumerate() {
            let ids = vlm.prompts.encode_completion(raw).map_err(|e| at(e.to_string()))?;
            let sampling_logprobs = match &g.sampling_logprobs {
                Some(lps) if lps[i].len() != ids.len() => {
                    return Err(at(format!("field `sampling_logprobs[{i}]`: {} values for {} completion tokens", lps[i].len(), ids.len())));
                }
                Some(lps) => Some(lps[i].clone()),
                None => None,
            };
            // Rewards read the decoded completion without special tokens, as the released trainer does.
            let text = vlm.prompts.decode(&ids, true).map_err(|e| at(e.to_string()))?;
            completions.push(Completion { ids, text, sampling_logprobs });
        }
        groups.push(Group { prompt, answer: g.answer, answer_label: g.answer_label, options: g.options, completions, version: 0 });
        Ok(())
    })?;
    if groups.is_empty() {
        return Err(Error::EmptyBatch(format!("{} has no groups", path.display())));
    }
    Ok(groups)
}
