//! A model directory as a whole: weights, image processor, tokenizer and chat template, with the
//! two operations every role needs: score completions and generate from chat prompts.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device};

use crate::chat::{Message, Part, PromptEncoder};
use crate::generate::{Completion, GenerationParams, Request, generate};
use crate::image::{ImageProcessor, ProcessedImage};
use crate::model::{Qwen25Vl, Sequence};
use crate::nn::Exec;
use crate::{Error, Result};

/// A loaded model directory.
pub struct Vlm {
    pub model: Qwen25Vl,
    pub images: ImageProcessor,
    pub prompts: PromptEncoder,
    /// Padding token id (masked, its value never matters).
    pub pad_id: u32,
    /// Token ids that end a completion.
    pub stop_ids: Vec<u32>,
    pub dir: PathBuf,
}

/// A prompt ready for the model: token ids and the images they refer to.
#[derive(Debug, Clone)]
pub struct EncodedPrompt {
    pub ids: Vec<u32>,
    pub images: Vec<ProcessedImage>,
}

/// A completion with its text.
#[derive(Debug, Clone, PartialEq)]
pub struct GeneratedText {
    pub text: String,
    pub completion: Completion,
}

impl Vlm {
    /// Loads every file of a Hugging Face model directory.
    pub fn load(dir: &Path, dtype: DType, device: &Device) -> Result<Self> {
        if !dir.is_dir() {
            return Err(Error::io(dir, std::io::Error::new(std::io::ErrorKind::NotFound, "model directory not found")));
        }
        Self::from_parts(dir, Qwen25Vl::load(dir, dtype, device)?)
    }

    /// Loads like [`Self::load`] with the decoder's projections fused
    /// ([`Qwen25Vl::fuse_projections`]): for models that only generate and score.
    pub fn load_for_inference(dir: &Path, dtype: DType, device: &Device) -> Result<Self> {
        let mut vlm = Self::load(dir, dtype, device)?;
        vlm.model.fuse_projections()?;
        Ok(vlm)
    }

    /// Wraps an already built model (e.g. one whose weights are trainable variables) with the
    /// processor, tokenizer and generation settings of `dir`.
    pub fn from_parts(dir: &Path, model: Qwen25Vl) -> Result<Self> {
        let images = ImageProcessor::load(dir)?;
        let prompts = PromptEncoder::load(dir)?;
        let generation = read_generation_config(dir)?;
        let mut stop_ids = generation.eos.unwrap_or_else(|| model.config.eos_token_ids.clone());
        if let Some(im_end) = prompts.token_id("<|im_end|>")
            && !stop_ids.contains(&im_end)
        {
            stop_ids.push(im_end);
        }
        let pad_id = generation.pad.or_else(|| prompts.token_id("<|endoftext|>")).unwrap_or(0);
        Ok(Vlm { model, images, prompts, pad_id, stop_ids, dir: dir.to_path_buf() })
    }

    /// Preprocesses image files.
    pub fn load_images(&self, paths: &[PathBuf]) -> Result<Vec<ProcessedImage>> {
        paths.iter().map(|p| self.images.process_path(p)).collect()
    }

    /// An optional system turn and one user turn (images first, then `text`) through the chat
    /// template with the generation prompt, image pads expanded.
    pub fn user_prompt(&self, system: Option<&str>, images: Vec<ProcessedImage>, text: &str) -> Result<EncodedPrompt> {
        let mut messages = Vec::new();
        if let Some(s) = system {
            messages.push(Message { role: "system".into(), parts: vec![Part::Text(s.to_string())] });
        }
        let mut parts: Vec<Part> = images.iter().map(|_| Part::Image).collect();
        parts.push(Part::Text(text.to_string()));
        messages.push(Message { role: "user".into(), parts });
        let merge = self.model.config.vision.spatial_merge_size;
        let counts: Vec<usize> = images.iter().map(|im| im.merged_tokens(merge)).collect();
        let ids = self.prompts.encode_prompt(&messages, &counts, true)?;
        Ok(EncodedPrompt { ids, images })
    }

    /// Log-prob of every completion token given its prompt, for prompts and completions scored
    /// together as one left-padded batch. Returns the completion ids and their log-probs.
    pub fn score(&self, items: &[(EncodedPrompt, String)]) -> Result<Vec<(Vec<u32>, Vec<f32>)>> {
        let mut full = Vec::with_capacity(items.len());
        let mut spans = Vec::with_capacity(items.len());
        let mut completions = Vec::with_capacity(items.len());
        for (prompt, completion) in items {
            let ids = self.prompts.encode_completion(completion)?;
            if ids.is_empty() {
                return Err(Error::Input(format!("completion {completion:?} has no tokens")));
            }
            let mut seq = prompt.ids.clone();
            seq.extend_from_slice(&ids);
            spans.push(prompt.ids.len()..seq.len());
            full.push(seq);
            completions.push(ids);
        }
        let seqs: Vec<Sequence<'_>> = full.iter().zip(items).map(|(ids, (p, _))| Sequence { ids, images: &p.images }).collect();
        let batch = self.model.batch(&seqs, self.pad_id)?;
        let lps = self.model.span_logprobs(&batch, &spans, Exec::Infer)?.to_vec1::<f32>()?;
        let mut out = Vec::with_capacity(items.len());
        let mut at = 0;
        for ids in completions {
            let n = ids.len();
            out.push((ids, lps[at..at + n].to_vec()));
            at += n;
        }
        Ok(out)
    }

    /// Samples `num_samples` completions per prompt.
    pub fn generate(&self, prompts: &[EncodedPrompt], num_samples: usize, params: &GenerationParams) -> Result<Vec<Vec<GeneratedText>>> {
        let requests: Vec<Request<'_>> = prompts.iter().map(|p| Request { prompt: &p.ids, images: &p.images, num_samples }).collect();
        let outs = generate(&self.model, &requests, params, &self.stop_ids, self.pad_id)?;
        outs.into_iter()
            .map(|group| {
                group
                    .into_iter()
                    .map(|completion| Ok(GeneratedText { text: self.prompts.decode(&completion.token_ids, true)?, completion }))
                    .collect()
            })
            .collect()
    }
}

struct GenerationConfig {
    eos: Option<Vec<u32>>,
    pad: Option<u32>,
}

fn read_generation_config(dir: &Path) -> Result<GenerationConfig> {
    let path = dir.join("generation_config.json");
    if !path.exists() {
        return Ok(GenerationConfig { eos: None, pad: None });
    }
    let text = std::fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
    let v: serde_json::Value = serde_json::from_str(&text).map_err(|source| Error::Json { path: path.clone(), cause: source })?;
    let ids = |key: &str| -> Result<Option<Vec<u32>>> {
        match v.get(key) {
            None | Some(serde_json::Value::Null) => Ok(None),
            Some(serde_json::Value::Number(n)) => Ok(n.as_u64().map(|x| vec![x as u32])),
            Some(serde_json::Value::Array(list)) => list
                .iter()
                .map(|x| x.as_u64().map(|x| x as u32).ok_or_else(|| Error::config(&path, key, "expected token ids")))
                .collect::<Result<Vec<_>>>()
                .map(Some),
            Some(other) => Err(Error::config(&path, key, format!("expected a token id or a list, found {other}"))),
        }
    };
    Ok(GenerationConfig { eos: ids("eos_token_id")?, pad: ids("pad_token_id")?.and_then(|v| v.first().copied()) })
}
