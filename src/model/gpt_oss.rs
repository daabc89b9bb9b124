//! gpt-oss experts: fused, interleaved gate/up projections with biases, in
//! float (`gate_up_proj` [E, H, 2I]) or native MXFP4 (`*_blocks`/`*_scales`).

use super::config::ModelConfig;
use super::family::{GatedMlp, Loader, Moe};
use super::weights::{Linear, Weight};
use super::ModelError;

pub fn load_experts(ld: &Loader, c: &ModelConfig, p: &str) -> Result<Moe, ModelError> {
    let Some(m) = c.moe.as_ref() else {
        return Err(ModelError::Config("gpt-oss layer without an MoE config".into()));
    };
    let (h, i, e) = (c.hidden_size, m.expert_intermediate, m.num_experts);
    let mp = format!("{p}.mlp");
    let router = ld.linear(&format!("{mp}.router"), e, h, true)?;
    let x = format!("{mp}.experts");
    let gu_bias = ld.tensor(&format!("{x}.gate_up_proj_bias"), &[e, 2 * i])?.data;
    let dn_bias = ld.tensor(&format!("{x}.down_proj_bias"), &[e, h])?.data;
    let (gates, ups, downs) = if ld.src.contains(&format!("{x}.gate_up_proj_blocks")) {
        load_mxfp4(ld, &x, e, h, i)?
    } else {
        load_float(ld, &x, e, h, i)?
    };
    let experts = gates
        .into_iter()
        .zip(ups)
        .zip(downs)
        .enumerate()
        .map(|(k, ((g, u), d))| {
            let b = &gu_bias[k * 2 * i..(k + 1) * 2 * i];
            GatedMlp {
                gate: Linear { weight: g, bias: Some(b.iter().step_by(2).copied().collect()) },
                up: Linear { weight: u, bias: Some(b.iter().skip(1).step_by(2).copied().collect()) },
                down: Linear { weight: d, bias: Some(dn_bias[k * h..(k + 1) * h].to_vec()) },
            }
        })
        .collect();
    Ok(Moe { router, experts })
}

type ExpertMats = (Vec<Weight>, Vec<Weight>, Vec<Weight>);

/// Float layout: `gate_up_proj` [E, H, 2I] is input-major with gate/up interleaved
/// along the output axis; `down_proj` [E, I, H]. We store `[out, in]` rows.
fn load_float(ld: &Loader, x: &str, e: usize, h: usize, i: usize) -> Result<ExpertMats, ModelError> {
    let gu = ld.tensor(&format!("{x}.gate_up_proj"), &[e, h, 2 * i])?.data;
    let dn = ld.tensor(&format!("{x}.down_proj"), &[e, i, h])?.data;
    let (mut gates, mut ups, mut downs) = (Vec::new(), Vec::new(), Vec::new());
    for k in 0..e {
        let src = &gu[k * h * 2 * i..(k + 1) * h * 2 * i];
        let mut g = vec![0f32; i * h];
        let mut u = vec![0f32; i * h];
        for r in 0..h {
            for j in 0..i {
                g[j * h + r] = src[r * 2 * i + 2 * j];
                u[j * h + r] = src[r * 2 * i + 2 * j + 1];
            }
        }
        let dsrc = &dn[k * i * h..(k + 1) * i * h];
        let mut d = vec![0f32; h * i];
        for r in 0..i {
            for c in 0..h {
                d[c * i + r] = dsrc[r * h + c];
            }
        }
        gates.push(Weight::f32(i, h, g));
        ups.push(Weight::f32(i, h, u));
        downs.push(Weight::f32(h, i, d));
    }
    Ok((gates, ups, downs))
}

/// Native MXFP4 layout: `gate_up_proj_blocks` [E, 2I, H/32, 16] with rows
/// interleaved gate/up; `down_proj_blocks` [E, H, I/32, 16]. Kept packed.
fn load_mxfp4(ld: &Loader, x: &str, e: usize, h: usize, i: usize) -> Result<ExpertMats, ModelError> {
    let raw = |name: &str, shape: &[usize]| -> Result<Vec<u8>, ModelError> {
        let full = format!("{x}.{name}");
        let t = ld
            .src
            .get_raw(&full)?
            .ok_or_else(|| ModelError::MissingTensor(format!("`{full}` in {}", ld.src.describe())))?;
        super::family::check_shape(&full, &t.shape, shape)?;
        if t.dtype != "U8" {
            return Err(ModelError::Format(format!("tensor `{full}` has dtype {}, expected U8", t.dtype)));
        }
        Ok(t.bytes)
    };
    if !h.is_multiple_of(32) || !i.is_multiple_of(32) {
        return Err(ModelError::Shape(format!(
            "MXFP4 experts need hidden ({h}) and expert width ({i}) divisible by 32"
        )));
    }
    let gub = raw("gate_up_proj_blocks", &[e, 2 * i, h / 32, 16])?;
    let gus = raw("gate_up_proj_scales", &[e, 2 * i, h / 32])?;
    let dnb = raw("down_proj_blocks", &[e, h, i / 32, 16])?;
    let dns = raw("down_proj_scales", &[e, h, i / 32])?;
    let (row_b, row_s) = (h / 2, h / 32);
    let (mut gates, mut ups, mut downs) = (Vec::new(), Vec::new(), Vec::new());
    for k in 0..e {
        let (mut gb, mut gs, mut ub, mut us) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for r in 0..2 * i {
            let row = k * 2 * i + r;
            let (b, s) = (&gub[row * row_b..(row + 1) * row_b], &gus[row * row_s..(row + 1) * row_s]);
            if r % 2 == 0 {
                gb.extend_from_slice(b);
                gs.extend_from_slice(s);
            } else {
                ub.extend_from_slice(b);
                us.extend_from_slice(s);
            }
        }
        let db = dnb[k * h * i / 2..(k + 1) * h * i / 2].to_vec();
        let ds = dns[k * h * i / 32..(k + 1) * h * i / 32].to_vec();
        gates.push(mxfp4(i, h, gb, gs)?);
        ups.push(mxfp4(i, h, ub, us)?);
        downs.push(mxfp4(h, i, db, ds)?);
    }
    Ok((gates, ups, downs))
}

fn mxfp4(rows: usize, cols: usize, blocks: Vec<u8>, scales: Vec<u8>) -> Result<Weight, ModelError> {
    crate::quant::Mxfp4Matrix::from_parts(rows, cols, blocks, scales)
        .map(Weight::Mxfp4)
        .map_err(|e| ModelError::Format(format!("MXFP4 experts: {e}")))
}
