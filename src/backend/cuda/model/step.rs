//! The launches of one step over rows `0..n` of the step buffers, in the forward
//! order of the module doc (`mod.rs`): embedding, every layer (pre-norm, q|k|v,
//! RoPE + KV write, attention, o-proj, post-norm, dense MLP or MoE), the final
//! norm, lm_head and the device argmax. The same sequence is launched eagerly
//! or captured into a CUDA graph (or recorded for the persistent step).

use cudarc::driver::CudaSlice;

use super::{activation, capture, dense, dptr, lc, pre_norm, shard, CudaBackend, CudaError, DMlp, Pend, Res};
use crate::backend::cuda::gemm::GEMM_MIN_ROWS;
use crate::backend::cuda::kernels::AttnRope;
use crate::backend::cuda::CudaContext;
use crate::backend::cuda::kernels_q8::{Experts, GateAct, GROUP_MAX_ASSIGN, TOPK_FUSED_MAX_EXPERTS};
use crate::model::config::{Activation, RouterKind};

impl CudaBackend {
    /// All launches of one step over rows 0..n of the step buffers (inputs already uploaded).
    pub(super) fn encode_step(&mut self, n: usize, splits: usize) -> Res<()> {
        let capt = self.capture_plan();
        self.cx.set_pdl(if n == 1 { self.pdl_rows.0 } else { self.pdl_rows.1 });
        let Self { cx, cfg: c, w, b, k_cache, v_cache, kv, scale, fused, moe_q8, group_min, comm, shard, gemm, layer_fusion, .. } = self;
        let (fused, moe_q8) = (*fused && comm.is_none(), *moe_q8);
        // Steps of one row (decode at batch 1, where launch gaps and short dependent kernels
        // set the time): the o-projection adds itself to the residual, and a MoE block is three
        // launches (router_norm_q8, moe_gate_up_q8_topk, down). At 4 rows both measured slower
        // on the H100 (the folded MoE block 2-5%: two waves of gate/up blocks each redoing the
        // top-k; the accumulating o-projection 1.6% on SmolLM2). Not in a recording for the
        // persistent step, which has no form of these kernels.
        let fold = *layer_fusion && fused && shard.is_none() && n == 1 && !cx.is_recording();
        // ... and the residual is complete after each MLP (the MoE down GEMV combines, a dense
        // down projection accumulates), so the next q|k|v GEMV normalises it itself
        let norm_fold = fold && cx.norm_fold && CudaContext::gemv_norm_fits(c.hidden_size);
        let st = cx.stream.clone();
        let reduce = |buf: &mut CudaSlice<f32>, len: usize| -> Res<()> {
            match comm.as_ref() {
                Some(cm) => cm.all_reduce_sum(&st, buf, len).map_err(shard::comm_err),
                None => Ok(()),
            }
        };
        // a rank with tp == 1 holds attention and dense MLPs whole: nothing to sum
        let tp_reduce = shard.as_ref().is_none_or(|s| s.tp_reduces());
        let k_top = c.moe.as_ref().map_or(1, |m| m.top_k);
        let mut pend = Pend::None;
        // the expert down biases of a pending MoE combine (gpt-oss), folded into the next rmsnorm
        let mut moe_bias: Option<&CudaSlice<f32>> = None;
        let (h, hd, nq, nkv, v) = (c.hidden_size, c.head_dim, c.num_heads, c.num_kv_heads, c.vocab_size);
        let qkvd = (nq + 2 * nkv) * hd;
        let eps = c.rms_norm_eps;
        match shard.as_ref() {
            Some(s) => {
                s.check_comm(comm.as_deref())?;
                s.embed(cx, &w.embed, &b.ids, &mut b.x, n, h)?;
                reduce(&mut b.x, n * h)?;
            }
            None => cx.embedding_gather::<f32>(&w.embed, &b.ids, &mut b.x, n, h)?,
        }
        for (li, l) in w.layers.iter().enumerate() {
            let qkv_norm = norm_fold && cx.qkv_norm && matches!(pend, Pend::None);
            if !qkv_norm {
                pre_norm(cx, &mut b.x, pend, &b.delta, &b.ye, &b.tw, k_top, moe_bias.map(|mb| (mb, &b.tid)), &l.ln1, &mut b.h, n, h, eps)?;
            }
            if li > 0 {
                capture::after_layer(cx, capt.as_ref(), dptr(&b.x, &st), li - 1, n, h)?;
            }
            if qkv_norm {
                cx.gemv_norm(&l.wqkv, &b.x, &l.ln1, eps, dptr(&b.qkv, &st), qkvd, h, l.bqkv.as_ref())?;
            } else {
                dense(cx, gemm, &l.wqkv, dptr(&b.h, &st), true, dptr(&b.qkv, &st), qkvd, h, n, l.bqkv.as_ref())?;
            }
            let rope_fold = fold && cx.rope_fold && matches!(hd, 64 | 128 | 256);
            if rope_fold {
                // attention_rope_d* below normalises, rotates and caches itself
            } else if fused {
                let a = [nq as i32, nkv as i32, hd as i32];
                let b2 = [li as i32, kv.n_layers as i32, kv.max_pos as i32];
                let null = 0u64;
                let mut lb = cx.launch("rope_qk_kv");
                lb.arg(&mut b.qkv).arg(&b.pos).arg(&b.slots).arg(&w.inv_freq);
                match &l.q_norm {
                    Some(q) => lb.arg(q),
                    None => lb.arg(&null),
                };
                match &l.k_norm {
                    Some(k) => lb.arg(k),
                    None => lb.arg(&null),
                };
                lb.arg(&mut *k_cache).arg(&mut *v_cache).arg(&a[0]).arg(&a[1]).arg(&a[2]).arg(&eps).arg(&w.mscale);
                lb.arg(&b2[0]).arg(&b2[1]).arg(&b2[2]);
                unsafe { lb.launch(lc(n * (nq + 2 * nkv), 1, 1, 32)) }?;
            } else {
                cx.rope_qk(&mut b.qkv, &b.pos, &w.inv_freq, l.q_norm.as_ref(), l.k_norm.as_ref(), n, nq, nkv, hd, eps, w.mscale)?;
                cx.kv_cache_write(&b.qkv, k_cache, v_cache, &b.slots, &b.pos, n, nq, li, kv)?;
            }
            if rope_fold {
                let rope = AttnRope {
                    positions: &b.pos,
                    inv_freq: &w.inv_freq,
                    q_norm: l.q_norm.as_ref(),
                    k_norm: l.k_norm.as_ref(),
                    eps,
                    mscale: w.mscale,
                };
                cx.attention_decode_rope(
                    &b.qkv, k_cache, v_cache, &b.slots, &b.lens, l.sinks.as_ref(), &mut b.attn, &mut b.ws, li, kv, nq, *scale, l.window,
                    splits, &rope,
                )?;
            } else if matches!(hd, 64 | 128 | 256) {
                cx.attention_decode(
                    &b.qkv, k_cache, v_cache, &b.slots, &b.lens, l.sinks.as_ref(), &mut b.attn, &mut b.ws, n, nq, qkvd, li,
                    kv, *scale, l.window, splits,
                )?;
            } else {
                if hd > 256 {
                    return Err(CudaError::Shape(format!("head_dim {hd} > 256")));
                }
                let a = [nq as i32, nkv as i32, hd as i32, li as i32, kv.n_layers as i32, kv.max_pos as i32];
                let (win, qs, null) = (l.window as i32, qkvd as i64, 0u64);
                let mut lb = cx.launch("attention_generic");
                lb.arg(&b.qkv).arg(&*k_cache).arg(&*v_cache).arg(&b.slots).arg(&b.lens);
                match &l.sinks {
                    Some(s) => lb.arg(s),
                    None => lb.arg(&null),
                };
                lb.arg(&mut b.attn);
                for x in a.iter() {
                    lb.arg(x);
                }
                lb.arg(&*scale).arg(&win).arg(&qs);
                unsafe { lb.launch(lc(nq, n, 1, 128)) }?;
            }
            if fold {
                cx.gemv_acc(&l.wo, dptr(&b.attn, &st), false, dptr(&b.x, &st), h, nq * hd, n, l.bo.as_ref())?;
            } else {
                dense(cx, gemm, &l.wo, dptr(&b.attn, &st), false, dptr(&b.delta, &st), h, nq * hd, n, l.bo.as_ref())?;
                if tp_reduce {
                    reduce(&mut b.delta, n * h)?;
                }
            }
            let delta = if fold { None } else { Some(&b.delta) };
            let q8_layer = moe_q8 && matches!(l.mlp, DMlp::Moe { .. });
            let moe_fold = fold
                && q8_layer
                && c.moe.as_ref().is_some_and(|m| m.num_experts <= TOPK_FUSED_MAX_EXPERTS && m.top_k <= 32);
            if moe_fold {
                // router_norm_q8 below normalises the residual itself
            } else if q8_layer {
                cx.rmsnorm_residual_q8(&mut b.x, delta, &l.ln2, &mut b.h, &mut b.hq, &mut b.hd, n, h, eps)?;
            } else {
                cx.rmsnorm_residual::<u16>(&mut b.x, delta, &l.ln2, &mut b.h, n, h, eps)?;
            }
            match &l.mlp {
                DMlp::Dense { gu, down, inter } => {
                    let inter = *inter;
                    dense(cx, gemm, gu, dptr(&b.h, &st), true, dptr(&b.gu, &st), 2 * inter, h, n, None)?;
                    activation(cx, c.activation, &b.gu, &mut b.act, n, inter)?;
                    if norm_fold {
                        cx.gemv_acc(down, dptr(&b.act, &st), true, dptr(&b.x, &st), h, inter, n, None)?;
                        pend = Pend::None;
                        continue;
                    }
                    dense(cx, gemm, down, dptr(&b.act, &st), true, dptr(&b.delta, &st), h, inter, n, None)?;
                    if tp_reduce {
                        reduce(&mut b.delta, n * h)?;
                    }
                    pend = Pend::Delta;
                }
                DMlp::Moe { router, router_bias, gu, down, inter, gu_bias, down_bias } => {
                    let m = c.moe.as_ref().expect("MoE layer without MoE config");
                    let (e, k, inter) = (m.num_experts, m.top_k, *inter);
                    let renorm = match m.router {
                        RouterKind::SoftmaxTopK { renormalize } => renormalize,
                        // softmax over the top-k logits == softmax over all, renormalised over the k
                        RouterKind::TopKSoftmax => true,
                    };
                    let act = match c.activation {
                        Activation::SiluGlu => GateAct::SiluGlu,
                        Activation::GptOssGlu { alpha, limit } => GateAct::GptOss { alpha, limit },
                    };
                    if moe_fold {
                        cx.router_norm_q8(&b.x, &l.ln2, router, router_bias.as_ref(), &mut b.rlogits, &mut b.hq, &mut b.hd, n, h, e, eps)?;
                        cx.moe_gate_up_q8_topk(
                            &gu.blocks, &gu.scales, &b.hq, &b.hd, &b.rlogits, k, renorm, &mut b.tid, &mut b.tw, gu_bias.as_ref(), act,
                            &mut b.aq, &mut b.ad, n, inter, h, e,
                        )?;
                        // under PDL the down GEMV picks its experts itself, so it can load its
                        // weights while the gate/up kernel runs (the same ids: the same ranking)
                        let experts =
                            if cx.pdl && cx.down_rank { Experts::Rank { logits: &b.rlogits, top_k: k } } else { Experts::Ids(&b.tid) };
                        if norm_fold && CudaContext::down_combine_groups(e, k).is_some() {
                            cx.mxfp4_moe_down_combine(
                                &down.blocks, &down.scales, &b.aq, &b.ad, &mut b.x, experts, &b.tw, down_bias.as_ref(), k, h, inter, e,
                            )?;
                            pend = Pend::None;
                            continue;
                        }
                        cx.mxfp4_moe_gemv_q8(&down.blocks, &down.scales, &b.aq, &b.ad, &mut b.ye, experts, n * k, 1, h, inter, e)?;
                        moe_bias = down_bias.as_ref();
                        pend = Pend::Moe;
                        continue;
                    }
                    dense(cx, gemm, router, dptr(&b.h, &st), true, dptr(&b.rlogits, &st), e, h, n, router_bias.as_ref())?;
                    cx.moe_router_topk(&b.rlogits, &mut b.tid, &mut b.tw, n, e, k, renorm)?;
                    let sharded = shard.is_some();
                    // a rank computes its own experts only (ids of other ranks' become -1)
                    let (e, tid) = match shard.as_mut() {
                        Some(s) => (s.experts_local(), s.local_ids(cx, &b.tid, n * k)?),
                        None => (e, &b.tid),
                    };
                    // many rows, no expert split: each expert read once for all its assignments
                    let group = q8_layer
                        && !sharded
                        && n >= GEMM_MIN_ROWS
                        && n * k >= e.saturating_mul(*group_min)
                        && n * k <= GROUP_MAX_ASSIGN
                        && e <= 512;
                    if q8_layer {
                        if group {
                            cx.moe_group(tid, n * k, e, &mut b.goff, &mut b.glist)?;
                        }
                        let experts = if group { Experts::Grouped { off: &b.goff, list: &b.glist } } else { Experts::Ids(tid) };
                        cx.moe_gate_up_q8(
                            &gu.blocks, &gu.scales, &b.hq, &b.hd, experts, gu_bias.as_ref(), act, &mut b.aq, &mut b.ad, n * k, k,
                            inter, h, e,
                        )?;
                        cx.mxfp4_moe_gemv_q8(&down.blocks, &down.scales, &b.aq, &b.ad, &mut b.ye, experts, n * k, 1, h, inter, e)?;
                    } else {
                        cx.mxfp4_moe_gemv::<u16>(&gu.blocks, &gu.scales, &b.h, &mut b.gu, tid, n * k, k, 2 * inter, h, e)?;
                        if let Some(bias) = gu_bias {
                            cx.add_expert_bias(&mut b.gu, bias, tid, n * k, 2 * inter)?;
                        }
                        activation(cx, c.activation, &b.gu, &mut b.act, n * k, inter)?;
                        cx.mxfp4_moe_gemv::<u16>(&down.blocks, &down.scales, &b.act, &mut b.ye, tid, n * k, 1, h, inter, e)?;
                    }
                    if fused {
                        // the next rmsnorm adds the down biases with the combine
                        moe_bias = down_bias.as_ref();
                        pend = Pend::Moe;
                    } else {
                        if let Some(bias) = down_bias {
                            cx.add_expert_bias(&mut b.ye, bias, tid, n * k, h)?;
                        }
                        cx.moe_combine(&b.ye, &b.tw, &mut b.delta, n, k, h)?;
                        reduce(&mut b.delta, n * h)?;
                        pend = Pend::Delta;
                    }
                }
            }
        }
        pre_norm(cx, &mut b.x, pend, &b.delta, &b.ye, &b.tw, k_top, moe_bias.map(|mb| (mb, &b.tid)), &w.final_norm, &mut b.hf, n, h, eps)?;
        capture::after_layer(cx, capt.as_ref(), dptr(&b.x, &st), c.num_layers - 1, n, h)?;
        let head = w.lm_head.as_ref().unwrap_or(&w.embed);
        match shard.as_mut() {
            Some(s) => s.lm_head(cx, comm.as_deref(), head, &b.hf, &mut b.logits, n, h)?,
            None => dense(cx, gemm, head, dptr(&b.hf, &st), false, dptr(&b.logits, &st), v, h, n, None)?,
        }
        cx.argmax(&b.logits, &mut b.am, n, v)?;
        Ok(())
    }
}
