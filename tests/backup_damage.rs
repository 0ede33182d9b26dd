//! RELIABILITY rows 11 and 29 (second half) with real backups through the binary: one chunk
//! shared by two backups of a cluster is damaged at rest (a byte flipped inside it, in its
//! pack). What a user relies on: `repo check --read-data` and `verify --read-data` exit 13
//! naming the pack and *every* backup that uses the chunk, and no backup that does not;
//! restoring an affected backup fails with exit 13 naming the chunk and the relation file;
//! a backup that does not use it still restores exactly.

mod cli_support;

use std::path::Path;
use std::sync::Arc;

use cli_support::Sandbox;
use pgkeep_repo::pack::read_pack_header;
use pgkeep_repo::{BlobId, Repository};
use pgkeep_storage::{LocalStorage, Storage};
use pgkeep_testing::cluster::first_difference;
use pgkeep_testing::Cluster;

fn backup(s: &Sandbox, c: &Cluster, cluster: &str) -> String {
    let pgdata = c.pgdata().to_str().unwrap().to_string();
    let r = s
        .run_repo(
            &[
                "-q",
                "--json",
                "--cluster",
                cluster,
                "backup",
                "--pgdata",
                &pgdata,
                "--pg",
                &c.conninfo(),
            ],
            &[],
        )
        .expect(0);
    r.json()["id"].as_str().unwrap().to_string()
}

/// Every blob a manifest references.
async fn blobs_of(repo: &Repository, cluster: &str, id: &str) -> Vec<BlobId> {
    let body = repo.load_manifest(cluster, id).await.unwrap();
    Repository::stream_refs(&body)
        .iter()
        .flat_map(|s| s.blobs.iter().map(|b| b.id))
        .collect()
}

/// Flips one byte in the middle of `blob`'s stored bytes, in the pack that holds it; returns
/// the pack's id.
async fn damage_blob(repo: &Repository, root: &Path, blob: &BlobId) -> String {
    let storage = repo.storage();
    for m in storage.list("packs/").await.unwrap() {
        let bytes = storage.get(&m.key).await.unwrap();
        let entries = read_pack_header(repo.sealer(), &bytes, &m.key)
            .unwrap()
            .blobs;
        if let Some(e) = entries.iter().find(|e| e.id == *blob) {
            let mut v = bytes.to_vec();
            v[e.offset as usize + e.length as usize / 2] ^= 0x10;
            std::fs::write(root.join(&m.key), v).unwrap();
            return m.key.rsplit('/').next().unwrap().to_string();
        }
    }
    panic!("blob {blob:?} is in no pack");
}

#[test]
fn a_damaged_shared_chunk_marks_every_backup_that_uses_it() {
    let a = Cluster::new().unwrap();
    a.pgbench(&["-i", "-s", "3", "-q"]).unwrap();
    let b = Cluster::new().unwrap();
    b.sql("create table other(v text); insert into other select md5(g::text) from generate_series(1, 1000) g")
        .unwrap();
    let s = Sandbox::new();
    s.run_repo(&["repo", "init", "--no-encryption"], &[])
        .expect(0);
    let id1 = backup(&s, &a, "main");
    let id2 = backup(&s, &a, "main");
    let id3 = backup(&s, &b, "other");
    let dump_other = b.pg_dump("postgres").unwrap();
    let accounts = a
        .sql("select pg_relation_filepath('pgbench_accounts')")
        .unwrap();

    let rt = tokio::runtime::Runtime::new().unwrap();
    let (blob, pack) = rt.block_on(async {
        let storage: Arc<dyn Storage> = Arc::new(LocalStorage::new(s.repo()).unwrap());
        let repo = Repository::open(storage, None).await.unwrap();
        // A chunk from the middle of pgbench_accounts: both backups of `main` hold it (the
        // table did not change between them), the other cluster's backup does not.
        let m1 = repo.load_manifest("main", &id1).await.unwrap();
        let file = m1["files"]
            .as_array()
            .unwrap()
            .iter()
            .find(|f| f["path"] == accounts.as_str())
            .expect("pgbench_accounts in backup 1");
        let stream: pgkeep_repo::StreamRef =
            serde_json::from_value(file["stream"].clone()).unwrap();
        assert!(stream.blobs.len() >= 3, "{}", stream.blobs.len());
        let blob = stream.blobs[stream.blobs.len() / 2].id;
        assert!(blobs_of(&repo, "main", &id2).await.contains(&blob));
        assert!(!blobs_of(&repo, "other", &id3).await.contains(&blob));
        let pack = damage_blob(&repo, &s.repo(), &blob).await;
        (blob, pack)
    });
    let blob_hex = blob.to_hex();

    // repo check --read-data: exit 13 naming the pack, the damaged chunk, and both backups.
    // (Ids are per second: a backup of another cluster may share one, hence `main/<id>`.)
    let r = s
        .run_repo(&["repo", "check", "--read-data"], &[])
        .expect(13);
    let out = format!("{}{}", r.stdout(), r.stderr());
    assert!(out.contains(&pack), "the pack is named: {out}");
    assert!(
        out.contains(&format!("blob {blob_hex}")),
        "the damaged chunk is named: {out}"
    );
    for id in [&id1, &id2] {
        assert!(
            out.contains(&format!("backups/main/{id}")),
            "backup {id} is named: {out}"
        );
    }
    // The other cluster's backup shares undamaged chunks of the same pack: each blob of that
    // pack was verified on its own, so it is not called damaged (it restores, below).
    assert!(
        !out.contains(&format!("backups/other/{id3}")),
        "a backup using only intact blobs of the damaged pack is named: {out}"
    );
    let j = s
        .run_repo(&["--json", "repo", "check", "--read-data"], &[])
        .expect(13)
        .json();
    let damaged: Vec<String> = j["damaged_manifests"]
        .as_array()
        .unwrap_or_else(|| panic!("damaged_manifests in {j}"))
        .iter()
        .map(|v| v.as_str().unwrap().to_string())
        .collect();
    for id in [&id1, &id2] {
        assert!(damaged.contains(&format!("main/{id}")), "{damaged:?}");
    }
    assert!(!damaged.contains(&format!("other/{id3}")), "{damaged:?}");

    // verify --read-data says the same for the cluster.
    let v = s.run_repo(&["verify", "--read-data"], &[]).expect(13);
    let vout = format!("{}{}", v.stdout(), v.stderr());
    for id in [&id1, &id2] {
        assert!(
            vout.contains(&format!("REPOSITORY PROBLEM: backups/main/{id}: ")),
            "verify names backup {id} as damaged: {vout}"
        );
    }
    let vj = s
        .run_repo(&["--json", "verify", "--read-data"], &[])
        .expect(13)
        .json();
    let vdamaged = vj["repository"]["damaged_manifests"].to_string();
    for id in [&id1, &id2] {
        assert!(vdamaged.contains(&format!("main/{id}")), "{vj}");
        // The backup's own line says it cannot be restored, not "recoverable from".
        assert!(
            vout.contains(&format!("backup {id} (timeline 1): DAMAGED")),
            "verify's line for {id}: {vout}"
        );
        let w = vj["backups"]
            .as_array()
            .unwrap()
            .iter()
            .find(|b| b["id"] == id.as_str())
            .unwrap_or_else(|| panic!("{id} in {vj}"));
        assert_eq!(w["damaged"], true, "{w}");
    }

    // Restoring an affected backup: exit 13, the chunk and the relation file named.
    let work = tempfile::tempdir().unwrap();
    let t2 = work.path().join("b2");
    let r = s
        .run_repo(
            &["restore", &id2, "--target-dir", t2.to_str().unwrap()],
            &[],
        )
        .expect(13);
    let err = r.stderr();
    assert!(err.contains(&accounts), "the file is named: {err}");
    assert!(err.contains(&blob_hex[..16]), "the chunk is named: {err}");
    assert!(!t2.join("backup_label").exists());

    // The other cluster's backup does not use it: restores exactly.
    let t3 = work.path().join("b3");
    s.run_repo(
        &[
            "--cluster",
            "other",
            "restore",
            &id3,
            "--target-dir",
            t3.to_str().unwrap(),
        ],
        &[],
    )
    .expect(0);
    let c3 = Cluster::builder().start_existing(&t3).unwrap();
    assert_eq!(
        first_difference(&dump_other, &c3.pg_dump("postgres").unwrap()),
        None
    );
}
