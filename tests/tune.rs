//! Autotuning (`ops::tune`): a tuned convolution returns exactly the result of the candidate it
//! chose, every candidate agrees with the others within the Winograd bound, the choice is cached
//! and read back, and a corrupt or foreign cache is refused by the reader and, in a process,
//! ignored with a warning and left as it was. One function: the mode and the cache are per
//! process.

use reclmis::ops::conv::{self, cpu, winograd, ConvShape};
use reclmis::ops::tune::{self, Mode};
use reclmis::{Device, Tensor};
use std::process::Command;

fn tmp(name: &str) -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!("reclmis-tune-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

#[test]
fn tuning_chooses_caches_and_refuses_bad_caches() {
    let dir = tmp("lib");
    // SAFETY (edition 2024 asks): set before any thread of this test process reads it
    unsafe { std::env::set_var("RECLMIS_TUNE_CACHE", &dir) };
    tune::set_mode(Mode::On);
    let s = ConvShape { b: 1, ci: 32, co: 48, h: 20, w: 12, kh: 3, kw: 3 };
    let mut rng = reclmis::testing::Rng::new(3);
    let xv: Vec<f32> = (0..s.b * s.ci * s.h * s.w).map(|_| rng.uniform(-1.0, 1.0)).collect();
    let wv: Vec<f32> = (0..s.co * s.ci * 9).map(|_| rng.uniform(-0.2, 0.2)).collect();
    let bv: Vec<f32> = (0..s.co).map(|_| rng.uniform(-0.5, 0.5)).collect();
    let x = Tensor::from_vec(xv.clone(), &[s.b, s.ci, s.h, s.w], &Device::Cpu).unwrap();
    let w = Tensor::from_vec(wv.clone(), &[s.co, s.ci, 3, 3], &Device::Cpu).unwrap();
    let b = Tensor::from_vec(bv.clone(), &[s.co], &Device::Cpu).unwrap();
    let y = conv::conv2d(&x, &w, Some(&b), reclmis::ops::gemm::GemmAlgo::Auto).unwrap().to_vec().unwrap();
    let key = "conv2d b1 ci32 co48 20x12 k3x3";
    let chosen = tune::choice(key).expect("the first call tunes the shape");
    let wino_with =
        |tiles| winograd::conv2d_new_banded(tiles, &[&xv], (&wv, s.ci * 9), None, Some(&bv), &s, winograd::BAND_FLOATS);
    let (wino, wino4) = (wino_with(winograd::Tiles::F2), wino_with(winograd::Tiles::F4));
    let im2col = cpu::conv2d_im2col(&xv, &wv, Some(&bv), &s);
    let want = match chosen.as_str() {
        "winograd" => &wino,
        "winograd4" => &wino4,
        "im2col" => &im2col,
        other => panic!("unknown candidate {other}"),
    };
    assert_eq!(&y, want, "the tuned result is the chosen candidate's, bit for bit");
    // the candidates agree to Winograd's rounding: |y| is O(1) here and the transforms'
    // magnitudes a few units (F(4×4)'s up to a few tens), so 1e-4 is ~100 f32 roundings of
    // F(2×2)'s magnitude (the op's own tests bound each against its own magnitude)
    for (a, c) in wino.iter().chain(&wino4).zip(im2col.iter().chain(&im2col)) {
        assert!((a - c).abs() <= 1e-4 * (1.0 + c.abs()), "{a} vs {c}");
    }
    // the split variants (timed by `exhaustive` only): Winograd's give its result bit for bit,
    // im2col's within summation rounding, on a map where they change the number of bands (Winograd 2 -> 8 and 1, im2col 10 -> 64
    // and 3)
    let sb = ConvShape { b: 1, ci: 64, co: 64, h: 64, w: 64, kh: 3, kw: 3 };
    let xb =
        Tensor::from_vec((0..64 * 64 * 64).map(|_| rng.uniform(-1.0, 1.0)).collect(), &[1, 64, 64, 64], &Device::Cpu)
            .unwrap();
    let wb =
        Tensor::from_vec((0..64 * 64 * 9).map(|_| rng.uniform(-0.2, 0.2)).collect(), &[64, 64, 3, 3], &Device::Cpu)
            .unwrap();
    let by = |name: &'static str| {
        tune::with_candidate(name, || {
            conv::conv2d(&xb, &wb, None, reclmis::ops::gemm::GemmAlgo::Auto).unwrap().to_vec().unwrap()
        })
    };
    let base = [by("winograd"), by("im2col")];
    assert!(base[0] != base[1], "the two algorithms round differently: forcing a candidate is seen");
    // (F(4×4, 3×3), "winograd4", is another algorithm, not a split: checked above)
    for name in conv::CPU_FWD_NAMES.into_iter().filter(|n| *n != "winograd4") {
        let (algo, got) = (usize::from(name.starts_with("im2col")), by(name));
        if algo == 0 {
            assert!(got == base[0], "{name} is Winograd's result bit for bit ({sb:?})");
        } else {
            // the GEMM library blocks its sum by the band's width: the same terms, another order,
            // so within f32 summation rounding of Σ|x||w| <= depth·0.2 (depth 576: γ_576 bound)
            let bound = 576.0 * f32::EPSILON * 576.0 * 0.2;
            for (a, c) in got.iter().zip(&base[1]) {
                assert!((a - c).abs() <= bound, "{name}: {a} vs {c}");
            }
        }
    }

    // `exhaustive` times the variants too; the result is the chosen one's
    tune::set_mode(Mode::Exhaustive);
    let y_ex = conv::conv2d(&xb, &wb, None, reclmis::ops::gemm::GemmAlgo::Auto).unwrap().to_vec().unwrap();
    let chosen_ex = tune::choice("conv2d b1 ci64 co64 64x64 k3x3").expect("tuned");
    assert!(conv::CPU_FWD_NAMES.contains(&chosen_ex.as_str()), "{chosen_ex}");
    let named: &'static str = conv::CPU_FWD_NAMES.iter().find(|n| **n == chosen_ex).unwrap();
    assert!(y_ex == by(named), "the exhaustively tuned result is {chosen_ex}'s");
    tune::set_mode(Mode::On);

    // the second call reads the choice
    let again = conv::conv2d(&x, &w, Some(&b), reclmis::ops::gemm::GemmAlgo::Auto).unwrap().to_vec().unwrap();
    assert_eq!(again, y);
    let path = tune::cache_path().unwrap();
    assert!(path.starts_with(&dir));
    assert_eq!(tune::read_cache(&path).unwrap().get(key), Some(&chosen), "the cache round-trips");

    // a Linear of few rows: the register tiles or the GEMM, whichever was faster; the result is
    // the chosen candidate's bit for bit, and the two agree within k f32 roundings of the
    // terms' magnitudes (|x|, |w| <= 1: at most k)
    let (rows, k, n) = (40usize, 64usize, 48usize);
    let xl: Vec<f32> = (0..rows * k).map(|_| rng.uniform(-1.0, 1.0)).collect();
    let wl: Vec<f32> = (0..n * k).map(|_| rng.uniform(-1.0, 1.0)).collect();
    let bl: Vec<f32> = (0..n).map(|_| rng.uniform(-1.0, 1.0)).collect();
    let t = |v: &[f32], sh: &[usize]| Tensor::from_vec(v.to_vec(), sh, &Device::Cpu).unwrap();
    let lin = || {
        reclmis::ops::gemm::linear::linear(
            &t(&xl, &[rows, k]),
            &t(&wl, &[n, k]),
            Some(&t(&bl, &[n])),
            Default::default(),
        )
        .unwrap()
        .to_vec()
        .unwrap()
    };
    let yl = lin();
    let chosen_l = tune::choice("linear rows40 k64 n48").expect("the first call tunes the Linear");
    let few = reclmis::ops::gemm::cpu::linear_few_rows(&xl, &wl, Some(&bl), rows, k, n);
    let (plan, _) = reclmis::ops::gemm::plan(&[rows, k], &[n, k], false, true).unwrap();
    let packed = reclmis::ops::gemm::cpu::gemm(&xl, &wl, &plan, 1.0, Some(&bl));
    let want_l = match chosen_l.as_str() {
        "few_rows" => &few,
        "gemm" => &packed,
        other => panic!("unknown candidate {other}"),
    };
    assert_eq!(&yl, want_l, "the tuned Linear is the chosen candidate's, bit for bit");
    for (a, c) in few.iter().zip(&packed) {
        assert!((a - c).abs() <= k as f32 * f32::EPSILON * (k as f32 + 1.0), "{a} vs {c}");
    }
    assert_eq!(lin(), yl, "the second call reads the choice");

    // the reader refuses what it cannot use
    let bad = dir.join("bad.json");
    std::fs::write(&bad, b"{\"version\": 1, \"machine\":").unwrap();
    assert!(tune::read_cache(&bad).unwrap_err().contains("not a tuning cache"));
    let foreign = r#"{"version": 1, "machine": "another cpu; 64 threads", "build": "x", "choices": {}}"#;
    std::fs::write(&bad, foreign).unwrap();
    assert!(tune::read_cache(&bad).unwrap_err().contains("written for machine"));

    // a process: `--tune on` writes its cache (convolutions and their weight gradients); a
    // corrupt cache is ignored with a warning and left untouched
    let cli_dir = tmp("cli");
    let run = || {
        Command::new(env!("CARGO_BIN_EXE_reclmis"))
            .args(["model", "--preset", "tiny", "--flops", "--tune", "on"])
            .env("RECLMIS_TUNE_CACHE", &cli_dir)
            .output()
            .unwrap()
    };
    let o = run();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let files: Vec<_> = std::fs::read_dir(&cli_dir).unwrap().map(|e| e.unwrap().path()).collect();
    assert_eq!(files.len(), 1, "{files:?}");
    let text = std::fs::read_to_string(&files[0]).unwrap();
    assert!(text.contains("\"conv2d b1") && text.contains("conv2d_wgrad b1"), "{text}");
    std::fs::write(&files[0], b"garbage").unwrap();
    let o = run();
    assert!(o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("tuning cache") && err.contains("ignored"), "{err}");
    assert_eq!(std::fs::read(&files[0]).unwrap(), b"garbage", "left as it was");
    let bad_mode = Command::new(env!("CARGO_BIN_EXE_reclmis"))
        .args(["model", "--preset", "tiny", "--tune", "fast"])
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&bad_mode.stderr).contains("off, on or exhaustive"));
    let _ = std::fs::remove_dir_all(&dir);
    let _ = std::fs::remove_dir_all(&cli_dir);
}
