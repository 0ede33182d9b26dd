#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    (pgkeep_fuzz::target("config_toml").expect("a pgkeep-fuzz target").run)(data);
});
