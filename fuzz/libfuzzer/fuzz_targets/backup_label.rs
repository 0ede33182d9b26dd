#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    (pgkeep_fuzz::target("backup_label").expect("a pgkeep-fuzz target").run)(data);
});
