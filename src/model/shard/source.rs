//! A `TensorSource` that shows one rank's slices of a checkpoint, so the
//! ordinary `family::load_weights` builds that rank's smaller model (with the
//! plan's local config) and no rank ever holds the whole model.
//!
//! Each tensor is read from the underlying source one at a time (safetensors:
//! a view of the memory map; GGUF: dequantized) and cut before it is kept.
//! The only family knowledge here is which axis of each named tensor is
//! split; the layouts themselves stay in `family.rs` / `gpt_oss.rs`.

use std::ops::Range;

use super::plan::RankSlices;
use crate::model::config::{Arch, ModelConfig};
use crate::model::tensors::{TensorF32, TensorRaw, TensorSource};
use crate::model::ModelError;

/// How to cut one tensor: per axis, the index ranges kept (concatenated).
#[derive(Debug, Default)]
struct Cut {
    axes: Vec<(usize, Vec<Range<usize>>)>,
    /// Replace the values by zeros (a bias added after a sum over ranks, kept by one rank only).
    zero: bool,
}

impl Cut {
    fn axis(mut self, axis: usize, ranges: Vec<Range<usize>>) -> Self {
        self.axes.push((axis, ranges));
        self
    }
}

pub struct ShardSource<'a> {
    inner: &'a dyn TensorSource,
    arch: Arch,
    head_dim: usize,
    /// Full expert width (fused gate/up layouts put up after gate).
    expert_width: usize,
    s: RankSlices,
}

fn scale(r: &Range<usize>, k: usize) -> Range<usize> {
    r.start * k..r.end * k
}

/// Keeps `ranges` along `axis` of a row-major tensor of `shape`; `unit` elements per index.
fn select<T: Copy>(data: &[T], shape: &mut [usize], axis: usize, ranges: &[Range<usize>], unit: usize) -> Vec<T> {
    let outer: usize = shape[..axis].iter().product();
    let inner: usize = shape[axis + 1..].iter().product::<usize>() * unit;
    let dim = shape[axis];
    let kept: usize = ranges.iter().map(|r| r.len()).sum();
    let mut out = Vec::with_capacity(outer * kept * inner);
    for o in 0..outer {
        for r in ranges {
            out.extend_from_slice(&data[(o * dim + r.start) * inner..(o * dim + r.end) * inner]);
        }
    }
    shape[axis] = kept;
    out
}

fn dtype_bytes(dtype: &str) -> Option<usize> {
    Some(match dtype {
        "U8" | "I8" | "F8_E4M3" | "F8_E5M2" => 1,
        "BF16" | "F16" | "I16" | "U16" => 2,
        "F32" | "I32" | "U32" => 4,
        "F64" | "I64" | "U64" => 8,
        _ => return None,
    })
}

impl<'a> ShardSource<'a> {
    /// `full` is the whole model's config, `s` the rank's slices from the plan.
    pub fn new(inner: &'a dyn TensorSource, full: &ModelConfig, s: RankSlices) -> Self {
        let expert_width = full.moe.as_ref().map_or(0, |m| m.expert_intermediate);
        Self { inner, arch: full.arch, head_dim: full.head_dim, expert_width, s }
    }

    /// The checkpoint name of a local name: local expert `j` is global expert `experts.start + j`.
    fn global_name(&self, name: &str) -> String {
        for marker in [".mlp.experts.", ".block_sparse_moe.experts."] {
            if let Some(at) = name.find(marker) {
                let rest = &name[at + marker.len()..];
                if let Some((idx, tail)) = rest.split_once('.') {
                    if let Ok(j) = idx.parse::<usize>() {
                        return format!("{}{marker}{}.{tail}", &name[..at], self.s.experts.start + j);
                    }
                }
            }
        }
        name.to_owned()
    }

    /// The cut for a tensor name, in element units of its float shape.
    fn cut(&self, name: &str) -> Cut {
        let s = &self.s;
        let hd = self.head_dim;
        let (q, kv) = (scale(&s.heads, hd), scale(&s.kv_heads, hd));
        let (x, j) = (s.experts.clone(), s.expert_width.clone());
        if name == "model.embed_tokens.weight" || name == "lm_head.weight" {
            return Cut::default().axis(0, vec![s.vocab.clone()]);
        }
        let Some(tail) = name.strip_prefix("model.layers.").and_then(|r| r.split_once('.')).map(|(_, t)| t) else {
            return Cut::default();
        };
        // A linear `prefix.{weight,bias,weight_blocks,weight_scales}`: rows and columns to keep.
        let (prefix, part) = match tail.rsplit_once('.') {
            Some(pp) => pp,
            None => return Cut::default(),
        };
        let is_expert = prefix.contains(".experts.") && prefix.split('.').any(|p| p.parse::<usize>().is_ok());
        // (rows kept, columns kept, bias zeroed on this rank)
        type Keep = (Option<Range<usize>>, Option<Range<usize>>, bool);
        let linear: Option<Keep> = match prefix {
            "self_attn.q_proj" => Some((Some(q.clone()), None, false)),
            "self_attn.k_proj" | "self_attn.v_proj" => Some((Some(kv.clone()), None, false)),
            "self_attn.o_proj" => Some((None, Some(q.clone()), !s.owns_o_bias)),
            "mlp.gate_proj" | "mlp.up_proj" => Some((Some(s.intermediate.clone()), None, false)),
            "mlp.down_proj" => Some((None, Some(s.intermediate.clone()), false)),
            "mlp.gate" | "block_sparse_moe.gate" | "mlp.router" => Some((Some(x.clone()), None, false)),
            p if is_expert && (p.ends_with(".gate_proj") || p.ends_with(".up_proj") || p.ends_with(".w1") || p.ends_with(".w3")) => {
                Some((Some(j.clone()), None, false))
            }
            p if is_expert && (p.ends_with(".down_proj") || p.ends_with(".w2")) => {
                Some((None, Some(j.clone()), !s.owns_expert_down_bias))
            }
            _ => None,
        };
        if let Some((rows, cols, zero_bias)) = linear {
            let mut c = Cut::default();
            match part {
                "weight" | "weight_blocks" | "weight_scales" => {
                    if let Some(r) = rows {
                        c = c.axis(0, vec![r]);
                    }
                    if let Some(k) = cols {
                        // Packed MXFP4 columns are counted in blocks of 32 (checked in `cut_raw`).
                        c = c.axis(1, vec![k]);
                    }
                }
                "bias" => {
                    if let Some(r) = rows {
                        c = c.axis(0, vec![r]);
                    }
                    c.zero = zero_bias;
                }
                _ => {}
            }
            return c;
        }
        if tail.ends_with("self_attn.sinks") {
            return Cut::default().axis(0, vec![s.heads.clone()]);
        }
        let w = self.expert_width;
        let gptoss = self.arch == Arch::GptOss;
        match tail.strip_prefix("mlp.experts.") {
            // transformers 5 fused (Qwen-MoE, Mixtral): gate_up [E, 2I, H] (gate rows then up rows), down [E, H, I].
            Some("gate_up_proj") if !gptoss => Cut::default().axis(0, vec![x]).axis(1, vec![j.clone(), j.start + w..j.end + w]),
            Some("down_proj") if !gptoss => Cut::default().axis(0, vec![x]).axis(2, vec![j]),
            // gpt-oss: gate_up [E, H, 2I] interleaved (gate, up) pairs, down [E, I, H], blocks [E, rows, cols/32, 16].
            Some("gate_up_proj") => Cut::default().axis(0, vec![x]).axis(2, vec![scale(&j, 2)]),
            Some("gate_up_proj_bias") => Cut::default().axis(0, vec![x]).axis(1, vec![scale(&j, 2)]),
            Some("gate_up_proj_blocks" | "gate_up_proj_scales") => Cut::default().axis(0, vec![x]).axis(1, vec![scale(&j, 2)]),
            Some("down_proj") => Cut::default().axis(0, vec![x]).axis(1, vec![j]),
            Some("down_proj_bias") => Cut { zero: !s.owns_expert_down_bias, ..Cut::default() }.axis(0, vec![x]),
            Some("down_proj_blocks" | "down_proj_scales") => Cut::default().axis(0, vec![x]).axis(2, vec![j]),
            _ => Cut::default(),
        }
    }

    /// Whether axis `axis` of raw tensor `name` counts MXFP4 blocks of 32 values.
    fn blocked_axis(name: &str, axis: usize) -> bool {
        (name.ends_with(".weight_blocks") || name.ends_with(".weight_scales")) && axis == 1
            || (name.ends_with("down_proj_blocks") || name.ends_with("down_proj_scales")) && axis == 2
    }
}

fn sliced_err(name: &str, msg: String) -> ModelError {
    ModelError::Shape(format!("cannot shard tensor `{name}`: {msg}"))
}

impl TensorSource for ShardSource<'_> {
    fn get_f32(&self, name: &str) -> Result<Option<TensorF32>, ModelError> {
        let global = self.global_name(name);
        let Some(t) = self.inner.get_f32(&global)? else { return Ok(None) };
        let cut = self.cut(&global);
        let (mut shape, mut data) = (t.shape, t.data);
        for (axis, ranges) in &cut.axes {
            let ok = *axis < shape.len() && ranges.iter().all(|r| r.end <= shape[*axis]);
            if !ok {
                return Err(sliced_err(&global, format!("shape {shape:?} has no room for {ranges:?} on axis {axis}")));
            }
            data = select(&data, &mut shape, *axis, ranges, 1);
        }
        if cut.zero {
            data.fill(0.0);
        }
        Ok(Some(TensorF32 { shape, data }))
    }

    fn get_raw(&self, name: &str) -> Result<Option<TensorRaw>, ModelError> {
        let global = self.global_name(name);
        let Some(t) = self.inner.get_raw(&global)? else { return Ok(None) };
        let cut = self.cut(&global);
        let unit = dtype_bytes(&t.dtype).ok_or_else(|| sliced_err(&global, format!("dtype {}", t.dtype)))?;
        if global.ends_with(".weight") && unit == 1 && t.dtype != "F8_E4M3" && !cut.axes.is_empty() {
            // NVFP4 packs two values per byte with per-16 scales in other tensors.
            return Err(sliced_err(&global, "packed NVFP4 weights cannot be sharded yet; shard the float checkpoint".into()));
        }
        let (mut shape, mut bytes) = (t.shape, t.bytes);
        for (axis, ranges) in &cut.axes {
            let mut ranges = ranges.clone();
            if Self::blocked_axis(&global, *axis) {
                if ranges.iter().any(|r| r.start % 32 != 0 || r.end % 32 != 0) {
                    return Err(sliced_err(&global, format!("MXFP4 columns {ranges:?} do not fall on blocks of 32")));
                }
                ranges = ranges.iter().map(|r| r.start / 32..r.end / 32).collect();
            }
            if *axis >= shape.len() || ranges.iter().any(|r| r.end > shape[*axis]) {
                return Err(sliced_err(&global, format!("shape {shape:?} has no room for {ranges:?} on axis {axis}")));
            }
            bytes = select(&bytes, &mut shape, *axis, &ranges, unit);
        }
        if cut.zero {
            bytes.fill(0);
        }
        Ok(Some(TensorRaw { shape, dtype: t.dtype, bytes }))
    }

    fn contains(&self, name: &str) -> bool {
        self.inner.contains(&self.global_name(name))
    }

    fn names(&self) -> Vec<String> {
        self.inner.names()
    }

    fn describe(&self) -> String {
        format!("{} (rank {})", self.inner.describe(), self.s.rank)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    #[allow(clippy::single_range_in_vec_init)] // a list of ranges to keep: here one
    fn select_keeps_ranges_along_an_axis() {
        // [2, 3, 2]: keep rows 0 and 2 of the middle axis.
        let data: Vec<u32> = (0..12).collect();
        let mut shape = vec![2, 3, 2];
        let out = select(&data, &mut shape, 1, &[0..1, 2..3], 1);
        assert_eq!(out, vec![0, 1, 4, 5, 6, 7, 10, 11]);
        assert_eq!(shape, vec![2, 2, 2]);
        let mut shape = vec![2, 3, 2];
        assert_eq!(select(&data, &mut shape, 2, &[1..2], 1), vec![1, 3, 5, 7, 9, 11]);
    }
}
