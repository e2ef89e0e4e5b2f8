//! `reclmis bench` output for people and for scripts: a table, JSON or CSV, every record with the
//! machine it ran on (CPU model, cores, device), the precision and the commit; `--baseline`
//! compares with an earlier JSON run and marks the changes beyond both runs' own noise.

use super::Measurement;
use crate::device::Device;
use crate::error::{Error, Result};
use serde::{Deserialize, Serialize};
use std::path::Path;

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Machine {
    /// `model name` from /proc/cpuinfo ("unknown" elsewhere)
    pub cpu: String,
    /// threads available to the process
    pub cores: usize,
    /// the device as `reclmis devices` describes it
    pub device: String,
    pub precision: String,
    /// `git rev-parse --short=12 HEAD` of the source tree the binary was built from, `+dirty` with
    /// uncommitted changes, "unknown" without git
    pub commit: String,
    /// seconds since 1970 when the run finished
    pub unix_time: u64,
    /// The ceilings the bench measured on this machine (cpu runs): f32 FMA GFLOP/s of all its
    /// threads and copy GB/s, the roofline every case's `roofline_pct` is against.
    #[serde(default)]
    pub peak_gflops: Option<f64>,
    #[serde(default)]
    pub copy_gbs: Option<f64>,
    /// bf16 GFLOP/s of AVX512_BF16 dot products (the `bf16` cases' ceiling), where the CPU has them
    #[serde(default)]
    pub bf16_gflops: Option<f64>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Run {
    pub machine: Machine,
    pub results: Vec<Measurement>,
}

impl Machine {
    pub fn of(dev: &Device, ceilings: Option<super::ceilings::Ceilings>) -> Machine {
        let cpu = crate::device::cpu_model().unwrap_or_else(|| "unknown".into());
        Machine {
            cpu,
            cores: std::thread::available_parallelism().map_or(1, |n| n.get()),
            device: dev.describe(),
            precision: "f32".into(),
            commit: commit(),
            unix_time: std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs()),
            peak_gflops: ceilings.map(|c| c.peak_gflops),
            copy_gbs: ceilings.map(|c| c.copy_gbs),
            bf16_gflops: ceilings.and_then(|c| c.bf16_gflops),
        }
    }
}

fn commit() -> String {
    let git = |args: &[&str]| {
        std::process::Command::new("git")
            .arg("-C")
            .arg(env!("CARGO_MANIFEST_DIR"))
            .args(args)
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
    };
    match git(&["rev-parse", "--short=12", "HEAD"]) {
        Some(h) if !h.is_empty() => {
            let dirty = git(&["status", "--porcelain", "--untracked-files=no"]).is_some_and(|s| !s.is_empty());
            if dirty {
                format!("{h}+dirty")
            } else {
                h
            }
        }
        _ => "unknown".into(),
    }
}

pub fn to_json(run: &Run) -> String {
    serde_json::to_string_pretty(run).expect("a bench run always serialises")
}

/// One row per case, the machine's fields repeated in every row (a row stands on its own).
pub fn to_csv(run: &Run, compared: Option<&[Compared]>) -> Result<String> {
    let mut w = csv::Writer::from_writer(Vec::new());
    let mut header = vec![
        "cpu",
        "cores",
        "device",
        "precision",
        "commit",
        "peak_gflops",
        "copy_gbs",
        "op",
        "shape",
        "reps",
        "min_s",
        "median_s",
        "p90_s",
        "gflops",
        "gbs",
        "roofline_pct",
        "h100_min_s",
        "peer_median_s",
    ];
    if compared.is_some() {
        header.extend(["baseline_median_s", "speedup", "verdict"]);
    }
    let bad = |e: csv::Error| Error::Other(format!("csv: {e}"));
    w.write_record(&header).map_err(bad)?;
    let m = &run.machine;
    for r in &run.results {
        let mut row = vec![
            m.cpu.clone(),
            m.cores.to_string(),
            m.device.clone(),
            m.precision.clone(),
            m.commit.clone(),
            m.peak_gflops.map(|v| format!("{v:.1}")).unwrap_or_default(),
            m.copy_gbs.map(|v| format!("{v:.1}")).unwrap_or_default(),
            r.op.clone(),
            r.shape.clone(),
            r.reps.to_string(),
            format!("{:e}", r.min_s),
            format!("{:e}", r.median_s),
            format!("{:e}", r.p90_s),
            format!("{:.3}", r.gflops),
            format!("{:.3}", r.gbs),
            r.roofline_pct.map(|v| format!("{v:.1}")).unwrap_or_default(),
            r.h100_min_s.map(|t| format!("{t:e}")).unwrap_or_default(),
            r.peer_median_s.map(|p| format!("{p:e}")).unwrap_or_default(),
        ];
        if let Some(c) = compared {
            match c.iter().find(|c| c.op == r.op && c.shape == r.shape) {
                Some(c) => {
                    row.extend([format!("{:e}", c.before_median_s), format!("{:.4}", c.speedup), c.verdict.to_string()])
                }
                None => row.extend([String::new(), String::new(), "new".into()]),
            }
        }
        w.write_record(&row).map_err(bad)?;
    }
    let bytes = w.into_inner().map_err(|e| Error::Other(format!("csv: {e}")))?;
    String::from_utf8(bytes).map_err(|e| Error::Other(format!("csv: {e}")))
}

/// A run written by `--format json`.
pub fn read_run(path: &Path) -> Result<Run> {
    let bytes = crate::files::read_regular(path, 64 << 20)?;
    serde_json::from_slice(&bytes)
        .map_err(|e| Error::data(path, format!("not a `reclmis bench --format json` run: {e}")))
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub enum Verdict {
    /// This run's fastest repetition is slower than the baseline's 90th percentile.
    Slower,
    /// This run's 90th percentile is faster than the baseline's fastest repetition.
    Faster,
    /// The two runs' ranges overlap: within their own noise.
    Same,
}

impl std::fmt::Display for Verdict {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Verdict::Slower => "SLOWER",
            Verdict::Faster => "faster",
            Verdict::Same => "same",
        })
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct Compared {
    pub op: String,
    pub shape: String,
    pub before_median_s: f64,
    pub now_median_s: f64,
    /// before / now: above 1, this run is faster
    pub speedup: f64,
    pub verdict: Verdict,
}

/// The cases both runs have, by op and shape. A change counts only when the two runs' [min,
/// p90] ranges do not overlap, so a noisy case is never called a regression on its median alone.
pub fn compare(now: &Run, before: &Run) -> Vec<Compared> {
    now.results
        .iter()
        .filter_map(|n| {
            let b = before.results.iter().find(|b| b.op == n.op && b.shape == n.shape)?;
            let verdict = if n.min_s > b.p90_s {
                Verdict::Slower
            } else if n.p90_s < b.min_s {
                Verdict::Faster
            } else {
                Verdict::Same
            };
            Some(Compared {
                op: n.op.clone(),
                shape: n.shape.clone(),
                before_median_s: b.median_s,
                now_median_s: n.median_s,
                speedup: b.median_s / n.median_s,
                verdict,
            })
        })
        .collect()
}

/// Why two runs' times should not be compared at all (another CPU or device), if they differ.
pub fn mismatch(now: &Run, before: &Run) -> Option<String> {
    let (a, b) = (&now.machine, &before.machine);
    (a.cpu != b.cpu || a.device != b.device || a.cores != b.cores || a.precision != b.precision).then(|| {
        format!(
            "the baseline ran on another machine ({}, {} cores, {}) than this run ({}, {} cores, {}): \
             its times are not comparable",
            b.cpu, b.cores, b.device, a.cpu, a.cores, a.device
        )
    })
}

pub fn format_comparison(c: &[Compared], before: &Run) -> String {
    use std::fmt::Write;
    let mut s = format!("against the baseline of commit {} (median before → now, speedup):\n", before.machine.commit);
    for x in c {
        let _ = writeln!(
            s,
            "{:<20} {:<34} {:>9.3} ms → {:>9.3} ms {:>7.2}x  {}",
            x.op,
            x.shape,
            x.before_median_s * 1e3,
            x.now_median_s * 1e3,
            x.speedup,
            x.verdict
        );
    }
    let slower = c.iter().filter(|x| x.verdict == Verdict::Slower).count();
    let _ = writeln!(s, "{slower} of {} cases slower beyond both runs' noise", c.len());
    s
}
