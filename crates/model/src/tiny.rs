//! A tiny Qwen2.5-VL-shaped model that medrl creates from scratch and saves in the Hugging Face
//! layout (config, safetensors, tokenizer, chat template, preprocessor config): the model of the
//! CPU default run and of tests.

use std::path::Path;

use candle_core::{DType, Device};
use serde_json::json;

use crate::config::Config;
use crate::tiny_tokenizer::write_tiny_tokenizer;
use crate::weights::{Weights, write_atomic};
use crate::{Error, Result};

/// Sizes of a tiny model.
#[derive(Debug, Clone, PartialEq)]
pub struct TinySpec {
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub vision_hidden: usize,
    pub vision_intermediate: usize,
    pub vision_depth: usize,
    pub vision_heads: usize,
    /// Image side limits in pixels; small images keep the CPU run fast.
    pub min_pixels: usize,
    pub max_pixels: usize,
    pub seed: u64,
}

impl Default for TinySpec {
    fn default() -> Self {
        TinySpec {
            hidden_size: 128,
            intermediate_size: 256,
            num_layers: 4,
            num_heads: 4,
            num_kv_heads: 2,
            vision_hidden: 64,
            vision_intermediate: 128,
            vision_depth: 4,
            vision_heads: 4,
            min_pixels: 56 * 56,
            max_pixels: 112 * 112,
            seed: 0,
        }
    }
}

/// The `config.json` of a tiny model in the transformers 5.x layout.
pub fn tiny_config_json(spec: &TinySpec, vocab_size: usize, ids: &crate::tiny_tokenizer::SpecialTokenIds) -> serde_json::Value {
    let head_dim = spec.hidden_size / spec.num_heads;
    let half = head_dim / 2;
    // Qwen's proportions [16, 24, 24] of 64, scaled to this half-dimension.
    let t = half / 4;
    let h = (half - t) / 2;
    let mrope = [t, h, half - t - h];
    json!({
        "architectures": ["Qwen2_5_VLForConditionalGeneration"],
        "model_type": "qwen2_5_vl",
        "dtype": "float32",
        "image_token_id": ids.image_pad,
        "video_token_id": ids.video_pad,
        "vision_start_token_id": ids.vision_start,
        "vision_end_token_id": ids.vision_end,
        "vision_token_id": ids.vision_pad,
        "tie_word_embeddings": false,
        "text_config": {
            "model_type": "qwen2_5_vl_text",
            "vocab_size": vocab_size,
            "hidden_size": spec.hidden_size,
            "intermediate_size": spec.intermediate_size,
            "num_hidden_layers": spec.num_layers,
            "num_attention_heads": spec.num_heads,
            "num_key_value_heads": spec.num_kv_heads,
            "hidden_act": "silu",
            "rms_norm_eps": 1e-6,
            "max_position_embeddings": 4096,
            "rope_parameters": {"rope_type": "default", "rope_theta": 1_000_000.0, "mrope_section": mrope},
            "bos_token_id": ids.endoftext,
            "eos_token_id": ids.im_end,
            "pad_token_id": ids.endoftext,
        },
        "vision_config": {
            "model_type": "qwen2_5_vl_vision",
            "depth": spec.vision_depth,
            "hidden_size": spec.vision_hidden,
            "intermediate_size": spec.vision_intermediate,
            "num_heads": spec.vision_heads,
            "out_hidden_size": spec.hidden_size,
            "in_channels": 3,
            "patch_size": 14,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
            "window_size": 56,
            "fullatt_block_indexes": [spec.vision_depth.saturating_sub(1)],
            "hidden_act": "silu",
            "tokens_per_second": 2,
            "rope_parameters": {"rope_type": "axial", "rope_theta": 10_000.0},
        },
    })
}

/// Creates a tiny random model in `dir` (HF layout) and returns its config.
pub fn create_tiny(dir: &Path, spec: &TinySpec) -> Result<Config> {
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let ids = write_tiny_tokenizer(dir)?;
    // A little headroom above the tokenizer, as Qwen pads its embedding matrix.
    let vocab = ids.vocab_size.div_ceil(64) * 64;
    let value = tiny_config_json(spec, vocab, &ids);
    let path = dir.join("config.json");
    let config = Config::from_value(value.clone(), &path)?;
    write_atomic(&path, pretty(&value).as_bytes())?;
    let preprocessor = json!({
        "image_processor_type": "Qwen2VLImageProcessor",
        "processor_class": "Qwen2_5_VLProcessor",
        "min_pixels": spec.min_pixels,
        "max_pixels": spec.max_pixels,
        "patch_size": 14,
        "merge_size": 2,
        "temporal_patch_size": 2,
        "image_mean": [0.48145466, 0.4578275, 0.40821073],
        "image_std": [0.26862954, 0.26130258, 0.27577711],
        "do_resize": true,
        "do_rescale": true,
        "rescale_factor": 1.0 / 255.0,
        "do_normalize": true,
        "do_convert_rgb": true,
    });
    write_atomic(&dir.join("preprocessor_config.json"), pretty(&preprocessor).as_bytes())?;
    let generation = json!({"bos_token_id": ids.endoftext, "eos_token_id": [ids.im_end, ids.endoftext], "pad_token_id": ids.endoftext});
    write_atomic(&dir.join("generation_config.json"), pretty(&generation).as_bytes())?;
    // transformers' AutoProcessor reads the template from this file only.
    write_atomic(&dir.join("chat_template.jinja"), crate::chat::DEFAULT_CHAT_TEMPLATE.as_bytes())?;
    Weights::random(&config, spec.seed, DType::F32, &Device::Cpu)?.save(dir, DType::F32, usize::MAX)?;
    Ok(config)
}

fn pretty(v: &serde_json::Value) -> String {
    serde_json::to_string_pretty(v).unwrap_or_else(|_| v.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Qwen25Vl;

    #[test]
    fn a_created_tiny_model_loads_back() -> Result<()> {
        let dir = tempfile::tempdir().map_err(|e| Error::io("tempdir", e))?;
        let config = create_tiny(dir.path(), &TinySpec::default())?;
        assert_eq!(config.text.mrope_section.iter().sum::<usize>() * 2, config.text.head_dim);
        let model = Qwen25Vl::load(dir.path(), DType::F32, &Device::Cpu)?;
        assert_eq!(model.config, Config::load(dir.path())?);
        for file in ["config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "preprocessor_config.json"] {
            assert!(dir.path().join(file).exists(), "{file} missing");
        }
        Ok(())
    }
}
