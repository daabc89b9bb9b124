//! Per-partition bookkeeping of in-flight offsets: which offset may be
//! stored so that nothing before it is still unanswered.

use std::collections::{BTreeSet, HashMap};

pub(crate) type Tp = (String, i32);

#[derive(Debug, Default)]
struct Part {
    /// Offsets handed to the pipeline and not yet acked.
    inflight: BTreeSet<i64>,
    /// One past the highest offset handed to the pipeline.
    next: Option<i64>,
    /// Last offset stored (the next offset to consume).
    stored: Option<i64>,
    /// One past the highest offset read from the broker (maybe not yet delivered).
    seen: Option<i64>,
    /// Which assignment this is; records read under an older one are stale.
    epoch: u64,
}

impl Part {
    /// The offset that may be stored: the smallest in-flight offset, or one
    /// past the last delivered one when nothing is in flight.
    fn watermark(&self) -> Option<i64> {
        self.inflight.first().copied().or(self.next)
    }
}

/// In-flight tracking for the partitions this consumer owns.
#[derive(Debug, Default)]
pub(crate) struct Tracker {
    parts: HashMap<Tp, Part>,
    epochs: u64,
}

impl Tracker {
    pub fn assign(&mut self, tp: Tp) {
        self.epochs += 1;
        let epoch = self.epochs;
        self.parts.entry(tp).or_insert_with(|| Part { epoch, ..Part::default() });
    }

    /// The current assignment epoch of `tp` (None when not owned). A record
    /// read under one epoch may only be delivered under the same epoch: after
    /// a revoke and re-assign, fetching restarts from the committed offset.
    pub fn epoch(&self, tp: &Tp) -> Option<u64> {
        self.parts.get(tp).map(|p| p.epoch)
    }

    pub fn revoke(&mut self, tp: &Tp) {
        self.parts.remove(tp);
    }

    /// Whether `offset` was already read (a re-fetch after pause); if not,
    /// remember it as read.
    pub fn is_duplicate(&mut self, tp: &Tp, offset: i64) -> bool {
        let Some(p) = self.parts.get_mut(tp) else { return false };
        if p.seen.is_some_and(|n| offset < n) {
            return true;
        }
        p.seen = Some(offset + 1);
        false
    }

    /// Record that `offset` was handed to the pipeline. False if not owned.
    pub fn deliver(&mut self, tp: &Tp, offset: i64) -> bool {
        match self.parts.get_mut(tp) {
            Some(p) => {
                p.inflight.insert(offset);
                p.next = Some(p.next.map_or(offset + 1, |n| n.max(offset + 1)));
                true
            }
            None => false,
        }
    }

    /// Record an ack. Unknown partitions and offsets are ignored.
    pub fn ack(&mut self, tp: &Tp, offset: i64) {
        if let Some(p) = self.parts.get_mut(tp) {
            p.inflight.remove(&offset);
        }
    }

    /// Number of in-flight events in `tps` (all partitions when `None`).
    pub fn inflight(&self, tps: Option<&[Tp]>) -> usize {
        match tps {
            Some(tps) => tps.iter().filter_map(|tp| self.parts.get(tp)).map(|p| p.inflight.len()).sum(),
            None => self.parts.values().map(|p| p.inflight.len()).sum(),
        }
    }

    /// Offsets to store that moved since the last call, marked as stored.
    pub fn take_storable(&mut self) -> Vec<(Tp, i64)> {
        let mut out = Vec::new();
        for (tp, p) in self.parts.iter_mut() {
            if let Some(w) = p.watermark() {
                if p.stored.is_none_or(|s| w > s) {
                    p.stored = Some(w);
                    out.push((tp.clone(), w));
                }
            }
        }
        out
    }

    /// Current watermarks of `tps` (for a synchronous commit), stored or not.
    pub fn watermarks(&self, tps: &[Tp]) -> Vec<(Tp, i64)> {
        tps.iter()
            .filter_map(|tp| Some((tp.clone(), self.parts.get(tp)?.watermark()?)))
            .collect()
    }

    pub fn partitions(&self) -> Vec<Tp> {
        self.parts.keys().cloned().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn contiguous_watermark() {
        let tp: Tp = ("t".into(), 0);
        let mut t = Tracker::default();
        assert!(!t.deliver(&tp, 0), "not owned yet");
        t.assign(tp.clone());
        let e1 = t.epoch(&tp);
        t.revoke(&tp);
        t.assign(tp.clone());
        assert_ne!(t.epoch(&tp), e1);
        for o in 10..15 {
            assert!(t.deliver(&tp, o));
        }
        assert_eq!(t.take_storable(), vec![(tp.clone(), 10)]);
        t.ack(&tp, 11);
        t.ack(&tp, 12);
        assert!(t.take_storable().is_empty(), "10 still in flight");
        t.ack(&tp, 10);
        assert_eq!(t.take_storable(), vec![(tp.clone(), 13)]);
        t.ack(&tp, 14);
        t.ack(&tp, 13);
        assert_eq!(t.take_storable(), vec![(tp.clone(), 15)]);
        assert!(!t.is_duplicate(&tp, 15));
        assert!(t.is_duplicate(&tp, 15));
        assert!(t.is_duplicate(&tp, 14));
        assert!(!t.is_duplicate(&tp, 16));
        assert_eq!(t.inflight(None), 0);
        t.ack(&tp, 99); // unknown offset: ignored
        t.revoke(&tp);
        t.ack(&tp, 15); // revoked partition: ignored
        assert!(t.take_storable().is_empty());
    }
}
