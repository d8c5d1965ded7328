//! Weight transport between the medrl learner and rollout workers.
//!
//! - [`encode_weights`] / [`decode_weights`]: a model's weights as one safetensors blob (legacy HF
//!   names), checked against the config on the way in.
//! - [`WeightPublisher`]: the learner publishes each version's blob; it serves `medrl.v1.Weights`,
//!   streaming the newest version in chunks that carry version, offset, size and digest ([`digest`]).
//! - [`fetch_weights`]: a worker reassembles and verifies a version; a half or corrupt transfer
//!   is an error and is never returned. [`reusable_buffer`] hands a blob's memory to the next fetch.
//! - [`bench_loopback`]: loopback GB/s of the stream.
//! - `nccl` (feature `cuda`, untested here): NCCL broadcast of flat buffers from rank 0.

#![warn(missing_docs)]

pub mod assemble;
pub mod bench;
pub mod client;
pub mod codec;
pub mod digest;
pub mod error;
#[cfg(feature = "cuda")]
pub mod nccl;
pub mod publisher;

pub use assemble::{Assembler, FetchedWeights, reusable_buffer};
pub use bench::{FetchTiming, LoopbackReport, bench_loopback, pseudo_random_blob};
pub use client::{FetchOptions, fetch_weights, fetch_weights_with};
pub use codec::{FORMAT, decode_weights, encode_weights, encode_weights_into};
pub use error::{Result, WeightSyncError};
pub use digest::{blob_digest, sha256_hex};
pub use publisher::{PublishedWeights, PublisherOptions, WeightPublisher};
