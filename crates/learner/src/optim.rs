//! Optimizers and what surrounds a step: AdamW with f32 master weights, plain SGD, global-norm
//! gradient clipping, gradient accumulation over micro-batches, and saving / resuming state.
//! Optimizer state and gradient sums live with the weights or in host memory ([`Placement`]).

pub mod accumulate;
pub mod adamw;
pub mod clip;
mod host;
pub mod sgd;
pub mod state;

use candle_core::Device;
use candle_core::backprop::GradStore;

pub use accumulate::GradAccumulator;
pub use adamw::{AdamW, AdamWConfig, MomentDType};
pub use clip::{clip_grad_norm, grad_norm};
pub use sgd::Sgd;
pub use state::{STATE_JSON, STATE_TENSORS};

use crate::Result;

/// Where the optimizer keeps its state (f32 master weights, moments) and the gradient sums.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Placement {
    /// On the device of each weight.
    #[default]
    WithWeights,
    /// In host memory, updated on all CPU cores (ZeRO-Offload style). On a GPU this frees 12 to
    /// 16 bytes per parameter of GPU memory and costs two PCIe transfers of the weights' size per
    /// step (gradients down per micro-batch, new weights up per step).
    Host,
}

impl Placement {
    /// The device state for weights on `weights` lives on.
    pub fn device(self, weights: &Device) -> Device {
        match self {
            Placement::WithWeights => weights.clone(),
            Placement::Host => Device::Cpu,
        }
    }
}

/// An optimizer over a fixed set of `Var`s, driven by a [`GradStore`].
pub trait Optimizer {
    /// Applies one update from `grads`; variables without a gradient are left unchanged.
    fn step(&mut self, grads: &GradStore) -> Result<()>;
    /// The learning rate the next step uses.
    fn learning_rate(&self) -> f64;
    /// Sets the learning rate for the next steps (a schedule calls this before each step).
    fn set_learning_rate(&mut self, lr: f64);
}
