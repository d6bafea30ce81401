//! `fhir-ledger verify export DIR --trusted-key K…`: a downloaded Bulk export against its
//! trust label (`bulk::check`).

use std::path::PathBuf;

use super::{trusted_keys, Failure, Trust};
use crate::bulk::check::{self, Failure as Problem};

#[derive(clap::Args)]
pub struct ExportArgs {
    /// The directory the export was downloaded to (`fhir-ledger export download`).
    dir: PathBuf,
    #[command(flatten)]
    trust: Trust,
    /// Also measure this machine's raw SHA-256 and ed25519 rates and report how close the
    /// check came to that bound.
    #[arg(long)]
    crypto_bound: bool,
}

pub(super) fn export(a: &ExportArgs) -> Result<String, Failure> {
    let trusted = trusted_keys(&a.trust)?;
    let start = std::time::Instant::now();
    let v = check::check_dir(&a.dir, &trusted.keys, trusted.quorum).map_err(|e| match e {
        Problem::Invalid(why) => Failure::Invalid(why),
        Problem::Unchecked(why) => Failure::Unchecked(why),
    })?;
    let secs = start.elapsed().as_secs_f64();
    println!(
        "checked {} lines, {:.1} MB hashed, {} Merkle nodes, {} signatures in {secs:.2} s: {:.0} lines/s",
        v.lines,
        v.bytes_hashed as f64 / 1e6,
        v.nodes_hashed,
        v.signatures,
        v.lines as f64 / secs
    );
    if a.crypto_bound {
        let bound = super::crypto_bound_with_nodes(v.bytes_hashed, v.nodes_hashed, v.signatures);
        println!(
            "crypto bound on this machine: SHA-256 {:.0} MB/s, ed25519 batch verify {:.0} signatures/s: {:.2} s for this export; verify ran at {:.0}% of it",
            bound.sha256_mb_s,
            bound.ed25519_per_s,
            bound.seconds,
            100.0 * bound.seconds / secs
        );
    }
    if v.subsetted {
        return Err(Failure::Unchecked(format!(
            "the files, signatures and {} leaves verify, but the export was reduced by _elements: no leaf \
             commits to parts of resources, so the lines' content is not bound",
            v.lines
        )));
    }
    Ok(format!(
        "{} resources in {} files match tree head {} (signed by {} trusted nodes) and a trust label signed by {}",
        v.lines,
        v.files.len(),
        v.head.size,
        v.cosigners,
        v.signers
    ))
}
