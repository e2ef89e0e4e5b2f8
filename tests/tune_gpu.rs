//! Autotuning of the GPU kernels (`ops::tune::pick_on`), run on the emu device (the CUDA source
//! itself; its timings time the emulation, so which candidate wins says nothing, but everything
//! else is what a GPU does): where tf32 is allowed the f32 GEMM, the convolution and its weight
//! gradient choose between the tf32 tensor cores and the exact FMA kernels (and the weight
//! gradient between two split-K depths), the bf16 GEMM between its two pipelined tiles. A tuned
//! result is the chosen candidate's bit for bit (the winner runs again when it was not the last
//! one timed: an op writing into its output buffer keeps the last run's values), the candidates
//! agree within tf32's bound, the choices are keyed by the device and reach the cache. One
//! function: the mode and the cache are per process.
#![cfg(feature = "emu")]

use reclmis::ops::conv;
use reclmis::ops::gemm::{self, GemmAlgo, GemmOpts};
use reclmis::ops::tune::{self, Mode};
use reclmis::{DType, Device, Tensor};

/// tf32 keeps 10 of f32's 23 mantissa bits: an operand rounded to tf32 is within 2^-10 of itself
/// relatively (2^-11 when rounded to nearest; 2^-10 also covers truncation), so a product is
/// within about 2·2^-10 and the f32 sum of k of them adds k·2^-24 (γ_k), all relative to Σ|a||b|.
fn tf32_bound(k: usize) -> f64 {
    2.0 * (2.0f64).powi(-10) + (k as f64 + 2.0) * (2.0f64).powi(-24)
}

fn random(n: usize, seed: u64, scale: f32) -> Vec<f32> {
    let mut rng = reclmis::testing::Rng::new(seed);
    (0..n).map(|_| rng.uniform(-scale, scale)).collect()
}

/// The op's result with every candidate in `names` forced, by name.
fn each<'a>(names: &[&'static str], f: impl Fn() -> Vec<f32> + 'a) -> Vec<(&'static str, Vec<f32>)> {
    names.iter().map(|&n| (n, tune::with_candidate(n, &f))).collect()
}

/// The single cache entry whose key starts with `prefix`.
fn chosen(prefix: &str) -> String {
    let path = tune::cache_path().unwrap();
    let choices = tune::read_cache(&path).unwrap();
    let hits: Vec<_> = choices.iter().filter(|(k, _)| k.starts_with(prefix)).collect();
    assert_eq!(hits.len(), 1, "one {prefix} entry in {choices:?}");
    hits[0].1.clone()
}

/// The cache folder of this process, set once before any tuning reads it.
fn setup() -> std::path::PathBuf {
    static DIR: std::sync::OnceLock<std::path::PathBuf> = std::sync::OnceLock::new();
    DIR.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("reclmis-tune-gpu-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        // SAFETY (edition 2024 asks): set once, before any thread of this process reads it
        unsafe { std::env::set_var("RECLMIS_TUNE_CACHE", &dir) };
        tune::set_mode(Mode::On);
        dir
    })
    .clone()
}

#[test]
fn gpu_kernels_tune_per_shape_and_device() {
    let dir = setup();
    tuned_kernels(&Device::emu().unwrap(), "emu | ");

    // an op that writes into a buffer keeps the winner's values: here the heuristic candidate
    // (timed first) is the fast one and the slow one runs last, so without running the winner
    // again the buffer would hold the slow one's value (a 50 ms sleep against none: the order
    // holds on any machine)
    let out = std::cell::Cell::new(usize::MAX);
    let r: Result<(), reclmis::Error> = tune::pick_on(
        &Device::Cpu,
        || "buffer test".into(),
        &["fast", "slow"],
        0,
        |i| {
            if i == 1 {
                std::thread::sleep(std::time::Duration::from_millis(50));
            }
            out.set(i);
            Ok(())
        },
    );
    r.unwrap();
    assert_eq!(chosen("cpu "), "fast");
    assert_eq!(out.get(), 0, "the buffer holds the winner's result");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn cuda_kernels_tune_per_shape_and_device() {
    setup();
    let dev = Device::cuda(0).unwrap();
    tuned_kernels(&dev, &format!("{} | ", dev.tune_identity()));
}

/// Tunes each kernel family on `dev` (its cache keys start with `prefix`) and checks the result.
fn tuned_kernels(dev: &Device, prefix: &str) {
    let dev = dev.clone();
    let chosen = |what: &str| chosen(&format!("{prefix}{what}"));
    let t = |v: &[f32], sh: &[usize]| Tensor::from_vec(v.to_vec(), sh, &dev).unwrap();

    // f32 GEMM where tf32 is allowed (GemmAlgo::TensorCore): k deep enough that the two
    // kernels' results differ, so forcing a candidate is seen; m and n odd, so that the operands
    // are not whole 16-byte chunks (the pipelined tf32 kernels' shapes come below)
    let (m, k, n) = (41usize, 72usize, 57usize);
    let (av, bv) = (random(m * k, 1, 1.0), random(k * n, 2, 1.0));
    let (a, b) = (t(&av, &[m, k]), t(&bv, &[k, n]));
    let tc = GemmOpts { algo: GemmAlgo::TensorCore, ..Default::default() };
    let mm = || gemm::matmul(&a, &b, tc).unwrap().to_vec().unwrap();
    let y = mm();
    let pick = chosen("gemm_f32");
    let cands = each(&gemm::F32_NAMES, mm);
    assert!(cands[0].1 != cands[1].1, "tf32 and exact f32 differ at k = {k}");
    let want = &cands.iter().find(|c| c.0 == pick).expect("a candidate's name").1;
    assert_eq!(&y, want, "the tuned GEMM is {pick}'s, bit for bit");
    assert_eq!(mm(), y, "the second call reads the choice");
    for i in 0..m {
        for j in 0..n {
            let mag: f64 = (0..k).map(|p| (av[i * k + p] as f64 * bv[p * n + j] as f64).abs()).sum();
            let (x, z) = (cands[0].1[i * n + j] as f64, cands[1].1[i * n + j] as f64);
            assert!((x - z).abs() <= tf32_bound(k) * mag, "C[{i},{j}]: {x} vs {z}");
        }
    }

    // tf32 GEMM on whole 16-byte chunks (builds with autocast): the pipelined kernels' two tiles
    // and the element-loading tf32 kernel sum in the same order (the same C bit for bit)
    if cfg!(feature = "autocast") {
        let (m, k, n) = (40usize, 72usize, 56usize);
        let (a, b) = (t(&random(m * k, 11, 1.0), &[m, k]), t(&random(k * n, 12, 1.0), &[k, n]));
        let mm = || gemm::matmul(&a, &b, tc).unwrap().to_vec().unwrap();
        let y = mm();
        let pick = chosen("gemm_tf32_pipe");
        let cands = each(&gemm::TF32_PIPE_NAMES, mm);
        assert!(cands[0].1 == cands[1].1 && cands[1].1 == cands[2].1, "pipe128, pipe64 and tf32_mma agree");
        assert!(cands[2].1 != cands[3].1, "tf32 and exact f32 differ at k = {k}");
        assert_eq!(&y, &cands.iter().find(|c| c.0 == pick).unwrap().1, "the tuned GEMM is {pick}'s");
    }

    // bf16 GEMM, sizes in whole 16-byte chunks: the 128 or the 64 tile of the pipelined kernel;
    // they sum each element's k in the same order, so they agree bit for bit
    let (m, k, n) = (136usize, 40usize, 72usize);
    let bf = |v: Vec<f32>, sh: &[usize]| reclmis::ops::cast::cast(&t(&v, sh), DType::BF16).unwrap();
    let (a, b) = (bf(random(m * k, 3, 1.0), &[m, k]), bf(random(k * n, 4, 1.0), &[k, n]));
    let mm = || {
        let c = gemm::matmul(&a, &b, GemmOpts::default()).unwrap();
        reclmis::ops::cast::cast(&c, DType::F32).unwrap().to_vec().unwrap()
    };
    let y = mm();
    let pick = chosen("gemm_bf16");
    let cands = each(&gemm::PIPE_NAMES, mm);
    assert!(cands[0].1 == cands[1].1, "the two tiles agree bit for bit");
    assert_eq!(y, cands[0].1, "the tuned bf16 GEMM ({pick}) is the kernels'");

    // the convolution at tf32, 6 input channels: not whole 16-byte chunks, the element-loading
    // kernels (the pipelined ones below)
    let s = conv::ConvShape { b: 2, ci: 6, co: 20, h: 9, w: 7, kh: 3, kw: 3 };
    let (xv, wv) = (random(s.b * s.ci * s.h * s.w, 5, 1.0), random(s.co * s.ci * 9, 6, 1.0));
    let (x, w) = (t(&xv, &[s.b, s.ci, s.h, s.w]), t(&wv, &[s.co, s.ci, 3, 3]));
    let fwd = || conv::conv2d(&x, &w, None, GemmAlgo::TensorCore).unwrap().to_vec().unwrap();
    let y = fwd();
    let pick = chosen("conv2d_f32");
    let cands = each(&gemm::F32_NAMES, fwd);
    assert!(cands[0].1 != cands[1].1, "tf32 and exact f32 differ");
    assert_eq!(&y, &cands.iter().find(|c| c.0 == pick).unwrap().1, "the tuned convolution is {pick}'s");
    let depth = s.ci * 9;
    for (p, q) in cands[0].1.iter().zip(&cands[1].1) {
        // |x|, |w| <= 1: Σ|x||w| <= depth
        assert!(((p - q).abs() as f64) <= tf32_bound(depth) * depth as f64, "{p} vs {q}");
    }
    // 12 input channels (builds with autocast): the pipelined tf32 forward's two tiles, the same
    // sums bit for bit
    if cfg!(feature = "autocast") {
        let s = conv::ConvShape { ci: 12, ..s };
        let (x, w) = (
            t(&random(s.b * s.ci * s.h * s.w, 13, 1.0), &[s.b, 12, 9, 7]),
            t(&random(20 * 12 * 9, 14, 1.0), &[20, 12, 3, 3]),
        );
        let fwd = || conv::conv2d(&x, &w, None, GemmAlgo::TensorCore).unwrap().to_vec().unwrap();
        let y = fwd();
        let pick = chosen("conv2d_tf32_pipe");
        let cands = each(&conv::bf16::FWD_NAMES, fwd);
        assert!(cands[0].1 == cands[1].1, "the two tiles agree bit for bit");
        assert_eq!(y, cands[0].1, "the tuned convolution ({pick}) is the kernels'");
    }
    // the weight gradient on a map large enough that the finer split has more partial sums
    // (2·72² pixels: 648 16-pixel tiles against the heuristic's 256 splits); 3 input channels:
    // the element-loading kernels (the pipelined tf32 one takes its heuristic split, untuned)
    let s = conv::ConvShape { b: 2, ci: 3, co: 8, h: 72, w: 72, kh: 3, kw: 3 };
    let (xv, wv) = (random(s.b * s.ci * s.h * s.w, 8, 1.0), random(s.co * s.ci * 9, 9, 1.0));
    let dyv = random(s.b * s.co * s.h * s.w, 10, 1.0);
    let (x, w, dy) = (t(&xv, &[s.b, s.ci, s.h, s.w]), t(&wv, &[s.co, s.ci, 3, 3]), t(&dyv, &[s.b, s.co, s.h, s.w]));
    let dw = || {
        // dx's convolution is tuned as a forward of its own shape (ci and co swapped)
        let g = conv::conv2d_backward(&x, &w, &dy, false, GemmAlgo::TensorCore).unwrap();
        g.dw.to_vec().unwrap()
    };
    let got = dw();
    let pick = chosen("conv2d_wgrad_f32");
    let cands = each(&conv::WGRAD_NAMES, dw);
    assert_eq!(&got, &cands.iter().find(|c| c.0 == pick).unwrap().1, "the tuned weight gradient is {pick}'s");
    assert!(cands[0].1 != cands[2].1, "tf32 and exact differ");
    let terms = s.b * s.h * s.w;
    for c in &cands[1..] {
        for (p, q) in cands[0].1.iter().zip(&c.1) {
            // |x|, |dy| <= 1: Σ|x||dy| <= terms
            assert!(((p - q).abs() as f64) <= tf32_bound(terms) * terms as f64, "{}: {p} vs {q}", c.0);
        }
    }
}
