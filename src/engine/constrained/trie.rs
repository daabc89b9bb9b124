//! Byte trie over the tokenizer vocabulary, stored in preorder with subtree
//! skip pointers so that a mask computation is one linear, cache-friendly scan
//! that jumps over every subtree rejected by the automaton.

use super::dfa::{Dfa, DEAD};

pub struct TokenTrie {
    /// Per node (preorder, root excluded): the edge byte into the node.
    byte: Vec<u8>,
    /// Depth of the node (1 = child of the root).
    depth: Vec<u32>,
    /// Index just past the node's subtree.
    end: Vec<u32>,
    /// Tokens whose bytes end at node `i`: `tok_ids[tok_off[i]..tok_off[i + 1]]`.
    tok_off: Vec<u32>,
    tok_ids: Vec<u32>,
    /// Longest token in bytes.
    pub max_len: usize,
    /// Number of tokens in the trie (non-empty, non-excluded).
    pub num_tokens: usize,
}

impl TokenTrie {
    /// Build from the vocabulary (index = token id); tokens with an empty byte
    /// string and tokens for which `exclude(id)` is true are left out.
    pub fn new(vocab: &[Vec<u8>], exclude: impl Fn(u32) -> bool) -> Self {
        let mut ids: Vec<u32> = (0..vocab.len() as u32)
            .filter(|&i| !vocab[i as usize].is_empty() && !exclude(i))
            .collect();
        ids.sort_unstable_by(|&a, &b| vocab[a as usize].cmp(&vocab[b as usize]).then(a.cmp(&b)));
        let mut t = TokenTrie {
            byte: Vec::new(),
            depth: Vec::new(),
            end: Vec::new(),
            tok_off: vec![0],
            tok_ids: Vec::new(),
            max_len: 0,
            num_tokens: ids.len(),
        };
        // Path of node indices for the previous token; sorted insertion keeps
        // nodes in preorder.
        let mut path: Vec<u32> = Vec::new();
        let mut prev: &[u8] = &[];
        // Tokens are attached per node while building: (node, id) pairs in order.
        let mut attach: Vec<(u32, u32)> = Vec::with_capacity(ids.len());
        for &id in &ids {
            let bytes = vocab[id as usize].as_slice();
            t.max_len = t.max_len.max(bytes.len());
            let common = bytes.iter().zip(prev).take_while(|(a, b)| a == b).count();
            // Close subtrees of nodes that are no longer on the path.
            while path.len() > common {
                if let Some(n) = path.pop() {
                    t.end[n as usize] = t.byte.len() as u32;
                }
            }
            for (i, &b) in bytes.iter().enumerate().skip(common) {
                let n = t.byte.len() as u32;
                t.byte.push(b);
                t.depth.push(i as u32 + 1);
                t.end.push(0);
                path.push(n);
            }
            if let Some(&last) = path.last() {
                attach.push((last, id));
            }
            prev = bytes;
        }
        for n in path.drain(..) {
            t.end[n as usize] = t.byte.len() as u32;
        }
        // attach is sorted by node (preorder == insertion order).
        let nn = t.byte.len();
        let mut k = 0;
        for node in 0..nn as u32 {
            while k < attach.len() && attach[k].0 == node {
                t.tok_ids.push(attach[k].1);
                k += 1;
            }
            t.tok_off.push(t.tok_ids.len() as u32);
        }
        t
    }

    pub fn num_nodes(&self) -> usize {
        self.byte.len()
    }

    #[inline]
    fn tokens_at(&self, n: usize) -> &[u32] {
        &self.tok_ids[self.tok_off[n] as usize..self.tok_off[n + 1] as usize]
    }

    /// Set the bit of every token whose whole byte string is accepted by the
    /// automaton from `start` (i.e. does not reach a dead state).
    pub(super) fn fill_allowed(&self, dfa: &Dfa, start: u32, bits: &mut [u64]) {
        let mut states = vec![start; self.max_len + 1];
        let n = self.byte.len();
        let mut i = 0usize;
        while i < n {
            let d = self.depth[i] as usize;
            let s = dfa.step(states[d - 1], self.byte[i]);
            if s == DEAD {
                i = self.end[i] as usize;
                continue;
            }
            states[d] = s;
            for &id in self.tokens_at(i) {
                bits[id as usize / 64] |= 1u64 << (id % 64);
            }
            i += 1;
        }
    }

    /// Longest token that is a prefix of `bytes`: (token id, its length).
    pub fn longest_prefix(&self, bytes: &[u8]) -> Option<(u32, usize)> {
        let mut best = None;
        let mut i = 0usize; // candidate child index
        let mut limit = self.byte.len(); // end of the current sibling range
        for (pos, &b) in bytes.iter().enumerate() {
            // Scan siblings at this depth for byte b.
            let mut found = None;
            while i < limit {
                if self.byte[i] == b {
                    found = Some(i);
                    break;
                }
                i = self.end[i] as usize;
            }
            let Some(node) = found else { break };
            if let Some(&id) = self.tokens_at(node).first() {
                best = Some((id, pos + 1));
            }
            limit = self.end[node] as usize;
            i = node + 1;
            if i >= limit {
                break;
            }
        }
        best
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn preorder_and_longest_prefix() {
        let vocab: Vec<Vec<u8>> = ["a", "ab", "abc", "b", "", "ba", "ab", "c"]
            .iter()
            .map(|s| s.as_bytes().to_vec())
            .collect();
        let t = TokenTrie::new(&vocab, |id| id == 7);
        assert_eq!(t.num_tokens, 6);
        assert_eq!(t.num_nodes(), 5); // a, ab, abc, b, ba
        assert_eq!(t.max_len, 3);
        assert_eq!(t.longest_prefix(b"abd"), Some((1, 2)));
        assert_eq!(t.longest_prefix(b"abcd"), Some((2, 3)));
        assert_eq!(t.longest_prefix(b"bb"), Some((3, 1)));
        assert_eq!(t.longest_prefix(b"c"), None);
        assert_eq!(t.longest_prefix(b""), None);
        // Duplicate byte strings keep both ids (1 and 6 at node "ab").
        assert_eq!(t.tokens_at(1), &[1, 6]);
    }
}
