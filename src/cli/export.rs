//! `fhir-ledger export download STATUS_URL DIR`: polls a Bulk export's status URL as the IG's
//! clients do (waiting `Retry-After`, printing `X-Progress`), then saves the manifest as
//! `manifest.json` and every file it links (outputs, deletions, errors, the trust label and
//! the proof files) under the last segment of its URL, streaming each to disk. That directory
//! is what `fhir-ledger verify export` checks.

use std::path::PathBuf;

#[derive(clap::Args)]
pub struct ExportArgs {
    #[command(subcommand)]
    command: Command,
}

#[derive(clap::Subcommand)]
enum Command {
    /// Wait for an export to finish and download it into a directory.
    Download {
        /// The export's status URL (the kick-off's `Content-Location`).
        url: String,
        /// Where to save it (created if missing).
        dir: PathBuf,
        /// The access token the export was kicked off with.
        #[arg(long, env = "FHIR_LEDGER_TOKEN")]
        token: Option<String>,
    },
}

pub async fn run(args: ExportArgs) -> anyhow::Result<()> {
    match args.command {
        Command::Download { url, dir, token } => {
            crate::transfer::fetch::download(&url, &dir, token.as_deref()).await.map(|_| ())
        }
    }
}
