//! Choosing the block size B per step: maximise expected committed tokens per
//! unit of step cost. Expected tokens come from running per-position
//! acceptance rates; the cost from measured step times where B has been run,
//! else from a model in which dense weights are read once per step and a MoE
//! layer reads the experts that B tokens touch: E·(1−(1−k/E)^B) of them in
//! expectation (uniform routing), which is 12.7× one token's for top-8 of 256
//! at B=16.

/// Expected distinct experts touched per MoE layer by `b` tokens routed top-`k` of `e`.
pub fn expected_experts(e: usize, k: usize, b: usize) -> f64 {
    let (e, k) = (e as f64, k as f64);
    e * (1.0 - (1.0 - k / e).powi(b as i32))
}

/// How a verify step's cost grows with B when it has not been measured.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CostModel {
    /// Extra cost of each block token beyond the first, relative to a one-token step
    /// (≈0.02–0.05 on a GPU, where a step is bound by reading weights; ≈1 on a CPU).
    pub per_token: f64,
    /// Share of a one-token step spent reading expert weights (0 for dense models).
    pub moe_share: f64,
    /// (experts, top-k) of the MoE layers.
    pub experts: Option<(usize, usize)>,
}

impl CostModel {
    pub fn dense(per_token: f64) -> Self {
        Self { per_token, moe_share: 0.0, experts: None }
    }

    /// Cost of a step with block `b` relative to a one-token step.
    pub fn relative(&self, b: usize) -> f64 {
        let dense = (1.0 - self.moe_share) * (1.0 + self.per_token * (b as f64 - 1.0));
        let moe = match self.experts {
            Some((e, k)) if self.moe_share > 0.0 => self.moe_share * expected_experts(e, k, b) / k as f64,
            _ => 0.0,
        };
        dense + moe
    }
}

/// Running acceptance statistics and step costs; picks B in `1..=max_block`.
#[derive(Debug, Clone)]
pub struct BlockSizeChooser {
    max_block: usize,
    model: CostModel,
    /// tried[j] / accepted[j]: draft position j+1 was verified / accepted (given all before it were).
    tried: Vec<f64>,
    accepted: Vec<f64>,
    /// Exponential moving average of measured step seconds, per B (index B).
    cost: Vec<Option<f64>>,
    /// Steps taken through [`next_block`](Self::next_block).
    steps: usize,
}

/// Prior per-position acceptance (as pseudo-counts): optimistic enough that
/// long blocks get tried before statistics exist.
const PRIOR_ACCEPT: f64 = 1.0;
const PRIOR_TRIED: f64 = 2.0;
const COST_EMA: f64 = 0.2;
/// Every this many steps the longest block or plain decoding (alternately) is run
/// anyway, so acceptance and cost statistics keep coming for both ends.
pub const EXPLORE_EVERY: usize = 16;

impl BlockSizeChooser {
    pub fn new(max_block: usize, model: CostModel) -> Self {
        let max_block = max_block.max(1);
        Self {
            max_block,
            model,
            tried: vec![0.0; max_block],
            accepted: vec![0.0; max_block],
            cost: vec![None; max_block + 1],
            steps: 0,
        }
    }

    /// The largest block it picks.
    pub fn max_block(&self) -> usize {
        self.max_block
    }

    /// Verified blocks observed so far (draft position 1 tried).
    pub fn observed_blocks(&self) -> usize {
        self.tried[0] as usize
    }

    /// The block size for the next step: [`choose`](Self::choose), except the second
    /// step, which measures plain decoding (B = 1 runs no drafter pass, a cost no
    /// model of the verify step predicts), and every [`EXPLORE_EVERY`]-th step, which
    /// runs the longest block and plain decoding in turn.
    pub fn next_block(&mut self) -> usize {
        self.steps += 1;
        if self.steps == 2 && self.cost[1].is_none() {
            1
        } else if self.steps.is_multiple_of(EXPLORE_EVERY) {
            if (self.steps / EXPLORE_EVERY) % 2 == 1 {
                self.max_block
            } else {
                1
            }
        } else {
            self.choose()
        }
    }

    /// One verified block: `drafted` draft tokens offered, the first `accepted` of them kept.
    pub fn observe_acceptance(&mut self, drafted: usize, accepted: usize) {
        for j in 0..drafted.min(self.max_block) {
            self.tried[j] += 1.0;
            if j < accepted {
                self.accepted[j] += 1.0;
            } else {
                // Positions after the first rejection were never really tested.
                break;
            }
        }
    }

    /// A measured step (draft + verify) at block `b`. The estimate drops at once to a
    /// faster step and rises only by a moving average: a slow step is often a one-off
    /// (a CUDA graph captured for a new row count), and a block explored once every
    /// 2·[`EXPLORE_EVERY`] steps would otherwise keep such a spike for a long time.
    pub fn observe_cost(&mut self, b: usize, seconds: f64) {
        if let Some(slot) = self.cost.get_mut(b) {
            *slot = Some(match *slot {
                Some(old) if seconds < old => seconds,
                Some(old) => old + COST_EMA * (seconds - old),
                None => seconds,
            });
        }
    }

    /// Expected committed tokens of a step with block `b`: the bonus token plus
    /// each draft position survived with the product of acceptance rates so far.
    pub fn expected_tokens(&self, b: usize) -> f64 {
        let mut survive = 1.0;
        let mut total = 1.0;
        for j in 0..b.saturating_sub(1).min(self.max_block) {
            survive *= (self.accepted[j] + PRIOR_ACCEPT) / (self.tried[j] + PRIOR_TRIED);
            total += survive;
        }
        total
    }

    /// Step cost at `b`: measured if run; else, between two measured drafting blocks,
    /// the straight line through them (a big batch's verify rows grow with B far faster
    /// than the model's per-token term); else the model scaled to the nearest measured
    /// B. Drafting steps (B ≥ 2) scale from drafting steps where one was measured: a
    /// plain step has no drafter pass, so it would make every block look cheap.
    pub fn step_cost(&self, b: usize) -> f64 {
        if let Some(c) = self.cost[b] {
            return c;
        }
        let measured = |x: usize| self.cost[x].map(|c| (x, c));
        if b >= 2 {
            let below = (2..b).rev().find_map(measured);
            let above = (b + 1..=self.max_block).find_map(measured);
            if let (Some((x0, c0)), Some((x1, c1))) = (below, above) {
                return c0 + (c1 - c0) * (b - x0) as f64 / (x1 - x0) as f64;
            }
        }
        let drafting = (2..=self.max_block).filter_map(measured).min_by_key(|&(x, _)| x.abs_diff(b));
        let anchor = if b >= 2 { drafting.or_else(|| measured(1)) } else { drafting };
        match anchor {
            Some((x, c)) => c * self.model.relative(b) / self.model.relative(x),
            None => self.model.relative(b),
        }
    }

    pub fn choose(&self) -> usize {
        let mut best = (1, 0.0);
        for b in 1..=self.max_block {
            let rate = self.expected_tokens(b) / self.step_cost(b);
            if rate > best.1 * (1.0 + 1e-9) {
                best = (b, rate);
            }
        }
        best.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expert_count_matches_the_design_note() {
        // top-8 of 256 at B=16 reads 12.7× the experts of one token.
        let ratio = expected_experts(256, 8, 16) / 8.0;
        assert!((ratio - 12.7).abs() < 0.05, "{ratio}");
        assert!((expected_experts(256, 8, 1) - 8.0).abs() < 1e-9);
    }

    fn trained(accept: f64, n: usize, max_b: usize, model: CostModel) -> BlockSizeChooser {
        let mut c = BlockSizeChooser::new(max_b, model);
        // Geometric acceptance: each position survives with probability `accept`.
        for i in 0..n {
            let mut a = 0;
            let mut x = (i as f64 * 0.618_033_988_7).fract();
            while a < max_b - 1 && x < accept {
                a += 1;
                x = (x * 7.31 + 0.123).fract();
            }
            c.observe_acceptance(max_b - 1, a);
        }
        c
    }

    #[test]
    fn high_acceptance_on_a_dense_gpu_model_takes_the_longest_block() {
        let c = trained(0.9, 2000, 16, CostModel::dense(0.03));
        assert_eq!(c.choose(), 16);
    }

    #[test]
    fn low_acceptance_on_a_cpu_picks_a_short_block() {
        let c = trained(0.1, 2000, 16, CostModel::dense(1.0));
        assert!(c.choose() <= 2, "{}", c.choose());
    }

    #[test]
    fn moe_expert_reads_shrink_the_block() {
        let dense = trained(0.7, 2000, 16, CostModel::dense(0.03));
        let moe = trained(
            0.7,
            2000,
            16,
            CostModel { per_token: 0.03, moe_share: 0.8, experts: Some((256, 8)) },
        );
        assert!(moe.choose() < dense.choose(), "moe {} dense {}", moe.choose(), dense.choose());
    }

    #[test]
    fn a_short_choice_still_explores_the_longest_block() {
        let mut c = trained(0.05, 2000, 8, CostModel::dense(1.0));
        let picks: Vec<usize> = (0..4 * EXPLORE_EVERY).map(|_| c.next_block()).collect();
        assert_eq!(picks.iter().filter(|&&b| b == 8).count(), 2, "{picks:?}");
        assert!(picks.iter().filter(|&&b| b == 1).count() >= 4 * EXPLORE_EVERY - 2, "{picks:?}");
    }

    #[test]
    fn a_long_choice_measures_plain_decoding_early_and_again() {
        let mut c = trained(0.9, 2000, 16, CostModel::dense(0.03));
        let picks: Vec<usize> = (0..2 * EXPLORE_EVERY).map(|_| c.next_block()).collect();
        assert_eq!(picks[1], 1, "{picks:?}");
        assert_eq!(picks[2 * EXPLORE_EVERY - 1], 1, "{picks:?}");
        assert_eq!(picks.iter().filter(|&&b| b == 1).count(), 2, "{picks:?}");
        // once measured, B = 1 is not re-measured at the second step of a new chooser's life
        let mut d = trained(0.9, 2000, 16, CostModel::dense(0.03));
        d.observe_cost(1, 1.0);
        assert_eq!((d.next_block(), d.next_block()), (16, 16));
    }

    #[test]
    fn a_one_off_slow_step_is_forgotten_at_the_next_normal_one() {
        let mut c = BlockSizeChooser::new(16, CostModel::dense(0.03));
        c.observe_cost(16, 9.0); // e.g. a graph capture
        c.observe_cost(16, 1.5);
        assert_eq!(c.step_cost(16), 1.5);
        c.observe_cost(16, 2.5);
        assert!((c.step_cost(16) - (1.5 + COST_EMA)).abs() < 1e-12);
    }

    #[test]
    fn unmeasured_blocks_between_two_measured_ones_cost_the_straight_line() {
        let mut c = BlockSizeChooser::new(16, CostModel::dense(0.03));
        c.observe_cost(4, 2.0);
        c.observe_cost(16, 8.0);
        assert!((c.step_cost(10) - 5.0).abs() < 1e-12, "{}", c.step_cost(10));
        // outside the measured range the model scales from the nearest drafting block
        assert!((c.step_cost(2) - 2.0 * c.model.relative(2) / c.model.relative(4)).abs() < 1e-12);
    }

    #[test]
    fn plain_decoding_wins_when_drafting_steps_cost_more_than_they_commit() {
        // a large batch on a GPU: plain steps are cheap, every drafting step pays the
        // drafter pass and many more verify rows (measured, H100 batch 32: ~4x)
        let mut c = trained(0.5, 2000, 16, CostModel::dense(0.03));
        c.observe_cost(1, 1.0);
        c.observe_cost(16, 6.0);
        assert_eq!(c.choose(), 1);
        // unmeasured drafting blocks scale from the measured drafting step, not from B = 1
        assert!(c.step_cost(4) > 4.0, "{}", c.step_cost(4));
    }

    #[test]
    fn measured_costs_override_the_model() {
        let mut c = trained(0.9, 2000, 8, CostModel::dense(0.0));
        assert_eq!(c.choose(), 8);
        // A measured B=8 step three times as slow as B=2 makes B=8 worse per token.
        c.observe_cost(2, 1.0);
        c.observe_cost(8, 6.0);
        assert!(c.choose() < 8, "{}", c.choose());
    }
}
