//! Verification rules: which drafted tokens the target accepts and what it
//! appends after them. Greedy: the longest prefix equal to the target's
//! argmax, then the argmax at the first mismatch (or after the block).
//! Sampling: the standard lossless speculative rule — accept draft `d` with
//! probability min(1, p(d)/q(d)), on rejection draw from norm(max(0, p−q)) —
//! specialised to a deterministic drafter, whose q is a point mass on `d`:
//! accept with probability p(d); on rejection draw from p with `d` removed.
//! Either way every committed token is distributed exactly as plain sampling
//! from the target would produce it.

/// Probability of `id` under a distribution given as (id, p) pairs.
pub fn prob_of(dist: &[(u32, f32)], id: u32) -> f32 {
    dist.iter().find(|d| d.0 == id).map_or(0.0, |d| d.1)
}

/// Point-mass acceptance test: accept `draft` when `u < p(draft)`, `u` uniform in [0, 1).
pub fn accept_point_mass(dist: &[(u32, f32)], draft: u32, u: f32) -> bool {
    u < prob_of(dist, draft)
}

/// The distribution to resample from after rejecting `draft`: norm(max(0, p − δ_draft)),
/// i.e. p without `draft`, renormalised. When nothing is left (p was a point mass on
/// the draft, so rejection had probability 0) p itself is returned.
pub fn residual_without(dist: &[(u32, f32)], draft: u32) -> Vec<(u32, f32)> {
    let rest: Vec<(u32, f32)> = dist.iter().copied().filter(|d| d.0 != draft && d.1 > 0.0).collect();
    let total: f32 = rest.iter().map(|d| d.1).sum();
    if total <= 0.0 {
        return dist.to_vec();
    }
    rest.into_iter().map(|(i, p)| (i, p / total)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn point_mass_rule_reproduces_p_exactly() {
        // P(out = x) = p(d)·[x = d] + (1 − p(d))·residual(x) must equal p(x).
        let p = vec![(0u32, 0.5f32), (1, 0.3), (2, 0.2)];
        for d in 0..4u32 {
            let pd = prob_of(&p, d);
            let r = residual_without(&p, d);
            for &(x, px) in &p {
                let got = if x == d { pd } else { 0.0 } + (1.0 - pd) * prob_of(&r, x);
                assert!((got - px).abs() < 1e-6, "draft {d}, token {x}: {got} vs {px}");
            }
        }
    }

    #[test]
    fn acceptance_threshold_is_p_of_draft() {
        let p = vec![(7u32, 0.25f32), (9, 0.75)];
        assert!(accept_point_mass(&p, 7, 0.2));
        assert!(!accept_point_mass(&p, 7, 0.3));
        assert!(!accept_point_mass(&p, 3, 0.0));
        assert_eq!(residual_without(&[(4, 1.0)], 4), vec![(4, 1.0)]);
    }
}
