//! GGUF (v2/v3) reader: header, metadata, tensor table, dequantized tensors.
//!
//! Every length and count read from the file is checked against the bytes
//! that remain before anything is allocated, so a lying header produces a
//! typed [`GgufError`] instead of a panic or a huge allocation.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use super::gguf_quants;
pub use super::gguf_quants::{try_unpermute_qk, unpermute_qk};

const MAGIC: &[u8; 4] = b"GGUF";
const MAX_DIMS: u32 = 4;
const MAX_NESTING: u32 = 8;
/// Largest up-front reservation for a count read from the file.
const PREALLOC_MAX: u64 = 1 << 16;
pub const DEFAULT_ALIGNMENT: u64 = 32;

#[derive(Debug, thiserror::Error)]
pub enum GgufError {
    #[error("cannot read GGUF file {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("not a GGUF file: the first 4 bytes are {found:02x?}, expected \"GGUF\"; check that the path points at a .gguf model")]
    BadMagic { found: Vec<u8> },
    #[error("unsupported GGUF version {0}: kairos reads GGUF v2 and v3; re-convert the model with a current llama.cpp")]
    UnsupportedVersion(u32),
    #[error("GGUF file is truncated: needed {needed} bytes for {what} at offset {offset}, but only {available} remain; the download is probably incomplete")]
    Truncated {
        what: String,
        offset: u64,
        needed: u64,
        available: u64,
    },
    #[error("GGUF header is corrupt at offset {offset}: {what}")]
    Corrupt { offset: u64, what: String },
    #[error("GGUF tensor '{tensor}' has unknown ggml tensor type id {ggml_type}; this file needs a newer reader or is corrupt")]
    UnknownTensorType { tensor: String, ggml_type: u32 },
    #[error("GGUF tensor '{tensor}' has type {type_name}, which kairos cannot dequantize; use a file quantized as F32/F16/BF16/Q8_0/Q4_0/Q4_1/Q5_0/Q5_1/Q4_K/Q6_K")]
    UnsupportedTensorType { tensor: String, type_name: String },
    #[error("GGUF tensor '{tensor}' is invalid: {what}")]
    BadTensor { tensor: String, what: String },
    #[error("GGUF tensor '{tensor}' data [{start}, {end}) lies outside the file (length {file_len}); the file is truncated or its header lies")]
    TensorOutOfRange {
        tensor: String,
        start: u64,
        end: u64,
        file_len: u64,
    },
    #[error("GGUF tensor '{0}' not found in the file")]
    TensorNotFound(String),
    #[error("GGUF metadata key '{key}': {what}")]
    Metadata { key: String, what: String },
    #[error("cannot build tokenizer from GGUF metadata: {0}")]
    Tokenizer(String),
}

#[derive(Debug, Clone, PartialEq)]
pub enum GgufValue {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    F32(f32),
    Bool(bool),
    Str(String),
    Array(Vec<GgufValue>),
    U64(u64),
    I64(i64),
    F64(f64),
}

impl GgufValue {
    /// Any integer value (and bool) as i128, so callers can range-check.
    pub fn as_int(&self) -> Option<i128> {
        Some(match *self {
            GgufValue::U8(v) => v as i128,
            GgufValue::I8(v) => v as i128,
            GgufValue::U16(v) => v as i128,
            GgufValue::I16(v) => v as i128,
            GgufValue::U32(v) => v as i128,
            GgufValue::I32(v) => v as i128,
            GgufValue::U64(v) => v as i128,
            GgufValue::I64(v) => v as i128,
            GgufValue::Bool(v) => v as i128,
            _ => return None,
        })
    }
    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            GgufValue::F32(v) => Some(v as f64),
            GgufValue::F64(v) => Some(v),
            _ => self.as_int().map(|v| v as f64),
        }
    }
    pub fn as_str(&self) -> Option<&str> {
        match self {
            GgufValue::Str(s) => Some(s),
            _ => None,
        }
    }
    pub fn as_array(&self) -> Option<&[GgufValue]> {
        match self {
            GgufValue::Array(a) => Some(a),
            _ => None,
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct GgufTensorInfo {
    pub name: String,
    /// As stored: `dims[0]` (ne[0]) is the innermost, contiguous dimension.
    pub dims: Vec<u64>,
    pub ggml_type: u32,
    /// Relative to the start of the tensor data section.
    pub offset: u64,
}

impl GgufTensorInfo {
    pub fn n_elements(&self) -> u64 {
        self.dims.iter().fold(1u64, |a, &d| a.saturating_mul(d))
    }
    /// Shape in PyTorch order (outermost first).
    pub fn shape(&self) -> Vec<usize> {
        self.dims.iter().rev().map(|&d| d as usize).collect()
    }
    /// Storage size in bytes (validated at parse time, so no overflow here).
    pub fn n_bytes(&self) -> u64 {
        match gguf_quants::type_layout(self.ggml_type) {
            Some((_, blk, sz)) => self.n_elements() / blk as u64 * sz as u64,
            None => 0,
        }
    }
}

/// Everything before the tensor data: what [`GgufFile::parse_bytes`] returns.
#[derive(Debug, Clone)]
pub struct GgufHeader {
    pub version: u32,
    pub metadata: BTreeMap<String, GgufValue>,
    pub tensors: Vec<GgufTensorInfo>,
    pub alignment: u64,
    /// Absolute file offset where the tensor data section starts.
    pub data_offset: u64,
}

impl GgufHeader {
    /// Check every tensor's data range lies inside a file of `file_len` bytes.
    pub fn check_data_ranges(&self, file_len: u64) -> Result<(), GgufError> {
        for t in &self.tensors {
            let start = self.data_offset.checked_add(t.offset);
            let end = start.and_then(|s| s.checked_add(t.n_bytes()));
            match (start, end) {
                (Some(_), Some(e)) if e <= file_len => {}
                _ => {
                    return Err(GgufError::TensorOutOfRange {
                        tensor: t.name.clone(),
                        start: start.unwrap_or(u64::MAX),
                        end: end.unwrap_or(u64::MAX),
                        file_len,
                    })
                }
            }
        }
        Ok(())
    }
}

enum Storage {
    Mmap(memmap2::Mmap),
    Owned(Vec<u8>),
}

pub struct GgufFile {
    pub version: u32,
    pub metadata: BTreeMap<String, GgufValue>,
    pub tensors: Vec<GgufTensorInfo>,
    pub alignment: u64,
    pub data_offset: u64,
    storage: Storage,
}

impl std::fmt::Debug for GgufFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GgufFile")
            .field("version", &self.version)
            .field("metadata_keys", &self.metadata.len())
            .field("tensors", &self.tensors.len())
            .field("data_offset", &self.data_offset)
            .finish()
    }
}

/// Bounds-checked little-endian cursor.
struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn remaining(&self) -> usize {
        self.buf.len().saturating_sub(self.pos)
    }
    fn take(&mut self, n: u64, what: &str) -> Result<&'a [u8], GgufError> {
        let end = usize::try_from(n)
            .ok()
            .and_then(|n| n.checked_add(self.pos));
        let Some(s) = end.and_then(|e| self.buf.get(self.pos..e)) else {
            let (offset, available) = (self.pos as u64, self.remaining() as u64);
            let what = what.to_string();
            return Err(GgufError::Truncated {
                what,
                offset,
                needed: n,
                available,
            });
        };
        self.pos += s.len();
        Ok(s)
    }
    fn arr<const N: usize>(&mut self, what: &str) -> Result<[u8; N], GgufError> {
        let s = self.take(N as u64, what)?;
        let mut a = [0u8; N];
        a.copy_from_slice(s);
        Ok(a)
    }
    fn u32(&mut self, what: &str) -> Result<u32, GgufError> {
        Ok(u32::from_le_bytes(self.arr(what)?))
    }
    fn u64(&mut self, what: &str) -> Result<u64, GgufError> {
        Ok(u64::from_le_bytes(self.arr(what)?))
    }
    fn string(&mut self, what: &str) -> Result<String, GgufError> {
        let at = self.pos as u64;
        let len = self.u64(what)?;
        if len > self.remaining() as u64 {
            let left = self.remaining();
            let msg = format!("{what}: string length {len} exceeds the {left} bytes left");
            return Err(corrupt(at, msg));
        }
        let bytes = self.take(len, what)?;
        Ok(String::from_utf8_lossy(bytes).into_owned())
    }

    fn value(&mut self, ty: u32, key: &str, depth: u32) -> Result<GgufValue, GgufError> {
        let at = self.pos as u64;
        Ok(match ty {
            0 => GgufValue::U8(self.arr::<1>(key)?[0]),
            1 => GgufValue::I8(self.arr::<1>(key)?[0] as i8),
            2 => GgufValue::U16(u16::from_le_bytes(self.arr(key)?)),
            3 => GgufValue::I16(i16::from_le_bytes(self.arr(key)?)),
            4 => GgufValue::U32(self.u32(key)?),
            5 => GgufValue::I32(i32::from_le_bytes(self.arr(key)?)),
            6 => GgufValue::F32(f32::from_le_bytes(self.arr(key)?)),
            7 => GgufValue::Bool(self.arr::<1>(key)?[0] != 0),
            8 => GgufValue::Str(self.string(key)?),
            9 => {
                if depth >= MAX_NESTING {
                    return Err(corrupt(at, format!("'{key}': arrays nested too deep")));
                }
                let elem_ty = self.u32(key)?;
                let count = self.u64(key)?;
                let msg = || format!("'{key}': unknown array element type {elem_ty}");
                let min_size = min_value_size(elem_ty).ok_or_else(|| corrupt(at, msg()))?;
                let left = self.remaining();
                if count.checked_mul(min_size).is_none_or(|n| n > left as u64) {
                    let msg = format!(
                        "metadata '{key}': array count {count} cannot fit in the {left} bytes left"
                    );
                    return Err(corrupt(at, msg));
                }
                // Capacity is capped: elements are 32 bytes in memory but may be 1 on disk.
                let mut v = Vec::with_capacity(count.min(PREALLOC_MAX) as usize);
                for _ in 0..count {
                    v.push(self.value(elem_ty, key, depth + 1)?);
                }
                GgufValue::Array(v)
            }
            10 => GgufValue::U64(self.u64(key)?),
            11 => GgufValue::I64(i64::from_le_bytes(self.arr(key)?)),
            12 => GgufValue::F64(f64::from_le_bytes(self.arr(key)?)),
            _ => return Err(corrupt(at, format!("'{key}': unknown value type {ty}"))),
        })
    }
}

/// Smallest encoded size of one value of type `ty` (used to bound counts).
fn min_value_size(ty: u32) -> Option<u64> {
    Some(match ty {
        0 | 1 | 7 => 1,
        2 | 3 => 2,
        4..=6 => 4,
        8 => 8,
        9 => 12,
        10..=12 => 8,
        _ => return None,
    })
}

impl GgufFile {
    /// Memory-map and parse a GGUF file, validating all tensor data ranges.
    pub fn open(path: &Path) -> Result<Self, GgufError> {
        let io = |source| {
            let path = path.to_path_buf();
            GgufError::Io { path, source }
        };
        let file = std::fs::File::open(path).map_err(io)?;
        // SAFETY: the map is read-only; like every mmap-based loader we assume the
        // model file is not truncated or rewritten by another process while open.
        let mmap = unsafe { memmap2::Mmap::map(&file) }.map_err(io)?;
        Self::from_storage(Storage::Mmap(mmap))
    }

    /// Parse a GGUF held in memory (tests, or files fetched over the network).
    pub fn from_bytes(bytes: Vec<u8>) -> Result<Self, GgufError> {
        Self::from_storage(Storage::Owned(bytes))
    }

    fn from_storage(storage: Storage) -> Result<Self, GgufError> {
        let bytes: &[u8] = match &storage {
            Storage::Mmap(m) => m,
            Storage::Owned(v) => v,
        };
        let h = Self::parse_bytes(bytes)?;
        h.check_data_ranges(bytes.len() as u64)?;
        Ok(GgufFile {
            version: h.version,
            metadata: h.metadata,
            tensors: h.tensors,
            alignment: h.alignment,
            data_offset: h.data_offset,
            storage,
        })
    }

    fn bytes(&self) -> &[u8] {
        match &self.storage {
            Storage::Mmap(m) => m,
            Storage::Owned(v) => v,
        }
    }

    /// Parse header, metadata and tensor table. Does not require the tensor data
    /// to be present (see [`GgufHeader::check_data_ranges`]).
    pub fn parse_bytes(bytes: &[u8]) -> Result<GgufHeader, GgufError> {
        let mut r = Reader { buf: bytes, pos: 0 };
        let found = bytes.get(..4).unwrap_or(bytes).to_vec();
        if found != MAGIC {
            return Err(GgufError::BadMagic { found });
        }
        r.pos = 4;
        let version = r.u32("version")?;
        if !(2..=3).contains(&version) {
            return Err(GgufError::UnsupportedVersion(version));
        }
        let n_tensors = r.u64("tensor count")?;
        let n_kv = r.u64("metadata count")?;
        // Each KV needs >= 8 (key len) + 4 (type) + 1 bytes; each tensor info >= 8+4+4+8.
        let left = r.remaining() as u64;
        if n_kv.checked_mul(13).is_none_or(|n| n > left) {
            let msg = format!("metadata count {n_kv} cannot fit in {left} bytes");
            return Err(corrupt(16, msg));
        }
        if n_tensors.checked_mul(24).is_none_or(|n| n > left) {
            let msg = format!("tensor count {n_tensors} cannot fit in {left} bytes");
            return Err(corrupt(8, msg));
        }
        let mut metadata = BTreeMap::new();
        for _ in 0..n_kv {
            let at = r.pos as u64;
            let key = r.string("metadata key")?;
            let ty = r.u32(&key)?;
            let val = r.value(ty, &key, 0)?;
            if metadata.insert(key.clone(), val).is_some() {
                return Err(corrupt(at, format!("duplicate metadata key '{key}'")));
            }
        }
        let alignment = match metadata.get("general.alignment") {
            None => DEFAULT_ALIGNMENT,
            Some(v) => match v.as_int() {
                Some(a) if a > 0 && a <= 1 << 20 && (a as u64).is_power_of_two() => a as u64,
                _ => {
                    return Err(GgufError::Metadata {
                        key: "general.alignment".into(),
                        what: format!("{v:?} is not a power-of-two integer"),
                    })
                }
            },
        };
        let mut tensors = Vec::with_capacity(n_tensors.min(PREALLOC_MAX) as usize);
        let mut names = std::collections::HashSet::new();
        for _ in 0..n_tensors {
            let at = r.pos as u64;
            let name = r.string("tensor name")?;
            let n_dims = r.u32(&name)?;
            if n_dims > MAX_DIMS {
                return Err(bad_tensor(
                    &name,
                    format!("{n_dims} dimensions (max {MAX_DIMS})"),
                ));
            }
            let mut dims = Vec::with_capacity(n_dims as usize);
            for _ in 0..n_dims {
                dims.push(r.u64(&name)?);
            }
            let ggml_type = r.u32(&name)?;
            let offset = r.u64(&name)?;
            let t = GgufTensorInfo {
                name,
                dims,
                ggml_type,
                offset,
            };
            validate_tensor(&t, alignment)?;
            if !names.insert(t.name.clone()) {
                return Err(corrupt(at, format!("duplicate tensor name '{}'", t.name)));
            }
            tensors.push(t);
        }
        let end = r.pos as u64;
        let data_offset = end.div_ceil(alignment) * alignment;
        Ok(GgufHeader {
            version,
            metadata,
            tensors,
            alignment,
            data_offset,
        })
    }

    pub fn get(&self, key: &str) -> Option<&GgufValue> {
        self.metadata.get(key)
    }
    pub fn get_str(&self, key: &str) -> Option<&str> {
        self.get(key)?.as_str()
    }
    /// Any integer width, if non-negative and it fits.
    pub fn get_u64(&self, key: &str) -> Option<u64> {
        u64::try_from(self.get(key)?.as_int()?).ok()
    }
    pub fn get_u32(&self, key: &str) -> Option<u32> {
        u32::try_from(self.get(key)?.as_int()?).ok()
    }
    pub fn get_i64(&self, key: &str) -> Option<i64> {
        i64::try_from(self.get(key)?.as_int()?).ok()
    }
    pub fn get_usize(&self, key: &str) -> Option<usize> {
        usize::try_from(self.get(key)?.as_int()?).ok()
    }
    pub fn get_f32(&self, key: &str) -> Option<f32> {
        self.get(key)?.as_f64().map(|v| v as f32)
    }
    pub fn get_bool(&self, key: &str) -> Option<bool> {
        match self.get(key)? {
            GgufValue::Bool(b) => Some(*b),
            v => v.as_int().map(|i| i != 0),
        }
    }
    pub fn get_array(&self, key: &str) -> Option<&[GgufValue]> {
        self.get(key)?.as_array()
    }
    /// `None` if absent, not an array, or any element is not a string.
    pub fn get_str_array(&self, key: &str) -> Option<Vec<&str>> {
        self.get_array(key)?.iter().map(|v| v.as_str()).collect()
    }
    pub fn get_f32_array(&self, key: &str) -> Option<Vec<f32>> {
        self.get_array(key)?
            .iter()
            .map(|v| v.as_f64().map(|x| x as f32))
            .collect()
    }
    pub fn get_i32_array(&self, key: &str) -> Option<Vec<i32>> {
        self.get_array(key)?
            .iter()
            .map(|v| v.as_int().and_then(|i| i32::try_from(i).ok()))
            .collect()
    }
    pub fn get_u32_array(&self, key: &str) -> Option<Vec<u32>> {
        self.get_array(key)?
            .iter()
            .map(|v| v.as_int().and_then(|i| u32::try_from(i).ok()))
            .collect()
    }
    /// `general.architecture`, e.g. "llama".
    pub fn architecture(&self) -> Option<&str> {
        self.get_str("general.architecture")
    }
    /// `{arch}.{suffix}` as an integer, e.g. `arch_u64("block_count")`.
    pub fn arch_u64(&self, suffix: &str) -> Option<u64> {
        self.get_u64(&format!("{}.{suffix}", self.architecture()?))
    }
    pub fn arch_f32(&self, suffix: &str) -> Option<f32> {
        self.get_f32(&format!("{}.{suffix}", self.architecture()?))
    }

    pub fn tensor_info(&self, name: &str) -> Option<&GgufTensorInfo> {
        self.tensors.iter().find(|t| t.name == name)
    }

    /// Raw stored bytes of a tensor (ranges were validated at open).
    pub fn tensor_bytes(&self, name: &str) -> Result<(&GgufTensorInfo, &[u8]), GgufError> {
        let t = self
            .tensor_info(name)
            .ok_or_else(|| GgufError::TensorNotFound(name.to_string()))?;
        let file_len = self.bytes().len() as u64;
        let oob = || GgufError::TensorOutOfRange {
            tensor: t.name.clone(),
            start: self.data_offset.saturating_add(t.offset),
            end: u64::MAX,
            file_len,
        };
        let start = self.data_offset.checked_add(t.offset).ok_or_else(oob)?;
        let end = start.checked_add(t.n_bytes()).ok_or_else(oob)?;
        let start = usize::try_from(start).map_err(|_| oob())?;
        let end = usize::try_from(end).map_err(|_| oob())?;
        let data = self.bytes().get(start..end).ok_or_else(oob)?;
        Ok((t, data))
    }

    /// Dequantized tensor as f32 in row-major with shape reversed to PyTorch order ([rows, cols] for a 2-D weight: GGUF ne = [cols, rows]).
    pub fn tensor_f32(&self, name: &str) -> Result<(Vec<usize>, Vec<f32>), GgufError> {
        use rayon::prelude::*;
        let (t, data) = self.tensor_bytes(name)?;
        let (type_name, blk, blk_bytes) =
            gguf_quants::type_layout(t.ggml_type).ok_or_else(|| GgufError::UnknownTensorType {
                tensor: t.name.clone(),
                ggml_type: t.ggml_type,
            })?;
        if !gguf_quants::can_dequantize(t.ggml_type) {
            return Err(GgufError::UnsupportedTensorType {
                tensor: t.name.clone(),
                type_name: type_name.to_string(),
            });
        }
        let n = usize::try_from(t.n_elements()).map_err(|_| GgufError::BadTensor {
            tensor: t.name.clone(),
            what: "too many elements for this platform".into(),
        })?;
        let mut out = vec![0f32; n];
        // Parallel over chunks of whole blocks.
        let blocks_per_chunk = (65536 / blk).max(1);
        out.par_chunks_mut(blocks_per_chunk * blk)
            .zip(data.par_chunks(blocks_per_chunk * blk_bytes))
            .for_each(|(o, s)| {
                gguf_quants::dequantize(t.ggml_type, s, o);
            });
        Ok((t.shape(), out))
    }
}

fn corrupt(offset: u64, what: String) -> GgufError {
    GgufError::Corrupt { offset, what }
}

fn bad_tensor(tensor: &str, what: String) -> GgufError {
    let tensor = tensor.to_string();
    GgufError::BadTensor { tensor, what }
}

fn validate_tensor(t: &GgufTensorInfo, alignment: u64) -> Result<(), GgufError> {
    let bad = |what: String| bad_tensor(&t.name, what);
    let (_, blk, _) =
        gguf_quants::type_layout(t.ggml_type).ok_or_else(|| GgufError::UnknownTensorType {
            tensor: t.name.clone(),
            ggml_type: t.ggml_type,
        })?;
    let mut n: u64 = 1;
    for &d in &t.dims {
        n = n
            .checked_mul(d)
            .filter(|&n| n <= i64::MAX as u64)
            .ok_or_else(|| bad(format!("dims {:?} overflow", t.dims)))?;
    }
    let ne0 = t.dims.first().copied().unwrap_or(1);
    if ne0 % blk as u64 != 0 {
        return Err(bad(format!(
            "row length {ne0} is not a multiple of the block size {blk}"
        )));
    }
    let (_, _, sz) = gguf_quants::type_layout(t.ggml_type).unwrap_or(("", 1, 1));
    (n / blk as u64)
        .checked_mul(sz as u64)
        .ok_or_else(|| bad("byte size overflows".into()))?;
    if !t.offset.is_multiple_of(alignment) {
        return Err(bad(format!(
            "data offset {} is not aligned to {alignment}",
            t.offset
        )));
    }
    Ok(())
}
