//! Inclusion proofs of many leaves at one tree size (a Bulk export's proof files): asked in
//! ascending leaf order, each 16-leaf block's headers are read once with one range scan and
//! its small subtrees hashed in memory, and the stored subtree hashes above are remembered.
//! [`crate::proof::inclusion_proof`] over a [`StateView`] alone reads the record of every leaf
//! under each sibling below level 4: fifteen record reads a leaf.
//!
//! The small subtree hashes of every block read stay in memory (about 1 KB a block), so that
//! after one ascending pass over many leaves the multiproofs of any subsets of them
//! ([`PathsAt::multi_proof`]) read nothing again.

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::io;

use crate::invalid_data;
use crate::merkle::{leaf_hash, node_hash, Hash};
use crate::proof::Nodes;
use crate::state_machine::{decode, record_key, LeafHeader, StateView, STORED_NODE_LEVEL};

/// Leaves per block: the subtrees below [`STORED_NODE_LEVEL`] are recomputed from them.
const BLOCK: u64 = 1 << STORED_NODE_LEVEL;
/// Blocks remembered at once (a path at the tree's right edge may reach a few others).
const BLOCKS_KEPT: usize = 8;

/// A block's leaves that exist (their headers and encodings, by position in the block) and
/// the hashes of its subtrees: `nodes[level][i]`, levels 0 (leaves) to [`STORED_NODE_LEVEL`];
/// `None` where a leaf under it is missing.
struct Block {
    headers: Vec<Option<(LeafHeader, Vec<u8>)>>,
    nodes: Vec<Vec<Option<Hash>>>,
}

impl Block {
    /// The block of these leaves (each header with its encoding, the leaf data).
    fn new(headers: Vec<Option<(LeafHeader, Vec<u8>)>>) -> Self {
        let leaves: Vec<Option<Hash>> = headers.iter().map(|h| h.as_ref().map(|(_, e)| leaf_hash(e))).collect();
        let mut nodes = vec![leaves];
        while nodes.last().is_some_and(|l| l.len() > 1) {
            let below = nodes.last().map(Vec::as_slice).unwrap_or_default();
            let up = below.chunks(2).map(|p| Some(node_hash(p[0].as_ref()?, p.get(1)?.as_ref()?))).collect();
            nodes.push(up);
        }
        Self { headers, nodes }
    }
}

/// A stored record's header and its leaf data: the record's encoding begins with the
/// header's, so the leaf data is that prefix, taken as stored (neither the rest of the record
/// decoded nor the header encoded again).
fn header_and_data(record: &[u8]) -> io::Result<(LeafHeader, Vec<u8>)> {
    let header: LeafHeader = decode(record)?;
    let len = bincode::serialized_size(&header).map_err(|e| invalid_data(e.to_string()))?;
    let data = usize::try_from(len).ok().and_then(|n| record.get(..n));
    let data =
        data.ok_or_else(|| invalid_data(format!("a record of {} bytes with a header of {len}", record.len())))?;
    Ok((header, data.to_vec()))
}

/// A leaf's header, its encoding (the leaf data) and its audit path.
pub type Proof = (LeafHeader, Vec<u8>, Vec<Hash>);

/// A stored subtree hash and its index at its level (None: the tree lacks it).
type Stored = (u64, Option<Hash>);

/// Proofs at tree size `size`, read through `view`.
pub struct PathsAt<'a> {
    view: &'a StateView,
    size: u64,
    blocks: RefCell<BTreeMap<u64, Block>>,
    /// The subtree hashes of the blocks read and since dropped from `blocks`.
    small: RefCell<BTreeMap<u64, Vec<Vec<Option<Hash>>>>>,
    stored: RefCell<BTreeMap<(u32, u64), Option<Hash>>>,
    /// The last stored node asked at each level: proofs asked in leaf order share most of
    /// their upper path with the one before.
    last: RefCell<Vec<Option<Stored>>>,
    /// The hashes of the ranges along the tree's right edge ([`Nodes::edge`]).
    edges: RefCell<BTreeMap<(u64, u64), Option<Hash>>>,
    failed: RefCell<Option<io::Error>>,
}

impl<'a> PathsAt<'a> {
    /// Proofs to the tree of the first `size` leaves.
    pub fn new(view: &'a StateView, size: u64) -> Self {
        Self {
            view,
            size,
            blocks: RefCell::default(),
            small: RefCell::default(),
            stored: RefCell::default(),
            last: RefCell::new(vec![None; 64]),
            edges: RefCell::default(),
            failed: RefCell::default(),
        }
    }

    /// Leaf `leaf`'s header, its encoding (the leaf data) and its audit path, or `None` when
    /// the leaf is not below the size.
    pub fn proof(&self, leaf: u64) -> io::Result<Option<Proof>> {
        self.proof_with(leaf, |h, data, path| (h.clone(), data.to_vec(), path.to_vec()))
    }

    /// [`PathsAt::proof`] handed to `f`, borrowed.
    pub fn proof_with<T>(&self, leaf: u64, f: impl FnOnce(&LeafHeader, &[u8], &[Hash]) -> T) -> io::Result<Option<T>> {
        if leaf >= self.size || !self.with_block(leaf / BLOCK, |b| b.headers[(leaf % BLOCK) as usize].is_some())? {
            return Ok(None);
        }
        let path = crate::proof::inclusion_proof(self, leaf, self.size);
        if let Some(e) = self.failed.borrow_mut().take() {
            return Err(e);
        }
        let Some(path) = path else { return Ok(None) };
        self.with_block(leaf / BLOCK, |b| b.headers[(leaf % BLOCK) as usize].as_ref().map(|(h, d)| f(h, d, &path)))
    }

    /// Leaf `leaf`'s header and its encoding (the leaf data) handed to `f`, without a path;
    /// `None` when the leaf is not below the size.
    pub fn leaf_with<T>(&self, leaf: u64, f: impl FnOnce(&LeafHeader, &[u8]) -> T) -> io::Result<Option<T>> {
        if leaf >= self.size {
            return Ok(None);
        }
        self.with_block(leaf / BLOCK, |b| b.headers[(leaf % BLOCK) as usize].as_ref().map(|(h, d)| f(h, d)))
    }

    /// The [`crate::proof::multi_proof`] of `leaves` (sorted, distinct) at this size; `None`
    /// when one is not below it.
    pub fn multi_proof(&self, leaves: &[u64]) -> io::Result<Option<Vec<Hash>>> {
        let proof = crate::proof::multi_proof(self, leaves, self.size);
        match self.failed.borrow_mut().take() {
            Some(e) => Err(e),
            None => Ok(proof),
        }
    }

    fn with_block<T>(&self, block: u64, f: impl FnOnce(&Block) -> T) -> io::Result<T> {
        if let Some(b) = self.blocks.borrow().get(&block) {
            return Ok(f(b));
        }
        let first = block * BLOCK;
        let mut headers: Vec<Option<(LeafHeader, Vec<u8>)>> = vec![None; BLOCK as usize];
        for kv in self.view.kv.range(&record_key(first), &record_key(first + BLOCK), false) {
            let (k, v) = kv?;
            let Some(leaf) = crate::kv::read_be(&k[1..]) else { continue };
            if let Some(slot) = leaf.checked_sub(first).and_then(|i| headers.get_mut(usize::try_from(i).ok()?)) {
                *slot = Some(header_and_data(&v)?);
            }
        }
        let loaded = Block::new(headers);
        let out = f(&loaded);
        let mut blocks = self.blocks.borrow_mut();
        if blocks.len() >= BLOCKS_KEPT {
            if let Some((n, dropped)) = blocks.pop_first() {
                self.small.borrow_mut().insert(n, dropped.nodes);
            }
        }
        blocks.insert(block, loaded);
        Ok(out)
    }

    fn small(&self, level: u32, index: u64) -> io::Result<Option<Hash>> {
        let per_block = BLOCK >> level;
        let (block, at) = (index / per_block, (index % per_block) as usize);
        if let Some(nodes) = self.small.borrow().get(&block) {
            return Ok(nodes[level as usize][at]);
        }
        self.with_block(block, |b| b.nodes[level as usize][at])
    }
}

impl Nodes for PathsAt<'_> {
    fn node(&self, level: u32, index: u64) -> Option<Hash> {
        let got = if level < STORED_NODE_LEVEL {
            self.small(level, index)
        } else {
            let slot = level as usize;
            if let Some(Some((at, h))) = self.last.borrow().get(slot) {
                if *at == index {
                    return *h;
                }
            }
            let known = self.stored.borrow().get(&(level, index)).copied();
            let h = match known {
                Some(h) => Ok(h),
                None => self.view.node(level, index),
            };
            if let Ok(h) = &h {
                self.stored.borrow_mut().insert((level, index), *h);
                if let Some(last) = self.last.borrow_mut().get_mut(slot) {
                    *last = Some((index, *h));
                }
            }
            h
        };
        got.unwrap_or_else(|e| {
            *self.failed.borrow_mut() = Some(e);
            None
        })
    }

    fn edge(&self, offset: u64, size: u64) -> Option<Hash> {
        if let Some(h) = self.edges.borrow().get(&(offset, size)) {
            return *h;
        }
        let k = 1u64 << (size - 1).ilog2();
        let h = (|| {
            let (left, right) = (self.range(offset, k)?, self.range(offset + k, size - k)?);
            Some(crate::merkle::node_hash(&left, &right))
        })();
        self.edges.borrow_mut().insert((offset, size), h);
        h
    }
}

impl PathsAt<'_> {
    /// MTH of `size` leaves from `offset` (a perfect subtree or an edge range).
    fn range(&self, offset: u64, size: u64) -> Option<Hash> {
        if size.is_power_of_two() {
            let level = size.trailing_zeros();
            self.node(level, offset >> level)
        } else {
            self.edge(offset, size)
        }
    }
}
