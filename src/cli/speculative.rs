//! A target backend and a DFlash drafter on one device: the CPU drafter next
//! to the CPU backend, the GPU drafter (`CudaDFlash`) on the target's GPU for
//! `--device cuda:K`.

use std::sync::Arc;

use kairos::backend::Backend;
use kairos::engine::speculative::dflash::DFlashDrafter;
use kairos::engine::speculative::Drafter;
use kairos::model::dflash::DFlashWeights;
use kairos::model::ModelWeights;

use super::{make_backend, Device};

/// `max_step_tokens`: CUDA rows per step (a verify step of up to this many rows,
/// all sequences' blocks together, replays one CUDA graph); `None` = the backend's default.
pub fn open(
    device: Device,
    weights: Arc<ModelWeights>,
    draft: DFlashWeights,
    max_step_tokens: Option<usize>,
) -> anyhow::Result<(Box<dyn Backend>, Box<dyn Drafter>)> {
    match device {
        Device::Cpu => {
            let backend = make_backend(device, Arc::clone(&weights))?;
            Ok((backend, Box::new(DFlashDrafter::new(Arc::new(draft), weights))))
        }
        Device::Cuda(k) => {
            #[cfg(feature = "cuda")]
            {
                use kairos::backend::cuda::model::dflash::CudaDFlash;
                use kairos::backend::cuda::model::{CudaBackend, CudaBackendOptions};
                let mut opts = CudaBackendOptions { ordinal: k, ..Default::default() };
                if let Some(n) = max_step_tokens {
                    opts.max_step_tokens = n;
                }
                let target = CudaBackend::new(&weights, opts).map_err(|e| anyhow::anyhow!("--device cuda:{k}: {e}"))?;
                let drafter = CudaDFlash::new(&target, &draft).map_err(|e| anyhow::anyhow!("GPU drafter on cuda:{k}: {e}"))?;
                Ok((Box::new(target), Box::new(drafter)))
            }
            #[cfg(not(feature = "cuda"))]
            {
                let _ = (weights, draft, max_step_tokens);
                anyhow::bail!("--device cuda:{k}: this binary was built without CUDA; rebuild with `--features cuda`")
            }
        }
    }
}
