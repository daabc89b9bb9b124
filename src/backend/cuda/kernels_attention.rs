//! Launch wrappers of the attention path: RoPE and the KV-cache write, split-K decode
//! attention (with the RoPE fold of one-row steps) and its workspace. Shapes are checked
//! against slice lengths; launches are asynchronous on `ctx.stream`.

use cudarc::driver::CudaSlice;

use super::kernels::{grid, len_at_least, need, KvShape, NULL};
use super::{CudaContext, Result};

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
impl CudaContext {
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
        need(matches!(d, 64 | 128 | 256), || format!("attention: head_dim {d} not in 64/128/256"))?;
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
        // the tile kernel takes the split kernel's arguments up to the counters, then none
        let tile = rope.is_none() && self.attention_tile_applies(d, g, n_seq);
        let hpb = if tile { g } else { self.attention_heads_per_block(g, n_seq) };
        let groups = g.div_ceil(hpb);
        let name = if tile {
            format!("attention_tile_d{d}")
        } else {
            format!(
                "attention_{}_d{d}{}",
                if rope.is_some() { "rope" } else { "split" },
                entry_suffix(hpb, self.is_recording())
            )
        };
        let a = [
            n_q as i32,
            kv.n_kv_heads as i32,
            layer as i32,
            kv.n_layers as i32,
            kv.max_pos as i32,
        ];
        let (win, ns) = (window as i32, n_splits as i32);
        let mut b = self.launch(&name);
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
        if tile {
            let mut cfg = grid(n_splits, kv.n_kv_heads, n_seq, 256);
            cfg.shared_mem_bytes = tile_smem(d) as u32;
            unsafe { b.launch(cfg) }?;
            return Ok(());
        }
        let hpb_arg = hpb as i32;
        b.arg(&hpb_arg);
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
        unsafe { b.launch(grid(n_splits, kv.n_kv_heads * groups, n_seq, attention_block_threads(d))) }?;
        Ok(())
    }

    /// Whether a decode attention of head_dim `d` with `g` query heads per kv head over `rows`
    /// rows runs the tile kernel (`attention_tile_rows`; never while a step is recorded: the
    /// persistent step has only the split kernel).
    pub(crate) fn attention_tile_applies(&self, d: usize, g: usize, rows: usize) -> bool {
        tile_applies(self.attention_tile_rows, self.is_recording(), d, g, rows)
    }

    /// Query heads per attention block (kernels/attention.cu's hpb, 1–8) for `g` query heads
    /// per kv head and steps of `rows` rows: one for steps of up to
    /// `CudaContext::attention_one_head_rows` rows, else 8; 8 while a step is recorded for the
    /// persistent kernel (its attention is built for 8). `CudaContext::attention_heads` overrides.
    pub(crate) fn attention_heads_per_block(&self, g: usize, rows: usize) -> usize {
        heads_per_block(g, rows, self.is_recording(), self.attention_heads, self.attention_one_head_rows)
    }

    /// A split count for `attention_decode` (head_dim `d`) that gives the GPU
    /// ~`attention_blocks_per_sm` blocks per SM (0: one wave of the attention entry the step
    /// runs, with the RoPE fold's where `rope` may take it) for sequences of up to `max_len`
    /// positions (at least 32 positions per split, at most `cap`).
    #[allow(clippy::too_many_arguments)]
    pub fn attention_splits(
        &self,
        n_seq: usize,
        n_q: usize,
        n_kv: usize,
        d: usize,
        rope: bool,
        max_len: usize,
        cap: usize,
    ) -> usize {
        let g = n_q / n_kv.max(1);
        if !rope && self.attention_tile_applies(d, g, n_seq) {
            return tile_splits(self.sm_count as usize * self.attention_tile_bps, n_seq * n_kv, max_len, cap);
        }
        let hpb = self.attention_heads_per_block(g, n_seq);
        let groups = g.div_ceil(hpb).max(1);
        let block = attention_block_threads(d);
        let fits = |kind: &str| self.blocks_per_sm(&format!("attention_{kind}_d{d}{}", entry_suffix(hpb, self.is_recording())), block);
        let rope_fits = rope.then(|| fits("rope"));
        let per_sm = match (self.attention_blocks_per_sm, rope_fits) {
            (0, Some(r)) => fits("split").min(r),
            (0, None) => fits("split"),
            (b, _) => b,
        };
        let blocks = n_seq * n_kv * groups;
        let splits = splits_for(self.sm_count as usize * per_sm, blocks, max_len, cap);
        // The RoPE fold's kernel holds more registers (Qwen3-30B-A3B b1: 99, 2 blocks per SM): a
        // grid past one wave of it runs a second wave at long contexts (9 splits x 32 heads =
        // 288 blocks on 264 places: +7.5% per step at ctx 2048, H100, session 17).
        rope_fits.map_or(splits, |r| splits.min(one_wave_splits(self.sm_count as usize * r, blocks)))
    }
}

/// `CudaContext::attention_heads_per_block` without the context: `recording` (the persistent
/// step's attention holds 8 heads) and `forced` (`KAIROS_CUDA_ATT_HEADS`) first, else one head
/// for steps of up to `one_head_rows` rows and 8 above; never more than the `g` heads a kv head has.
fn heads_per_block(g: usize, rows: usize, recording: bool, forced: Option<usize>, one_head_rows: usize) -> usize {
    let hpb = if recording { 8 } else { forced.unwrap_or(if rows <= one_head_rows { 1 } else { 8 }) };
    hpb.clamp(1, g.max(1))
}

/// Positions per shared-memory sub-tile of `attention_tile_*` (kernels/attention.cu's TILE_P).
const TILE_P: usize = 64;
/// Dynamic shared memory of `attention_tile_d{d}`: two buffers of TILE_P positions' K and V rows.
const fn tile_smem(d: usize) -> usize {
    2 * TILE_P * d * 2 * 2
}
/// The tile entries and the dynamic shared memory each opts into.
pub(super) const TILE_SMEM: &[(&str, usize)] = &[("attention_tile_d64", tile_smem(64)), ("attention_tile_d128", tile_smem(128))];

/// [`CudaContext::attention_tile_applies`] without the context.
fn tile_applies(min_rows: usize, recording: bool, d: usize, g: usize, rows: usize) -> bool {
    min_rows > 0 && rows >= min_rows && !recording && matches!(d, 64 | 128) && (1..=8).contains(&g)
}

/// Splits of the tile kernel: ~`target` blocks over `blocks` (kv head, row) pairs, and enough
/// that no split of `max_len` positions has more than 4 sub-tiles to walk one after the other.
fn tile_splits(target: usize, blocks: usize, max_len: usize, cap: usize) -> usize {
    splits_for(target, blocks, max_len, cap).max(max_len.div_ceil(4 * TILE_P).min(cap.max(1)))
}

/// Most splits of `blocks` (kv head, group, row) triples whose grid fits `wave` resident blocks (at least 1).
fn one_wave_splits(wave: usize, blocks: usize) -> usize {
    (wave / blocks.max(1)).max(1)
}

/// Threads per decode-attention block: 8 warps for head_dim <= 128, 4 for 256 (shared memory;
/// kernels/attention.cu's NW).
fn attention_block_threads(d: usize) -> u32 {
    if d == 256 { 128 } else { 256 }
}

/// The attention entry whose register arrays fit `hpb` heads and no more (kernels/attention.cu,
/// HG): fewer heads per block need fewer registers, and a block's registers bound its speed.
/// A step recorded for the persistent kernel takes the plain entry whatever `hpb` (a model
/// with 2 query heads per kv head clamps 8 to 2): the persistent step has only that one.
fn entry_suffix(hpb: usize, recording: bool) -> &'static str {
    if recording {
        return "";
    }
    match hpb {
        1 => "_h1",
        2 => "_h2",
        3 | 4 => "_h4",
        _ => "",
    }
}

/// Splits for ~`target` blocks in all over `blocks` (kv head, head group, row) blocks, at least
/// 32 positions each for `max_len`, at most `cap`.
fn splits_for(target: usize, blocks: usize, max_len: usize, cap: usize) -> usize {
    let want = target.div_ceil(blocks.max(1));
    want.min(max_len.div_ceil(32)).clamp(1, cap.max(1))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_head_per_block_for_short_steps() {
        // Qwen3-30B-A3B (32 / 4 heads: g 8), gpt-oss (64 / 8: g 8), SmolLM2 (9 / 3: g 3)
        for g in [8, 3] {
            for rows in 1..=4 {
                assert_eq!(heads_per_block(g, rows, false, None, 4), 1);
                // the rule off
                assert_eq!(heads_per_block(g, rows, false, None, 0), g.min(8));
            }
            assert_eq!(heads_per_block(g, 5, false, None, 4), g.min(8));
            assert_eq!(heads_per_block(g, 64, false, None, 4), g.min(8));
            // the persistent step records the 8-head kernel, whatever the rows or the override
            assert_eq!(heads_per_block(g, 1, true, Some(1), 4), g.min(8));
        }
        assert_eq!(heads_per_block(8, 1, false, Some(4), 4), 4);
        assert_eq!(heads_per_block(8, 64, false, Some(2), 0), 2);
        // more heads than a kv head has: one group holding all of them
        assert_eq!(heads_per_block(1, 64, false, None, 4), 1);
        assert_eq!(heads_per_block(3, 1, false, Some(8), 4), 3);
        assert_eq!(heads_per_block(0, 1, false, None, 4), 1);
    }

    #[test]
    fn entry_holds_the_heads_of_a_block() {
        // the smallest register arrays (HG) that hold hpb heads
        let hg = |s: &str| match s {
            "_h1" => 1,
            "_h2" => 2,
            "_h4" => 4,
            _ => 8,
        };
        for hpb in 1..=8 {
            let h = hg(entry_suffix(hpb, false));
            assert!(h >= hpb && h < 2 * hpb, "hpb {hpb} -> HG {h}");
            assert_eq!(entry_suffix(hpb, true), "", "a recorded step runs the persistent kernel's one attention");
        }
    }

    #[test]
    fn tile_kernel_rule_and_splits() {
        // rows, head_dim 64 / 128, at most 8 query heads per kv head, never while recording
        assert!(tile_applies(16, false, 128, 8, 16) && tile_applies(16, false, 64, 3, 64));
        assert!(!tile_applies(16, false, 128, 8, 4), "fewer rows than the threshold");
        assert!(!tile_applies(0, false, 128, 8, 64), "0: off");
        assert!(!tile_applies(1, true, 128, 8, 1), "recording");
        assert!(!tile_applies(1, false, 256, 8, 1) && !tile_applies(1, false, 128, 16, 1));
        // Qwen3 b1 ctx 2048: one wave of 4 kv heads; SmolLM2 b16: 48 pairs, yet <= 256 positions a split
        assert_eq!(tile_splits(132, 4, 2048, 256), 33);
        assert_eq!(tile_splits(132, 48, 2048, 256), 8);
        assert_eq!(tile_splits(132, 48, 128, 256), 3);
        assert_eq!(tile_splits(132, 4, 100_000, 64), 64, "capped");
    }

    #[test]
    fn rope_fold_grid_fits_one_wave() {
        // Qwen3 b1: 32 one-head blocks a split, 2 blocks per SM on 132 SMs -> 8 splits (256 blocks)
        assert_eq!(one_wave_splits(264, 32), 8);
        assert_eq!(splits_for(264, 32, 8192, 256).min(one_wave_splits(264, 32)), 8);
        // SmolLM2 b1: 9 heads, 4 blocks per SM -> 58 allowed, the target's 30 stays
        assert_eq!(splits_for(264, 9, 8192, 256).min(one_wave_splits(528, 9)), 30);
        assert_eq!(one_wave_splits(100, 1000), 1);
        assert_eq!(one_wave_splits(0, 0), 1);
    }

    #[test]
    fn split_count_follows_blocks_and_context() {
        // H100 (132 SMs) at 8 blocks per SM, Qwen3 b1: 4 kv heads x 8 groups of one head -> 33 splits at long contexts
        assert_eq!(splits_for(8 * 132, 4 * 8, 8192, 256), 33);
        // the default target, 2 blocks per SM: 9 splits of ~910 positions
        assert_eq!(splits_for(2 * 132, 4 * 8, 8192, 256), 9);
        // the old 8-head blocks: 4 blocks -> 264, capped at 256
        assert_eq!(splits_for(8 * 132, 4, 8192, 256), 256);
        // short contexts: never under 32 positions per split
        assert_eq!(splits_for(8 * 132, 4 * 8, 128, 256), 4);
        assert_eq!(splits_for(8 * 132, 4 * 8, 1, 256), 1);
        // many rows: one split
        assert_eq!(splits_for(8 * 132, 64 * 4, 2048, 256), 5);
        assert_eq!(splits_for(8 * 132, 10_000, 2048, 256), 1);
        assert_eq!(splits_for(8 * 132, 0, 2048, 0), 1);
    }
}
