//! The one definition of every family's weights: which tensors exist, under
//! which names, and how they become `Linear`s. Dense and MoE MLPs, biases,
//! q/k norms and attention sinks are switched on by `ModelConfig`.

use super::config::{Arch, AttentionKind, ModelConfig};
use super::tensors::{TensorF32, TensorSource};
use super::weights::{Linear, Weight};
use super::ModelError;

pub struct Attention {
    pub q: Linear,
    pub k: Linear,
    pub v: Linear,
    pub o: Linear,
    /// Per-head RMSNorm weights on q and k (Qwen3).
    pub q_norm: Option<Vec<f32>>,
    pub k_norm: Option<Vec<f32>>,
    /// One learned logit per head that joins the softmax denominator (gpt-oss).
    pub sinks: Option<Vec<f32>>,
    pub kind: AttentionKind,
}

/// One expert (or a dense MLP): gate, up, down.
pub struct GatedMlp {
    pub gate: Linear,
    pub up: Linear,
    pub down: Linear,
}

pub struct Moe {
    /// `[num_experts, hidden]`
    pub router: Linear,
    pub experts: Vec<GatedMlp>,
}

pub enum Mlp {
    Dense(GatedMlp),
    Moe(Moe),
}

pub struct Layer {
    pub input_norm: Vec<f32>,
    pub post_attention_norm: Vec<f32>,
    pub attention: Attention,
    pub mlp: Mlp,
}

pub struct ModelWeights {
    pub config: ModelConfig,
    /// `[vocab, hidden]`
    pub embed: Weight,
    pub layers: Vec<Layer>,
    pub final_norm: Vec<f32>,
    /// `None` when tied to `embed`.
    pub lm_head: Option<Weight>,
}

impl ModelWeights {
    pub fn lm_head(&self) -> &Weight {
        self.lm_head.as_ref().unwrap_or(&self.embed)
    }

    /// Every linear weight of the model, for accounting and conversion.
    pub fn linears(&self) -> Vec<(String, &Linear)> {
        let mut out = Vec::new();
        for (i, l) in self.layers.iter().enumerate() {
            let a = &l.attention;
            for (n, lin) in [("q", &a.q), ("k", &a.k), ("v", &a.v), ("o", &a.o)] {
                out.push((format!("layers.{i}.attn.{n}"), lin));
            }
            match &l.mlp {
                Mlp::Dense(m) => push_mlp(&mut out, format!("layers.{i}.mlp"), m),
                Mlp::Moe(m) => {
                    out.push((format!("layers.{i}.router"), &m.router));
                    for (e, x) in m.experts.iter().enumerate() {
                        push_mlp(&mut out, format!("layers.{i}.experts.{e}"), x);
                    }
                }
            }
        }
        out
    }
}

fn push_mlp<'a>(out: &mut Vec<(String, &'a Linear)>, prefix: String, m: &'a GatedMlp) {
    out.push((format!("{prefix}.gate"), &m.gate));
    out.push((format!("{prefix}.up"), &m.up));
    out.push((format!("{prefix}.down"), &m.down));
}

/// Reads tensors by name and checks their shapes, with errors that name the tensor.
pub struct Loader<'a> {
    pub src: &'a dyn TensorSource,
}

impl Loader<'_> {
    pub fn tensor(&self, name: &str, shape: &[usize]) -> Result<TensorF32, ModelError> {
        let t = self.src.get_f32(name)?.ok_or_else(|| {
            ModelError::MissingTensor(format!("`{name}` in {}", self.src.describe()))
        })?;
        check_shape(name, &t.shape, shape)?;
        Ok(t)
    }

    pub fn optional(&self, name: &str, shape: &[usize]) -> Result<Option<TensorF32>, ModelError> {
        if !self.src.contains(name) {
            return Ok(None);
        }
        self.tensor(name, shape).map(Some)
    }

    pub fn vector(&self, name: &str, len: usize) -> Result<Vec<f32>, ModelError> {
        Ok(self.tensor(name, &[len])?.data)
    }

    pub fn matrix(&self, name: &str, rows: usize, cols: usize) -> Result<Weight, ModelError> {
        Ok(Weight::f32(rows, cols, self.tensor(name, &[rows, cols])?.data))
    }

    pub fn linear(&self, prefix: &str, rows: usize, cols: usize, bias: bool) -> Result<Linear, ModelError> {
        // Pre-quantized checkpoints (MXFP4 blocks, ModelOpt NVFP4, FP8) stay packed.
        let weight = match super::quantize::packed::load_packed(self.src, prefix, rows, cols)? {
            Some(w) => w,
            None => self.matrix(&format!("{prefix}.weight"), rows, cols)?,
        };
        let bias = if bias { Some(self.vector(&format!("{prefix}.bias"), rows)?) } else { None };
        Ok(Linear { weight, bias })
    }
}

pub fn check_shape(name: &str, got: &[usize], want: &[usize]) -> Result<(), ModelError> {
    if got != want {
        return Err(ModelError::Shape(format!("tensor `{name}` has shape {got:?}, the config implies {want:?}")));
    }
    Ok(())
}

pub fn load_weights(config: ModelConfig, src: &dyn TensorSource) -> Result<ModelWeights, ModelError> {
    let ld = Loader { src };
    let c = &config;
    let h = c.hidden_size;
    let embed = ld.matrix("model.embed_tokens.weight", c.vocab_size, h)?;
    let mut layers = Vec::with_capacity(c.num_layers);
    for i in 0..c.num_layers {
        let p = format!("model.layers.{i}");
        let attention = load_attention(&ld, c, i, &p)?;
        let mlp = if c.is_moe_layer(i) {
            Mlp::Moe(load_moe(&ld, c, &p)?)
        } else {
            Mlp::Dense(load_dense_mlp(&ld, c, &p)?)
        };
        layers.push(Layer {
            input_norm: ld.vector(&format!("{p}.input_layernorm.weight"), h)?,
            post_attention_norm: ld.vector(&format!("{p}.post_attention_layernorm.weight"), h)?,
            attention,
            mlp,
        });
    }
    let final_norm = ld.vector("model.norm.weight", h)?;
    let lm_head = if src.contains("lm_head.weight") {
        Some(ld.matrix("lm_head.weight", c.vocab_size, h)?)
    } else if c.tie_word_embeddings || matches!(c.arch, Arch::Llama) {
        // GGUF files of tied models simply omit `output.weight`.
        None
    } else {
        return Err(ModelError::MissingTensor(format!("`lm_head.weight` in {}", src.describe())));
    };
    Ok(ModelWeights { config, embed, layers, final_norm, lm_head })
}

fn load_attention(ld: &Loader, c: &ModelConfig, layer: usize, p: &str) -> Result<Attention, ModelError> {
    let (h, q, kv, hd) = (c.hidden_size, c.q_dim(), c.kv_dim(), c.head_dim);
    let a = format!("{p}.self_attn");
    Ok(Attention {
        q: ld.linear(&format!("{a}.q_proj"), q, h, c.qkv_bias)?,
        k: ld.linear(&format!("{a}.k_proj"), kv, h, c.qkv_bias)?,
        v: ld.linear(&format!("{a}.v_proj"), kv, h, c.qkv_bias)?,
        o: ld.linear(&format!("{a}.o_proj"), h, q, c.o_bias)?,
        q_norm: if c.qk_norm { Some(ld.vector(&format!("{a}.q_norm.weight"), hd)?) } else { None },
        k_norm: if c.qk_norm { Some(ld.vector(&format!("{a}.k_norm.weight"), hd)?) } else { None },
        sinks: if c.attention_sinks { Some(ld.vector(&format!("{a}.sinks"), c.num_heads)?) } else { None },
        kind: c.layer_attention[layer],
    })
}

fn load_dense_mlp(ld: &Loader, c: &ModelConfig, p: &str) -> Result<GatedMlp, ModelError> {
    let (h, i) = (c.hidden_size, c.intermediate_size);
    Ok(GatedMlp {
        gate: ld.linear(&format!("{p}.mlp.gate_proj"), i, h, false)?,
        up: ld.linear(&format!("{p}.mlp.up_proj"), i, h, false)?,
        down: ld.linear(&format!("{p}.mlp.down_proj"), h, i, false)?,
    })
}

fn load_moe(ld: &Loader, c: &ModelConfig, p: &str) -> Result<Moe, ModelError> {
    let Some(m) = c.moe.as_ref() else {
        return Err(ModelError::Config("MoE layer without an MoE config".into()));
    };
    let (h, i, e) = (c.hidden_size, m.expert_intermediate, m.num_experts);
    match c.arch {
        Arch::GptOss => super::gpt_oss::load_experts(ld, c, p),
        Arch::Mixtral if ld.src.contains(&format!("{p}.block_sparse_moe.gate.weight")) => {
            let b = format!("{p}.block_sparse_moe");
            let router = ld.linear(&format!("{b}.gate"), e, h, false)?;
            let experts = (0..e)
                .map(|x| {
                    let ep = format!("{b}.experts.{x}");
                    Ok(GatedMlp {
                        gate: ld.linear(&format!("{ep}.w1"), i, h, false)?,
                        up: ld.linear(&format!("{ep}.w3"), i, h, false)?,
                        down: ld.linear(&format!("{ep}.w2"), h, i, false)?,
                    })
                })
                .collect::<Result<_, ModelError>>()?;
            Ok(Moe { router, experts })
        }
        _ => {
            let router = ld.linear(&format!("{p}.mlp.gate"), e, h, false)?;
            let fused = format!("{p}.mlp.experts.gate_up_proj");
            let experts = if ld.src.contains(&fused) {
                // transformers 5 stores experts fused: gate_up [E, 2I, H], down [E, H, I].
                let gu = ld.tensor(&fused, &[e, 2 * i, h])?.data;
                let dn = ld.tensor(&format!("{p}.mlp.experts.down_proj"), &[e, h, i])?.data;
                (0..e)
                    .map(|x| {
                        let g = &gu[x * 2 * i * h..(x * 2 + 1) * i * h];
                        let u = &gu[(x * 2 + 1) * i * h..(x + 1) * 2 * i * h];
                        let d = &dn[x * h * i..(x + 1) * h * i];
                        GatedMlp {
                            gate: Linear { weight: Weight::f32(i, h, g.to_vec()), bias: None },
                            up: Linear { weight: Weight::f32(i, h, u.to_vec()), bias: None },
                            down: Linear { weight: Weight::f32(h, i, d.to_vec()), bias: None },
                        }
                    })
                    .collect()
            } else {
                (0..e)
                    .map(|x| {
                        let ep = format!("{p}.mlp.experts.{x}");
                        Ok(GatedMlp {
                            gate: ld.linear(&format!("{ep}.gate_proj"), i, h, false)?,
                            up: ld.linear(&format!("{ep}.up_proj"), i, h, false)?,
                            down: ld.linear(&format!("{ep}.down_proj"), h, i, false)?,
                        })
                    })
                    .collect::<Result<_, ModelError>>()?
            };
            Ok(Moe { router, experts })
        }
    }
}
