//! The PLAM skip gate (1×1 convolutions, channel mean and max, the 3→6→1 MLP, the gating) forward
//! and backward on cpu, emu and cuda, against the f64 reference and its finite differences.

mod common;
use common::*;
use proptest::prelude::*;
use reclmis::ops::gemm::GemmAlgo;
use reclmis::ops::plam::{self, reference, PlamWeights};
use reclmis::testing::{mismatch, EPS32};
use reclmis::Device;

fn check_plam(dev: &Device, b: usize, c: usize, h: usize, w: usize, seed: u64) -> Result<(), TestCaseError> {
    let hw = h * w;
    let s = values(b * c * hw, seed, false);
    let (wa, wm) = (values(c * c, seed ^ 1, false), values(c * c, seed ^ 2, false));
    let (f1w, f1b, f2w) = (values(18, seed ^ 3, false), values(6, seed ^ 4, false), values(6, seed ^ 5, false));
    let f2b = values(1, seed ^ 6, false);
    let dout = values(b * c * hw, seed ^ 7, false);
    let t = |v: &[f32], sh: &[usize]| tensor(v, sh, dev);
    let (wat, wmt) = (t(&wa, &[c, c, 1, 1]), t(&wm, &[c, c, 1, 1]));
    let (f1wt, f1bt, f2wt, f2bt) = (t(&f1w, &[6, 3]), t(&f1b, &[6]), t(&f2w, &[1, 6]), t(&f2b, &[1]));
    let wts = PlamWeights { w_avg: &wat, w_max: &wmt, fc1_w: &f1wt, fc1_b: &f1bt, fc2_w: &f2wt, fc2_b: &f2bt };
    let st = t(&s, &[b, c, h, w]);
    let algo = if dev.is_gpu_like() { GemmAlgo::Tiled } else { GemmAlgo::Auto };
    let f = plam::plam_gate(&st, &wts, algo).unwrap();
    let all: Vec<Vec<f64>> = [&s, &wa, &wm, &f1w, &f1b, &f2w, &f2b].iter().map(|v| f64s(v)).collect();
    let run = |p: &[Vec<f64>]| reference::plam(&p[0], &p[1], &p[2], &p[3], &p[4], &p[5], p[6][0], b, c, hw);
    let want = run(&all);
    // Finite differences and f32-vs-f64 comparisons are meaningless within rounding distance of a
    // ReLU kink or a tie in the channel max; such draws are skipped (about 1 in 1000).
    let margin = reference::kink_margin(&all[0], &all[1], &all[2], &all[3], &all[4], b, c, hw);
    prop_assume!(margin > 1e-3);
    let scale = want.iter().fold(1e-6f64, |m, v| m.max(v.abs()));
    // a chain of f32 dot products over C channels and the 6-wide MLP, whose sums can cancel
    let tol = 64.0 * (c as f64 + 16.0) * EPS32;
    assert_none("out", mismatch(&f.out.to_vec().unwrap(), &want, tol * scale, 0.0))?;
    // the inference path (the cpu's blocked products and gate; elsewhere the same kernels)
    let inf = plam::plam_gate_infer(&st, &wts, algo).unwrap().to_vec().unwrap();
    assert_none("inference out", mismatch(&inf, &want, tol * scale, 0.0))?;
    let dot = t(&dout, &[b, c, h, w]);
    let g = plam::plam_gate_backward(&st, &wts, f.clone(), &dot, algo).unwrap();
    // the backward writes dA and dM over a and m when it owns them, and copies a forward its
    // caller still shares: a second backward of the shared forward, and one that owns it, give
    // the same gradients bit for bit (an in-place write into the shared a or m would not)
    let grads = |g: &plam::PlamGrads| [&g.ds, &g.dw_avg, &g.dw_max, &g.dfc1_w].map(|t| t.to_vec().unwrap());
    let again = plam::plam_gate_backward(&st, &wts, f.clone(), &dot, algo).unwrap();
    prop_assert_eq!(grads(&g), grads(&again), "a second backward of a shared forward");
    let owned = plam::plam_gate_backward(&st, &wts, f, &dot, algo).unwrap();
    prop_assert_eq!(grads(&g), grads(&owned), "the backward that owns its forward");
    let dy = f64s(&dout);
    let loss = |p: &[Vec<f64>]| -> f64 { run(p).iter().zip(&dy).map(|(a, b)| a * b).sum() };
    let names = ["ds", "dw_avg", "dw_max", "dfc1_w", "dfc1_b", "dfc2_w", "dfc2_b"];
    let got = [&g.ds, &g.dw_avg, &g.dw_max, &g.dfc1_w, &g.dfc1_b, &g.dfc2_w, &g.dfc2_b];
    for (k, (name, gt)) in names.iter().zip(got).enumerate() {
        let fd: Vec<f64> = (0..all[k].len())
            .map(|j| {
                let mut p = all.clone();
                p[k][j] += 1e-6;
                let up = loss(&p);
                p[k][j] -= 2e-6;
                (up - loss(&p)) / 2e-6
            })
            .collect();
        let sc = fd.iter().fold(1e-6f64, |m, v| m.max(v.abs()));
        // f32 backward through two GEMM layers, the MLP and the pixel sums (B·H·W terms)
        assert_none(
            name,
            mismatch(&gt.to_vec().unwrap(), &fd, 1e-3 * sc * (1.0 + ((b * hw) as f64).sqrt() / 4.0), 0.0),
        )?;
    }
    Ok(())
}

per_device!(check_plam, (b in 1usize..3, c in prop::sample::select(vec![1usize, 3, 8]), h in prop::sample::select(vec![1usize, 3, 5]), w in prop::sample::select(vec![1usize, 2, 4]), seed in any::<u64>()));

#[test]
fn wrong_parameter_shapes_name_the_parameter() {
    let dev = Device::Cpu;
    let s = tensor(&[0.0; 8], &[1, 2, 2, 2], &dev);
    let w = tensor(&[0.0; 4], &[2, 2, 1, 1], &dev);
    let bad = tensor(&[0.0; 6], &[2, 3], &dev);
    let (b6, w16, b1) = (tensor(&[0.0; 6], &[6], &dev), tensor(&[0.0; 6], &[1, 6], &dev), tensor(&[0.0], &[1], &dev));
    let wts = PlamWeights { w_avg: &w, w_max: &w, fc1_w: &bad, fc1_b: &b6, fc2_w: &w16, fc2_b: &b1 };
    let e = plam::plam_gate(&s, &wts, GemmAlgo::Auto).err().unwrap().to_string();
    assert!(e.contains("bottleneck.0.weight"), "{e}");
}

/// Maps larger than the cpu's pixel ranges (4,096 pixels per task), two images: the cpu's split
/// over ranges and rows (ranges straddle the images in the backward's flat pixel order) against
/// the f64 forward and against the emu kernels' backward, which split nothing the same way.
/// The 1×1 convolutions are identities, so that both devices gate exactly the same A and M (over
/// ten thousand pixels some sit at a ReLU kink or a near-tie of the channel max, where two
/// roundings of A or M would pick different branches). Bounds: the forward's as in
/// `check_plam` (it is continuous: no kink margin needed); the gradients' as its
/// finite-difference bound with a tenth of the slack (two f32 computations in different orders).
#[test]
fn large_maps_split_over_threads_match() {
    let (b, c, h, w) = (2usize, 3usize, 70usize, 71usize);
    let hw = h * w;
    let s = values(b * c * hw, 11, false);
    let eye: Vec<f32> = (0..c * c).map(|i| (i % (c + 1) == 0) as u8 as f32).collect();
    let (wa, wm) = (eye.clone(), eye);
    let (f1w, f1b, f2w, f2b) =
        (values(18, 14, false), values(6, 15, false), values(6, 16, false), values(1, 17, false));
    let dout = values(b * c * hw, 18, false);
    let run = |dev: &Device| {
        let t = |v: &[f32], sh: &[usize]| tensor(v, sh, dev);
        let (wat, wmt) = (t(&wa, &[c, c, 1, 1]), t(&wm, &[c, c, 1, 1]));
        let (f1wt, f1bt, f2wt, f2bt) = (t(&f1w, &[6, 3]), t(&f1b, &[6]), t(&f2w, &[1, 6]), t(&f2b, &[1]));
        let wts = PlamWeights { w_avg: &wat, w_max: &wmt, fc1_w: &f1wt, fc1_b: &f1bt, fc2_w: &f2wt, fc2_b: &f2bt };
        let st = t(&s, &[b, c, h, w]);
        let algo = if dev.is_gpu_like() { GemmAlgo::Tiled } else { GemmAlgo::Auto };
        let f = plam::plam_gate(&st, &wts, algo).unwrap();
        let out = f.out.to_vec().unwrap();
        let g = plam::plam_gate_backward(&st, &wts, f, &t(&dout, &[b, c, h, w]), algo).unwrap();
        let grads =
            [&g.ds, &g.dw_avg, &g.dw_max, &g.dfc1_w, &g.dfc1_b, &g.dfc2_w, &g.dfc2_b].map(|t| t.to_vec().unwrap());
        (out, grads)
    };
    let (cpu_out, cpu_g) = run(&device("cpu"));
    let (_, emu_g) = run(&device("emu"));
    let all: Vec<Vec<f64>> = [&s, &wa, &wm, &f1w, &f1b, &f2w, &f2b].iter().map(|v| f64s(v)).collect();
    let want = reference::plam(&all[0], &all[1], &all[2], &all[3], &all[4], &all[5], all[6][0], b, c, hw);
    let scale = want.iter().fold(1e-6f64, |m, v| m.max(v.abs()));
    assert_eq!(mismatch(&cpu_out, &want, 64.0 * (c as f64 + 16.0) * EPS32 * scale, 0.0), None, "out");
    let names = ["ds", "dw_avg", "dw_max", "dfc1_w", "dfc1_b", "dfc2_w", "dfc2_b"];
    for ((name, got), e) in names.iter().zip(&cpu_g).zip(&emu_g) {
        let sc = e.iter().fold(1e-6f64, |m, v| m.max(v.abs() as f64));
        let tol = 1e-4 * sc * (1.0 + ((b * hw) as f64).sqrt() / 4.0);
        assert_eq!(mismatch(got, &f64s(e), tol, 0.0), None, "{name}");
    }
}

/// The inference gate at a width whose pixel blocks (96 pixels at C 300) are smaller than the
/// tasks' pixel ranges, with a partial last block and range, against the f64 forward (bound as
/// `check_plam`'s; the forward is continuous, so no kink margin is needed).
#[test]
fn inference_gate_in_blocks_matches_the_reference() {
    let (b, c, h, w) = (2usize, 300usize, 20usize, 23usize);
    let hw = h * w;
    let s = values(b * c * hw, 21, false);
    let (wa, wm) = (values(c * c, 22, false), values(c * c, 23, false));
    let (f1w, f1b, f2w, f2b) =
        (values(18, 24, false), values(6, 25, false), values(6, 26, false), values(1, 27, false));
    let dev = device("cpu");
    let t = |v: &[f32], sh: &[usize]| tensor(v, sh, &dev);
    let (wat, wmt) = (t(&wa, &[c, c, 1, 1]), t(&wm, &[c, c, 1, 1]));
    let (f1wt, f1bt, f2wt, f2bt) = (t(&f1w, &[6, 3]), t(&f1b, &[6]), t(&f2w, &[1, 6]), t(&f2b, &[1]));
    let wts = PlamWeights { w_avg: &wat, w_max: &wmt, fc1_w: &f1wt, fc1_b: &f1bt, fc2_w: &f2wt, fc2_b: &f2bt };
    let got = plam::plam_gate_infer(&t(&s, &[b, c, h, w]), &wts, GemmAlgo::Auto).unwrap().to_vec().unwrap();
    let all: Vec<Vec<f64>> = [&s, &wa, &wm, &f1w, &f1b, &f2w, &f2b].iter().map(|v| f64s(v)).collect();
    let want = reference::plam(&all[0], &all[1], &all[2], &all[3], &all[4], &all[5], all[6][0], b, c, hw);
    let scale = want.iter().fold(1e-6f64, |m, v| m.max(v.abs()));
    assert_eq!(mismatch(&got, &want, 64.0 * (c as f64 + 16.0) * EPS32 * scale, 0.0), None);
}
