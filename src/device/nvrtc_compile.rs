//! Locating NVRTC and compiling one CUDA source with it. Shared by build.rs (which embeds CUBINs)
//! and by the cuda device (which compiles the embedded source at run time when the build machine
//! had no NVRTC), so both use the same flags.
//!
//! Only std, libloading and cudarc's raw NVRTC bindings are used here: build.rs includes this file
//! with `#[path]`.

use cudarc::nvrtc::{result, sys};
use std::ffi::{CStr, CString};
use std::path::PathBuf;

/// Directories searched for libnvrtc.so.13: NVRTC_LIB_DIR first, then the usual places.
pub fn nvrtc_candidates() -> Vec<PathBuf> {
    let mut dirs = Vec::new();
    if let Some(d) = std::env::var_os("NVRTC_LIB_DIR") {
        dirs.push(PathBuf::from(d));
    }
    for v in ["CUDA_HOME", "CUDA_PATH"] {
        if let Some(d) = std::env::var_os(v) {
            dirs.push(PathBuf::from(d).join("lib64"));
        }
    }
    dirs.push("/usr/local/cuda/lib64".into());
    dirs.push("/usr/lib/x86_64-linux-gnu".into());
    dirs
}

/// Makes NVRTC 13.0 loadable by cudarc and returns its version ("13.0").
///
/// libnvrtc dlopens its builtins by soname and has no RPATH, and cudarc dlopens libnvrtc by name;
/// preloading both by absolute path with RTLD_GLOBAL satisfies both lookups. Without a candidate
/// directory holding the library, a library already reachable by name (LD_LIBRARY_PATH) is used.
pub fn load_nvrtc() -> Result<String, String> {
    let flags = libloading::os::unix::RTLD_NOW | libloading::os::unix::RTLD_GLOBAL;
    let mut searched = Vec::new();
    for dir in nvrtc_candidates() {
        let lib = dir.join("libnvrtc.so.13");
        if !lib.exists() {
            searched.push(dir.display().to_string());
            continue;
        }
        if let Ok(entries) = std::fs::read_dir(&dir) {
            for e in entries.flatten() {
                let p = e.path();
                if p.file_name().is_some_and(|f| f.to_string_lossy().starts_with("libnvrtc-builtins.so")) {
                    let l = unsafe { libloading::os::unix::Library::open(Some(&p), flags) };
                    std::mem::forget(l.map_err(|e| format!("{}: {e}", p.display()))?);
                    break;
                }
            }
        }
        let l = unsafe { libloading::os::unix::Library::open(Some(&lib), flags) };
        std::mem::forget(l.map_err(|e| format!("{}: {e}", lib.display()))?);
        break;
    }
    if !unsafe { sys::is_culib_present() } {
        return Err(format!("no libnvrtc.so.13 in {} nor on the library path", searched.join(", ")));
    }
    let (mut major, mut minor) = (0, 0);
    unsafe { sys::nvrtcVersion(&mut major, &mut minor) }.result().map_err(|e| format!("{e:?}"))?;
    if major != 13 || minor != 0 {
        return Err(format!("found NVRTC {major}.{minor}; pin 13.0 (the GPU machine's driver speaks CUDA 13.0)"));
    }
    Ok(format!("{major}.{minor}"))
}

/// Compiles `src` for `arch` ("sm_90" gives a CUBIN, "compute_80" gives PTX). Returns the image and
/// NVRTC's log (ptxas' resource report with `verbose`), or the log on failure.
pub fn nvrtc_compile(
    src: &str,
    name: &str,
    arch: &str,
    verbose: bool,
    include_dir: Option<&str>,
) -> Result<(Vec<u8>, String), String> {
    let csrc = CString::new(src).map_err(|e| e.to_string())?;
    let cname = CString::new(name).map_err(|e| e.to_string())?;
    let prog = result::create_program(&csrc, Some(&cname)).map_err(|e| format!("{e:?}"))?;
    let mut opts = vec![
        format!("--gpu-architecture={arch}"),
        "--std=c++17".to_string(),
        "-lineinfo".to_string(),
        "-default-device".to_string(),
    ];
    if verbose {
        opts.push("--ptxas-options=-v".into());
    }
    if let Some(d) = include_dir {
        opts.push(format!("--include-path={d}"));
    }
    let status = unsafe { result::compile_program(prog, &opts) };
    let log = match unsafe { result::get_program_log(prog) } {
        Ok(l) => unsafe { CStr::from_ptr(l.as_ptr()) }.to_string_lossy().into_owned(),
        Err(e) => format!("(no log: {e:?})"),
    };
    let image = if status.is_err() {
        Err(log.clone())
    } else if arch.starts_with("sm_") {
        let mut size = 0usize;
        let r = unsafe { sys::nvrtcGetCUBINSize(prog, &mut size) }.result();
        let mut buf = vec![0u8; size];
        r.and_then(|_| unsafe { sys::nvrtcGetCUBIN(prog, buf.as_mut_ptr() as *mut _) }.result())
            .map(|_| buf)
            .map_err(|e| format!("{e:?}"))
    } else {
        unsafe { result::get_ptx(prog) }
            .map(|p| p.iter().map(|&c| c as u8).take_while(|&c| c != 0).collect())
            .map_err(|e| format!("{e:?}"))
    };
    unsafe { result::destroy_program(prog) }.ok();
    image.map(|i| (i, log))
}
