//! `reclmis bench`: per kernel and shape, the min / median / p90 time, GFLOP/s, GB/s (minimum
//! bytes moved) and the share of the roofline.
//!
//! cpu: wall clock around the op. cuda: device events around the op after warm-up runs, with the L2
//! cache flushed (a 256 MiB memset) before every repetition so that each run starts cold. emu: wall
//! clock on small shapes; it measures the emulator, not a GPU.
//!
//! With a peer (`--peer PYTHON`), the same cases run in PyTorch in the same invocation (the script
//! benches/peer_torch.py, 2 threads on cpu) and each line gets the ratio of our throughput to the
//! peer's.
//!
//! Each op family owns its cases (`ops/<op>/bench.rs`, a `Group`: the cases, the shapes `--shape`
//! takes and its `selfcheck`), registered with one line in `registry::GROUPS`; this file is the
//! harness that times them.

use crate::device::Device;
use crate::error::{Error, Result};
use crate::ops::gemm::GemmAlgo;
use crate::rng::Rng;
use crate::tensor::Tensor;
use std::time::Instant;

pub mod ceilings;
pub mod h100;
pub mod model;
pub mod registry;
pub mod report;

pub(crate) type Validator = Box<dyn Fn(&Tensor) -> Result<()>>;

/// One benchmark case: what it computes and how to call it.
pub struct Case {
    /// Group name used by `--op` (gemm, gemm_tc, softmax, ...).
    pub op: &'static str,
    pub shape: String,
    pub flops: f64,
    pub bytes: f64,
    /// The equivalent PyTorch expression for the peer script, if any.
    pub peer: Option<String>,
    pub(crate) run: Box<dyn Fn() -> Result<Tensor>>,
    /// Checks one output before anything is timed (a fast wrong kernel is worth nothing).
    pub(crate) validate: Option<Validator>,
}

#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Measurement {
    pub op: String,
    pub shape: String,
    /// Timed repetitions (after the untimed warm-up runs).
    pub reps: usize,
    pub min_s: f64,
    pub median_s: f64,
    /// The 90th percentile (nearest rank) of the repetitions.
    pub p90_s: f64,
    pub gflops: f64,
    pub gbs: f64,
    pub peer_median_s: Option<f64>,
    /// % of the roofline the median reaches (cpu: the machine's measured ceilings)
    #[serde(default)]
    pub roofline_pct: Option<f64>,
    /// The least time an H100 needs for the case (bench::h100): its roofline before any GPU run
    #[serde(default)]
    pub h100_min_s: Option<f64>,
}

/// min, median and 90th percentile (nearest rank) of repeated timings.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Timing {
    pub min: f64,
    pub median: f64,
    pub p90: f64,
    pub reps: usize,
}

impl Timing {
    pub fn of(mut v: Vec<f64>) -> Timing {
        v.sort_by(|a, b| a.total_cmp(b));
        let n = v.len().max(1);
        let at = |q: f64| v.get(((q * n as f64).ceil() as usize).clamp(1, n) - 1).copied().unwrap_or(f64::NAN);
        Timing {
            min: v.first().copied().unwrap_or(f64::NAN),
            median: v.get(v.len() / 2).copied().unwrap_or(f64::NAN),
            p90: at(0.9),
            reps: v.len(),
        }
    }
}

/// Seeded data in [-1, 1) (the crate's one generator).
pub(crate) fn rand_tensor(shape: &[usize], seed: u64, dev: &Device) -> Result<Tensor> {
    Tensor::from_vec(Rng::new(seed).vec(shape.iter().product(), -1.0, 1.0), shape, dev)
}

/// A validator: the output against `want()`, an f64 reference computed from the case's inputs
/// when the output is first checked (so that no host copy lives while the case is timed), within
/// `testing::mismatch`'s atol and rtol.
pub(crate) fn check_with(
    op: &'static str,
    (atol, rtol): (f64, f64),
    want: impl Fn() -> Result<Vec<f64>> + 'static,
) -> Option<Validator> {
    Some(Box::new(move |y| match crate::testing::mismatch(&y.to_vec()?, &want()?, atol, rtol) {
        None => Ok(()),
        Some(e) => Err(Error::Other(format!("{op}: {e}"))),
    }))
}

/// A tensor's values in f64 (for the references).
pub(crate) fn host(t: &Tensor) -> Result<Vec<f64>> {
    Ok(crate::testing::f64s(&t.to_vec()?))
}

/// The GEMM algorithm the cases of GEMM-based ops time: the tf32 tensor cores on cuda/emu (the
/// kernels a GPU run is for), the cpu's own choice there.
pub(crate) fn gemm_algo(dev: &Device) -> GemmAlgo {
    if dev.is_gpu_like() {
        GemmAlgo::TensorCore
    } else {
        GemmAlgo::Auto
    }
}

/// An op family's benchmark cases and self-checks, defined in its own folder
/// (`ops/<op>/bench.rs`) and registered with one line in `registry::GROUPS`.
pub struct Group {
    /// The case names it defines (what `--op` takes).
    pub names: &'static [&'static str],
    /// Its cases on a device; `small`: emu's shapes (it runs every CUDA thread as a fiber).
    pub cases: fn(&Device, bool, &mut Vec<Case>) -> Result<()>,
    /// Those of its ops that time any shape (`--shape`).
    pub shaped: &'static [Shaped],
    /// `reclmis selfcheck`: the family on the device against its f64 reference.
    pub check: Option<fn(&Device, &mut crate::selfcheck::Checks) -> Result<()>>,
}

/// One op that times a shape from the command line.
pub struct Shaped {
    pub op: &'static str,
    /// The shape's form, for the help and the errors ("MxNxK").
    pub form: &'static str,
    /// The case at the dimensions given (already checked positive). A refused shape is an
    /// `Error::Config` saying why (see `dims` and `cap`).
    pub make: fn(&Device, &[usize]) -> Result<Case>,
}

/// The dimensions as an array of `N`, or the refusal.
pub(crate) fn dims<const N: usize>(d: &[usize]) -> Result<[usize; N]> {
    d.try_into().map_err(|_| Error::Config("wrong number of dimensions".into()))
}

/// The largest operand a shaped case may allocate: 2^30 elements (4 GB in f32).
pub(crate) fn cap(n: Option<usize>) -> Result<usize> {
    n.filter(|&n| n <= 1 << 30).ok_or_else(|| Error::Config("too large (over 2^30 elements)".into()))
}

/// Every case name, in registry order (what `--op` takes).
pub fn names() -> Vec<&'static str> {
    registry::GROUPS.iter().flat_map(|g| g.names.iter().copied()).collect()
}

/// The ops `--shape` takes and the form of their shapes ("gemm MxNxK, ...").
pub fn shaped_forms() -> String {
    let v: Vec<String> =
        registry::GROUPS.iter().flat_map(|g| g.shaped).map(|s| format!("{} {}", s.op, s.form)).collect();
    v.join(", ")
}

/// The cases for a device, only the groups `filter` names (a comma-separated list of case names)
/// (so that a run allocates only what it times). emu gets small shapes.
pub fn cases(dev: &Device, filter: Option<&str>) -> Result<Vec<Case>> {
    let small = matches!(dev, Device::Emu);
    let want = |ops: &[&str]| filter.is_none_or(|f| f.split(',').any(|f| ops.contains(&f)));
    let mut v = Vec::new();
    for g in registry::GROUPS {
        if want(g.names) {
            (g.cases)(dev, small, &mut v)?;
        }
    }
    Ok(v)
}

/// One case of `op` at a shape from the command line (`--shape`): "512x768x1024" and so on.
pub fn shape_case(dev: &Device, op: &str, shape: &str) -> Result<Case> {
    let bad = |why: &str| Error::Config(format!("--shape {shape:?} for {op}: {why} (shapes: {})", shaped_forms()));
    let Some(s) = registry::GROUPS.iter().flat_map(|g| g.shaped).find(|s| s.op == op) else {
        return Err(bad("this op takes no --shape yet"));
    };
    let d: Vec<usize> = shape
        .split('x')
        .map(|d| d.trim().parse::<usize>().ok().filter(|&d| d > 0))
        .collect::<Option<_>>()
        .ok_or_else(|| bad("dimensions are positive integers joined by x"))?;
    (s.make)(dev, &d).map_err(|e| match e {
        Error::Config(why) => bad(&why),
        e => e,
    })
}

/// Times one case: `warmup` untimed runs, then `reps` timed ones.
pub fn measure(dev: &Device, case: &Case, warmup: usize, reps: usize) -> Result<Timing> {
    let first = case.run.as_ref()()?;
    if let Some(v) = &case.validate {
        v(&first)?;
    }
    for _ in 0..warmup {
        case.run.as_ref()()?;
    }
    dev.synchronize()?;
    #[cfg(feature = "cuda")]
    if let Device::Cuda(d) = dev {
        use cudarc::driver::sys::CUevent_flags;
        let flush =
            d.context().default_stream().alloc_zeros::<u8>(256 << 20).map_err(|e| Error::Cuda(e.to_string()))?;
        let mut times = Vec::with_capacity(reps);
        for _ in 0..reps {
            d.fill(&flush, 0)?;
            let ev = |_| {
                d.stream().record_event(Some(CUevent_flags::CU_EVENT_DEFAULT)).map_err(|e| Error::Cuda(e.to_string()))
            };
            let start = ev(())?;
            let out = case.run.as_ref()()?;
            let end = ev(())?;
            end.synchronize().map_err(|e| Error::Cuda(e.to_string()))?;
            times.push(start.elapsed_ms(&end).map_err(|e| Error::Cuda(e.to_string()))? as f64 / 1e3);
            drop(out);
        }
        return Ok(Timing::of(times));
    }
    let mut times = Vec::with_capacity(reps);
    for _ in 0..reps {
        let t0 = Instant::now();
        let out = case.run.as_ref()()?;
        dev.synchronize()?;
        times.push(t0.elapsed().as_secs_f64());
        drop(out);
    }
    Ok(Timing::of(times))
}

/// Runs the peer script once for all cases that have a PyTorch form; returns median seconds by
/// peer spec.
fn run_peer(python: &str, specs: &[String], device: &str, reps: usize) -> Result<Vec<(String, f64)>> {
    // RECLMIS_PEER_SCRIPT, else the repository's copy from the working directory, else the one
    // this binary was built beside (a binary copied to another machine runs from its tree)
    let script = std::env::var_os("RECLMIS_PEER_SCRIPT").map(std::path::PathBuf::from).unwrap_or_else(|| {
        let here = std::path::PathBuf::from("benches/peer_torch.py");
        if here.is_file() {
            here
        } else {
            concat!(env!("CARGO_MANIFEST_DIR"), "/benches/peer_torch.py").into()
        }
    });
    if !script.is_file() {
        return Err(Error::Other(format!("the peer script {} is missing (set RECLMIS_PEER_SCRIPT)", script.display())));
    }
    let out = std::process::Command::new(python)
        .arg(script)
        .arg("--device")
        .arg(device)
        .arg("--reps")
        .arg(reps.to_string())
        .args(specs)
        .output()
        .map_err(|e| Error::Other(format!("cannot run peer {python}: {e}")))?;
    if !out.status.success() {
        return Err(Error::Other(format!("peer script failed: {}", String::from_utf8_lossy(&out.stderr))));
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let mut res = Vec::new();
    for line in text.lines() {
        // "<spec>\t<median seconds>"
        if let Some((spec, t)) = line.rsplit_once('\t') {
            if let Ok(t) = t.trim().parse::<f64>() {
                res.push((spec.to_string(), t));
            }
        }
    }
    Ok(res)
}

pub struct BenchOpts<'a> {
    pub filter: Option<&'a str>,
    /// One shape for the one op in `filter` (`shape_case`) instead of its built-in cases.
    pub shape: Option<&'a str>,
    pub peer: Option<&'a str>,
    pub reps: usize,
    /// The machine's ceilings (`ceilings::measure`), for each case's share of its roofline.
    pub ceilings: Option<ceilings::Ceilings>,
}

pub fn run(dev: &Device, opts: &BenchOpts) -> Result<Vec<Measurement>> {
    let all = match opts.shape {
        Some(shape) => match opts.filter {
            Some(op) if !op.contains(',') => vec![shape_case(dev, op, shape)?],
            _ => return Err(Error::Config(format!("--shape needs exactly one --op ({})", shaped_forms()))),
        },
        None => cases(dev, opts.filter)?,
    };
    let chosen: Vec<&Case> =
        all.iter().filter(|c| opts.filter.is_none_or(|f| f.split(',').any(|f| c.op == f))).collect();
    if chosen.is_empty() {
        return Err(Error::Other(format!(
            "no benchmark named {:?}; known: {}",
            opts.filter.unwrap_or(""),
            names().join(", ")
        )));
    }
    let mut out = Vec::new();
    for c in &chosen {
        let (warm, reps) = if matches!(dev, Device::Emu) { (1, 3) } else { (2, opts.reps) };
        let t = measure(dev, c, warm, reps)?;
        out.push(Measurement {
            op: c.op.to_string(),
            shape: c.shape.clone(),
            reps: t.reps,
            min_s: t.min,
            median_s: t.median,
            p90_s: t.p90,
            gflops: c.flops / t.median / 1e9,
            gbs: c.bytes / t.median / 1e9,
            peer_median_s: None,
            roofline_pct: opts
                .ceilings
                .as_ref()
                .and_then(|cl| ceilings::roofline_pct(cl, c.flops, c.bytes, t.median, c.op.contains("bf16"))),
            h100_min_s: h100::min_seconds(c.op, c.flops, c.bytes),
        });
    }
    if let Some(py) = opts.peer {
        let specs: Vec<String> = chosen.iter().filter_map(|c| c.peer.clone()).collect();
        let device = if matches!(dev, Device::Cuda(_)) { "cuda" } else { "cpu" };
        let peer = run_peer(py, &specs, device, opts.reps)?;
        for (m, c) in out.iter_mut().zip(&chosen) {
            if let Some(spec) = &c.peer {
                m.peer_median_s = peer.iter().find(|(s, _)| s == spec).map(|(_, t)| *t);
            }
        }
    }
    Ok(out)
}

pub fn format_table(dev: &Device, ms: &[Measurement]) -> String {
    use std::fmt::Write;
    let mut s = String::new();
    let _ = writeln!(s, "device: {}", dev.describe());
    let _ = writeln!(
        s,
        "{:<20} {:<34} {:>12} {:>12} {:>12} {:>10} {:>9} {:>7} {:>12} {:>12} {:>8}",
        "op", "shape", "min", "median", "p90", "GFLOP/s", "GB/s", "% roof", "H100 min", "peer median", "ratio"
    );
    for m in ms {
        let (pt, ratio) = match m.peer_median_s {
            Some(p) => (format!("{:.3} ms", p * 1e3), format!("{:.2}x", p / m.median_s)),
            None => ("-".into(), "-".into()),
        };
        let _ = writeln!(
            s,
            "{:<20} {:<34} {:>9.3} ms {:>9.3} ms {:>9.3} ms {:>10.1} {:>9.1} {:>7} {:>12} {:>12} {:>8}",
            m.op,
            m.shape,
            m.min_s * 1e3,
            m.median_s * 1e3,
            m.p90_s * 1e3,
            m.gflops,
            m.gbs,
            m.roofline_pct.map_or("-".into(), |p| format!("{p:.0}")),
            m.h100_min_s.map_or("-".into(), |t| format!("{:.2} us", t * 1e6)),
            pt,
            ratio
        );
    }
    s
}
