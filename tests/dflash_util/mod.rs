//! Helpers of tests/dflash.rs: fixtures, a plain constrained decoder, a
//! random-weight DFlash drafter and a drafter that proposes the target's own
//! greedy continuation.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use kairos::backend::cpu::CpuBackend;
use kairos::backend::{Backend, BackendError, Chunk, LogitsFor, SeqId};
use kairos::engine::constrained::VerdictGrammar;
use kairos::engine::sampling::argmax;
use kairos::engine::speculative::{DraftInput, Drafter};
use kairos::model::config::ModelConfig;
use kairos::model::dflash::{default_target_layers, DFlashConfig, DFlashWeights, DraftLayer};
use kairos::model::family::{GatedMlp, ModelWeights};
use kairos::model::weights::{Linear, Weight};

pub fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(name)
}

/// SmolLM2 GGUF, as tests/reference_models.rs finds it.
pub fn smollm2_path() -> Option<PathBuf> {
    let p = std::env::var_os("KAIROS_TEST_MODEL")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("models/cache/SmolLM2-135M-Instruct.Q4_1.gguf"));
    if p.exists() {
        return Some(p);
    }
    assert!(std::env::var("CI").is_err(), "CI must fetch the test model first (scripts/fetch_model.sh)");
    eprintln!("skipping: {} not found (run scripts/fetch_model.sh)", p.display());
    None
}

/// Plain constrained greedy decoding, one forward per token: forced grammar
/// tokens are taken as they are, otherwise the argmax of the masked logits;
/// stops when the verdict is complete.
pub fn plain_constrained(backend: &mut dyn Backend, g: &VerdictGrammar, prompt: &[u32], max_new: usize) -> Vec<u32> {
    let seq = backend.new_sequence();
    let mut st = g.start();
    let mut out = Vec::new();
    let mut logits = backend.forward(&[Chunk { seq, tokens: prompt }], LogitsFor::Last).unwrap();
    loop {
        let tok = match st.forced(g) {
            Some(f) => f[0],
            None => {
                st.apply_allowed(g, &mut logits);
                argmax(&logits)
            }
        };
        st.advance(g, tok).unwrap();
        out.push(tok);
        if st.is_complete() || out.len() >= max_new {
            break;
        }
        logits = backend.forward(&[Chunk { seq, tokens: &[tok] }], LogitsFor::Last).unwrap();
    }
    backend.free_sequence(seq);
    out
}

fn random_weight(rows: usize, cols: usize, state: &mut u64) -> Linear {
    let scale = 1.0 / (cols as f32).sqrt();
    let data = (0..rows * cols)
        .map(|_| {
            *state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            ((*state >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * scale
        })
        .collect();
    Linear { weight: Weight::f32(rows, cols, data), bias: None }
}

/// An untrained drafter of the target's layer shape (for identity tests).
pub fn random_drafter(target: &ModelConfig, layers: usize, block: usize, seed: u64) -> DFlashWeights {
    let mut decoder = target.clone();
    decoder.num_layers = layers;
    decoder.qk_norm = true;
    decoder.layer_attention = decoder.layer_attention[..layers].to_vec();
    let ids = default_target_layers(target.num_layers, layers);
    let (h, i, hd) = (decoder.hidden_size, decoder.intermediate_size, decoder.head_dim);
    let mut s = seed;
    let layers_w = (0..layers)
        .map(|_| DraftLayer {
            input_norm: vec![1.0; h],
            post_attention_norm: vec![1.0; h],
            q: random_weight(decoder.q_dim(), h, &mut s),
            k: random_weight(decoder.kv_dim(), h, &mut s),
            v: random_weight(decoder.kv_dim(), h, &mut s),
            o: random_weight(h, decoder.q_dim(), &mut s),
            q_norm: vec![1.0; hd],
            k_norm: vec![1.0; hd],
            mlp: GatedMlp {
                gate: random_weight(i, h, &mut s),
                up: random_weight(i, h, &mut s),
                down: random_weight(h, i, &mut s),
            },
        })
        .collect();
    DFlashWeights {
        fc: random_weight(h, ids.len() * target.hidden_size, &mut s),
        hidden_norm: vec![1.0; h],
        layers: layers_w,
        norm: vec![1.0; h],
        config: DFlashConfig { decoder, target_layer_ids: ids, block_size: block, mask_token_id: 0 },
    }
}

/// Proposes the target's own greedy continuation, one token at a time, from a
/// second copy of the target (classic draft-model speculation; here only to
/// make drafts that the sampling test accepts often).
pub struct SelfDrafter {
    backend: CpuBackend,
    seqs: HashMap<usize, SeqId>,
    next: usize,
    layers: Vec<usize>,
}

impl SelfDrafter {
    pub fn new(target: Arc<ModelWeights>) -> Self {
        Self { backend: CpuBackend::new(target), seqs: HashMap::new(), next: 0, layers: vec![0] }
    }
}

impl Drafter for SelfDrafter {
    fn target_layers(&self) -> &[usize] {
        &self.layers
    }

    fn block_size(&self) -> usize {
        4
    }

    fn new_sequence(&mut self) -> usize {
        self.next += 1;
        let s = self.backend.new_sequence();
        self.seqs.insert(self.next, s);
        self.next
    }

    fn free_sequence(&mut self, seq: usize) {
        if let Some(s) = self.seqs.remove(&seq) {
            self.backend.free_sequence(s);
        }
    }

    fn truncate(&mut self, seq: usize, len: usize) -> Result<(), BackendError> {
        let s = self.seqs[&seq];
        self.backend.truncate(s, len)
    }

    fn draft(&mut self, inputs: &[DraftInput<'_>]) -> Result<Vec<Vec<f32>>, BackendError> {
        let vocab = self.backend.vocab_size();
        let mut all = Vec::new();
        for inp in inputs {
            let s = self.seqs[&inp.seq];
            let mut toks = inp.context_tokens.to_vec();
            toks.push(inp.first_token);
            let mut rows = Vec::new();
            let mut logits = self.backend.forward(&[Chunk { seq: s, tokens: &toks }], LogitsFor::Last)?;
            for j in 1..inp.block {
                let d = argmax(&logits);
                let mut row = vec![0f32; vocab];
                row[d as usize] = 1.0;
                rows.extend(row);
                if j + 1 < inp.block {
                    logits = self.backend.forward(&[Chunk { seq: s, tokens: &[d] }], LogitsFor::Last)?;
                }
            }
            self.backend.truncate(s, inp.position)?;
            all.push(rows);
        }
        Ok(all)
    }
}
