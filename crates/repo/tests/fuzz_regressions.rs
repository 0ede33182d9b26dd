//! Hostile or damaged repository objects that once made pgkeep panic, hang or allocate
//! without bound (found by reading the parsers for the fuzz targets of fuzz/, issue 18), each
//! now a clean error.

use std::sync::Arc;
use std::time::{Duration, Instant};

use pgkeep_repo::crypto::Sealer;
use pgkeep_repo::format::{KeyFile, MAX_BLOB_LEN};
use pgkeep_repo::pack::{decode_blob, BasePlaintexts};
use pgkeep_repo::repository::{open_sealed, parse_config, parse_index_file};
use pgkeep_repo::{ErrorKind, InitOptions, KdfParams, Repository};
use pgkeep_storage::LocalStorage;

fn key_json(m_kib: u64, t: u64, p: u64) -> String {
    format!(
        r#"{{"version":1,"created":"2026-12-05T03:00:00Z","host":"h","kdf":"argon2id",
            "kdf_params":{{"m_kib":{m_kib},"t":{t},"p":{p}}},
            "salt":"00112233445566778899aabbccddeeff","wrapped":"00"}}"#
    )
}

#[test]
fn a_key_file_asking_argon2_for_terabytes_or_endless_passes_is_refused_before_deriving() {
    for (m, t, p) in [
        (u32::MAX as u64, 2, 1),
        (19456, 1_000_000_000, 1),
        (19456, 2, 1 << 20),
    ] {
        let e = KeyFile::parse(key_json(m, t, p).as_bytes()).unwrap_err();
        assert!(e.contains("out of bounds"), "{e}");
    }
    assert!(KeyFile::parse(key_json(19456, 2, 1).as_bytes()).is_ok());
    let e = KeyFile::parse(
        key_json(64, 1, 1)
            .replace("00112233445566778899aabbccddeeff", "0011")
            .as_bytes(),
    )
    .unwrap_err();
    assert!(e.contains("salt of 2 bytes"), "{e}");
}

#[tokio::test]
async fn an_encrypted_repository_whose_key_file_asks_for_a_terabyte_opens_as_a_wrong_passphrase() {
    let dir = tempfile::tempdir().unwrap();
    let storage = Arc::new(LocalStorage::new(dir.path()).unwrap());
    let opts = InitOptions {
        passphrase: Some("right".into()),
        kdf: KdfParams {
            m_kib: 64,
            t: 1,
            p: 1,
        },
        ..Default::default()
    };
    Repository::init(storage.clone(), opts).await.unwrap();
    let key = std::fs::read_dir(dir.path().join("keys"))
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    let text = std::fs::read_to_string(&key).unwrap();
    let hostile = text.replace("\"m_kib\": 64", &format!("\"m_kib\": {}", u32::MAX));
    assert_ne!(hostile, text);
    std::fs::write(&key, hostile).unwrap();
    let started = Instant::now();
    let e = Repository::open(storage, Some("right")).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::WrongPassphrase, "{e}");
    assert!(started.elapsed() < Duration::from_secs(10));
}

#[tokio::test]
async fn a_config_object_with_chunker_sizes_fastcdc_refuses_does_not_open_instead_of_panicking_later(
) {
    let dir = tempfile::tempdir().unwrap();
    let storage = Arc::new(LocalStorage::new(dir.path()).unwrap());
    Repository::init(storage.clone(), InitOptions::default())
        .await
        .unwrap();
    let path = dir.path().join("config");
    let mut v: serde_json::Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    // Within what `init` checked before (min >= 64 KiB, max <= 16 MiB, min < avg < max), but
    // FastCDC asserts min <= 1 MiB and avg <= 4 MiB: the first backup panicked.
    v["chunker"] = serde_json::json!({"min": 2 << 20, "avg": 6 << 20, "max": 16 << 20});
    std::fs::write(&path, serde_json::to_vec(&v).unwrap()).unwrap();
    let e = Repository::open(storage, None).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::NotARepository, "{e}");
    assert!(e.to_string().contains("invalid chunker parameters"), "{e}");
    let e = parse_config(&serde_json::to_vec(&v).unwrap(), "here").unwrap_err();
    assert!(e.to_string().contains("settings no pgkeep writes"), "{e}");
}

fn plain_index(json: &str) -> Vec<u8> {
    let z = zstd::bulk::compress(json.as_bytes(), 1).unwrap();
    Sealer::Plain.seal_meta(b"pgkeep-index", &z)
}

#[test]
fn an_index_entry_with_a_huge_plaintext_length_or_past_its_pack_is_a_damaged_index_file() {
    let id = "ab".repeat(32);
    let entry = |offset: u64, raw: u64| {
        format!(
            r#"{{"version":1,"packs":[{{"id":"{id}","size":1000,"blobs":[
                {{"id":"{id}","offset":{offset},"length":100,"raw_length":{raw}}}]}}]}}"#
        )
    };
    assert!(parse_index_file(&Sealer::Plain, "index/x", &plain_index(&entry(0, 4096))).is_ok());
    for (json, why) in [
        (entry(0, u32::MAX as u64), "plaintext length"),
        (entry(950, 4096), "extends past the end of pack"),
    ] {
        let e = parse_index_file(&Sealer::Plain, "index/x", &plain_index(&json)).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Integrity);
        assert!(e.to_string().contains(why), "{e}");
    }
}

#[test]
fn a_sealed_object_that_decompresses_past_its_bound_is_an_integrity_error_not_an_allocation() {
    // 64 MiB of zeros compress to a few KiB: a bomb for anyone who believes the frame.
    let bomb = zstd::bulk::compress(&vec![0u8; 64 << 20], 19).unwrap();
    assert!(bomb.len() < 64 << 10);
    let sealed = Sealer::Plain.seal_meta(b"backups/main/x", &bomb);
    let e = open_sealed(
        &Sealer::Plain,
        "backups/main/x",
        b"backups/main/x",
        &sealed,
        1 << 20,
    )
    .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Integrity);
    assert!(e.to_string().contains("more than 1048576 bytes"), "{e}");
    let ok = open_sealed(
        &Sealer::Plain,
        "backups/main/x",
        b"backups/main/x",
        &sealed,
        64 << 20,
    );
    assert_eq!(ok.unwrap().len(), 64 << 20);
}

#[test]
fn a_blob_with_a_plaintext_length_over_16_mib_is_refused_before_it_is_allocated() {
    let mut d = zstd::bulk::Decompressor::new().unwrap();
    let id = Sealer::Plain.blob_id(b"x");
    let e = decode_blob(
        &Sealer::Plain,
        &mut d,
        &id,
        MAX_BLOB_LEN + 1,
        &[0, b'x'],
        &BasePlaintexts::new(),
        "pack p",
    )
    .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Integrity);
    assert!(e.to_string().contains("blobs hold at most"), "{e}");
}
