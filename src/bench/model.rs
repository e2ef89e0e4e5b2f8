//! Whole-model scenarios for BENCHMARKS.md, shaped like ../shared/peer/bench_cpu.py so the two
//! run side by side: the official preset at 224², random weights, an 18-token note; inference
//! (only what the mask needs) at batch 1 and 8, and a full training step at batch 4 (forward with
//! CVR/CLR/CCL, every loss, backward, Adam). One scenario per process, so the peak RSS
//! (getrusage) is the scenario's own.

use crate::device::Device;
use crate::error::{Error, Result};
#[cfg(feature = "train")]
use crate::model::train::Trainer;
use crate::model::{Batch, Config, RecLmis};
#[cfg(feature = "train")]
use crate::optim::AdamConfig;
use crate::rng::Rng;
use crate::tensor::Tensor;
use std::time::Instant;

/// The peer's note ("Bilateral pulmonary infection, two infected areas, all left lung and all
/// right lung.", 18 ids from the fixture's tokenizer).
const IDS: [i32; 18] =
    [49406, 25599, 39132, 14774, 267, 1237, 26136, 5429, 267, 615, 1823, 16271, 537, 615, 1155, 16271, 269, 49407];

fn batch(cfg: &Config, b: usize, dev: &Device) -> Result<Batch> {
    let (h, w) = cfg.img_size;
    let mut rng = Rng::new(1);
    let ids: Vec<i32> = (0..b).flat_map(|_| IDS).collect();
    let masks: Vec<f32> = (0..b * h * w).map(|i| ((i % w) > w / 2) as i32 as f32).collect();
    Ok(Batch {
        images: Tensor::from_vec(rng.vec(b * 3 * h * w, 0.0, 1.0), &[b, 3, h, w], dev)?,
        ids: Tensor::from_vec_i32(ids, &[b, 18], dev)?,
        valid: Tensor::from_vec_i32(vec![1; b * 18], &[b, 18], dev)?,
        masks: Some(Tensor::from_vec(masks, &[b, h, w], dev)?),
        text_hidden: None,
    })
}

fn peak_rss_mb() -> f64 {
    // SAFETY: getrusage fills the struct it is given.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) };
    ru.ru_maxrss as f64 / 1024.0
}

/// Runs one scenario (infer_b1, infer_b8, train_b4) and returns its JSON line.
/// With `profile`, the line also has `profile_ms`: the mean wall time per module of a timed
/// repetition (`autograd::count::timer`; the device is synchronised at each module's start).
pub fn run(scenario: &str, dev: &Device, precision: crate::autograd::Precision, profile: bool) -> Result<String> {
    let cfg = Config::preset("official")?;
    let mut model = RecLmis::new(cfg.clone(), dev, 0)?;
    model.precision = precision;
    let (b, warm, reps) = match scenario {
        "infer_b1" => (1, 2, 10),
        "infer_b8" => (8, 2, 10),
        "train_b4" => (4, 1, 5),
        other => return Err(Error::Other(format!("unknown scenario {other:?} (infer_b1, infer_b8, train_b4)"))),
    };
    let data = batch(&cfg, b, dev)?;
    let mut times = vec![];
    // median (forward, backward, optimiser) seconds of the training step
    let mut phases: Option<[f64; 3]> = None;
    let mut modules = Modules::new();
    let mut timed = |i: usize, f: &mut dyn FnMut() -> Result<()>| -> Result<()> {
        if !profile || i < warm {
            return f();
        }
        let (out, seconds) = profiled(dev, f);
        for (k, v) in seconds {
            *modules.entry(k).or_default() += v / reps as f64;
        }
        out
    };
    if scenario.starts_with("infer") {
        for i in 0..warm + reps {
            let t = Instant::now();
            let mut p = None;
            timed(i, &mut || {
                p = Some(model.infer(&data)?);
                Ok(())
            })?;
            let p = p.ok_or_else(|| Error::Other("inference gave no output".into()))?;
            dev.synchronize()?;
            if !p.to_vec()?.iter().all(|x| x.is_finite()) {
                return Err(Error::Other("inference gave non-finite probabilities".into()));
            }
            if i >= warm {
                times.push(t.elapsed().as_secs_f64());
            }
        }
    } else {
        phases = Some(train_times(model, &data, warm, reps, dev, &mut times, &mut timed)?);
    }
    let profile = if profile {
        let ms: Vec<String> = modules.iter().map(|(k, v)| format!("\"{k}\": {:.2}", v * 1e3)).collect();
        format!(", \"profile_ms\": {{{}}}", ms.join(", "))
    } else {
        String::new()
    };
    let m = super::Timing::of(times.clone()).median;
    let phase = phases.map_or(String::new(), |p| {
        format!(", \"forward_s\": {:.4}, \"backward_s\": {:.4}, \"optimizer_s\": {:.4}", p[0], p[1], p[2])
    });
    Ok(format!(
        "{{\"scenario\": \"{scenario}\", \"engine\": \"reclmis\", \"device\": \"{}\", \"precision\": \"{precision}\", \"batch\": {b}, \"median_s\": {m:.4}, \"per_image_s\": {:.4}, \"min_s\": {:.4}, \"peak_rss_mb\": {:.0}, \"peak_tensor_mb\": {:.0}, \"reps\": {reps}{phase}{profile}}}",
        dev.describe(),
        m / b as f64,
        times.iter().cloned().fold(f64::INFINITY, f64::min),
        peak_rss_mb(),
        // the most tensor bytes alive at once (device::memory): on cuda the device memory the
        // scenario needs, which the process RSS does not show
        crate::device::memory::peak(dev.kind()) as f64 / 1e6
    ))
}

#[cfg(feature = "train")]
fn train_times(
    model: RecLmis,
    data: &Batch,
    warm: usize,
    reps: usize,
    dev: &Device,
    times: &mut Vec<f64>,
    timed: &mut Timed,
) -> Result<[f64; 3]> {
    let mut tr = Trainer::new(model, AdamConfig::default());
    let mut ph: [Vec<f64>; 3] = Default::default();
    let mut rng = Rng::new(3);
    for i in 0..warm + reps {
        let t = Instant::now();
        let mut l = Default::default();
        timed(i, &mut || {
            l = tr.step(data, None, &mut rng)?;
            Ok(())
        })?;
        dev.synchronize()?;
        if !l["total"].is_finite() {
            return Err(Error::Other("training step gave a non-finite loss".into()));
        }
        if i >= warm {
            times.push(t.elapsed().as_secs_f64());
            for (v, x) in ph.iter_mut().zip(tr.last_times) {
                v.push(x);
            }
        }
    }
    Ok(ph.map(|v| super::Timing::of(v).median))
}

#[cfg(not(feature = "train"))]
fn train_times(
    _: RecLmis,
    _: &Batch,
    _: usize,
    _: usize,
    _: &Device,
    _: &mut Vec<f64>,
    _: &mut Timed,
) -> Result<[f64; 3]> {
    Err(Error::Other("this build has no training (built without the `train` feature)".into()))
}

/// Runs repetition i (the closure), timing its modules when profiling a timed repetition.
type Timed<'a> = dyn FnMut(usize, &mut dyn FnMut() -> Result<()>) -> Result<()> + 'a;

/// Seconds per model module.
type Modules = std::collections::BTreeMap<&'static str, f64>;

#[cfg(feature = "train")]
fn profiled(dev: &Device, f: &mut dyn FnMut() -> Result<()>) -> (Result<()>, Modules) {
    crate::autograd::count::timer::timed(dev, f)
}

#[cfg(not(feature = "train"))]
fn profiled(_: &Device, _: &mut dyn FnMut() -> Result<()>) -> (Result<()>, Modules) {
    (Err(Error::Other("--profile needs the `train` feature (the module labels)".into())), Default::default())
}

/// The scenarios, as ../shared/peer/bench_cpu.py names them.
pub const SCENARIOS: [&str; 3] = ["infer_b1", "infer_b8", "train_b4"];

/// What `reclmis bench-model` compares (without `--scenario`): our scenarios, each in its own
/// process, interleaved with the PyTorch peer's (`bench_cpu.py --only S` and `S_compile`).
pub struct Compare {
    /// This program (re-run with `bench-model --scenario S`).
    pub exe: std::path::PathBuf,
    /// `--device` as given, passed on to our runs.
    pub device: String,
    /// `--precision` as given (none: the device's default), passed on to our runs.
    pub precision: Option<String>,
    pub scenarios: Vec<String>,
    /// (python, ../shared/peer/bench_cpu.py), or no peer.
    pub peer: Option<(std::path::PathBuf, std::path::PathBuf)>,
    pub compile: bool,
    pub rounds: usize,
}

/// One process's JSON line, or why there is none.
fn run_json(cmd: &mut std::process::Command, what: &str) -> std::result::Result<serde_json::Value, String> {
    let out = cmd.output().map_err(|e| format!("{what}: cannot start: {e}"))?;
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text.lines().rev().find(|l| l.trim_start().starts_with('{'));
    match (out.status.success(), line.and_then(|l| serde_json::from_str::<serde_json::Value>(l).ok())) {
        (true, Some(v)) => Ok(v),
        _ => {
            let err = String::from_utf8_lossy(&out.stderr);
            let lines: Vec<&str> = err.lines().collect();
            let tail = lines[lines.len().saturating_sub(3)..].join(" | ");
            Err(format!("{what}: failed ({}): {tail}", out.status))
        }
    }
}

/// Runs the comparison: each run's JSON line goes to `emit` as soon as it is in (a full run with
/// torch.compile takes about ten minutes); returns the table.
pub fn compare(c: &Compare, emit: &mut dyn FnMut(&str)) -> Result<String> {
    use std::fmt::Write;
    if let Some((_, script)) = &c.peer {
        if !script.is_file() {
            return Err(Error::data(script, "is not the peer's bench_cpu.py (give --peer-script)"));
        }
    }
    if let Some(s) = c.scenarios.iter().find(|s| !SCENARIOS.contains(&s.as_str())) {
        return Err(Error::Config(format!("unknown scenario {s:?} ({})", SCENARIOS.join(", "))));
    }
    let mut table = String::from(
        "round  scenario   reclmis median (min)   peak RSS   torch eager   peak RSS   torch.compile   peak RSS   speed vs best peer   memory vs peer\n",
    );
    let secs = |v: &serde_json::Value| v["median_s"].as_f64();
    let rss = |v: &serde_json::Value| v["peak_rss_mb"].as_f64();
    // a peer run's median or peak RSS, "-" when it failed or was left out
    let time_cell =
        |v: &Option<serde_json::Value>| v.as_ref().and_then(secs).map_or("-".into(), |x| format!("{x:.3} s"));
    let rss_cell =
        |v: &Option<serde_json::Value>| v.as_ref().and_then(rss).map_or("-".into(), |x| format!("{x:.0} MB"));
    for round in 1..=c.rounds {
        for s in &c.scenarios {
            let ours = run_json(
                std::process::Command::new(&c.exe)
                    .args(["bench-model", "--device", &c.device, "--scenario", s])
                    .args(c.precision.iter().flat_map(|p| ["--precision", p.as_str()])),
                &format!("reclmis {s}"),
            );
            let peer = |name: String| -> Option<serde_json::Value> {
                let (py, script) = c.peer.as_ref()?;
                match run_json(
                    std::process::Command::new(py).arg(script).args(["--only", &name]),
                    &format!("peer {name}"),
                ) {
                    Ok(v) => Some(v),
                    Err(e) => {
                        eprintln!("{e}");
                        None
                    }
                }
            };
            let eager = peer(s.clone());
            let compiled = if c.compile { peer(format!("{s}_compile")) } else { None };
            let ours = match ours {
                Ok(v) => v,
                Err(e) => return Err(Error::Other(e)),
            };
            for v in std::iter::once(&ours).chain(eager.iter()).chain(compiled.iter()) {
                emit(&v.to_string());
            }
            let best_peer =
                [&eager, &compiled].iter().filter_map(|v| v.as_ref().and_then(secs)).fold(f64::NAN, f64::min);
            let least_rss =
                [&eager, &compiled].iter().filter_map(|v| v.as_ref().and_then(rss)).fold(f64::NAN, f64::min);
            let (m, r) = (secs(&ours).unwrap_or(f64::NAN), rss(&ours).unwrap_or(f64::NAN));
            let ratio = |x: f64| if x.is_finite() { format!("{x:.2}x") } else { "-".into() };
            let _ = writeln!(
                table,
                "{round:<6} {s:<10} {:<22} {:<10} {:<13} {:<10} {:<15} {:<10} {:<20} {}",
                format!("{m:.3} s ({:.3})", ours["min_s"].as_f64().unwrap_or(f64::NAN)),
                format!("{r:.0} MB"),
                time_cell(&eager),
                rss_cell(&eager),
                time_cell(&compiled),
                rss_cell(&compiled),
                ratio(best_peer / m),
                ratio(r / least_rss),
            );
        }
    }
    table.push_str(
        "speed vs best peer = the faster peer's median / ours (above 1: reclmis is faster); memory vs peer = our peak RSS / the smaller peer's\n",
    );
    Ok(table)
}
