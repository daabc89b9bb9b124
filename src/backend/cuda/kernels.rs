//! Typed launch wrappers, one per kernel. Shapes are checked against slice
//! lengths; launches are asynchronous on `ctx.stream`.
//! bf16 data is `CudaSlice<u16>`; `Act` picks the bf16 (u16) or f32 variant.
//! The attention path's wrappers are in `kernels_attention.rs`, the int8-activation MoE
//! ones in `kernels_q8.rs`.

use cudarc::driver::{CudaSlice, DeviceRepr, LaunchConfig};

use super::{CudaContext, CudaError, Result};
// the attention launchers live in kernels_attention.rs; their types keep this path
pub use super::kernels_attention::{AttnRope, AttnWorkspace, ATTN_MAX_SPLITS};

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
