#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    (pgkeep_fuzz::target("pg_control").expect("a pgkeep-fuzz target").run)(data);
});
