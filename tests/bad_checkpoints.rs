//! Bad checkpoints give one clear error line and a non-zero exit, never a panic.

use std::path::{Path, PathBuf};
use std::process::Command;

use safetensors::tensor::TensorView;
use safetensors::SafeTensors;

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(name)
}

/// Copies a fixture folder into a temp dir.
fn copy_fixture(name: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("tempdir");
    for entry in std::fs::read_dir(fixture(name)).expect("fixture") {
        let p = entry.expect("entry").path();
        std::fs::copy(&p, dir.path().join(p.file_name().expect("name"))).expect("copy");
    }
    dir
}

/// Runs `kairos generate` on `model`; returns the error line.
fn expect_clean_failure(model: &Path, what: &str) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_kairos"))
        .args(["generate", "--model"])
        .arg(model)
        .args(["--prompt", "hello", "--max-new-tokens", "2"])
        .output()
        .expect("run kairos");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{what}: expected failure, got success");
    assert_eq!(out.status.code(), Some(1), "{what}: exit code (a panic exits 101): {stderr}");
    assert!(!stderr.contains("panicked"), "{what}: panicked: {stderr}");
    let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "{what}: want exactly one error line, got: {stderr}");
    assert!(lines[0].starts_with("error: "), "{what}: {stderr}");
    lines[0].to_string()
}

/// Rewrites model.safetensors with `edit` applied to the tensor list.
fn rewrite_tensors(dir: &Path, edit: impl Fn(&mut Vec<(String, Vec<usize>, Vec<u8>)>)) {
    let path = dir.join("model.safetensors");
    let bytes = std::fs::read(&path).expect("read");
    let st = SafeTensors::deserialize(&bytes).expect("parse");
    let mut tensors: Vec<(String, Vec<usize>, Vec<u8>)> = st
        .tensors()
        .into_iter()
        .map(|(n, v)| (n, v.shape().to_vec(), v.data().to_vec()))
        .collect();
    tensors.sort_by(|a, b| a.0.cmp(&b.0));
    edit(&mut tensors);
    let views: Vec<(String, TensorView<'_>)> = tensors
        .iter()
        .map(|(n, s, d)| (n.clone(), TensorView::new(safetensors::Dtype::F32, s.clone(), d).expect("view")))
        .collect();
    let out = safetensors::serialize(views, &None).expect("serialize");
    std::fs::write(&path, out).expect("write");
}

#[test]
fn truncated_safetensors() {
    let d = copy_fixture("llama");
    let p = d.path().join("model.safetensors");
    let bytes = std::fs::read(&p).unwrap();
    std::fs::write(&p, &bytes[..bytes.len() / 2]).unwrap();
    let e = expect_clean_failure(d.path(), "truncated");
    assert!(e.contains("safetensors"), "{e}");
}

#[test]
fn header_length_that_lies() {
    let d = copy_fixture("llama");
    let p = d.path().join("model.safetensors");
    let mut bytes = std::fs::read(&p).unwrap();
    bytes[..8].copy_from_slice(&(1u64 << 40).to_le_bytes());
    std::fs::write(&p, &bytes).unwrap();
    expect_clean_failure(d.path(), "lying header length");
}

#[test]
fn missing_tensor() {
    let d = copy_fixture("llama");
    rewrite_tensors(d.path(), |t| t.retain(|(n, _, _)| n != "model.layers.1.self_attn.k_proj.weight"));
    let e = expect_clean_failure(d.path(), "missing tensor");
    assert!(e.contains("model.layers.1.self_attn.k_proj.weight"), "{e}");
}

#[test]
fn wrong_shape() {
    let d = copy_fixture("llama");
    rewrite_tensors(d.path(), |t| {
        for (n, s, _) in t.iter_mut() {
            if n == "model.layers.0.mlp.up_proj.weight" {
                s.reverse();
            }
        }
    });
    let e = expect_clean_failure(d.path(), "wrong shape");
    assert!(e.contains("up_proj") && e.contains("shape"), "{e}");
}

#[test]
fn unknown_architecture() {
    let d = copy_fixture("llama");
    let p = d.path().join("config.json");
    let text = std::fs::read_to_string(&p).unwrap().replace("\"llama\"", "\"mamba_turbo\"");
    std::fs::write(&p, text).unwrap();
    let e = expect_clean_failure(d.path(), "unknown architecture");
    assert!(e.contains("mamba_turbo"), "{e}");
}

fn gguf_string(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&(s.len() as u64).to_le_bytes());
    out.extend_from_slice(s.as_bytes());
}

#[test]
fn gguf_with_unknown_tensor_type() {
    let mut b = b"GGUF".to_vec();
    b.extend_from_slice(&3u32.to_le_bytes());
    b.extend_from_slice(&1u64.to_le_bytes()); // tensors
    b.extend_from_slice(&1u64.to_le_bytes()); // metadata
    gguf_string(&mut b, "general.architecture");
    b.extend_from_slice(&8u32.to_le_bytes()); // string
    gguf_string(&mut b, "llama");
    gguf_string(&mut b, "token_embd.weight");
    b.extend_from_slice(&2u32.to_le_bytes());
    b.extend_from_slice(&32u64.to_le_bytes());
    b.extend_from_slice(&4u64.to_le_bytes());
    b.extend_from_slice(&99u32.to_le_bytes()); // no such ggml type
    b.extend_from_slice(&0u64.to_le_bytes());
    while !b.len().is_multiple_of(32) {
        b.push(0);
    }
    b.extend_from_slice(&[0u8; 512]);
    let d = tempfile::tempdir().unwrap();
    let p = d.path().join("bad.gguf");
    std::fs::write(&p, b).unwrap();
    let e = expect_clean_failure(&p, "unknown GGUF tensor type");
    assert!(e.contains("99"), "{e}");
}

#[test]
fn truncated_gguf() {
    let Some(src) = std::env::var_os("KAIROS_TEST_MODEL").map(PathBuf::from).filter(|p| p.exists()) else {
        eprintln!("skipping: KAIROS_TEST_MODEL not set");
        return;
    };
    let bytes = std::fs::read(src).unwrap();
    let d = tempfile::tempdir().unwrap();
    let p = d.path().join("cut.gguf");
    std::fs::write(&p, &bytes[..bytes.len() / 3]).unwrap();
    expect_clean_failure(&p, "truncated GGUF");
}

#[test]
fn missing_model_path() {
    expect_clean_failure(Path::new("/nonexistent/model"), "missing path");
}
