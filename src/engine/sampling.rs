//! Token choice from logits: greedy, or temperature / top-k / top-p with a seeded RNG.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SamplingParams {
    /// 0 = greedy (deterministic argmax).
    pub temperature: f32,
    /// 0 = off.
    pub top_k: usize,
    /// 1.0 = off.
    pub top_p: f32,
    pub seed: u64,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self { temperature: 0.0, top_k: 0, top_p: 1.0, seed: 0 }
    }
}

/// Index of the largest logit; the first one on ties (as torch.argmax).
pub use crate::backend::first_argmax as argmax;

pub struct Sampler {
    params: SamplingParams,
    rng: StdRng,
}

impl Sampler {
    pub fn new(params: SamplingParams) -> Self {
        Self { params, rng: StdRng::seed_from_u64(params.seed) }
    }

    pub fn params(&self) -> SamplingParams {
        self.params
    }

    /// The probability distribution sampling draws from (after temperature,
    /// top-k and top-p), as (id, p) with p summing to 1.
    pub fn distribution(&self, logits: &[f32]) -> Vec<(u32, f32)> {
        let p = self.params;
        let t = p.temperature.max(1e-6);
        let mut cand: Vec<(u32, f32)> =
            logits.iter().enumerate().filter(|(_, v)| v.is_finite()).map(|(i, &v)| (i as u32, v / t)).collect();
        cand.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
        if p.top_k > 0 && cand.len() > p.top_k {
            cand.truncate(p.top_k);
        }
        let m = cand.first().map(|c| c.1).unwrap_or(0.0);
        let mut sum = 0.0;
        for c in cand.iter_mut() {
            c.1 = (c.1 - m).exp();
            sum += c.1;
        }
        for c in cand.iter_mut() {
            c.1 /= sum;
        }
        if p.top_p < 1.0 {
            let mut acc = 0.0;
            let mut keep = cand.len();
            for (i, c) in cand.iter().enumerate() {
                acc += c.1;
                if acc >= p.top_p {
                    keep = i + 1;
                    break;
                }
            }
            cand.truncate(keep);
            let s: f32 = cand.iter().map(|c| c.1).sum();
            for c in cand.iter_mut() {
                c.1 /= s;
            }
        }
        cand
    }

    pub fn sample(&mut self, logits: &[f32]) -> u32 {
        if self.params.temperature <= 0.0 {
            return argmax(logits);
        }
        let dist = self.distribution(logits);
        self.draw(&dist)
    }

    /// One draw from a distribution of (id, p).
    pub fn draw(&mut self, dist: &[(u32, f32)]) -> u32 {
        let r: f32 = self.rng.gen();
        let mut acc = 0.0;
        for &(id, p) in dist {
            acc += p;
            if r < acc {
                return id;
            }
        }
        dist.last().map(|d| d.0).unwrap_or(0)
    }

    pub fn uniform(&mut self) -> f32 {
        self.rng.gen()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greedy_is_first_argmax() {
        assert_eq!(argmax(&[1.0, 3.0, 3.0, -1.0]), 1);
    }

    #[test]
    fn seeded_sampling_is_reproducible_and_respects_top_k() {
        let logits: Vec<f32> = (0..50).map(|i| (i as f32 * 0.37).sin()).collect();
        let params = SamplingParams { temperature: 0.8, top_k: 5, top_p: 1.0, seed: 7 };
        let a: Vec<u32> = { let mut s = Sampler::new(params); (0..100).map(|_| s.sample(&logits)).collect() };
        let b: Vec<u32> = { let mut s = Sampler::new(params); (0..100).map(|_| s.sample(&logits)).collect() };
        assert_eq!(a, b);
        let allowed: Vec<u32> = Sampler::new(params).distribution(&logits).iter().map(|d| d.0).collect();
        assert_eq!(allowed.len(), 5);
        assert!(a.iter().all(|id| allowed.contains(id)));
    }

    #[test]
    fn top_p_keeps_the_smallest_prefix_reaching_p() {
        let logits = [10.0, 9.0, 0.0, -5.0];
        let params = SamplingParams { temperature: 1.0, top_k: 0, top_p: 0.9, seed: 1 };
        let d = Sampler::new(params).distribution(&logits);
        assert_eq!(d.iter().map(|x| x.0).collect::<Vec<_>>(), vec![0, 1]);
    }
}
