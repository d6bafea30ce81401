//! Compiles the pinned R4 definitions (`fhir-profiles/`) into the binary, gzip-compressed
//! (48 MB of JSON, 4.8 MB compressed), so `fhir-ledger serve` needs no files beside it.
//! `src/fhir/definitions.rs` reads them back.

use std::fmt::Write as _;
use std::io::Write as _;
use std::path::{Path, PathBuf};

/// Every definition file the server reads at start (`Definitions::json`).
const FILES: &[&str] = &[
    "profiles-types.json",
    "profiles-resources.json",
    "valuesets.json",
    "search-parameters.json",
    "search-parameters-uscore.json",
    "search-parameters-supply.json",
    "compartmentdefinition-patient.json",
];

fn main() -> std::io::Result<()> {
    let out = PathBuf::from(std::env::var_os("OUT_DIR").ok_or_else(|| std::io::Error::other("OUT_DIR is not set"))?);
    let mut table = String::from("/// Each pinned definition file: its name and its gzip-compressed bytes.\n");
    table.push_str("static EMBEDDED: &[(&str, &[u8])] = &[\n");
    for file in FILES {
        let src = Path::new("fhir-profiles").join(file);
        println!("cargo:rerun-if-changed={}", src.display());
        let data = std::fs::read(&src)?;
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::new(6));
        gz.write_all(&data)?;
        std::fs::write(out.join(format!("{file}.gz")), gz.finish()?)?;
        let _ = writeln!(table, "    ({file:?}, include_bytes!(concat!(env!(\"OUT_DIR\"), \"/{file}.gz\"))),");
    }
    table.push_str("];\n");
    std::fs::write(out.join("definitions.rs"), table)
}
