//! The emu device: kernels/*.cu compiled by g++ against src/device/emu/emu.h and launched through
//! the generated table, with the same argument array as cuLaunchKernel.
//!
//! Beyond running the kernels it checks them: the scheduler reports deadlock, barrier divergence
//! and races between barriers (see emu.h), and every buffer carries guard bytes on both sides that
//! are verified after each launch, so an out-of-bounds write is a launch error.

use super::{DeviceKind, LaunchCfg};
use crate::error::{Error, Result};
use crate::kernels::{emu_entry, Kernel};
use std::collections::HashMap;
use std::ffi::{c_char, c_void, CStr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};
use std::thread::ThreadId;

/// Mirrors `emu::LaunchCfg` in emu.h.
#[repr(C)]
pub struct EmuLaunchCfg {
    grid: [u32; 3],
    block: [u32; 3],
    smem_bytes: u32,
    reserved: u32,
    seed: u64,
    name: *const c_char,
}

pub type EmuLaunchFn = unsafe extern "C" fn(*const EmuLaunchCfg, *mut *mut c_void, *mut c_char, usize) -> i32;

/// Guard bytes on each side: enough to catch a tile that overruns by a row of a few thousand floats.
const GUARD: usize = 16 << 10;
const GUARD_BYTE: u8 = 0xA5;

/// A buffer with GUARD bytes of a known pattern on each side. The memory is a raw allocation:
/// kernels write it through raw pointers, so Rust holds no reference into it between reads.
pub struct EmuBuffer {
    base: std::ptr::NonNull<u8>,
    len: usize,
}

// SAFETY: the buffer owns its allocation; kernels touching it run synchronously on the thread
// that launches them.
unsafe impl Send for EmuBuffer {}
unsafe impl Sync for EmuBuffer {}

impl EmuBuffer {
    /// The allocation of a `len`-byte buffer, or None when `len + 2 * GUARD` overflows or is
    /// more than a layout can describe.
    fn layout(len: usize) -> Option<std::alloc::Layout> {
        // 16-byte alignment at least, as cudaMalloc gives (float4 loads).
        std::alloc::Layout::from_size_align(len.checked_add(2 * GUARD)?, 64).ok()
    }

    pub fn new(len: usize, poison: bool) -> Result<EmuBuffer> {
        let too_big = || Error::Launch {
            kernel: "alloc",
            device: DeviceKind::Emu,
            detail: format!("cannot allocate a buffer of {len} bytes"),
        };
        let layout = Self::layout(len).ok_or_else(too_big)?;
        // SAFETY: the layout has a non-zero size (2 * GUARD at least).
        let base = unsafe { std::alloc::alloc(layout) };
        let base = std::ptr::NonNull::new(base).ok_or_else(too_big)?;
        // SAFETY: freshly allocated, len + 2 * GUARD bytes.
        unsafe {
            std::ptr::write_bytes(base.as_ptr(), GUARD_BYTE, len + 2 * GUARD);
            std::ptr::write_bytes(base.as_ptr().add(GUARD), if poison { 0xff } else { 0 }, len);
        }
        let b = EmuBuffer { base, len };
        live_buffers()
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(b.ptr() as usize, (len, std::thread::current().id()));
        Ok(b)
    }

    pub fn from_bytes(data: &[u8]) -> Result<EmuBuffer> {
        let b = EmuBuffer::new(data.len(), false)?;
        // SAFETY: the data region holds exactly data.len() bytes.
        unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), b.ptr() as *mut u8, data.len()) };
        Ok(b)
    }

    pub fn bytes(&self) -> &[u8] {
        // SAFETY: len initialised bytes after the guard; no kernel runs while the slice lives
        // (launches are synchronous and need the caller's thread).
        unsafe { std::slice::from_raw_parts(self.ptr() as *const u8, self.len) }
    }

    pub fn ptr(&self) -> u64 {
        self.base.as_ptr() as u64 + GUARD as u64
    }
}

impl Drop for EmuBuffer {
    fn drop(&mut self) {
        live_buffers().lock().unwrap_or_else(|e| e.into_inner()).remove(&(self.ptr() as usize));
        // SAFETY: allocated in `new` with this layout (which `new` checked exists).
        if let Some(layout) = Self::layout(self.len) {
            unsafe { std::alloc::dealloc(self.base.as_ptr(), layout) };
        }
    }
}

/// Live buffers: data address -> (length, thread that allocated it).
type Registry = Mutex<HashMap<usize, (usize, ThreadId)>>;

fn live_buffers() -> &'static Registry {
    static LIVE: OnceLock<Registry> = OnceLock::new();
    LIVE.get_or_init(|| Mutex::new(HashMap::new()))
}

/// Finds buffers allocated by this thread whose guard bytes changed, reports the first and
/// restores the guards (so one bad write is reported once). Launches run on the calling thread
/// and tests allocate their buffers there, so concurrent tests do not see each other's faults.
/// Holding the registry lock keeps the buffers alive.
fn check_guards() -> Option<String> {
    let live = live_buffers().lock().unwrap_or_else(|e| e.into_inner());
    let me = std::thread::current().id();
    let mut report = None;
    for (&data, &(len, _)) in live.iter().filter(|(_, (_, owner))| *owner == me) {
        // SAFETY: the buffer is registered, so its allocation (GUARD + len + GUARD) is alive, and
        // only kernels launched from this thread write to it.
        let before = unsafe { std::slice::from_raw_parts_mut((data - GUARD) as *mut u8, GUARD) };
        let after = unsafe { std::slice::from_raw_parts_mut((data + len) as *mut u8, GUARD) };
        if let Some(i) = before.iter().rposition(|&b| b != GUARD_BYTE) {
            report.get_or_insert(format!("wrote {} bytes before the start of a {len}-byte buffer", GUARD - i));
        }
        if let Some(i) = after.iter().position(|&b| b != GUARD_BYTE) {
            report.get_or_insert(format!("wrote at byte {i} past the end of a {len}-byte buffer"));
        }
        before.fill(GUARD_BYTE);
        after.fill(GUARD_BYTE);
    }
    report
}

thread_local! {
    static SEED_OVERRIDE: std::cell::Cell<Option<u64>> = const { std::cell::Cell::new(None) };
}

/// Runs `f` with a fixed schedule seed for the launches it makes on this thread: seed % 3 picks
/// forward (0), reversed (1) or seeded-random (2) thread order. For tests that must see each order.
pub fn with_schedule<R>(seed: u64, f: impl FnOnce() -> R) -> R {
    let old = SEED_OVERRIDE.with(|s| s.replace(Some(seed)));
    let r = f();
    SEED_OVERRIDE.with(|s| s.set(old));
    r
}

/// The schedule seed: RECLMIS_EMU_SEED if set, else taken from the clock once per process, then
/// advanced per launch, so thread orders (forward, reversed, random) vary within and across runs.
fn next_seed() -> u64 {
    if let Some(s) = SEED_OVERRIDE.with(|s| s.get()) {
        return s;
    }
    static BASE: OnceLock<u64> = OnceLock::new();
    static COUNT: AtomicU64 = AtomicU64::new(0);
    let base = *BASE.get_or_init(|| {
        std::env::var("RECLMIS_EMU_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(|| {
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(7, |d| d.as_nanos() as u64)
        })
    });
    base.wrapping_add(COUNT.fetch_add(1, Ordering::Relaxed))
}

/// Every kernel the emu device has launched in this process, in first-launch order: what a test
/// checks a code path launches (the inference path: only kernels an inference build embeds).
pub fn launched_kernels() -> Vec<Kernel> {
    LAUNCHED.lock().unwrap_or_else(|e| e.into_inner()).clone()
}

static LAUNCHED: std::sync::Mutex<Vec<Kernel>> = std::sync::Mutex::new(Vec::new());

/// What one launch's instrumented shared-memory accesses (ldmatrix) cost: the warp phases issued
/// and the extra wavefronts their bank conflicts added (0 when conflict-free). A report, not a
/// failure: a conflict costs time on the GPU, never correctness.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SmemStats {
    pub phases: u64,
    pub extra_wavefronts: u64,
}

extern "C" {
    fn reclmis_emu_last_stats(out: *mut u64);
}

thread_local! {
    static LAST_STATS: std::cell::Cell<SmemStats> = const { std::cell::Cell::new(SmemStats { phases: 0, extra_wavefronts: 0 }) };
}

/// The shared-memory figures of the last launch this thread made on the emu device.
pub fn last_smem_stats() -> SmemStats {
    LAST_STATS.with(|s| s.get())
}

/// Every kernel with instrumented shared-memory phases launched in this process, with their sums
/// (the bank-conflict report of `reclmis selfcheck --device emu`).
pub fn smem_report() -> Vec<(Kernel, SmemStats)> {
    SMEM_TOTALS.lock().unwrap_or_else(|e| e.into_inner()).clone()
}

static SMEM_TOTALS: Mutex<Vec<(Kernel, SmemStats)>> = Mutex::new(Vec::new());

fn record_smem_stats(kernel: Kernel) {
    let mut out = [0u64; 2];
    // SAFETY: writes two u64 into `out`; reads the calling thread's counters of its last launch.
    unsafe { reclmis_emu_last_stats(out.as_mut_ptr()) };
    let s = SmemStats { phases: out[0], extra_wavefronts: out[1] };
    LAST_STATS.with(|c| c.set(s));
    if s.phases == 0 {
        return;
    }
    let mut t = SMEM_TOTALS.lock().unwrap_or_else(|e| e.into_inner());
    match t.iter_mut().find(|(k, _)| *k == kernel) {
        Some((_, sum)) => {
            sum.phases += s.phases;
            sum.extra_wavefronts += s.extra_wavefronts;
        }
        None => t.push((kernel, s)),
    }
}

pub(crate) fn launch(kernel: Kernel, cfg: LaunchCfg, args: &mut [*mut c_void]) -> Result<()> {
    {
        let mut l = LAUNCHED.lock().unwrap_or_else(|e| e.into_inner());
        if !l.contains(&kernel) {
            l.push(kernel);
        }
    }
    let seed = next_seed();
    let c = EmuLaunchCfg {
        grid: [cfg.grid.0, cfg.grid.1, cfg.grid.2],
        block: [cfg.block.0, cfg.block.1, cfg.block.2],
        smem_bytes: cfg.smem_bytes,
        reserved: 0,
        seed,
        name: std::ptr::null(),
    };
    let fail = |detail: String| Error::Launch { kernel: kernel.name(), device: super::DeviceKind::Emu, detail };
    if cfg.grid.0 == 0 || cfg.grid.1 == 0 || cfg.grid.2 == 0 {
        return Err(fail(format!("empty grid {:?}", cfg.grid)));
    }
    let mut err = [0 as c_char; 512];
    // SAFETY: the entry unpacks `args` by the kernel's own signature; the op built `args` from the
    // params struct that mirrors it (KernelParams), and every pointer in it is a live buffer.
    let rc = unsafe { emu_entry(kernel)(&c, args.as_mut_ptr(), err.as_mut_ptr(), err.len()) };
    record_smem_stats(kernel);
    if rc != 0 {
        let msg = unsafe { CStr::from_ptr(err.as_ptr()) }.to_string_lossy().into_owned();
        return Err(fail(format!("{msg} (schedule seed {seed}; rerun with RECLMIS_EMU_SEED={seed})")));
    }
    if let Some(oob) = check_guards() {
        return Err(fail(format!("out-of-bounds write: {oob}")));
    }
    Ok(())
}
