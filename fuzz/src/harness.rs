//! The stable fuzz engine `cargo test` runs (tests/fuzz_targets.rs).
//!
//! For one target: every corpus file, then random mutations of them ([`crate::mutate`])
//! until a time budget is spent. It fails, saving the input that did it, when
//! - the target panics (a slice out of range, an overflow, a failed oracle);
//! - one input runs longer than the hang limit;
//! - one allocation asks for more than [`MAX_ALLOC`] bytes, or all live allocations of the
//!   process together exceed [`MAX_LIVE`] ([`LimitedAlloc`], which the test binary installs
//!   as its global allocator). Unwinding out of an allocator is not allowed, so this one
//!   writes the input and the reason out, then aborts the test process.
//!
//! Environment:
//! - `PGKEEP_FUZZ_SECS`: mutation time per target (default 6 s; 0: the corpus only);
//! - `PGKEEP_FUZZ_SEED`: the mutation seed (default: random, printed);
//! - `PGKEEP_FUZZ_HANG_SECS`: the per-input time limit (default 10 s);
//! - `PGKEEP_FUZZ_INPUT`: run this one file through the target instead (to reproduce).

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::{corpus_dir, target, Target};

/// Largest single allocation a target may make: a legitimate parse of a fuzz-sized input
/// never needs this much; a length read from the input and believed does.
pub const MAX_ALLOC: usize = 256 << 20;
/// Most bytes all threads of the test process may hold at once.
pub const MAX_LIVE: usize = 3 << 30;
/// Longest mutated input.
const MAX_INPUT: usize = 1 << 20;

static LIVE: AtomicUsize = AtomicUsize::new(0);
/// Where the input that broke the allocation limits is written (the first directory given
/// to [`run_target`] in this process).
static FAILURE_DIR: OnceLock<PathBuf> = OnceLock::new();

thread_local! {
    /// The input the target on this thread is running, and the target's name.
    static CURRENT: Cell<Option<(*const u8, usize, &'static str)>> = const { Cell::new(None) };
    /// Set while the allocator reports a failure: its own allocations pass unchecked.
    static REPORTING: Cell<bool> = const { Cell::new(false) };
}

/// The system allocator with limits (see the module documentation). Install it in a test
/// binary with `#[global_allocator] static A: LimitedAlloc = LimitedAlloc;`.
pub struct LimitedAlloc;

impl LimitedAlloc {
    fn admit(size: usize) {
        let reporting = REPORTING.try_with(|r| r.get()).unwrap_or(true);
        if reporting {
            return;
        }
        let live = LIVE.load(Ordering::Relaxed);
        if size > MAX_ALLOC || live.saturating_add(size) > MAX_LIVE {
            over_limit(size, live);
        }
    }
}

// SAFETY: every call is passed on to `System` unchanged; only the counter is added.
unsafe impl GlobalAlloc for LimitedAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        Self::admit(layout.size());
        let p = System.alloc(layout);
        if !p.is_null() {
            LIVE.fetch_add(layout.size(), Ordering::Relaxed);
        }
        p
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        Self::admit(layout.size());
        let p = System.alloc_zeroed(layout);
        if !p.is_null() {
            LIVE.fetch_add(layout.size(), Ordering::Relaxed);
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        System.dealloc(ptr, layout);
        LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if new_size > layout.size() {
            Self::admit(new_size - layout.size());
            if new_size > MAX_ALLOC {
                Self::admit(new_size);
            }
        }
        let p = System.realloc(ptr, layout, new_size);
        if !p.is_null() {
            LIVE.fetch_add(new_size, Ordering::Relaxed);
            LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
        }
        p
    }
}

/// Writes out the input being run and why, then aborts: an allocator must not unwind.
#[cold]
fn over_limit(size: usize, live: usize) -> ! {
    let _ = REPORTING.try_with(|r| r.set(true));
    let current = CURRENT.try_with(|c| c.get()).ok().flatten();
    match current {
        Some((ptr, len, name)) => {
            // SAFETY: `run_one` keeps the input alive while it is set as current.
            let input = unsafe { std::slice::from_raw_parts(ptr, len) };
            let dir = FAILURE_DIR
                .get()
                .cloned()
                .unwrap_or_else(std::env::temp_dir);
            let saved = save_failure(&dir, name, input);
            eprintln!(
                "fuzz target {name}: an allocation of {size} bytes (with {live} bytes live) \
                 breaks the limits ({MAX_ALLOC} per allocation, {MAX_LIVE} in all); the input \
                 is saved at {}",
                saved.display()
            );
        }
        None => eprintln!(
            "fuzz harness: an allocation of {size} bytes (with {live} bytes live) outside any \
             target breaks the limits"
        ),
    }
    std::process::abort()
}

/// Saves a failing input under `dir/<target>/`; returns its path.
fn save_failure(dir: &Path, name: &str, input: &[u8]) -> PathBuf {
    let dir = dir.join(name);
    let _ = std::fs::create_dir_all(&dir);
    let h = input.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &b| {
        (h ^ b as u64).wrapping_mul(0x100_0000_01b3)
    });
    let path = dir.join(format!("failure-{h:016x}"));
    let _ = std::fs::write(&path, input);
    path
}

/// What one run of the engine did.
#[derive(Debug, Clone, Copy, Default)]
pub struct RunStats {
    /// Corpus files run.
    pub corpus: usize,
    /// Corpus files the target accepted.
    pub accepted: usize,
    /// Mutated inputs run.
    pub mutations: u64,
    /// Mutated inputs the target accepted.
    pub mutations_accepted: u64,
}

/// The corpus files of a target, sorted by name.
pub fn load_corpus(name: &str) -> Vec<(PathBuf, Vec<u8>)> {
    let dir = corpus_dir(name);
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| {
            panic!(
                "fuzz target {name}: reading its corpus {}: {e}",
                dir.display()
            )
        })
        .map(|e| e.expect("corpus entry").path())
        .filter(|p| p.is_file())
        .collect();
    files.sort();
    files
        .into_iter()
        .map(|p| {
            let b = std::fs::read(&p).unwrap_or_else(|e| panic!("reading {}: {e}", p.display()));
            (p, b)
        })
        .collect()
}

fn env_f64(name: &str, default: f64) -> f64 {
    match std::env::var(name) {
        Ok(v) => v
            .parse()
            .unwrap_or_else(|_| panic!("{name}={v:?} is not a number")),
        Err(_) => default,
    }
}

/// How long and from where one target runs.
#[derive(Debug, Clone)]
pub struct Options {
    /// Time spent on mutations after the corpus (zero: the corpus only).
    pub budget: Duration,
    /// Longest one input may run.
    pub hang: Duration,
    /// Seed of the mutations.
    pub seed: u64,
    /// Whether to mutate at all (not when replaying one input).
    pub mutate: bool,
}

impl Options {
    /// From `PGKEEP_FUZZ_SECS`, `PGKEEP_FUZZ_HANG_SECS`, `PGKEEP_FUZZ_SEED` and
    /// `PGKEEP_FUZZ_INPUT` (see the module documentation).
    pub fn from_env() -> Self {
        Options {
            budget: Duration::from_secs_f64(env_f64("PGKEEP_FUZZ_SECS", 6.0)),
            hang: Duration::from_secs_f64(env_f64("PGKEEP_FUZZ_HANG_SECS", 10.0)),
            seed: match std::env::var("PGKEEP_FUZZ_SEED") {
                Ok(s) => s.parse().expect("PGKEEP_FUZZ_SEED is a u64"),
                Err(_) => rand::rng().random(),
            },
            mutate: std::env::var_os("PGKEEP_FUZZ_INPUT").is_none(),
        }
    }
}

/// What made a run fail; the input is saved at `saved`.
#[derive(Debug, Clone)]
pub enum Finding {
    /// The target panicked with this message.
    Panic { saved: PathBuf, message: String },
    /// One input ran longer than the hang limit.
    Hang { saved: PathBuf },
}

/// State the watchdog reads while the worker runs.
struct Shared {
    /// Nanoseconds since `epoch` when the current input started, 0 between inputs.
    started: AtomicU64,
    epoch: Instant,
    current: Mutex<Vec<u8>>,
    done: AtomicBool,
    failure_dir: PathBuf,
}

/// Runs target `name` with [`Options::from_env`] on its corpus (or on `PGKEEP_FUZZ_INPUT`).
/// Panics (failing the test) on a finding, naming the saved input; `failure_dir` receives it.
pub fn run(name: &'static str, failure_dir: &Path) -> RunStats {
    let t = target(name).unwrap_or_else(|| panic!("no fuzz target {name}"));
    let corpus: Vec<Vec<u8>> = match std::env::var_os("PGKEEP_FUZZ_INPUT") {
        Some(p) => vec![std::fs::read(&p).expect("reading PGKEEP_FUZZ_INPUT")],
        None => load_corpus(name).into_iter().map(|(_, b)| b).collect(),
    };
    let opts = Options::from_env();
    let seed = opts.seed;
    let replay = |saved: &Path| {
        format!(
            "the input is saved at {}\nreproduce: PGKEEP_FUZZ_INPUT={} cargo test -p pgkeep-fuzz \
             --test fuzz_targets {name}",
            saved.display(),
            saved.display()
        )
    };
    match run_target(t, corpus, failure_dir, &opts) {
        Ok(stats) => {
            eprintln!(
                "fuzz target {name}: {} corpus files ({} accepted), {} mutations ({} accepted) \
                 in {:?}, seed {seed}",
                stats.corpus,
                stats.accepted,
                stats.mutations,
                stats.mutations_accepted,
                opts.budget
            );
            stats
        }
        Err(Finding::Panic { saved, message }) => panic!(
            "fuzz target {name} panicked (seed {seed}): {message}\n{}",
            replay(&saved)
        ),
        Err(Finding::Hang { saved }) => panic!(
            "fuzz target {name}: one input ran longer than {:?} (seed {seed})\n{}",
            opts.hang,
            replay(&saved)
        ),
    }
}

/// Runs `t` on `corpus`, then on mutations of it for the budget, on a worker thread watched
/// for hangs. Findings save their input under `failure_dir/<target>/`.
pub fn run_target(
    t: &'static Target,
    corpus: Vec<Vec<u8>>,
    failure_dir: &Path,
    opts: &Options,
) -> Result<RunStats, Finding> {
    let _ = FAILURE_DIR.set(failure_dir.to_path_buf());
    assert!(
        !corpus.is_empty(),
        "fuzz target {} has an empty corpus",
        t.name
    );
    let shared = Arc::new(Shared {
        started: AtomicU64::new(0),
        epoch: Instant::now(),
        current: Mutex::new(Vec::new()),
        done: AtomicBool::new(false),
        failure_dir: failure_dir.to_path_buf(),
    });
    let worker = {
        let (shared, opts) = (shared.clone(), opts.clone());
        std::thread::Builder::new()
            .name(format!("fuzz-{}", t.name))
            .stack_size(2 << 20)
            .spawn(move || {
                let r = work(t, &corpus, &opts, &shared);
                shared.done.store(true, Ordering::SeqCst);
                r
            })
            .expect("spawning the fuzz worker")
    };
    while !shared.done.load(Ordering::SeqCst) {
        std::thread::sleep(Duration::from_millis(20));
        let at = shared.started.load(Ordering::SeqCst);
        if at != 0
            && shared
                .epoch
                .elapsed()
                .saturating_sub(Duration::from_nanos(at))
                > opts.hang
        {
            // The worker is left to finish on its own: a hung input cannot be stopped.
            let input = shared.current.lock().unwrap().clone();
            let saved = save_failure(failure_dir, t.name, &input);
            return Err(Finding::Hang { saved });
        }
    }
    worker.join().expect("the fuzz worker does not panic")
}

/// The worker: corpus, then mutations. Err carries the saved input and the panic message.
fn work(
    t: &'static Target,
    corpus: &[Vec<u8>],
    opts: &Options,
    shared: &Shared,
) -> Result<RunStats, Finding> {
    let mut stats = RunStats::default();
    for input in corpus {
        stats.corpus += 1;
        stats.accepted += usize::from(run_one(t, input, shared)?);
    }
    if !opts.mutate {
        return Ok(stats);
    }
    let max_len = corpus
        .iter()
        .map(Vec::len)
        .max()
        .unwrap_or(0)
        .saturating_mul(2)
        .clamp(4096, MAX_INPUT);
    let mut rng = StdRng::seed_from_u64(opts.seed);
    let deadline = Instant::now() + opts.budget;
    let mut input = Vec::with_capacity(max_len);
    while Instant::now() < deadline {
        // A batch between clock reads: most inputs take microseconds.
        for _ in 0..32 {
            let base = &corpus[rng.random_range(0..corpus.len())];
            let other = &corpus[rng.random_range(0..corpus.len())];
            input.clear();
            input.extend_from_slice(base);
            crate::mutate::mutate(&mut rng, &mut input, other, t.dict, max_len);
            stats.mutations += 1;
            stats.mutations_accepted += u64::from(run_one(t, &input, shared)?);
        }
    }
    Ok(stats)
}

/// Runs one input, with the watchdog and the allocator told what it is.
fn run_one(t: &'static Target, input: &[u8], shared: &Shared) -> Result<bool, Finding> {
    {
        let mut cur = shared.current.lock().unwrap();
        cur.clear();
        cur.extend_from_slice(input);
    }
    shared.started.store(
        shared.epoch.elapsed().as_nanos().max(1) as u64,
        Ordering::SeqCst,
    );
    CURRENT.with(|c| c.set(Some((input.as_ptr(), input.len(), t.name))));
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| (t.run)(input)));
    CURRENT.with(|c| c.set(None));
    shared.started.store(0, Ordering::SeqCst);
    r.map_err(|payload| {
        let message = payload
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| payload.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_else(|| "(no message)".into());
        Finding::Panic {
            saved: save_failure(&shared.failure_dir, t.name, input),
            message,
        }
    })
}
