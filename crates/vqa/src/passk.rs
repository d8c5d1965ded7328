//! Unbiased Pass@k (Chen et al. 2021, "Evaluating Large Language Models Trained on Code").

use serde::{Deserialize, Serialize};

/// Sample counts of one item: `samples` drawn, `correct` of them right.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct SampleCounts {
    /// Number of samples drawn (n).
    pub samples: u64,
    /// Number of correct samples (c).
    pub correct: u64,
}

/// Why Pass@k is undefined for the given counts.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PassAtKError {
    /// k = 0: there is no empty draw to pass.
    #[error("pass@k needs k >= 1")]
    ZeroK,
    /// Fewer samples than k.
    #[error("pass@{k} needs at least {k} samples, got {n}")]
    TooFewSamples {
        /// Samples drawn.
        n: u64,
        /// Requested k.
        k: u64,
    },
    /// More correct samples than samples.
    #[error("{c} correct out of {n} samples is impossible")]
    CorrectExceedsSamples {
        /// Samples drawn.
        n: u64,
        /// Correct samples claimed.
        c: u64,
    },
    /// No items to average over.
    #[error("mean pass@k over zero items")]
    NoItems,
    /// One item of a batch was invalid.
    #[error("item {index}: {source}")]
    Item {
        /// Index of the offending item.
        index: usize,
        /// What was wrong with it.
        #[source]
        source: Box<PassAtKError>,
    },
}

/// Unbiased pass@k of one item: the probability that k of its n samples, drawn without
/// replacement, include a correct one: `1 - C(n-c, k) / C(n, k)`.
///
/// Computed as `1 - prod_{i=n-c+1}^{n} (1 - k/i)`, which avoids huge binomials; exactly 1.0
/// when `n - c < k` (every k-subset holds a correct sample) and 0.0 when `c = 0`.
pub fn pass_at_k(n: u64, c: u64, k: u64) -> Result<f64, PassAtKError> {
    if k == 0 {
        return Err(PassAtKError::ZeroK);
    }
    if k > n {
        return Err(PassAtKError::TooFewSamples { n, k });
    }
    if c > n {
        return Err(PassAtKError::CorrectExceedsSamples { n, c });
    }
    if n - c < k {
        return Ok(1.0);
    }
    // Counts stay far below 2^53 in practice, so u64 -> f64 is exact.
    let k = k as f64;
    let fail = ((n - c + 1)..=n).fold(1.0_f64, |prod, i| prod * (1.0 - k / i as f64));
    Ok(1.0 - fail)
}

/// Mean unbiased pass@k over items; errors name the first invalid item.
pub fn mean_pass_at_k(items: &[SampleCounts], k: u64) -> Result<f64, PassAtKError> {
    if items.is_empty() {
        return Err(PassAtKError::NoItems);
    }
    let mut sum = 0.0;
    for (index, item) in items.iter().enumerate() {
        sum += pass_at_k(item.samples, item.correct, k).map_err(|e| PassAtKError::Item {
            index,
            source: Box::new(e),
        })?;
    }
    Ok(sum / items.len() as f64)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Fraction of k-subsets of n samples (the first c correct) holding a correct one, by
    /// enumerating every subset as a bit mask.
    fn brute_force(n: u32, c: u32, k: u32) -> f64 {
        let correct_mask = (1u32 << c) - 1;
        let (mut hits, mut total) = (0u64, 0u64);
        for subset in 0u32..(1 << n) {
            if subset.count_ones() == k {
                total += 1;
                if subset & correct_mask != 0 {
                    hits += 1;
                }
            }
        }
        hits as f64 / total as f64
    }

    #[test]
    fn matches_brute_force_for_all_small_cases() -> Result<(), PassAtKError> {
        for n in 1..=12 {
            for c in 0..=n {
                for k in 1..=n {
                    let got = pass_at_k(u64::from(n), u64::from(c), u64::from(k))?;
                    let want = brute_force(n, c, k);
                    assert!(
                        (got - want).abs() < 1e-12,
                        "n={n} c={c} k={k}: {got} vs {want}"
                    );
                }
            }
        }
        Ok(())
    }

    #[test]
    fn exact_values() -> Result<(), PassAtKError> {
        // k = 1 is c / n.
        assert_eq!(pass_at_k(16, 4, 1)?, 0.25);
        // 1 - C(2,2)/C(4,2) = 1 - 1/6.
        assert!((pass_at_k(4, 2, 2)? - 5.0 / 6.0).abs() < 1e-15);
        // n = k: 1 if any correct, else 0 (the eval kit's empirical pass@K).
        assert_eq!(pass_at_k(16, 1, 16)?, 1.0);
        assert_eq!(pass_at_k(16, 0, 16)?, 0.0);
        // c = 0 is exactly 0; n - c < k is exactly 1.
        assert_eq!(pass_at_k(5, 0, 3)?, 0.0);
        assert_eq!(pass_at_k(5, 3, 3)?, 1.0);
        assert_eq!(pass_at_k(5, 5, 1)?, 1.0);
        Ok(())
    }

    #[test]
    fn large_counts_stay_finite() -> Result<(), PassAtKError> {
        // 1 - C(990, 10)/C(1000, 10), computed exactly as a product of ratios.
        let want = 1.0 - (0..10).fold(1.0, |p, j| p * (990.0 - j as f64) / (1000.0 - j as f64));
        let got = pass_at_k(1000, 10, 10)?;
        assert!((got - want).abs() < 1e-12);
        assert!(pass_at_k(1_000_000, 500_000, 1000)? <= 1.0);
        Ok(())
    }

    #[test]
    fn invalid_counts_are_errors() {
        assert_eq!(
            pass_at_k(4, 1, 5),
            Err(PassAtKError::TooFewSamples { n: 4, k: 5 })
        );
        assert_eq!(
            pass_at_k(4, 5, 2),
            Err(PassAtKError::CorrectExceedsSamples { n: 4, c: 5 })
        );
        assert_eq!(pass_at_k(4, 1, 0), Err(PassAtKError::ZeroK));
        assert_eq!(pass_at_k(0, 0, 0), Err(PassAtKError::ZeroK));
        assert_eq!(
            pass_at_k(0, 0, 1),
            Err(PassAtKError::TooFewSamples { n: 0, k: 1 })
        );
    }

    #[test]
    fn mean_over_items() -> Result<(), PassAtKError> {
        let items = [
            SampleCounts {
                samples: 4,
                correct: 2,
            },
            SampleCounts {
                samples: 4,
                correct: 0,
            },
            SampleCounts {
                samples: 4,
                correct: 4,
            },
        ];
        let want = (5.0 / 6.0 + 0.0 + 1.0) / 3.0;
        assert!((mean_pass_at_k(&items, 2)? - want).abs() < 1e-15);
        assert_eq!(mean_pass_at_k(&items, 1)?, 0.5);
        Ok(())
    }

    #[test]
    fn mean_errors_name_the_item() {
        assert_eq!(mean_pass_at_k(&[], 1), Err(PassAtKError::NoItems));
        let items = [
            SampleCounts {
                samples: 4,
                correct: 1,
            },
            SampleCounts {
                samples: 2,
                correct: 1,
            },
        ];
        assert_eq!(
            mean_pass_at_k(&items, 3),
            Err(PassAtKError::Item {
                index: 1,
                source: Box::new(PassAtKError::TooFewSamples { n: 2, k: 3 })
            })
        );
    }
}
