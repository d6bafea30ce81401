//! Inclusion proofs of many leaves at one tree size (a Bulk export's proof files): asked in
//! ascending leaf order, each 16-leaf block's headers are read once with one range scan and
//! its small subtrees hashed in memory, and the stored subtree hashes above are remembered.
//! [`crate::proof::inclusion_proof`] over a [`StateView`] alone reads the record of every leaf
//! under each sibling below level 4: fifteen record reads a leaf.

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::io;

use crate::merkle::{leaf_hash, node_hash, Hash};
use crate::proof::Nodes;
use crate::state_machine::{decode, record_key, LeafHeader, StateView, STORED_NODE_LEVEL};

/// Leaves per block: the subtrees below [`STORED_NODE_LEVEL`] are recomputed from them.
const BLOCK: u64 = 1 << STORED_NODE_LEVEL;
/// Blocks remembered at once (a path at the tree's right edge may reach a few others).
const BLOCKS_KEPT: usize = 8;

/// A block's leaves that exist: their headers and leaf hashes, by position in the block.
type Block = Vec<Option<(LeafHeader, Hash)>>;

/// Proofs at tree size `size`, read through `view`.
pub struct PathsAt<'a> {
    view: &'a StateView,
    size: u64,
    blocks: RefCell<BTreeMap<u64, Block>>,
    stored: RefCell<BTreeMap<(u32, u64), Option<Hash>>>,
    failed: RefCell<Option<io::Error>>,
}

impl<'a> PathsAt<'a> {
    /// Proofs to the tree of the first `size` leaves.
    pub fn new(view: &'a StateView, size: u64) -> Self {
        Self { view, size, blocks: RefCell::default(), stored: RefCell::default(), failed: RefCell::default() }
    }

    /// Leaf `leaf`'s header and its audit path, or `None` when the leaf is not below the size.
    pub fn proof(&self, leaf: u64) -> io::Result<Option<(LeafHeader, Vec<Hash>)>> {
        if leaf >= self.size {
            return Ok(None);
        }
        let header = self.with_block(leaf / BLOCK, |b| b[(leaf % BLOCK) as usize].as_ref().map(|(h, _)| h.clone()))?;
        let Some(header) = header else { return Ok(None) };
        let path = crate::proof::inclusion_proof(self, leaf, self.size);
        if let Some(e) = self.failed.borrow_mut().take() {
            return Err(e);
        }
        Ok(path.map(|p| (header, p)))
    }

    fn with_block<T>(&self, block: u64, f: impl FnOnce(&Block) -> T) -> io::Result<T> {
        if let Some(b) = self.blocks.borrow().get(&block) {
            return Ok(f(b));
        }
        let first = block * BLOCK;
        let mut leaves: Block = vec![None; BLOCK as usize];
        for kv in self.view.kv.range(&record_key(first), &record_key(first + BLOCK), false) {
            let (k, v) = kv?;
            let Some(leaf) = crate::kv::read_be(&k[1..]) else { continue };
            let header: LeafHeader = decode(&v)?;
            let hash = leaf_hash(&header.encode());
            if let Some(slot) = leaves.get_mut((leaf - first) as usize) {
                *slot = Some((header, hash));
            }
        }
        let out = f(&leaves);
        let mut blocks = self.blocks.borrow_mut();
        if blocks.len() >= BLOCKS_KEPT {
            blocks.pop_first();
        }
        blocks.insert(block, leaves);
        Ok(out)
    }

    fn small(&self, level: u32, index: u64) -> io::Result<Option<Hash>> {
        let first = index << level;
        let (block, at) = (first / BLOCK, (first % BLOCK) as usize);
        self.with_block(block, |b| {
            let mut level_hashes: Vec<Hash> = Vec::with_capacity(1 << level);
            for slot in &b[at..at + (1 << level)] {
                level_hashes.push(slot.as_ref()?.1);
            }
            while level_hashes.len() > 1 {
                level_hashes = level_hashes.chunks(2).map(|p| node_hash(&p[0], &p[1])).collect();
            }
            level_hashes.pop()
        })
    }
}

impl Nodes for PathsAt<'_> {
    fn node(&self, level: u32, index: u64) -> Option<Hash> {
        let got = if level < STORED_NODE_LEVEL {
            self.small(level, index)
        } else {
            if let Some(h) = self.stored.borrow().get(&(level, index)) {
                return *h;
            }
            let h = self.view.node(level, index);
            if let Ok(h) = &h {
                self.stored.borrow_mut().insert((level, index), *h);
            }
            h
        };
        got.unwrap_or_else(|e| {
            *self.failed.borrow_mut() = Some(e);
            None
        })
    }
}
