//! Qwen2.5-VL in candle, faithful to transformers: config, weights, image processor, tokenizer and
//! chat template, vision tower, M-RoPE text decoder, per-token log-probs and generation.

pub mod chat;
pub mod config;
#[cfg(feature = "cuda")]
mod cuda_attention;
pub mod decoder;
pub mod error;
pub mod generate;
pub mod group_cache;
pub mod image;
pub mod logprobs;
pub mod model;
pub mod nn;
pub mod pipeline;
pub mod rope;
pub mod sample;
pub mod tiny;
pub mod tiny_tokenizer;
pub mod vision;
pub mod weights;

pub use error::{Error, Result};
