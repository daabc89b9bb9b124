//! Byte-level deterministic automaton accepting exactly the canonical JSON
//! verdicts of a [`VerdictSchema`](super::VerdictSchema).
//!
//! The verdict is a sequence of segments: literals (`{"decision":"`,
//! `","score":`, ...) and values (enum, number, integer, string content).
//! Segments are built back to front; a value state that may end the value gets
//! the transitions of the following literal's entry state merged in (the value
//! alphabets never contain the literal's first byte, so the result stays
//! deterministic). Transitions are stored as a dense table over byte classes.

use std::collections::{HashMap, VecDeque};

use super::number::{NumKey, NumPrefix, NumSpec};
use super::schema::{scaled_bounds, FieldKind, VerdictSchema};
use super::ConstraintError;

/// No transition.
pub(super) const DEAD: u32 = u32::MAX;

pub(super) struct Dfa {
    classes: [u8; 256],
    nclasses: usize,
    table: Vec<u32>,
    pub start: u32,
    /// The only accepting state (after the closing `}`); it has no transitions.
    pub accept: u32,
    /// Segment index of each state (0 = opening literal, 1 = decision enum, ...).
    pub seg: Vec<u16>,
    /// States with `seg >= decision_done_seg` have the decision fully decoded.
    pub decision_done_seg: u16,
    /// True when the state is inside a multi-byte UTF-8 character.
    pub mid_char: Vec<bool>,
    /// Representative state with the same token mask (string states with at
    /// least `max_token_len` characters left map to one state).
    pub mask_rep: Vec<u32>,
    /// For string states close to `max_chars`: (previous-count state, number
    /// of content characters of the tokens to drop from its mask).
    pub derive: Vec<Option<(u32, u32)>>,
    /// String-content states whose (shared) mask needs a full trie walk.
    pub string_tops: Vec<u32>,
    /// The only byte with a transition, when there is exactly one.
    pub single: Vec<Option<u8>>,
    /// Next byte on a shortest path to `accept` (for early closing).
    close_next: Vec<Option<u8>>,
}

enum Item<'a> {
    Lit(Vec<u8>),
    Enum(&'a [String]),
    Num { lo: i128, hi: i128, decimals: u32 },
    Str(usize),
}

#[derive(Default)]
struct Builder {
    ranges: Vec<Vec<(u8, u8, u32)>>,
    seg: Vec<u16>,
    mid: Vec<bool>,
    rep: Vec<u32>,
    derive: Vec<(u32, u32, u32)>,
    string_tops: Vec<u32>,
}

impl Builder {
    fn state(&mut self, seg: usize, mid: bool) -> u32 {
        let id = self.ranges.len() as u32;
        self.ranges.push(Vec::new());
        self.seg.push(seg as u16);
        self.mid.push(mid);
        self.rep.push(id);
        id
    }
    fn add(&mut self, s: u32, lo: u8, hi: u8, t: u32) {
        self.ranges[s as usize].push((lo, hi, t));
    }
    fn merge_from(&mut self, s: u32, from: u32) {
        let r = self.ranges[from as usize].clone();
        self.ranges[s as usize].extend(r);
    }

    fn literal(&mut self, seg: usize, lit: &[u8], next: u32) -> u32 {
        let mut cur = next;
        for &b in lit.iter().rev() {
            let s = self.state(seg, false);
            self.add(s, b, b, cur);
            cur = s;
        }
        cur
    }

    fn enumeration(&mut self, seg: usize, values: &[String], next: u32) -> u32 {
        let root = self.state(seg, false);
        let mut ends = Vec::new();
        for v in values {
            let mut cur = root;
            for (i, &b) in v.as_bytes().iter().enumerate() {
                let found = self.ranges[cur as usize]
                    .iter()
                    .find(|r| r.0 == b)
                    .map(|r| r.2);
                cur = match found {
                    Some(t) => t,
                    None => {
                        let t = self.state(seg, !v.is_char_boundary(i + 1));
                        self.add(cur, b, b, t);
                        t
                    }
                };
            }
            ends.push(cur);
        }
        ends.sort_unstable();
        ends.dedup();
        for e in ends {
            self.merge_from(e, next);
        }
        root
    }

    /// String content: `max` characters of printable, non-`"`/`\` text in
    /// strictly valid UTF-8 (no C0/C1 controls, no DEL, no surrogates).
    fn string(&mut self, seg: usize, max: usize, next: u32, max_tok: usize) -> u32 {
        const SUBS: usize = 9;
        let base = self.ranges.len() as u32;
        for _c in 0..=max {
            for sub in 0..SUBS {
                self.state(seg, sub != 0);
            }
        }
        let id = |c: usize, sub: usize| base + (c * SUBS + sub) as u32;
        for c in 0..=max {
            let s0 = id(c, 0);
            if c < max {
                let n = |sub| id(c + 1, sub);
                self.add(s0, 0x20, 0x21, n(0));
                self.add(s0, 0x23, 0x5b, n(0));
                self.add(s0, 0x5d, 0x7e, n(0));
                self.add(s0, 0xc2, 0xc2, n(8));
                self.add(s0, 0xc3, 0xdf, n(1));
                self.add(s0, 0xe0, 0xe0, n(4));
                self.add(s0, 0xe1, 0xec, n(2));
                self.add(s0, 0xed, 0xed, n(5));
                self.add(s0, 0xee, 0xef, n(2));
                self.add(s0, 0xf0, 0xf0, n(6));
                self.add(s0, 0xf1, 0xf3, n(3));
                self.add(s0, 0xf4, 0xf4, n(7));
            }
            self.merge_from(s0, next);
            self.add(id(c, 1), 0x80, 0xbf, id(c, 0));
            self.add(id(c, 2), 0x80, 0xbf, id(c, 1));
            self.add(id(c, 3), 0x80, 0xbf, id(c, 2));
            self.add(id(c, 4), 0xa0, 0xbf, id(c, 1));
            self.add(id(c, 5), 0x80, 0x9f, id(c, 1));
            self.add(id(c, 6), 0x90, 0xbf, id(c, 2));
            self.add(id(c, 7), 0x80, 0x8f, id(c, 2));
            self.add(id(c, 8), 0xa0, 0xbf, id(c, 0));
            // With >= max_tok characters left no token can hit the limit, so
            // the mask only depends on the UTF-8 sub-state: share the mask of
            // `top`. Closer to the limit, the mask of `c` is the mask of
            // `c - 1` minus the tokens with exactly `max - c + 1` content
            // characters (derived without a trie walk).
            let top = max.saturating_sub(max_tok);
            for sub in 0..SUBS {
                let s = id(c, sub);
                self.rep[s as usize] = id(c.max(top), sub);
                if c > top {
                    self.derive.push((s, id(c - 1, sub), (max - c + 1) as u32));
                }
            }
            if c == top {
                self.string_tops.push(s0);
            }
        }
        id(0, 0)
    }

    fn number(&mut self, seg: usize, lo: i128, hi: i128, d: u32, next: u32) -> u32 {
        let spec = NumSpec::new(lo, hi, d);
        let mut ids: HashMap<NumKey, u32> = HashMap::new();
        let mut queue = VecDeque::new();
        let start = NumPrefix::default();
        let s0 = self.state(seg, false);
        ids.insert(spec.key(&start), s0);
        queue.push_back((s0, start));
        let mut accepting = Vec::new();
        while let Some((s, p)) = queue.pop_front() {
            if spec.accepting(&p) {
                accepting.push(s);
            }
            for &b in b"-.0123456789" {
                let Some(q) = spec.step(&p, b) else { continue };
                let key = spec.key(&q);
                let t = match ids.get(&key) {
                    Some(&t) => t,
                    None => {
                        let t = self.state(seg, false);
                        ids.insert(key, t);
                        queue.push_back((t, q));
                        t
                    }
                };
                self.add(s, b, b, t);
            }
        }
        for s in accepting {
            self.merge_from(s, next);
        }
        s0
    }
}

fn items(schema: &VerdictSchema) -> Vec<Item<'_>> {
    let mut out = Vec::new();
    let mut lit = b"{".to_vec();
    for (i, f) in schema.fields.iter().enumerate() {
        if i > 0 {
            lit.push(b',');
        }
        lit.push(b'"');
        lit.extend_from_slice(f.name.as_bytes());
        lit.extend_from_slice(b"\":");
        let quoted = matches!(f.kind, FieldKind::Enum { .. } | FieldKind::String { .. });
        if quoted {
            lit.push(b'"');
        }
        out.push(Item::Lit(std::mem::take(&mut lit)));
        out.push(match &f.kind {
            FieldKind::Enum { values } => Item::Enum(values),
            FieldKind::String { max_chars } => Item::Str(*max_chars),
            FieldKind::Integer { min, max } => Item::Num {
                lo: i128::from(*min),
                hi: i128::from(*max),
                decimals: 0,
            },
            FieldKind::Number { min, max, decimals } => {
                let (lo, hi) = scaled_bounds(*min, *max, *decimals);
                Item::Num {
                    lo,
                    hi,
                    decimals: *decimals,
                }
            }
        });
        if quoted {
            lit.push(b'"');
        }
    }
    lit.push(b'}');
    out.push(Item::Lit(lit));
    out
}

impl Dfa {
    /// Build the automaton; `max_token_len` (longest token in bytes) is used
    /// to share masks between string states.
    pub fn build(schema: &VerdictSchema, max_token_len: usize) -> Result<Dfa, ConstraintError> {
        schema.validate()?;
        let items = items(schema);
        let mut b = Builder::default();
        let accept = b.state(items.len(), false);
        let mut next = accept;
        for (seg, it) in items.iter().enumerate().rev() {
            next = match it {
                Item::Lit(l) => b.literal(seg, l, next),
                Item::Enum(vs) => b.enumeration(seg, vs, next),
                Item::Str(m) => b.string(seg, *m, next, max_token_len.max(1)),
                Item::Num { lo, hi, decimals } => b.number(seg, *lo, *hi, *decimals, next),
            };
        }
        Self::finish(b, next, accept)
    }

    fn finish(b: Builder, start: u32, accept: u32) -> Result<Dfa, ConstraintError> {
        // Byte classes from range boundaries.
        let mut boundary = [false; 257];
        for rs in &b.ranges {
            for &(lo, hi, _) in rs {
                boundary[lo as usize] = true;
                boundary[hi as usize + 1] = true;
            }
        }
        let mut classes = [0u8; 256];
        let mut c = 0usize;
        let mut reps = vec![0u8];
        for (i, cl) in classes.iter_mut().enumerate() {
            if i > 0 && boundary[i] {
                c += 1;
                reps.push(i as u8);
            }
            *cl = c as u8;
        }
        let nclasses = c + 1;
        let n = b.ranges.len();
        let mut table = vec![DEAD; n * nclasses];
        let mut single = vec![None; n];
        for (s, rs) in b.ranges.iter().enumerate() {
            let mut count = 0usize;
            for &(lo, hi, t) in rs {
                count += usize::from(hi - lo) + 1;
                for cl in classes[lo as usize]..=classes[hi as usize] {
                    let slot = &mut table[s * nclasses + cl as usize];
                    if *slot != DEAD && *slot != t {
                        return Err(ConstraintError::Internal(format!(
                            "nondeterministic state {s}"
                        )));
                    }
                    *slot = t;
                }
                if count == 1 {
                    single[s] = Some(lo);
                }
            }
            if count != 1 {
                single[s] = None;
            }
        }
        // Shortest completion: reverse BFS from accept.
        let mut rev: Vec<Vec<u32>> = vec![Vec::new(); n];
        for (s, rs) in b.ranges.iter().enumerate() {
            for &(_, _, t) in rs {
                rev[t as usize].push(s as u32);
            }
        }
        let mut dist = vec![u32::MAX; n];
        dist[accept as usize] = 0;
        let mut q = VecDeque::from([accept]);
        while let Some(t) = q.pop_front() {
            for &s in &rev[t as usize] {
                if dist[s as usize] == u32::MAX {
                    dist[s as usize] = dist[t as usize] + 1;
                    q.push_back(s);
                }
            }
        }
        let close_next = (0..n)
            .map(|s| {
                let d = dist[s];
                if d == u32::MAX || d == 0 {
                    return None;
                }
                b.ranges[s]
                    .iter()
                    .filter(|r| dist[r.2 as usize] == d - 1)
                    .map(|r| r.0)
                    .min()
            })
            .collect();
        let decision_done_seg = 2;
        let mut derive = vec![None; n];
        for &(s, prev, len) in &b.derive {
            derive[s as usize] = Some((prev, len));
        }
        Ok(Dfa {
            classes,
            nclasses,
            table,
            start,
            accept,
            seg: b.seg,
            decision_done_seg,
            mid_char: b.mid,
            mask_rep: b.rep,
            derive,
            string_tops: b.string_tops,
            single,
            close_next,
        })
    }

    #[inline(always)]
    pub fn step(&self, s: u32, b: u8) -> u32 {
        self.table[s as usize * self.nclasses + self.classes[b as usize] as usize]
    }

    pub fn num_states(&self) -> usize {
        self.seg.len()
    }

    /// Walk `bytes` from `s`; `DEAD` if rejected.
    #[cfg(test)]
    pub fn walk(&self, mut s: u32, bytes: &[u8]) -> u32 {
        for &b in bytes {
            s = self.step(s, b);
            if s == DEAD {
                return DEAD;
            }
        }
        s
    }

    /// Bytes of a shortest path from `s` to the accepting state.
    pub fn close_path(&self, mut s: u32) -> Option<Vec<u8>> {
        let mut out = Vec::new();
        while s != self.accept {
            let b = self.close_next[s as usize]?;
            out.push(b);
            s = self.step(s, b);
        }
        Some(out)
    }
}
