//! `kairos quantize` on gpt-oss writes MXFP4 experts in gpt-oss's native layout
//! (`mlp.experts.{gate_up,down}_proj_{blocks,scales}`, the config section gpt-oss ships)
//! and the folder loads back to identical weights and logits. The layout is checked
//! against the `gpt_oss_mxfp4` fixture (written for, and verified with, transformers'
//! MXFP4 loader by tools/make_fixtures.py): re-saving it reproduces its expert tensors
//! byte for byte.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use kairos::backend::cpu::CpuBackend;
use kairos::backend::{Backend, Chunk, LogitsFor};
use kairos::model::family::Mlp;
use kairos::model::load::read_hf_config;
use kairos::model::quantize::save::save_model;
use kairos::model::quantize::{apply_quant, QuantSpec};
use kairos::model::weights::{Precision, Weight};
use kairos::model::{load_model, LoadedModel};
use safetensors::SafeTensors;

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(name)
}

fn tmp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("kairos-gptoss-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}

fn quantize_and_save(src: &Path, spec: &str, out: &Path) -> LoadedModel {
    let spec: QuantSpec = spec.parse().expect("spec");
    let mut m = load_model(src).expect("load source");
    apply_quant(&mut m.weights, &spec).expect("quantize");
    let cfg = read_hf_config(src).expect("config").0;
    save_model(out, &m, src, &cfg, &spec).expect("save");
    m
}

fn logits(m: LoadedModel, prompt: &[u32]) -> Vec<f32> {
    let mut b = CpuBackend::new(Arc::new(m.weights));
    let seq = b.new_sequence();
    b.forward(&[Chunk { seq, tokens: prompt }], LogitsFor::All).expect("forward")
}

fn expert_bytes(m: &LoadedModel) -> Vec<(Vec<u8>, Vec<u8>)> {
    let mut out = Vec::new();
    for l in &m.weights.layers {
        let Mlp::Moe(moe) = &l.mlp else { panic!("gpt-oss layers are MoE") };
        for ex in &moe.experts {
            for lin in [&ex.gate, &ex.up, &ex.down] {
                let Weight::Mxfp4(q) = &lin.weight else { panic!("expert not MXFP4: {:?}", lin.weight.precision()) };
                out.push((q.blocks.clone(), q.scales.clone()));
            }
        }
    }
    out
}

#[test]
fn gpt_oss_quantized_folder_uses_native_mxfp4_layout_and_loads_back_identically() {
    let out = tmp("float");
    let mem = quantize_and_save(&fixture("gpt_oss"), "experts=mxfp4", &out);
    let cfg: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(out.join("config.json")).expect("config")).expect("json");
    assert_eq!(cfg["quantization_config"]["quant_method"], "mxfp4", "transformers' MXFP4 loader keys on this");
    let bytes = std::fs::read(out.join("model.safetensors")).expect("safetensors");
    let st = SafeTensors::deserialize(&bytes).expect("parse");
    let t = st.tensor("model.layers.0.mlp.experts.gate_up_proj_blocks").expect("native blocks tensor");
    let c = &mem.weights.config;
    let (e, i, h) = (4, c.moe.as_ref().expect("moe").expert_intermediate, c.hidden_size);
    assert_eq!(t.shape(), &[e, 2 * i, h / 32, 16]);
    assert!(st.names().iter().all(|n| !n.contains("experts.0.")), "no per-expert tensors");

    let back = load_model(&out).expect("load quantized folder");
    assert_eq!(expert_bytes(&back), expert_bytes(&mem), "experts reload packed and bit-identical");
    let prompt: Vec<u32> = (1..24).map(|k| (k * 37) % 500).collect();
    let (a, b) = (logits(mem, &prompt), logits(back, &prompt));
    assert_eq!(a, b, "logits of the reloaded folder equal quantize-at-load");
    let _ = std::fs::remove_dir_all(&out);
}

#[test]
fn resaving_the_native_mxfp4_fixture_reproduces_its_expert_tensors() {
    let src = fixture("gpt_oss_mxfp4");
    let out = tmp("native");
    let m = quantize_and_save(&src, "experts=mxfp4", &out);
    assert!(m.weights.linears().iter().any(|(_, l)| l.weight.precision() == Precision::Mxfp4));
    let (a, b) = (std::fs::read(src.join("model.safetensors")).expect("src"), std::fs::read(out.join("model.safetensors")).expect("out"));
    let (sa, sb) = (SafeTensors::deserialize(&a).expect("src"), SafeTensors::deserialize(&b).expect("out"));
    let mut checked = 0;
    for name in sa.names() {
        if name.contains(".mlp.experts.") {
            let (x, y) = (sa.tensor(name).expect("src tensor"), sb.tensor(name).unwrap_or_else(|_| panic!("`{name}` missing")));
            assert_eq!((x.dtype(), x.shape()), (y.dtype(), y.shape()), "{name}");
            assert_eq!(x.data(), y.data(), "{name} bytes");
            checked += 1;
        }
    }
    assert_eq!(checked, 3 * 6, "blocks, scales and biases of gate_up/down in 3 layers");
    let _ = std::fs::remove_dir_all(&out);
}
