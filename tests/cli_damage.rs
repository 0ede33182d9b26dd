//! Damage seen through the binary, on local disk and on a real S3-compatible server: a flipped
//! byte, a truncated pack and a missing pack each make `repo check --read-data` and `info`-style
//! reads exit 13 naming the pack; a wrong passphrase exits 12 and changes nothing; a damaged
//! index file makes `repo check` exit 13 naming it, and `repo repair-index` mends it.

use std::process::{Command, Output};
use std::sync::Arc;

use bytes::Bytes;
use pgkeep_repo::{Repository, WriterOptions};
use pgkeep_storage::{LocalStorage, Storage};
use pgkeep_testing::s3::S3Server;

struct Target {
    storage: Arc<dyn Storage>,
    url: String,
    env: Vec<(String, String)>,
}

fn pgkeep(t: &Target, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_pgkeep"))
        .args(["--repo", &t.url])
        .args(args)
        .env_remove("PGKEEP_CONFIG")
        .env("PGKEEP_PASSPHRASE", "canary-passphrase-7f3a")
        .envs(t.env.iter().cloned())
        .output()
        .unwrap()
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

async fn listing(s: &dyn Storage) -> Vec<(String, Bytes)> {
    let mut v = Vec::new();
    for m in s.list("").await.unwrap() {
        v.push((m.key.clone(), s.get(&m.key).await.unwrap()));
    }
    v.sort();
    v
}

async fn damage_scenarios(t: Target) {
    let init = pgkeep(&t, &["repo", "init"]);
    assert_eq!(init.status.code(), Some(0), "{}", text(&init));

    // Store a stream and commit a manifest through the library, as a backup would.
    let repo = Repository::open(t.storage.clone(), Some("canary-passphrase-7f3a"))
        .await
        .unwrap();
    let w = repo.writer(WriterOptions::default());
    let w2 = w.clone();
    let data: Vec<u8> = (0..3_000_000u32)
        .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
        .collect();
    let s = tokio::task::spawn_blocking(move || w2.ingest_bytes(&data))
        .await
        .unwrap()
        .unwrap();
    w.finish().await.unwrap();
    repo.save_manifest(
        "main",
        "20260101T000000Z",
        &serde_json::json!({ "kind": "test", "data": s }),
    )
    .await
    .unwrap();
    let ok = pgkeep(&t, &["repo", "check", "--read-data"]);
    assert_eq!(ok.status.code(), Some(0), "{}", text(&ok));

    // A wrong passphrase: exit 12, nothing written.
    let before = listing(t.storage.as_ref()).await;
    let wrong = Command::new(env!("CARGO_BIN_EXE_pgkeep"))
        .args(["--repo", &t.url, "repo", "check"])
        .env_remove("PGKEEP_CONFIG")
        .env("PGKEEP_PASSPHRASE", "wrong")
        .envs(t.env.iter().cloned())
        .output()
        .unwrap();
    assert_eq!(wrong.status.code(), Some(12), "{}", text(&wrong));
    assert!(
        text(&wrong).contains("wrong passphrase"),
        "{}",
        text(&wrong)
    );
    assert_eq!(before, listing(t.storage.as_ref()).await);

    let pack = t.storage.list("packs/").await.unwrap()[0].key.clone();
    let pack_id = pack.rsplit('/').next().unwrap().to_string();
    let original = t.storage.get(&pack).await.unwrap();
    let mut flipped = original.to_vec();
    flipped[original.len() / 3] ^= 0x20;
    let truncated = original.slice(..original.len() - 100);
    for (what, bytes) in [
        ("flipped byte", Some(Bytes::from(flipped))),
        ("truncated pack", Some(truncated)),
        ("missing pack", None),
    ] {
        t.storage.delete(&pack).await.unwrap();
        if let Some(b) = bytes {
            t.storage.put(&pack, b).await.unwrap();
        }
        let out = pgkeep(&t, &["repo", "check", "--read-data"]);
        assert_eq!(out.status.code(), Some(13), "{what}: {}", text(&out));
        assert!(
            text(&out).contains(&pack_id),
            "{what}: the pack is not named: {}",
            text(&out)
        );
        assert!(
            text(&out).contains("20260101T000000Z"),
            "{what}: the damaged backup is not named: {}",
            text(&out)
        );
        let json = pgkeep(&t, &["--json", "repo", "check", "--read-data"]);
        assert_eq!(json.status.code(), Some(13));
        let v: serde_json::Value =
            serde_json::from_slice(&json.stdout).expect("--json prints JSON");
        assert!(v.to_string().contains(&pack_id), "{what}: {v}");
        assert!(
            !text(&out).contains("canary-passphrase-7f3a"),
            "the passphrase leaked"
        );
    }
    t.storage.put(&pack, original).await.unwrap();
    assert_eq!(
        pgkeep(&t, &["repo", "check", "--read-data"]).status.code(),
        Some(0)
    );

    // A damaged index file (RELIABILITY 13): check names it and the backup it breaks, exit
    // 13; repo repair-index rebuilds the index from the pack headers; then all is clean and
    // the backup restores.
    let index = t.storage.list("index/").await.unwrap()[0].key.clone();
    let good = t.storage.get(&index).await.unwrap();
    t.storage.delete(&index).await.unwrap();
    t.storage
        .put(&index, good.slice(..good.len() - 1))
        .await
        .unwrap();
    let out = pgkeep(&t, &["repo", "check"]);
    assert_eq!(out.status.code(), Some(13), "{}", text(&out));
    assert!(text(&out).contains(&index), "{}", text(&out));
    assert!(text(&out).contains("repo repair-index"), "{}", text(&out));
    assert!(text(&out).contains("20260101T000000Z"), "{}", text(&out));
    let out = pgkeep(&t, &["--json", "repo", "repair-index"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["removed_index_files"], serde_json::json!([index]));
    assert!(v["packs_indexed"].as_u64().unwrap() >= 1, "{v}");
    let out = pgkeep(&t, &["repo", "check", "--read-data"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let repo = Repository::open(t.storage.clone(), Some("canary-passphrase-7f3a"))
        .await
        .unwrap();
    let body = repo
        .load_manifest("main", "20260101T000000Z")
        .await
        .unwrap();
    let s: pgkeep_repo::StreamRef = serde_json::from_value(body["data"].clone()).unwrap();
    let mut restored = Vec::new();
    repo.read_stream(&s, &mut restored).await.unwrap();
    let data: Vec<u8> = (0..3_000_000u32)
        .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
        .collect();
    assert!(
        restored == data,
        "the backup does not restore after repair-index"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn damage_exit_codes_on_local_disk() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("repo");
    std::fs::create_dir(&path).unwrap();
    let storage: Arc<dyn Storage> = Arc::new(LocalStorage::new(&path).unwrap());
    damage_scenarios(Target {
        storage,
        url: path.display().to_string(),
        env: vec![],
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn damage_exit_codes_on_s3() {
    let server = S3Server::start().await.unwrap();
    let prefix = pgkeep_testing::s3::unique_prefix("cli-damage");
    let mut env = server.env();
    env.push(("PGKEEP_REPO_ENDPOINT".into(), server.endpoint.clone()));
    env.push(("PGKEEP_REPO_REGION".into(), server.region.clone()));
    env.push(("PGKEEP_REPO_FORCE_PATH_STYLE".into(), "true".into()));
    env.push(("PGKEEP_REPO_ALLOW_HTTP".into(), "true".into()));
    damage_scenarios(Target {
        storage: server.storage_with_prefix(&prefix),
        url: server.url(&prefix),
        env,
    })
    .await;
}
