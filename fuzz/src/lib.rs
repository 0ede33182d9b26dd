//! Fuzz targets for every parser of bytes pgkeep did not just write itself: what it reads
//! back from a repository (pack headers, blobs, index files, manifests, key files, the
//! `config` object), what PostgreSQL or its tools wrote (WAL segments and records,
//! pg_control, backup_label, timeline history files, pg_dump archives, WAL file names) and
//! what a user wrote (the TOML configuration file).
//!
//! Each target takes any bytes and must return without panicking, hanging or allocating
//! without bound; several also check an oracle (a property every answer must have) and
//! panic when it does not hold. A target returns whether its input was accepted (parsed to
//! the end): the harness checks that the kept corpus reaches that path, so a target that
//! only ever sees rejections fails instead of passing quietly.
//!
//! Two engines run them:
//! - [`harness`], on stable under `cargo test` (tests/fuzz_targets.rs): every file of
//!   `fuzz/corpus/<target>/`, then random mutations of them for a bounded time, with a
//!   per-input time limit and a cap on allocations.
//! - libFuzzer through cargo-fuzz (fuzz/libfuzzer, nightly), coverage-guided, for longer runs
//!   (docs/fuzzing.md).

pub mod harness;
pub mod mutate;
pub mod targets;

use std::path::PathBuf;

/// One fuzz target.
pub struct Target {
    /// Its name: the corpus directory and the cargo-fuzz target have it too.
    pub name: &'static str,
    /// Runs one input; true when the input was accepted.
    pub run: fn(&[u8]) -> bool,
    /// Tokens the mutator splices in (field names, separators, magic numbers).
    pub dict: &'static [&'static [u8]],
}

/// Every target.
pub const TARGETS: &[Target] = &[
    Target {
        name: "pack",
        run: targets::repo::pack,
        dict: &[b"PGKP", &[0; 4], &[0xff; 4]],
    },
    Target {
        name: "blob",
        run: targets::repo::blob,
        dict: &[&[0], &[1], &[2], &[0x28, 0xb5, 0x2f, 0xfd]],
    },
    Target {
        name: "index_file",
        run: targets::repo::index_file,
        dict: targets::JSON_TOKENS,
    },
    Target {
        name: "key_file",
        run: targets::repo::key_file,
        dict: targets::JSON_TOKENS,
    },
    Target {
        name: "repo_config",
        run: targets::repo::repo_config,
        dict: targets::JSON_TOKENS,
    },
    Target {
        name: "manifest",
        run: targets::core::manifest,
        dict: targets::JSON_TOKENS,
    },
    Target {
        name: "config_toml",
        run: targets::core::config_toml,
        dict: targets::TOML_TOKENS,
    },
    Target {
        name: "wal_segment",
        run: targets::pg::wal_segment,
        dict: &[
            &[0x10, 0xd1],
            &[0x06, 0xd1],
            &[0x18, 0xd1],
            &[1, 0],
            &[2, 0],
            &[3, 0],
        ],
    },
    Target {
        name: "wal_record",
        run: targets::pg::wal_record,
        dict: &[&[255], &[254], &[253], &[252], &[0x10], &[0x80], &[0x70]],
    },
    Target {
        name: "pg_control",
        run: targets::pg::pg_control,
        dict: &[
            &[0x14, 0x05, 0, 0],
            &[0xa4, 0x06, 0, 0],
            &[0x08, 0x07, 0, 0],
        ],
    },
    Target {
        name: "backup_label",
        run: targets::pg::backup_label,
        dict: targets::LABEL_TOKENS,
    },
    Target {
        name: "timeline_history",
        run: targets::pg::timeline_history,
        dict: &[b"\t", b"\n", b"#", b"/", b" ", b"0/", b"FFFFFFFF/FFFFFFFF"],
    },
    Target {
        name: "dump_archive",
        run: targets::pg::dump_archive,
        dict: &[
            b"PGDMP",
            &[1, 14, 0],
            &[1],
            &[3],
            &[0, 0, 0, 0, 0],
            &[1, 0, 0, 0, 0],
        ],
    },
    Target {
        name: "wal_file_name",
        run: targets::pg::wal_file_name,
        dict: &[
            b".partial",
            b".backup",
            b".history",
            b"/",
            b"wal/main/",
            b"00000001",
        ],
    },
];

/// The target called `name`.
pub fn target(name: &str) -> Option<&'static Target> {
    TARGETS.iter().find(|t| t.name == name)
}

/// `fuzz/corpus/<name>`: the kept inputs of a target.
pub fn corpus_dir(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("corpus")
        .join(name)
}
