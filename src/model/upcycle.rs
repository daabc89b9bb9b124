//! A dense checkpoint seen as a mixture-of-experts one ("upcycling").
//!
//! Every expert of a layer is that layer's dense MLP, and a seeded random
//! router picks `top_k` of `experts` per token with softmax weights
//! renormalised over the chosen k. Identical experts whose weights sum to one
//! give exactly the dense MLP's output, so a real pretrained dense model runs
//! every MoE path (routing, the expert kernels and their FP4 formats, expert
//! parallelism, DFlash's MoE block cost) with logits known to be the dense
//! model's. No pretrained MoE checkpoint is reachable here; this is how kairos
//! measures MoE behaviour on real weights (`--upcycle E,K`).
//!
//! Expert weights are real copies (each expert its own memory), so a step that
//! routes to more experts reads more bytes, as with a real MoE.

use std::str::FromStr;

use super::config::{MoeConfig, ModelConfig, RouterKind};
use super::tensors::{TensorF32, TensorRaw, TensorSource};
use super::ModelError;

/// `--upcycle E,K`: E identical experts per layer, top-K routing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Upcycle {
    pub experts: usize,
    pub top_k: usize,
}

impl FromStr for Upcycle {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let bad = || format!("`{s}`: expected E,K (experts per layer, experts per token), e.g. 8,2");
        let (e, k) = s.split_once(',').ok_or_else(bad)?;
        let (experts, top_k) = (e.trim().parse().map_err(|_| bad())?, k.trim().parse().map_err(|_| bad())?);
        let u = Upcycle { experts, top_k };
        u.check().map_err(|e| format!("`{s}`: {e}"))?;
        Ok(u)
    }
}

impl std::fmt::Display for Upcycle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{},{}", self.experts, self.top_k)
    }
}

impl Upcycle {
    fn check(&self) -> Result<(), String> {
        if self.top_k == 0 || self.top_k > self.experts {
            return Err(format!("top-k {} must be between 1 and the expert count {}", self.top_k, self.experts));
        }
        // the GPU router's top-k covers up to 512 experts
        if self.experts > 512 {
            return Err(format!("{} experts: at most 512", self.experts));
        }
        Ok(())
    }

    /// The MoE config of the upcycled model: the dense config with every layer's MLP
    /// as `experts` experts of the dense width. Refuses models that are MoE already.
    pub fn config(&self, dense: &ModelConfig) -> Result<ModelConfig, ModelError> {
        self.check().map_err(|e| ModelError::Config(format!("upcycle: {e}")))?;
        if dense.moe.is_some() {
            return Err(ModelError::Config(format!(
                "upcycle: the {} model is already a mixture of experts; upcycle a dense model",
                dense.arch.name()
            )));
        }
        let mut c = dense.clone();
        c.moe = Some(MoeConfig {
            num_experts: self.experts,
            top_k: self.top_k,
            expert_intermediate: dense.intermediate_size,
            router: RouterKind::SoftmaxTopK { renormalize: true },
            router_bias: false,
            expert_bias: false,
            dense_layers: vec![],
        });
        Ok(c)
    }
}

/// A dense checkpoint's tensors under the names of its upcycled MoE
/// (`model.layers.L.mlp.experts.X.P` reads `model.layers.L.mlp.P`; the router
/// `model.layers.L.mlp.gate.weight` is made up from a per-layer seed).
pub struct UpcycledSource<'a> {
    inner: Box<dyn TensorSource + 'a>,
    experts: usize,
    hidden: usize,
}

impl<'a> UpcycledSource<'a> {
    pub fn new(inner: Box<dyn TensorSource + 'a>, up: Upcycle, hidden: usize) -> Self {
        UpcycledSource { inner, experts: up.experts, hidden }
    }

    /// `model.layers.L.mlp.experts.X.P` -> `model.layers.L.mlp.P`.
    fn dense_name(name: &str) -> Option<String> {
        let (head, rest) = name.split_once(".mlp.experts.")?;
        let (_, tail) = rest.split_once('.')?;
        Some(format!("{head}.mlp.{tail}"))
    }

    fn router_layer(name: &str) -> Option<u64> {
        name.strip_prefix("model.layers.")?.strip_suffix(".mlp.gate.weight")?.parse().ok()
    }

    /// Uniform in ±0.1 from a per-layer LCG: routing varies from token to token and
    /// layer to layer (the router logits of a normed hidden state have std ~1).
    fn router(&self, layer: u64) -> TensorF32 {
        let mut seed = 12345u64 + layer;
        let data = (0..self.experts * self.hidden)
            .map(|_| {
                seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                ((seed >> 33) as f32 / (1u64 << 31) as f32 - 0.5) * 0.2
            })
            .collect();
        TensorF32 { shape: vec![self.experts, self.hidden], data }
    }

    fn inner_name(name: &str) -> String {
        Self::dense_name(name).unwrap_or_else(|| name.to_owned())
    }
}

impl TensorSource for UpcycledSource<'_> {
    fn get_f32(&self, name: &str) -> Result<Option<TensorF32>, ModelError> {
        if let Some(layer) = Self::router_layer(name) {
            return Ok(Some(self.router(layer)));
        }
        self.inner.get_f32(&Self::inner_name(name))
    }
    fn get_raw(&self, name: &str) -> Result<Option<TensorRaw>, ModelError> {
        if Self::router_layer(name).is_some() {
            return Ok(None);
        }
        // pre-quantized dense MLPs (FP8, NVFP4, MXFP4 blocks) become packed experts
        self.inner.get_raw(&Self::inner_name(name))
    }
    fn contains(&self, name: &str) -> bool {
        Self::router_layer(name).is_some() || self.inner.contains(&Self::inner_name(name))
    }
    fn names(&self) -> Vec<String> {
        self.inner.names()
    }
    fn describe(&self) -> String {
        format!("{} (upcycled to {} experts)", self.inner.describe(), self.experts)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_rejects() {
        assert_eq!("8,2".parse::<Upcycle>(), Ok(Upcycle { experts: 8, top_k: 2 }));
        assert_eq!(" 4, 4".parse::<Upcycle>(), Ok(Upcycle { experts: 4, top_k: 4 }));
        for bad in ["8", "8,0", "2,3", "x,1", "600,8", ""] {
            assert!(bad.parse::<Upcycle>().is_err(), "{bad}");
        }
        assert_eq!(Upcycle { experts: 8, top_k: 2 }.to_string(), "8,2");
    }

    #[test]
    fn expert_names_map_to_the_dense_mlp() {
        let d = UpcycledSource::dense_name;
        assert_eq!(d("model.layers.3.mlp.experts.7.gate_proj.weight").as_deref(), Some("model.layers.3.mlp.gate_proj.weight"));
        assert_eq!(d("model.layers.3.mlp.experts.0.down_proj.weight_scale").as_deref(), Some("model.layers.3.mlp.down_proj.weight_scale"));
        assert_eq!(d("model.layers.3.mlp.gate_proj.weight"), None);
        assert_eq!(UpcycledSource::router_layer("model.layers.12.mlp.gate.weight"), Some(12));
        assert_eq!(UpcycledSource::router_layer("model.layers.12.mlp.gate_proj.weight"), None);
    }
}
