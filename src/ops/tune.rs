//! Autotuning, cuDNN-benchmark style: where an op has several algorithms for one shape (a 3×3
//! convolution by Winograd or by im2col + GEMM, its weight gradient likewise), the first call of
//! a shape times every candidate on the call's own inputs, returns the fastest one's result and
//! remembers the choice for that shape. The choices persist in a cache file per machine (CPU
//! model and thread count) and build, so a second process starts tuned. The fixed thresholds
//! (`winograd::applies`) are the heuristic: the choice with tuning off, and the first candidate
//! timed. Every candidate is tested against the same f64 reference within its own bound, so the
//! result is the same whichever wins, to that bound.
//!
//! On cuda and emu (`pick_on`) the candidates are kernels: where tf32 is allowed the tf32
//! tensor-core or the exact FMA kernel (GEMM, convolution, weight gradient, the latter also at two
//! split-K depths), and the bf16 GEMM's two pipelined block tiles; the key starts with the GPU's
//! name, compute capability and driver.
//!
//! Mode: `--tune off|on|exhaustive` or `RECLMIS_TUNE`; off by default, because a tuned run's
//! rounding follows the timings of the first process on the machine (a cached choice makes later
//! runs repeat it, and `--resume` stays bit for bit on one machine either way). `on` times each
//! algorithm twice at its default band or block split; `exhaustive` three times, and also each
//! algorithm's split variants (candidates named `algorithm:variant`, e.g. Winograd's bands at a
//! quarter and twice the default size: the same result bit for bit; im2col's bands change the
//! order of its sums, within their rounding). Cache: `RECLMIS_TUNE_CACHE`, else
//! `$XDG_CACHE_HOME/reclmis/`, else `~/.cache/reclmis/`, file `tune-<machine and build hash>.json`.
//! A cache that cannot be read, is corrupt or was written for another machine or build is
//! ignored with a warning and left untouched.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::Instant;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    Off,
    On,
    Exhaustive,
}

impl Mode {
    pub fn parse(s: &str) -> Result<Mode, String> {
        match s {
            "off" => Ok(Mode::Off),
            "on" => Ok(Mode::On),
            "exhaustive" => Ok(Mode::Exhaustive),
            other => Err(format!("tuning mode {other:?}: off, on or exhaustive")),
        }
    }
}

/// 0: not set yet (the environment decides on first use), else Mode as 1 + index.
static MODE: AtomicU8 = AtomicU8::new(0);

pub fn set_mode(m: Mode) {
    MODE.store(1 + m as u8, Ordering::Relaxed);
}

pub fn mode() -> Mode {
    match MODE.load(Ordering::Relaxed) {
        1 => Mode::Off,
        2 => Mode::On,
        3 => Mode::Exhaustive,
        _ => {
            let m = match std::env::var("RECLMIS_TUNE") {
                Ok(v) => Mode::parse(v.trim()).unwrap_or_else(|e| {
                    eprintln!("warning: RECLMIS_TUNE: {e}; tuning off");
                    Mode::Off
                }),
                Err(_) => Mode::Off,
            };
            set_mode(m);
            m
        }
    }
}

/// The machine a choice is valid for: CPU model and the threads the ops split over (read once).
pub fn machine() -> &'static str {
    static M: OnceLock<String> = OnceLock::new();
    M.get_or_init(|| {
        let cpu = crate::device::cpu_model().unwrap_or_else(|| std::env::consts::ARCH.to_string());
        format!("{cpu}; {} threads", rayon::current_num_threads())
    })
}

/// The build a choice is valid for: the crate version and the executable's size and time (read
/// once).
pub fn build() -> &'static str {
    static B: OnceLock<String> = OnceLock::new();
    B.get_or_init(|| {
        let exe = std::env::current_exe().ok().and_then(|p| std::fs::metadata(p).ok());
        let (len, mtime) = exe.map_or((0, 0), |m| {
            (
                m.len(),
                m.modified().ok().and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok()).map_or(0, |d| d.as_secs()),
            )
        });
        format!("{} {len} {mtime}", env!("CARGO_PKG_VERSION"))
    })
}

fn cache_dir() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("RECLMIS_TUNE_CACHE") {
        return Some(PathBuf::from(p));
    }
    let base = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))?;
    Some(base.join("reclmis"))
}

/// The cache file for this machine and build.
pub fn cache_path() -> Option<PathBuf> {
    let key = format!("{}\n{}", machine(), build());
    let h = crate::files::Fnv64::default().update(key.as_bytes()).finish();
    cache_dir().map(|d| d.join(format!("tune-{h:016x}.json")))
}

#[derive(serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct CacheFile {
    version: u32,
    machine: String,
    build: String,
    /// shape key -> the winning candidate's name
    choices: BTreeMap<String, String>,
}

/// The choices in `path`, or why they cannot be used.
pub fn read_cache(path: &std::path::Path) -> Result<BTreeMap<String, String>, String> {
    let bytes = crate::files::read_regular(path, 16 << 20).map_err(|e| e.to_string())?;
    let f: CacheFile = serde_json::from_slice(&bytes).map_err(|e| format!("not a tuning cache: {e}"))?;
    if f.version != 1 {
        return Err(format!("tuning cache version {} (this build reads 1)", f.version));
    }
    let (m, b) = (machine(), build());
    if f.machine != m || f.build != b {
        return Err(format!("written for machine {:?} build {:?}, not this one ({m:?}, {b:?})", f.machine, f.build));
    }
    Ok(f.choices)
}

struct State {
    choices: BTreeMap<String, String>,
    /// Where new choices are written; None when the file is unusable (never overwritten) or
    /// there is no cache folder.
    file: Option<PathBuf>,
}

fn state() -> &'static Mutex<State> {
    static S: OnceLock<Mutex<State>> = OnceLock::new();
    S.get_or_init(|| {
        let path = cache_path();
        let (choices, file) = match &path {
            Some(p) if p.exists() => match read_cache(p) {
                Ok(c) => (c, Some(p.clone())),
                Err(e) => {
                    eprintln!("warning: tuning cache {} ignored (and left as it is): {e}", p.display());
                    (BTreeMap::new(), None)
                }
            },
            _ => (BTreeMap::new(), path),
        };
        Mutex::new(State { choices, file })
    })
}

fn save(s: &State) {
    let Some(path) = &s.file else { return };
    let f = CacheFile { version: 1, machine: machine().into(), build: build().into(), choices: s.choices.clone() };
    let json = serde_json::to_vec_pretty(&f).expect("a cache always serialises");
    let written = path
        .parent()
        .map_or(Ok(()), std::fs::create_dir_all)
        .map_err(|e| e.to_string())
        .and_then(|_| crate::files::write_atomic(path, &json).map_err(|e| e.to_string()));
    if let Err(e) = written {
        eprintln!("warning: tuning cache {} not written: {e}", path.display());
    }
}

/// The candidate chosen for `key`, if tuned (by this process or a cached one).
pub fn choice(key: &str) -> Option<String> {
    state().lock().unwrap_or_else(|e| e.into_inner()).choices.get(key).cloned()
}

thread_local! {
    static FORCED: std::cell::RefCell<Option<&'static str>> = const { std::cell::RefCell::new(None) };
}

/// Runs `f` with candidate `name` chosen by every `pick` on this thread whose candidates include
/// it, whatever the mode (tests compute each candidate's result through the op itself).
pub fn with_candidate<R>(name: &'static str, f: impl FnOnce() -> R) -> R {
    let old = FORCED.with(|c| c.replace(Some(name)));
    let r = f();
    FORCED.with(|c| *c.borrow_mut() = old);
    r
}

/// Runs the op for `key` by one of `names` (`run(i)` computes it with candidate i): with tuning
/// off, candidate `heuristic`; with a known choice, that one; else each candidate in turn
/// (`heuristic` first), timed, and the fastest one's result is returned and its name kept.
pub fn pick<R>(
    key: impl FnOnce() -> String,
    names: &[&'static str],
    heuristic: usize,
    mut run: impl FnMut(usize) -> R,
) -> R {
    let picked = pick_timed(key, names, heuristic, |i| Ok::<R, std::convert::Infallible>(run(i)), || Ok(()), false);
    match picked {
        Ok(r) => r,
        Err(never) => match never {},
    }
}

/// `pick` for an op on `dev` whose candidates launch kernels (cuda, emu) and may fail: each
/// timing waits for the device before and after (launches return before the kernels finish),
/// the key starts with the device's identity (GPU name, compute capability and driver: a choice
/// holds for one kind of GPU), and when the fastest candidate was not the last one timed it
/// runs once more, so an op that writes into a buffer given to it leaves the winner's result
/// there. A failed candidate's error is returned (a GPU fault is not a slow candidate).
pub fn pick_on<R, E: From<crate::Error>>(
    dev: &crate::Device,
    key: impl FnOnce() -> String,
    names: &[&'static str],
    heuristic: usize,
    run: impl FnMut(usize) -> Result<R, E>,
) -> Result<R, E> {
    let sync = || dev.synchronize().map_err(E::from);
    pick_timed(|| format!("{} | {}", dev.tune_identity(), key()), names, heuristic, run, sync, true)
}

fn pick_timed<R, E>(
    key: impl FnOnce() -> String,
    names: &[&'static str],
    heuristic: usize,
    mut run: impl FnMut(usize) -> Result<R, E>,
    sync: impl Fn() -> Result<(), E>,
    rerun_winner: bool,
) -> Result<R, E> {
    if let Some(i) = FORCED.with(|c| *c.borrow()).and_then(|f| names.iter().position(|n| *n == f)) {
        return run(i);
    }
    let m = mode();
    if m == Mode::Off || names.len() < 2 {
        return run(heuristic);
    }
    let key = key();
    if let Some(name) = choice(&key) {
        if let Some(i) = names.iter().position(|n| *n == name) {
            return run(i);
        }
    }
    // the fastest of two timings at least: a candidate's first call can carry a one-time cost
    // that later calls skip (Winograd's weight transform, cached after it), which a single
    // timing charged to it (AMD EPYC VM: `on` chose im2col for 512→512 at 14², 3.3 ms slower
    // in the model than Winograd)
    let reps = if m == Mode::Exhaustive { 3 } else { 2 };
    // `on` times the algorithms at their default splits; `exhaustive` their split variants too
    // (names `algorithm:variant`)
    let timed = |i: usize| m == Mode::Exhaustive || !names[i].contains(':');
    let order: Vec<usize> =
        std::iter::once(heuristic).chain((0..names.len()).filter(|&i| i != heuristic && timed(i))).collect();
    if order.len() < 2 {
        return run(heuristic);
    }
    let mut best: Option<(f64, usize, R)> = None;
    for &i in &order {
        let mut fastest = f64::INFINITY;
        let mut out = None;
        for _ in 0..reps {
            sync()?;
            let t = Instant::now();
            let r = run(i)?;
            sync()?;
            fastest = fastest.min(t.elapsed().as_secs_f64());
            out = Some(r);
        }
        let out = out.expect("reps >= 1");
        if best.as_ref().is_none_or(|b| fastest < b.0) {
            best = Some((fastest, i, out));
        }
    }
    let (_, i, mut out) = best.expect("two or more candidates");
    if rerun_winner && order.last() != Some(&i) {
        out = run(i)?;
    }
    let mut s = state().lock().unwrap_or_else(|e| e.into_inner());
    s.choices.insert(key, names[i].to_string());
    save(&s);
    Ok(out)
}
