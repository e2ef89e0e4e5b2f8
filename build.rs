//! Build script: turns kernels/*.cu into
//! - CUBINs for sm_80 and sm_90 plus a compute_80 PTX fallback, compiled by NVRTC and embedded in the
//!   binary, with each kernel's registers / shared memory / stack / spills parsed from ptxas' report;
//! - the emu device: the same sources compiled by g++ against src/device/emu/emu.h, one translation
//!   unit per .cu (only the changed ones are recompiled);
//! - `kernels_generated.rs`: the table of kernel names Rust code uses (a misspelt kernel does not
//!   compile).
//!
//! NVRTC is found through NVRTC_LIB_DIR, else the usual places. Without it the build still succeeds
//! with one warning and the binary compiles the embedded source at run time; with
//! RECLMIS_REQUIRE_NVRTC=1 (CI) a missing NVRTC fails the build.

use std::collections::hash_map::DefaultHasher;
use std::fmt::Write as _;
use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};
use std::{env, fs};

/// Real-architecture targets that get a CUBIN; the PTX fallback is for compute_80 (JIT on newer GPUs).
const CUBIN_ARCHS: [u32; 2] = [80, 90];
const PTX_ARCH: u32 = 80;

struct Module {
    name: String,
    kernels: Vec<String>,
    /// The kernels a build without `autocast` leaves out: `autocast_only` by name, and every
    /// kernel defined inside an `// @autocast-only` region.
    autocast: Vec<String>,
    /// What NVRTC compiles and the binary embeds: the source with local #includes inlined, less
    /// the training-only kernels in a
    /// build without the `train` feature (empty when the module has only those).
    gpu: String,
    gpu_kernels: Vec<String>,
}

/// reclmis-infer built for size (opt-level s or z: the release-min profile) links as a non-PIE
/// executable with identical functions folded: -64 KB of relocations and duplicates, measured
/// (BENCHMARKS.md). Linker arguments go to that binary only (proc macros and tests link as usual).
fn size_link_args() {
    println!("cargo:rerun-if-env-changed=OPT_LEVEL");
    if matches!(env::var("OPT_LEVEL").as_deref(), Ok("s" | "z")) {
        for a in ["-no-pie", "-Wl,--icf=all", "-Wl,--build-id=none"] {
            println!("cargo:rustc-link-arg-bin=reclmis-infer={a}");
        }
    }
}

/// Kernels only training launches: every backward, the optimiser, the losses. A build without
/// the `train` feature (reclmis-infer) compiles and embeds the others only; tests/deploy.rs checks
/// on emu that the inference path launches nothing outside them.
/// bf16 products, convolutions, attention, pooling and the PLAM gate: only bf16 autocast gives
/// them bf16 operands, and the pipelined GEMMs are 1.7 MB of the deflated images. A build without `autocast` (reclmis-infer) does not
/// embed them (nor the pipelined tf32 kernels, which share their core: such a build runs tf32 on
/// the element-loading `_tc_` kernels); the cuda device refuses such a launch by name.
fn autocast_only(module: &str, kernel: &str) -> bool {
    ["gemm", "conv", "attention", "pool", "plam"].contains(&module)
        && (kernel.ends_with("_bf16") || kernel.contains("_pipe"))
}

fn training_only(module: &str, kernel: &str) -> bool {
    kernel.contains("_bwd_") || ["optim", "loss", "ccl", "selftest"].contains(&module)
}

/// `src` without its regions from a `// @autocast-only begin` line to a `// @autocast-only end`
/// line: the bf16 kernels' helpers (the pipelined core, the implicit-GEMM loaders), which a build
/// without `autocast` neither compiles nor should embed as source (about 40 KB of reclmis-infer).
fn strip_autocast_regions(src: &str) -> String {
    let (begin, end) = ("// @autocast-only begin", "// @autocast-only end");
    let mut out = String::with_capacity(src.len());
    let mut rest = src;
    while let Some(b) = rest.find(begin) {
        out.push_str(&rest[..b]);
        let e = rest[b..].find(end).unwrap_or_else(|| panic!("`{begin}` without `{end}`"));
        out.push_str("/* bf16 autocast only: not in this build */");
        rest = &rest[b + e + end.len()..];
    }
    assert!(!rest.contains(end), "`{end}` without `{begin}`");
    out.push_str(rest);
    out
}

/// `src` without the definitions of `drop` (from `extern "C"` to the body's closing brace).
fn strip_kernels(src: &str, drop: &[&String]) -> String {
    let mut out = src.to_string();
    for k in drop {
        let at = out.find(&format!(" {k}(")).unwrap_or_else(|| panic!("kernel {k} not found to strip"));
        let start = out[..at].rfind("extern \"C\"").unwrap_or_else(|| panic!("{k}: no extern \"C\""));
        let open = at + out[at..].find('{').unwrap_or_else(|| panic!("{k}: no body"));
        let end = matching_brace(&out, open).unwrap_or_else(|| panic!("{k}: unbalanced braces"));
        out.replace_range(start..=end, &format!("/* {k}: not in this build (training or bf16 autocast only) */"));
    }
    out
}

/// The index of the brace closing the one at `open`, skipping comments and literals.
fn matching_brace(s: &str, open: usize) -> Option<usize> {
    let b = s.as_bytes();
    let (mut depth, mut i) = (0usize, open);
    while i < b.len() {
        match b[i] {
            b'/' if b.get(i + 1) == Some(&b'/') => i = s[i..].find('\n').map_or(b.len(), |n| i + n),
            b'/' if b.get(i + 1) == Some(&b'*') => i = s[i + 2..].find("*/").map_or(b.len(), |n| i + 2 + n + 1),
            q @ (b'"' | b'\'') => {
                i += 1;
                while i < b.len() && b[i] != q {
                    i += if b[i] == b'\\' { 2 } else { 1 };
                }
            }
            b'{' => depth += 1,
            b'}' => {
                depth -= 1;
                if depth == 0 {
                    return Some(i);
                }
            }
            _ => {}
        }
        i += 1;
    }
    None
}

/// Deflate (the images compress 4-5x; the device decompresses a module when it first loads it).
fn deflate(bytes: &[u8]) -> Vec<u8> {
    if bytes.is_empty() {
        return vec![];
    }
    miniz_oxide::deflate::compress_to_vec(bytes, 10)
}

#[derive(Default, Clone)]
struct Resources {
    kernel: String,
    arch: u32,
    registers: u32,
    smem: u32,
    stack: u32,
    spill_stores: u32,
    spill_loads: u32,
}

fn main() {
    let root = PathBuf::from(env::var("CARGO_MANIFEST_DIR").unwrap());
    let out = PathBuf::from(env::var("OUT_DIR").unwrap());
    let kdir = root.join("kernels");
    println!("cargo:rerun-if-changed=kernels");
    println!("cargo:rerun-if-changed=src/device/emu/emu.h");
    println!("cargo:rerun-if-changed=src/device/emu/runtime.cpp");
    for v in [
        "NVRTC_LIB_DIR",
        "NVRTC_INCLUDE_DIR",
        "RECLMIS_REQUIRE_NVRTC",
        "CUDA_HOME",
        "CUDA_PATH",
        "RECLMIS_CUOBJDUMP",
        "RECLMIS_REQUIRE_SASS",
    ] {
        println!("cargo:rerun-if-env-changed={v}");
    }

    let mut cu_files: Vec<PathBuf> = fs::read_dir(&kdir)
        .expect("kernels/ folder")
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "cu"))
        .collect();
    cu_files.sort();
    for f in fs::read_dir(&kdir).unwrap() {
        println!("cargo:rerun-if-changed={}", f.unwrap().path().display());
    }

    size_link_args();
    let with_training = env::var_os("CARGO_FEATURE_TRAIN").is_some();
    let with_autocast = env::var_os("CARGO_FEATURE_AUTOCAST").is_some();
    let modules: Vec<Module> = cu_files
        .iter()
        .map(|p| {
            let name = p.file_stem().unwrap().to_string_lossy().into_owned();
            let expanded = expand_includes(p, &kdir, &mut Vec::new());
            let kernels = kernel_names(&expanded, p);
            let outside = kernel_names(&strip_autocast_regions(&expanded), p);
            let autocast: Vec<String> =
                kernels.iter().filter(|k| autocast_only(&name, k) || !outside.contains(k)).cloned().collect();
            let (keep, drop): (Vec<&String>, Vec<&String>) = kernels
                .iter()
                .partition(|k| (with_training || !training_only(&name, k)) && (with_autocast || !autocast.contains(k)));
            let mut gpu = if keep.is_empty() { String::new() } else { strip_kernels(&expanded, &drop) };
            if !with_autocast {
                gpu = strip_autocast_regions(&gpu);
            }
            let gpu_kernels = keep.into_iter().cloned().collect();
            Module { name, kernels, autocast, gpu, gpu_kernels }
        })
        .collect();
    check_unique(&modules);

    let want_cuda = env::var_os("CARGO_FEATURE_CUDA").is_some();
    let require = env::var("RECLMIS_REQUIRE_NVRTC").is_ok_and(|v| v == "1");
    let mut resources = Vec::new();
    let mut sass: Vec<sass::Counts> = Vec::new();
    let mut sass_tool = None;
    let mut nvrtc_version = None;
    for m in &modules {
        for a in CUBIN_ARCHS {
            fs::write(out.join(format!("{}.sm_{a}.cubin", m.name)), b"").unwrap();
        }
        fs::write(out.join(format!("{}.ptx", m.name)), b"").unwrap();
        fs::write(out.join(format!("{}.cu", m.name)), &m.gpu).unwrap();
    }
    if want_cuda || require {
        match nvrtc::Nvrtc::load() {
            Ok(nv) => {
                nvrtc_version = Some(nv.version.clone());
                for m in modules.iter().filter(|m| !m.gpu_kernels.is_empty()) {
                    resources.extend(nv.compile_module(m, &out));
                }
                match sass::Cuobjdump::find() {
                    Ok(tool) => {
                        for m in modules.iter().filter(|m| !m.gpu_kernels.is_empty()) {
                            for a in CUBIN_ARCHS {
                                sass.extend(tool.counts(&out.join(format!("{}.sm_{a}.cubin", m.name)), a));
                            }
                        }
                        sass_tool = Some(tool.version);
                    }
                    Err(why) if env::var("RECLMIS_REQUIRE_SASS").is_ok_and(|v| v == "1") => {
                        panic!("RECLMIS_REQUIRE_SASS=1 but cuobjdump is not usable: {why}")
                    }
                    Err(_) => {}
                }
            }
            Err(why) => {
                if require {
                    panic!("RECLMIS_REQUIRE_NVRTC=1 but NVRTC is not usable: {why}");
                }
                println!(
                    "cargo:warning=reclmis: NVRTC not found ({why}); kernels are embedded as source and \
                     compiled at run time by the target machine's NVRTC. Set NVRTC_LIB_DIR to compile them now."
                );
            }
        }
    }

    if env::var_os("CARGO_FEATURE_EMU").is_some() {
        build_emu(&root, &out, &modules);
    }
    // the embedded images, compressed
    for m in &modules {
        let names = CUBIN_ARCHS.iter().map(|a| format!("{}.sm_{a}.cubin", m.name)).chain([format!("{}.ptx", m.name)]);
        for n in names {
            let raw = fs::read(out.join(&n)).unwrap();
            fs::write(out.join(format!("{n}.z")), deflate(&raw)).unwrap();
        }
    }
    write_table(&out, &modules, &resources, nvrtc_version.as_deref());
    sass::write_table(&out, &sass, sass_tool.as_deref());
}

/// The SASS of the embedded CUBINs, read by cuobjdump (the `nvidia-cuda-cuobjdump` and
/// `nvidia-cuda-nvdisasm` wheels, which read NVRTC 13.0's CUBINs) when it is found: the counts of
/// the instructions a performance engineer looks for first, per kernel and architecture.
mod sass {
    use super::*;
    use std::process::Command;

    #[derive(Default, Debug)]
    pub struct Counts {
        kernel: String,
        arch: u32,
        hmma: u32,
        ldl: u32,
        stl: u32,
        ldg: u32,
        ldg128: u32,
        ldgsts: u32,
        ldgsts128: u32,
        ldsm: u32,
        lds128: u32,
    }

    pub struct Cuobjdump {
        path: PathBuf,
        pub version: String,
    }

    impl Cuobjdump {
        /// RECLMIS_CUOBJDUMP, else beside NVRTC's wheel (nvidia/cu13/bin, where .ci/run installs
        /// it), else cuobjdump on PATH.
        pub fn find() -> Result<Cuobjdump, String> {
            let mut tried = Vec::new();
            if let Some(p) = env::var_os("RECLMIS_CUOBJDUMP") {
                tried.push(PathBuf::from(p));
            }
            if let Some(lib) = env::var_os("NVRTC_LIB_DIR") {
                tried.push(PathBuf::from(lib).join("../bin/cuobjdump"));
            }
            tried.push(PathBuf::from("cuobjdump"));
            for path in tried {
                let Ok(out) = Command::new(&path).arg("--version").output() else { continue };
                if !out.status.success() {
                    continue;
                }
                let text = String::from_utf8_lossy(&out.stdout);
                let version = text
                    .lines()
                    .find_map(|l| l.split("release ").nth(1))
                    .map(|v| v.split(',').next().unwrap_or(v).trim().to_string())
                    .unwrap_or_else(|| "?".into());
                return Ok(Cuobjdump { path, version });
            }
            Err("no cuobjdump (RECLMIS_CUOBJDUMP, NVRTC_LIB_DIR/../bin, PATH)".into())
        }

        pub fn counts(&self, cubin: &Path, arch: u32) -> Vec<Counts> {
            // cuobjdump runs nvdisasm, which the wheel keeps beside it
            let mut path = self.path.parent().map(|d| d.as_os_str().to_owned()).unwrap_or_default();
            if let Some(p) = env::var_os("PATH") {
                path.push(":");
                path.push(p);
            }
            let out = Command::new(&self.path)
                .env("PATH", path)
                .arg("-sass")
                .arg(cubin)
                .output()
                .unwrap_or_else(|e| panic!("cuobjdump -sass {}: {e}", cubin.display()));
            if !out.status.success() {
                panic!("cuobjdump -sass {}: {}", cubin.display(), String::from_utf8_lossy(&out.stderr));
            }
            parse(&String::from_utf8_lossy(&out.stdout), arch)
        }
    }

    /// `cuobjdump -sass` prints `Function : name` before each kernel's code, then one instruction
    /// per line: `/*0210*/   @!P1 LDGSTS.E.64 [R7], desc[UR6][R4.64], !P2 ;   /* 0x... */`.
    /// Instructions guarded by `@!PT` (never executed: the compiler's padding) are not counted.
    pub fn parse(text: &str, arch: u32) -> Vec<Counts> {
        let mut out: Vec<Counts> = Vec::new();
        for line in text.lines() {
            let t = line.trim();
            if let Some(name) = t.strip_prefix("Function : ") {
                out.push(Counts { kernel: name.trim().to_string(), arch, ..Default::default() });
                continue;
            }
            let (Some(c), Some(rest)) = (out.last_mut(), t.strip_prefix("/*")) else { continue };
            let Some((addr, code)) = rest.split_once("*/") else { continue };
            if !addr.chars().all(|ch| ch.is_ascii_hexdigit()) {
                continue;
            }
            let mut words = code.split_whitespace();
            let mut op = words.next().unwrap_or("");
            if op.starts_with('@') {
                if op == "@!PT" {
                    continue;
                }
                op = words.next().unwrap_or("");
            }
            let op = op.trim_end_matches(';');
            let wide = op.contains(".128");
            if op.starts_with("HMMA") {
                c.hmma += 1;
            } else if op.starts_with("LDL") {
                c.ldl += 1;
            } else if op.starts_with("STL") {
                c.stl += 1;
            } else if op.starts_with("LDGSTS") {
                c.ldgsts += 1;
                c.ldgsts128 += wide as u32;
            } else if op == "LDG" || op.starts_with("LDG.") {
                c.ldg += 1;
                c.ldg128 += wide as u32;
            } else if op.starts_with("LDSM") {
                c.ldsm += 1;
            } else if op.starts_with("LDS.128") {
                c.lds128 += 1;
            }
        }
        out
    }

    pub fn write_table(out: &Path, counts: &[Counts], tool: Option<&str>) {
        let mut s = String::from(
            "// Generated by build.rs from cuobjdump -sass of the embedded CUBINs. Do not edit.

",
        );
        let _ = writeln!(s, "/// cuobjdump's release that read the SASS, or None (no cuobjdump at build time).");
        match tool {
            Some(v) => {
                let _ = writeln!(s, "pub const SASS_TOOL: Option<&str> = Some(\"{v}\");");
            }
            None => s.push_str("pub const SASS_TOOL: Option<&str> = None;\n"),
        }
        s.push_str("pub static SASS: &[SassCounts] = &[\n");
        for c in counts {
            let _ = writeln!(
                s,
                "    SassCounts {{ kernel: \"{}\", arch: {}, hmma: {}, ldl: {}, stl: {}, ldg: {}, ldg128: {}, \
                 ldgsts: {}, ldgsts128: {}, ldsm: {}, lds128: {} }},",
                c.kernel, c.arch, c.hmma, c.ldl, c.stl, c.ldg, c.ldg128, c.ldgsts, c.ldgsts128, c.ldsm, c.lds128
            );
        }
        s.push_str("];\n");
        fs::write(out.join("sass_generated.rs"), s).unwrap();
    }
}

/// Inlines `#include "x"` of files in kernels/ (once each), keeping #line markers for error messages.
fn expand_includes(path: &Path, kdir: &Path, seen: &mut Vec<PathBuf>) -> String {
    let text = fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let mut out = format!("#line 1 \"{}\"\n", path.display());
    for (i, line) in text.lines().enumerate() {
        let t = line.trim_start();
        if let Some(rest) = t.strip_prefix("#include \"") {
            let inc = rest.split('"').next().unwrap();
            let p = kdir.join(inc);
            if !seen.contains(&p) {
                seen.push(p.clone());
                out.push_str(&expand_includes(&p, kdir, seen));
            }
            let _ = writeln!(out, "#line {} \"{}\"", i + 2, path.display());
        } else if t.starts_with("#pragma once") {
            out.push('\n');
        } else {
            out.push_str(line);
            out.push('\n');
        }
    }
    out
}

/// Finds `extern "C" __global__ void name(` and checks the `<op>_<fwd|bwd>_<dtype>` naming rule.
fn kernel_names(src: &str, path: &Path) -> Vec<String> {
    let mut names = Vec::new();
    for (pos, _) in src.match_indices("__global__") {
        let line_start = src[..pos].rfind('\n').map_or(0, |i| i + 1);
        let line = &src[line_start..];
        if line.trim_start().starts_with("//") || line.trim_start().starts_with("#define") {
            continue;
        }
        if !src[line_start..pos].contains("extern \"C\"") {
            panic!("{}: every __global__ must be extern \"C\" (unmangled name)", path.display());
        }
        let mut after = src[pos + "__global__".len()..].to_string();
        // `void __launch_bounds__(256) name(`: drop the attribute and its argument first.
        if let Some(lb) = after.find("__launch_bounds__") {
            if after[..lb].trim() == "void" {
                let close = after[lb..].find(')').unwrap() + lb;
                after.replace_range(lb..=close, "");
            }
        }
        let paren = after.find('(').unwrap();
        let name = after[..paren].split_whitespace().last().unwrap().to_string();
        let ok = ["_f32", "_bf16", "_f16", "_i32"].iter().any(|d| name.ends_with(d));
        let dir = name.contains("_fwd_") || name.contains("_bwd_");
        assert!(
            ok && dir && name.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_'),
            "{}: kernel `{name}` must be named <op>_<fwd|bwd>_<dtype>",
            path.display()
        );
        names.push(name);
    }
    names
}

fn check_unique(modules: &[Module]) {
    let mut all: Vec<&str> = modules.iter().flat_map(|m| m.kernels.iter().map(|s| s.as_str())).collect();
    all.sort();
    for w in all.windows(2) {
        assert!(w[0] != w[1], "kernel name {} is defined twice", w[0]);
    }
}

fn hash_of(parts: &[&[u8]]) -> u64 {
    let mut h = DefaultHasher::new();
    for p in parts {
        p.hash(&mut h);
    }
    h.finish()
}

/// The emu device: one g++ translation unit per module, recompiled only when its inputs changed.
fn build_emu(root: &Path, out: &Path, modules: &[Module]) {
    let emu_dir = root.join("src/device/emu");
    let kdir = root.join("kernels");
    let header = fs::read(emu_dir.join("emu.h")).unwrap();
    // Every shared header: a change to any of them recompiles every unit (they may include it).
    let mut headers: Vec<PathBuf> = fs::read_dir(&kdir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "cuh"))
        .collect();
    headers.sort();
    let common: Vec<u8> = headers.iter().flat_map(|h| fs::read(h).unwrap()).collect();
    let obj_dir = out.join("emu_obj");
    fs::create_dir_all(&obj_dir).unwrap();
    // -fstack-clash-protection: a frame larger than a page touches every page in order, so an
    // overflow always lands in the fiber stack's guard page instead of jumping over it into a neighbour.
    const FLAGS: &str = "-std=c++20 -O2 -DRECLMIS_EMU -fstack-clash-protection";

    let mut units: Vec<(String, String)> = Vec::new();
    for m in modules {
        let src_path = kdir.join(format!("{}.cu", m.name));
        let raw = fs::read_to_string(&src_path).unwrap();
        let mut tu = String::from("#include \"emu.h\"\n");
        let _ = writeln!(tu, "#line 1 \"{}\"", src_path.display());
        for line in raw.lines() {
            tu.push_str(&rewrite_extern_shared(line));
            tu.push('\n');
        }
        tu.push_str("\n// launchers: unpack a cuLaunchKernel-style argument array by the kernel's signature\n");
        for k in &m.kernels {
            let _ = writeln!(
                tu,
                "extern \"C\" int reclmis_emu_{k}(const emu::LaunchCfg* c, void** a, char* e, size_t n) \
                 {{ return emu::launch(&{k}, c, a, e, n); }}"
            );
        }
        units.push((m.name.clone(), tu));
    }
    units.push(("runtime".into(), fs::read_to_string(emu_dir.join("runtime.cpp")).unwrap()));

    let objects: Vec<PathBuf> = std::thread::scope(|s| {
        let handles: Vec<_> = units
            .iter()
            .map(|(name, tu)| {
                let (obj_dir, emu_dir, kdir) = (&obj_dir, &emu_dir, &kdir);
                let (header, common) = (&header, &common);
                s.spawn(move || {
                    let cpp = obj_dir.join(format!("{name}.cpp"));
                    let obj = obj_dir.join(format!("{name}.o"));
                    let stamp = obj_dir.join(format!("{name}.stamp"));
                    let h = hash_of(&[tu.as_bytes(), header, common, FLAGS.as_bytes()]).to_string();
                    if obj.exists() && fs::read_to_string(&stamp).is_ok_and(|s| s == h) {
                        return obj;
                    }
                    fs::write(&cpp, tu).unwrap();
                    let mut b = cc::Build::new();
                    b.cpp(true)
                        .file(&cpp)
                        .include(emu_dir)
                        .include(kdir)
                        .opt_level(2)
                        .debug(false)
                        .warnings(false)
                        .cargo_metadata(false);
                    for f in FLAGS.split_whitespace().filter(|f| !f.starts_with("-O")) {
                        b.flag(f);
                    }
                    b.flag("-Wno-unknown-pragmas");
                    let objs = b.compile_intermediates();
                    fs::copy(&objs[0], &obj).unwrap();
                    fs::write(&stamp, h).unwrap();
                    obj
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().expect("emu compile")).collect()
    });
    let mut b = cc::Build::new();
    b.cpp(true);
    for o in &objects {
        b.object(o);
    }
    b.compile("reclmis_emu");
}

/// `extern __shared__ __align__(16) float smem[];` is not C++: the emu reads dynamic shared memory
/// through a pointer instead.
fn rewrite_extern_shared(line: &str) -> String {
    let t = line.trim_start();
    let Some(rest) = t.strip_prefix("extern __shared__") else {
        return line.to_string();
    };
    let mut rest = rest.trim();
    if let Some(r) = rest.strip_prefix("__align__(") {
        rest = r.split_once(')').unwrap().1.trim();
    }
    let rest = rest.split("//").next().unwrap().trim(); // a trailing comment
    let decl = rest.trim_end_matches(';').trim();
    let decl = decl.strip_suffix("[]").expect("extern __shared__ T name[];").trim();
    let (ty, name) = decl.rsplit_once(char::is_whitespace).unwrap();
    format!("{ty}* {name} = reinterpret_cast<{ty}*>(::emu::dynamic_smem());")
}

fn write_table(out: &Path, modules: &[Module], res: &[Resources], nvrtc: Option<&str>) {
    let mut s = String::from("// Generated by build.rs from kernels/*.cu. Do not edit.\n\n");
    s.push_str(
        "/// Every CUDA kernel of the project; the variant names are the `extern \"C\"` kernel names.\n\
         #[allow(non_camel_case_types)]\n#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]\npub enum Kernel {\n",
    );
    // A build without `autocast` has no variant for the bf16 kernels it cannot launch (their
    // names and table rows are about 100 bytes each of the cpu-only reclmis-infer).
    let with_autocast = env::var_os("CARGO_FEATURE_AUTOCAST").is_some();
    let all: Vec<(usize, &String)> = modules
        .iter()
        .enumerate()
        .flat_map(|(i, m)| m.kernels.iter().map(move |k| (i, k)))
        .filter(|(i, k)| with_autocast || !modules[*i].autocast.contains(k))
        .collect();
    for (_, k) in &all {
        let _ = writeln!(s, "    {k},");
    }
    s.push_str("}\n\nimpl Kernel {\n    pub const ALL: &'static [Kernel] = &[");
    for (_, k) in &all {
        let _ = write!(s, "Kernel::{k}, ");
    }
    s.push_str("];\n    pub const fn name(self) -> &'static str {\n        match self {\n");
    for (_, k) in &all {
        let _ = writeln!(s, "            Kernel::{k} => \"{k}\",");
    }
    s.push_str("        }\n    }\n    /// Index into [`MODULES`].\n    pub const fn module(self) -> usize {\n        match self {\n");
    for (i, k) in &all {
        let _ = writeln!(s, "            Kernel::{k} => {i},");
    }
    s.push_str("        }\n    }\n    /// Whether inference launches it (a build without `train` embeds only these).\n    pub const fn for_inference(self) -> bool {\n        match self {\n");
    for (i, k) in &all {
        let _ = writeln!(s, "            Kernel::{k} => {},", !training_only(&modules[*i].name, k));
    }
    s.push_str("        }\n    }\n    /// Whether this build compiled it for the GPU (embedded, or as source for run-time NVRTC).\n    pub const fn in_gpu_build(self) -> bool {\n        match self {\n");
    for (i, k) in &all {
        let _ = writeln!(s, "            Kernel::{k} => {},", modules[*i].gpu_kernels.contains(k));
    }
    s.push_str("        }\n    }\n}\n\n");
    s.push_str("pub static MODULES: &[ModuleInfo] = &[\n");
    for m in modules {
        let _ = write!(
            s,
            "    ModuleInfo {{ name: \"{n}\", source: include_str!(concat!(env!(\"OUT_DIR\"), \"/{n}.cu\")), \
             ptx: include_bytes!(concat!(env!(\"OUT_DIR\"), \"/{n}.ptx.z\")), cubins: &[",
            n = m.name
        );
        for a in CUBIN_ARCHS {
            let _ = write!(s, "({a}, include_bytes!(concat!(env!(\"OUT_DIR\"), \"/{}.sm_{a}.cubin.z\"))), ", m.name);
        }
        s.push_str("] },\n");
    }
    s.push_str("];\n\npub static RESOURCES: &[KernelResources] = &[\n");
    for r in res {
        let _ = writeln!(
            s,
            "    KernelResources {{ kernel: \"{}\", arch: {}, registers: {}, smem_bytes: {}, stack_bytes: {}, \
             spill_stores: {}, spill_loads: {} }},",
            r.kernel, r.arch, r.registers, r.smem, r.stack, r.spill_stores, r.spill_loads
        );
    }
    s.push_str("];\n\n");
    let _ = writeln!(s, "/// NVRTC version that compiled the embedded CUBINs, or None (run-time compile).");
    match nvrtc {
        Some(v) => {
            let _ = writeln!(s, "pub const NVRTC_AT_BUILD: Option<&str> = Some(\"{v}\");");
        }
        None => s.push_str("pub const NVRTC_AT_BUILD: Option<&str> = None;\n"),
    }
    let _ = writeln!(s, "pub const PTX_ARCH: u32 = {PTX_ARCH};\n");
    s.push_str(
        "#[cfg(feature = \"emu\")]\nmod emu_symbols {\n    use crate::device::emu::EmuLaunchFn;\n    extern \"C\" {\n",
    );
    for (_, k) in &all {
        let _ = writeln!(
            s,
            "        pub fn reclmis_emu_{k}(cfg: *const crate::device::emu::EmuLaunchCfg, args: *mut *mut core::ffi::c_void, err: *mut core::ffi::c_char, errlen: usize) -> i32;"
        );
    }
    s.push_str("    }\n    pub fn entry(k: super::Kernel) -> EmuLaunchFn {\n        match k {\n");
    for (_, k) in &all {
        let _ = writeln!(s, "            super::Kernel::{k} => reclmis_emu_{k},");
    }
    s.push_str("        }\n    }\n}\n#[cfg(feature = \"emu\")]\npub(crate) use emu_symbols::entry as emu_entry;\n");
    fs::write(out.join("kernels_generated.rs"), s).unwrap();
}

#[path = "src/device/nvrtc_compile.rs"]
#[allow(dead_code)]
mod nvrtc_compile;

mod nvrtc {
    use super::nvrtc_compile::{load_nvrtc, nvrtc_compile};
    use super::*;

    pub struct Nvrtc {
        pub version: String,
        include_dir: Option<String>,
    }

    impl Nvrtc {
        pub fn load() -> Result<Nvrtc, String> {
            if env::var_os("NVRTC_LIB_DIR").is_none() {
                if let Some(home) = env::var_os("HOME") {
                    // where .ci/run and ../shared/gpu/bundle.sh keep the pinned wheel
                    let d =
                        PathBuf::from(home).join(".cache/reclmis-nvrtc/lib/python3.11/site-packages/nvidia/cu13/lib");
                    if d.exists() {
                        env::set_var("NVRTC_LIB_DIR", d);
                    }
                }
            }
            let version = load_nvrtc()?;
            let include_dir = env::var("NVRTC_INCLUDE_DIR").ok();
            Ok(Nvrtc { version, include_dir })
        }

        fn compile(&self, m: &Module, arch: &str, verbose: bool) -> Result<(Vec<u8>, String), String> {
            nvrtc_compile(&m.gpu, &format!("{}.cu", m.name), arch, verbose, self.include_dir.as_deref())
        }

        pub fn compile_module(&self, m: &Module, out: &Path) -> Vec<Resources> {
            let mut res = Vec::new();
            for a in CUBIN_ARCHS {
                let (cubin, log) = self
                    .compile(m, &format!("sm_{a}"), true)
                    .unwrap_or_else(|log| panic!("NVRTC failed on kernels/{}.cu for sm_{a}:\n{log}", m.name));
                fs::write(out.join(format!("{}.sm_{a}.cubin", m.name)), cubin).unwrap();
                fs::write(out.join(format!("{}.sm_{a}.log", m.name)), &log).unwrap();
                let parsed = parse_ptxas(&log, a);
                for k in &m.gpu_kernels {
                    let r = parsed.iter().find(|r| &r.kernel == k).cloned();
                    res.push(r.unwrap_or_else(|| panic!("ptxas report has no entry for {k} (sm_{a}):\n{log}")));
                }
            }
            let (ptx, _) = self
                .compile(m, &format!("compute_{PTX_ARCH}"), false)
                .unwrap_or_else(|log| panic!("NVRTC failed on kernels/{}.cu (PTX):\n{log}", m.name));
            fs::write(out.join(format!("{}.ptx", m.name)), ptx).unwrap();
            res
        }
    }

    fn num_before(s: &str, key: &str) -> Option<u32> {
        let i = s.find(key)?;
        s[..i].split_whitespace().last()?.parse().ok()
    }

    /// ptxas -v reports, per entry function:
    ///   ptxas info : Compiling entry function 'k' for 'sm_80'
    ///   ptxas info : Function properties for k
    ///       0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
    ///   ptxas info : Used 40 registers, used 1 barriers, 8704 bytes smem, 400 bytes cmem[0]
    pub(super) fn parse_ptxas(log: &str, arch: u32) -> Vec<Resources> {
        let mut out: Vec<Resources> = Vec::new();
        let mut cur: Option<usize> = None;
        for line in log.lines() {
            if let Some(i) = line.find("Compiling entry function '") {
                let name = line[i + 26..].split('\'').next().unwrap().to_string();
                out.push(Resources { kernel: name, arch, ..Default::default() });
                cur = Some(out.len() - 1);
                continue;
            }
            let Some(c) = cur else { continue };
            let r = &mut out[c];
            if line.contains("bytes stack frame") {
                r.stack = num_before(line, "bytes stack frame").unwrap_or(0);
                r.spill_stores = num_before(line, "bytes spill stores").unwrap_or(0);
                r.spill_loads = num_before(line, "bytes spill loads").unwrap_or(0);
            }
            if line.contains("Used ") && line.contains("registers") {
                r.registers = num_before(line, "registers").unwrap_or(0);
                r.smem = num_before(line, "bytes smem").unwrap_or(0);
            }
        }
        out
    }
}
