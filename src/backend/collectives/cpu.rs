//! Collectives between threads of one process (simulated ranks): each rank
//! posts its buffer into a shared slot, all wait at a barrier, each reads
//! what it needs in rank order, and a second barrier frees the slots. Sums
//! run in rank order on every rank, so results are identical across ranks
//! and across runs.

use std::sync::{Arc, Barrier, Mutex, MutexGuard};

use super::{Collectives, CommError};

struct Shared {
    barrier: Barrier,
    /// One posted buffer per rank (plus its per-destination counts for all-to-all).
    posts: Vec<Mutex<(Vec<f32>, Vec<usize>)>>,
}

/// One rank's handle; make a world with [`CpuComm::world`] and move one handle into each rank's thread.
pub struct CpuComm {
    rank: usize,
    shared: Arc<Shared>,
}

fn lock(m: &Mutex<(Vec<f32>, Vec<usize>)>) -> MutexGuard<'_, (Vec<f32>, Vec<usize>)> {
    // A poisoned slot only means another rank panicked; its data is still whole.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl CpuComm {
    pub fn world(n: usize) -> Vec<CpuComm> {
        let shared = Arc::new(Shared {
            barrier: Barrier::new(n),
            posts: (0..n).map(|_| Mutex::new((Vec::new(), Vec::new()))).collect(),
        });
        (0..n).map(|rank| CpuComm { rank, shared: Arc::clone(&shared) }).collect()
    }

    fn post(&self, data: &[f32], counts: &[usize]) {
        let mut slot = lock(&self.shared.posts[self.rank]);
        slot.0.clear();
        slot.0.extend_from_slice(data);
        slot.1.clear();
        slot.1.extend_from_slice(counts);
    }

    /// Posts, waits for every rank, runs `read` over all posts, waits again.
    fn exchange<T>(&self, data: &[f32], counts: &[usize], read: impl FnOnce(&[&(Vec<f32>, Vec<usize>)]) -> T) -> T {
        self.post(data, counts);
        self.read_posts(read)
    }

    fn read_posts<T>(&self, read: impl FnOnce(&[&(Vec<f32>, Vec<usize>)]) -> T) -> T {
        self.shared.barrier.wait();
        let guards: Vec<_> = self.shared.posts.iter().map(lock).collect();
        let views: Vec<&(Vec<f32>, Vec<usize>)> = guards.iter().map(|g| &**g).collect();
        let out = read(&views);
        drop(guards);
        self.shared.barrier.wait();
        out
    }
}

fn same_sizes(op: &'static str, posts: &[&(Vec<f32>, Vec<usize>)]) -> Result<usize, CommError> {
    let want = posts[0].0.len();
    for (rank, p) in posts.iter().enumerate() {
        if p.0.len() != want {
            return Err(CommError::SizeMismatch { op, rank, got: p.0.len(), want });
        }
    }
    Ok(want)
}

impl Collectives for CpuComm {
    type Buf = [f32];

    fn rank(&self) -> usize {
        self.rank
    }

    fn world(&self) -> usize {
        self.shared.posts.len()
    }

    fn all_reduce_sum(&self, buf: &mut [f32]) -> Result<(), CommError> {
        self.post(buf, &[]);
        self.read_posts(|posts| {
            same_sizes("all_reduce_sum", posts)?;
            buf.copy_from_slice(&posts[0].0);
            for p in &posts[1..] {
                for (a, b) in buf.iter_mut().zip(&p.0) {
                    *a += b;
                }
            }
            Ok(())
        })
    }

    fn all_gather(&self, send: &[f32], recv: &mut [f32]) -> Result<(), CommError> {
        let want = send.len() * self.world();
        if recv.len() != want {
            return Err(CommError::BadBuffer { op: "all_gather", got: recv.len(), want });
        }
        self.exchange(send, &[], |posts| {
            let n = same_sizes("all_gather", posts)?;
            for (r, p) in posts.iter().enumerate() {
                recv[r * n..(r + 1) * n].copy_from_slice(&p.0);
            }
            Ok(())
        })
    }

    fn all_to_all(&self, send: &[f32], send_counts: &[usize], recv: &mut [f32], recv_counts: &[usize]) -> Result<(), CommError> {
        let world = self.world();
        let (sent, want) = (send_counts.iter().sum::<usize>(), recv_counts.iter().sum::<usize>());
        if send_counts.len() != world || sent != send.len() {
            return Err(CommError::BadBuffer { op: "all_to_all send", got: send.len(), want: sent });
        }
        if recv_counts.len() != world || want != recv.len() {
            return Err(CommError::BadBuffer { op: "all_to_all recv", got: recv.len(), want });
        }
        let me = self.rank;
        self.exchange(send, send_counts, |posts| {
            let mut at = 0;
            for (src, p) in posts.iter().enumerate() {
                let offset: usize = p.1[..me].iter().sum();
                let len = p.1[me];
                if len != recv_counts[src] {
                    return Err(CommError::SizeMismatch { op: "all_to_all", rank: src, got: len, want: recv_counts[src] });
                }
                recv[at..at + len].copy_from_slice(&p.0[offset..offset + len]);
                at += len;
            }
            Ok(())
        })
    }

    fn broadcast(&self, buf: &mut [f32], root: usize) -> Result<(), CommError> {
        let world = self.world();
        if root >= world {
            return Err(CommError::BadRoot { root, world });
        }
        let mine: &[f32] = if self.rank == root { buf } else { &[] };
        let mine = mine.to_vec();
        self.exchange(&mine, &[], |posts| {
            let src = &posts[root].0;
            if src.len() != buf.len() {
                return Err(CommError::SizeMismatch { op: "broadcast", rank: self.rank, got: buf.len(), want: src.len() });
            }
            buf.copy_from_slice(src);
            Ok(())
        })
    }
}

/// Runs `f(rank, comm)` on one thread per rank and returns the results in rank order.
pub fn run_ranks<T: Send>(n: usize, f: impl Fn(usize, &CpuComm) -> T + Sync) -> Vec<T> {
    let comms = CpuComm::world(n);
    std::thread::scope(|s| {
        let handles: Vec<_> = comms.iter().enumerate().map(|(r, c)| {
            let f = &f;
            s.spawn(move || f(r, c))
        }).collect();
        handles.into_iter().map(|h| h.join().unwrap_or_else(|p| std::panic::resume_unwind(p))).collect()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn all_reduce_sums_in_rank_order_on_every_rank() {
        for n in [1, 2, 3, 4, 8] {
            let out = run_ranks(n, |r, c| {
                let mut v: Vec<f32> = (0..5).map(|i| (r * 10 + i) as f32 + 0.1).collect();
                c.all_reduce_sum(&mut v).unwrap();
                v
            });
            let want: Vec<f32> = (0..5)
                .map(|i| (1..n).fold((i as f32) + 0.1, |a, r| a + ((r * 10 + i) as f32 + 0.1)))
                .collect();
            for v in &out {
                assert_eq!(v, &want, "n={n}");
            }
        }
    }

    #[test]
    fn all_gather_and_broadcast() {
        let out = run_ranks(4, |r, c| {
            let mut all = vec![0f32; 8];
            c.all_gather(&[r as f32, -(r as f32)], &mut all).unwrap();
            let mut b = vec![r as f32; 3];
            c.broadcast(&mut b, 2).unwrap();
            (all, b)
        });
        for (all, b) in out {
            assert_eq!(all, vec![0., -0., 1., -1., 2., -2., 3., -3.]);
            assert_eq!(b, vec![2.0; 3]);
        }
    }

    #[test]
    fn all_to_all_is_a_transpose_with_uneven_counts() {
        // Rank s sends (s + d) values of value 100·s + d to rank d.
        let n = 4;
        let out = run_ranks(n, |r, c| {
            let counts: Vec<usize> = (0..n).map(|d| r + d).collect();
            let send: Vec<f32> = (0..n).flat_map(|d| std::iter::repeat_n((100 * r + d) as f32, r + d)).collect();
            let recv_counts: Vec<usize> = (0..n).map(|s| s + r).collect();
            let mut recv = vec![0f32; recv_counts.iter().sum()];
            c.all_to_all(&send, &counts, &mut recv, &recv_counts).unwrap();
            recv
        });
        for (d, recv) in out.iter().enumerate() {
            let want: Vec<f32> = (0..n).flat_map(|s| std::iter::repeat_n((100 * s + d) as f32, s + d)).collect();
            assert_eq!(recv, &want, "rank {d}");
        }
    }

    #[test]
    fn mismatched_sizes_are_errors_on_every_rank() {
        let out = run_ranks(3, |r, c| {
            let mut v = vec![1f32; 2 + r];
            c.all_reduce_sum(&mut v)
        });
        for e in out {
            assert!(matches!(e, Err(CommError::SizeMismatch { op: "all_reduce_sum", rank: 1, got: 3, want: 2 })), "{e:?}");
        }
        let e = CpuComm::world(1)[0].all_gather(&[1.0], &mut [0.0; 2]).unwrap_err();
        assert!(matches!(e, CommError::BadBuffer { .. }));
    }
}
