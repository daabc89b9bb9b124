//! Launch wrappers for the int8-activation MoE path (`kernels/moe_q8.cu`):
//! the post-attention rmsnorm also writes its output as int8 per 32-block, the
//! expert gate/up GEMV applies the gated activation and writes it as int8, and
//! the down GEMV reads that. Activations as int8 blocks `xq` i8 `[rows, cols]`
//! with scales `xd` f32 `[rows, cols / 32]`.

use cudarc::driver::CudaSlice;

use super::kernels::{grid, len_at_least, need, NULL};
use super::{CudaContext, Result};

/// Most assignments `moe_group` lists (GROUP_MAX_ASSIGN in kernels/moe_q8.cu).
pub const GROUP_MAX_ASSIGN: usize = 4096;
/// Most rows `router_norm_q8` takes (RN_MAX_N in kernels/moe_q8.cu).
pub const ROUTER_NORM_MAX_ROWS: usize = 8;
/// Most experts `moe_gate_up_q8_topk` picks from (8 logits per lane of one warp).
pub const TOPK_FUSED_MAX_EXPERTS: usize = 256;

/// Which gated activation the fused gate/up kernel applies.
#[derive(Clone, Copy, Debug)]
pub enum GateAct {
    /// silu(gate) * up with gate rows `[0, I)` and up rows `[I, 2I)` of each expert.
    SiluGlu,
    /// gpt-oss: gate/up rows interleaved, clamped at `limit`, `(u + 1) * g * sigmoid(alpha g)`.
    GptOss { alpha: f32, limit: f32 },
}

impl CudaContext {
    /// `rmsnorm_residual` (bf16 out) that also writes `out` as int8 blocks.
    #[allow(clippy::too_many_arguments)]
    pub fn rmsnorm_residual_q8(
        &self,
        residual: &mut CudaSlice<f32>,
        delta: Option<&CudaSlice<f32>>,
        weight: &CudaSlice<u16>,
        out: &mut CudaSlice<u16>,
        xq: &mut CudaSlice<i8>,
        xd: &mut CudaSlice<f32>,
        n_rows: usize,
        hidden: usize,
        eps: f32,
    ) -> Result<()> {
        need(hidden.is_multiple_of(32), || format!("rmsnorm_q8: hidden {hidden} % 32 != 0"))?;
        len_at_least(residual, n_rows * hidden, "residual")?;
        if let Some(d) = delta {
            len_at_least(d, n_rows * hidden, "delta")?;
        }
        len_at_least(weight, hidden, "weight")?;
        len_at_least(out, n_rows * hidden, "out")?;
        len_at_least(xq, n_rows * hidden, "xq")?;
        len_at_least(xd, n_rows * hidden / 32, "xd")?;
        if n_rows == 0 {
            return Ok(());
        }
        let h = hidden as i32;
        let mut b = self.launch("rmsnorm_residual_q8");
        b.arg(residual);
        match delta {
            Some(d) => b.arg(d),
            None => b.arg(&NULL),
        };
        b.arg(weight).arg(out).arg(&h).arg(&eps).arg(xq).arg(xd);
        let block = if n_rows < 64 { 1024 } else { 256 };
        unsafe { b.launch(grid(n_rows, 1, 1, block)) }?;
        Ok(())
    }

    /// MoE expert GEMV over int8 activations: for each assignment a < n_assign,
    /// y[a, :] = W[ids[a]] . x[a / x_div, :], weights MXFP4 `[E, rows, cols/32(, 16)]`.
    /// `Experts::Grouped` reads each expert once for all of its assignments (same results).
    #[allow(clippy::too_many_arguments)]
    pub fn mxfp4_moe_gemv_q8(
        &self,
        blocks: &CudaSlice<u8>,
        scales: &CudaSlice<u8>,
        xq: &CudaSlice<i8>,
        xd: &CudaSlice<f32>,
        y: &mut CudaSlice<f32>,
        experts: Experts<'_>,
        n_assign: usize,
        x_div: usize,
        rows: usize,
        cols: usize,
        n_experts: usize,
    ) -> Result<()> {
        need(cols.is_multiple_of(32) && x_div >= 1, || "mxfp4_q8: cols % 32 != 0 or x_div == 0".into())?;
        len_at_least(blocks, n_experts * rows * cols / 2, "blocks")?;
        len_at_least(scales, n_experts * rows * cols / 32, "scales")?;
        len_at_least(xq, n_assign.div_ceil(x_div) * cols, "xq")?;
        len_at_least(xd, n_assign.div_ceil(x_div) * cols / 32, "xd")?;
        len_at_least(y, n_assign * rows, "y")?;
        experts.check(n_assign, n_experts)?;
        if n_assign == 0 {
            return Ok(());
        }
        // a warp per row when a row has enough 32-blocks to keep 32 lanes busy
        let (lanes, rows_per_block) = if cols >= 1536 { ("l32", 8) } else { ("l8", 32) };
        let a = [rows as i32, cols as i32, x_div as i32];
        let mut b = self.launch(&format!("mxfp4_q8_{}{lanes}", experts.kernel_infix()));
        b.arg(blocks).arg(scales).arg(xq).arg(xd).arg(y).arg(&a[0]).arg(&a[1]);
        experts.args(&mut b, n_experts);
        b.arg(&a[2]);
        unsafe { b.launch(grid(rows.div_ceil(rows_per_block), experts.grid_y(n_assign, n_experts), 1, 256)) }?;
        Ok(())
    }

    /// Groups of `top_k` warps per block that [`Self::mxfp4_moe_down_combine`] takes for these
    /// shapes (a block holds all picks of its rows), or None where it cannot run: more than 8
    /// picks, or more experts than threads to rank them.
    pub fn down_combine_groups(n_experts: usize, top_k: usize) -> Option<usize> {
        let g = (8 / top_k.max(1)).max(1);
        (top_k <= 8 && n_experts <= 32 * top_k * g && n_experts <= TOPK_FUSED_MAX_EXPERTS).then_some(g)
    }

    /// The expert down GEMV of a step of ONE row with the MoE combine: residual f32 `[rows]`
    /// += sum over picks r (in order) of `wk[r]` * (W[e_r] . act_r + `ebias`[e_r]), as the
    /// combine + rmsnorm launch (`rmsnorm_moe_*`) adds it, so the next norm can be folded into
    /// the following GEMV. Experts as `Experts::Rank` (ranked from the router logits, before
    /// the PDL wait) or `Experts::Ids` (`[top_k]`). Weights MXFP4 `[E, rows, cols/32(, 16)]`;
    /// activations `xq`/`xd` `[top_k, cols]` int8 blocks.
    #[allow(clippy::too_many_arguments)]
    pub fn mxfp4_moe_down_combine(
        &self,
        blocks: &CudaSlice<u8>,
        scales: &CudaSlice<u8>,
        xq: &CudaSlice<i8>,
        xd: &CudaSlice<f32>,
        residual: &mut CudaSlice<f32>,
        experts: Experts<'_>,
        wk: &CudaSlice<f32>,
        ebias: Option<&CudaSlice<f32>>,
        top_k: usize,
        rows: usize,
        cols: usize,
        n_experts: usize,
    ) -> Result<()> {
        let g = Self::down_combine_groups(n_experts, top_k)
            .ok_or_else(|| super::CudaError::Shape(format!("down + combine: E {n_experts}, k {top_k}")))?;
        need(cols.is_multiple_of(32), || "down + combine: cols % 32 != 0".into())?;
        len_at_least(blocks, n_experts * rows * cols / 2, "blocks")?;
        len_at_least(scales, n_experts * rows * cols / 32, "scales")?;
        len_at_least(xq, top_k * cols, "xq")?;
        len_at_least(xd, top_k * cols / 32, "xd")?;
        len_at_least(residual, rows, "residual")?;
        len_at_least(wk, top_k, "weights")?;
        if let Some(b) = ebias {
            len_at_least(b, n_experts * rows, "expert biases")?;
        }
        experts.check(top_k, n_experts)?;
        let (logits, ids) = match experts {
            Experts::Rank { logits, top_k: kk } if kk == top_k => (Some(logits), None),
            Experts::Ids(ids) => (None, Some(ids)),
            _ => return Err(super::CudaError::Shape("down + combine: experts by rank (of top_k) or ids only".into())),
        };
        let (lanes, rows_per_warp) = if cols >= 1536 { ("l32", 1) } else { ("l8", 4) };
        let a = [rows as i32, cols as i32, n_experts as i32, top_k as i32];
        let mut b = self.launch(&format!("mxfp4_q8_combine_{lanes}"));
        b.arg(blocks).arg(scales).arg(xq).arg(xd).arg(residual).arg(&a[0]).arg(&a[1]);
        match logits {
            Some(l) => b.arg(l),
            None => b.arg(&NULL),
        };
        match ids {
            Some(i) => b.arg(i),
            None => b.arg(&NULL),
        };
        b.arg(wk);
        match ebias {
            Some(e) => b.arg(e),
            None => b.arg(&NULL),
        };
        b.arg(&a[2]).arg(&a[3]);
        unsafe { b.launch(grid(rows.div_ceil(g * rows_per_warp), 1, 1, (32 * top_k * g) as u32)) }?;
        Ok(())
    }

    /// Expert gate/up GEMV + gated activation, written as int8 blocks:
    /// weights MXFP4 `[E, 2*inter, cols/32(, 16)]` (rows fused as `act` says),
    /// `bias` f32 `[E, 2*inter]`; out `aq` i8 `[n_assign, inter]`, `ad` f32 `[n_assign, inter/32]`.
    /// `Experts::Grouped` reads each expert once for all of its assignments (same results).
    #[allow(clippy::too_many_arguments)]
    pub fn moe_gate_up_q8(
        &self,
        blocks: &CudaSlice<u8>,
        scales: &CudaSlice<u8>,
        xq: &CudaSlice<i8>,
        xd: &CudaSlice<f32>,
        experts: Experts<'_>,
        bias: Option<&CudaSlice<f32>>,
        act: GateAct,
        aq: &mut CudaSlice<i8>,
        ad: &mut CudaSlice<f32>,
        n_assign: usize,
        x_div: usize,
        inter: usize,
        cols: usize,
        n_experts: usize,
    ) -> Result<()> {
        need(cols.is_multiple_of(32) && inter.is_multiple_of(32) && x_div >= 1, || {
            format!("moe_gate_up_q8: cols {cols} and inter {inter} must be multiples of 32")
        })?;
        len_at_least(blocks, n_experts * 2 * inter * cols / 2, "blocks")?;
        len_at_least(scales, n_experts * 2 * inter * cols / 32, "scales")?;
        len_at_least(xq, n_assign.div_ceil(x_div) * cols, "xq")?;
        len_at_least(xd, n_assign.div_ceil(x_div) * cols / 32, "xd")?;
        if let Some(bb) = bias {
            len_at_least(bb, n_experts * 2 * inter, "bias")?;
        }
        len_at_least(aq, n_assign * inter, "aq")?;
        len_at_least(ad, n_assign * inter / 32, "ad")?;
        experts.check(n_assign, n_experts)?;
        if n_assign == 0 {
            return Ok(());
        }
        let (kind, alpha, limit) = match act {
            GateAct::SiluGlu => (0i32, 0f32, 0f32),
            GateAct::GptOss { alpha, limit } => (1, alpha, limit),
        };
        let a = [x_div as i32, inter as i32, cols as i32];
        let name = match experts {
            Experts::Ids(_) => "moe_gate_up_q8",
            Experts::Grouped { .. } => "moe_gate_up_q8_grouped",
            Experts::Rank { .. } => return need(false, || "moe_gate_up_q8: ranking experts is moe_gate_up_q8_topk".into()),
        };
        let mut b = self.launch(name);
        b.arg(blocks).arg(scales).arg(xq).arg(xd);
        experts.args(&mut b, n_experts);
        b.arg(&a[0]);
        match bias {
            Some(bb) => b.arg(bb),
            None => b.arg(&NULL),
        };
        b.arg(&a[1]).arg(&a[2]).arg(&kind).arg(&alpha).arg(&limit).arg(aq).arg(ad);
        unsafe { b.launch(grid(inter / 32, experts.grid_y(n_assign, n_experts), 1, 256)) }?;
        Ok(())
    }

    /// The post-attention norm folded into the router GEMV, for steps of up to 8 rows:
    /// per row t, `h = rmsnorm(residual[t]) * weight`, `logits[t] = bf16(h) . router^T
    /// (+ bias)` and `h` as int8 blocks (`xq`, `xd`) for the expert gate/up GEMV; the
    /// residual is not changed. Every block normalises the rows itself (no separate
    /// rmsnorm launch). Router bf16 `[E, hidden]`.
    #[allow(clippy::too_many_arguments)]
    pub fn router_norm_q8(
        &self,
        residual: &CudaSlice<f32>,
        weight: &CudaSlice<u16>,
        router: &CudaSlice<u16>,
        bias: Option<&CudaSlice<f32>>,
        logits: &mut CudaSlice<f32>,
        xq: &mut CudaSlice<i8>,
        xd: &mut CudaSlice<f32>,
        n_rows: usize,
        hidden: usize,
        n_experts: usize,
        eps: f32,
    ) -> Result<()> {
        need(hidden.is_multiple_of(32) && (1..=ROUTER_NORM_MAX_ROWS).contains(&n_rows) && n_experts >= 1, || {
            format!("router_norm_q8: hidden {hidden} (% 32), {n_rows} rows (1..=8), {n_experts} experts")
        })?;
        len_at_least(residual, n_rows * hidden, "residual")?;
        len_at_least(weight, hidden, "weight")?;
        len_at_least(router, n_experts * hidden, "router")?;
        if let Some(b) = bias {
            len_at_least(b, n_experts, "bias")?;
        }
        len_at_least(logits, n_rows * n_experts, "logits")?;
        len_at_least(xq, n_rows * hidden, "xq")?;
        len_at_least(xd, n_rows * hidden / 32, "xd")?;
        let a = [n_rows as i32, hidden as i32, n_experts as i32];
        let mut b = self.launch("router_norm_q8");
        b.arg(residual).arg(weight).arg(router);
        match bias {
            Some(bb) => b.arg(bb),
            None => b.arg(&NULL),
        };
        b.arg(logits).arg(xq).arg(xd).arg(&a[0]).arg(&a[1]).arg(&a[2]).arg(&eps);
        unsafe { b.launch(grid(n_experts, 1, 1, 256)) }?;
        Ok(())
    }

    /// `moe_gate_up_q8` over the `n_rows * k` assignments of `n_rows` tokens, with the router
    /// top-k (as `moe_router_topk`) redone by every block from `logits` f32 `[n_rows, E]`;
    /// the choice is also stored in `ids` / `weights` `[n_rows * k]` for the down GEMV and the
    /// combine. E <= 256, k <= 32.
    #[allow(clippy::too_many_arguments)]
    pub fn moe_gate_up_q8_topk(
        &self,
        blocks: &CudaSlice<u8>,
        scales: &CudaSlice<u8>,
        xq: &CudaSlice<i8>,
        xd: &CudaSlice<f32>,
        logits: &CudaSlice<f32>,
        top_k: usize,
        renorm: bool,
        ids: &mut CudaSlice<i32>,
        weights: &mut CudaSlice<f32>,
        bias: Option<&CudaSlice<f32>>,
        act: GateAct,
        aq: &mut CudaSlice<i8>,
        ad: &mut CudaSlice<f32>,
        n_rows: usize,
        inter: usize,
        cols: usize,
        n_experts: usize,
    ) -> Result<()> {
        need(cols.is_multiple_of(32) && inter.is_multiple_of(32), || {
            format!("moe_gate_up_q8_topk: cols {cols} and inter {inter} must be multiples of 32")
        })?;
        need(n_experts <= TOPK_FUSED_MAX_EXPERTS && (1..=32).contains(&top_k) && top_k <= n_experts, || {
            format!("moe_gate_up_q8_topk: E {n_experts} (<= 256), k {top_k} (1..=32)")
        })?;
        let n_assign = n_rows * top_k;
        len_at_least(blocks, n_experts * 2 * inter * cols / 2, "blocks")?;
        len_at_least(scales, n_experts * 2 * inter * cols / 32, "scales")?;
        len_at_least(xq, n_rows * cols, "xq")?;
        len_at_least(xd, n_rows * cols / 32, "xd")?;
        len_at_least(logits, n_rows * n_experts, "logits")?;
        len_at_least(ids, n_assign, "ids")?;
        len_at_least(weights, n_assign, "weights")?;
        if let Some(bb) = bias {
            len_at_least(bb, n_experts * 2 * inter, "bias")?;
        }
        len_at_least(aq, n_assign * inter, "aq")?;
        len_at_least(ad, n_assign * inter / 32, "ad")?;
        if n_assign == 0 {
            return Ok(());
        }
        let (kind, alpha, limit) = match act {
            GateAct::SiluGlu => (0i32, 0f32, 0f32),
            GateAct::GptOss { alpha, limit } => (1, alpha, limit),
        };
        let a = [n_experts as i32, top_k as i32, renorm as i32, inter as i32, cols as i32];
        let mut b = self.launch("moe_gate_up_q8_topk");
        b.arg(blocks).arg(scales).arg(xq).arg(xd).arg(logits).arg(&a[0]).arg(&a[1]).arg(&a[2]).arg(ids).arg(weights);
        match bias {
            Some(bb) => b.arg(bb),
            None => b.arg(&NULL),
        };
        b.arg(&a[3]).arg(&a[4]).arg(&kind).arg(&alpha).arg(&limit).arg(aq).arg(ad);
        // 16 warps per block while the grid fits in one wave at 2 blocks per SM (Qwen3-30B-A3B
        // b1: 192 blocks, -2.2% per step on the H100), else 8 (gpt-oss-20b b1: 360 blocks,
        // 16 warps made it 0.6% slower)
        let blocks = inter / 32 * n_assign;
        let threads = if blocks <= 2 * self.sm_count as usize { 512 } else { 256 };
        unsafe { b.launch(grid(inter / 32, n_assign, 1, threads)) }?;
        Ok(())
    }

    /// Lists the assignments of every expert: `ids` i32 `[n_assign]` (< 0: skipped) ->
    /// `off` i32 `[E + 1]`, `list` i32 `[n_assign]` (expert e's assignments are
    /// `list[off[e]..off[e + 1]]`, increasing) for the grouped expert GEMVs.
    pub fn moe_group(&self, ids: &CudaSlice<i32>, n_assign: usize, n_experts: usize, off: &mut CudaSlice<i32>, list: &mut CudaSlice<i32>) -> Result<()> {
        need(n_experts <= 512 && n_assign <= GROUP_MAX_ASSIGN, || format!("moe_group: E {n_experts}, {n_assign} assignments"))?;
        len_at_least(ids, n_assign, "ids")?;
        len_at_least(off, n_experts + 1, "off")?;
        len_at_least(list, n_assign, "list")?;
        let a = [n_assign as i32, n_experts as i32];
        let mut b = self.launch("moe_group");
        b.arg(ids).arg(&a[0]).arg(&a[1]).arg(off).arg(list);
        unsafe { b.launch(grid(1, 1, 1, 1024)) }?;
        Ok(())
    }
}

/// Which expert each assignment of an expert GEMV uses.
#[derive(Clone, Copy)]
pub enum Experts<'a> {
    /// `ids` i32 `[n_assign]`: a block per (row tile, assignment), each reading its expert
    /// (< 0: another rank's expert, zeros written).
    Ids(&'a CudaSlice<i32>),
    /// Each expert's assignments as `moe_group` lists them: a block per (row tile, expert)
    /// reading the expert once for all of them (assignments of no expert are not written).
    Grouped { off: &'a CudaSlice<i32>, list: &'a CudaSlice<i32> },
    /// Each block ranks the router `logits` f32 `[n_assign / top_k, E]` itself and takes pick
    /// `a % top_k` of token `a / top_k`: the ids `moe_gate_up_q8_topk` stores, without
    /// reading them. The expert down GEMV of the folded MoE block ranks so under PDL: it
    /// picks its expert and loads its first weights while the gate/up kernel runs.
    /// E <= 256, top_k <= 32.
    Rank { logits: &'a CudaSlice<f32>, top_k: usize },
}

impl Experts<'_> {
    fn check(&self, n_assign: usize, n_experts: usize) -> Result<()> {
        match self {
            Experts::Ids(ids) => len_at_least(ids, n_assign, "ids"),
            Experts::Grouped { off, list } => {
                len_at_least(off, n_experts + 1, "off")?;
                len_at_least(list, n_assign, "list")
            }
            Experts::Rank { logits, top_k } => {
                need(n_experts <= TOPK_FUSED_MAX_EXPERTS && (1..=32).contains(top_k) && *top_k <= n_experts, || {
                    format!("expert ranking: E {n_experts} (<= {TOPK_FUSED_MAX_EXPERTS}), k {top_k} (1..=32)")
                })?;
                len_at_least(logits, n_assign.div_ceil(*top_k) * n_experts, "logits")
            }
        }
    }
    fn kernel_infix(&self) -> &'static str {
        match self {
            Experts::Ids(_) => "",
            Experts::Grouped { .. } => "grouped_",
            Experts::Rank { .. } => "rank_",
        }
    }
    fn args(&self, b: &mut super::launch::Launch<'_>, n_experts: usize) {
        match self {
            Experts::Ids(ids) => {
                b.arg(*ids);
            }
            Experts::Grouped { off, list } => {
                b.arg(*off).arg(*list);
            }
            Experts::Rank { logits, top_k } => {
                b.arg(*logits).arg(&(n_experts as i32)).arg(&(*top_k as i32));
            }
        }
    }
    fn grid_y(&self, n_assign: usize, n_experts: usize) -> usize {
        match self {
            Experts::Ids(_) | Experts::Rank { .. } => n_assign,
            Experts::Grouped { .. } => n_experts,
        }
    }
}


