//! The cuda device: cudarc (driver API, loaded at run time), one stream, modules loaded lazily
//! once per device from the embedded CUBIN for the GPU's architecture, else the PTX fallback, else
//! (no NVRTC at build time) the embedded source compiled now by the machine's NVRTC.

use super::{DeviceKind, LaunchCfg};
use crate::error::{Error, Result};
use crate::kernels::{Kernel, MODULES, NVRTC_AT_BUILD, PTX_ARCH};
use cudarc::driver::{self, CudaContext, CudaFunction, CudaModule, CudaSlice, CudaStream, DevicePtr};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

pub struct CudaDevice {
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    name: String,
    /// cuDriverGetVersion's 1000·major + 10·minor
    #[cfg_attr(not(feature = "tune"), allow(dead_code))]
    driver_version: i32,
    /// Compute capability as 10 * major + minor (90 for an H100).
    arch: u32,
    modules: Mutex<HashMap<usize, Arc<CudaModule>>>,
    functions: Mutex<HashMap<Kernel, CudaFunction>>,
}

fn drv(e: driver::DriverError) -> Error {
    Error::Cuda(e.to_string())
}

impl CudaDevice {
    /// Probes step by step with calls that return errors: cudarc panics if asked for a context
    /// while libcuda is missing, so its presence is checked first, and the rest runs under
    /// catch_unwind in case a present libcuda lacks a symbol.
    pub fn open(ordinal: usize) -> Result<CudaDevice> {
        if !unsafe { driver::sys::is_culib_present() } {
            return Err(Error::NoCuda("libcuda.so not found (no NVIDIA driver on this machine)".into()));
        }
        let probe = std::panic::catch_unwind(|| -> Result<CudaDevice> {
            driver::result::init().map_err(|e| Error::NoCuda(format!("cuInit failed: {e}")))?;
            let n = CudaContext::device_count().map_err(|e| Error::NoCuda(format!("cannot count devices: {e}")))?;
            if n <= 0 {
                return Err(Error::NoCuda("the driver reports no CUDA device".into()));
            }
            if ordinal >= n as usize {
                return Err(Error::NoCuda(format!("device {ordinal} requested, {n} present")));
            }
            let ctx = CudaContext::new(ordinal).map_err(|e| Error::NoCuda(format!("cannot create a context: {e}")))?;
            // One stream and raw pointers in params structs: cudarc's per-buffer events add nothing.
            unsafe { ctx.disable_event_tracking() };
            let stream = ctx.default_stream();
            let (major, minor) = ctx.compute_capability().map_err(drv)?;
            let name = ctx.name().map_err(drv)?;
            let mut driver_version = 0;
            // SAFETY: cuDriverGetVersion writes one int through the pointer; the driver is
            // initialised above.
            unsafe { driver::sys::cuDriverGetVersion(&mut driver_version) }.result().map_err(drv)?;
            Ok(CudaDevice {
                ctx,
                stream,
                name,
                driver_version,
                arch: (major * 10 + minor) as u32,
                modules: Mutex::new(HashMap::new()),
                functions: Mutex::new(HashMap::new()),
            })
        });
        probe.unwrap_or_else(|_| Err(Error::NoCuda("the CUDA driver library is unusable (missing symbols)".into())))
    }

    pub fn describe(&self) -> String {
        format!("cuda: {} (sm_{})", self.name, self.arch)
    }

    /// What a tuned choice holds for: the GPU, its compute capability and the driver.
    #[cfg(feature = "tune")]
    pub fn tune_identity(&self) -> String {
        format!("cuda {} sm_{} driver {}", self.name, self.arch, self.driver_version)
    }

    pub fn arch(&self) -> u32 {
        self.arch
    }

    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    pub fn context(&self) -> &Arc<CudaContext> {
        &self.ctx
    }

    pub(crate) fn alloc(&self, bytes: usize, poison: bool) -> Result<CudaSlice<u8>> {
        // Uninitialised (kernels write every output element), so that a timed op costs only its
        // kernel; under test the buffer is filled with NaN bytes instead.
        let s = unsafe { self.stream.alloc::<u8>(bytes.max(1)) }.map_err(drv)?;
        if poison {
            self.fill(&s, 0xff)?;
        }
        Ok(s)
    }

    /// Sets every byte of `s` (stream-ordered).
    pub fn fill(&self, s: &CudaSlice<u8>, byte: u8) -> Result<()> {
        let (p, _g) = s.device_ptr(&self.stream);
        unsafe { driver::result::memset_d8_async(p, byte, s.len(), self.stream.cu_stream()) }.map_err(drv)
    }

    pub(crate) fn upload(&self, bytes: &[u8]) -> Result<CudaSlice<u8>> {
        if bytes.is_empty() {
            return self.alloc(0, false);
        }
        self.stream.clone_htod(bytes).map_err(drv)
    }

    pub(crate) fn download(&self, s: &CudaSlice<u8>) -> Result<Vec<u8>> {
        let mut v = self.stream.clone_dtoh(s).map_err(drv)?;
        v.truncate(s.len());
        Ok(v)
    }

    pub(crate) fn ptr(&self, s: &CudaSlice<u8>) -> u64 {
        s.device_ptr(&self.stream).0
    }

    pub fn synchronize(&self) -> Result<()> {
        self.stream.synchronize().map_err(drv)
    }

    fn module(&self, index: usize) -> Result<Arc<CudaModule>> {
        let mut mods = self.modules.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(m) = mods.get(&index) {
            return Ok(m.clone());
        }
        let info = &MODULES[index];
        // A CUBIN runs on GPUs of its major version with an equal or higher minor version.
        let cubin = info
            .cubins
            .iter()
            .filter(|(a, bin)| !bin.is_empty() && a / 10 == self.arch / 10 && *a <= self.arch)
            .max_by_key(|(a, _)| *a);
        // the images are embedded deflated (4-5x smaller); 256 MiB bounds a damaged one
        let inflate = |z: &[u8]| {
            miniz_oxide::inflate::decompress_to_vec_with_limit(z, 256 << 20)
                .map_err(|e| Error::Cuda(format!("module {}: the embedded image does not inflate: {e:?}", info.name)))
        };
        let image = if let Some((_, bin)) = cubin {
            cudarc::nvrtc::Ptx::from_binary(inflate(bin)?)
        } else if !info.ptx.is_empty() && self.arch >= PTX_ARCH {
            cudarc::nvrtc::Ptx::from_src(String::from_utf8_lossy(&inflate(info.ptx)?).into_owned())
        } else {
            // Built without NVRTC: compile the embedded source for this GPU now.
            super::nvrtc_compile::load_nvrtc().map_err(Error::Nvrtc)?;
            let arch = format!("sm_{}", self.arch);
            let (bin, _) = super::nvrtc_compile::nvrtc_compile(info.source, info.name, &arch, false, None)
                .map_err(|log| Error::Nvrtc(format!("kernels/{}.cu for {arch}:\n{log}", info.name)))?;
            cudarc::nvrtc::Ptx::from_binary(bin)
        };
        let m = self.ctx.load_module(image).map_err(|e| Error::Cuda(format!("loading module {}: {e}", info.name)))?;
        mods.insert(index, m.clone());
        Ok(m)
    }

    fn function(&self, k: Kernel) -> Result<CudaFunction> {
        if !k.in_gpu_build() {
            return Err(Error::Unsupported {
                op: k.name(),
                detail: "a training kernel: this build (without the `train` feature) embeds only the inference kernels"
                    .into(),
            });
        }
        if let Some(f) = self.functions.lock().unwrap_or_else(|e| e.into_inner()).get(&k) {
            return Ok(f.clone());
        }
        let f = self.module(k.module())?.load_function(k.name()).map_err(drv)?;
        self.functions.lock().unwrap_or_else(|e| e.into_inner()).insert(k, f.clone());
        Ok(f)
    }

    /// Loads every kernel now (modules are otherwise loaded on first use): a quick check that the
    /// embedded images suit this GPU.
    pub fn load_all(&self) -> Result<()> {
        for &k in Kernel::ALL {
            self.function(k)?;
        }
        Ok(())
    }

    pub(crate) fn launch(&self, k: Kernel, cfg: LaunchCfg, args: &mut [*mut core::ffi::c_void]) -> Result<()> {
        let f = self.function(k)?;
        self.ctx.bind_to_thread().map_err(drv)?;
        // SAFETY: args holds one pointer to the kernel's params struct (KernelParams), whose buffer
        // pointers are live allocations of this context.
        unsafe {
            driver::result::launch_kernel(
                f.cu_function(),
                cfg.grid,
                cfg.block,
                cfg.smem_bytes,
                self.stream.cu_stream(),
                args,
            )
        }
        .map_err(|e| Error::Launch { kernel: k.name(), device: DeviceKind::Cuda, detail: e.to_string() })
    }

    /// Which NVRTC produced the images this binary carries ("13.0"), or None for run-time compile.
    pub fn nvrtc_at_build() -> Option<&'static str> {
        NVRTC_AT_BUILD
    }
}
