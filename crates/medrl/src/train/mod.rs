//! `medrl train`: the whole recipe in one run directory: data, evaluation before, SFT so the
//! model has support, evaluation, GRPO through the real roles over gRPC, evaluation after.

pub mod data;
pub mod rl;
pub mod sft;
