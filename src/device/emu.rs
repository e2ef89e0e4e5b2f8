//! The emu device: kernels/*.cu compiled by g++ against src/device/emu/emu.h and launched through
//! the generated table, with the same argument array as cuLaunchKernel.
//!
//! Beyond running the kernels it checks them: the scheduler reports deadlock, barrier divergence
//! and races between barriers (see emu.h), and every buffer carries guard bytes on both sides that
//! are verified after each launch, so an out-of-bounds write is a launch error.

use super::LaunchCfg;
use crate::error::{Error, Result};
use crate::kernels::{emu_entry, Kernel};
use std::collections::HashMap;
use std::ffi::{c_char, c_void, CStr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};

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

pub type EmuLaunchFn =
    unsafe extern "C" fn(*const EmuLaunchCfg, *mut *mut c_void, *mut c_char, usize) -> i32;

const GUARD: usize = 64;
const GUARD_BYTE: u8 = 0xA5;

/// A buffer with GUARD bytes of a known pattern on each side.
pub struct EmuBuffer {
    mem: Vec<u128>, // u128: 16-byte alignment, as cudaMalloc gives at least that
    len: usize,
}

fn live_buffers() -> &'static Mutex<HashMap<usize, usize>> {
    static LIVE: OnceLock<Mutex<HashMap<usize, usize>>> = OnceLock::new();
    LIVE.get_or_init(|| Mutex::new(HashMap::new()))
}

impl EmuBuffer {
    pub fn new(len: usize, poison: bool) -> EmuBuffer {
        let words = (len + 2 * GUARD).div_ceil(16);
        let mut b = EmuBuffer {
            mem: vec![0u128; words],
            len,
        };
        let bytes = b.all_bytes_mut();
        bytes.fill(GUARD_BYTE);
        bytes[GUARD..GUARD + len].fill(if poison { 0xff } else { 0 });
        live_buffers().lock().unwrap().insert(b.ptr() as usize, len);
        b
    }

    pub fn from_bytes(data: &[u8]) -> EmuBuffer {
        let mut b = EmuBuffer::new(data.len(), false);
        let len = b.len;
        b.all_bytes_mut()[GUARD..GUARD + len].copy_from_slice(data);
        b
    }

    fn all_bytes_mut(&mut self) -> &mut [u8] {
        bytemuck::cast_slice_mut(&mut self.mem)
    }

    pub fn bytes(&self) -> &[u8] {
        &bytemuck::cast_slice(&self.mem)[GUARD..GUARD + self.len]
    }

    pub fn ptr(&self) -> u64 {
        self.mem.as_ptr() as u64 + GUARD as u64
    }
}

impl Drop for EmuBuffer {
    fn drop(&mut self) {
        if let Ok(mut live) = live_buffers().lock() {
            live.remove(&(self.ptr() as usize));
        }
    }
}

/// Finds live buffers whose guard bytes changed. Holding the registry lock keeps them alive.
fn check_guards() -> Option<String> {
    let live = live_buffers().lock().unwrap_or_else(|e| e.into_inner());
    for (&data, &len) in live.iter() {
        // SAFETY: the buffer is registered, so its allocation (GUARD + len + GUARD) is alive.
        let before = unsafe { std::slice::from_raw_parts((data - GUARD) as *const u8, GUARD) };
        let after = unsafe { std::slice::from_raw_parts((data + len) as *const u8, GUARD) };
        if let Some(i) = before.iter().rposition(|&b| b != GUARD_BYTE) {
            return Some(format!(
                "wrote {} bytes before the start of a {len}-byte buffer",
                GUARD - i
            ));
        }
        if let Some(i) = after.iter().position(|&b| b != GUARD_BYTE) {
            return Some(format!(
                "wrote at byte {} past the end of a {len}-byte buffer",
                i
            ));
        }
    }
    None
}

/// The schedule seed: RECLMIS_EMU_SEED if set, else taken from the clock once per process, then
/// advanced per launch, so thread orders (forward, reversed, random) vary within and across runs.
fn next_seed() -> u64 {
    static BASE: OnceLock<u64> = OnceLock::new();
    static COUNT: AtomicU64 = AtomicU64::new(0);
    let base = *BASE.get_or_init(|| {
        std::env::var("RECLMIS_EMU_SEED")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| {
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(7, |d| d.as_nanos() as u64)
            })
    });
    base.wrapping_add(COUNT.fetch_add(1, Ordering::Relaxed))
}

pub(crate) fn launch(kernel: Kernel, cfg: LaunchCfg, args: &mut [*mut c_void]) -> Result<()> {
    let seed = next_seed();
    let c = EmuLaunchCfg {
        grid: [cfg.grid.0, cfg.grid.1, cfg.grid.2],
        block: [cfg.block.0, cfg.block.1, cfg.block.2],
        smem_bytes: cfg.smem_bytes,
        reserved: 0,
        seed,
        name: std::ptr::null(),
    };
    let fail = |detail: String| Error::Launch {
        kernel: kernel.name(),
        device: super::DeviceKind::Emu,
        detail,
    };
    if cfg.grid.0 == 0 || cfg.grid.1 == 0 || cfg.grid.2 == 0 {
        return Err(fail(format!("empty grid {:?}", cfg.grid)));
    }
    let mut err = [0 as c_char; 512];
    // SAFETY: the entry unpacks `args` by the kernel's own signature; the op built `args` from the
    // params struct that mirrors it (KernelParams), and every pointer in it is a live buffer.
    let rc = unsafe { emu_entry(kernel)(&c, args.as_mut_ptr(), err.as_mut_ptr(), err.len()) };
    if rc != 0 {
        let msg = unsafe { CStr::from_ptr(err.as_ptr()) }
            .to_string_lossy()
            .into_owned();
        return Err(fail(format!(
            "{msg} (schedule seed {seed}; rerun with RECLMIS_EMU_SEED={seed})"
        )));
    }
    if let Some(oob) = check_guards() {
        return Err(fail(format!("out-of-bounds write: {oob}")));
    }
    Ok(())
}
