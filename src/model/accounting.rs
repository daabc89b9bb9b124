//! Parameter counts, resident bytes and bytes read per decode step, from the
//! config alone (so huge shapes can be planned without their weights).

use super::config::ModelConfig;
use super::family::ModelWeights;

/// Bytes the loaded weights occupy, counted from the tensors themselves (what
/// `kairos inspect --load` reports next to the predicted [`precision_mix`]).
pub fn measured_resident_bytes(w: &ModelWeights) -> u64 {
    let mut total = w.embed.bytes() as u64 + w.lm_head.as_ref().map_or(0, |l| l.bytes() as u64);
    total += (w.final_norm.len() * 4) as u64;
    for (_, lin) in w.linears() {
        total += lin.weight.bytes() as u64 + lin.bias.as_ref().map_or(0, |b| (b.len() * 4) as u64);
    }
    for l in &w.layers {
        total += ((l.input_norm.len() + l.post_attention_norm.len()) * 4) as u64;
        let a = &l.attention;
        for v in [&a.q_norm, &a.k_norm, &a.sinks].into_iter().flatten() {
            total += (v.len() * 4) as u64;
        }
    }
    total
}

/// Parameters of a model, split by the role that decides their precision.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct ParamCounts {
    pub embedding: u64,
    pub lm_head: u64,
    pub attention: u64,
    pub norms: u64,
    pub router: u64,
    pub dense_mlp: u64,
    /// All experts of all MoE layers.
    pub experts_total: u64,
    /// Experts one token touches (top-k per MoE layer).
    pub experts_active: u64,
}

impl ParamCounts {
    pub fn from_config(c: &ModelConfig) -> Self {
        let (h, v) = (c.hidden_size as u64, c.vocab_size as u64);
        let (q, kv) = (c.q_dim() as u64, c.kv_dim() as u64);
        let mut p = ParamCounts { embedding: v * h, ..Default::default() };
        p.lm_head = if c.tie_word_embeddings { 0 } else { v * h };
        p.norms = h;
        for l in 0..c.num_layers {
            p.attention += h * q + 2 * h * kv + q * h;
            if c.qkv_bias {
                p.attention += q + 2 * kv;
            }
            if c.o_bias {
                p.attention += h;
            }
            if c.attention_sinks {
                p.attention += c.num_heads as u64;
            }
            p.norms += 2 * h + if c.qk_norm { 2 * c.head_dim as u64 } else { 0 };
            match &c.moe {
                Some(m) if c.is_moe_layer(l) => {
                    let e = m.num_experts as u64;
                    let per = 3 * h * m.expert_intermediate as u64
                        + if m.expert_bias { 2 * m.expert_intermediate as u64 + h } else { 0 };
                    p.router += e * h + if m.router_bias { e } else { 0 };
                    p.experts_total += e * per;
                    p.experts_active += m.top_k as u64 * per;
                }
                _ => p.dense_mlp += 3 * h * c.intermediate_size as u64,
            }
        }
        p
    }

    pub fn total(&self) -> u64 {
        self.embedding + self.lm_head + self.attention + self.norms + self.router + self.dense_mlp + self.experts_total
    }

    pub fn active(&self) -> u64 {
        self.lm_head.max(if self.lm_head == 0 { self.embedding } else { 0 })
            + self.attention
            + self.norms
            + self.router
            + self.dense_mlp
            + self.experts_active
    }
}

/// Bits per parameter of a storage format, scales included.
pub fn bits_per_param(format: &str) -> f64 {
    match format {
        "f32" => 32.0,
        "bf16" | "f16" => 16.0,
        "fp8" => 8.0 + 32.0 / 4096.0,
        "mxfp4" => 4.0 + 8.0 / 32.0,
        "nvfp4" => 4.0 + 8.0 / 16.0,
        _ => 16.0,
    }
}

/// A precision mix: experts (the MLPs of dense models) in one format, the rest in another.
#[derive(Debug, Clone, serde::Serialize)]
pub struct PrecisionMix {
    pub name: String,
    pub experts: String,
    pub dense: String,
    pub resident_bytes: u64,
    /// Weight bytes one batch-1 decode step reads.
    pub step_bytes: u64,
}

pub fn precision_mix(c: &ModelConfig, p: &ParamCounts, experts: &str, dense: &str) -> PrecisionMix {
    let is_moe = c.moe.is_some();
    let (ebits, dbits) = (bits_per_param(experts), bits_per_param(dense));
    let b = |n: u64, bits: f64| (n as f64 * bits / 8.0).round() as u64;
    // For dense models the `experts` format applies to the MLP weights.
    let (fp4_total, fp4_active, dense_mlp) =
        if is_moe { (p.experts_total, p.experts_active, p.dense_mlp) } else { (p.dense_mlp, p.dense_mlp, 0) };
    // Norms and router stay in bf16 at most (they are tiny and precision-sensitive).
    let small = |n: u64| b(n, dbits.clamp(16.0, 32.0));
    let head_step = if p.lm_head > 0 { p.lm_head } else { p.embedding };
    let resident = b(p.embedding + p.lm_head + p.attention + dense_mlp, dbits)
        + small(p.norms + p.router)
        + b(fp4_total, ebits);
    let step = b(head_step + p.attention + dense_mlp, dbits) + small(p.norms + p.router) + b(fp4_active, ebits)
        + b(c.hidden_size as u64, dbits); // one embedding row
    PrecisionMix {
        name: format!("experts={experts},dense={dense}"),
        experts: experts.into(),
        dense: dense.into(),
        resident_bytes: resident,
        step_bytes: step,
    }
}

/// KV-cache bytes one decode step reads at a given context (bf16 cache).
pub fn kv_step_bytes(c: &ModelConfig, context: usize, bytes_per_value: usize) -> u64 {
    c.layer_attention
        .iter()
        .map(|k| {
            let len = match k {
                super::config::AttentionKind::Full => context,
                super::config::AttentionKind::Sliding(w) => context.min(*w),
            };
            (2 * len * c.kv_dim() * bytes_per_value) as u64
        })
        .sum()
}
