//! RFC 9162 (Certificate Transparency v2) Merkle tree hashing over ledger leaves.
//!
//! Leaves are appended in commit order; the tree is kept as a *frontier*: the roots of the
//! perfect subtrees that make up the current size, largest first. That is enough to append in
//! O(log n) and to compute the root of the whole tree; proofs (the tamper-evidence issue) read
//! the stored leaf hashes.

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// A SHA-256 digest: a leaf, node or root hash.
pub type Hash = [u8; 32];

/// `MTH({d0}) = SHA-256(0x00 || d0)`.
pub fn leaf_hash(leaf: &[u8]) -> Hash {
    let mut h = Sha256::new();
    h.update([0u8]);
    h.update(leaf);
    h.finalize().into()
}

/// `SHA-256(0x01 || left || right)`.
pub fn node_hash(left: &Hash, right: &Hash) -> Hash {
    let mut h = Sha256::new();
    h.update([1u8]);
    h.update(left);
    h.update(right);
    h.finalize().into()
}

/// The hash of the empty tree, `SHA-256()`.
pub fn empty_root() -> Hash {
    Sha256::digest([]).into()
}

/// The right edge of the tree: enough to append a leaf and compute the root.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct Frontier {
    /// Leaves in the tree.
    pub size: u64,
    /// Roots of perfect subtrees, largest (leftmost) first; their sizes are the set bits of `size`.
    pub nodes: Vec<Hash>,
}

impl Frontier {
    /// Appends one leaf hash.
    pub fn append(&mut self, leaf: Hash) {
        self.append_nodes(leaf, |_, _, _| {});
    }

    /// Appends `leaf` and reports every perfect subtree it completes as `(level, index, hash)`,
    /// the leaf itself first (level 0). Storing these makes any proof O(log² n) lookups.
    pub fn append_nodes(&mut self, leaf: Hash, mut completed: impl FnMut(u32, u64, Hash)) {
        let index = self.size;
        let mut node = leaf;
        let mut size = self.size;
        let mut level = 0;
        completed(0, index, node);
        // Each trailing one bit of the old size is a subtree of equal height to merge with.
        while size & 1 == 1 {
            let left = self.nodes.pop().unwrap_or_default();
            node = node_hash(&left, &node);
            size >>= 1;
            level += 1;
            completed(level, index >> level, node);
        }
        self.nodes.push(node);
        self.size += 1;
    }

    /// The RFC 9162 root hash of the tree of `size` leaves.
    pub fn root(&self) -> Hash {
        let mut it = self.nodes.iter().rev();
        let Some(first) = it.next() else { return empty_root() };
        it.fold(*first, |acc, left| node_hash(left, &acc))
    }
}

/// Reference implementation of RFC 9162 §2.1.1 MTH, used by tests and by `verify`.
pub fn root_of(leaves: &[Hash]) -> Hash {
    match leaves.len() {
        0 => empty_root(),
        1 => leaves[0],
        n => {
            let k = (n as u64).next_power_of_two() as usize / 2;
            let k = if k == n { n / 2 } else { k };
            node_hash(&root_of(&leaves[..k]), &root_of(&leaves[k..]))
        }
    }
}

/// The bytes a tree-head signature covers: a domain tag, then size, root and time (ms since the
/// epoch), big-endian, so no other signed message of ours can be mistaken for one.
pub fn tree_head_message(size: u64, root: &Hash, timestamp_ms: i64) -> Vec<u8> {
    let mut m = b"fhir-ledger tree head v1\0".to_vec();
    m.extend_from_slice(&size.to_be_bytes());
    m.extend_from_slice(root);
    m.extend_from_slice(&timestamp_ms.to_be_bytes());
    m
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn rfc6962_empty_and_single_leaf_vectors() {
        // From RFC 6962 test vectors (certificate-transparency-go merkletree tests).
        assert_eq!(hex::encode(empty_root()), "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855");
        assert_eq!(hex::encode(leaf_hash(b"")), "6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d");
    }

    #[test]
    fn rfc6962_eight_leaf_root() {
        let data: [&[u8]; 8] = [
            b"",
            &[0x00],
            &[0x10],
            &[0x20, 0x21],
            &[0x30, 0x31],
            &[0x40, 0x41, 0x42, 0x43],
            &[0x50, 0x51, 0x52, 0x53, 0x54, 0x55, 0x56, 0x57],
            &[0x60, 0x61, 0x62, 0x63, 0x64, 0x65, 0x66, 0x67, 0x68, 0x69, 0x6a, 0x6b, 0x6c, 0x6d, 0x6e, 0x6f],
        ];
        let expected = [
            "6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d",
            "fac54203e7cc696cf0dfcb42c92a1d9dbaf70ad9e621f4bd8d98662f00e3c125",
            "aeb6bcfe274b70a14fb067a5e5578264db0fa9b51af5e0ba159158f329e06e77",
            "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
            "4e3bbb1f7b478dcfe71fb631631519a3bca12c9aefca1612bfce4c13a86264d4",
            "76e67dadbcdf1e10e1b74ddc608abd2f98dfb16fbce75277b5232a127f2087ef",
            "ddb89be403809e325750d3d263cd78929c2942b7942a34b77e122c9594a74c8c",
            "5dc9da79a70659a9ad559cb701ded9a2ab9d823aad2f4960cfe370eff4604328",
        ];
        let mut f = Frontier::default();
        for (i, d) in data.iter().enumerate() {
            f.append(leaf_hash(d));
            assert_eq!(hex::encode(f.root()), expected[i], "root of {} leaves", i + 1);
        }
    }

    proptest! {
        #[test]
        fn frontier_matches_recursive_definition(leaves in proptest::collection::vec(any::<[u8; 8]>(), 0..200)) {
            let hashes: Vec<Hash> = leaves.iter().map(|l| leaf_hash(l)).collect();
            let mut f = Frontier::default();
            for h in &hashes { f.append(*h); }
            prop_assert_eq!(f.root(), root_of(&hashes));
            prop_assert_eq!(f.nodes.len() as u32, f.size.count_ones());
        }
    }
}
