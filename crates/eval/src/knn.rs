//! The kNN probe of the paper's `knn.py`: L2-normalised features, cosine similarity, the k = 20
//! nearest training images vote (paper-recipe.md §8.3). Similarities are computed as matrix
//! products in chunks on the model's device.

use candle_core::{Device, Tensor};
use serde::{Deserialize, Serialize};

use crate::error::{EvalError, Result};

/// How neighbours vote.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Vote {
    /// One vote per neighbour; ties go to the lower label (`torch.bincount(...).argmax()`),
    /// as the paper's script.
    #[default]
    Majority,
    /// Each neighbour votes with its cosine similarity.
    Weighted,
}

impl std::str::FromStr for Vote {
    type Err = EvalError;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "majority" => Ok(Vote::Majority),
            "weighted" => Ok(Vote::Weighted),
            other => Err(EvalError::config("vote", format!("expected majority or weighted, got {other:?}"))),
        }
    }
}

/// Accuracy of a kNN classification.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct KnnScores {
    /// Neighbours used (k, capped at the training-set size).
    pub k: usize,
    /// Top-1 accuracy.
    pub top1: f64,
    /// Top-5 accuracy: the label is among the five labels with the most votes (labels without
    /// votes never count; `knn.py` can count them, an artefact of `torch.bincount`).
    pub top5: f64,
}

/// `x / max(|x|, 1e-12)`, as `F.normalize`.
pub fn l2_normalise(x: &[f32]) -> Vec<f32> {
    let norm = x.iter().map(|&v| f64::from(v).powi(2)).sum::<f64>().sqrt().max(1e-12);
    x.iter().map(|&v| (f64::from(v) / norm) as f32).collect()
}

/// Labels ranked by their votes, best first; ties go to the lower label.
pub fn rank_labels(neighbours: &[(usize, f32)], classes: usize, vote: Vote) -> Vec<usize> {
    let mut votes = vec![0f64; classes];
    let mut any = vec![false; classes];
    for &(label, sim) in neighbours {
        if let Some(v) = votes.get_mut(label) {
            *v += match vote {
                Vote::Majority => 1.0,
                Vote::Weighted => f64::from(sim),
            };
            any[label] = true;
        }
    }
    let mut labels: Vec<usize> = (0..classes).filter(|&c| any[c]).collect();
    labels.sort_by(|&a, &b| votes[b].total_cmp(&votes[a]).then(a.cmp(&b)));
    labels
}

/// Classifies `test` by its `k` most similar `train` features; chunks of `chunk` test rows are
/// compared with the whole training set at once on `device`.
#[allow(clippy::too_many_arguments)]
pub fn knn_scores(
    train: &[Vec<f32>],
    train_labels: &[usize],
    test: &[Vec<f32>],
    test_labels: &[usize],
    classes: usize,
    k: usize,
    vote: Vote,
    chunk: usize,
    device: &Device,
) -> Result<KnnScores> {
    if train.is_empty() || test.is_empty() {
        return Err(EvalError::Data("kNN needs training and evaluation features".into()));
    }
    if k == 0 || chunk == 0 {
        return Err(EvalError::config("k", "k and the chunk size must be at least 1"));
    }
    if train.len() != train_labels.len() || test.len() != test_labels.len() {
        return Err(EvalError::Data("feature and label counts differ".into()));
    }
    let dim = train[0].len();
    if train.iter().chain(test).any(|f| f.len() != dim) {
        return Err(EvalError::Data("features differ in width".into()));
    }
    let k = k.min(train.len());
    let flat = |rows: &[Vec<f32>]| rows.iter().flat_map(|r| l2_normalise(r)).collect::<Vec<f32>>();
    let bank = Tensor::from_vec(flat(train), (train.len(), dim), device)?.t()?.contiguous()?;
    let (mut hit1, mut hit5) = (0usize, 0usize);
    for (rows, labels) in test.chunks(chunk).zip(test_labels.chunks(chunk)) {
        let queries = Tensor::from_vec(flat(rows), (rows.len(), dim), device)?;
        let sims = queries.matmul(&bank)?.to_vec2::<f32>()?;
        for (row, &y) in sims.iter().zip(labels) {
            let mut order: Vec<usize> = (0..row.len()).collect();
            // Partial selection of the k most similar; ties keep the lower training index.
            let cmp = |a: &usize, b: &usize| row[*b].total_cmp(&row[*a]).then(a.cmp(b));
            if k < order.len() {
                order.select_nth_unstable_by(k - 1, cmp);
                order.truncate(k);
            }
            let neighbours: Vec<(usize, f32)> = order.iter().map(|&i| (train_labels[i], row[i])).collect();
            let ranked = rank_labels(&neighbours, classes, vote);
            hit1 += usize::from(ranked.first() == Some(&y));
            hit5 += usize::from(ranked.iter().take(5).any(|&l| l == y));
        }
    }
    let n = test.len() as f64;
    Ok(KnnScores { k, top1: hit1 as f64 / n, top5: hit5 as f64 / n })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn majority_ties_go_low_and_weighted_uses_similarity() {
        let n = [(2, 0.9), (1, 0.1), (1, 0.2), (2, 0.3)];
        assert_eq!(rank_labels(&n, 4, Vote::Majority), vec![1, 2]);
        assert_eq!(rank_labels(&n, 4, Vote::Weighted), vec![2, 1]);
    }

    #[test]
    fn nearest_neighbours_by_cosine() -> Result<()> {
        let train = vec![vec![1.0, 0.0], vec![2.0, 0.1], vec![0.0, 1.0], vec![0.1, 3.0]];
        let labels = [0, 0, 1, 1];
        let test = vec![vec![5.0, 0.2], vec![0.0, 0.5]];
        let s = knn_scores(&train, &labels, &test, &[0, 1], 2, 3, Vote::Majority, 1, &Device::Cpu)?;
        assert_eq!((s.k, s.top1, s.top5), (3, 1.0, 1.0));
        let s = knn_scores(&train, &labels, &test, &[1, 0], 2, 1, Vote::Majority, 8, &Device::Cpu)?;
        assert_eq!((s.top1, s.top5), (0.0, 0.0));
        Ok(())
    }
}
