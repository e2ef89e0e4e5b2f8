//! Live tensor bytes and their high-water mark per device kind: every tensor buffer is counted
//! when a device allocates or uploads it and uncounted when its last handle drops. Buffers
//! outside tensors (the cpu GEMM's packing scratch, Winograd's transformed tiles, the cuda
//! driver's own pools) and memory-mapped checkpoint weights (file pages, not allocations) are
//! not counted. The figure is what decides whether a batch fits: `train` logs it per epoch,
//! `bench-model` per scenario, `reclmis model --memory` for one training step.

use super::DeviceKind;
use std::sync::atomic::{AtomicU64, Ordering};

struct Gauge {
    live: AtomicU64,
    peak: AtomicU64,
}

static GAUGES: [Gauge; 3] = [
    Gauge { live: AtomicU64::new(0), peak: AtomicU64::new(0) },
    Gauge { live: AtomicU64::new(0), peak: AtomicU64::new(0) },
    Gauge { live: AtomicU64::new(0), peak: AtomicU64::new(0) },
];

fn gauge(kind: DeviceKind) -> &'static Gauge {
    &GAUGES[match kind {
        DeviceKind::Cpu => 0,
        DeviceKind::Cuda => 1,
        DeviceKind::Emu => 2,
    }]
}

pub(crate) fn allocated(kind: DeviceKind, bytes: u64) {
    let g = gauge(kind);
    let now = g.live.fetch_add(bytes, Ordering::Relaxed) + bytes;
    g.peak.fetch_max(now, Ordering::Relaxed);
}

pub(crate) fn freed(kind: DeviceKind, bytes: u64) {
    // saturating: a count can never go below zero, even if a buffer were uncounted twice
    let _ = gauge(kind).live.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |v| Some(v.saturating_sub(bytes)));
}

/// Bytes of the tensors alive now on devices of `kind` (all threads together).
pub fn live(kind: DeviceKind) -> u64 {
    gauge(kind).live.load(Ordering::Relaxed)
}

/// The most bytes alive at once since the process started or the last `reset_peak`.
pub fn peak(kind: DeviceKind) -> u64 {
    gauge(kind).peak.load(Ordering::Relaxed)
}

/// Starts a new high-water mark from what is alive now (per epoch, per scenario).
pub fn reset_peak(kind: DeviceKind) {
    let g = gauge(kind);
    g.peak.store(g.live.load(Ordering::Relaxed), Ordering::Relaxed);
}

/// "123.4 MB" (decimal megabytes, as the rest of the CLI reports sizes).
pub fn human(bytes: u64) -> String {
    if bytes >= 1_000_000_000 {
        format!("{:.2} GB", bytes as f64 / 1e9)
    } else {
        format!("{:.1} MB", bytes as f64 / 1e6)
    }
}

/// The bytes of a temporary tensor the cuda/emu path of an op allocates and the cpu path does
/// not need (it computes from plain buffers): counted on the cpu's gauge while it lives, so that
/// the cpu's figures stay what a GPU would hold (tests/memory.rs requires the cpu and the emu
/// to agree). Freed on drop.
#[cfg(feature = "autocast")]
pub(crate) struct Mirrored {
    kind: DeviceKind,
    bytes: u64,
}

#[cfg(feature = "autocast")]
impl Mirrored {
    pub(crate) fn new(kind: DeviceKind, bytes: u64) -> Mirrored {
        allocated(kind, bytes);
        Mirrored { kind, bytes }
    }
}

#[cfg(feature = "autocast")]
impl Drop for Mirrored {
    fn drop(&mut self) {
        freed(self.kind, self.bytes);
    }
}
