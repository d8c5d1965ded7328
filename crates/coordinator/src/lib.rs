//! The medrl coordinator: owns the data order and hands out prompt leases to rollout workers,
//! keeps exactly-once accounting per epoch (pending -> leased -> delivered -> trained), runs the
//! policy-version clock and the staleness gate, optionally skips prompts without support, and
//! journals every durable fact so a restarted coordinator resumes the same run.
//!
//! Entry point: [`serve`] with a [`CoordinatorConfig`] and a [`PromptSet`].

#![warn(missing_docs)]

pub mod config;
pub mod core;
pub mod error;
pub mod handle;
pub mod images;
pub mod journal;
pub mod ledger;
pub mod loadgen;
pub mod metrics;
pub mod order;
pub mod prompts;
pub mod request_error;
pub mod service;
pub mod support;
pub mod support_log;
mod sweeper;

pub use config::{ConfigError, CoordinatorConfig, SupportConfig};
pub use error::CoordinatorError;
pub use handle::{CoordinatorHandle, serve, serve_with};
pub use prompts::PromptSet;
