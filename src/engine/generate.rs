//! One completion: prefill the prompt, then decode token by token until an
//! eos id or the token limit.

use std::time::Instant;

use super::sampling::{Sampler, SamplingParams};
use crate::backend::{Backend, BackendError, Chunk, LogitsFor};

#[derive(Debug, Clone)]
pub struct GenerateRequest {
    pub prompt_ids: Vec<u32>,
    pub max_new_tokens: usize,
    pub sampling: SamplingParams,
    pub eos_ids: Vec<u32>,
    /// Record the K highest logits of every generated step (0 = off).
    pub top_logits: usize,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct GenerateOutput {
    pub output_ids: Vec<u32>,
    /// Per generated step, the K highest `[id, logit]`.
    pub top_logits: Vec<Vec<(u32, f32)>>,
    pub prefill_s: f64,
    pub decode_s: f64,
    /// Generated tokens per second of decode (the first token is the prefill's).
    pub tokens_per_s: f64,
}

pub fn top_logits(logits: &[f32], k: usize) -> Vec<(u32, f32)> {
    let mut idx: Vec<u32> = (0..logits.len() as u32).collect();
    let k = k.min(idx.len());
    if k == 0 {
        return Vec::new();
    }
    idx.select_nth_unstable_by(k - 1, |&a, &b| logits[b as usize].total_cmp(&logits[a as usize]));
    idx.truncate(k);
    idx.sort_by(|&a, &b| logits[b as usize].total_cmp(&logits[a as usize]).then(a.cmp(&b)));
    idx.into_iter().map(|i| (i, logits[i as usize])).collect()
}

pub fn generate(backend: &mut dyn Backend, req: &GenerateRequest) -> Result<GenerateOutput, BackendError> {
    let seq = backend.new_sequence();
    let result = generate_in(backend, seq, req);
    backend.free_sequence(seq);
    result
}

fn generate_in(
    backend: &mut dyn Backend,
    seq: crate::backend::SeqId,
    req: &GenerateRequest,
) -> Result<GenerateOutput, BackendError> {
    let mut sampler = Sampler::new(req.sampling);
    let mut out = Vec::new();
    let mut tops = Vec::new();
    let t0 = Instant::now();
    let logits = backend.forward(&[Chunk { seq, tokens: &req.prompt_ids }], LogitsFor::Last)?;
    let prefill_s = t0.elapsed().as_secs_f64();
    let t1 = Instant::now();
    // Decode steps choose their token on the device when the backend can (only ids
    // cross; the device draws in vocabulary order, the host sampler in probability
    // order: same distribution, other ids for the same seed) and nothing asks for
    // logits or top-k.
    let p = req.sampling;
    let mut on_device = req.top_logits == 0 && p.top_k == 0;
    if req.max_new_tokens > 0 {
        if req.top_logits > 0 {
            tops.push(top_logits(&logits, req.top_logits));
        }
        let mut id = sampler.sample(&logits);
        loop {
            out.push(id);
            if req.eos_ids.contains(&id) || out.len() >= req.max_new_tokens {
                break;
            }
            let chunk = [Chunk { seq, tokens: &[id] }];
            if on_device {
                let u = if p.temperature > 0.0 { sampler.uniform() } else { 0.0 };
                match backend.decode_choose(&chunk, &[(p.temperature.max(0.0), p.top_p, u)])? {
                    Some(ids) => {
                        id = ids.first().copied().ok_or_else(|| BackendError::Device("decode_choose returned no id".into()))?;
                        continue;
                    }
                    None => on_device = false,
                }
            }
            let logits = backend.forward(&chunk, LogitsFor::Last)?;
            if req.top_logits > 0 {
                tops.push(top_logits(&logits, req.top_logits));
            }
            id = sampler.sample(&logits);
        }
    }
    let decode_s = t1.elapsed().as_secs_f64();
    let steps = out.len().saturating_sub(1);
    let tokens_per_s = if decode_s > 0.0 && steps > 0 { steps as f64 / decode_s } else { 0.0 };
    Ok(GenerateOutput { output_ids: out, top_logits: tops, prefill_s, decode_s, tokens_per_s })
}
