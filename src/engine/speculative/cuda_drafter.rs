//! The GPU DFlash drafter (`backend::cuda::model::dflash::CudaDFlash`) as a
//! [`Drafter`]: the engine's loop drives it exactly like the CPU drafter.

use super::{DraftInput, Drafter};
use crate::backend::cuda::model::dflash::{CudaDFlash, DraftBlock};
use crate::backend::BackendError;

impl Drafter for CudaDFlash {
    fn target_layers(&self) -> &[usize] {
        &self.config().target_layer_ids
    }

    fn block_size(&self) -> usize {
        self.config().block_size
    }

    fn new_sequence(&mut self) -> usize {
        CudaDFlash::new_sequence(self)
    }

    fn free_sequence(&mut self, seq: usize) {
        CudaDFlash::free_sequence(self, seq)
    }

    fn truncate(&mut self, seq: usize, len: usize) -> Result<(), BackendError> {
        CudaDFlash::truncate(self, seq, len)
    }

    fn draft(&mut self, inputs: &[DraftInput<'_>]) -> Result<Vec<Vec<f32>>, BackendError> {
        CudaDFlash::draft(self, &blocks(inputs))
    }

    fn counters(&self) -> Vec<(&'static str, usize)> {
        let p = self.profile();
        vec![
            ("passes", p.passes),
            ("eager", p.eager),
            ("graph_launches", p.graph_launches),
            ("captures", p.captures),
            ("graph_drops", p.graph_drops),
            ("context_chunks", p.context_chunks),
        ]
    }

    fn argmax_on_device(&self) -> bool {
        true
    }

    fn draft_argmax(&mut self, inputs: &[DraftInput<'_>]) -> Result<Vec<Vec<u32>>, BackendError> {
        CudaDFlash::draft_argmax(self, &blocks(inputs))
    }
}

fn blocks<'a>(inputs: &[DraftInput<'a>]) -> Vec<DraftBlock<'a>> {
    inputs
        .iter()
        .map(|i| DraftBlock { seq: i.seq, context: i.context, first_token: i.first_token, position: i.position, block: i.block })
        .collect()
}
