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
    // The magnitudes f32's errors scale with (`magnitudes`): the gate's terms can cancel, so its
    // value alone is no scale (b = c = h = w = 1 with seed 14313122428996508258 gave an output
    // of 0.0019 whose f32 error was 2.6 times the bound scaled by the output).
    let mags = magnitudes(&all, &f64s(&dout), b, c, hw);
    let scale = want.iter().zip(&mags[0]).fold(1e-6f64, |m, (v, g)| m.max(v.abs()).max(*g));
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
        let sc = fd.iter().chain(&mags[k + 1]).fold(1e-6f64, |m, v| m.max(v.abs()));
        // f32 backward through two GEMM layers, the MLP and the pixel sums (B·H·W terms), of
        // terms as large as the gradient's or its magnitudes
        assert_none(
            name,
            mismatch(&gt.to_vec().unwrap(), &fd, 1e-3 * sc * (1.0 + ((b * hw) as f64).sqrt() / 4.0), 0.0),
        )?;
    }
    Ok(())
}

/// The sums of absolute terms of the gate's output and of each gradient (the scale of their f32
/// rounding errors), from the f64 reference with exact convolutions: [out (g's magnitude · |s|),
/// ds, dw_avg, dw_max, dfc1_w, dfc1_b, dfc2_w, dfc2_b]. `p`: s, w_avg, w_max, fc1w, fc1b, fc2w,
/// fc2b.
fn magnitudes(p: &[Vec<f64>], dout: &[f64], b: usize, c: usize, hw: usize) -> Vec<Vec<f64>> {
    let (s, wa, wm, fc1w, fc1b, fc2w, fc2b) = (&p[0], &p[1], &p[2], &p[3], &p[4], &p[5], p[6][0]);
    let (a, m) = (conv_1x1(wa, s, b, c, hw, false), conv_1x1(wm, s, b, c, hw, false));
    let px = reference::gate(&a, &m, fc1w, fc1b, fc2w, fc2b, b, c, hw);
    // |features| from |A| and |M|, then the MLP's magnitude per pixel
    let (aa, ma) = (conv_1x1(wa, s, b, c, hw, true), conv_1x1(wm, s, b, c, hw, true));
    let gmag: Vec<f64> = (0..b * hw)
        .map(|q| {
            let (i, p) = (q / hw, q % hw);
            let f0 = (0..c).map(|ch| aa[(i * c + ch) * hw + p]).sum::<f64>() / c as f64;
            let f1 = (0..c).map(|ch| ma[(i * c + ch) * hw + p]).fold(0.0, f64::max);
            mlp_magnitude([f0, f1, f0 + f1], fc1w, fc1b, fc2w, fc2b)
        })
        .collect();
    let out: Vec<f64> = (0..s.len()).map(|e| gmag[e / (c * hw) * hw + e % hw] * s[e].abs()).collect();
    let (da, dm, _, fcmag) = reference::gate_backward(&a, &m, s, dout, fc1w, fc1b, fc2w, fc2b, b, c, hw);
    let (dxa, dxm) = (conv_t(wa, &da, b, c, hw, true), conv_t(wm, &dm, b, c, hw, true));
    let ds: Vec<f64> =
        (0..s.len()).map(|e| (px[e / (c * hw) * hw + e % hw].0 * dout[e]).abs() + dxa[e] + dxm[e]).collect();
    vec![
        out,
        ds,
        conv_w(&da, s, b, c, hw, true),
        conv_w(&dm, s, b, c, hw, true),
        fcmag[0..18].to_vec(),
        fcmag[18..24].to_vec(),
        fcmag[24..30].to_vec(),
        fcmag[30..31].to_vec(),
    ]
}

/// The draw that found the output bound's cancellation (see `check_plam`).
#[test]
fn plam_output_bound_allows_cancellation() {
    check_plam(&device("cpu"), 1, 1, 1, 1, 14313122428996508258).unwrap();
}

/// A draw whose pre-activation z = 0.0034 is a sum of terms near 20 (its f32 rounding is 1e-3
/// of it): dfc2w's bound scales with z's terms, not with ReLU(z) (`reference::gate_backward`).
#[test]
fn plam_bf16_mlp_gradient_bound_allows_cancellation() {
    for kind in ["cpu", "emu"] {
        check_plam_bf16(&device(kind), 1, 3, 5, 2, 3297493478627505717).unwrap();
    }
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

/// bf16 unit roundoff: 8 significant bits, round to nearest even.
const EPS_BF16: f64 = 1.0 / 256.0;

/// Random values rounded to bf16, as a bf16 tensor and the exact values it holds.
fn bf16_operand(n: usize, shape: &[usize], seed: u64, dev: &Device) -> (reclmis::Tensor, Vec<f64>) {
    let t = reclmis::ops::cast::cast(&tensor(&values(n, seed, false), shape, dev), reclmis::DType::BF16).unwrap();
    let exact = t.to_vec().unwrap().iter().map(|&v| v as f64).collect();
    (t, exact)
}

/// y[o] = Σ_i w[o][i]·x[i] per pixel (the 1×1 convolution), of |w| and |x| when `abs`; x
/// [B, C, HW], w [C, C].
fn conv_1x1(w: &[f64], x: &[f64], b: usize, c: usize, hw: usize, abs: bool) -> Vec<f64> {
    let f = |v: f64| if abs { v.abs() } else { v };
    let mut y = vec![0.0; x.len()];
    for i in 0..b {
        for o in 0..c {
            for ci in 0..c {
                for p in 0..hw {
                    y[(i * c + o) * hw + p] += f(w[o * c + ci]) * f(x[(i * c + ci) * hw + p]);
                }
            }
        }
    }
    y
}

/// The magnitude of the gate's MLP output at a pixel whose features are at most `f` in size:
/// |fc2b| + Σ_j |fc2w_j|·(Σ_k |fc1w_jk|·f_k + |fc1b_j|), what g's f32 rounding scales with.
fn mlp_magnitude(f: [f64; 3], fc1w: &[f64], fc1b: &[f64], fc2w: &[f64], fc2b: f64) -> f64 {
    fc2b.abs()
        + (0..6)
            .map(|j| fc2w[j].abs() * ((0..3).map(|k| fc1w[j * 3 + k].abs() * f[k]).sum::<f64>() + fc1b[j].abs()))
            .sum::<f64>()
}

/// out = Σ_o w[o][i]·x[o] per pixel (the 1×1 convolution's input gradient), |w| and |x| when
/// `abs`; x [B, C, HW], w [C, C]: `conv_1x1` with wᵀ (the same terms in the same order).
fn conv_t(w: &[f64], x: &[f64], b: usize, c: usize, hw: usize, abs: bool) -> Vec<f64> {
    let wt: Vec<f64> = (0..c * c).map(|k| w[(k % c) * c + k / c]).collect();
    conv_1x1(&wt, x, b, c, hw, abs)
}

/// dw[o][i] = Σ_pixels dy[o]·x[i] (the 1×1 convolution's weight gradient), of |dy| and |x| when
/// `abs`.
fn conv_w(dy: &[f64], x: &[f64], b: usize, c: usize, hw: usize, abs: bool) -> Vec<f64> {
    let f = |v: f64| if abs { v.abs() } else { v };
    let mut out = vec![0.0; c * c];
    for i in 0..b {
        for o in 0..c {
            for ci in 0..c {
                for p in 0..hw {
                    out[o * c + ci] += f(dy[(i * c + o) * hw + p]) * f(x[(i * c + ci) * hw + p]);
                }
            }
        }
    }
    out
}

/// |got − want| ≤ bound per element (and no NaN).
fn within(what: &str, got: &[f32], want: &[f64], bound: &[f64]) -> Result<(), TestCaseError> {
    prop_assert_eq!(got.len(), want.len(), "{}: length", what);
    for (i, ((&g, &w), &b)) in got.iter().zip(want).zip(bound).enumerate() {
        prop_assert!(
            (g as f64 - w).abs() <= b && !g.is_nan(),
            "{}: element {} = {} vs {} (allowed {:e})",
            what,
            i,
            g,
            w,
            b
        );
    }
    Ok(())
}

/// The gate at bf16 autocast (`plam::bf16`: bf16 s, weights, a, m, output and gradients, f32
/// math) against the f64 gate of the same bf16 values. The reference starts from the kernels'
/// own a and m (`conv2d_bf16` of s, tested in tests/conv_bf16.rs; the same call gives the same
/// bits), so what is checked is the gate, its backward and how they use the convolutions.
/// Bounds, derived (u = 2⁻⁸ bf16's unit roundoff, tol32 = 64·(C + 16)·u32 the f32 test's bound
/// for the C-term channel sums and the 6-wide MLP):
/// * out = bf16(g·s), g in f32: u·|g s| + tol32·G·|s| with G the pixel's MLP magnitude.
/// * ds = bf16((g·dout + bf16(Waᵀ dA)) + bf16(Wmᵀ dM)), dA and dM rounded to bf16: each of the
///   three roundings at most u of its value, the dA / dM roundings at most u·(|Wa|ᵀ|dA| +
///   |Wm|ᵀ|dM|), second-order terms within the factor 1 + 4u; plus tol32 of the largest
///   magnitude (the f32 math before the roundings, as the f32 test's scaled bound).
/// * dw = bf16(Σ_pixels bf16(dA)·s): u·|dw| + u·Σ|dA||s|, times 1 + 4u, plus the f32 sum of
///   B·HW terms, (B·HW + C + 16)·8·u32 of the largest Σ|dA||s|.
/// * the MLP's parameter gradients (f32 sums over B·HW pixels of f32 terms of exact bf16 inputs):
///   64·(B·HW + C + 16)·u32 of each one's sum of absolute terms.
///
/// Draws with an MLP pre-activation within 1e-4 of its ReLU's kink are skipped: there f32 and
/// f64 may take different branches (the channel max and ReLU(A), ReLU(M) see the same bf16
/// values in both, so they need no margin).
fn check_plam_bf16(dev: &Device, b: usize, c: usize, h: usize, w: usize, seed: u64) -> Result<(), TestCaseError> {
    use reclmis::ops::conv::bf16::conv2d_bf16;
    let hw = h * w;
    let sh = [b, c, h, w];
    let (st, s) = bf16_operand(b * c * hw, &sh, seed, dev);
    let (wat, wa) = bf16_operand(c * c, &[c, c, 1, 1], seed ^ 1, dev);
    let (wmt, wm) = bf16_operand(c * c, &[c, c, 1, 1], seed ^ 2, dev);
    let (dot, dout) = bf16_operand(b * c * hw, &sh, seed ^ 7, dev);
    let (f1w, f1b, f2w, f2b) = (
        values(18, seed ^ 3, false),
        values(6, seed ^ 4, false),
        values(6, seed ^ 5, false),
        values(1, seed ^ 6, false),
    );
    let t = |v: &[f32], shape: &[usize]| tensor(v, shape, dev);
    let (f1wt, f1bt, f2wt, f2bt) = (t(&f1w, &[6, 3]), t(&f1b, &[6]), t(&f2w, &[1, 6]), t(&f2b, &[1]));
    let wts = PlamWeights { w_avg: &wat, w_max: &wmt, fc1_w: &f1wt, fc1_b: &f1bt, fc2_w: &f2wt, fc2_b: &f2bt };
    let (fc1w, fc1b, fc2w, fc2b) = (f64s(&f1w), f64s(&f1b), f64s(&f2w), f2b[0] as f64);
    let a: Vec<f64> = f64s(&conv2d_bf16(&st, &wat, None).unwrap().to_vec().unwrap());
    let m: Vec<f64> = f64s(&conv2d_bf16(&st, &wmt, None).unwrap().to_vec().unwrap());
    let px = reference::gate(&a, &m, &fc1w, &fc1b, &fc2w, fc2b, b, c, hw);
    prop_assume!(px.iter().all(|(_, _, z)| z.iter().all(|z| z.abs() > 1e-4)));
    let tol32 = 64.0 * (c as f64 + 16.0) * EPS32;

    let f = plam::bf16::plam_gate_bf16(&st, &wts).unwrap();
    prop_assert_eq!(f.out.dtype(), reclmis::DType::BF16);
    let (mut want, mut bound) = (vec![0.0; s.len()], vec![0.0; s.len()]);
    for (q, (g, _, _)) in px.iter().enumerate() {
        let (i, p) = (q / hw, q % hw);
        let f0 = (0..c).map(|ch| a[(i * c + ch) * hw + p].max(0.0)).sum::<f64>() / c as f64;
        let f1 = (0..c).map(|ch| m[(i * c + ch) * hw + p].max(0.0)).fold(0.0, f64::max);
        let gmag = mlp_magnitude([f0.abs(), f1.abs(), f0.abs() + f1.abs()], &fc1w, &fc1b, &fc2w, fc2b);
        for ch in 0..c {
            let e = (i * c + ch) * hw + p;
            want[e] = g * s[e];
            bound[e] = EPS_BF16 * want[e].abs() + tol32 * gmag * s[e].abs();
        }
    }
    within("out", &f.out.to_vec().unwrap(), &want, &bound)?;

    // the backward, twice from a shared forward (a copy is written, not the shared a and m) and
    // once owning it: the same bits
    let grads = |g: &plam::PlamGrads| [&g.ds, &g.dw_avg, &g.dw_max, &g.dfc1_w].map(|t| t.to_vec().unwrap());
    let g = plam::bf16::plam_gate_backward_bf16(&st, &wts, f.clone(), &dot).unwrap();
    let again = plam::bf16::plam_gate_backward_bf16(&st, &wts, f.clone(), &dot).unwrap();
    prop_assert_eq!(grads(&g), grads(&again), "a second backward of a shared forward");
    let owned = plam::bf16::plam_gate_backward_bf16(&st, &wts, f, &dot).unwrap();
    prop_assert_eq!(grads(&g), grads(&owned), "the backward that owns its forward");
    for (name, t) in [("ds", &g.ds), ("dw_avg", &g.dw_avg), ("dw_max", &g.dw_max)] {
        prop_assert_eq!(t.dtype(), reclmis::DType::BF16, "{} is a bf16 value's gradient", name);
    }

    let (da, dm, fcg, fcmag) = reference::gate_backward(&a, &m, &s, &dout, &fc1w, &fc1b, &fc2w, fc2b, b, c, hw);
    let (dxa, dxm) = (conv_t(&wa, &da, b, c, hw, false), conv_t(&wm, &dm, b, c, hw, false));
    let (dxa_mag, dxm_mag) = (conv_t(&wa, &da, b, c, hw, true), conv_t(&wm, &dm, b, c, hw, true));
    let ds: Vec<f64> = (0..s.len()).map(|e| px[e / (c * hw) * hw + e % hw].0 * dout[e] + dxa[e] + dxm[e]).collect();
    let mag: Vec<f64> =
        (0..s.len()).map(|e| (px[e / (c * hw) * hw + e % hw].0 * dout[e]).abs() + dxa_mag[e] + dxm_mag[e]).collect();
    let scale = mag.iter().fold(1e-30f64, |x, &v| x.max(v));
    let bound: Vec<f64> = (0..s.len())
        .map(|e| {
            let rounding = ds[e].abs() + dxa[e].abs() + dxm[e].abs() + dxa_mag[e] + dxm_mag[e];
            EPS_BF16 * rounding * (1.0 + 4.0 * EPS_BF16) + tol32 * scale
        })
        .collect();
    within("ds", &g.ds.to_vec().unwrap(), &ds, &bound)?;
    let terms = (b * hw) as f64 + c as f64 + 16.0;
    for (name, got, d) in [("dw_avg", &g.dw_avg, &da), ("dw_max", &g.dw_max, &dm)] {
        let (want, mag) = (conv_w(d, &s, b, c, hw, false), conv_w(d, &s, b, c, hw, true));
        let scale = mag.iter().fold(1e-30f64, |x, &v| x.max(v));
        let bound: Vec<f64> = want
            .iter()
            .zip(&mag)
            .map(|(w, m)| EPS_BF16 * (w.abs() + m) * (1.0 + 4.0 * EPS_BF16) + (tol32 + 8.0 * terms * EPS32) * scale)
            .collect();
        within(name, &got.to_vec().unwrap(), &want, &bound)?;
    }
    let got_fc: Vec<f32> =
        [&g.dfc1_w, &g.dfc1_b, &g.dfc2_w, &g.dfc2_b].iter().flat_map(|t| t.to_vec().unwrap()).collect();
    let fc_bound: Vec<f64> = fcmag.iter().map(|m| 64.0 * terms * EPS32 * m + 1e-30).collect();
    within("the MLP's gradients", &got_fc, &fcg, &fc_bound)?;
    Ok(())
}

per_device!(check_plam_bf16, (b in 1usize..3, c in prop::sample::select(vec![1usize, 3, 8, 16]), h in prop::sample::select(vec![1usize, 3, 5]), w in prop::sample::select(vec![1usize, 2, 4]), seed in any::<u64>()));

/// The f64 gate backward the bf16 test builds its reference from (`reference::gate_backward`
/// and the 1×1 convolutions' gradients assembled as `check_plam_bf16` does) against central
/// differences of the f64 forward `reference::plam` (with the exact convolutions): the same
/// gradients to 1e-6 of their scale. Draws near a kink are skipped, as in `check_plam`.
#[test]
fn reference_gate_backward_matches_finite_differences() {
    let (b, c, hw) = (2usize, 3usize, 5usize);
    let mut checked = 0;
    for seed in 0..20u64 {
        let s = f64s(&values(b * c * hw, seed, false));
        let (wa, wm) = (f64s(&values(c * c, seed ^ 1, false)), f64s(&values(c * c, seed ^ 2, false)));
        let (fc1w, fc1b, fc2w) =
            (f64s(&values(18, seed ^ 3, false)), f64s(&values(6, seed ^ 4, false)), f64s(&values(6, seed ^ 5, false)));
        let fc2b = values(1, seed ^ 6, false)[0] as f64;
        let dout = f64s(&values(b * c * hw, seed ^ 7, false));
        if reference::kink_margin(&s, &wa, &wm, &fc1w, &fc1b, b, c, hw) < 1e-3 {
            continue;
        }
        checked += 1;
        let (a, m) = (conv_1x1(&wa, &s, b, c, hw, false), conv_1x1(&wm, &s, b, c, hw, false));
        let px = reference::gate(&a, &m, &fc1w, &fc1b, &fc2w, fc2b, b, c, hw);
        let (da, dm, fcg, _) = reference::gate_backward(&a, &m, &s, &dout, &fc1w, &fc1b, &fc2w, fc2b, b, c, hw);
        let (dxa, dxm) = (conv_t(&wa, &da, b, c, hw, false), conv_t(&wm, &dm, b, c, hw, false));
        let ds: Vec<f64> = (0..s.len()).map(|e| px[e / (c * hw) * hw + e % hw].0 * dout[e] + dxa[e] + dxm[e]).collect();
        let mut all = vec![s.clone(), wa.clone(), wm.clone(), fc1w.clone(), fc1b.clone(), fc2w.clone(), vec![fc2b]];
        let loss = |p: &[Vec<f64>]| -> f64 {
            let out = reference::plam(&p[0], &p[1], &p[2], &p[3], &p[4], &p[5], p[6][0], b, c, hw);
            out.iter().zip(&dout).map(|(o, d)| o * d).sum()
        };
        let analytic = [
            ds,
            conv_w(&da, &s, b, c, hw, false),
            conv_w(&dm, &s, b, c, hw, false),
            fcg[0..18].to_vec(),
            fcg[18..24].to_vec(),
            fcg[24..30].to_vec(),
            fcg[30..31].to_vec(),
        ];
        for (k, want) in analytic.iter().enumerate() {
            let fd: Vec<f64> = (0..all[k].len())
                .map(|j| {
                    let h = 1e-6;
                    all[k][j] += h;
                    let up = loss(&all);
                    all[k][j] -= 2.0 * h;
                    let down = loss(&all);
                    all[k][j] += h;
                    (up - down) / (2.0 * h)
                })
                .collect();
            let sc = fd.iter().fold(1e-6f64, |x, v| x.max(v.abs()));
            assert_eq!(
                mismatch(&want.iter().map(|&v| v as f32).collect::<Vec<_>>(), &fd, 1e-6 * sc + 1e-7 * sc.max(1.0), 0.0),
                None,
                "seed {seed} input {k}"
            );
        }
    }
    assert!(checked >= 10, "only {checked} of 20 draws away from the kinks");
}
