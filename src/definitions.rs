//! The pinned R4 definitions (`fhir-profiles/`): StructureDefinitions, ValueSets,
//! SearchParameters and the Patient compartment. They are compiled into the binary
//! (gzip-compressed by `build.rs`), so the server runs from any directory and after
//! `cargo install`; `--profiles-dir` reads the same files from a directory instead.

use std::borrow::Cow;
use std::io::Read;
use std::path::PathBuf;

include!(concat!(env!("OUT_DIR"), "/definitions.rs"));

/// Where the definitions come from.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum Definitions {
    /// The copy compiled into the binary.
    #[default]
    Embedded,
    /// A directory holding the same files (`--profiles-dir`).
    Dir(PathBuf),
}

impl Definitions {
    /// The raw bytes of `file` (for example `profiles-types.json`).
    pub fn bytes(&self, file: &str) -> Result<Cow<'static, [u8]>, String> {
        match self {
            Definitions::Dir(dir) => {
                let path = dir.join(file);
                std::fs::read(&path).map(Cow::Owned).map_err(|e| format!("{}: {e}", path.display()))
            }
            Definitions::Embedded => {
                let (_, gz) = EMBEDDED
                    .iter()
                    .find(|(name, _)| *name == file)
                    .ok_or_else(|| format!("{file}: not among the definitions compiled into this binary"))?;
                let mut out = Vec::with_capacity(gz.len() * 10);
                flate2::read::GzDecoder::new(*gz)
                    .read_to_end(&mut out)
                    .map_err(|e| format!("{file} (compiled in): {e}"))?;
                Ok(Cow::Owned(out))
            }
        }
    }

    /// `file` parsed as JSON; an error names the file.
    pub fn json(&self, file: &str) -> Result<serde_json::Value, String> {
        let bytes = self.bytes(file)?;
        serde_json::from_slice(&bytes).map_err(|e| format!("{}: {e}", self.name(file)))
    }

    /// How `file` is named in messages: its path, or that it is compiled in.
    pub fn name(&self, file: &str) -> String {
        match self {
            Definitions::Dir(dir) => dir.join(file).display().to_string(),
            Definitions::Embedded => format!("{file} (compiled in)"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The compiled-in copy is byte for byte the checkout's `fhir-profiles/`.
    #[test]
    fn embedded_definitions_equal_the_checkout() {
        let dir = Definitions::Dir(PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/fhir-profiles")));
        for (file, _) in EMBEDDED {
            assert_eq!(Definitions::Embedded.bytes(file).unwrap(), dir.bytes(file).unwrap(), "{file}");
        }
        let missing = Definitions::Embedded.bytes("nope.json").unwrap_err();
        assert!(missing.contains("nope.json"), "{missing}");
    }
}
