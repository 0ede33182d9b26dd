//! Every fuzz target, run on stable as part of `cargo test` for a bounded time: each file of
//! its corpus (fuzz/corpus/<target>/), then random mutations of them for `PGKEEP_FUZZ_SECS`
//! (default 6 s per target, 14 targets). A panic, an input running longer than the hang
//! limit, or an allocation over the cap fails the test and saves the input under this test
//! binary's target tmp directory; see docs/fuzzing.md to reproduce it and to run longer.

use pgkeep_fuzz::harness::{self, LimitedAlloc};

#[global_allocator]
static ALLOC: LimitedAlloc = LimitedAlloc;

fn fuzz(name: &'static str) {
    let dir = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("fuzz-failures");
    let stats = harness::run(name, &dir);
    // Real inputs must reach the end of the parser, or the mutations explore only its
    // first refusal (a reproduced input alone may well be refused).
    assert!(
        stats.accepted > 0 || std::env::var_os("PGKEEP_FUZZ_INPUT").is_some(),
        "fuzz target {name}: no corpus file is accepted; its seeds do not reach the parser"
    );
}

macro_rules! targets {
    ($($name:ident),* $(,)?) => {
        $(
            #[test]
            fn $name() {
                fuzz(stringify!($name));
            }
        )*

        #[test]
        fn every_target_has_a_test_and_a_corpus_and_every_corpus_a_target() {
            let tested = [$(stringify!($name)),*];
            for t in pgkeep_fuzz::TARGETS {
                assert!(tested.contains(&t.name), "target {} has no test here", t.name);
                assert!(
                    !harness::load_corpus(t.name).is_empty(),
                    "target {} has no corpus",
                    t.name
                );
            }
            let dir = pgkeep_fuzz::corpus_dir("");
            for e in std::fs::read_dir(&dir).unwrap() {
                let name = e.unwrap().file_name().into_string().unwrap();
                assert!(pgkeep_fuzz::target(&name).is_some(), "corpus {name} has no target");
            }
        }
    };
}

targets!(
    pack,
    blob,
    index_file,
    key_file,
    repo_config,
    manifest,
    config_toml,
    wal_segment,
    wal_record,
    pg_control,
    backup_label,
    timeline_history,
    dump_archive,
    wal_file_name,
);
