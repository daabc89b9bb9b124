//! Which rank holds which slice of a model.
//!
//! Layout (one world of `ranks` ranks, as in most MoE engines):
//! - Attention is tensor parallel over the whole world (`tp == ranks`: each
//!   rank holds `heads / tp` query heads, the KV heads they read, and the
//!   matching columns of `o_proj`; an all-reduce follows `o_proj`) or
//!   replicated (`tp == 1`: every rank holds all heads, no collective).
//!   KV heads are split when `tp` divides them and replicated when they divide
//!   `tp` (each rank then keeps the one KV head its query heads share).
//! - Dense MLPs follow attention: split by intermediate rows when `tp > 1`.
//! - Experts: `ep` groups of `ranks / ep` consecutive ranks; group `g` owns
//!   experts `[g·E/ep, (g+1)·E/ep)` and its ranks split each of those experts'
//!   width (`ep == ranks`: whole experts; `ep == 1`: every expert split over
//!   all ranks). Tokens reach their experts by all-to-all and come back the same way.
//!   The router is split with the experts; its logits are all-gathered, so every
//!   rank sees the full router output.
//! - Embeddings and lm_head are split by vocabulary over all ranks (contiguous
//!   ranges, the last ones possibly shorter).

use std::ops::Range;

use crate::model::config::ModelConfig;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ShardPlan {
    pub ranks: usize,
    pub tp: usize,
    pub ep: usize,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ShardError {
    #[error("a shard plan needs tp >= 1, ep >= 1 and at least one rank (got ranks {ranks}, tp {tp}, ep {ep})")]
    Zero { ranks: usize, tp: usize, ep: usize },
    #[error("tp {tp} must be 1 (attention replicated) or the number of ranks {ranks} (attention split over all ranks)")]
    TpNotWorld { tp: usize, ranks: usize },
    #[error("ep {ep} does not divide the number of ranks {ranks}")]
    EpNotDivisor { ep: usize, ranks: usize },
    #[error("num_heads {heads} is not divisible by tp {tp}")]
    Heads { heads: usize, tp: usize },
    #[error("num_kv_heads {kv} and tp {tp}: one must divide the other (KV heads are split when tp divides them, replicated when they divide tp)")]
    KvHeads { kv: usize, tp: usize },
    #[error("intermediate_size {size} of the dense MLP is not divisible by tp {tp}")]
    Intermediate { size: usize, tp: usize },
    #[error("ep {ep} > 1 needs an MoE model, this one is dense")]
    EpOnDense { ep: usize },
    #[error("{experts} experts are not divisible by ep {ep}")]
    Experts { experts: usize, ep: usize },
    #[error("expert width {width} is not divisible by the {split} ranks that share each expert (ranks {ranks} / ep {ep})")]
    ExpertWidth { width: usize, split: usize, ranks: usize, ep: usize },
    #[error("vocabulary {vocab} is smaller than the number of ranks {ranks}")]
    Vocab { vocab: usize, ranks: usize },
    #[error("rank {rank} is outside a world of {ranks} ranks")]
    Rank { rank: usize, ranks: usize },
}

/// The slices one rank owns, in units of heads, rows and experts of the full model.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RankSlices {
    pub rank: usize,
    /// Query heads (and attention sinks).
    pub heads: Range<usize>,
    pub kv_heads: Range<usize>,
    /// Rows of the dense MLP's gate/up (columns of its down projection).
    pub intermediate: Range<usize>,
    pub experts: Range<usize>,
    /// Rows of each owned expert's gate/up (columns of its down projection).
    pub expert_width: Range<usize>,
    pub vocab: Range<usize>,
    /// Only one rank adds a bias whose output is summed over ranks.
    pub owns_o_bias: bool,
    pub owns_expert_down_bias: bool,
}

fn part(total: usize, parts: usize, i: usize) -> Range<usize> {
    let each = total / parts;
    i * each..(i + 1) * each
}

impl ShardPlan {
    /// `--tp N --ep M` with the world size defaulting to the larger of the two.
    pub fn new(tp: usize, ep: usize, ranks: Option<usize>) -> Result<Self, ShardError> {
        let plan = ShardPlan { ranks: ranks.unwrap_or(tp.max(ep)), tp, ep };
        plan.check_world()?;
        Ok(plan)
    }

    pub fn single() -> Self {
        ShardPlan { ranks: 1, tp: 1, ep: 1 }
    }

    fn check_world(&self) -> Result<(), ShardError> {
        let (ranks, tp, ep) = (self.ranks, self.tp, self.ep);
        if ranks == 0 || tp == 0 || ep == 0 {
            return Err(ShardError::Zero { ranks, tp, ep });
        }
        if tp != 1 && tp != ranks {
            return Err(ShardError::TpNotWorld { tp, ranks });
        }
        if ranks % ep != 0 {
            return Err(ShardError::EpNotDivisor { ep, ranks });
        }
        Ok(())
    }

    /// Ranks that share each expert (each holds `width / expert_split` of it).
    pub fn expert_split(&self) -> usize {
        self.ranks / self.ep
    }

    /// Every divisibility rule the model must meet for this plan.
    pub fn validate(&self, c: &ModelConfig) -> Result<(), ShardError> {
        self.check_world()?;
        let tp = self.tp;
        if !c.num_heads.is_multiple_of(tp) {
            return Err(ShardError::Heads { heads: c.num_heads, tp });
        }
        let kv = c.num_kv_heads;
        if !kv.is_multiple_of(tp) && !tp.is_multiple_of(kv) {
            return Err(ShardError::KvHeads { kv, tp });
        }
        let has_dense = (0..c.num_layers).any(|l| !c.is_moe_layer(l));
        if has_dense && !c.intermediate_size.is_multiple_of(tp) {
            return Err(ShardError::Intermediate { size: c.intermediate_size, tp });
        }
        match &c.moe {
            None if self.ep > 1 => return Err(ShardError::EpOnDense { ep: self.ep }),
            None => {}
            Some(m) => {
                if m.num_experts % self.ep != 0 {
                    return Err(ShardError::Experts { experts: m.num_experts, ep: self.ep });
                }
                let split = self.expert_split();
                if m.expert_intermediate % split != 0 {
                    return Err(ShardError::ExpertWidth {
                        width: m.expert_intermediate,
                        split,
                        ranks: self.ranks,
                        ep: self.ep,
                    });
                }
            }
        }
        if c.vocab_size < self.ranks {
            return Err(ShardError::Vocab { vocab: c.vocab_size, ranks: self.ranks });
        }
        Ok(())
    }

    /// Rows of the vocabulary rank `r` holds; every range but the last has `vocab_chunk` rows.
    pub fn vocab_range(&self, vocab: usize, r: usize) -> Range<usize> {
        let chunk = self.vocab_chunk(vocab);
        (r * chunk).min(vocab)..((r + 1) * chunk).min(vocab)
    }

    pub fn vocab_chunk(&self, vocab: usize) -> usize {
        vocab.div_ceil(self.ranks)
    }

    /// The slices of rank `rank` (call [`validate`](Self::validate) first).
    pub fn slices(&self, c: &ModelConfig, rank: usize) -> Result<RankSlices, ShardError> {
        self.validate(c)?;
        if rank >= self.ranks {
            return Err(ShardError::Rank { rank, ranks: self.ranks });
        }
        let tp_rank = if self.tp == 1 { 0 } else { rank };
        let heads = part(c.num_heads, self.tp, tp_rank);
        let group = c.num_heads / c.num_kv_heads;
        // The KV heads this rank's query heads read (one shared head when kv < tp).
        let kv_heads = heads.start / group..(heads.end - 1) / group + 1;
        let intermediate = part(c.intermediate_size, self.tp, tp_rank);
        let split = self.expert_split();
        let (experts, expert_width) = match &c.moe {
            Some(m) => (part(m.num_experts, self.ep, rank / split), part(m.expert_intermediate, split, rank % split)),
            None => (0..0, 0..0),
        };
        Ok(RankSlices {
            rank,
            heads,
            kv_heads,
            intermediate,
            experts,
            expert_width,
            vocab: self.vocab_range(c.vocab_size, rank),
            owns_o_bias: tp_rank == 0,
            owns_expert_down_bias: rank.is_multiple_of(split),
        })
    }

    /// The config of rank `rank`'s weights: its local head, width, expert and vocabulary counts.
    pub fn local_config(&self, c: &ModelConfig, s: &RankSlices) -> ModelConfig {
        let mut local = c.clone();
        local.num_heads = s.heads.len();
        local.num_kv_heads = s.kv_heads.len();
        local.intermediate_size = s.intermediate.len();
        local.vocab_size = s.vocab.len();
        if let Some(m) = local.moe.as_mut() {
            m.num_experts = s.experts.len();
            m.expert_intermediate = s.expert_width.len();
        }
        local
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(heads: usize, kv: usize, experts: Option<usize>) -> ModelConfig {
        let mut v = serde_json::json!({"model_type":"llama","hidden_size":64,"num_attention_heads":heads,
            "num_key_value_heads":kv,"num_hidden_layers":2,"vocab_size":100,"intermediate_size":96,"head_dim":16});
        if let Some(e) = experts {
            v = serde_json::json!({"model_type":"mixtral","hidden_size":64,"num_attention_heads":heads,
                "num_key_value_heads":kv,"num_hidden_layers":2,"vocab_size":100,"intermediate_size":96,
                "head_dim":16,"num_local_experts":e,"num_experts_per_tok":2});
        }
        ModelConfig::from_hf_json(&v).unwrap()
    }

    #[test]
    fn head_and_expert_mismatches_are_named() {
        let c = cfg(9, 3, None);
        let e = ShardPlan::new(2, 1, None).unwrap().validate(&c).unwrap_err();
        assert_eq!(e.to_string(), "num_heads 9 is not divisible by tp 2");
        assert!(ShardPlan::new(3, 1, None).unwrap().validate(&c).is_ok());
        let e = ShardPlan::new(1, 2, None).unwrap().validate(&c).unwrap_err();
        assert_eq!(e, ShardError::EpOnDense { ep: 2 });
        let m = cfg(4, 2, Some(6));
        let e = ShardPlan::new(1, 4, None).unwrap().validate(&m).unwrap_err();
        assert_eq!(e.to_string(), "6 experts are not divisible by ep 4");
        let e = ShardPlan::new(4, 1, None).unwrap().validate(&cfg(12, 6, None)).unwrap_err();
        assert!(matches!(e, ShardError::KvHeads { kv: 6, tp: 4 }), "{e}");
        assert!(matches!(ShardPlan::new(2, 4, None), Err(ShardError::TpNotWorld { tp: 2, ranks: 4 })));
        assert!(matches!(ShardPlan::new(4, 3, None), Err(ShardError::EpNotDivisor { ep: 3, ranks: 4 })));
    }

    #[test]
    fn slices_cover_the_model_once() {
        let c = cfg(4, 2, Some(4));
        let plan = ShardPlan::new(4, 2, None).unwrap();
        let s: Vec<RankSlices> = (0..4).map(|r| plan.slices(&c, r).unwrap()).collect();
        assert_eq!(s.iter().map(|x| x.heads.clone()).collect::<Vec<_>>(), vec![0..1, 1..2, 2..3, 3..4]);
        // Two query heads per KV head: ranks 0,1 share KV head 0 (replicated), 2,3 share head 1.
        assert_eq!(s.iter().map(|x| x.kv_heads.clone()).collect::<Vec<_>>(), vec![0..1, 0..1, 1..2, 1..2]);
        assert_eq!(s.iter().map(|x| x.experts.clone()).collect::<Vec<_>>(), vec![0..2, 0..2, 2..4, 2..4]);
        assert_eq!(s.iter().map(|x| x.expert_width.clone()).collect::<Vec<_>>(), vec![0..48, 48..96, 0..48, 48..96]);
        assert_eq!(s.iter().map(|x| x.vocab.clone()).collect::<Vec<_>>(), vec![0..25, 25..50, 50..75, 75..100]);
        assert_eq!(s.iter().filter(|x| x.owns_o_bias).count(), 1);
        assert_eq!(s.iter().filter(|x| x.owns_expert_down_bias).count(), 2);
        let local = plan.local_config(&c, &s[3]);
        assert_eq!((local.num_heads, local.num_kv_heads, local.vocab_size), (1, 1, 25));
        assert_eq!(local.moe.as_ref().map(|m| (m.num_experts, m.expert_intermediate)), Some((2, 48)));
    }

    #[test]
    fn uneven_vocab_ranges_end_at_the_vocab() {
        let plan = ShardPlan { ranks: 3, tp: 1, ep: 1 };
        let r: Vec<_> = (0..3).map(|i| plan.vocab_range(100, i)).collect();
        assert_eq!(r, vec![0..34, 34..68, 68..100]);
    }
}
