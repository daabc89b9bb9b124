//! Writing a (quantized) model as an HF-style folder that `load_model` reads back.
//!
//! Files: `config.json` (the source config plus a `quantization_config` section,
//! `quant_method = "kairos"`), `model.safetensors`, and the tokenizer files
//! (`tokenizer.json`, `tokenizer_config.json`, `generation_config.json`; copied from an
//! HF source, or written from the tokenizer and chat template of a GGUF source).
//!
//! Tensor names are transformers' (`model.layers.N.self_attn.q_proj`, `…mlp.gate_proj`,
//! MoE `…mlp.gate` + `…mlp.experts.E.{gate,up,down}_proj`). A linear `<p>` is stored as:
//!
//! | weight | tensors |
//! |---|---|
//! | f32 / bf16 | `<p>.weight` F32 / BF16 `[out, in]` |
//! | MXFP4 | `<p>.weight_blocks` U8 `[out, in/32, 16]` (low nibble = even element), `<p>.weight_scales` U8 (E8M0) `[out, in/32]` |
//! | NVFP4 (ModelOpt) | `<p>.weight` U8 `[out, in/2]`, `<p>.weight_scale` F8_E4M3 `[out, in/16]`, `<p>.weight_scale_2` F32 `[]` (multiplies) |
//! | FP8 | `<p>.weight` F8_E4M3 `[out, in]`, `<p>.weight_scale` F32 `[out]` (per row; `weight_scale_inv` `[⌈out/b⌉, ⌈in/b⌉]` for block scales) |
//!
//! gpt-oss keeps its own names and fused expert layout (see `Tensors::gpt_oss_experts`):
//! MXFP4 experts as `mlp.experts.{gate_up,down}_proj_{blocks,scales}` with the
//! `quantization_config` gpt-oss ships (`quant_method = "mxfp4"`, plus `kairos_spec`).
//!
//! plus `<p>.bias` F32 when present. Norms and routers are F32. The embedding and
//! lm_head are F32 or BF16. When the folder is loaded, the spec recorded in
//! `quantization_config.kairos_spec` is applied again (a no-op on packed weights;
//! it restores bf16 storage of bf16 tensors), so the result is bit-identical to
//! quantizing at load with the same spec.

use std::borrow::Cow;
use std::path::Path;

use half::bf16;
use safetensors::{Dtype, View};
use serde_json::{json, Value};

use super::QuantSpec;
use crate::model::config::Arch;
use crate::model::family::{GatedMlp, Mlp, ModelWeights, Moe};
use crate::model::weights::{Linear, Weight};
use crate::model::{LoadedModel, ModelError};

struct Owned {
    dtype: Dtype,
    shape: Vec<usize>,
    data: Vec<u8>,
}

impl View for &Owned {
    fn dtype(&self) -> Dtype {
        self.dtype
    }
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn data(&self) -> Cow<'_, [u8]> {
        Cow::Borrowed(&self.data)
    }
    fn data_len(&self) -> usize {
        self.data.len()
    }
}

fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

#[derive(Default)]
struct Tensors(Vec<(String, Owned)>);

impl Tensors {
    fn push(&mut self, name: String, dtype: Dtype, shape: Vec<usize>, data: Vec<u8>) {
        self.0.push((name, Owned { dtype, shape, data }));
    }

    fn vector(&mut self, name: String, v: &[f32]) {
        self.push(name, Dtype::F32, vec![v.len()], f32_bytes(v));
    }

    /// A float matrix (embedding, lm_head).
    fn matrix(&mut self, name: String, w: &Weight) -> Result<(), ModelError> {
        let shape = vec![w.rows(), w.cols()];
        match w {
            Weight::F32 { data, .. } => self.push(name, Dtype::F32, shape, f32_bytes(data)),
            Weight::Bf16 { data, .. } => {
                self.push(name, Dtype::BF16, shape, data.iter().flat_map(|x: &bf16| x.to_le_bytes()).collect())
            }
            _ => {
                return Err(ModelError::Format(format!(
                    "`{name}` is stored as {}; only f32/bf16 embeddings and lm_head can be saved",
                    w.precision().name()
                )))
            }
        }
        Ok(())
    }

    fn linear(&mut self, p: &str, lin: &Linear) -> Result<(), ModelError> {
        let (rows, cols) = (lin.weight.rows(), lin.weight.cols());
        match &lin.weight {
            Weight::F32 { .. } | Weight::Bf16 { .. } => self.matrix(format!("{p}.weight"), &lin.weight)?,
            Weight::Mxfp4(m) => {
                self.push(format!("{p}.weight_blocks"), Dtype::U8, vec![rows, cols / 32, 16], m.blocks.clone());
                self.push(format!("{p}.weight_scales"), Dtype::U8, vec![rows, cols / 32], m.scales.clone());
            }
            Weight::Nvfp4(m) => {
                self.push(format!("{p}.weight"), Dtype::U8, vec![rows, cols / 2], m.packed.clone());
                self.push(format!("{p}.weight_scale"), Dtype::F8_E4M3, vec![rows, cols / 16], m.scales.clone());
                self.push(format!("{p}.weight_scale_2"), Dtype::F32, vec![], m.tensor_scale.to_le_bytes().to_vec());
            }
            Weight::Fp8(m) => {
                self.push(format!("{p}.weight"), Dtype::F8_E4M3, vec![rows, cols], m.data.clone());
                match m.scale_block {
                    None => self.vector(format!("{p}.weight_scale"), &m.scales),
                    Some(b) => self.push(
                        format!("{p}.weight_scale_inv"),
                        Dtype::F32,
                        vec![rows.div_ceil(b), cols.div_ceil(b)],
                        f32_bytes(&m.scales),
                    ),
                }
            }
        }
        if let Some(b) = &lin.bias {
            self.vector(format!("{p}.bias"), b);
        }
        Ok(())
    }

    /// gpt-oss experts `x` (= `model.layers.N.mlp.experts`) in gpt-oss's own layout:
    /// MXFP4 as `gate_up_proj_blocks` [E, 2I, H/32, 16] / `_scales` [E, 2I, H/32] (rows
    /// interleaved gate, up, gate, …) and `down_proj_blocks` [E, H, I/32, 16] / `_scales`;
    /// float as `gate_up_proj` [E, H, 2I] (input-major, gate/up interleaved) and
    /// `down_proj` [E, I, H]; plus `gate_up_proj_bias` [E, 2I] and `down_proj_bias` [E, H].
    fn gpt_oss_experts(&mut self, x: &str, m: &Moe) -> Result<(), ModelError> {
        let e = m.experts.len();
        let Some(first) = m.experts.first() else { return Ok(()) };
        let (i, h) = (first.gate.weight.rows(), first.gate.weight.cols());
        let (mut gu_bias, mut dn_bias) = (Vec::with_capacity(e * 2 * i), Vec::with_capacity(e * h));
        let zeros = |n| vec![0f32; n];
        for ex in &m.experts {
            let g = ex.gate.bias.clone().unwrap_or_else(|| zeros(i));
            let u = ex.up.bias.clone().unwrap_or_else(|| zeros(i));
            gu_bias.extend(g.iter().zip(&u).flat_map(|(a, b)| [*a, *b]));
            dn_bias.extend(ex.down.bias.clone().unwrap_or_else(|| zeros(h)));
        }
        let all_mxfp4 = m.experts.iter().all(|ex| {
            [&ex.gate, &ex.up, &ex.down].iter().all(|l| matches!(l.weight, Weight::Mxfp4(_)))
        });
        let all_float = m.experts.iter().all(|ex| {
            [&ex.gate, &ex.up, &ex.down].iter().all(|l| matches!(l.weight, Weight::F32 { .. } | Weight::Bf16 { .. }))
        });
        if all_mxfp4 {
            let (mut gub, mut gus, mut dnb, mut dns) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
            for ex in &m.experts {
                let (Weight::Mxfp4(g), Weight::Mxfp4(u), Weight::Mxfp4(d)) = (&ex.gate.weight, &ex.up.weight, &ex.down.weight) else {
                    unreachable!("checked above")
                };
                let (rb, rs) = (h / 2, h / 32);
                for r in 0..i {
                    for w in [g, u] {
                        gub.extend_from_slice(&w.blocks[r * rb..(r + 1) * rb]);
                        gus.extend_from_slice(&w.scales[r * rs..(r + 1) * rs]);
                    }
                }
                dnb.extend_from_slice(&d.blocks);
                dns.extend_from_slice(&d.scales);
            }
            self.push(format!("{x}.gate_up_proj_blocks"), Dtype::U8, vec![e, 2 * i, h / 32, 16], gub);
            self.push(format!("{x}.gate_up_proj_scales"), Dtype::U8, vec![e, 2 * i, h / 32], gus);
            self.push(format!("{x}.down_proj_blocks"), Dtype::U8, vec![e, h, i / 32, 16], dnb);
            self.push(format!("{x}.down_proj_scales"), Dtype::U8, vec![e, h, i / 32], dns);
        } else if all_float {
            let (mut gu, mut dn) = (vec![0f32; e * h * 2 * i], vec![0f32; e * i * h]);
            for (k, ex) in m.experts.iter().enumerate() {
                let (g, u, d) = (ex.gate.weight.to_f32(), ex.up.weight.to_f32(), ex.down.weight.to_f32());
                let dst = &mut gu[k * h * 2 * i..(k + 1) * h * 2 * i];
                for r in 0..h {
                    for j in 0..i {
                        dst[r * 2 * i + 2 * j] = g[j * h + r];
                        dst[r * 2 * i + 2 * j + 1] = u[j * h + r];
                    }
                }
                let dst = &mut dn[k * i * h..(k + 1) * i * h];
                for r in 0..i {
                    for c in 0..h {
                        dst[r * h + c] = d[c * i + r];
                    }
                }
            }
            self.push(format!("{x}.gate_up_proj"), Dtype::F32, vec![e, h, 2 * i], f32_bytes(&gu));
            self.push(format!("{x}.down_proj"), Dtype::F32, vec![e, i, h], f32_bytes(&dn));
        } else {
            return Err(ModelError::Format(format!(
                "`{x}`: gpt-oss experts can be saved as MXFP4 (native `*_blocks`/`*_scales`) or float, not {}",
                first.gate.weight.precision().name()
            )));
        }
        self.push(format!("{x}.gate_up_proj_bias"), Dtype::F32, vec![e, 2 * i], f32_bytes(&gu_bias));
        self.push(format!("{x}.down_proj_bias"), Dtype::F32, vec![e, h], f32_bytes(&dn_bias));
        Ok(())
    }

    fn mlp(&mut self, p: &str, m: &GatedMlp) -> Result<(), ModelError> {
        self.linear(&format!("{p}.gate_proj"), &m.gate)?;
        self.linear(&format!("{p}.up_proj"), &m.up)?;
        self.linear(&format!("{p}.down_proj"), &m.down)
    }
}

fn collect(w: &ModelWeights) -> Result<Tensors, ModelError> {
    let gpt_oss = w.config.arch == Arch::GptOss;
    let mut t = Tensors::default();
    t.matrix("model.embed_tokens.weight".into(), &w.embed)?;
    for (i, l) in w.layers.iter().enumerate() {
        let p = format!("model.layers.{i}");
        t.vector(format!("{p}.input_layernorm.weight"), &l.input_norm);
        t.vector(format!("{p}.post_attention_layernorm.weight"), &l.post_attention_norm);
        let a = &l.attention;
        for (n, lin) in [("q_proj", &a.q), ("k_proj", &a.k), ("v_proj", &a.v), ("o_proj", &a.o)] {
            t.linear(&format!("{p}.self_attn.{n}"), lin)?;
        }
        if let Some(v) = &a.q_norm {
            t.vector(format!("{p}.self_attn.q_norm.weight"), v);
        }
        if let Some(v) = &a.k_norm {
            t.vector(format!("{p}.self_attn.k_norm.weight"), v);
        }
        if let Some(v) = &a.sinks {
            t.vector(format!("{p}.self_attn.sinks"), v);
        }
        match &l.mlp {
            Mlp::Dense(m) => t.mlp(&format!("{p}.mlp"), m)?,
            Mlp::Moe(m) if gpt_oss => {
                t.linear(&format!("{p}.mlp.router"), &m.router)?;
                t.gpt_oss_experts(&format!("{p}.mlp.experts"), m)?;
            }
            Mlp::Moe(m) => {
                t.linear(&format!("{p}.mlp.gate"), &m.router)?;
                for (e, x) in m.experts.iter().enumerate() {
                    t.mlp(&format!("{p}.mlp.experts.{e}"), x)?;
                }
            }
        }
    }
    t.vector("model.norm.weight".into(), &w.final_norm);
    if let Some(h) = &w.lm_head {
        t.matrix("lm_head.weight".into(), h)?;
    }
    Ok(t)
}

/// The `quantization_config` section written into config.json.
pub fn quantization_config(spec: &QuantSpec) -> Value {
    let (algo, group, scale) = match spec.experts {
        crate::quant::QuantFormat::Mxfp4 => ("MXFP4", 32, "e8m0"),
        crate::quant::QuantFormat::Nvfp4 => ("NVFP4", 16, "e4m3 per block x f32 per tensor"),
        crate::quant::QuantFormat::Fp8 => ("FP8", 0, "f32 per row"),
    };
    json!({
        "quant_method": "kairos",
        "kairos_spec": spec.to_string(),
        "quant_algo": algo,
        "group_size": group,
        "formats": {
            "experts": {"format": spec.experts.as_str(), "block_size": group, "scale": scale,
                        "modules": "MoE experts and MLP gate_proj/up_proj/down_proj"},
            "attention": spec.dense.map_or("as source", |d| d.as_str()),
            "embed_tokens_and_lm_head": if spec.dense.is_some() { "bf16" } else { "as source" },
            "router_and_norms": "f32",
        },
        "exclude_modules": ["lm_head", "model.embed_tokens", "*.mlp.gate"],
    })
}

/// gpt-oss with MXFP4 experts: the section gpt-oss checkpoints ship (so transformers'
/// MXFP4 loader reads the folder), plus the spec for kairos (`kairos_spec`).
pub fn gpt_oss_quantization_config(spec: &QuantSpec) -> Value {
    json!({
        "quant_method": "mxfp4",
        "modules_to_not_convert": ["model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"],
        "kairos_spec": spec.to_string(),
    })
}

fn write_json(path: &Path, v: &Value) -> Result<(), ModelError> {
    let text = serde_json::to_string_pretty(v).map_err(|e| ModelError::Format(format!("{}: {e}", path.display())))?;
    std::fs::write(path, text).map_err(|e| ModelError::io(path, e))
}

/// Writes `model` (already quantized with `spec`) to `out`. `source_config` is the
/// HF-style config of the source; `source` its path (tokenizer files are copied from an
/// HF folder, written from the loaded tokenizer otherwise). Returns the bytes written.
pub fn save_model(
    out: &Path,
    model: &LoadedModel,
    source: &Path,
    source_config: &Value,
    spec: &QuantSpec,
) -> Result<u64, ModelError> {
    let tensors = collect(&model.weights)?;
    std::fs::create_dir_all(out).map_err(|e| ModelError::io(out, e))?;
    let mut cfg = source_config.clone();
    let q = if model.weights.config.arch == Arch::GptOss && spec.experts == crate::quant::QuantFormat::Mxfp4 {
        gpt_oss_quantization_config(spec)
    } else {
        quantization_config(spec)
    };
    if let Some(o) = cfg.as_object_mut() {
        o.insert("quantization_config".into(), q);
    }
    write_json(&out.join("config.json"), &cfg)?;
    let st = out.join("model.safetensors");
    let meta = Some([("format".to_string(), "pt".to_string())].into_iter().collect());
    safetensors::serialize_to_file(tensors.0.iter().map(|(n, o)| (n.as_str(), o)), &meta, &st)
        .map_err(|e| ModelError::Format(format!("{}: cannot write safetensors: {e}", st.display())))?;
    write_tokenizer(out, model, source)?;
    std::fs::metadata(&st).map(|m| m.len()).map_err(|e| ModelError::io(&st, e))
}

fn write_tokenizer(out: &Path, model: &LoadedModel, source: &Path) -> Result<(), ModelError> {
    if source.is_dir() {
        let files = ["tokenizer.json", "tokenizer_config.json", "generation_config.json", "special_tokens_map.json",
            "chat_template.jinja", "chat_template.json"];
        for f in files {
            let from = source.join(f);
            if from.exists() {
                std::fs::copy(&from, out.join(f)).map_err(|e| ModelError::io(&from, e))?;
            }
        }
        return Ok(());
    }
    let tok = &model.tokenizer;
    let tpath = out.join("tokenizer.json");
    tok.inner
        .save(&tpath, false)
        .map_err(|e| ModelError::Tokenizer(format!("{}: cannot write: {e}", tpath.display())))?;
    let mut tc = json!({"tokenizer_class": "PreTrainedTokenizerFast"});
    for (k, v) in [("bos_token", &tok.bos_token), ("eos_token", &tok.eos_token), ("chat_template", &tok.chat_template)] {
        if let Some(s) = v {
            tc[k] = json!(s);
        }
    }
    write_json(&out.join("tokenizer_config.json"), &tc)?;
    let mut gen = json!({"eos_token_id": tok.eos_ids});
    if let Some(id) = tok.bos_token.as_deref().and_then(|t| tok.inner.token_to_id(t)) {
        gen["bos_token_id"] = json!(id);
    }
    write_json(&out.join("generation_config.json"), &gen)
}
