//! Percentiles and small statistics over latency samples.

/// Summary of a set of latency samples, in microseconds.
#[derive(Debug, Clone, Copy, PartialEq, Default, serde::Serialize, serde::Deserialize)]
pub struct Summary {
    /// Number of samples.
    pub count: usize,
    /// Median.
    pub p50_us: f64,
    /// 99th percentile (nearest rank).
    pub p99_us: f64,
    /// Largest sample.
    pub max_us: f64,
    /// Arithmetic mean.
    pub mean_us: f64,
}

/// The `q`-quantile (0..=1) of sorted samples by the nearest-rank method; 0 for no samples.
pub fn quantile(sorted: &[u64], q: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let rank = (q * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// Summarises samples given in nanoseconds.
pub fn summarize(mut samples_ns: Vec<u64>) -> Summary {
    samples_ns.sort_unstable();
    let us = |ns: u64| ns as f64 / 1000.0;
    let count = samples_ns.len();
    let mean = if count == 0 {
        0.0
    } else {
        samples_ns.iter().map(|&s| s as f64).sum::<f64>() / count as f64 / 1000.0
    };
    Summary {
        count,
        p50_us: us(quantile(&samples_ns, 0.50)),
        p99_us: us(quantile(&samples_ns, 0.99)),
        max_us: us(samples_ns.last().copied().unwrap_or(0)),
        mean_us: mean,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank_quantiles() {
        let v: Vec<u64> = (1..=100).collect();
        assert_eq!(quantile(&v, 0.5), 50);
        assert_eq!(quantile(&v, 0.99), 99);
        assert_eq!(quantile(&v, 1.0), 100);
        assert_eq!(quantile(&v, 0.0), 1);
        assert_eq!(quantile(&[], 0.5), 0);
        assert_eq!(quantile(&[7], 0.99), 7);
    }

    #[test]
    fn summary_in_microseconds() {
        let s = summarize(vec![3_000, 1_000, 2_000]);
        assert_eq!(s.count, 3);
        assert_eq!(s.p50_us, 2.0);
        assert_eq!(s.max_us, 3.0);
        assert_eq!(s.mean_us, 2.0);
    }
}
