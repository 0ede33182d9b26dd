#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    (pgkeep_fuzz::target("timeline_history").expect("a pgkeep-fuzz target").run)(data);
});
