//! Statistics of a handful of samples: the median, a distribution-free
//! confidence interval for it, and ratios paired by round.
//!
//! Nothing here assumes a distribution: throughput samples on a shared
//! 2-core machine are skewed (a round that lost a core to something else is
//! far off, never symmetric), so means and standard deviations would mislead.

/// The coverage the interval aims for.
pub const CONFIDENCE: f64 = 0.95;

/// Where a set of samples lies: median, extremes, and an interval that holds
/// the true median with probability `coverage` (order statistics: the
/// binomial interval, exact for any continuous distribution).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Spread {
    pub n: usize,
    pub min: f64,
    pub median: f64,
    pub max: f64,
    /// The median's interval. With fewer than 6 samples no pair of order
    /// statistics reaches 95 %; it is then `min..max`, with its lower
    /// coverage stated.
    pub lo: f64,
    pub hi: f64,
    pub coverage: f64,
}

impl Spread {
    /// `None` for no samples.
    pub fn of(values: &[f64]) -> Option<Spread> {
        if values.is_empty() {
            return None;
        }
        let mut v = values.to_vec();
        v.sort_by(f64::total_cmp);
        let n = v.len();
        let median = if n % 2 == 1 {
            v[n / 2]
        } else {
            (v[n / 2 - 1] + v[n / 2]) / 2.0
        };
        let (k, coverage) = median_interval_rank(n);
        Some(Spread {
            n,
            min: v[0],
            median,
            max: v[n - 1],
            lo: v[k - 1],
            hi: v[n - k],
            coverage,
        })
    }

    /// The interval's width over the median: the relative noise of a figure.
    pub fn relative_spread(&self) -> f64 {
        if self.median == 0.0 {
            return 0.0;
        }
        (self.max - self.min) / self.median.abs()
    }

    /// Whether the whole interval lies on one side of `bound`: above it
    /// (`above`) or below it.
    pub fn clear_of(&self, bound: f64, above: bool) -> bool {
        if above {
            self.lo > bound
        } else {
            self.hi < bound
        }
    }
}

/// The 1-based rank `k` such that the `k`-th smallest and `k`-th largest of
/// `n` samples bracket the median with at least [`CONFIDENCE`], the largest
/// such `k` (the narrowest interval), and its coverage
/// `1 - 2 P(Bin(n, 1/2) < k)`. For `n` < 6 no `k` reaches it: 1 (min..max).
pub fn median_interval_rank(n: usize) -> (usize, f64) {
    if n == 0 {
        return (1, 0.0);
    }
    let tail_allowed = (1.0 - CONFIDENCE) / 2.0;
    let mut k = 1;
    // Narrow the interval while the k+1-th order statistics still leave no
    // more than the allowed tail below (and above) the median.
    while 2 * (k + 1) <= n && cumulative_below(n, k + 1) <= tail_allowed {
        k += 1;
    }
    (k, 1.0 - 2.0 * cumulative_below(n, k))
}

/// P(X < k) for X ~ Bin(n, 1/2).
fn cumulative_below(n: usize, k: usize) -> f64 {
    let mut term = 0.5f64.powi(n as i32);
    let mut sum = 0.0;
    for i in 0..k {
        sum += term;
        term = term * (n - i) as f64 / (i + 1) as f64;
    }
    sum
}

/// Ratios of two figures measured in the same rounds (`a` over `b`, each a
/// list of `(round, value)`): rounds missing from either side, or with a
/// zero baseline, are left out. Pairing by round cancels drifts of the
/// machine that both sides of one round shared.
pub fn paired_ratios(a: &[(u32, f64)], b: &[(u32, f64)]) -> Vec<f64> {
    a.iter()
        .filter_map(|(round, x)| {
            let y = b.iter().find(|(r, _)| r == round)?.1;
            (y != 0.0).then(|| x / y)
        })
        .collect()
}

/// The overlay's own cost as a share of kernel vxlan's, per round: what a
/// mode costs above the host network over what kernel vxlan costs above it.
/// Rounds where kernel vxlan cost no more than the host (nothing to share
/// out) are left out.
pub fn own_cost_ratios(
    mode: &[(u32, f64)],
    host: &[(u32, f64)],
    kernel: &[(u32, f64)],
) -> Vec<f64> {
    mode.iter()
        .filter_map(|(round, m)| {
            let h = host.iter().find(|(r, _)| r == round)?.1;
            let k = kernel.iter().find(|(r, _)| r == round)?.1;
            (k - h > 0.0).then(|| (m - h) / (k - h))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spread_of_odd_even_and_empty() {
        let s = Spread::of(&[3.0, 1.0, 2.0]).unwrap();
        assert_eq!((s.min, s.median, s.max, s.n), (1.0, 2.0, 3.0, 3));
        assert_eq!(Spread::of(&[4.0, 1.0, 3.0, 2.0]).unwrap().median, 2.5);
        assert!(Spread::of(&[]).is_none());
        assert!((Spread::of(&[9.0, 10.0, 11.0]).unwrap().relative_spread() - 0.2).abs() < 1e-12);
    }

    #[test]
    fn median_interval_ranks_match_the_binomial_tables() {
        // Below 6 samples only min..max, covering 1 - 2/2^n.
        assert_eq!(median_interval_rank(1), (1, 0.0));
        let (k, c) = median_interval_rank(5);
        assert_eq!(k, 1);
        assert!((c - (1.0 - 2.0 / 32.0)).abs() < 1e-12);
        let (k, c) = median_interval_rank(6);
        assert_eq!(k, 1);
        assert!((c - (1.0 - 2.0 / 64.0)).abs() < 1e-12);
        // n = 10: the 2nd and 9th, 1 - 2 * 11/1024 = 97.85 %.
        let (k, c) = median_interval_rank(10);
        assert_eq!(k, 2);
        assert!((c - (1.0 - 22.0 / 1024.0)).abs() < 1e-12);
        // Standard table values (e.g. Conover): n = 20 -> 6th and 15th.
        assert_eq!(median_interval_rank(20).0, 6);
        assert_eq!(median_interval_rank(9).0, 2);
        assert_eq!(median_interval_rank(8).0, 1);
        for n in 6..60 {
            let (_, c) = median_interval_rank(n);
            assert!(c >= CONFIDENCE, "n={n}: {c}");
        }
    }

    #[test]
    fn interval_of_ten_samples_drops_one_at_each_end() {
        let v: Vec<f64> = (1..=10).map(f64::from).collect();
        let s = Spread::of(&v).unwrap();
        assert_eq!((s.lo, s.median, s.hi), (2.0, 5.5, 9.0));
        assert!(s.clear_of(1.5, true) && !s.clear_of(2.0, true));
        assert!(s.clear_of(9.5, false) && !s.clear_of(9.0, false));
    }

    #[test]
    fn ratios_pair_by_round() {
        let a = [(0, 10.0), (1, 12.0), (3, 9.0)];
        let b = [(0, 5.0), (1, 4.0), (2, 7.0), (3, 0.0)];
        assert_eq!(paired_ratios(&a, &b), vec![2.0, 3.0]);
        let host = [(0, 10.0), (1, 10.0), (2, 10.0)];
        let kernel = [(0, 20.0), (1, 14.0), (2, 10.0)];
        let fast = [(0, 12.0), (1, 12.0), (2, 11.0)];
        // Round 2: kernel no dearer than host, left out.
        assert_eq!(own_cost_ratios(&fast, &host, &kernel), vec![0.2, 0.5]);
    }
}
