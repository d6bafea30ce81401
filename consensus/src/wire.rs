//! bincode 1's default encoding read field by field, for the decoders on hot paths.
//!
//! That encoding (what `bincode::serialize` writes) is fixed-width little-endian integers, a
//! byte string or sequence as its u64 length first, `[u8; 32]` as its 32 bytes, an enum as
//! its u32 variant index. serde's visitors read a 32-byte hash one element at a time and a
//! struct through a visitor per field; `verify` spent a third of its leaf walk there. The
//! readers built on this (see `audit::RecordRef`) are pinned to `bincode::serialize` of the
//! owned types by tests.

use crate::merkle::Hash;

/// A position in an encoding; every read checks the bounds.
pub(crate) struct Cursor<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl<'a> Cursor<'a> {
    pub(crate) fn new(bytes: &'a [u8]) -> Self {
        Self { bytes, at: 0 }
    }

    /// How far into the encoding the reads have come.
    pub(crate) fn position(&self) -> usize {
        self.at
    }

    /// Bytes not read yet.
    pub(crate) fn remaining(&self) -> usize {
        self.bytes.len() - self.at
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], String> {
        let end =
            self.at.checked_add(n).filter(|&end| end <= self.bytes.len()).ok_or_else(|| {
                format!("ends at byte {} where {n} more were expected at {}", self.bytes.len(), self.at)
            })?;
        let out = &self.bytes[self.at..end];
        self.at = end;
        Ok(out)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], String> {
        let mut out = [0; N];
        out.copy_from_slice(self.take(N)?);
        Ok(out)
    }

    pub(crate) fn u16(&mut self) -> Result<u16, String> {
        Ok(u16::from_le_bytes(self.array()?))
    }

    pub(crate) fn u32(&mut self) -> Result<u32, String> {
        Ok(u32::from_le_bytes(self.array()?))
    }

    pub(crate) fn u64(&mut self) -> Result<u64, String> {
        Ok(u64::from_le_bytes(self.array()?))
    }

    pub(crate) fn i64(&mut self) -> Result<i64, String> {
        Ok(i64::from_le_bytes(self.array()?))
    }

    /// A byte string (or a `str`, not checked as text): its length, then its bytes.
    pub(crate) fn bytes(&mut self) -> Result<&'a [u8], String> {
        let len = self.u64()?;
        self.take(usize::try_from(len).map_err(|_| format!("a length of {len} bytes"))?)
    }

    pub(crate) fn hash(&mut self) -> Result<Hash, String> {
        self.array()
    }

    /// A sequence of hashes: its count, then 32 bytes each.
    pub(crate) fn hashes(&mut self) -> Result<Vec<Hash>, String> {
        let count = self.u64()?;
        // The count is checked against what is left before anything is allocated for it.
        let n = usize::try_from(count).ok().filter(|&n| n <= self.remaining() / 32).ok_or_else(|| {
            format!("{count} hashes announced at byte {} with {} bytes left", self.at, self.remaining())
        })?;
        (0..n).map(|_| self.hash()).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_what_bincode_writes_and_refuses_short_input() {
        let value: (u16, u32, u64, i64, String, [u8; 32], Vec<[u8; 32]>) =
            (7, 70_000, 1 << 40, -3, "Patient".into(), [9; 32], vec![[1; 32], [2; 32]]);
        let raw = bincode::serialize(&value).unwrap();
        let mut c = Cursor::new(&raw);
        assert_eq!(
            (c.u16(), c.u32(), c.u64(), c.i64(), c.bytes(), c.hash(), c.hashes()),
            (Ok(7), Ok(70_000), Ok(1 << 40), Ok(-3), Ok(&b"Patient"[..]), Ok([9; 32]), Ok(vec![[1; 32], [2; 32]]))
        );
        assert_eq!((c.position(), c.remaining()), (raw.len(), 0));
        assert!(c.u16().is_err(), "nothing is left");

        // A length or count beyond the input is refused, not allocated.
        let mut huge = u64::MAX.to_le_bytes().to_vec();
        assert!(Cursor::new(&huge).bytes().is_err());
        assert!(Cursor::new(&huge).hashes().is_err());
        huge.extend([0; 31]);
        huge[..8].copy_from_slice(&1u64.to_le_bytes());
        assert!(Cursor::new(&huge).hashes().is_err(), "31 bytes are not a hash");
    }
}
