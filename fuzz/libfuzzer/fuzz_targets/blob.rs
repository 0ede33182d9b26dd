#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    (pgkeep_fuzz::target("blob").expect("a pgkeep-fuzz target").run)(data);
});
