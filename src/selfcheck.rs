//! `reclmis selfcheck`: every op family on the chosen device against its f64 reference, on
//! seeded data with odd sizes. A quick way to see that a device computes what the cpu does.
//! Each family's checks live in its own folder (`ops/<op>/bench.rs`, `Group::check`).

use crate::bench::registry::GROUPS;
use crate::device::Device;
use crate::error::Result;
use crate::ops::gemm::GemmAlgo;
use crate::testing::{Rng, EPS32, EPS_TF32};

pub struct Report {
    pub ok: bool,
    pub text: String,
}

/// What the checks of one run share: the seeded generator (one sequence through every family,
/// in registry order) and the lines of the report.
pub struct Checks {
    pub rng: Rng,
    lines: Vec<String>,
    ok: bool,
}

impl Checks {
    /// One check's outcome: None when it matched, else why not.
    pub fn record(&mut self, name: &str, m: Option<String>) {
        self.ok &= m.is_none();
        self.lines.push(match m {
            None => format!("  ok    {name}"),
            Some(e) => format!("  FAIL  {name}: {e}"),
        });
    }
}

/// The GEMM algorithms of a device with the error bound of a k-term product: exact f32 (k
/// roundings) everywhere, and on cuda/emu the tf32 tensor cores (two operand roundings of 2^-11
/// on top).
pub fn gemm_algos(dev: &Device, k: usize) -> Vec<(GemmAlgo, f64)> {
    let exact = k as f64 * EPS32;
    if dev.is_gpu_like() {
        vec![(GemmAlgo::Tiled, exact), (GemmAlgo::TensorCore, 2.0 * EPS_TF32 + exact)]
    } else {
        vec![(GemmAlgo::Auto, exact)]
    }
}

pub fn run(dev: &Device) -> Result<Report> {
    let mut c = Checks { rng: Rng::new(2026), lines: vec![format!("selfcheck on {}", dev.describe())], ok: true };
    for check in GROUPS.iter().filter_map(|g| g.check) {
        check(dev, &mut c)?;
    }
    // the emulator's count of ldmatrix bank conflicts (a report: conflicts cost time, not results)
    #[cfg(feature = "emu")]
    if matches!(dev, Device::Emu) {
        for (k, s) in crate::device::emu::smem_report() {
            c.lines.push(format!(
                "  smem  {}: {} shared-memory phases (ldmatrix, lds32), {} extra wavefronts from bank conflicts",
                k.name(),
                s.phases,
                s.extra_wavefronts
            ));
        }
    }
    c.lines.push(if c.ok { "all ok".into() } else { "FAILED".into() });
    Ok(Report { ok: c.ok, text: c.lines.join("\n") + "\n" })
}
