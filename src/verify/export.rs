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
}

pub(super) fn export(a: &ExportArgs) -> Result<String, Failure> {
    let trusted = trusted_keys(&a.trust)?;
    let v = check::check_dir(&a.dir, &trusted.keys, trusted.quorum).map_err(|e| match e {
        Problem::Invalid(why) => Failure::Invalid(why),
        Problem::Unchecked(why) => Failure::Unchecked(why),
    })?;
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
