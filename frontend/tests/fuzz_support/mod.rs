//! Shared machinery of the fuzz tests (`frontend/tests/fuzz_*.rs`, `tests/fuzz_pipeline.rs`):
//! a counting global allocator, a proptest runner configured from the environment, and a
//! per-case check that turns a panic, an oversized allocation or an error that does not
//! name the input into a test failure.
//!
//! Environment: `PROPTEST_CASES` (cases per parser; each test has its own default, sized
//! for `cargo test`), `PROPTEST_RNG_SEED` (default: a fixed seed, so CI is deterministic).
//! Failure persistence is off: a failure prints its minimal input instead.

#![allow(dead_code)]

pub mod json;
pub mod mutate;

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::{Cell, RefCell};
use std::fmt::{Debug, Display, Write as _};
use std::panic::{self, AssertUnwindSafe};
use std::sync::Once;
use std::time::Instant;

use proptest::strategy::Strategy;
use proptest::test_runner::{Config, RngSeed, TestCaseError, TestError, TestRunner};

/// Largest single allocation, and largest growth of live bytes, one case may cause.
pub const ALLOC_BOUND: usize = 256 << 20;
/// Requests above this are refused outright (the process then aborts, after printing the
/// case): letting them through could exhaust the machine before the case ends.
const ALLOC_REFUSE: usize = 8 << 30;
/// Seed of the deterministic CI run.
const DEFAULT_SEED: u64 = 0x7570_6d69_7866_757a;

thread_local! {
    static TRACKING: Cell<bool> = const { Cell::new(false) };
    static LARGEST: Cell<usize> = const { Cell::new(0) };
    static LIVE: Cell<isize> = const { Cell::new(0) };
    static PEAK: Cell<isize> = const { Cell::new(0) };
    static PANIC: RefCell<Option<String>> = const { RefCell::new(None) };
    static CASE: RefCell<String> = const { RefCell::new(String::new()) };
    /// Calls made and calls that returned `Ok`, for the summary line.
    static CALLS: Cell<(u64, u64)> = const { Cell::new((0, 0)) };
}

/// The system allocator, counting the requests made on a thread while a case runs there.
pub struct CountingAlloc;

fn on_alloc(size: usize) -> bool {
    let tracking = TRACKING.try_with(Cell::get).unwrap_or(false);
    if !tracking {
        return true;
    }
    let _ = LARGEST.try_with(|l| l.set(l.get().max(size)));
    let _ = LIVE.try_with(|live| {
        live.set(live.get() + size as isize);
        let _ = PEAK.try_with(|p| p.set(p.get().max(live.get())));
    });
    if size > ALLOC_REFUSE {
        // Refusing aborts the process: say which case did it first.
        let _ = TRACKING.try_with(|t| t.set(false));
        let _ = CASE.try_with(|c| {
            eprintln!(
                "fuzz: refusing an allocation of {size} bytes; case: {}",
                c.borrow()
            )
        });
        return false;
    }
    true
}

fn on_free(size: usize) {
    if TRACKING.try_with(Cell::get).unwrap_or(false) {
        let _ = LIVE.try_with(|live| live.set(live.get() - size as isize));
    }
}

// SAFETY: every request is forwarded to `System` unchanged; the bookkeeping only touches
// const-initialised thread-locals, which never allocate.
unsafe impl GlobalAlloc for CountingAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if !on_alloc(layout.size()) {
            return std::ptr::null_mut();
        }
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        if !on_alloc(layout.size()) {
            return std::ptr::null_mut();
        }
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        on_free(layout.size());
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        on_free(layout.size());
        if !on_alloc(new_size) {
            return std::ptr::null_mut();
        }
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

/// Installs (once) a panic hook that, on a thread running a case, records the message
/// instead of printing it; elsewhere the previous hook runs as usual.
fn install_panic_hook() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let previous = panic::take_hook();
        panic::set_hook(Box::new(move |info| {
            if TRACKING.try_with(Cell::get).unwrap_or(false) {
                let location = info
                    .location()
                    .map(|l| format!(" at {}:{}", l.file(), l.line()))
                    .unwrap_or_default();
                let message = upmix_ir::panic_message(info.payload())
                    .unwrap_or_else(|| "<non-string panic>".into());
                let _ = PANIC.try_with(|p| *p.borrow_mut() = Some(format!("{message}{location}")));
            } else {
                previous(info);
            }
        }));
    });
}

/// What one call did, besides its result.
struct Measured<T> {
    result: Result<T, String>,
    largest: usize,
    peak: isize,
}

/// Runs `f` with allocation tracking on and panics caught; `case` describes the input for
/// the message printed if an allocation has to be refused.
fn measure<T>(case: &dyn Debug, f: impl FnOnce() -> T) -> Measured<T> {
    install_panic_hook();
    CASE.with(|c| {
        let mut c = c.borrow_mut();
        c.clear();
        let _ = write!(c, "{case:?}");
    });
    LARGEST.with(|l| l.set(0));
    LIVE.with(|l| l.set(0));
    PEAK.with(|p| p.set(0));
    PANIC.with(|p| *p.borrow_mut() = None);
    TRACKING.with(|t| t.set(true));
    let outcome = panic::catch_unwind(AssertUnwindSafe(f));
    TRACKING.with(|t| t.set(false));
    let result = outcome.map_err(|_| {
        PANIC
            .with(|p| p.borrow_mut().take())
            .unwrap_or_else(|| "<panic without message>".into())
    });
    Measured {
        result,
        largest: LARGEST.with(Cell::get),
        peak: PEAK.with(Cell::get),
    }
}

/// Calls a parser on one mutated input. Fails the case when the call panics, allocates
/// more than [`ALLOC_BOUND`] (in one request or in all), or returns an error whose text
/// does not contain `must_name` (the input's path, or `origin:` for the pipeline).
/// `case` (the mutations) is printed if an allocation has to be refused; `shown` (the
/// mutated input) is added to a failure's message.
pub fn check_call<T, E: Display>(
    must_name: &str,
    case: &dyn Debug,
    shown: &dyn Fn() -> String,
    call: impl FnOnce() -> Result<T, E>,
) -> Result<Option<T>, TestCaseError> {
    let m = measure(case, || call().map_err(|e| e.to_string()));
    let ok = matches!(m.result, Ok(Ok(_)));
    CALLS.with(|c| c.set((c.get().0 + 1, c.get().1 + u64::from(ok))));
    let fail = |what: String| Err(TestCaseError::fail(format!("{what}\ninput: {}", shown())));
    let value = match m.result {
        Err(panic) => return fail(format!("panicked: {panic}")),
        Ok(Ok(v)) => Some(v),
        Ok(Err(text)) if text.contains(must_name) => None,
        Ok(Err(text)) => return fail(format!("error does not name `{must_name}`: {text}")),
    };
    if m.largest > ALLOC_BOUND || m.peak > ALLOC_BOUND as isize {
        return fail(format!(
            "allocated too much: largest request {} bytes, peak {} bytes (bound {ALLOC_BOUND})",
            m.largest, m.peak
        ));
    }
    Ok(value)
}

fn env_u64(name: &str) -> Option<u64> {
    let text = std::env::var(name).ok()?;
    match text.trim().parse() {
        Ok(v) => Some(v),
        Err(_) => panic!("{name}={text} is not a number"),
    }
}

/// Runs `test` on `PROPTEST_CASES` (default `default_cases`) inputs drawn from `strategy`
/// with the seed `PROPTEST_RNG_SEED` (default fixed), shrinking a failure to a minimal
/// input. Prints one line of numbers for scripts/fuzz.sh.
pub fn fuzz<S: Strategy>(
    parser: &str,
    default_cases: u32,
    strategy: S,
    test: impl Fn(S::Value) -> Result<(), TestCaseError>,
) {
    let cases = env_u64("PROPTEST_CASES").map_or(default_cases, |c| c as u32);
    let seed = env_u64("PROPTEST_RNG_SEED").unwrap_or(DEFAULT_SEED);
    let config = Config {
        cases,
        failure_persistence: None,
        rng_seed: RngSeed::Fixed(seed),
        max_shrink_iters: 20_000,
        ..Config::default()
    };
    let start = Instant::now();
    CALLS.with(|c| c.set((0, 0)));
    let result = TestRunner::new(config).run(&strategy, test);
    let secs = start.elapsed().as_secs_f64();
    let (calls, ok) = CALLS.with(Cell::get);
    match result {
        Ok(()) => println!(
            "fuzz-result parser={parser} cases={cases} panics=0 failures=0 seconds={secs:.1} seed={seed} accepted={ok}/{calls}"
        ),
        Err(TestError::Abort(reason)) => panic!("fuzz {parser}: aborted: {reason}"),
        Err(TestError::Fail(reason, input)) => {
            let panics = usize::from(reason.message().starts_with("panicked"));
            println!(
                "fuzz-result parser={parser} cases={cases} panics={panics} failures=1 seconds={secs:.1} seed={seed}"
            );
            panic!("fuzz {parser} (seed {seed}): {reason}\nminimal failing input: {input:#?}")
        }
    }
}

/// A scratch directory for one test's inputs, rewritten case after case: in memory
/// (`/dev/shm`) where there is one, as disk file systems may flush every rewrite.
pub fn scratch() -> tempfile::TempDir {
    let shm = std::path::Path::new("/dev/shm");
    let builder = {
        let mut b = tempfile::Builder::new();
        b.prefix("upmix-fuzz");
        b
    };
    match shm.is_dir() {
        true => builder.tempdir_in(shm),
        false => builder.tempdir(),
    }
    .expect("a temporary directory")
}

/// Replaces the file at `path` with `bytes` (a new file, not a truncated one, so that no
/// file system flushes it).
pub fn rewrite(path: &std::path::Path, bytes: &[u8]) {
    let _ = std::fs::remove_file(path);
    std::fs::write(path, bytes).expect("scratch file written");
}

/// Bytes as an escaped string, cut after `max` bytes (for failure messages).
pub fn show_bytes(bytes: &[u8], max: usize) -> String {
    let shown: String = bytes[..bytes.len().min(max)].escape_ascii().to_string();
    if bytes.len() > max {
        format!("b\"{shown}\"... ({} bytes)", bytes.len())
    } else {
        format!("b\"{shown}\"")
    }
}
