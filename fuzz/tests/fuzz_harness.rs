//! The stable fuzz harness catches what it is there to catch: a panicking target, a hanging
//! one and one that allocates without bound, each with the input saved. Without these, the
//! fuzz tests of tests/fuzz_targets.rs could pass without being able to fail.

use std::time::Duration;

use pgkeep_fuzz::harness::{self, Finding, LimitedAlloc, Options};
use pgkeep_fuzz::Target;

#[global_allocator]
static ALLOC: LimitedAlloc = LimitedAlloc;

fn options(budget_ms: u64, hang_ms: u64) -> Options {
    Options {
        budget: Duration::from_millis(budget_ms),
        hang: Duration::from_millis(hang_ms),
        seed: 1,
        mutate: true,
    }
}

/// Panics on inputs holding a `!`, which the mutations soon make from the corpus's `?`.
static PANICKY: Target = Target {
    name: "panicky",
    run: |d| {
        assert!(!d.contains(&b'!'), "a bang");
        true
    },
    dict: &[b"!"],
};

#[test]
fn a_panicking_target_is_a_finding_with_its_input_saved() {
    let dir = tempfile::tempdir().unwrap();
    let corpus = vec![b"a harmless question?".to_vec()];
    match harness::run_target(&PANICKY, corpus, dir.path(), &options(5000, 5000)) {
        Err(Finding::Panic { saved, message }) => {
            assert!(message.contains("a bang"), "{message}");
            assert!(saved.starts_with(dir.path().join("panicky")));
            assert!(std::fs::read(&saved).unwrap().contains(&b'!'));
        }
        other => panic!("the panic was not reported: {other:?}"),
    }
}

static SLOW: Target = Target {
    name: "slow",
    run: |d| {
        if d == b"slow" {
            std::thread::sleep(Duration::from_secs(3));
        }
        true
    },
    dict: &[],
};

#[test]
fn an_input_running_past_the_hang_limit_is_a_finding_with_its_input_saved() {
    let dir = tempfile::tempdir().unwrap();
    let corpus = vec![b"fast".to_vec(), b"slow".to_vec()];
    match harness::run_target(&SLOW, corpus, dir.path(), &options(0, 300)) {
        Err(Finding::Hang { saved }) => {
            assert_eq!(std::fs::read(&saved).unwrap(), b"slow");
        }
        other => panic!("the hang was not reported: {other:?}"),
    }
    let stats = harness::run_target(
        &SLOW,
        vec![b"fast".to_vec()],
        dir.path(),
        &options(200, 300),
    )
    .unwrap();
    assert_eq!((stats.corpus, stats.accepted), (1, 1));
    assert!(stats.mutations > 0);
}

/// Believes the length its input starts with, as a careless parser would.
static GREEDY: Target = Target {
    name: "greedy",
    run: |d| {
        let n = u32::from_le_bytes(d[..4].try_into().unwrap()) as usize;
        std::hint::black_box(vec![0u8; n << 10]);
        true
    },
    dict: &[],
};

const CHILD: &str = "PGKEEP_FUZZ_HARNESS_CHILD";

#[test]
fn an_allocation_over_the_cap_aborts_the_run_with_its_input_saved() {
    let dir = tempfile::tempdir().unwrap();
    // The allocator aborts the process: run the greedy target in a child of this test binary.
    let out = std::process::Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "greedy_child", "--nocapture", "--test-threads=1"])
        .env(CHILD, dir.path())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "the child did not fail: {stderr}");
    assert!(
        stderr.contains("fuzz target greedy: an allocation of"),
        "{stderr}"
    );
    assert!(stderr.contains("breaks the limits"), "{stderr}");
    let saved: Vec<_> = std::fs::read_dir(dir.path().join("greedy"))
        .unwrap()
        .map(|e| std::fs::read(e.unwrap().path()).unwrap())
        .collect();
    assert_eq!(
        saved,
        [(1u32 << 20).to_le_bytes().to_vec()],
        "the saved input"
    );
}

#[test]
fn greedy_child() {
    let Some(dir) = std::env::var_os(CHILD) else {
        return; // only as the child of the test above
    };
    // 1 KiB asks for 1 MiB, fine; 1 MiB asks for 1 GiB, over the 256 MiB cap.
    let corpus = vec![
        1024u32.to_le_bytes().to_vec(),
        (1u32 << 20).to_le_bytes().to_vec(),
    ];
    let _ = harness::run_target(
        &GREEDY,
        corpus,
        std::path::Path::new(&dir),
        &options(0, 5000),
    );
    unreachable!("the allocation of 1 GiB was let through");
}
