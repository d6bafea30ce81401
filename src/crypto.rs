//! Envelope encryption of resource bodies: XChaCha20-Poly1305 under a random data key per
//! patient compartment, each data key wrapped by the node's key-encryption key (KEK).
//! Destroying a compartment's wrapped key (crypto-shredding) makes its versions unreadable
//! while the ledger's digests of the ciphertext, and so every proof, stay valid.

use std::collections::HashMap;
use std::sync::RwLock;

use rand::RngCore;
use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, CHACHA20_POLY1305};

const NONCE: usize = 24;
/// Poly1305 tag bytes at the end of a sealed body.
const TAG: usize = 16;

#[derive(Debug, thiserror::Error)]
pub enum CryptoError {
    #[error("ciphertext does not authenticate (wrong key, or the data was altered)")]
    Authentication,
    #[error("no data key for compartment {0}")]
    NoKey(String),
}

pub type DataKey = [u8; 32];

/// XChaCha20-Poly1305 (draft-irtf-cfrg-xchacha-03, what the `chacha20poly1305` crate's
/// `XChaCha20Poly1305` is): IETF ChaCha20-Poly1305 under the HChaCha20 subkey of the key and
/// the nonce's first 16 bytes, with four zero bytes and the nonce's last 8 as its nonce. It
/// runs through ring, whose ChaCha20-Poly1305 picks its AVX2 code at run time: 3.3x the
/// RustCrypto crate's on this machine, whose AVX2 backend is not inlined unless the whole
/// build targets AVX2 (BENCHMARKS.md). A test pins the two byte for byte.
fn xchacha(key: &DataKey, nonce: &[u8; NONCE]) -> Result<(LessSafeKey, Nonce), CryptoError> {
    let (head, tail) = nonce.split_at(16);
    let head: &[u8; 16] = head.try_into().map_err(|_| CryptoError::Authentication)?;
    let subkey = chacha20::hchacha::<chacha20::cipher::consts::U10>(key.into(), head.into());
    let unbound = UnboundKey::new(&CHACHA20_POLY1305, subkey.as_slice()).map_err(|_| CryptoError::Authentication)?;
    let mut ietf = [0u8; 12];
    ietf[4..].copy_from_slice(tail);
    Ok((LessSafeKey::new(unbound), Nonce::assume_unique_for_key(ietf)))
}

pub fn seal(key: &DataKey, plaintext: &[u8], aad: &[u8]) -> Vec<u8> {
    let mut nonce = [0u8; NONCE];
    rand::thread_rng().fill_bytes(&mut nonce);
    seal_with(key, &nonce, plaintext, aad)
}

/// [`seal`] with a given nonce: `nonce || ciphertext || tag`.
fn seal_with(key: &DataKey, nonce: &[u8; NONCE], plaintext: &[u8], aad: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(NONCE + plaintext.len() + TAG);
    out.extend_from_slice(nonce);
    out.extend_from_slice(plaintext);
    // Sealing in memory with a 32-byte key cannot fail: the key is always the right size and
    // ring refuses only inputs above 256 GiB.
    let tag = xchacha(key, nonce)
        .ok()
        .and_then(|(k, n)| k.seal_in_place_separate_tag(n, Aad::from(aad), &mut out[NONCE..]).ok());
    match tag {
        Some(tag) => out.extend_from_slice(tag.as_ref()),
        None => out.clear(),
    }
    out
}

pub fn open(key: &DataKey, sealed: &[u8], aad: &[u8]) -> Result<Vec<u8>, CryptoError> {
    let mut copy = sealed.to_vec();
    let len = open_in_place(key, &mut copy, aad)?.len();
    copy.copy_within(NONCE..NONCE + len, 0);
    copy.truncate(len);
    Ok(copy)
}

/// [`open`] in place: `sealed` is decrypted where it lies, and the plaintext is the slice
/// returned (the nonce and tag around it are left as they were).
pub fn open_in_place<'a>(key: &DataKey, sealed: &'a mut [u8], aad: &[u8]) -> Result<&'a [u8], CryptoError> {
    if sealed.len() < NONCE + TAG {
        return Err(CryptoError::Authentication);
    }
    let (nonce, rest) = sealed.split_at_mut(NONCE);
    let nonce: &[u8; NONCE] = (&*nonce).try_into().map_err(|_| CryptoError::Authentication)?;
    let (k, n) = xchacha(key, nonce)?;
    let plain = k.open_in_place(n, Aad::from(aad), rest).map_err(|_| CryptoError::Authentication)?;
    Ok(plain)
}

/// The salt of a version's content commitment (`consensus::content_commitment`): an HMAC
/// of the version's AAD (`Type/id/version`) under its compartment's data key, so that only a
/// key holder can hand it out, and nobody can once the key is shredded.
pub fn content_salt(key: &DataKey, aad: &[u8]) -> [u8; 32] {
    Salter::new(key).salt(aad)
}

/// [`content_salt`] under one key, for many versions: the HMAC keyed and its domain
/// separation absorbed once (an export's proof files take a salt for every version, and
/// keying was about half of each).
#[derive(Clone)]
pub struct Salter(hmac::Hmac<sha2::Sha256>);

impl Salter {
    pub fn new(key: &DataKey) -> Self {
        use hmac::Mac;
        let mut mac = <hmac::Hmac<sha2::Sha256> as Mac>::new_from_slice(key)
            .unwrap_or_else(|e| unreachable!("HMAC takes a key of any length: {e}"));
        mac.update(b"fhir-ledger content salt v1\0");
        Self(mac)
    }

    pub fn salt(&self, aad: &[u8]) -> [u8; 32] {
        use hmac::Mac;
        let mut mac = self.0.clone();
        mac.update(aad);
        mac.finalize().into_bytes().into()
    }
}

/// The node's KEK and a cache of unwrapped compartment keys.
pub struct Keyring {
    kek: DataKey,
    cache: RwLock<HashMap<String, DataKey>>,
}

impl Keyring {
    pub fn new(kek: DataKey) -> Self {
        Self { kek, cache: RwLock::new(HashMap::new()) }
    }

    /// A fresh data key for `compartment` and its wrapped form for the ledger.
    pub fn new_data_key(&self, compartment: &str) -> (DataKey, Vec<u8>) {
        let mut dek = [0u8; 32];
        rand::thread_rng().fill_bytes(&mut dek);
        let wrapped = seal(&self.kek, &dek, compartment.as_bytes());
        (dek, wrapped)
    }

    pub fn forget(&self, compartment: &str) {
        if let Ok(mut c) = self.cache.write() {
            c.remove(compartment);
        }
    }

    /// Unwraps (and caches) the compartment's key from its ledger-stored wrapped form.
    pub fn unwrap(&self, compartment: &str, wrapped: &[u8]) -> Result<DataKey, CryptoError> {
        if let Some(k) = self.cache.read().ok().and_then(|c| c.get(compartment).copied()) {
            return Ok(k);
        }
        let raw = open(&self.kek, wrapped, compartment.as_bytes())?;
        let key: DataKey = raw.try_into().map_err(|_| CryptoError::Authentication)?;
        if let Ok(mut c) = self.cache.write() {
            c.insert(compartment.to_string(), key);
        }
        Ok(key)
    }
}

/// [`seal`] as URL-safe text, for values handed to clients (cursors, codes, cookies).
pub fn seal_text(key: &[u8; 32], plain: &[u8], aad: &[u8]) -> String {
    crate::codec::b64url(&seal(key, plain, aad))
}

/// Opens what [`seal_text`] made; `None` if it is not ours, was changed, or is for another
/// purpose.
pub fn open_text(key: &[u8; 32], text: &str, aad: &[u8]) -> Option<Vec<u8>> {
    open(key, &crate::codec::unb64url(text.trim()).ok()?, aad).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_tamper_detection() {
        let ring = Keyring::new([9; 32]);
        let (dek, wrapped) = ring.new_data_key("Patient/1");
        assert_eq!(ring.unwrap("Patient/1", &wrapped).unwrap(), dek);
        let sealed = seal(&dek, b"{\"a\":1}", b"Patient/1/1");
        assert_eq!(open(&dek, &sealed, b"Patient/1/1").unwrap(), b"{\"a\":1}");
        assert!(open(&dek, &sealed, b"Patient/1/2").is_err(), "AAD binds the version");
        let mut in_place = sealed.clone();
        assert_eq!(open_in_place(&dek, &mut in_place, b"Patient/1/1").unwrap(), b"{\"a\":1}");
        assert!(open_in_place(&dek, &mut sealed.clone(), b"Patient/1/2").is_err());
        assert!(open_in_place(&dek, &mut [0u8; NONCE + TAG - 1], b"Patient/1/1").is_err(), "too short");
        let mut bad = sealed.clone();
        let last = bad.len() - 1;
        bad[last] ^= 1;
        assert!(open(&dek, &bad, b"Patient/1/1").is_err());
        assert!(Keyring::new([8; 32]).unwrap("Patient/1", &wrapped).is_err(), "another KEK cannot unwrap");
    }

    #[test]
    fn bodies_are_the_chacha20poly1305_crates_xchacha20poly1305_byte_for_byte() {
        use chacha20poly1305::aead::{Aead, KeyInit, Payload};
        use chacha20poly1305::{XChaCha20Poly1305, XNonce};
        let mut rng = rand::thread_rng();
        for len in [0usize, 1, 15, 16, 63, 64, 65, 255, 256, 1_400, 10_007] {
            let (mut key, mut nonce) = ([0u8; 32], [0u8; NONCE]);
            rng.fill_bytes(&mut key);
            rng.fill_bytes(&mut nonce);
            let mut plain = vec![0u8; len];
            rng.fill_bytes(&mut plain);
            let aad = format!("Observation/{len}/1");
            let reference = XChaCha20Poly1305::new(&key.into())
                .encrypt(XNonce::from_slice(&nonce), Payload { msg: &plain, aad: aad.as_bytes() })
                .unwrap();
            let ours = seal_with(&key, &nonce, &plain, aad.as_bytes());
            assert_eq!(ours[..NONCE], nonce, "{len}");
            assert_eq!(ours[NONCE..], reference[..], "{len} bytes seal alike");
            assert_eq!(open(&key, &ours, aad.as_bytes()).unwrap(), plain, "{len}");
            let theirs = XChaCha20Poly1305::new(&key.into())
                .decrypt(XNonce::from_slice(&nonce), Payload { msg: &ours[NONCE..], aad: aad.as_bytes() })
                .unwrap();
            assert_eq!(theirs, plain, "{len}: the crate opens what we sealed");
            for at in [0, NONCE, ours.len() - 1] {
                let mut bad = ours.clone();
                bad[at] ^= 0x40;
                assert!(open(&key, &bad, aad.as_bytes()).is_err(), "{len}: a flipped byte at {at}");
            }
        }
    }
}
