//! The data order: one seeded shuffle per epoch, reproducible from (seed, epoch) alone, so a
//! restarted coordinator recomputes the same order instead of storing it.
//!
//! The generator is SplitMix64, written here rather than taken from `rand`, whose `StdRng` may
//! change algorithm between versions: a run's order must not depend on a dependency upgrade.

/// SplitMix64: a tiny, well-mixed 64-bit generator (Steele, Lea, Flood 2014).
struct SplitMix64(u64);

impl SplitMix64 {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `0..bound` by multiply-shift (bias below 2^-32 for any realistic prompt count).
    fn below(&mut self, bound: u64) -> u64 {
        ((u128::from(self.next()) * u128::from(bound)) >> 64) as u64
    }
}

/// The order in which epoch `epoch` visits prompt indexes `0..n` (a Fisher-Yates shuffle).
pub fn epoch_order(n: u32, seed: u64, epoch: u32) -> Vec<u32> {
    // Mix the epoch in through one generator step so that neighbouring seeds and epochs do not
    // produce related streams.
    let mut seeder = SplitMix64(seed ^ u64::from(epoch).wrapping_mul(0xD1B5_4A32_D192_ED03));
    let mut rng = SplitMix64(seeder.next());
    let mut order: Vec<u32> = (0..n).collect();
    for i in (1..order.len()).rev() {
        let j = rng.below(i as u64 + 1) as usize;
        order.swap(i, j);
    }
    order
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn orders_are_permutations_reproducible_and_differ_per_epoch() {
        let a = epoch_order(1000, 42, 0);
        assert_eq!(a, epoch_order(1000, 42, 0));
        let mut sorted = a.clone();
        sorted.sort_unstable();
        assert_eq!(sorted, (0..1000).collect::<Vec<_>>());
        assert_ne!(a, epoch_order(1000, 42, 1));
        assert_ne!(a, epoch_order(1000, 43, 0));
        assert!(epoch_order(0, 1, 0).is_empty());
        assert_eq!(epoch_order(1, 1, 0), vec![0]);
    }

    #[test]
    fn the_order_is_pinned() {
        // A changed generator would silently change every run's data order: pin a few values.
        assert_eq!(epoch_order(8, 42, 0), vec![1, 3, 4, 5, 0, 7, 6, 2]);
        // First positions of a large shuffle spread over the range rather than staying in order.
        let big = epoch_order(10_000, 7, 3);
        let in_place = big.iter().enumerate().filter(|(i, v)| *i as u32 == **v).count();
        assert!(in_place < 20, "{in_place} fixed points");
    }
}
