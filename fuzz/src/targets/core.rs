//! What pgkeep's commands read: manifests (backups and dumps) and the configuration file.

use std::borrow::Cow;
use std::path::Path;

use pgkeep_core::commands::dump::{DumpDetails, DumpManifest};
use pgkeep_core::config::ConfigFile;
use pgkeep_core::manifest::{summary_of, BackupManifest, ManifestHeader};
use pgkeep_repo::crypto::Sealer;
use pgkeep_repo::repository::open_sealed;
use pgkeep_repo::Repository;

/// What a fuzzed sealed object may decompress to: far below the production bound
/// ([`pgkeep_repo::repository::MAX_SEALED_LEN`]), under the harness's allocation cap, and the
/// same code path.
const FUZZ_SEALED_LEN: usize = 32 << 20;

/// A manifest. Even mode byte: a key length byte, the storage key (`backups/<cluster>/<id>`,
/// also the seal's associated data), then the object as stored (sealed zstd JSON). Odd: the
/// JSON body. The body goes through every reader of manifests: physical and dump manifests,
/// the headers and summaries that `list`, `expire` and `copy` read, the stream references
/// that `check` and garbage collection follow.
pub fn manifest(data: &[u8]) -> bool {
    let Some((&mode, rest)) = data.split_first() else {
        return false;
    };
    let plain: Cow<[u8]> = if mode & 1 == 0 {
        let Some((&n, rest)) = rest.split_first() else {
            return false;
        };
        let (key, stored) = rest.split_at((n as usize).min(rest.len()));
        let key = String::from_utf8_lossy(key);
        match open_sealed(
            &Sealer::Plain,
            &key,
            key.as_bytes(),
            stored,
            FUZZ_SEALED_LEN,
        ) {
            Ok(p) => Cow::Owned(p),
            Err(_) => return false,
        }
    } else {
        Cow::Borrowed(rest)
    };
    let _ = summary_of(&plain);
    let Ok(value) = serde_json::from_slice::<serde_json::Value>(&plain) else {
        return false;
    };
    let _ = serde_json::from_value::<ManifestHeader>(value.clone());
    let _ = Repository::stream_refs(&value);
    let _ = DumpDetails::from_value(&value);
    let physical = BackupManifest::from_value(value.clone());
    if let Ok(m) = &physical {
        let _ = m.files_by_path();
    }
    let dump = DumpManifest::from_value(value);
    physical.is_ok() || dump.is_ok()
}

/// The configuration file's text (TOML), validated as `pgkeep --config FILE` does, for a file
/// readable only by its owner and for one readable by others (which refuses inline secrets).
pub fn config_toml(data: &[u8]) -> bool {
    // `ConfigFile::load` reads the file as UTF-8 text: other bytes never reach the parser.
    let Ok(text) = std::str::from_utf8(data) else {
        return false;
    };
    let path = Path::new("/etc/pgkeep/pgkeep.toml");
    let _ = ConfigFile::parse(text, path, 0o044);
    ConfigFile::parse(text, path, 0).is_ok()
}
