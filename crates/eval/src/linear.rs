//! The linear probe head of the paper's `linprobe.py`: `BatchNorm1d(dim, affine=False,
//! eps=1e-6)` then `Linear(dim, classes)`, cross-entropy, SGD (momentum 0.9, no weight decay)
//! with cosine annealing of the learning rate over the epochs (paper-recipe.md §8.2).
//!
//! The head is small enough that its gradients are written out by hand: the batch norm has no
//! parameters and the frozen features need no gradient, so only the linear layer learns.

use std::borrow::Cow;

use rand::Rng;
use rand::SeedableRng;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use serde::{Deserialize, Serialize};

use crate::error::{EvalError, Result};

/// PyTorch's batch-norm epsilon as `linprobe.py` sets it.
pub const BN_EPS: f64 = 1e-6;

/// PyTorch's default running-statistics momentum of `BatchNorm1d`.
pub const BN_MOMENTUM: f64 = 0.1;

/// Optimiser settings of the linear probe.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LinearConfig {
    /// Passes over the training set; the paper's 20.
    pub epochs: usize,
    /// Peak learning rate; the paper's default 0.1.
    pub lr: f64,
    /// SGD momentum; 0.9.
    pub momentum: f64,
    /// Examples per step; the paper's default 1024.
    pub batch_size: usize,
    /// Seed of the initial weights and of the shuffling.
    pub seed: u64,
}

impl Default for LinearConfig {
    fn default() -> Self {
        LinearConfig { epochs: 20, lr: 0.1, momentum: 0.9, batch_size: 1024, seed: 0 }
    }
}

/// Loss and accuracy over one pass.
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
pub struct Scores {
    /// Mean cross-entropy.
    pub loss: f64,
    /// Top-1 accuracy.
    pub top1: f64,
    /// Top-5 accuracy (top-`classes` when there are fewer than five classes).
    pub top5: f64,
}

/// One epoch of training, with the evaluation after it.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct EpochLog {
    /// 0-based epoch.
    pub epoch: usize,
    /// Learning rate used during the epoch.
    pub lr: f64,
    /// Scores on the training batches, computed before each step as `linprobe.py` logs them.
    pub train: Scores,
    /// Scores on the evaluation set after the epoch.
    pub eval: Scores,
}

/// BatchNorm (no affine) + linear layer.
#[derive(Debug, Clone, PartialEq)]
pub struct LinearHead {
    dim: usize,
    classes: usize,
    /// Row-major `[classes, dim]`.
    weight: Vec<f32>,
    bias: Vec<f32>,
    running_mean: Vec<f64>,
    running_var: Vec<f64>,
    weight_velocity: Vec<f32>,
    bias_velocity: Vec<f32>,
}

/// Cosine-annealed learning rate of `epoch` (PyTorch `CosineAnnealingLR`, `T_max = epochs`,
/// `eta_min = 0`, stepped once per epoch).
pub fn cosine_lr(base: f64, epoch: usize, epochs: usize) -> f64 {
    if epochs == 0 {
        return base;
    }
    0.5 * base * (1.0 + (std::f64::consts::PI * epoch as f64 / epochs as f64).cos())
}

/// Indices of the `k` largest values, largest first; ties keep the lower index first.
pub fn top_indices(values: &[f32], k: usize) -> Vec<usize> {
    let mut order: Vec<usize> = (0..values.len()).collect();
    order.sort_by(|&a, &b| values[b].total_cmp(&values[a]).then(a.cmp(&b)));
    order.truncate(k);
    order
}

impl LinearHead {
    /// A head with PyTorch's `nn.Linear` initialisation, U(-1/sqrt(dim), 1/sqrt(dim)).
    pub fn new(dim: usize, classes: usize, rng: &mut impl Rng) -> Self {
        let bound = 1.0 / (dim.max(1) as f32).sqrt();
        let mut draw = |n: usize| (0..n).map(|_| rng.random_range(-bound..=bound)).collect::<Vec<f32>>();
        let weight = draw(classes * dim);
        let bias = draw(classes);
        LinearHead {
            dim,
            classes,
            weight,
            bias,
            running_mean: vec![0.0; dim],
            running_var: vec![1.0; dim],
            weight_velocity: vec![0.0; classes * dim],
            bias_velocity: vec![0.0; classes],
        }
    }

    fn logits(&self, z: &[f32]) -> Vec<f32> {
        (0..self.classes)
            .map(|c| {
                let row = &self.weight[c * self.dim..(c + 1) * self.dim];
                row.iter().zip(z).map(|(w, x)| w * x).sum::<f32>() + self.bias[c]
            })
            .collect()
    }

    /// Class scores of one feature vector in evaluation mode (running statistics).
    pub fn predict(&self, x: &[f32]) -> Vec<f32> {
        let z: Vec<f32> = x
            .iter()
            .zip(self.running_mean.iter().zip(&self.running_var))
            .map(|(&v, (&m, &var))| ((f64::from(v) - m) / (var + BN_EPS).sqrt()) as f32)
            .collect();
        self.logits(&z)
    }

    /// One SGD step on a batch (training-mode batch norm); returns the batch's summed loss and
    /// top-1 / top-5 hit counts, computed before the update.
    pub fn step(&mut self, batch: &[&[f32]], labels: &[usize], lr: f64, momentum: f64) -> (f64, usize, usize) {
        let b = batch.len();
        let d = self.dim;
        // Batch statistics: biased variance normalises, unbiased feeds the running estimate.
        let mut mean = vec![0f64; d];
        for x in batch {
            for (m, &v) in mean.iter_mut().zip(x.iter()) {
                *m += f64::from(v);
            }
        }
        mean.iter_mut().for_each(|m| *m /= b as f64);
        let mut var = vec![0f64; d];
        for x in batch {
            for ((s, &v), m) in var.iter_mut().zip(x.iter()).zip(&mean) {
                *s += (f64::from(v) - m).powi(2);
            }
        }
        let unbiased: Vec<f64> = var.iter().map(|s| s / (b as f64 - 1.0)).collect();
        var.iter_mut().for_each(|s| *s /= b as f64);
        for i in 0..d {
            self.running_mean[i] = (1.0 - BN_MOMENTUM) * self.running_mean[i] + BN_MOMENTUM * mean[i];
            self.running_var[i] = (1.0 - BN_MOMENTUM) * self.running_var[i] + BN_MOMENTUM * unbiased[i];
        }
        let inv_std: Vec<f64> = var.iter().map(|v| 1.0 / (v + BN_EPS).sqrt()).collect();
        let mut grad_w = vec![0f32; self.classes * d];
        let mut grad_b = vec![0f32; self.classes];
        let (mut loss, mut hit1, mut hit5) = (0.0, 0, 0);
        let top = self.classes.min(5);
        for (x, &y) in batch.iter().zip(labels) {
            let z: Vec<f32> = x.iter().zip(mean.iter().zip(&inv_std)).map(|(&v, (m, s))| ((f64::from(v) - m) * s) as f32).collect();
            let logits = self.logits(&z);
            let ranked = top_indices(&logits, top);
            hit1 += usize::from(ranked.first() == Some(&y));
            hit5 += usize::from(ranked.contains(&y));
            let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let exp: Vec<f64> = logits.iter().map(|&l| f64::from(l - max).exp()).collect();
            let sum: f64 = exp.iter().sum();
            loss += sum.ln() - f64::from(logits[y] - max);
            for c in 0..self.classes {
                // d(mean CE)/d(logit_c) = (softmax_c - [c = y]) / B.
                let g = ((exp[c] / sum - if c == y { 1.0 } else { 0.0 }) / b as f64) as f32;
                grad_b[c] += g;
                for (gw, &zv) in grad_w[c * d..(c + 1) * d].iter_mut().zip(&z) {
                    *gw += g * zv;
                }
            }
        }
        // PyTorch SGD: v = momentum * v + g; p -= lr * v.
        let lr = lr as f32;
        let momentum = momentum as f32;
        for ((p, v), g) in self.weight.iter_mut().zip(self.weight_velocity.iter_mut()).zip(&grad_w) {
            *v = momentum * *v + g;
            *p -= lr * *v;
        }
        for ((p, v), g) in self.bias.iter_mut().zip(self.bias_velocity.iter_mut()).zip(&grad_b) {
            *v = momentum * *v + g;
            *p -= lr * *v;
        }
        (loss, hit1, hit5)
    }

    /// Loss and accuracy on a labelled set in evaluation mode.
    pub fn score(&self, features: &[Vec<f32>], labels: &[usize]) -> Scores {
        if features.is_empty() {
            return Scores::default();
        }
        let top = self.classes.min(5);
        let (mut loss, mut hit1, mut hit5) = (0.0, 0usize, 0usize);
        for (x, &y) in features.iter().zip(labels) {
            let logits = self.predict(x);
            let ranked = top_indices(&logits, top);
            hit1 += usize::from(ranked.first() == Some(&y));
            hit5 += usize::from(ranked.contains(&y));
            let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let lse = f64::from(max) + logits.iter().map(|&l| f64::from(l - max).exp()).sum::<f64>().ln();
            loss += lse - f64::from(logits[y]);
        }
        let n = features.len() as f64;
        Scores { loss: loss / n, top1: hit1 as f64 / n, top5: hit5 as f64 / n }
    }
}

/// Trains a head. `train_features(epoch)` gives the training features of that epoch (fresh
/// augmented views, or the same fixed ones borrowed), in the order of `train_labels`; the
/// evaluation set is scored after every epoch, as `linprobe.py` does.
pub fn train_linear_probe<'f>(
    mut train_features: impl FnMut(usize) -> Result<Cow<'f, [Vec<f32>]>>,
    train_labels: &[usize],
    eval_features: &[Vec<f32>],
    eval_labels: &[usize],
    classes: usize,
    config: &LinearConfig,
) -> Result<(LinearHead, Vec<EpochLog>)> {
    if config.batch_size < 2 {
        return Err(EvalError::config("batch_size", "training-mode batch norm needs at least 2 examples per batch"));
    }
    if !(config.lr.is_finite() && config.lr > 0.0) {
        return Err(EvalError::config("lr", format!("expected > 0, got {}", config.lr)));
    }
    if train_labels.iter().chain(eval_labels).any(|&y| y >= classes) {
        return Err(EvalError::Data(format!("a label is outside the {classes} classes")));
    }
    let mut rng = StdRng::seed_from_u64(config.seed);
    let mut head: Option<LinearHead> = None;
    let mut logs = Vec::with_capacity(config.epochs);
    for epoch in 0..config.epochs {
        let features = train_features(epoch)?;
        if features.len() != train_labels.len() {
            return Err(EvalError::Data(format!("{} training features for {} labels", features.len(), train_labels.len())));
        }
        let dim = features.first().map_or(0, Vec::len);
        let head = head.get_or_insert_with(|| LinearHead::new(dim, classes, &mut rng));
        if features.iter().any(|f| f.len() != head.dim) {
            return Err(EvalError::Data("training features differ in width".into()));
        }
        let lr = cosine_lr(config.lr, epoch, config.epochs);
        let mut order: Vec<usize> = (0..features.len()).collect();
        order.shuffle(&mut rng);
        let (mut loss, mut hit1, mut hit5, mut seen) = (0.0, 0, 0, 0);
        for chunk in order.chunks(config.batch_size) {
            // PyTorch refuses a training-mode batch norm over one example; skip such a tail.
            if chunk.len() < 2 {
                tracing::debug!("epoch {epoch}: skipping a final batch of one example");
                continue;
            }
            let batch: Vec<&[f32]> = chunk.iter().map(|&i| features[i].as_slice()).collect();
            let labels: Vec<usize> = chunk.iter().map(|&i| train_labels[i]).collect();
            let (l, h1, h5) = head.step(&batch, &labels, lr, config.momentum);
            loss += l;
            hit1 += h1;
            hit5 += h5;
            seen += chunk.len();
        }
        let seen_f = seen.max(1) as f64;
        let train = Scores { loss: loss / seen_f, top1: hit1 as f64 / seen_f, top5: hit5 as f64 / seen_f };
        let eval = head.score(eval_features, eval_labels);
        tracing::info!(
            "epoch {epoch}: lr {lr:.4}  train loss {:.4} top1 {:.2}%  eval loss {:.4} top1 {:.2}% top5 {:.2}%",
            train.loss,
            100.0 * train.top1,
            eval.loss,
            100.0 * eval.top1,
            100.0 * eval.top5
        );
        logs.push(EpochLog { epoch, lr, train, eval });
    }
    let head = head.ok_or_else(|| EvalError::config("epochs", "expected at least 1"))?;
    Ok((head, logs))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cosine_schedule_matches_pytorch() {
        assert_eq!(cosine_lr(0.1, 0, 20), 0.1);
        assert!((cosine_lr(0.1, 10, 20) - 0.05).abs() < 1e-15);
        assert!((cosine_lr(0.1, 19, 20) - 0.1 * 0.5 * (1.0 + (std::f64::consts::PI * 19.0 / 20.0).cos())).abs() < 1e-15);
    }

    #[test]
    fn top_indices_break_ties_low_first() {
        assert_eq!(top_indices(&[0.1, 0.5, 0.5, -1.0], 3), vec![1, 2, 0]);
    }

    #[test]
    fn one_step_matches_hand_gradients() {
        // dim 1, two classes, batch of two: z = (-1, 1) after batch norm (eps aside).
        let mut head = LinearHead {
            dim: 1,
            classes: 2,
            weight: vec![0.0, 0.0],
            bias: vec![0.0, 0.0],
            running_mean: vec![0.0],
            running_var: vec![1.0],
            weight_velocity: vec![0.0; 2],
            bias_velocity: vec![0.0; 2],
        };
        let (a, b) = ([1.0f32], [3.0f32]);
        let (loss, _, _) = head.step(&[&a, &b], &[0, 1], 1.0, 0.9);
        assert!((loss - 2.0 * 2f64.ln()).abs() < 1e-9);
        // grad W[0] = mean((p0 - y0) z) = ((0.5 - 1)(-1) + 0.5 * 1) / 2 = 0.5, so W[0] = -0.5.
        let z = 1.0 / (1.0 + BN_EPS).sqrt();
        assert!((f64::from(head.weight[0]) + 0.5 * z).abs() < 1e-6, "{:?}", head.weight);
        assert!((f64::from(head.weight[1]) - 0.5 * z).abs() < 1e-6);
        assert_eq!(head.bias, vec![0.0, 0.0]);
        // Running statistics: mean 0.1 * 2, unbiased variance 2 -> 0.9 + 0.2.
        assert!((head.running_mean[0] - 0.2).abs() < 1e-12);
        assert!((head.running_var[0] - 1.1).abs() < 1e-12);
    }
}
