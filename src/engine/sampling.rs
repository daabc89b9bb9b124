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

/// Moves the smallest most-likely set of `c` whose mass reaches `need` to its
/// front (in no particular order) and returns its size: a quickselect on mass,
/// expected O(n), then a sort of at most 64 candidates at the boundary.
fn nucleus(c: &mut [(u32, f32)], need: f64, order: impl Fn(&(u32, f32), &(u32, f32)) -> std::cmp::Ordering + Copy) -> usize {
    let (mut lo, mut hi, mut acc) = (0, c.len(), 0f64);
    // A language model's nucleus is usually a handful of tokens: try the best 64 first.
    if hi > 64 {
        c.select_nth_unstable_by(63, order);
        let head: f64 = c[..64].iter().map(|x| x.1 as f64).sum();
        if head >= need {
            hi = 64;
        } else {
            (lo, acc) = (64, head);
        }
    }
    // invariant: c[..lo] (mass `acc`, below `need`) all come before c[lo..hi], and the
    // boundary lies in c[lo..hi]
    while hi - lo > 64 {
        let mid = lo + (hi - lo) / 2;
        c[lo..hi].select_nth_unstable_by(mid - lo, order);
        let left: f64 = c[lo..mid].iter().map(|x| x.1 as f64).sum();
        if acc + left >= need {
            hi = mid;
        } else {
            acc += left;
            lo = mid;
        }
    }
    c[lo..hi].sort_unstable_by(order);
    for (i, x) in c[lo..hi].iter().enumerate() {
        acc += x.1 as f64;
        if acc >= need {
            return lo + i + 1;
        }
    }
    hi
}

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
    /// top-k and top-p), as (id, p) with p summing to 1. With top-k or top-p set,
    /// the kept tokens come most likely first (ties: lower id first) and only
    /// they are ever sorted; otherwise the distribution is in id order. Sorting
    /// a whole 50k-token row cost 2.5–4.4 ms on the host per sampled token.
    pub fn distribution(&self, logits: &[f32]) -> Vec<(u32, f32)> {
        let p = self.params;
        let t = p.temperature.max(1e-6);
        let mut cand: Vec<(u32, f32)> =
            logits.iter().enumerate().filter(|(_, v)| v.is_finite()).map(|(i, &v)| (i as u32, v / t)).collect();
        let order = |a: &(u32, f32), b: &(u32, f32)| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0));
        if p.top_k > 0 {
            if cand.len() > p.top_k {
                cand.select_nth_unstable_by(p.top_k - 1, order);
                cand.truncate(p.top_k);
            }
            cand.sort_unstable_by(order);
        }
        let m = cand.iter().fold(f32::NEG_INFINITY, |m, c| m.max(c.1));
        // unnormalised probabilities; the order (p desc, lower id first) is the logits' order
        for c in cand.iter_mut() {
            c.1 = (c.1 - m).exp();
        }
        if p.top_p < 1.0 && !cand.is_empty() {
            let need = p.top_p as f64 * cand.iter().map(|c| c.1 as f64).sum::<f64>();
            let keep = nucleus(&mut cand, need, order);
            cand.truncate(keep);
            cand.sort_unstable_by(order);
        }
        let sum: f64 = cand.iter().map(|c| c.1 as f64).sum();
        for c in cand.iter_mut() {
            c.1 = (c.1 as f64 / sum) as f32;
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
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

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

    /// The distribution by sorting the whole row (what `distribution` computed
    /// before it sorted only the kept head): same tokens, same order where cut,
    /// same probabilities.
    #[test]
    fn distribution_equals_sorting_the_whole_row() {
        fn reference(logits: &[f32], p: SamplingParams) -> Vec<(u32, f64)> {
            let t = p.temperature.max(1e-6);
            let mut cand: Vec<(u32, f32)> =
                logits.iter().enumerate().filter(|(_, v)| v.is_finite()).map(|(i, &v)| (i as u32, v / t)).collect();
            cand.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
            if p.top_k > 0 {
                cand.truncate(p.top_k);
            }
            let m = cand.first().map_or(0.0, |c| c.1);
            let e: Vec<f64> = cand.iter().map(|c| ((c.1 - m).exp()) as f64).collect();
            let total: f64 = e.iter().sum();
            let mut keep = cand.len();
            if p.top_p < 1.0 {
                let mut acc = 0.0;
                keep = e.iter().position(|x| {
                    acc += x;
                    acc >= p.top_p as f64 * total
                }).map_or(cand.len(), |i| i + 1);
            }
            let kept: f64 = e[..keep].iter().sum();
            cand[..keep].iter().zip(&e).map(|(c, x)| (c.0, x / kept)).collect()
        }
        let mut rng = StdRng::seed_from_u64(9);
        for case in 0..300 {
            let n = [1, 5, 64, 65, 300, 5000][case % 6];
            let ties = case % 3 == 0;
            let logits: Vec<f32> = (0..n)
                .map(|_| match rng.gen_range(0..20) {
                    0 => f32::NEG_INFINITY,
                    _ if ties => rng.gen_range(0..6) as f32,
                    _ => rng.gen_range(-6.0..6.0),
                })
                .collect();
            let p = SamplingParams {
                temperature: [0.3, 0.8, 1.0, 2.0][case % 4],
                top_k: [0, 0, 1, 7, 40][case % 5],
                top_p: [1.0, 0.9, 0.5, 0.05, 0.99, 1.0, 0.7][case % 7],
                seed: 0,
            };
            let got = Sampler::new(p).distribution(&logits);
            let want = reference(&logits, p);
            let cut = p.top_k > 0 || p.top_p < 1.0;
            let mut g = got.clone();
            if !cut {
                g.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
            }
            assert_eq!(g.len(), want.len(), "case {case} {p:?}");
            for ((gi, gp), (wi, wp)) in g.iter().zip(&want) {
                if cut {
                    assert_eq!(gi, wi, "case {case} {p:?}: order");
                }
                assert!((*gp as f64 - wp).abs() <= 1e-6 * wp.max(1e-3), "case {case} {p:?}: p({gi}) {gp} vs {wp}");
            }
        }
    }

    /// Per-row cost of `distribution` on a 49,152-token row (printed, never asserted):
    /// `cargo test --release --lib timing_distribution -- --nocapture`.
    #[test]
    fn timing_distribution_50k() {
        let flat: Vec<f32> = (0..49152).map(|i| (i as f32 * 0.7919).sin() * 8.0).collect();
        // a language model's row: a few tokens far above the rest
        let peaked: Vec<f32> = (0..49152).map(|i| (i as f32 * 0.7919).sin() * 3.0 + if i % 997 == 0 { 12.0 } else { 0.0 }).collect();
        for (name, row) in [("flat", &flat), ("peaked", &peaked)] {
            for (top_k, top_p) in [(0usize, 1.0f32), (0, 0.9), (40, 1.0), (50, 0.95)] {
                let s = Sampler::new(SamplingParams { temperature: 0.8, top_k, top_p, seed: 1 });
                let reps = 20;
                let t = std::time::Instant::now();
                let mut kept = 0;
                for _ in 0..reps {
                    kept = s.distribution(std::hint::black_box(row)).len();
                }
                eprintln!("[timing] {name:<6} top_k {top_k:>2} top_p {top_p:<4}: {:>9.1?} per row ({kept} kept)", t.elapsed() / reps);
            }
        }
    }

    #[test]
    fn top_p_keeps_the_smallest_prefix_reaching_p() {
        let logits = [10.0, 9.0, 0.0, -5.0];
        let params = SamplingParams { temperature: 1.0, top_k: 0, top_p: 0.9, seed: 1 };
        let d = Sampler::new(params).distribution(&logits);
        assert_eq!(d.iter().map(|x| x.0).collect::<Vec<_>>(), vec![0, 1]);
    }
}
