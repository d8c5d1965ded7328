//! Optimizers and what surrounds a step: AdamW with f32 master weights, plain SGD, global-norm
//! gradient clipping, gradient accumulation over micro-batches, and saving / resuming state.

pub mod accumulate;
pub mod adamw;
pub mod clip;
pub mod sgd;
pub mod state;

use candle_core::backprop::GradStore;

pub use accumulate::GradAccumulator;
pub use adamw::{AdamW, AdamWConfig, MomentDType};
pub use clip::{clip_grad_norm, grad_norm};
pub use sgd::Sgd;
pub use state::{STATE_JSON, STATE_TENSORS};

use crate::Result;

/// An optimizer over a fixed set of `Var`s, driven by a [`GradStore`].
pub trait Optimizer {
    /// Applies one update from `grads`; variables without a gradient are left unchanged.
    fn step(&mut self, grads: &GradStore) -> Result<()>;
    /// The learning rate the next step uses.
    fn learning_rate(&self) -> f64;
    /// Sets the learning rate for the next steps (a schedule calls this before each step).
    fn set_learning_rate(&mut self, lr: f64);
}
