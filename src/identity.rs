//! The node's secrets in its data directory: ed25519 identity, key-encryption key (KEK) and
//! the search-index key. Created on first start with 0600 permissions.

use std::fs;
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::Path;

use ed25519_dalek::SigningKey;
use rand::RngCore;

pub struct Identity {
    pub signing: SigningKey,
    pub kek: [u8; 32],
    /// Keys the digests stored in search indexes, so an index holds no readable values.
    pub index_key: [u8; 32],
    /// Bearer token of the admin API.
    pub admin_token: String,
}

fn load_or_create(path: &Path, what: &str) -> anyhow::Result<[u8; 32]> {
    if path.exists() {
        let mode = fs::metadata(path)?.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            anyhow::bail!("{}: permissions {mode:o} let others read the {what}; chmod 600 it", path.display());
        }
        let text = fs::read_to_string(path)?;
        let bytes = hex::decode(text.trim()).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
        return bytes.try_into().map_err(|_| anyhow::anyhow!("{}: expected 32 bytes of hex", path.display()));
    }
    let mut key = [0u8; 32];
    rand::rngs::OsRng.fill_bytes(&mut key);
    let mut f = fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(path)?;
    f.write_all(hex::encode(key).as_bytes())?;
    f.sync_all()?;
    eprintln!("fhir-ledger: generated {what} at {} (mode 0600)", path.display());
    Ok(key)
}

impl Identity {
    /// A fingerprint of the shared secrets: nodes that may form a cluster show the same one.
    pub fn secrets_id(&self) -> String {
        use sha2::{Digest, Sha256};
        let mut h = Sha256::new();
        h.update(b"fhir-ledger secrets id v1\0");
        h.update(self.kek);
        h.update(self.index_key);
        hex::encode(&h.finalize()[..8])
    }

    /// The node's own keys from `data_dir`; the KEK and index key from `secrets_dir`, which
    /// every node of a cluster shares (each node must unwrap every compartment key and compute
    /// the same index digests).
    pub fn load_or_create(data_dir: &Path, secrets_dir: &Path) -> anyhow::Result<Self> {
        fs::create_dir_all(data_dir)?;
        fs::create_dir_all(secrets_dir)?;
        let signing = SigningKey::from_bytes(&load_or_create(&data_dir.join("node.key"), "node ed25519 identity")?);
        let kek = load_or_create(&secrets_dir.join("kek.key"), "key-encryption key")?;
        let index_key = load_or_create(&secrets_dir.join("index.key"), "search-index key")?;
        let admin_token = hex::encode(load_or_create(&data_dir.join("admin.token"), "admin API token")?);
        let pk = data_dir.join("node.pub");
        if !pk.exists() {
            fs::write(&pk, hex::encode(signing.verifying_key().as_bytes()))?;
        }
        Ok(Self { signing, kek, index_key, admin_token })
    }
}
