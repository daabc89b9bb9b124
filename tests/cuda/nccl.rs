//! NCCL collectives (one thread and one stream per GPU) against the CPU
//! collectives on the same inputs: all-reduce, all-gather, all-to-all with
//! uneven counts, broadcast. One rank, then every visible GPU when there are
//! several. Without a GPU (or NCCL) it prints a skip line and passes, unless
//! KAIROS_REQUIRE_CUDA=1.
//! Run: `KAIROS_REQUIRE_CUDA=1 cargo test --release --features cuda --test cuda -- nccl:: --nocapture`.


use kairos::backend::collectives::cpu::run_ranks;
use kairos::backend::collectives::nccl::{nccl_available, new_id, NcclComm};
use kairos::backend::collectives::Collectives;

fn required() -> bool {
    std::env::var("KAIROS_REQUIRE_CUDA").is_ok_and(|v| v == "1")
}

/// GPUs to use, or `None` (skip) when there is no device or no NCCL library.
fn gpus() -> Option<usize> {
    if !kairos::backend::cuda::device_available() {
        assert!(!required(), "KAIROS_REQUIRE_CUDA=1 but no CUDA device or driver library was found");
        println!("no CUDA device: skipped");
        return None;
    }
    if !nccl_available() {
        assert!(!required(), "KAIROS_REQUIRE_CUDA=1 but libnccl.so was not found (link it to libnccl.so.2 on LD_LIBRARY_PATH)");
        println!("no NCCL library: skipped");
        return None;
    }
    Some(cudarc::driver::CudaContext::device_count().expect("device count") as usize)
}

/// Each rank's inputs, a function of (rank, world) only.
fn reduce_input(r: usize) -> Vec<f32> {
    (0..1000).map(|i| ((r * 1000 + i) % 97) as f32 * 0.37 - 11.0).collect()
}
fn gather_input(r: usize) -> Vec<f32> {
    (0..5).map(|i| (r * 100 + i) as f32).collect()
}
/// Rank `s` sends `s + d + 1` values of `1000·s + d + k/8` to rank `d`.
fn a2a_input(r: usize, n: usize) -> (Vec<f32>, Vec<usize>, Vec<usize>) {
    let counts: Vec<usize> = (0..n).map(|d| r + d + 1).collect();
    let send = (0..n).flat_map(|d| (0..r + d + 1).map(move |k| (1000 * r + d) as f32 + k as f32 / 8.0)).collect();
    let recv_counts = (0..n).map(|s| s + r + 1).collect();
    (send, counts, recv_counts)
}

type Results = (Vec<f32>, Vec<f32>, Vec<f32>, Vec<f32>);

fn on_cpu(n: usize) -> Vec<Results> {
    run_ranks(n, |r, c| {
        let mut sum = reduce_input(r);
        c.all_reduce_sum(&mut sum).expect("all_reduce");
        let mut all = vec![0f32; 5 * n];
        c.all_gather(&gather_input(r), &mut all).expect("all_gather");
        let (send, sc, rc) = a2a_input(r, n);
        let mut recv = vec![0f32; rc.iter().sum()];
        c.all_to_all(&send, &sc, &mut recv, &rc).expect("all_to_all");
        let mut b = vec![r as f32 + 0.5; 7];
        c.broadcast(&mut b, n - 1).expect("broadcast");
        (sum, all, recv, b)
    })
}

fn on_gpus(n: usize) -> Vec<Results> {
    let id = new_id().expect("NCCL id");
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..n)
            .map(|r| {
                s.spawn(move || {
                    let c = NcclComm::join(r, r, n, id).expect("join NCCL world");
                    let st = c.stream();
                    let mut sum = st.memcpy_stod(&reduce_input(r)).expect("upload");
                    c.all_reduce_sum(&mut sum).expect("all_reduce");
                    let g = st.memcpy_stod(&gather_input(r)).expect("upload");
                    let mut all = st.alloc_zeros::<f32>(5 * n).expect("alloc");
                    c.all_gather(&g, &mut all).expect("all_gather");
                    let (send, sc, rc) = a2a_input(r, n);
                    let send = st.memcpy_stod(&send).expect("upload");
                    let mut recv = st.alloc_zeros::<f32>(rc.iter().sum()).expect("alloc");
                    c.all_to_all(&send, &sc, &mut recv, &rc).expect("all_to_all");
                    let mut b = st.memcpy_stod(&vec![r as f32 + 0.5; 7]).expect("upload");
                    c.broadcast(&mut b, n - 1).expect("broadcast");
                    st.synchronize().expect("sync");
                    let down = |x: &cudarc::driver::CudaSlice<f32>| st.memcpy_dtov(x).expect("download");
                    (down(&sum), down(&all), down(&recv), down(&b))
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().expect("rank thread")).collect()
    })
}

fn check(n: usize) {
    let (cpu, gpu) = (on_cpu(n), on_gpus(n));
    for r in 0..n {
        let ((cs, ca, cr, cb), (gs, ga, gr, gb)) = (&cpu[r], &gpu[r]);
        // NCCL may add in another order: sums agree to rounding, the rest exactly.
        let scale = cs.iter().fold(1f32, |a, b| a.max(b.abs()));
        let worst = cs.iter().zip(gs).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
        assert!(worst <= 1e-6 * scale * n as f32, "world {n} rank {r}: all_reduce off by {worst}");
        assert_eq!(ca, ga, "world {n} rank {r}: all_gather");
        assert_eq!(cr, gr, "world {n} rank {r}: all_to_all");
        assert_eq!(cb, gb, "world {n} rank {r}: broadcast");
    }
    println!("NCCL world of {n}: all_reduce, all_gather, all_to_all, broadcast match the CPU collectives");
}

#[test]
fn nccl_collectives_match_cpu() {
    let Some(count) = gpus() else { return };
    check(1);
    if count > 1 {
        check(count);
    }
}
