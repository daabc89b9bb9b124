//! The DFlash drafter on the CPU: a few Qwen3-style decoder layers run over
//! one block (non-causal), whose attention also sees the injected target
//! context. Context features (the target's hidden states at the chosen layers,
//! concatenated) are projected N·H→H and RMS-normed once, then every draft
//! layer turns them into keys and values with its own K/V projections; those
//! are cached per sequence, so each step only projects the newly committed
//! tokens. Queries come from the block only. Embedding and lm_head are the
//! target's.

use std::sync::Arc;

use super::{DraftInput, Drafter};
use crate::backend::cpu::attention::{attend, AttentionShape, QueryRow};
use crate::backend::cpu::matmul::{linear, matmul};
use crate::backend::cpu::{moe, ops};
use crate::backend::rope::RopeTable;
use crate::backend::BackendError;
use crate::model::config::AttentionKind;
use crate::model::dflash::DFlashWeights;
use crate::model::ModelWeights;

/// Keys/values of the injected context, `[len, kv_dim]` per draft layer.
#[derive(Clone, Default)]
struct ContextCache {
    keys: Vec<Vec<f32>>,
    values: Vec<Vec<f32>>,
    len: usize,
}

pub struct DFlashDrafter {
    draft: Arc<DFlashWeights>,
    target: Arc<ModelWeights>,
    rope: RopeTable,
    slots: Vec<Option<ContextCache>>,
}

impl DFlashDrafter {
    pub fn new(draft: Arc<DFlashWeights>, target: Arc<ModelWeights>) -> Self {
        let c = &draft.config.decoder;
        let rope = RopeTable::new(&c.rope, c.head_dim);
        Self { draft, target, rope, slots: Vec::new() }
    }

    pub fn weights(&self) -> &DFlashWeights {
        &self.draft
    }

    fn slot(&mut self, seq: usize) -> Result<&mut ContextCache, BackendError> {
        self.slots
            .get_mut(seq)
            .and_then(Option::as_mut)
            .ok_or_else(|| BackendError::Device(format!("drafter: unknown sequence {seq}")))
    }

    /// RMSNorm each head of each row, then rotate it at `pos0 + row`.
    fn norm_rope(&self, x: &mut [f32], width: usize, norm: &[f32], pos0: usize) {
        let c = &self.draft.config.decoder;
        let hd = c.head_dim;
        ops::rmsnorm_in_place(x, norm, c.rms_norm_eps);
        let (mut cos, mut sin) = (vec![0f32; hd / 2], vec![0f32; hd / 2]);
        for (r, row) in x.chunks_mut(width).enumerate() {
            self.rope.cos_sin(pos0 + r, &mut cos, &mut sin);
            for head in row.chunks_mut(hd) {
                ops::rope_rotate(head, &cos, &sin);
            }
        }
    }

    fn draft_one(&mut self, input: &DraftInput<'_>) -> Result<Vec<f32>, BackendError> {
        let draft = Arc::clone(&self.draft);
        let target = Arc::clone(&self.target);
        let dc = &draft.config;
        let c = &dc.decoder;
        let (h, kvd, qd) = (c.hidden_size, c.kv_dim(), c.q_dim());
        let ctx_width = draft.fc.in_features();
        if !input.context.len().is_multiple_of(ctx_width) {
            return Err(BackendError::Device(format!(
                "drafter: context of {} floats is not whole rows of {ctx_width}",
                input.context.len()
            )));
        }
        let m = input.context.len() / ctx_width;
        let ctx_start = self.slot(input.seq)?.len;
        if ctx_start + m != input.position {
            return Err(BackendError::Device(format!(
                "drafter: context ends at {} but the block starts at {}",
                ctx_start + m,
                input.position
            )));
        }
        // Context features → H, normed: shared by every layer.
        let mut ctx = linear(&draft.fc, input.context, m);
        ops::rmsnorm_in_place(&mut ctx, &draft.hidden_norm, c.rms_norm_eps);
        // The block: the verified token, then masks.
        let b = input.block;
        let mut x = vec![0f32; b * h];
        for (j, row) in x.chunks_mut(h).enumerate() {
            let id = if j == 0 { input.first_token } else { dc.mask_token_id };
            if id as usize >= target.config.vocab_size {
                return Err(BackendError::TokenOutOfRange { id, vocab: target.config.vocab_size });
            }
            target.embed.row_into(id as usize, row);
        }
        let shape = AttentionShape { heads: c.num_heads, kv_heads: c.num_kv_heads, head_dim: c.head_dim, kind: AttentionKind::Full };
        let mut hbuf = vec![0f32; b * h];
        for (li, layer) in draft.layers.iter().enumerate() {
            ops::rmsnorm(&x, &layer.input_norm, c.rms_norm_eps, &mut hbuf);
            let mut q = linear(&layer.q, &hbuf, b);
            self.norm_rope(&mut q, qd, &layer.q_norm, input.position);
            // New context rows become permanent keys/values of this layer.
            let mut kc = linear(&layer.k, &ctx, m);
            self.norm_rope(&mut kc, kvd, &layer.k_norm, ctx_start);
            let vc = linear(&layer.v, &ctx, m);
            let mut kb = linear(&layer.k, &hbuf, b);
            self.norm_rope(&mut kb, kvd, &layer.k_norm, input.position);
            let vb = linear(&layer.v, &hbuf, b);
            // Context rows stay (permanent keys/values of this layer); block
            // rows are appended only for this pass. Every block row sees all
            // context and the whole block (non-causal).
            let cache = self.slot(input.seq)?;
            let keep = (ctx_start + m) * kvd;
            cache.keys[li].extend_from_slice(&kc);
            cache.values[li].extend_from_slice(&vc);
            cache.keys[li].extend_from_slice(&kb);
            cache.values[li].extend_from_slice(&vb);
            let last = cache.keys[li].len() / kvd - 1;
            let rows: Vec<QueryRow<'_>> = (0..b)
                .map(|_| QueryRow { keys: &cache.keys[li], values: &cache.values[li], pos: last })
                .collect();
            let attn = attend(&rows, &q, &shape, None);
            cache.keys[li].truncate(keep);
            cache.values[li].truncate(keep);
            let o = linear(&layer.o, &attn, b);
            for (xv, ov) in x.iter_mut().zip(&o) {
                *xv += ov;
            }
            ops::rmsnorm(&x, &layer.post_attention_norm, c.rms_norm_eps, &mut hbuf);
            let mlp = moe::gated_mlp(&layer.mlp, c.activation, &hbuf, b);
            for (xv, mv) in x.iter_mut().zip(&mlp) {
                *xv += mv;
            }
        }
        self.slot(input.seq)?.len += m;
        // Logits of positions 1..B through the drafter's norm and the target's head.
        let mut normed = vec![0f32; (b - 1) * h];
        ops::rmsnorm(&x[h..], &draft.norm, c.rms_norm_eps, &mut normed);
        let vocab = target.config.vocab_size;
        let mut logits = vec![0f32; (b - 1) * vocab];
        matmul(target.lm_head(), &normed, b - 1, &mut logits);
        Ok(logits)
    }
}

impl Drafter for DFlashDrafter {
    fn target_layers(&self) -> &[usize] {
        &self.draft.config.target_layer_ids
    }

    fn block_size(&self) -> usize {
        self.draft.config.block_size
    }

    fn new_sequence(&mut self) -> usize {
        let n = self.draft.layers.len();
        let cache = ContextCache { keys: vec![Vec::new(); n], values: vec![Vec::new(); n], len: 0 };
        match self.slots.iter().position(Option::is_none) {
            Some(i) => {
                self.slots[i] = Some(cache);
                i
            }
            None => {
                self.slots.push(Some(cache));
                self.slots.len() - 1
            }
        }
    }

    fn free_sequence(&mut self, seq: usize) {
        if let Some(s) = self.slots.get_mut(seq) {
            *s = None;
        }
    }

    fn truncate(&mut self, seq: usize, len: usize) -> Result<(), BackendError> {
        let kvd = self.draft.config.decoder.kv_dim();
        let cache = self.slot(seq)?;
        if len < cache.len {
            for (k, v) in cache.keys.iter_mut().zip(cache.values.iter_mut()) {
                k.truncate(len * kvd);
                v.truncate(len * kvd);
            }
            cache.len = len;
        }
        Ok(())
    }

    fn draft(&mut self, inputs: &[DraftInput<'_>]) -> Result<Vec<Vec<f32>>, BackendError> {
        inputs.iter().map(|i| self.draft_one(i)).collect()
    }
}
