//! What one GPU of a shard plan holds and reads per decode step, from the
//! config alone (`kairos inspect --tp N --ep M`).
//!
//! Batch 1: each MoE layer picks `top_k` distinct experts uniformly; a rank
//! reads the chosen experts of its group at its width slice. The step waits
//! for the busiest rank, so besides the mean we give the expected maximum
//! number of chosen experts in one group (exact, multivariate hypergeometric).
//! Collective traffic is not counted.

use super::plan::{ShardError, ShardPlan};
use crate::model::accounting::bits_per_param;
use crate::model::config::{AttentionKind, ModelConfig};

#[derive(Debug, Clone, serde::Serialize)]
pub struct RankCost {
    pub experts_format: String,
    pub dense_format: String,
    /// Resident weight bytes of the largest rank.
    pub resident_bytes: u64,
    /// Weight + KV bytes one batch-1 decode step reads on a rank with the mean expert load.
    pub step_bytes_mean: u64,
    /// The same on the busiest rank (expected maximum experts in one group).
    pub step_bytes_busiest: u64,
    /// Expected chosen experts per MoE layer landing on one group: mean and busiest.
    pub experts_per_group_mean: f64,
    pub experts_per_group_busiest: f64,
}

fn binom(n: usize, k: usize) -> f64 {
    if k > n {
        return 0.0;
    }
    (0..k).fold(1.0, |acc, i| acc * (n - i) as f64 / (i + 1) as f64)
}

/// E[max over `groups` groups of `per` experts of how many of `k` uniform picks (without replacement) land in it].
pub fn expected_busiest_group(groups: usize, per: usize, k: usize) -> f64 {
    let total = binom(groups * per, k);
    let mut expect = 0.0;
    for m in 0..k {
        // Ways to pick k with every group holding at most m: coefficient of x^k in (Σ_j≤m C(per,j) x^j)^groups.
        let one: Vec<f64> = (0..=m.min(per)).map(|j| binom(per, j)).collect();
        let mut poly = vec![1.0];
        for _ in 0..groups {
            let mut next = vec![0.0; (poly.len() + one.len() - 1).min(k + 1)];
            for (a, pa) in poly.iter().enumerate() {
                for (b, pb) in one.iter().enumerate() {
                    if a + b <= k {
                        next[a + b] += pa * pb;
                    }
                }
            }
            poly = next;
        }
        let at_most_m = poly.get(k).copied().unwrap_or(0.0) / total;
        expect += 1.0 - at_most_m;
    }
    expect
}

/// Per-rank bytes for one precision mix (experts / everything else), at `context` tokens of bf16 KV cache.
pub fn rank_cost(c: &ModelConfig, plan: &ShardPlan, experts: &str, dense: &str, context: usize) -> Result<RankCost, ShardError> {
    plan.validate(c)?;
    let s = plan.slices(c, 0)?;
    let (eb, db) = (bits_per_param(experts) / 8.0, bits_per_param(dense) / 8.0);
    let small = db.max(2.0);
    let h = c.hidden_size as f64;
    let (q, kv) = ((s.heads.len() * c.head_dim) as f64, (s.kv_heads.len() * c.head_dim) as f64);
    let vocab_rows = plan.vocab_chunk(c.vocab_size) as f64;
    let head_copies = if c.tie_word_embeddings { 1.0 } else { 2.0 };
    let mut resident = vocab_rows * h * head_copies * db + h * small;
    let mut step = vocab_rows * h * db + h * db + h * small; // lm_head slice, one embedding row, final norm
    let (mut mean, mut busiest) = (0.0, 0.0);
    let (mut step_mean, mut step_busy) = (0.0, 0.0);
    for l in 0..c.num_layers {
        let mut attn = (2.0 * h * q + 2.0 * h * kv) * db + 2.0 * h * small;
        if c.qkv_bias {
            attn += (q + 2.0 * kv) * small;
        }
        resident += attn;
        step += attn;
        let len = match c.layer_attention[l] {
            AttentionKind::Full => context,
            AttentionKind::Sliding(w) => context.min(w),
        } as f64;
        step += 2.0 * len * kv * 2.0;
        match &c.moe {
            Some(m) if c.is_moe_layer(l) => {
                let per_group = m.num_experts / plan.ep;
                let expert = 3.0 * h * s.expert_width.len() as f64 * eb;
                let router = per_group as f64 * h * small;
                resident += router + per_group as f64 * expert;
                step += router;
                let k_mean = m.top_k as f64 / plan.ep as f64;
                let k_busy = expected_busiest_group(plan.ep, per_group, m.top_k);
                (mean, busiest) = (k_mean, k_busy);
                step_mean += k_mean * expert;
                step_busy += k_busy * expert;
            }
            _ => {
                let mlp = 3.0 * h * s.intermediate.len() as f64 * db;
                resident += mlp;
                step += mlp;
            }
        }
    }
    Ok(RankCost {
        experts_format: experts.into(),
        dense_format: dense.into(),
        resident_bytes: resident.round() as u64,
        step_bytes_mean: (step + step_mean).round() as u64,
        step_bytes_busiest: (step + step_busy).round() as u64,
        experts_per_group_mean: mean,
        experts_per_group_busiest: busiest,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn busiest_group_expectations() {
        // One group holds every pick; one pick lands in one group.
        assert!((expected_busiest_group(1, 16, 8) - 8.0).abs() < 1e-9);
        assert!((expected_busiest_group(8, 48, 1) - 1.0).abs() < 1e-9);
        // Two groups of 2, pick 2: P(both in one group) = 2/6, so E[max] = 2·1/3 + 1·2/3.
        assert!((expected_busiest_group(2, 2, 2) - 4.0 / 3.0).abs() < 1e-9);
        let e = expected_busiest_group(8, 48, 8);
        assert!(e > 2.0 && e < 3.5, "{e}");
    }

    #[test]
    fn splitting_divides_the_resident_bytes() {
        let v = serde_json::json!({"model_type":"qwen3_moe","hidden_size":256,"num_attention_heads":8,
            "num_key_value_heads":4,"head_dim":32,"num_hidden_layers":2,"vocab_size":1024,
            "intermediate_size":512,"moe_intermediate_size":128,"num_experts":8,"num_experts_per_tok":2});
        let c = ModelConfig::from_hf_json(&v).unwrap();
        let one = rank_cost(&c, &ShardPlan::single(), "bf16", "bf16", 0).unwrap();
        let four = rank_cost(&c, &ShardPlan::new(4, 4, None).unwrap(), "bf16", "bf16", 0).unwrap();
        let ratio = one.resident_bytes as f64 / four.resident_bytes as f64;
        assert!(ratio > 3.8 && ratio < 4.0, "{ratio}");
        assert!(four.step_bytes_busiest >= four.step_bytes_mean);
    }
}
