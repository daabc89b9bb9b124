//! Named tensors from a checkpoint, whatever its container: memory-mapped
//! safetensors (single file or sharded with an index) or a GGUF file.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use half::{bf16, f16};
use memmap2::Mmap;
use safetensors::{Dtype, SafeTensors};

use super::gguf::{unpermute_qk, GgufFile};
use super::ModelError;

/// A tensor converted to f32, with its PyTorch-order shape.
pub struct TensorF32 {
    pub shape: Vec<usize>,
    pub data: Vec<f32>,
}

/// Raw bytes of a tensor as stored (used for pre-quantized u8 blocks).
pub struct TensorRaw {
    pub shape: Vec<usize>,
    pub dtype: String,
    pub bytes: Vec<u8>,
}

/// Where the loader reads named tensors from.
pub trait TensorSource {
    /// The tensor as f32, or `None` when the checkpoint has no tensor of that name.
    fn get_f32(&self, name: &str) -> Result<Option<TensorF32>, ModelError>;
    /// The tensor's bytes as stored (for u8-packed quantized weights).
    fn get_raw(&self, name: &str) -> Result<Option<TensorRaw>, ModelError>;
    fn contains(&self, name: &str) -> bool;
    fn names(&self) -> Vec<String>;
    /// Human-readable origin for error messages.
    fn describe(&self) -> String;
}

/// One or more memory-mapped safetensors files.
pub struct SafetensorsSource {
    dir: PathBuf,
    maps: Vec<(PathBuf, Mmap)>,
    /// tensor name -> index into `maps`
    index: HashMap<String, usize>,
}

impl SafetensorsSource {
    /// Opens `model.safetensors`, or the shards listed in `model.safetensors.index.json`.
    pub fn open_dir(dir: &Path) -> Result<Self, ModelError> {
        let single = dir.join("model.safetensors");
        let index_path = dir.join("model.safetensors.index.json");
        let files: Vec<PathBuf> = if index_path.exists() {
            let text = std::fs::read_to_string(&index_path)
                .map_err(|e| ModelError::io(&index_path, e))?;
            let v: serde_json::Value = serde_json::from_str(&text).map_err(|e| {
                ModelError::Format(format!("{}: not valid JSON: {e}", index_path.display()))
            })?;
            let map = v.get("weight_map").and_then(|m| m.as_object()).ok_or_else(|| {
                ModelError::Format(format!("{}: no `weight_map` object", index_path.display()))
            })?;
            let mut shards: Vec<String> =
                map.values().filter_map(|s| s.as_str().map(str::to_owned)).collect();
            shards.sort();
            shards.dedup();
            shards.into_iter().map(|s| dir.join(s)).collect()
        } else if single.exists() {
            vec![single]
        } else {
            let mut found: Vec<PathBuf> = std::fs::read_dir(dir)
                .map_err(|e| ModelError::io(dir, e))?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
                .collect();
            found.sort();
            if found.is_empty() {
                return Err(ModelError::Format(format!(
                    "{}: no model.safetensors, no model.safetensors.index.json and no *.safetensors file",
                    dir.display()
                )));
            }
            found
        };
        let mut maps = Vec::new();
        let mut index = HashMap::new();
        for path in files {
            let file = std::fs::File::open(&path).map_err(|e| ModelError::io(&path, e))?;
            // SAFETY: the file is opened read-only and we never hand out references that
            // outlive the map; a concurrent writer could change the bytes but not memory safety
            // of the u8 view we parse defensively.
            let mmap = unsafe { Mmap::map(&file) }.map_err(|e| ModelError::io(&path, e))?;
            let names: Vec<String> = SafeTensors::deserialize(&mmap)
                .map_err(|e| ModelError::Format(format!("{}: bad safetensors file: {e}", path.display())))?
                .names()
                .into_iter()
                .cloned()
                .collect();
            for n in names {
                index.insert(n, maps.len());
            }
            maps.push((path, mmap));
        }
        Ok(Self { dir: dir.to_path_buf(), maps, index })
    }

    fn view(&self, name: &str) -> Result<Option<(safetensors::tensor::TensorView<'_>, &Path)>, ModelError> {
        let Some(&i) = self.index.get(name) else { return Ok(None) };
        let (path, mmap) = &self.maps[i];
        let st = SafeTensors::deserialize(mmap)
            .map_err(|e| ModelError::Format(format!("{}: bad safetensors file: {e}", path.display())))?;
        let view = st
            .tensor(name)
            .map_err(|e| ModelError::Format(format!("{}: tensor `{name}`: {e}", path.display())))?;
        Ok(Some((view, path.as_path())))
    }
}

/// Converts a float tensor view to f32; other dtypes are an error naming the tensor.
fn view_to_f32(view: &safetensors::tensor::TensorView<'_>, name: &str, origin: &str) -> Result<TensorF32, ModelError> {
    let bytes = view.data();
    let data: Vec<f32> = match view.dtype() {
        Dtype::F32 => bytes.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect(),
        Dtype::BF16 => bytes.chunks_exact(2).map(|b| bf16::from_le_bytes([b[0], b[1]]).to_f32()).collect(),
        Dtype::F16 => bytes.chunks_exact(2).map(|b| f16::from_le_bytes([b[0], b[1]]).to_f32()).collect(),
        Dtype::F64 => bytes
            .chunks_exact(8)
            .map(|b| f64::from_le_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]]) as f32)
            .collect(),
        other => {
            return Err(ModelError::Format(format!("{origin}: tensor `{name}` has dtype {other:?}, expected a float type")))
        }
    };
    Ok(TensorF32 { shape: view.shape().to_vec(), data })
}

/// Parses a whole safetensors buffer and converts every float tensor, as loading
/// does (the fuzz target's entry point; every failure is a typed error).
pub fn parse_safetensors(bytes: &[u8]) -> Result<Vec<(String, TensorF32)>, ModelError> {
    let st = SafeTensors::deserialize(bytes).map_err(|e| ModelError::Format(format!("bad safetensors buffer: {e}")))?;
    let mut out = Vec::new();
    for (name, view) in st.tensors() {
        out.push((name.clone(), view_to_f32(&view, &name, "buffer")?));
    }
    Ok(out)
}

fn dtype_name(d: Dtype) -> String {
    format!("{d:?}")
}

impl TensorSource for SafetensorsSource {
    fn get_f32(&self, name: &str) -> Result<Option<TensorF32>, ModelError> {
        let Some((view, path)) = self.view(name)? else { return Ok(None) };
        view_to_f32(&view, name, &path.display().to_string()).map(Some)
    }

    fn get_raw(&self, name: &str) -> Result<Option<TensorRaw>, ModelError> {
        let Some((view, _)) = self.view(name)? else { return Ok(None) };
        Ok(Some(TensorRaw { shape: view.shape().to_vec(), dtype: dtype_name(view.dtype()), bytes: view.data().to_vec() }))
    }

    fn contains(&self, name: &str) -> bool {
        self.index.contains_key(name)
    }

    fn names(&self) -> Vec<String> {
        let mut v: Vec<String> = self.index.keys().cloned().collect();
        v.sort();
        v
    }

    fn describe(&self) -> String {
        self.dir.display().to_string()
    }
}

/// A GGUF file seen through HF tensor names (llama-family layout).
pub struct GgufSource {
    path: PathBuf,
    pub file: GgufFile,
    /// HF name -> GGUF name
    names: BTreeMap<String, String>,
    n_heads: usize,
    n_kv_heads: usize,
    /// llama.cpp permutes Q/K rows of llama-architecture models at conversion.
    permuted_qk: bool,
}

impl GgufSource {
    pub fn new(path: &Path, file: GgufFile, n_heads: usize, n_kv_heads: usize, permuted_qk: bool) -> Self {
        let mut names = BTreeMap::new();
        for t in &file.tensors {
            if let Some(hf) = gguf_to_hf_name(&t.name) {
                names.insert(hf, t.name.clone());
            }
        }
        Self { path: path.to_path_buf(), file, names, n_heads, n_kv_heads, permuted_qk }
    }
}

/// Maps llama.cpp tensor names to transformers' names.
fn gguf_to_hf_name(g: &str) -> Option<String> {
    match g {
        "token_embd.weight" => return Some("model.embed_tokens.weight".into()),
        "output_norm.weight" => return Some("model.norm.weight".into()),
        "output.weight" => return Some("lm_head.weight".into()),
        _ => {}
    }
    let rest = g.strip_prefix("blk.")?;
    let (layer, tail) = rest.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    let hf_tail = match tail {
        "attn_norm.weight" => "input_layernorm.weight",
        "ffn_norm.weight" => "post_attention_layernorm.weight",
        "attn_q.weight" => "self_attn.q_proj.weight",
        "attn_k.weight" => "self_attn.k_proj.weight",
        "attn_v.weight" => "self_attn.v_proj.weight",
        "attn_output.weight" => "self_attn.o_proj.weight",
        "attn_q.bias" => "self_attn.q_proj.bias",
        "attn_k.bias" => "self_attn.k_proj.bias",
        "attn_v.bias" => "self_attn.v_proj.bias",
        "attn_q_norm.weight" => "self_attn.q_norm.weight",
        "attn_k_norm.weight" => "self_attn.k_norm.weight",
        "ffn_gate.weight" => "mlp.gate_proj.weight",
        "ffn_up.weight" => "mlp.up_proj.weight",
        "ffn_down.weight" => "mlp.down_proj.weight",
        _ => return None,
    };
    Some(format!("model.layers.{layer}.{hf_tail}"))
}

impl TensorSource for GgufSource {
    fn get_f32(&self, name: &str) -> Result<Option<TensorF32>, ModelError> {
        let Some(gname) = self.names.get(name) else { return Ok(None) };
        let (shape, mut data) = self.file.tensor_f32(gname)?;
        if self.permuted_qk && shape.len() == 2 {
            let heads = if name.ends_with("q_proj.weight") {
                Some(self.n_heads)
            } else if name.ends_with("k_proj.weight") {
                Some(self.n_kv_heads)
            } else {
                None
            };
            if let Some(h) = heads {
                unpermute_qk(&mut data, h, shape[0], shape[1]);
            }
        }
        Ok(Some(TensorF32 { shape, data }))
    }

    fn get_raw(&self, _name: &str) -> Result<Option<TensorRaw>, ModelError> {
        Ok(None)
    }

    fn contains(&self, name: &str) -> bool {
        self.names.contains_key(name)
    }

    fn names(&self) -> Vec<String> {
        self.names.keys().cloned().collect()
    }

    fn describe(&self) -> String {
        self.path.display().to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn valid_buffer() -> Vec<u8> {
        let data: Vec<u8> = (0..24u8).collect();
        let view = safetensors::tensor::TensorView::new(Dtype::F32, vec![2, 3], &data).expect("view");
        safetensors::serialize(vec![("w".to_string(), view)], &None).expect("serialize")
    }

    #[test]
    fn a_valid_buffer_parses() {
        let t = parse_safetensors(&valid_buffer()).expect("parse");
        assert_eq!(t[0].1.shape, vec![2, 3]);
    }

    proptest! {
        // Byte flips, truncations and lying header lengths: typed errors, never a panic
        // (the same entry point the `safetensors_header` cargo-fuzz target drives).
        #[test]
        fn mutated_buffers_never_panic(flips in proptest::collection::vec((0usize..200, any::<u8>()), 0..8),
                                       cut in 0usize..220, header_len in proptest::option::of(any::<u64>())) {
            let mut b = valid_buffer();
            for (i, v) in flips {
                if let Some(x) = b.get_mut(i) { *x = v; }
            }
            if let Some(h) = header_len { b[..8].copy_from_slice(&h.to_le_bytes()); }
            b.truncate(cut.min(b.len()));
            let _ = parse_safetensors(&b);
        }
    }
}
