//! The conformance suite every [`Storage`] backend must pass (as restic's backend tests).
//!
//! Library code so that every backend's tests, in this crate and elsewhere, run the same
//! checks: `conformance::run_all(storage).await`. Each check panics with a message naming
//! the backend and what went wrong. All keys live under `conf/<check>/`; give every run a
//! storage of its own (a fresh directory or key prefix), as checks expect an empty start.
//!
//! List semantics checked here (the [`Storage`] contract): `list(p)` returns every object
//! whose key starts with the string `p`, recursively: `a/b` lists `a/b/x` and `a/bc/x`;
//! `a/b/` lists `a/b/x` only.

use std::collections::BTreeMap;
use std::sync::Arc;

use bytes::Bytes;

use crate::{ErrorKind, Storage};

/// Deterministic, incompressible-looking test data (xorshift), different per `seed`.
pub fn pattern(len: usize, seed: u64) -> Bytes {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut v = Vec::with_capacity(len + 8);
    while v.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        v.extend_from_slice(&x.to_le_bytes());
    }
    v.truncate(len);
    Bytes::from(v)
}

fn who(s: &dyn Storage) -> String {
    s.location()
}

/// Runs every check in order; panics on the first failure.
pub async fn run_all(storage: Arc<dyn Storage>) {
    round_trip(storage.clone()).await;
    round_trip_large(storage.clone()).await;
    get_range_exact(storage.clone()).await;
    not_found(storage.clone()).await;
    overwrite(storage.clone()).await;
    put_if_absent_exclusive(storage.clone()).await;
    put_if_absent_race(storage.clone(), 16).await;
    list_semantics(storage.clone()).await;
    delete_idempotent(storage.clone()).await;
    nested_keys(storage).await;
}

async fn put_get(s: &dyn Storage, key: &str, data: Bytes) {
    s.put(key, data.clone())
        .await
        .unwrap_or_else(|e| panic!("[{}] put {key} ({} B): {e}", who(s), data.len()));
    let got = s
        .get(key)
        .await
        .unwrap_or_else(|e| panic!("[{}] get {key}: {e}", who(s)));
    assert!(
        got == data,
        "[{}] get {key}: {} bytes back, {} written, content equal: {}",
        who(s),
        got.len(),
        data.len(),
        got.len() == data.len() && got == data
    );
    let meta = s
        .head(key)
        .await
        .unwrap_or_else(|e| panic!("[{}] head {key}: {e}", who(s)));
    assert_eq!(
        meta.size,
        data.len() as u64,
        "[{}] head {key}: size",
        who(s)
    );
    assert_eq!(meta.key, key, "[{}] head {key}: key", who(s));
}

/// Objects of 0 B, 1 B and 1 MiB come back byte for byte, with the right size.
pub async fn round_trip(s: Arc<dyn Storage>) {
    for (i, len) in [0usize, 1, 1 << 20].into_iter().enumerate() {
        put_get(
            &*s,
            &format!("conf/round_trip/obj-{len}"),
            pattern(len, i as u64),
        )
        .await;
    }
}

/// A ~40 MiB object (multipart on object stores) round-trips and ranges read back right.
pub async fn round_trip_large(s: Arc<dyn Storage>) {
    let len = 40 * 1024 * 1024 + 12345;
    let data = pattern(len, 40);
    let key = "conf/round_trip_large/big";
    put_get(&*s, key, data.clone()).await;
    let r = (len as u64 - 5_000_000)..(len as u64);
    let got = s
        .get_range(key, r.clone())
        .await
        .unwrap_or_else(|e| panic!("[{}] get_range {key} {r:?}: {e}", who(&*s)));
    assert!(
        got == data.slice(r.start as usize..),
        "[{}] tail range of big object differs",
        who(&*s)
    );
    s.delete(key).await.expect("delete big object");
}

/// `get_range` returns exactly the bytes asked for, including ranges ending at the end of
/// the object and empty ranges; a range past the end is an error of kind Corrupt.
pub async fn get_range_exact(s: Arc<dyn Storage>) {
    let key = "conf/get_range/obj";
    let data = pattern(100_000, 7);
    s.put(key, data.clone()).await.expect("put");
    let n = data.len() as u64;
    for r in [
        0..1,
        0..n,
        1..2,
        99..4099,
        n - 1..n,
        n - 10..n,
        5000..5000,
        n..n,
    ] {
        let got = s
            .get_range(key, r.clone())
            .await
            .unwrap_or_else(|e| panic!("[{}] get_range {r:?}: {e}", who(&*s)));
        assert_eq!(
            got.len() as u64,
            r.end - r.start,
            "[{}] get_range {r:?}: length",
            who(&*s)
        );
        assert!(
            got == data.slice(r.start as usize..r.end as usize),
            "[{}] get_range {r:?}: content",
            who(&*s)
        );
    }
    for r in [n - 10..n + 1, 0..n + 100] {
        match s.get_range(key, r.clone()).await {
            Ok(b) => panic!(
                "[{}] get_range {r:?} past the end of a {n}-byte object returned {} bytes \
                 instead of an error",
                who(&*s),
                b.len()
            ),
            Err(e) => assert_eq!(
                e.kind,
                ErrorKind::Corrupt,
                "[{}] get_range {r:?} past the end: kind (message: {e})",
                who(&*s)
            ),
        }
    }
}

/// get, head and get_range of an absent key fail with NotFound.
pub async fn not_found(s: Arc<dyn Storage>) {
    let key = "conf/not_found/missing";
    let e = s
        .get(key)
        .await
        .expect_err("get of a missing key succeeded");
    assert_eq!(e.kind, ErrorKind::NotFound, "[{}] get: {e}", who(&*s));
    let e = s
        .head(key)
        .await
        .expect_err("head of a missing key succeeded");
    assert_eq!(e.kind, ErrorKind::NotFound, "[{}] head: {e}", who(&*s));
    let e = s
        .get_range(key, 0..10)
        .await
        .expect_err("get_range of a missing key succeeded");
    assert_eq!(e.kind, ErrorKind::NotFound, "[{}] get_range: {e}", who(&*s));
    let e = s
        .get("conf/not_found/no/such/dir")
        .await
        .expect_err("get below a missing directory succeeded");
    assert_eq!(
        e.kind,
        ErrorKind::NotFound,
        "[{}] get nested: {e}",
        who(&*s)
    );
}

/// `put` replaces an existing object (including a shorter one over a longer one).
pub async fn overwrite(s: Arc<dyn Storage>) {
    let key = "conf/overwrite/obj";
    put_get(&*s, key, pattern(5000, 1)).await;
    put_get(&*s, key, pattern(10, 2)).await;
    let listed = s.list("conf/overwrite/").await.expect("list");
    assert_eq!(listed.len(), 1, "[{}] overwrite left {listed:?}", who(&*s));
}

/// `put_if_absent` creates once, then refuses with AlreadyExists and keeps the first content.
pub async fn put_if_absent_exclusive(s: Arc<dyn Storage>) {
    let key = "conf/put_if_absent/obj";
    let first = pattern(1000, 1);
    s.put_if_absent(key, first.clone())
        .await
        .unwrap_or_else(|e| panic!("[{}] first put_if_absent: {e}", who(&*s)));
    let e = s
        .put_if_absent(key, pattern(1000, 2))
        .await
        .expect_err("second put_if_absent succeeded");
    assert_eq!(
        e.kind,
        ErrorKind::AlreadyExists,
        "[{}] second put_if_absent: {e}",
        who(&*s)
    );
    assert!(
        s.get(key).await.expect("get") == first,
        "[{}] content changed",
        who(&*s)
    );
}

/// `writers` concurrent `put_if_absent` calls of different content: exactly one wins and
/// the stored object is the winner's.
pub async fn put_if_absent_race(s: Arc<dyn Storage>, writers: usize) {
    let key = "conf/race/obj";
    let mut tasks = Vec::new();
    for i in 0..writers {
        let s = s.clone();
        tasks.push(tokio::spawn(async move {
            let data = pattern(64 * 1024 + i, 100 + i as u64);
            (i, data.clone(), s.put_if_absent(key, data).await)
        }));
    }
    let mut winners = Vec::new();
    for t in tasks {
        let (i, data, r) = t.await.expect("writer task panicked");
        match r {
            Ok(()) => winners.push((i, data)),
            Err(e) if e.kind == ErrorKind::AlreadyExists => {}
            Err(e) => panic!("[{}] racing writer {i}: unexpected error {e}", who(&*s)),
        }
    }
    assert_eq!(
        winners.len(),
        1,
        "[{}] {writers} racing put_if_absent: winners {:?}",
        who(&*s),
        winners.iter().map(|w| w.0).collect::<Vec<_>>()
    );
    let stored = s.get(key).await.expect("get after race");
    assert!(
        stored == winners[0].1,
        "[{}] stored content is not the winner's",
        who(&*s)
    );
}

/// `list` is recursive, string-prefix exact, reports sizes, and ignores nothing else.
pub async fn list_semantics(s: Arc<dyn Storage>) {
    let objects: BTreeMap<&str, usize> = [
        ("conf/list/a/b/x", 1),
        ("conf/list/a/b/y/z", 22),
        ("conf/list/a/bc/x", 333),
        ("conf/list/a/bd", 0),
        ("conf/list/ab", 4444),
    ]
    .into_iter()
    .collect();
    for (k, len) in &objects {
        s.put(k, pattern(*len, 3)).await.expect("put");
    }
    let check = |prefix: &'static str, want: Vec<&'static str>| {
        let s = s.clone();
        let objects = objects.clone();
        async move {
            let mut got = s
                .list(prefix)
                .await
                .unwrap_or_else(|e| panic!("[{}] list {prefix:?}: {e}", who(&*s)));
            got.sort_by(|a, b| a.key.cmp(&b.key));
            let keys: Vec<&str> = got.iter().map(|m| m.key.as_str()).collect();
            assert_eq!(keys, want, "[{}] list {prefix:?}", who(&*s));
            for m in &got {
                assert_eq!(
                    m.size,
                    objects[m.key.as_str()] as u64,
                    "[{}] size of {}",
                    who(&*s),
                    m.key
                );
            }
        }
    };
    check(
        "conf/list/",
        vec![
            "conf/list/a/b/x",
            "conf/list/a/b/y/z",
            "conf/list/a/bc/x",
            "conf/list/a/bd",
            "conf/list/ab",
        ],
    )
    .await;
    check(
        "conf/list/a/b",
        vec![
            "conf/list/a/b/x",
            "conf/list/a/b/y/z",
            "conf/list/a/bc/x",
            "conf/list/a/bd",
        ],
    )
    .await;
    check(
        "conf/list/a/b/",
        vec!["conf/list/a/b/x", "conf/list/a/b/y/z"],
    )
    .await;
    check("conf/list/a/b/y/z", vec!["conf/list/a/b/y/z"]).await;
    check("conf/list/nothing", vec![]).await;
    check("conf/list/a/nothing/", vec![]).await;
    let all = s.list("").await.expect("list everything");
    for k in objects.keys() {
        assert!(
            all.iter().any(|m| m.key == *k),
            "[{}] list(\"\") misses {k}",
            who(&*s)
        );
    }
}

/// Deleting removes the object; deleting an absent key succeeds.
pub async fn delete_idempotent(s: Arc<dyn Storage>) {
    let key = "conf/delete/obj";
    s.put(key, pattern(10, 1)).await.expect("put");
    s.delete(key)
        .await
        .unwrap_or_else(|e| panic!("[{}] delete: {e}", who(&*s)));
    let e = s.get(key).await.expect_err("get after delete succeeded");
    assert_eq!(
        e.kind,
        ErrorKind::NotFound,
        "[{}] get after delete: {e}",
        who(&*s)
    );
    s.delete(key)
        .await
        .unwrap_or_else(|e| panic!("[{}] second delete of the same key: {e}", who(&*s)));
    s.delete("conf/delete/never/existed")
        .await
        .unwrap_or_else(|e| panic!("[{}] delete of a never-existing key: {e}", who(&*s)));
    assert!(s.list("conf/delete/").await.expect("list").is_empty());
}

/// Deeply nested keys and repository-shaped names work for every operation.
pub async fn nested_keys(s: Arc<dyn Storage>) {
    let keys = [
        "conf/nested/packs/ab/abcdef0123456789",
        "conf/nested/wal/main/0000000100000000/000000010000000000000001",
        "conf/nested/backups/main/20260101T000000Z",
        "conf/nested/x/y/z/w/v/u/t",
        "conf/nested/config",
    ];
    for (i, k) in keys.iter().enumerate() {
        put_get(&*s, k, pattern(100 + i, i as u64)).await;
    }
    let listed = s.list("conf/nested/").await.expect("list");
    assert_eq!(
        listed.len(),
        keys.len(),
        "[{}] nested list: {listed:?}",
        who(&*s)
    );
    for k in keys {
        s.delete(k).await.expect("delete");
    }
    assert!(s.list("conf/nested/").await.expect("list").is_empty());
}
