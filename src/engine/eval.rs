//! Perplexity with a sliding window (the Hugging Face "strided" evaluation), and
//! the same windows through a reference model for top-1 agreement and KL.
//!
//! Windows of `window` tokens start every `stride` tokens; each window scores only
//! the tokens not scored by the previous one (at most `stride`, the whole first
//! window), each conditioned on up to `window - 1` preceding tokens. The first token
//! of the text is never scored (it has no context).

use crate::backend::{first_argmax, Backend, BackendError, Chunk, LogitsFor};

#[derive(Debug, Clone, Copy)]
pub struct EvalOptions {
    pub window: usize,
    pub stride: usize,
}

#[derive(Debug, thiserror::Error)]
pub enum EvalError {
    #[error("window must be >= 2 and stride in 1..=window (got window {window}, stride {stride})")]
    Options { window: usize, stride: usize },
    #[error("the text has {0} tokens; at least 2 are needed to score one")]
    TooShort(usize),
    #[error("the two models have different vocabularies ({0} vs {1})")]
    Vocab(usize, usize),
    #[error(transparent)]
    Backend(#[from] BackendError),
}

/// Statistics over the scored tokens.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct EvalResult {
    pub tokens_scored: usize,
    pub windows: usize,
    /// Mean negative log-likelihood, nats per token.
    pub nll: f64,
    pub perplexity: f64,
    /// With a reference model: its mean NLL and perplexity.
    pub nll_ref: Option<f64>,
    pub perplexity_ref: Option<f64>,
    /// Fraction of scored positions where both models' argmax agree.
    pub top1_agreement: Option<f64>,
    /// Mean KL(ref ‖ model), nats per token.
    pub kl: Option<f64>,
}

/// `(start, end, first_target)` of every window: tokens `[start, end)` are fed, and
/// targets at positions `first_target..end` are scored.
pub fn windows(n: usize, opts: EvalOptions) -> Vec<(usize, usize, usize)> {
    let mut out = Vec::new();
    let (mut prev_end, mut begin) = (0usize, 0usize);
    while begin < n {
        // With stride == window a window would start exactly at the first unscored
        // token, which then has no context: start one token earlier.
        let start = begin.min(prev_end.saturating_sub(1));
        let end = (start + opts.window).min(n);
        let first = prev_end.max(start + 1);
        if first < end {
            out.push((start, end, first));
        }
        prev_end = end;
        if end == n {
            break;
        }
        begin += opts.stride;
    }
    out
}

/// log-softmax of one row (f64 accumulation).
fn log_softmax(row: &[f32], out: &mut Vec<f64>) {
    let max = row.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v)) as f64;
    let lse = max + row.iter().map(|&v| (v as f64 - max).exp()).sum::<f64>().ln();
    out.clear();
    out.extend(row.iter().map(|&v| v as f64 - lse));
}


/// Logits of every position of `tokens` in a fresh sequence.
fn window_logits(b: &mut dyn Backend, tokens: &[u32]) -> Result<Vec<f32>, BackendError> {
    let seq = b.new_sequence();
    let out = b.forward(&[Chunk { seq, tokens }], LogitsFor::All);
    b.free_sequence(seq);
    out
}

/// Perplexity of `model` on `tokens`; with `reference`, also the reference's
/// perplexity, top-1 agreement and KL(ref ‖ model) on the same windows.
pub fn evaluate(
    model: &mut dyn Backend,
    mut reference: Option<&mut dyn Backend>,
    tokens: &[u32],
    opts: EvalOptions,
) -> Result<EvalResult, EvalError> {
    if opts.window < 2 || opts.stride == 0 || opts.stride > opts.window {
        return Err(EvalError::Options { window: opts.window, stride: opts.stride });
    }
    if tokens.len() < 2 {
        return Err(EvalError::TooShort(tokens.len()));
    }
    let vocab = model.vocab_size();
    if let Some(r) = reference.as_deref() {
        if r.vocab_size() != vocab {
            return Err(EvalError::Vocab(vocab, r.vocab_size()));
        }
    }
    let (mut nll, mut nll_ref, mut kl, mut agree, mut count) = (0f64, 0f64, 0f64, 0usize, 0usize);
    let (mut lq, mut lr) = (Vec::new(), Vec::new());
    let wins = windows(tokens.len(), opts);
    for &(begin, end, first) in &wins {
        let toks = &tokens[begin..end];
        let q = window_logits(model, toks)?;
        let r = match reference.as_deref_mut() {
            Some(b) => Some(window_logits(b, toks)?),
            None => None,
        };
        // The logits at window position j predict token begin + j + 1.
        for (t, &target) in tokens.iter().enumerate().take(end).skip(first) {
            let (j, target) = (t - 1 - begin, target as usize);
            let rq = &q[j * vocab..(j + 1) * vocab];
            log_softmax(rq, &mut lq);
            nll -= lq[target];
            if let Some(r) = &r {
                let rr = &r[j * vocab..(j + 1) * vocab];
                log_softmax(rr, &mut lr);
                nll_ref -= lr[target];
                kl += lr.iter().zip(&lq).map(|(&a, &b)| if a > -700.0 { a.exp() * (a - b) } else { 0.0 }).sum::<f64>();
                agree += usize::from(first_argmax(rq) == first_argmax(rr));
            }
            count += 1;
        }
    }
    let n = count.max(1) as f64;
    let with_ref = reference.is_some();
    Ok(EvalResult {
        tokens_scored: count,
        windows: wins.len(),
        nll: nll / n,
        perplexity: (nll / n).exp(),
        nll_ref: with_ref.then_some(nll_ref / n),
        perplexity_ref: with_ref.then_some((nll_ref / n).exp()),
        top1_agreement: with_ref.then_some(agree as f64 / n),
        kl: with_ref.then_some((kl / n).max(0.0)),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn windows_cover_each_target_once() {
        for (n, w, s) in [(10, 4, 2), (10, 4, 4), (3, 8, 4), (1000, 512, 256), (513, 512, 256), (7, 2, 1)] {
            let wins = windows(n, EvalOptions { window: w, stride: s });
            let mut seen = vec![0; n];
            for &(b, e, f) in &wins {
                assert!(e - b <= w && f > b && f < e);
                for x in &mut seen[f..e] {
                    *x += 1;
                }
            }
            assert_eq!(seen[0], 0);
            assert!(seen[1..].iter().all(|&c| c == 1), "n={n} w={w} s={s}: {wins:?}");
        }
    }
}
