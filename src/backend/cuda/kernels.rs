//! Typed launch wrappers, one per kernel. Shapes are checked against slice
//! lengths; launches are asynchronous on `ctx.stream`.
//! bf16 data is `CudaSlice<u16>`; `Act` picks the bf16 (u16) or f32 variant.

use cudarc::driver::{CudaSlice, DeviceRepr, LaunchConfig};

use super::{CudaContext, CudaError, Result};

/// Element type of an activation tensor: `u16` (bf16 bits) or `f32`.
pub trait Act: DeviceRepr {
    const NAME: &'static str;
}
impl Act for u16 {
    const NAME: &'static str = "bf16";
}
impl Act for f32 {
    const NAME: &'static str = "f32";
}

/// Shape of a KV cache laid out `[slot][layer][kv_head][pos][head_dim]`
/// (one such buffer for K and one for V, bf16).
#[derive(Clone, Copy, Debug)]
pub struct KvShape {
    pub n_slots: usize,
    pub n_layers: usize,
    pub n_kv_heads: usize,
    pub max_pos: usize,
    pub head_dim: usize,
}
impl KvShape {
    pub fn len(&self) -> usize {
        self.n_slots * self.n_layers * self.n_kv_heads * self.max_pos * self.head_dim
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Scratch for split-K decode attention: partial outputs of every split.
pub struct AttnWorkspace {
    pub acc: CudaSlice<f32>,
    pub ml: CudaSlice<f32>,
    /// per (sequence, kv head, head group) count of finished splits, 0 at rest
    pub cnt: CudaSlice<u32>,
    pub max_seqs: usize,
    pub n_q_heads: usize,
    pub max_splits: usize,
    pub head_dim: usize,
}

impl AttnWorkspace {
    pub fn new(
        cx: &CudaContext,
        max_seqs: usize,
        n_q_heads: usize,
        max_splits: usize,
        head_dim: usize,
    ) -> Result<Self> {
        let n = max_seqs * n_q_heads * max_splits;
        Ok(Self {
            acc: cx.stream.alloc_zeros::<f32>(n * head_dim)?,
            ml: cx.stream.alloc_zeros::<f32>(n * 2)?,
            cnt: cx.stream.alloc_zeros::<u32>((max_seqs * n_q_heads).max(1))?,
            max_seqs,
            n_q_heads,
            max_splits,
            head_dim,
        })
    }
}

pub(super) fn need(ok: bool, what: impl FnOnce() -> String) -> Result<()> {
    if ok {
        Ok(())
    } else {
        Err(CudaError::Shape(what()))
    }
}

pub(super) fn len_at_least<T>(s: &CudaSlice<T>, n: usize, name: &str) -> Result<()> {
    need(s.len() >= n, || {
        format!("{name}: has {} elements, needs {n}", s.len())
    })
}

pub(super) fn grid(x: usize, y: usize, z: usize, block: u32) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (x as u32, y as u32, z as u32),
        block_dim: (block, 1, 1),
        shared_mem_bytes: 0,
    }
}

pub(super) const NULL: u64 = 0;

/// The bf16 GEMV entry point (`kernels/gemv.cu`) for `n` input rows (1..=8) of type `xt`
/// ("bf16" / "f32") with `ks` warps per output row (1, or 2/4/8 for one row), adding into y
/// when `acc`; and the output rows one 256-thread block covers.
pub(super) fn gemv_kernel(xt: &str, n: usize, ks: usize, acc: bool) -> (String, usize) {
    let acc = if acc { "_acc" } else { "" };
    if ks > 1 {
        (format!("bf16_gemv_k{ks}_{xt}x{acc}"), 8 / ks)
    } else {
        (format!("bf16_gemv_{xt}x{acc}_n{n}"), if n >= 4 { 16 } else { 8 })
    }
}

/// Longest input row of the normalising GEMVs (`bf16_gemv_norm_*`: GEMV_NORM_MAX, a bf16 copy
/// in shared memory).
pub const GEMV_NORM_MAX: usize = 8192;
/// What [`CudaContext::attention_decode_rope`] needs of `rope_qk_kv`'s arguments.
pub struct AttnRope<'a> {
    /// i32 `[1]`: the token's position
    pub positions: &'a CudaSlice<i32>,
    /// f32 `[head_dim / 2]`
    pub inv_freq: &'a CudaSlice<f32>,
    /// per-head RMSNorm weights bf16 `[head_dim]` (Qwen3), or none
    pub q_norm: Option<&'a CudaSlice<u16>>,
    pub k_norm: Option<&'a CudaSlice<u16>>,
    pub eps: f32,
    /// cos/sin factor (1 unless YaRN)
    pub mscale: f32,
}

/// Most splits `attention_decode` takes (shared memory of its combining block: ATT_RMAX).
pub const ATTN_MAX_SPLITS: usize = 512;
/// Most rows one `argmax` call takes.
pub const ARGMAX_MAX_ROWS: usize = 1024;
/// Blocks per row in `argmax`'s first pass.
pub const ARGMAX_PARTS: usize = 64;

impl CudaContext {
    /// out[t, :] = table[ids[t], :]; table bf16 [vocab, hidden]; out f32 or bf16 [n_tokens, hidden].
    pub fn embedding_gather<O: Act>(
        &self,
        table: &CudaSlice<u16>,
        ids: &CudaSlice<i32>,
        out: &mut CudaSlice<O>,
        n_tokens: usize,
        hidden: usize,
    ) -> Result<()> {
        len_at_least(ids, n_tokens, "ids")?;
        len_at_least(out, n_tokens * hidden, "out")?;
        need(hidden > 0 && table.len().is_multiple_of(hidden), || {
            "table len not a multiple of hidden".into()
        })?;
        if n_tokens == 0 {
            return Ok(());
        }
        let (h, v) = (hidden as i32, (table.len() / hidden) as i32);
        let mut b = self.launch(&format!("embedding_gather_{}", O::NAME));
        b.arg(table).arg(ids).arg(out).arg(&h).arg(&v);
        unsafe { b.launch(grid(n_tokens, 1, 1, 256)) }?;
        Ok(())
    }

    /// Per row: residual += delta (if given); out = rmsnorm(residual) * weight.
    /// residual f32 [n_rows, hidden] (updated), weight bf16 [hidden], out bf16 or f32.
    #[allow(clippy::too_many_arguments)]
    pub fn rmsnorm_residual<O: Act>(
        &self,
        residual: &mut CudaSlice<f32>,
        delta: Option<&CudaSlice<f32>>,
        weight: &CudaSlice<u16>,
        out: &mut CudaSlice<O>,
        n_rows: usize,
        hidden: usize,
        eps: f32,
    ) -> Result<()> {
        len_at_least(residual, n_rows * hidden, "residual")?;
        if let Some(d) = delta {
            len_at_least(d, n_rows * hidden, "delta")?;
        }
        len_at_least(weight, hidden, "weight")?;
        len_at_least(out, n_rows * hidden, "out")?;
        if n_rows == 0 {
            return Ok(());
        }
        let h = hidden as i32;
        let name = if O::NAME == "bf16" {
            "rmsnorm_residual"
        } else {
            "rmsnorm_residual_f32out"
        };
        let mut b = self.launch(name);
        b.arg(residual);
        match delta {
            Some(d) => b.arg(d),
            None => b.arg(&NULL),
        };
        b.arg(weight).arg(out).arg(&h).arg(&eps);
        // few rows: one row is a latency-bound reduction, so give it more threads
        let block = if n_rows < 64 { 1024 } else { 256 };
        unsafe { b.launch(grid(n_rows, 1, 1, block)) }?;
        Ok(())
    }

    /// In place on qkv f32 [n_tokens, (n_q + 2 n_kv) * head_dim] ([q | k | v] per token):
    /// optional per-head RMSNorm of q and k (weights bf16 [head_dim]), then
    /// rotate-half RoPE with angle positions[t] * inv_freq[i], inv_freq f32 [head_dim/2];
    /// cos and sin are scaled by `mscale` (1.0 unless YaRN).
    #[allow(clippy::too_many_arguments)]
    pub fn rope_qk(
        &self,
        qkv: &mut CudaSlice<f32>,
        positions: &CudaSlice<i32>,
        inv_freq: &CudaSlice<f32>,
        q_norm: Option<&CudaSlice<u16>>,
        k_norm: Option<&CudaSlice<u16>>,
        n_tokens: usize,
        n_q: usize,
        n_kv: usize,
        head_dim: usize,
        eps: f32,
        mscale: f32,
    ) -> Result<()> {
        len_at_least(qkv, n_tokens * (n_q + 2 * n_kv) * head_dim, "qkv")?;
        len_at_least(positions, n_tokens, "positions")?;
        len_at_least(inv_freq, head_dim / 2, "inv_freq")?;
        need(head_dim.is_multiple_of(2), || {
            "head_dim must be even".into()
        })?;
        if n_tokens == 0 {
            return Ok(());
        }
        let (nq, nk, d) = (n_q as i32, n_kv as i32, head_dim as i32);
        let mut b = self.launch("rope_qk");
        b.arg(qkv).arg(positions).arg(inv_freq);
        match q_norm {
            Some(w) => b.arg(w),
            None => b.arg(&NULL),
        };
        match k_norm {
            Some(w) => b.arg(w),
            None => b.arg(&NULL),
        };
        b.arg(&nq).arg(&nk).arg(&d).arg(&eps).arg(&mscale);
        unsafe { b.launch(grid(n_tokens * (n_q + n_kv), 1, 1, 32)) }?;
        Ok(())
    }

    /// Writes each token's k and v (from qkv f32, as laid out for `rope_qk`) into the
    /// bf16 caches at (slots[t], layer, head, positions[t]).
    #[allow(clippy::too_many_arguments)]
    pub fn kv_cache_write(
        &self,
        qkv: &CudaSlice<f32>,
        k_cache: &mut CudaSlice<u16>,
        v_cache: &mut CudaSlice<u16>,
        slots: &CudaSlice<i32>,
        positions: &CudaSlice<i32>,
        n_tokens: usize,
        n_q: usize,
        layer: usize,
        kv: &KvShape,
    ) -> Result<()> {
        len_at_least(
            qkv,
            n_tokens * (n_q + 2 * kv.n_kv_heads) * kv.head_dim,
            "qkv",
        )?;
        len_at_least(k_cache, kv.len(), "k_cache")?;
        len_at_least(v_cache, kv.len(), "v_cache")?;
        len_at_least(slots, n_tokens, "slots")?;
        len_at_least(positions, n_tokens, "positions")?;
        need(layer < kv.n_layers, || "layer out of range".into())?;
        if n_tokens == 0 {
            return Ok(());
        }
        let a = [
            n_q as i32,
            kv.n_kv_heads as i32,
            kv.head_dim as i32,
            layer as i32,
            kv.n_layers as i32,
            kv.max_pos as i32,
        ];
        let mut b = self.launch("kv_cache_write");
        b.arg(qkv)
            .arg(k_cache)
            .arg(v_cache)
            .arg(slots)
            .arg(positions);
        for v in a.iter() {
            b.arg(v);
        }
        unsafe { b.launch(grid(n_tokens, kv.n_kv_heads, 1, 64)) }?;
        Ok(())
    }

    /// Decode attention: q f32 (sequence s at q[s * q_stride..], [n_q, D]; q_stride = n_q*D
    /// when packed, (n_q + 2 n_kv)*D to read it from the qkv buffer of `rope_qk`)
    /// -> out f32 [n_seq, n_q, D], over the
    /// first seq_lens[s] positions of cache slot slots[s] (the last `window` of them
    /// when window > 0), with optional per-head sinks f32 [n_q]. Split-K over
    /// `n_splits` chunks (fixed grid: graph-capturable; lengths are read on device).
    /// head_dim must be 64, 128 or 256; n_q a multiple of n_kv.
    #[allow(clippy::too_many_arguments)]
    pub fn attention_decode(
        &self,
        q: &CudaSlice<f32>,
        k_cache: &CudaSlice<u16>,
        v_cache: &CudaSlice<u16>,
        slots: &CudaSlice<i32>,
        seq_lens: &CudaSlice<i32>,
        sinks: Option<&CudaSlice<f32>>,
        out: &mut CudaSlice<f32>,
        ws: &mut AttnWorkspace,
        n_seq: usize,
        n_q: usize,
        q_stride: usize,
        layer: usize,
        kv: &KvShape,
        scale: f32,
        window: usize,
        n_splits: usize,
    ) -> Result<()> {
        self.attention_launch(q, k_cache, v_cache, slots, seq_lens, sinks, out, ws, n_seq, n_q, q_stride, layer, kv, scale, window, n_splits, None)
    }

    /// [`Self::attention_decode`] for a step of ONE row that also does `rope_qk_kv`'s work:
    /// `qkv` is the token's raw q|k|v row (`[n_q + 2 n_kv, D]`); every block normalises and
    /// rotates its query heads itself, and the block whose split holds `rope.positions[0]`
    /// writes the token's rotated k and its v to the caches (kernels/attention.cu, AttnRope).
    /// Bit-equal to `rope_qk_kv` followed by `attention_decode`.
    #[allow(clippy::too_many_arguments)]
    pub fn attention_decode_rope(
        &self,
        qkv: &CudaSlice<f32>,
        k_cache: &mut CudaSlice<u16>,
        v_cache: &mut CudaSlice<u16>,
        slots: &CudaSlice<i32>,
        seq_lens: &CudaSlice<i32>,
        sinks: Option<&CudaSlice<f32>>,
        out: &mut CudaSlice<f32>,
        ws: &mut AttnWorkspace,
        layer: usize,
        kv: &KvShape,
        n_q: usize,
        scale: f32,
        window: usize,
        n_splits: usize,
        rope: &AttnRope<'_>,
    ) -> Result<()> {
        let d = kv.head_dim;
        len_at_least(rope.positions, 1, "positions")?;
        len_at_least(rope.inv_freq, d / 2, "inv_freq")?;
        for nw in [rope.q_norm, rope.k_norm].into_iter().flatten() {
            len_at_least(nw, d, "q/k norm")?;
        }
        let stride = (n_q + 2 * kv.n_kv_heads) * d;
        len_at_least(qkv, stride, "qkv")?;
        self.attention_launch(
            qkv, k_cache, v_cache, slots, seq_lens, sinks, out, ws, 1, n_q, stride, layer, kv, scale, window, n_splits, Some(rope),
        )
    }

    #[allow(clippy::too_many_arguments)]
    fn attention_launch(
        &self,
        q: &CudaSlice<f32>,
        k_cache: &CudaSlice<u16>,
        v_cache: &CudaSlice<u16>,
        slots: &CudaSlice<i32>,
        seq_lens: &CudaSlice<i32>,
        sinks: Option<&CudaSlice<f32>>,
        out: &mut CudaSlice<f32>,
        ws: &mut AttnWorkspace,
        n_seq: usize,
        n_q: usize,
        q_stride: usize,
        layer: usize,
        kv: &KvShape,
        scale: f32,
        window: usize,
        n_splits: usize,
        rope: Option<&AttnRope<'_>>,
    ) -> Result<()> {
        let d = kv.head_dim;
        let name = match (d, rope.is_some()) {
            (64, false) => "attention_split_d64",
            (128, false) => "attention_split_d128",
            (256, false) => "attention_split_d256",
            (64, true) => "attention_rope_d64",
            (128, true) => "attention_rope_d128",
            (256, true) => "attention_rope_d256",
            _ => {
                return Err(CudaError::Shape(format!(
                    "attention: head_dim {d} not in 64/128/256"
                )))
            }
        };
        need(n_q.is_multiple_of(kv.n_kv_heads), || {
            "n_q not a multiple of n_kv".into()
        })?;
        need(
            (1..=ATTN_MAX_SPLITS).contains(&n_splits)
                && n_splits <= ws.max_splits
                && n_seq <= ws.max_seqs
                && n_q <= ws.n_q_heads
                && d <= ws.head_dim,
            || "attention workspace too small".into(),
        )?;
        need(layer < kv.n_layers, || "layer out of range".into())?;
        need(q_stride >= n_q * d, || {
            "attention: q_stride < n_q * head_dim".into()
        })?;
        if n_seq > 0 {
            len_at_least(q, (n_seq - 1) * q_stride + n_q * d, "q")?;
        }
        len_at_least(out, n_seq * n_q * d, "out")?;
        len_at_least(k_cache, kv.len(), "k_cache")?;
        len_at_least(v_cache, kv.len(), "v_cache")?;
        len_at_least(slots, n_seq, "slots")?;
        len_at_least(seq_lens, n_seq, "seq_lens")?;
        if let Some(s) = sinks {
            len_at_least(s, n_q, "sinks")?;
        }
        if n_seq == 0 {
            return Ok(());
        }
        let g = n_q / kv.n_kv_heads;
        let groups = g.div_ceil(8);
        let a = [
            n_q as i32,
            kv.n_kv_heads as i32,
            layer as i32,
            kv.n_layers as i32,
            kv.max_pos as i32,
        ];
        let (win, ns) = (window as i32, n_splits as i32);
        let mut b = self.launch(name);
        b.arg(q)
            .arg(k_cache)
            .arg(v_cache)
            .arg(slots)
            .arg(seq_lens)
            .arg(&mut ws.acc)
            .arg(&mut ws.ml);
        for v in a.iter() {
            b.arg(v);
        }
        let qs = q_stride as i64;
        b.arg(&scale).arg(&win).arg(&ns).arg(&qs);
        match sinks {
            Some(s) => b.arg(s),
            None => b.arg(&NULL),
        };
        b.arg(out).arg(&mut ws.cnt);
        if let Some(r) = rope {
            b.arg(r.positions).arg(r.inv_freq);
            for nw in [r.q_norm, r.k_norm] {
                match nw {
                    Some(w) => b.arg(w),
                    None => b.arg(&NULL),
                };
            }
            // the caches again, written at the token's position (the reads above never touch it)
            b.arg(k_cache).arg(v_cache).arg(&r.eps).arg(&r.mscale);
        }
        // 8 warps per block for D <= 128, 4 for D = 256 (shared memory)
        let block = if d == 256 { 128 } else { 256 };
        unsafe { b.launch(grid(n_splits, kv.n_kv_heads * groups, n_seq, block)) }?;
        Ok(())
    }

    /// A split count for `attention_decode` that gives the GPU ~8 blocks per SM for
    /// sequences of up to `max_len` positions (at least 32 positions per split, at most `cap`).
    pub fn attention_splits(
        &self,
        n_seq: usize,
        n_q: usize,
        n_kv: usize,
        max_len: usize,
        cap: usize,
    ) -> usize {
        let groups = (n_q / n_kv.max(1)).div_ceil(8).max(1);
        let blocks = (n_seq * n_kv * groups).max(1);
        let want = (8 * self.sm_count as usize).div_ceil(blocks);
        want.min(max_len.div_ceil(32)).clamp(1, cap.max(1))
    }

    /// y f32 [n, rows] = x [n, cols] . W^T with MXFP4 W (blocks u8 [rows, cols/32, 16],
    /// scales u8 [rows, cols/32]); n = 1..8; x bf16 or f32; cols % 32 == 0.
    #[allow(clippy::too_many_arguments)]
    pub fn mxfp4_gemv<X: Act>(
        &self,
        blocks: &CudaSlice<u8>,
        scales: &CudaSlice<u8>,
        x: &CudaSlice<X>,
        y: &mut CudaSlice<f32>,
        rows: usize,
        cols: usize,
        n: usize,
    ) -> Result<()> {
        need(cols.is_multiple_of(32), || {
            format!("mxfp4: cols {cols} not a multiple of 32")
        })?;
        need((1..=8).contains(&n), || {
            format!("mxfp4: n {n} not in 1..=8")
        })?;
        len_at_least(blocks, rows * cols / 2, "blocks")?;
        len_at_least(scales, rows * cols / 32, "scales")?;
        len_at_least(x, n * cols, "x")?;
        len_at_least(y, n * rows, "y")?;
        let a = [rows as i32, cols as i32];
        let xdiv = 1i32;
        let rows_per_block = if n >= 4 { 16 } else { 8 };
        let mut b = self.launch(&format!("mxfp4_gemv_{}x_n{n}", X::NAME));
        b.arg(blocks)
            .arg(scales)
            .arg(x)
            .arg(y)
            .arg(&a[0])
            .arg(&a[1])
            .arg(&NULL)
            .arg(&xdiv);
        unsafe { b.launch(grid(rows.div_ceil(rows_per_block), 1, 1, 256)) }?;
        Ok(())
    }

    /// MoE expert GEMV with device-side routing (no host sync): weights
    /// blocks u8 [E, rows, cols/32, 16], scales u8 [E, rows, cols/32]; for each
    /// assignment a < n_assign: y[a, :] = W[expert_ids[a]] . x[a / x_div, :].
    /// (gate/up: x per token, x_div = k; down: x per assignment, x_div = 1.)
    #[allow(clippy::too_many_arguments)]
    pub fn mxfp4_moe_gemv<X: Act>(
        &self,
        blocks: &CudaSlice<u8>,
        scales: &CudaSlice<u8>,
        x: &CudaSlice<X>,
        y: &mut CudaSlice<f32>,
        expert_ids: &CudaSlice<i32>,
        n_assign: usize,
        x_div: usize,
        rows: usize,
        cols: usize,
        n_experts: usize,
    ) -> Result<()> {
        need(cols.is_multiple_of(32) && x_div >= 1, || {
            "mxfp4_moe: cols % 32 != 0 or x_div == 0".into()
        })?;
        len_at_least(blocks, n_experts * rows * cols / 2, "blocks")?;
        len_at_least(scales, n_experts * rows * cols / 32, "scales")?;
        len_at_least(x, n_assign.div_ceil(x_div) * cols, "x")?;
        len_at_least(y, n_assign * rows, "y")?;
        len_at_least(expert_ids, n_assign, "expert_ids")?;
        if n_assign == 0 {
            return Ok(());
        }
        let a = [rows as i32, cols as i32, x_div as i32];
        let mut b = self.launch(&format!("mxfp4_gemv_{}x_n1", X::NAME));
        b.arg(blocks)
            .arg(scales)
            .arg(x)
            .arg(y)
            .arg(&a[0])
            .arg(&a[1])
            .arg(expert_ids)
            .arg(&a[2]);
        unsafe { b.launch(grid(rows.div_ceil(8), n_assign, 1, 256)) }?;
        Ok(())
    }

    /// y f32 [n, rows] = x [n, cols] . W^T, W bf16 [rows, cols], n = 1..8, x bf16 or f32.
    pub fn bf16_gemv<X: Act>(
        &self,
        w: &CudaSlice<u16>,
        x: &CudaSlice<X>,
        y: &mut CudaSlice<f32>,
        rows: usize,
        cols: usize,
        n: usize,
    ) -> Result<()> {
        self.bf16_gemv_split(w, x, y, rows, cols, n, self.gemv_split_warps(rows, cols, n))
    }

    /// [`Self::bf16_gemv`] with `ks` warps per output row (1, or 2/4/8 for n = 1 and
    /// cols % 8 == 0), whatever [`CudaContext::gemv_split_warps`] would pick (tests, timing).
    #[allow(clippy::too_many_arguments)]
    pub fn bf16_gemv_split<X: Act>(
        &self,
        w: &CudaSlice<u16>,
        x: &CudaSlice<X>,
        y: &mut CudaSlice<f32>,
        rows: usize,
        cols: usize,
        n: usize,
        ks: usize,
    ) -> Result<()> {
        need(ks == 1 || (matches!(ks, 2 | 4 | 8) && n == 1 && cols.is_multiple_of(8)), || {
            format!("bf16_gemv: {ks} warps per row (n {n}, cols {cols})")
        })?;
        need((1..=8).contains(&n), || {
            format!("bf16_gemv: n {n} not in 1..=8")
        })?;
        len_at_least(w, rows * cols, "w")?;
        len_at_least(x, n * cols, "x")?;
        len_at_least(y, n * rows, "y")?;
        let a = [rows as i32, cols as i32];
        let (name, rows_per_block) = gemv_kernel(X::NAME, n, ks, false);
        let mut b = self.launch(&name);
        b.arg(w).arg(x).arg(y).arg(&a[0]).arg(&a[1]).arg(&NULL);
        unsafe { b.launch(grid(rows.div_ceil(rows_per_block), 1, 1, 256)) }?;
        Ok(())
    }

    fn elementwise_grid(&self, total: usize) -> LaunchConfig {
        grid(
            total.div_ceil(256).clamp(1, self.sm_count as usize * 16),
            1,
            1,
            256,
        )
    }

    /// gu f32 [n, 2*inter] = [gate | up] per row -> out [n, inter] = silu(gate) * up.
    pub fn swiglu<O: Act>(
        &self,
        gu: &CudaSlice<f32>,
        out: &mut CudaSlice<O>,
        n: usize,
        inter: usize,
    ) -> Result<()> {
        len_at_least(gu, n * 2 * inter, "gu")?;
        len_at_least(out, n * inter, "out")?;
        if n * inter == 0 {
            return Ok(());
        }
        let a = [n as i32, inter as i32];
        let mut b = self.launch(&format!("swiglu_{}", O::NAME));
        b.arg(gu).arg(out).arg(&a[0]).arg(&a[1]);
        unsafe { b.launch(self.elementwise_grid(n * inter)) }?;
        Ok(())
    }

    /// gpt-oss SwiGLU: gu interleaved [g0, u0, g1, u1, ...] per row;
    /// out = (clamp(u, ±limit) + 1) * g' * sigmoid(alpha * g'), g' = min(g, limit).
    pub fn swiglu_oai<O: Act>(
        &self,
        gu: &CudaSlice<f32>,
        out: &mut CudaSlice<O>,
        n: usize,
        inter: usize,
        alpha: f32,
        limit: f32,
    ) -> Result<()> {
        len_at_least(gu, n * 2 * inter, "gu")?;
        len_at_least(out, n * inter, "out")?;
        if n * inter == 0 {
            return Ok(());
        }
        let a = [n as i32, inter as i32];
        let mut b = self.launch(&format!("swiglu_oai_{}", O::NAME));
        b.arg(gu)
            .arg(out)
            .arg(&a[0])
            .arg(&a[1])
            .arg(&alpha)
            .arg(&limit);
        unsafe { b.launch(self.elementwise_grid(n * inter)) }?;
        Ok(())
    }

    /// Per token: softmax over n_experts logits, top-k (ties: lowest index),
    /// weights renormalised over the k when `renorm`. ids i32 [n, k], weights f32 [n, k].
    #[allow(clippy::too_many_arguments)]
    pub fn moe_router_topk(
        &self,
        logits: &CudaSlice<f32>,
        ids: &mut CudaSlice<i32>,
        weights: &mut CudaSlice<f32>,
        n: usize,
        n_experts: usize,
        k: usize,
        renorm: bool,
    ) -> Result<()> {
        need(n_experts <= 512 && k >= 1 && k <= n_experts, || {
            format!("router: E {n_experts} k {k}")
        })?;
        len_at_least(logits, n * n_experts, "logits")?;
        len_at_least(ids, n * k, "ids")?;
        len_at_least(weights, n * k, "weights")?;
        if n == 0 {
            return Ok(());
        }
        let a = [n as i32, n_experts as i32, k as i32, renorm as i32];
        // a block per token ranking the logits: no dependent arg-max rounds (not in the
        // persistent step's table, so not while it is recorded)
        if self.topk_rank && n_experts <= 256 && k <= 32 && !self.is_recording() {
            let mut b = self.launch("moe_router_topk_rank");
            b.arg(logits).arg(ids).arg(weights).arg(&a[0]).arg(&a[1]).arg(&a[2]).arg(&a[3]);
            unsafe { b.launch(grid(n, 1, 1, 256)) }?;
            return Ok(());
        }
        // more than 256 experts: 16 logits per lane instead of 8
        let mut b = self.launch(if n_experts <= 256 { "moe_router_topk" } else { "moe_router_topk_512" });
        b.arg(logits)
            .arg(ids)
            .arg(weights)
            .arg(&a[0])
            .arg(&a[1])
            .arg(&a[2])
            .arg(&a[3]);
        unsafe { b.launch(grid(n.div_ceil(4), 1, 1, 128)) }?;
        Ok(())
    }

    /// out f32 [n, hidden] = sum_r weights[t, r] * y[t*k + r, :]  (y f32 [n*k, hidden]).
    pub fn moe_combine(
        &self,
        y: &CudaSlice<f32>,
        weights: &CudaSlice<f32>,
        out: &mut CudaSlice<f32>,
        n: usize,
        k: usize,
        hidden: usize,
    ) -> Result<()> {
        len_at_least(y, n * k * hidden, "y")?;
        len_at_least(weights, n * k, "weights")?;
        len_at_least(out, n * hidden, "out")?;
        if n == 0 {
            return Ok(());
        }
        let a = [k as i32, hidden as i32];
        let mut b = self.launch("moe_combine");
        b.arg(y).arg(weights).arg(out).arg(&a[0]).arg(&a[1]);
        unsafe { b.launch(grid(n, 1, 1, 256)) }?;
        Ok(())
    }

    /// out i32 [n] = argmax over each row of logits f32 [n, vocab] (ties: lowest index;
    /// NaN ignored). n <= ARGMAX_MAX_ROWS. Uses the context's scratch (two launches).
    pub fn argmax(
        &self,
        logits: &CudaSlice<f32>,
        out: &mut CudaSlice<i32>,
        n: usize,
        vocab: usize,
    ) -> Result<()> {
        len_at_least(logits, n * vocab, "logits")?;
        len_at_least(out, n, "out")?;
        need(n <= ARGMAX_MAX_ROWS, || {
            format!("argmax: n {n} > {ARGMAX_MAX_ROWS}")
        })?;
        if n == 0 {
            return Ok(());
        }
        let parts = ARGMAX_PARTS.min(vocab.div_ceil(256)).max(1);
        let (v, p) = (vocab as i32, parts as i32);
        {
            let mut b = self.launch("argmax_partial");
            b.arg(logits).arg(&self.argmax_scratch).arg(&v);
            unsafe { b.launch(grid(parts, n, 1, 256)) }?;
        }
        let mut b = self.launch("argmax_final");
        b.arg(&self.argmax_scratch).arg(out).arg(&p);
        unsafe { b.launch(grid(n, 1, 1, 32)) }?;
        Ok(())
    }

    /// `argmax` of `m` rows of `logits` f32 `[*, vocab]` (`rows` i32 `[m]`, rows below
    /// `n_rows`) over the tokens each one's bitset allows (a verdict grammar's allowed
    /// set): `mask` u32 `[m, words]`, bit `i % 32` of word `i / 32` allows token `i`,
    /// `words * 32 >= vocab`; `out` i32 `[m]`. A row with no allowed value gets id 0.
    #[allow(clippy::too_many_arguments)]
    pub fn argmax_masked(
        &self,
        logits: &CudaSlice<f32>,
        n_rows: usize,
        rows: &CudaSlice<i32>,
        mask: &CudaSlice<u32>,
        words: usize,
        out: &mut CudaSlice<i32>,
        m: usize,
        vocab: usize,
    ) -> Result<()> {
        len_at_least(logits, n_rows * vocab, "logits")?;
        len_at_least(rows, m, "rows")?;
        len_at_least(mask, m * words, "mask")?;
        len_at_least(out, m, "out")?;
        need(m <= ARGMAX_MAX_ROWS && words * 32 >= vocab, || {
            format!("argmax_masked: m {m} > {ARGMAX_MAX_ROWS} or {words} mask words < vocab {vocab} / 32")
        })?;
        if m == 0 {
            return Ok(());
        }
        let parts = ARGMAX_PARTS.min(vocab.div_ceil(256)).max(1);
        let (v, p, w) = (vocab as i32, parts as i32, words as i32);
        {
            let mut b = self.launch("argmax_partial_masked");
            b.arg(logits).arg(&self.argmax_scratch).arg(&v).arg(mask).arg(&w).arg(rows);
            unsafe { b.launch(grid(parts, m, 1, 256)) }?;
        }
        let mut b = self.launch("argmax_final");
        b.arg(&self.argmax_scratch).arg(out).arg(&p);
        unsafe { b.launch(grid(m, 1, 1, 32)) }?;
        Ok(())
    }

    /// Temperature + top-p sampling of each row of `logits` f32 [n, vocab] on the device
    /// (`kernels/sample.cu`): `temp`, `top_p`, `u` f32 [n] (u uniform in [0, 1), drawn by the
    /// host's seeded RNG), `out` i32 [n]. Rows with temp <= 0 take the argmax.
    #[allow(clippy::too_many_arguments)]
    pub fn sample_top_p(
        &self,
        logits: &CudaSlice<f32>,
        temp: &CudaSlice<f32>,
        top_p: &CudaSlice<f32>,
        u: &CudaSlice<f32>,
        out: &mut CudaSlice<i32>,
        n: usize,
        vocab: usize,
    ) -> Result<()> {
        len_at_least(logits, n * vocab, "logits")?;
        for (s, name) in [(temp, "temp"), (top_p, "top_p"), (u, "u")] {
            len_at_least(s, n, name)?;
        }
        len_at_least(out, n, "out")?;
        need(vocab > 0 && vocab < i32::MAX as usize, || format!("sample_top_p: vocab {vocab}"))?;
        if n == 0 {
            return Ok(());
        }
        let v = vocab as i32;
        let mut b = self.launch("sample_top_p");
        b.arg(logits).arg(&v).arg(temp).arg(top_p).arg(u).arg(out);
        unsafe { b.launch(grid(n, 1, 1, 1024)) }?;
        Ok(())
    }
}
