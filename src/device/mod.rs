//! Devices: `cpu` (fast Rust), `cuda` (cudarc, kernels from kernels/*.cu) and `emu` (the same .cu
//! sources compiled by g++ and run by a fiber scheduler, for tests on machines with no GPU).
//!
//! cuda and emu share one launch path: an op computes its [`LaunchCfg`] and its `#[repr(C)]`
//! params struct once and calls [`Device::launch`]; only buffer handling and the final call differ.

#[cfg(feature = "cuda")]
pub mod cuda;
#[cfg(feature = "emu")]
pub mod emu;
pub mod memory;
#[cfg(feature = "cuda")]
pub(crate) mod nvrtc_compile;

use crate::error::{Error, Result};
use crate::kernels::Kernel;
use crate::tensor::{CpuStorage, DType, Storage};
use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

#[cfg(feature = "cuda")]
pub use cuda::CudaDevice;
/// Stand-in when built without the `cuda` feature: it has no values, so `Device::Cuda` cannot be
/// constructed and every path returns [`Error::NoCuda`] at the point of choosing the device.
#[cfg(not(feature = "cuda"))]
#[derive(Debug)]
pub enum CudaDevice {}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DeviceKind {
    Cpu,
    Cuda,
    Emu,
}

impl fmt::Display for DeviceKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            DeviceKind::Cpu => "cpu",
            DeviceKind::Cuda => "cuda",
            DeviceKind::Emu => "emu",
        })
    }
}

/// What the user asked for with `--device`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "cli", derive(clap::ValueEnum))]
pub enum DeviceChoice {
    /// cuda when a GPU is usable, else cpu
    Auto,
    Cpu,
    Cuda,
    Emu,
}

impl std::str::FromStr for DeviceChoice {
    type Err = Error;
    fn from_str(s: &str) -> Result<DeviceChoice> {
        Ok(match s {
            "auto" => DeviceChoice::Auto,
            "cpu" => DeviceChoice::Cpu,
            "cuda" => DeviceChoice::Cuda,
            "emu" => DeviceChoice::Emu,
            _ => return Err(Error::Config(format!("unknown device {s:?} (auto, cpu, cuda or emu)"))),
        })
    }
}

#[derive(Clone)]
pub enum Device {
    Cpu,
    Cuda(Arc<CudaDevice>),
    Emu,
}

impl fmt::Debug for Device {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.kind())
    }
}

impl PartialEq for Device {
    fn eq(&self, other: &Self) -> bool {
        match (self, other) {
            (Device::Cuda(a), Device::Cuda(b)) => Arc::ptr_eq(a, b),
            _ => self.kind() == other.kind(),
        }
    }
}

/// Grid, block and dynamic shared memory of one launch, computed once by the op for cuda and emu.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LaunchCfg {
    pub grid: (u32, u32, u32),
    pub block: (u32, u32, u32),
    pub smem_bytes: u32,
}

impl LaunchCfg {
    /// A 1-D grid-stride launch over `n` elements: enough blocks to fill a large GPU, capped so
    /// that the emulator does not spin up millions of blocks for big tensors.
    pub fn elementwise(n: usize) -> LaunchCfg {
        let block = 256u32;
        let blocks = n.div_ceil(block as usize).clamp(1, 4096) as u32;
        LaunchCfg { grid: (blocks, 1, 1), block: (block, 1, 1), smem_bytes: 0 }
    }
}

/// A kernel's parameter struct.
///
/// # Safety
/// The type must be `#[repr(C)]`, `Copy`, contain no references, and have exactly the layout of
/// the struct the kernel takes (the .cu side checks its size with a `static_assert`).
pub unsafe trait KernelParams: Copy + 'static {}

/// Declares a kernel's params struct: `#[repr(C)]`, `Copy`, [`KernelParams`], and a compile-time
/// check of its size against the `RECLMIS_PARAMS_SIZE` of its mirror in the .cu file.
#[macro_export]
macro_rules! kernel_params {
    ($(#[$m:meta])* $vis:vis struct $name:ident [$size:expr] { $($fvis:vis $field:ident: $ty:ty),* $(,)? }) => {
        $(#[$m])*
        #[repr(C)]
        #[derive(Clone, Copy, Debug)]
        $vis struct $name { $($fvis $field: $ty),* }
        // SAFETY: repr(C), Copy, plain integers and floats, size checked below.
        unsafe impl $crate::device::KernelParams for $name {}
        const _: () = assert!(std::mem::size_of::<$name>() == $size, concat!(stringify!($name), " must match its .cu mirror"));
    };
}

/// The CPU's `model name` from /proc/cpuinfo (None where there is none: other systems).
pub fn cpu_model() -> Option<String> {
    let info = std::fs::read_to_string("/proc/cpuinfo").ok()?;
    let line = info.lines().find(|l| l.starts_with("model name"))?;
    Some(line.split_once(':')?.1.trim().to_string())
}

/// Keeps freed host memory in the process instead of returning it to the OS (glibc: no mmap for
/// blocks under 1 GiB, no trimming, one arena for all threads). Tensors of tens of MB are allocated and freed on every step;
/// with the defaults each allocation is a fresh mmap whose first touch faults every page and
/// whose munmap sends TLB-shootdown interrupts to the other cores, which made the cpu CCL
/// backward 3x slower at random. The process then holds its peak working set, as a caching
/// allocator would. Called by the `reclmis` binary at start-up; safe to call more than once.
pub fn tune_host_allocator() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes allocator parameters; it is called before any threads start
    // (or again with the same values, which is harmless).
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 1 << 30);
        libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX);
        // one arena for every thread: a buffer a rayon worker allocates and the main thread
        // frees goes back to the worker's arena, where only that worker reuses it; shared, the
        // freed blocks serve everyone (AMD EPYC VM: peak RSS of bench-model infer_b8 1415 ->
        // 1379 MB, train_b4 2632 -> 2578-2605 MB; times the same within the noise: allocations
        // are few and large, so the shared lock is not contended)
        libc::mallopt(libc::M_ARENA_MAX, 1);
    }
}

static POISON: AtomicBool = AtomicBool::new(false);

/// Tests call this: every output buffer is then filled with NaN (0xFF bytes) before the kernel
/// runs, so an element the kernel forgets to write fails the comparison.
pub fn set_poison(on: bool) {
    POISON.store(on, Ordering::Relaxed);
}

pub(crate) fn poison_enabled() -> bool {
    POISON.load(Ordering::Relaxed)
}

/// `vec![v; n]` that reports an allocation the host cannot make instead of aborting.
fn filled_vec<T: Copy>(n: usize, v: T) -> Result<Vec<T>> {
    let mut out = Vec::new();
    out.try_reserve_exact(n).map_err(|e| Error::Launch {
        kernel: "alloc",
        device: DeviceKind::Cpu,
        detail: format!("cannot allocate {n} elements: {e}"),
    })?;
    out.resize(n, v);
    Ok(out)
}

impl Device {
    /// Resolves a `--device` choice. `auto` never fails: no driver or no GPU means the cpu.
    pub fn from_choice(choice: DeviceChoice) -> Result<Device> {
        match choice {
            DeviceChoice::Cpu => Ok(Device::Cpu),
            DeviceChoice::Emu => Device::emu(),
            DeviceChoice::Cuda => Device::cuda(0),
            DeviceChoice::Auto => Ok(Device::cuda(0).unwrap_or(Device::Cpu)),
        }
    }

    /// The first usable CUDA device, or a clear reason why there is none. Never panics.
    pub fn cuda(ordinal: usize) -> Result<Device> {
        #[cfg(feature = "cuda")]
        {
            Ok(Device::Cuda(Arc::new(CudaDevice::open(ordinal)?)))
        }
        #[cfg(not(feature = "cuda"))]
        {
            let _ = ordinal;
            Err(Error::NoCuda("this binary was built without the `cuda` feature".into()))
        }
    }

    pub fn emu() -> Result<Device> {
        if cfg!(feature = "emu") {
            Ok(Device::Emu)
        } else {
            Err(Error::NoEmu)
        }
    }

    pub fn kind(&self) -> DeviceKind {
        match self {
            Device::Cpu => DeviceKind::Cpu,
            Device::Cuda(_) => DeviceKind::Cuda,
            Device::Emu => DeviceKind::Emu,
        }
    }

    /// A one-line description (GPU name and compute capability for cuda).
    pub fn describe(&self) -> String {
        match self {
            Device::Cpu => format!("cpu ({} rayon threads)", rayon::current_num_threads()),
            Device::Emu => "emu (CUDA source compiled by g++, one fiber per CUDA thread)".into(),
            #[cfg(feature = "cuda")]
            Device::Cuda(d) => d.describe(),
            #[cfg(not(feature = "cuda"))]
            Device::Cuda(d) => match **d {},
        }
    }

    /// What an autotuned choice on this device holds for (`ops::tune::pick_on`'s key prefix): the
    /// GPU and driver on cuda; the emulator on emu (its timings time the emulation); the CPU
    /// model and threads on the cpu.
    #[cfg(feature = "tune")]
    pub fn tune_identity(&self) -> String {
        match self {
            Device::Cpu => format!("cpu {}", crate::ops::tune::machine()),
            Device::Emu => "emu".into(),
            #[cfg(feature = "cuda")]
            Device::Cuda(d) => d.tune_identity(),
            #[cfg(not(feature = "cuda"))]
            Device::Cuda(d) => match **d {},
        }
    }

    /// Allocates a buffer for `numel` elements. Poisoned with NaN bytes when [`set_poison`] is on,
    /// zeroed otherwise.
    pub(crate) fn alloc(&self, dtype: DType, numel: usize) -> Result<Storage> {
        let poison = poison_enabled();
        #[cfg_attr(not(any(feature = "cuda", feature = "emu")), allow(unused_variables))]
        let bytes = numel.checked_mul(dtype.size()).ok_or_else(|| Error::Launch {
            kernel: "alloc",
            device: self.kind(),
            detail: format!("{numel} elements of {dtype:?} overflow a byte count"),
        })?;
        let storage = match self {
            Device::Cpu => Ok(Storage::Cpu(match dtype {
                DType::F32 => CpuStorage::F32(filled_vec(numel, if poison { f32::NAN } else { 0.0 })?),
                DType::I32 => CpuStorage::I32(filled_vec(numel, if poison { -1 } else { 0 })?),
                DType::BF16 => {
                    CpuStorage::BF16(filled_vec(numel, if poison { half::bf16::NAN } else { half::bf16::ZERO })?)
                }
                DType::F16 => {
                    CpuStorage::F16(filled_vec(numel, if poison { half::f16::NAN } else { half::f16::ZERO })?)
                }
            })),
            #[cfg(feature = "cuda")]
            Device::Cuda(d) => Ok(Storage::Cuda(d.alloc(bytes, poison)?)),
            #[cfg(not(feature = "cuda"))]
            Device::Cuda(d) => match **d {},
            #[cfg(feature = "emu")]
            Device::Emu => Ok(Storage::Emu(emu::EmuBuffer::new(bytes, poison)?)),
            #[cfg(not(feature = "emu"))]
            Device::Emu => Err(Error::NoEmu),
        }?;
        memory::allocated(self.kind(), storage.counted_bytes());
        Ok(storage)
    }

    /// Copies host bytes into a new buffer on this device.
    pub(crate) fn upload(&self, host: CpuStorage) -> Result<Storage> {
        let storage = match self {
            Device::Cpu => Ok(Storage::Cpu(host)),
            #[cfg(feature = "cuda")]
            Device::Cuda(d) => Ok(Storage::Cuda(d.upload(host.as_bytes())?)),
            #[cfg(not(feature = "cuda"))]
            Device::Cuda(d) => match **d {},
            #[cfg(feature = "emu")]
            Device::Emu => Ok(Storage::Emu(emu::EmuBuffer::from_bytes(host.as_bytes())?)),
            #[cfg(not(feature = "emu"))]
            Device::Emu => Err(Error::NoEmu),
        }?;
        memory::allocated(self.kind(), storage.counted_bytes());
        Ok(storage)
    }

    /// Launches `kernel` with one argument, its params struct, exactly as cuLaunchKernel takes it.
    ///
    /// # Safety
    /// The kernel reads and writes device memory through the raw addresses in `params`; nothing
    /// here can check them. The caller guarantees that `P` is the params struct `kernel` was
    /// written for (same layout as its .cu mirror), that every device pointer in it is a live
    /// buffer of this device (`Tensor::dev_ptr` of a tensor that outlives the launch), and that
    /// each buffer holds at least the elements the kernel indexes for the sizes in `params` and
    /// the launch configuration. The ops of this crate check shapes before they launch.
    pub unsafe fn launch<P: KernelParams>(&self, kernel: Kernel, cfg: LaunchCfg, params: &P) -> Result<()> {
        let mut args = [params as *const P as *mut core::ffi::c_void];
        match self {
            Device::Cpu => Err(Error::Unsupported {
                op: kernel.name(),
                detail: "CUDA kernels do not run on the cpu device (its ops use Rust code)".into(),
            }),
            #[cfg(feature = "cuda")]
            Device::Cuda(d) => d.launch(kernel, cfg, &mut args),
            #[cfg(not(feature = "cuda"))]
            Device::Cuda(d) => match **d {},
            #[cfg(feature = "emu")]
            Device::Emu => emu::launch(kernel, cfg, &mut args),
            #[cfg(not(feature = "emu"))]
            Device::Emu => {
                let _ = (cfg, &mut args);
                Err(Error::NoEmu)
            }
        }
    }

    /// Waits for every launched kernel (cuda); a no-op elsewhere.
    pub fn synchronize(&self) -> Result<()> {
        match self {
            #[cfg(feature = "cuda")]
            Device::Cuda(d) => d.synchronize(),
            _ => Ok(()),
        }
    }

    pub fn is_gpu_like(&self) -> bool {
        !matches!(self, Device::Cpu)
    }
}
