//! Qwen2.5-VL in candle, faithful to transformers: config, weights, image processor, tokenizer and
//! chat template, vision tower, M-RoPE text decoder, per-token log-probs and generation.

pub mod chat;
pub mod config;
pub mod decoder;
pub mod error;
pub mod generate;
pub mod image;
pub mod logprobs;
pub mod model;
pub mod nn;
pub mod pipeline;
pub mod rope;
pub mod tiny;
pub mod tiny_tokenizer;
pub mod vision;
pub mod weights;

pub use error::{Error, Result};
