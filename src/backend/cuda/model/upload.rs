//! Weight upload: a loaded model (or random weights of a config, for benchmarks)
//! becomes device buffers: bf16 dense weights with q|k|v and gate|up fused, MXFP4 experts.

use super::*;

pub(super) fn bf16_bits(v: &[f32]) -> Vec<u16> {
    v.iter().map(|x| bf16::from_f32(*x).to_bits()).collect()
}

pub(super) fn weight_bits(w: &Weight) -> Vec<u16> {
    match w {
        Weight::Bf16 { data, .. } => data.iter().map(|v| v.to_bits()).collect(),
        other => bf16_bits(&other.to_f32()),
    }
}

fn weight_mx(w: &Weight) -> std::result::Result<Mxfp4Matrix, BackendError> {
    match w {
        Weight::Mxfp4(m) => Ok(m.clone()),
        other => Mxfp4Matrix::quantize(&other.to_f32(), other.rows(), other.cols(), ScaleRule::Spec)
            .map_err(|e| BackendError::Unsupported(format!("cannot quantize an expert to MXFP4: {e}"))),
    }
}

/// Rows of `a` then rows of `b`, or interleaved a0 b0 a1 b1 … (gpt-oss gate/up).
pub(super) fn fuse_rows<T: Copy>(a: &[T], b: &[T], row_len: usize, interleave: bool) -> Vec<T> {
    if !interleave {
        return [a, b].concat();
    }
    let mut out = Vec::with_capacity(a.len() + b.len());
    for (ra, rb) in a.chunks(row_len).zip(b.chunks(row_len)) {
        out.extend_from_slice(ra);
        out.extend_from_slice(rb);
    }
    out
}

fn no_bias(l: &Linear, what: &str) -> std::result::Result<(), BackendError> {
    if l.bias.is_some() {
        return Err(BackendError::Unsupported(format!("the CUDA backend has no {what} biases yet")));
    }
    Ok(())
}

impl CudaBackend {
    /// Uploads `weights` to GPU `opts.ordinal` (experts quantized to MXFP4 unless already).
    pub fn new(weights: &ModelWeights, opts: CudaBackendOptions) -> std::result::Result<Self, BackendError> {
        if !crate::backend::cuda::device_available() {
            return Err(BackendError::Device("no CUDA driver or device found".into()));
        }
        let cx = CudaContext::with_pdl_flavor(opts.ordinal, pdl_flavor(&weights.config)).map_err(dev)?;
        let c = weights.config.clone();
        let interleave = matches!(c.activation, Activation::GptOssGlu { .. });
        let mut bytes = 0usize;
        let mut mx_bytes = 0usize;
        let mut up16 = |v: Vec<u16>| -> std::result::Result<CudaSlice<u16>, BackendError> {
            bytes += v.len() * 2;
            cx.up(&v).map_err(dev)
        };
        let embed = up16(weight_bits(&weights.embed))?;
        let lm_head = match &weights.lm_head {
            Some(w) => Some(up16(weight_bits(w))?),
            None => None,
        };
        let final_norm = up16(bf16_bits(&weights.final_norm))?;
        let mut layers = Vec::with_capacity(weights.layers.len());
        for (li, l) in weights.layers.iter().enumerate() {
            let a = &l.attention;
            let wqkv = up16([weight_bits(&a.q.weight), weight_bits(&a.k.weight), weight_bits(&a.v.weight)].concat())?;
            let wo = up16(weight_bits(&a.o.weight))?;
            let bqkv = if a.q.bias.is_some() || a.k.bias.is_some() || a.v.bias.is_some() {
                let mut v = Vec::new();
                for lin in [&a.q, &a.k, &a.v] {
                    match &lin.bias {
                        Some(b) => v.extend_from_slice(b),
                        None => v.extend(std::iter::repeat_n(0f32, lin.out_features())),
                    }
                }
                Some(cx.up(&v).map_err(dev)?)
            } else {
                None
            };
            let bo = match &a.o.bias {
                Some(b) => Some(cx.up(b).map_err(dev)?),
                None => None,
            };
            let q_norm = match &a.q_norm {
                Some(v) => Some(up16(bf16_bits(v))?),
                None => None,
            };
            let k_norm = match &a.k_norm {
                Some(v) => Some(up16(bf16_bits(v))?),
                None => None,
            };
            let sinks = match &a.sinks {
                Some(v) => Some(cx.up(v).map_err(dev)?),
                None => None,
            };
            let window = match a.kind {
                AttentionKind::Full => 0,
                AttentionKind::Sliding(w) => w,
            };
            let mlp = match &l.mlp {
                Mlp::Dense(m) => {
                    for lin in [&m.gate, &m.up, &m.down] {
                        no_bias(lin, "MLP")?;
                    }
                    let h = m.gate.in_features();
                    let gu = up16(fuse_rows(&weight_bits(&m.gate.weight), &weight_bits(&m.up.weight), h, interleave))?;
                    let down = up16(weight_bits(&m.down.weight))?;
                    DMlp::Dense { gu, down, inter: m.gate.out_features() }
                }
                Mlp::Moe(block) => {
                    let moe = c.moe.as_ref().ok_or_else(|| {
                        BackendError::Unsupported(format!("layer {li} has experts but the config no MoE section"))
                    })?;
                    if moe.num_experts > 512 {
                        return Err(BackendError::Unsupported("more than 512 experts".into()));
                    }
                    let inter = moe.expert_intermediate;
                    let (mut gb, mut gs, mut db, mut ds) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
                    let any_gu_bias = block.experts.iter().any(|e| e.gate.bias.is_some() || e.up.bias.is_some());
                    let any_down_bias = block.experts.iter().any(|e| e.down.bias.is_some());
                    let (mut gub, mut dnb) = (Vec::new(), Vec::new());
                    let bias_or_zero = |l: &Linear| l.bias.clone().unwrap_or_else(|| vec![0f32; l.out_features()]);
                    for ex in &block.experts {
                        let GatedMlp { gate, up, down } = ex;
                        if any_gu_bias {
                            gub.extend(fuse_rows(&bias_or_zero(gate), &bias_or_zero(up), 1, interleave));
                        }
                        if any_down_bias {
                            dnb.extend(bias_or_zero(down));
                        }
                        let (g, u, d) = (weight_mx(&gate.weight)?, weight_mx(&up.weight)?, weight_mx(&down.weight)?);
                        gb.extend(fuse_rows(&g.blocks, &u.blocks, g.cols / 2, interleave));
                        gs.extend(fuse_rows(&g.scales, &u.scales, g.cols / 32, interleave));
                        db.extend_from_slice(&d.blocks);
                        ds.extend_from_slice(&d.scales);
                    }
                    mx_bytes += gb.len() + gs.len() + db.len() + ds.len();
                    let router = up16(weight_bits(&block.router.weight))?;
                    let router_bias = match &block.router.bias {
                        Some(b) => Some(cx.up(b).map_err(dev)?),
                        None => None,
                    };
                    let gu = Mx { blocks: cx.up(&gb).map_err(dev)?, scales: cx.up(&gs).map_err(dev)? };
                    let down = Mx { blocks: cx.up(&db).map_err(dev)?, scales: cx.up(&ds).map_err(dev)? };
                    let gu_bias = if any_gu_bias { Some(cx.up(&gub).map_err(dev)?) } else { None };
                    let down_bias = if any_down_bias { Some(cx.up(&dnb).map_err(dev)?) } else { None };
                    DMlp::Moe { router, router_bias, gu, down, inter, gu_bias, down_bias }
                }
            };
            layers.push(DLayer {
                ln1: up16(bf16_bits(&l.input_norm))?,
                ln2: up16(bf16_bits(&l.post_attention_norm))?,
                wqkv,
                bqkv,
                wo,
                bo,
                q_norm,
                k_norm,
                sinks,
                window,
                mlp,
            });
        }
        let (inv_freq, mscale) = rope_tables(&cx, &c)?;
        let w = DWeights { embed, lm_head, final_norm, layers, inv_freq, mscale, bytes: bytes + mx_bytes };
        Self::assemble(cx, c, w, opts)
    }

    /// Random weights of `config`'s shapes, made on the device (benchmarks):
    /// bf16 dense weights, MXFP4 experts, norms = 1.
    pub fn random(config: &ModelConfig, opts: CudaBackendOptions, seed: u64) -> std::result::Result<Self, BackendError> {
        if !crate::backend::cuda::device_available() {
            return Err(BackendError::Device("no CUDA driver or device found".into()));
        }
        let cx = CudaContext::with_pdl_flavor(opts.ordinal, pdl_flavor(config)).map_err(dev)?;
        let c = config.clone();
        let (h, hd, nq, nkv) = (c.hidden_size, c.head_dim, c.num_heads, c.num_kv_heads);
        let mut s = seed;
        let mut bytes = 0usize;
        let mut mx_bytes = 0usize;
        let mut next = || {
            s = s.wrapping_add(1);
            s
        };
        // small f32 vectors (biases, sinks) drawn on the host: they are tiny
        let mut host_rng = seed ^ 0x9e37_79b9_7f4a_7c15;
        let mut f32s = |n: usize, scale: f32| -> std::result::Result<CudaSlice<f32>, BackendError> {
            let v: Vec<f32> = (0..n)
                .map(|_| {
                    host_rng ^= host_rng << 13;
                    host_rng ^= host_rng >> 7;
                    host_rng ^= host_rng << 17;
                    ((host_rng >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * scale
                })
                .collect();
            cx.up(&v).map_err(dev)
        };
        let mut bf = |n: usize, scale: f32, offset: f32, seed: u64| {
            bytes += 2 * n;
            cx.fill_bf16(n, seed, scale, offset).map_err(dev)
        };
        let embed = bf(c.vocab_size * h, 0.02, 0.0, next())?;
        let lm_head = if c.tie_word_embeddings { None } else { Some(bf(c.vocab_size * h, 0.02, 0.0, next())?) };
        let final_norm = bf(h, 0.0, 1.0, next())?;
        let mut layers = Vec::new();
        for li in 0..c.num_layers {
            let qkv_rows = (nq + 2 * nkv) * hd;
            let q_norm = if c.qk_norm { Some(bf(hd, 0.0, 1.0, next())?) } else { None };
            let k_norm = if c.qk_norm { Some(bf(hd, 0.0, 1.0, next())?) } else { None };
            let mlp = match (&c.moe, c.is_moe_layer(li)) {
                (Some(m), true) => {
                    let (e, i) = (m.num_experts, m.expert_intermediate);
                    let mx = |rows: usize, cols: usize, s1: u64, s2: u64| -> std::result::Result<Mx, BackendError> {
                        Ok(Mx {
                            blocks: cx.fill_u8(e * rows * cols / 2, s1, 0, 256).map_err(dev)?,
                            // E8M0 120..123: 2^-7 .. 2^-4 per block, E2M1 values up to 6
                            scales: cx.fill_u8(e * rows * cols / 32, s2, 120, 4).map_err(dev)?,
                        })
                    };
                    let gu = mx(2 * i, h, next(), next())?;
                    let down = mx(h, i, next(), next())?;
                    mx_bytes += e * 3 * i * h * 17 / 32;
                    DMlp::Moe {
                        router: bf(e * h, 0.02, 0.0, next())?,
                        router_bias: if m.router_bias { Some(f32s(e, 0.1)?) } else { None },
                        gu,
                        down,
                        inter: i,
                        gu_bias: if m.expert_bias { Some(f32s(e * 2 * i, 0.1)?) } else { None },
                        down_bias: if m.expert_bias { Some(f32s(e * h, 0.1)?) } else { None },
                    }
                }
                _ => {
                    let i = c.intermediate_size;
                    DMlp::Dense { gu: bf(2 * i * h, 0.02, 0.0, next())?, down: bf(h * i, 0.02, 0.0, next())?, inter: i }
                }
            };
            layers.push(DLayer {
                ln1: bf(h, 0.0, 1.0, next())?,
                ln2: bf(h, 0.0, 1.0, next())?,
                wqkv: bf(qkv_rows * h, 0.02, 0.0, next())?,
                bqkv: if c.qkv_bias { Some(f32s(qkv_rows, 0.1)?) } else { None },
                wo: bf(h * nq * hd, 0.02, 0.0, next())?,
                bo: if c.o_bias { Some(f32s(h, 0.1)?) } else { None },
                q_norm,
                k_norm,
                sinks: if c.attention_sinks { Some(f32s(nq, 1.0)?) } else { None },
                window: match c.layer_attention.get(li) {
                    Some(AttentionKind::Sliding(w)) => *w,
                    _ => 0,
                },
                mlp,
            });
        }
        let (inv_freq, mscale) = rope_tables(&cx, &c)?;
        let w = DWeights { embed, lm_head, final_norm, layers, inv_freq, mscale, bytes: bytes + mx_bytes };
        Self::assemble(cx, c, w, opts)
    }
}

/// RoPE inverse frequencies on the device and the cos/sin scale (YaRN's mscale, else 1).
pub(super) fn rope_tables(cx: &CudaContext, c: &ModelConfig) -> std::result::Result<(CudaSlice<f32>, f32), BackendError> {
    let rope = RopeTable::new(&c.rope, c.head_dim);
    let inv: Vec<f32> = rope.inv_freq.iter().map(|&f| f as f32).collect();
    Ok((cx.up(&inv).map_err(dev)?, rope.scale as f32))
}
