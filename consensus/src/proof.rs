//! RFC 9162 §2.1.3-2.1.4 Merkle audit paths: inclusion and consistency proofs, generated from
//! any source of subtree hashes and verified without trusting the server.
//!
//! Generation asks a [`Nodes`] source for the hash of *perfect* subtrees (aligned ranges of a
//! power-of-two size), so a store that keeps those hashes answers a proof in O(log² n) lookups;
//! [`LeafNodes`] computes them from leaf hashes (for tests and offline verifiers).

use crate::merkle::{node_hash, Hash};

/// Hashes of perfect subtrees: `(level, index)` covers leaves `[index·2^level, (index+1)·2^level)`.
pub trait Nodes {
    /// The hash at `(level, index)`, or None if it is not available (tree too small).
    fn node(&self, level: u32, index: u64) -> Option<Hash>;

    /// MTH of the `size` leaves from `offset` where that is not a perfect subtree (the ranges
    /// along the tree's right edge). Every path crosses that edge: a source asked for many
    /// proofs at one size remembers these few hashes instead of rehashing them per proof.
    fn edge(&self, offset: u64, size: u64) -> Option<Hash> {
        let k = split(size);
        Some(node_hash(&subtree(self, offset, k)?, &subtree(self, offset + k, size - k)?))
    }
}

/// Remembers the nodes another [`Nodes`] gave: the proofs of many leaves at one tree size
/// share their upper levels, and each node is read once.
pub struct Memo<'a> {
    inner: &'a dyn Nodes,
    seen: std::cell::RefCell<std::collections::BTreeMap<(u32, u64), Option<Hash>>>,
}

impl<'a> Memo<'a> {
    /// Reads through `inner`, remembering every answer.
    pub fn new(inner: &'a dyn Nodes) -> Self {
        Self { inner, seen: std::cell::RefCell::default() }
    }
}

impl Nodes for Memo<'_> {
    fn node(&self, level: u32, index: u64) -> Option<Hash> {
        if let Some(h) = self.seen.borrow().get(&(level, index)) {
            return *h;
        }
        let h = self.inner.node(level, index);
        self.seen.borrow_mut().insert((level, index), h);
        h
    }
}

/// Perfect-subtree hashes computed from a slice of leaf hashes.
pub struct LeafNodes<'a>(pub &'a [Hash]);

impl Nodes for LeafNodes<'_> {
    fn node(&self, level: u32, index: u64) -> Option<Hash> {
        let size = 1usize.checked_shl(level)?;
        let start = usize::try_from(index).ok()?.checked_mul(size)?;
        let leaves = self.0.get(start..start.checked_add(size)?)?;
        Some(crate::merkle::root_of(leaves))
    }
}

/// Largest power of two strictly smaller than `n` (n >= 2).
fn split(n: u64) -> u64 {
    1 << (n - 1).ilog2()
}

/// MTH of the `size` leaves starting at `offset` (offset aligned to the largest power of two
/// in `size`, as every range the RFC recursion visits is).
fn subtree<N: Nodes + ?Sized>(nodes: &N, offset: u64, size: u64) -> Option<Hash> {
    if size.is_power_of_two() {
        let level = size.trailing_zeros();
        return nodes.node(level, offset >> level);
    }
    nodes.edge(offset, size)
}

fn path(nodes: &dyn Nodes, m: u64, offset: u64, n: u64, out: &mut Vec<Hash>) -> Option<()> {
    if n <= 1 {
        return Some(());
    }
    let k = split(n);
    if m < k {
        path(nodes, m, offset, k, out)?;
        out.push(subtree(nodes, offset + k, n - k)?);
    } else {
        path(nodes, m - k, offset + k, n - k, out)?;
        out.push(subtree(nodes, offset, k)?);
    }
    Some(())
}

/// The root of the tree as it was at `size` leaves (for consistency checks against old heads).
pub fn root_at(nodes: &dyn Nodes, size: u64) -> Option<Hash> {
    if size == 0 {
        return Some(crate::merkle::empty_root());
    }
    subtree(nodes, 0, size)
}

/// The audit path of leaf `index` in the tree of `size` leaves (RFC 9162 `PATH(m, D[n])`).
pub fn inclusion_proof(nodes: &dyn Nodes, index: u64, size: u64) -> Option<Vec<Hash>> {
    if index >= size {
        return None;
    }
    let mut out = Vec::new();
    path(nodes, index, 0, size, &mut out)?;
    Some(out)
}

fn subproof(nodes: &dyn Nodes, m: u64, offset: u64, n: u64, complete: bool, out: &mut Vec<Hash>) -> Option<()> {
    if m == n {
        if !complete {
            out.push(subtree(nodes, offset, n)?);
        }
        return Some(());
    }
    let k = split(n);
    if m <= k {
        subproof(nodes, m, offset, k, complete, out)?;
        out.push(subtree(nodes, offset + k, n - k)?);
    } else {
        subproof(nodes, m - k, offset + k, n - k, false, out)?;
        out.push(subtree(nodes, offset, k)?);
    }
    Some(())
}

/// The consistency proof between trees of `first` and `second` leaves (RFC 9162 `PROOF`).
pub fn consistency_proof(nodes: &dyn Nodes, first: u64, second: u64) -> Option<Vec<Hash>> {
    if first == 0 || first > second {
        return None;
    }
    let mut out = Vec::new();
    if first < second {
        subproof(nodes, first, 0, second, true, &mut out)?;
    }
    Some(out)
}

/// RFC 9162 §2.1.3.2: does `proof` show leaf `index` with hash `leaf` in the tree `root` of `size`?
pub fn verify_inclusion(index: u64, size: u64, leaf: &Hash, proof: &[Hash], root: &Hash) -> bool {
    if index >= size {
        return false;
    }
    let (mut fnode, mut snode, mut r) = (index, size - 1, *leaf);
    for p in proof {
        if snode == 0 {
            return false;
        }
        if fnode & 1 == 1 || fnode == snode {
            r = node_hash(p, &r);
            while fnode & 1 == 0 && fnode != 0 {
                fnode >>= 1;
                snode >>= 1;
            }
        } else {
            r = node_hash(&r, p);
        }
        fnode >>= 1;
        snode >>= 1;
    }
    snode == 0 && r == *root
}

/// RFC 9162 §2.1.4.2: is the tree (`second`, `second_root`) an append-only extension of
/// (`first`, `first_root`)?
pub fn verify_consistency(first: u64, second: u64, first_root: &Hash, second_root: &Hash, proof: &[Hash]) -> bool {
    if first == 0 || first > second {
        return false;
    }
    if first == second {
        return proof.is_empty() && first_root == second_root;
    }
    let mut path: Vec<Hash> = Vec::with_capacity(proof.len() + 1);
    if first.is_power_of_two() {
        path.push(*first_root);
    }
    path.extend_from_slice(proof);
    let Some((start, rest)) = path.split_first() else { return false };
    let (mut fnode, mut snode) = (first - 1, second - 1);
    while fnode & 1 == 1 {
        fnode >>= 1;
        snode >>= 1;
    }
    let (mut fr, mut sr) = (*start, *start);
    for c in rest {
        if snode == 0 {
            return false;
        }
        if fnode & 1 == 1 || fnode == snode {
            fr = node_hash(c, &fr);
            sr = node_hash(c, &sr);
            while fnode & 1 == 0 && fnode != 0 {
                fnode >>= 1;
                snode >>= 1;
            }
        } else {
            sr = node_hash(&sr, c);
        }
        fnode >>= 1;
        snode >>= 1;
    }
    snode == 0 && fr == *first_root && sr == *second_root
}

/// A multiproof of many leaves at once: the hash of every maximal subtree of the tree of `size`
/// leaves that holds none of `indices` (sorted, distinct, each below `size`), in the order a
/// left-to-right walk of the RFC 9162 tree meets them. A lock of thousands of versions proves
/// them all with one list far shorter than their separate audit paths.
pub fn multi_proof(nodes: &dyn Nodes, indices: &[u64], size: u64) -> Option<Vec<Hash>> {
    multi_proof_by(indices, size, &|offset, n| subtree(nodes, offset, n))
}

/// The subtrees (`offset`, width) a multiproof of `indices` names, in its order, each asked
/// of `hash`; `None` for indices that are not sorted, distinct and below `size`. A holder of
/// some subtree hashes without the tree (an importer combining the multiproofs of several
/// files, [`multi_root_seeing`]) builds a multiproof of its own from them.
pub fn multi_proof_by(indices: &[u64], size: u64, hash: &dyn Fn(u64, u64) -> Option<Hash>) -> Option<Vec<Hash>> {
    fn walk(
        hash: &dyn Fn(u64, u64) -> Option<Hash>,
        idx: &[u64],
        offset: u64,
        n: u64,
        out: &mut Vec<Hash>,
    ) -> Option<()> {
        if idx.is_empty() {
            out.push(hash(offset, n)?);
            return Some(());
        }
        if n == 1 {
            return Some(());
        }
        let k = split(n);
        let cut = idx.partition_point(|&i| i < offset + k);
        walk(hash, &idx[..cut], offset, k, out)?;
        walk(hash, &idx[cut..], offset + k, n - k, out)
    }
    if indices.is_empty() || !indices.windows(2).all(|w| w[0] < w[1]) || indices.last().is_some_and(|&l| l >= size) {
        return None;
    }
    let mut out = Vec::new();
    walk(hash, indices, 0, size, &mut out)?;
    Some(out)
}

/// The root that `leaves` (`(index, leaf hash)`, sorted by index, distinct) and a
/// [`multi_proof`] imply for a tree of `size` leaves; `None` when they do not fit together
/// (so a caller compares the result with a signed root).
pub fn multi_root(leaves: &[(u64, Hash)], size: u64, proof: &[Hash]) -> Option<Hash> {
    multi_root_seeing(leaves, size, proof, &mut |_, _, _| {})
}

/// [`multi_root`], telling `seen` every subtree hash it met (`offset`, width, hash): the
/// leaves, the proof's subtrees and every node it computed. A check that keeps them can later
/// prove any subset of the leaves ([`multi_proof_by`]) without the tree.
pub fn multi_root_seeing(
    leaves: &[(u64, Hash)],
    size: u64,
    proof: &[Hash],
    seen: &mut dyn FnMut(u64, u64, &Hash),
) -> Option<Hash> {
    fn walk<'p>(
        leaves: &[(u64, Hash)],
        offset: u64,
        n: u64,
        proof: &mut impl Iterator<Item = &'p Hash>,
        seen: &mut dyn FnMut(u64, u64, &Hash),
    ) -> Option<Hash> {
        let h = if leaves.is_empty() {
            *proof.next()?
        } else if n == 1 {
            match leaves {
                [(i, h)] if *i == offset => *h,
                _ => return None,
            }
        } else {
            let k = split(n);
            let cut = leaves.partition_point(|l| l.0 < offset + k);
            let left = walk(&leaves[..cut], offset, k, proof, seen)?;
            let right = walk(&leaves[cut..], offset + k, n - k, proof, seen)?;
            node_hash(&left, &right)
        };
        seen(offset, n, &h);
        Some(h)
    }
    if leaves.is_empty() || !leaves.windows(2).all(|w| w[0].0 < w[1].0) || leaves.last().is_some_and(|l| l.0 >= size) {
        return None;
    }
    let mut it = proof.iter();
    let root = walk(leaves, 0, size, &mut it, seen)?;
    it.next().is_none().then_some(root)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::merkle::{leaf_hash, root_of};
    use proptest::prelude::*;

    fn leaves(n: u64) -> Vec<Hash> {
        (0..n).map(|i| leaf_hash(&i.to_be_bytes())).collect()
    }

    #[test]
    fn the_subtrees_several_multiproofs_show_prove_any_subset_of_their_leaves() {
        for n in 1..=8u64 {
            let l = leaves(n);
            let nodes = LeafNodes(&l);
            for mask in 1u32..(1 << n) {
                // Two files: every other leaf of the subset in each.
                let idx: Vec<u64> = (0..n).filter(|i| mask & (1 << i) != 0).collect();
                let mut known = std::collections::BTreeMap::new();
                for file in [0, 1] {
                    let mine: Vec<u64> = idx.iter().skip(file).step_by(2).copied().collect();
                    if mine.is_empty() {
                        continue;
                    }
                    let proof = multi_proof(&nodes, &mine, n).unwrap();
                    let given: Vec<(u64, Hash)> = mine.iter().map(|&i| (i, l[i as usize])).collect();
                    let root = multi_root_seeing(&given, n, &proof, &mut |o, w, h| {
                        known.insert((o, w), *h);
                    });
                    assert_eq!(root, Some(root_of(&l)));
                }
                let mut sub = mask;
                while sub != 0 {
                    let some: Vec<u64> = (0..n).filter(|i| sub & (1 << i) != 0).collect();
                    let combined = multi_proof_by(&some, n, &|o, w| known.get(&(o, w)).copied());
                    assert_eq!(combined, multi_proof(&nodes, &some, n), "{some:?} of {idx:?} in {n}");
                    sub = (sub - 1) & mask;
                }
            }
        }
    }

    #[test]
    fn multiproofs_of_every_subset_of_small_trees_verify_and_nothing_else_does() {
        for n in 1..=12u64 {
            let l = leaves(n);
            let (nodes, root) = (LeafNodes(&l), root_of(&l));
            for mask in 1u32..(1 << n) {
                let idx: Vec<u64> = (0..n).filter(|i| mask & (1 << i) != 0).collect();
                let p = multi_proof(&nodes, &idx, n).unwrap();
                let known: Vec<(u64, Hash)> = idx.iter().map(|&i| (i, l[i as usize])).collect();
                assert_eq!(multi_root(&known, n, &p), Some(root), "{idx:?} of {n}");
                let mut changed = known.clone();
                changed[0].1 = leaf_hash(b"other");
                assert_ne!(multi_root(&changed, n, &p), Some(root), "a changed leaf of {idx:?}");
                if !p.is_empty() {
                    assert_eq!(multi_root(&known, n, &p[1..]), None, "a short proof");
                }
                let mut long = p.clone();
                long.push(root);
                assert_eq!(multi_root(&known, n, &long), None, "a proof too long");
            }
        }
    }

    #[test]
    fn every_inclusion_and_consistency_proof_of_small_trees_verifies() {
        for n in 1..=33u64 {
            let l = leaves(n);
            let nodes = LeafNodes(&l);
            let root = root_of(&l);
            for m in 0..n {
                let p = inclusion_proof(&nodes, m, n).unwrap();
                assert!(verify_inclusion(m, n, &l[m as usize], &p, &root), "leaf {m} of {n}");
                assert!(!verify_inclusion(m, n, &leaf_hash(b"other"), &p, &root));
            }
            for first in 1..=n {
                let p = consistency_proof(&nodes, first, n).unwrap();
                let first_root = root_of(&l[..first as usize]);
                assert!(verify_consistency(first, n, &first_root, &root, &p), "{first} -> {n}");
            }
        }
    }

    #[test]
    fn rfc6962_style_proof_lengths() {
        // In an 8-leaf tree every audit path has 3 nodes; 4 -> 8 needs the right half only,
        // 7 -> 8 needs leaf 6, leaf 7, the node over 4..6 and the left half.
        let l = leaves(8);
        let nodes = LeafNodes(&l);
        assert_eq!(inclusion_proof(&nodes, 5, 8).unwrap().len(), 3);
        assert_eq!(consistency_proof(&nodes, 4, 8).unwrap().len(), 1);
        assert_eq!(consistency_proof(&nodes, 7, 8).unwrap().len(), 4);
        assert!(inclusion_proof(&nodes, 8, 8).is_none());
    }

    proptest! {
        #[test]
        fn any_flipped_bit_breaks_a_proof(n in 2u64..200, m_seed in any::<u64>(), first_seed in any::<u64>(), bit in 0usize..256, which in any::<u64>()) {
            let l = leaves(n);
            let nodes = LeafNodes(&l);
            let root = root_of(&l);
            let m = m_seed % n;
            let mut p = inclusion_proof(&nodes, m, n).unwrap();
            prop_assert!(verify_inclusion(m, n, &l[m as usize], &p, &root));
            let flip = |h: &mut Hash| h[bit / 8] ^= 1 << (bit % 8);
            let mut bad_root = root;
            flip(&mut bad_root);
            prop_assert!(!verify_inclusion(m, n, &l[m as usize], &p, &bad_root));
            let mut bad_leaf = l[m as usize];
            flip(&mut bad_leaf);
            prop_assert!(!verify_inclusion(m, n, &bad_leaf, &p, &root));
            let i = (which % p.len() as u64) as usize;
            flip(&mut p[i]);
            prop_assert!(!verify_inclusion(m, n, &l[m as usize], &p, &root));

            let first = 1 + first_seed % (n - 1);
            let mut c = consistency_proof(&nodes, first, n).unwrap();
            let first_root = root_of(&l[..first as usize]);
            prop_assert!(verify_consistency(first, n, &first_root, &root, &c));
            prop_assert!(!verify_consistency(first, n, &first_root, &bad_root, &c));
            if !c.is_empty() {
                let i = (which % c.len() as u64) as usize;
                flip(&mut c[i]);
                prop_assert!(!verify_consistency(first, n, &first_root, &root, &c));
            }
        }
    }
}
