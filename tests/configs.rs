//! Every shipped config loads; a bad config gives one error naming the field.

use std::path::Path;

use kairos::pipeline::config::PipelineConfig;

#[test]
fn shipped_configs_load() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut n = 0;
    for dir in [root.join("configs"), root.join("bench/configs")] {
        for e in std::fs::read_dir(dir).unwrap() {
            let p = e.unwrap().path();
            if p.extension().is_some_and(|x| x == "toml") {
                PipelineConfig::load(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
                n += 1;
            }
        }
    }
    assert!(n >= 6);
}

fn error_for(edit: impl Fn(String) -> String) -> String {
    let src = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("configs/demo.toml")).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("bad.toml");
    std::fs::write(&p, edit(src)).unwrap();
    PipelineConfig::load(&p).unwrap_err().to_string()
}

#[test]
fn bad_configs_name_the_field() {
    let e = error_for(|s| s.replace("latency_ms = 5000", "latency_ms = \"fast\""));
    assert!(e.contains("latency_ms") || e.contains("integer"), "{e}");
    let e = error_for(|s| s.replace("max_batch = 8", "max_batchh = 8"));
    assert!(e.contains("max_batchh"), "{e}");
    let e = error_for(|s| s.replace("kind = \"fraud\"", "kind = \"weather\""));
    assert!(e.contains("weather"), "{e}");
    let e = error_for(|s| s.replace("{ name = \"decision\", kind = \"enum\", values = [\"allow\", \"review\", \"block\"] },", ""));
    assert!(e.contains("verdict"), "{e}");
    let e = error_for(|s| s.replace("reason = \"fallback: no model verdict within the latency budget\"", "why = \"x\""));
    assert!(e.contains("reason"), "{e}");
}
