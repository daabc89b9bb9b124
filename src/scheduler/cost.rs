//! Measured step costs (exponentially weighted), the basis of finish-time estimates.

use std::time::Duration;

/// Running estimates: decode step time per batch size, prefill time per token.
#[derive(Debug, Clone)]
pub struct StepCosts {
    /// seconds per decode step, indexed by batch size (0 unused)
    decode: Vec<Option<f64>>,
    prefill_per_token: Option<f64>,
}

impl Default for StepCosts {
    fn default() -> Self {
        Self { decode: vec![None; 257], prefill_per_token: None }
    }
}

const ALPHA: f64 = 0.2;

fn ewma(old: Option<f64>, x: f64) -> f64 {
    old.map_or(x, |o| o + ALPHA * (x - o))
}

impl StepCosts {
    pub fn observe_decode(&mut self, batch: usize, took: Duration) {
        let b = batch.min(self.decode.len() - 1);
        self.decode[b] = Some(ewma(self.decode[b], took.as_secs_f64()));
    }

    pub fn observe_prefill(&mut self, tokens: usize, took: Duration) {
        if tokens > 0 {
            self.prefill_per_token = Some(ewma(self.prefill_per_token, took.as_secs_f64() / tokens as f64));
        }
    }

    /// Expected decode step time at `batch`: measured, else scaled from the
    /// nearest measured batch (memory-bound steps grow slowly with batch).
    pub fn decode(&self, batch: usize) -> Duration {
        let b = batch.clamp(1, self.decode.len() - 1);
        if let Some(s) = self.decode[b] {
            return Duration::from_secs_f64(s);
        }
        let nearest = (1..self.decode.len()).filter_map(|i| self.decode[i].map(|s| (i, s))).min_by_key(|(i, _)| i.abs_diff(b));
        let secs = match nearest {
            Some((i, s)) => s * (1.0 + 0.1 * (b as f64 - i as f64).max(0.0)),
            None => self.prefill_per_token.unwrap_or(0.01) * 2.0,
        };
        Duration::from_secs_f64(secs)
    }

    pub fn prefill(&self, tokens: usize) -> Duration {
        Duration::from_secs_f64(self.prefill_per_token.unwrap_or(0.005) * tokens as f64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn estimates_follow_measurements() {
        let mut c = StepCosts::default();
        c.observe_decode(1, Duration::from_millis(10));
        assert_eq!(c.decode(1), Duration::from_millis(10));
        assert!(c.decode(4) > c.decode(1));
        c.observe_prefill(100, Duration::from_millis(100));
        assert_eq!(c.prefill(50), Duration::from_millis(50));
    }
}
