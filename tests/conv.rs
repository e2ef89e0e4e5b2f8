//! 2-D convolution (k = 1 and 3, padding k/2, stride 1, NCHW, bias) forward and backward on cpu,
//! emu and cuda (exact-f32 tiled and tf32 tensor-core kernels) against the f64 reference; the
//! reference's gradients against finite differences.

mod common;
use common::*;
use proptest::prelude::*;
use reclmis::ops::conv::winograd::Tiles;
use reclmis::ops::conv::{self, reference, ConvShape};
use reclmis::ops::gemm::GemmAlgo;
use reclmis::testing::{fd_mismatch, mismatch_scaled, EPS32, EPS_TF32};
use reclmis::Device;

fn conv_shape() -> impl Strategy<Value = ConvShape> {
    (
        1usize..3,
        prop::sample::select(vec![1usize, 3, 8, 17]),
        prop::sample::select(vec![1usize, 5, 16, 65]),
        prop::sample::select(vec![1usize, 2, 5, 12]),
        prop::sample::select(vec![1usize, 3, 7, 16]),
        prop::sample::select(vec![(1usize, 1usize), (3, 3), (1, 3), (3, 1)]),
    )
        .prop_map(|(b, ci, co, h, w, (kh, kw))| ConvShape { b, ci, co, h, w, kh, kw })
}

/// Per element: Σ|w||x| (the reference on absolute values) times k·eps (f32 FMA chain over
/// K = Ci·k² terms, plus the bias), + 2·2^-11 for tf32 operands.
fn tol(algo: GemmAlgo, terms: usize) -> f64 {
    let f32_acc = (terms as f64 + 2.0) * EPS32;
    if algo == GemmAlgo::TensorCore {
        2.0 * EPS_TF32 + f32_acc
    } else {
        f32_acc
    }
}

fn check_conv(dev: &Device, s: ConvShape, seed: u64, with_bias: bool) -> Result<(), TestCaseError> {
    let (nx, nw) = (s.b * s.ci * s.h * s.w, s.co * s.ci * s.kh * s.kw);
    let x = values(nx, seed, false);
    let w = values(nw, seed ^ 1, false);
    let bias = values(s.co, seed ^ 2, false);
    let dy = values(s.b * s.co * s.h * s.w, seed ^ 3, false);
    let xt = tensor(&x, &[s.b, s.ci, s.h, s.w], dev);
    let wt = tensor(&w, &[s.co, s.ci, s.kh, s.kw], dev);
    let bt = tensor(&bias, &[s.co], dev);
    let abs = |v: &[f32]| -> Vec<f64> { v.iter().map(|a| a.abs() as f64).collect() };
    let bref = f64s(&bias);
    let want = reference::conv2d(&f64s(&x), &f64s(&w), with_bias.then_some(&bref[..]), &s);
    let babs = abs(&bias);
    let mag = reference::conv2d(&abs(&x), &abs(&w), with_bias.then_some(&babs[..]), &s);
    let (wdx, wdw, wdb) = reference::conv2d_backward(&f64s(&x), &f64s(&w), &f64s(&dy), &s);
    let (mdx, mdw, mdb) = reference::conv2d_backward(&abs(&x), &abs(&w), &abs(&dy), &s);
    let algos: &[GemmAlgo] =
        if dev.is_gpu_like() { &[GemmAlgo::Tiled, GemmAlgo::TensorCore] } else { &[GemmAlgo::Auto] };
    for &algo in algos {
        let y = conv::conv2d(&xt, &wt, with_bias.then_some(&bt), algo).unwrap();
        assert_none(
            &format!("{algo:?} forward"),
            mismatch_scaled(&y.to_vec().unwrap(), &want, &mag, tol(algo, s.depth()), 0.0),
        )?;
        let g = conv::conv2d_backward(&xt, &wt, &tensor(&dy, y.shape(), dev), with_bias, algo).unwrap();
        let kdx = s.co * s.kh * s.kw;
        assert_none(
            &format!("{algo:?} dx"),
            mismatch_scaled(&g.dx.to_vec().unwrap(), &wdx, &mdx, tol(algo, kdx), 0.0),
        )?;
        // the weight gradient sums B·H·W products per element (partials then their sum)
        let kdw = s.b * s.h * s.w + 64;
        assert_none(
            &format!("{algo:?} dw"),
            mismatch_scaled(&g.dw.to_vec().unwrap(), &wdw, &mdw, tol(algo, kdw), 0.0),
        )?;
        prop_assert_eq!(g.db.is_some(), with_bias);
        if let Some(db) = g.db {
            assert_none("db", mismatch_scaled(&db.to_vec().unwrap(), &wdb, &mdb, tol(GemmAlgo::Tiled, kdw), 0.0))?;
        }
    }
    Ok(())
}

per_device!(check_conv, (s in conv_shape(), seed in any::<u64>(), with_bias in any::<bool>()));

proptest! {
    #![proptest_config(ProptestConfig { cases: 16, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn reference_grads_match_finite_differences(s in conv_shape(), seed in any::<u64>()) {
        let s = ConvShape { co: s.co.min(5), ci: s.ci.min(3), h: s.h.min(5), w: s.w.min(7), ..s };
        let x = f64s(&values(s.b * s.ci * s.h * s.w, seed, false));
        let w = f64s(&values(s.co * s.ci * s.kh * s.kw, seed ^ 1, false));
        let bias = f64s(&values(s.co, seed ^ 2, false));
        let dy = f64s(&values(s.b * s.co * s.h * s.w, seed ^ 3, false));
        let (dx, dw, db) = reference::conv2d_backward(&x, &w, &dy, &s);
        assert_none("dx", fd_mismatch(|x| reference::conv2d(x, &w, Some(&bias), &s), &x, &dy, &dx, 1e-6))?;
        assert_none("dw", fd_mismatch(|w| reference::conv2d(&x, w, Some(&bias), &s), &w, &dy, &dw, 1e-6))?;
        assert_none("db", fd_mismatch(|b| reference::conv2d(&x, &w, Some(b), &s), &bias, &dy, &db, 1e-6))?;
    }
}

/// The pipelined tf32 convolutions (cuda/emu, builds with autocast): the forward and the input
/// gradient (the forward's kernel over dy) where the channels they read along are multiples of 4,
/// the split-K weight gradient where Ci and H·W are (dy read in NCHW), at both block tiles, around
/// the 64/128 pixel and channel tile edges and past the split threshold (512 pixels); other shapes
/// take the element-loading kernels. Each result within the tf32 bound of the f64 reference (the
/// pipelined sums run in tap-major order, so not bit for bit with `conv2d_tc_*`), and the
/// pipelined kernels' shared-memory reads (ldmatrix, 32-bit loads) free of bank conflicts.
#[cfg(feature = "autocast")]
fn check_conv_pipe_tf32(
    dev: &Device,
    s: ConvShape,
    tile: u32,
    with_bias: bool,
    seed: u64,
) -> Result<(), TestCaseError> {
    use reclmis::ops::gemm;
    let x = values(s.b * s.ci * s.h * s.w, seed, false);
    let w = values(s.co * s.ci * s.kh * s.kw, seed ^ 1, false);
    let bias = values(s.co, seed ^ 2, false);
    let dy = values(s.b * s.co * s.h * s.w, seed ^ 3, false);
    let (xt, wt, bt) = (
        tensor(&x, &[s.b, s.ci, s.h, s.w], dev),
        tensor(&w, &[s.co, s.ci, s.kh, s.kw], dev),
        tensor(&bias, &[s.co], dev),
    );
    let dyt = tensor(&dy, &[s.b, s.co, s.h, s.w], dev);
    let algo = GemmAlgo::TensorCore;
    let y = gemm::with_bf16_tile(tile, || conv::conv2d(&xt, &wt, with_bias.then_some(&bt), algo)).unwrap();
    #[cfg(feature = "emu")]
    if matches!(dev, Device::Emu) && s.ci.is_multiple_of(4) {
        let st = reclmis::device::emu::last_smem_stats();
        prop_assert!(st.phases > 0 && st.extra_wavefronts == 0, "forward shared-memory phases {:?}", st);
    }
    let g = gemm::with_bf16_tile(tile, || conv::conv2d_backward(&xt, &wt, &dyt, with_bias, algo)).unwrap();
    #[cfg(feature = "emu")]
    if matches!(dev, Device::Emu) {
        use reclmis::kernels::Kernel;
        let wgrad =
            if tile == 128 { Kernel::conv2d_pipe128_wgrad_bwd_f32 } else { Kernel::conv2d_pipe64_wgrad_bwd_f32 };
        let pipe = [Kernel::conv2d_pipe64_fwd_f32, Kernel::conv2d_pipe128_fwd_f32, wgrad];
        for (k, st) in reclmis::device::emu::smem_report().into_iter().filter(|(k, _)| pipe.contains(k)) {
            prop_assert!(st.extra_wavefronts == 0, "{:?}: bank conflicts {:?}", k, st);
        }
        let launched = reclmis::device::emu::launched_kernels();
        if s.ci.is_multiple_of(4) && (s.h * s.w).is_multiple_of(4) {
            prop_assert!(launched.contains(&wgrad), "{:?}", launched);
        }
    }
    let abs = |v: &[f32]| -> Vec<f64> { v.iter().map(|a| a.abs() as f64).collect() };
    let (bref, babs) = (f64s(&bias), abs(&bias));
    let want = reference::conv2d(&f64s(&x), &f64s(&w), with_bias.then_some(&bref[..]), &s);
    let mag = reference::conv2d(&abs(&x), &abs(&w), with_bias.then_some(&babs[..]), &s);
    let (wdx, wdw, _) = reference::conv2d_backward(&f64s(&x), &f64s(&w), &f64s(&dy), &s);
    let (mdx, mdw, _) = reference::conv2d_backward(&abs(&x), &abs(&w), &abs(&dy), &s);
    let k2 = s.kh * s.kw;
    assert_none("y", mismatch_scaled(&y.to_vec().unwrap(), &want, &mag, tol(algo, s.depth()), 0.0))?;
    assert_none("dx", mismatch_scaled(&g.dx.to_vec().unwrap(), &wdx, &mdx, tol(algo, s.co * k2), 0.0))?;
    assert_none("dw", mismatch_scaled(&g.dw.to_vec().unwrap(), &wdw, &mdw, tol(algo, s.b * s.h * s.w), 0.0))
}

/// Channel counts mostly multiples of 4 (sometimes 3 or 6: the element-loading fallback), maps
/// whose H·W is or is not a multiple of 4, up to 3·16² = 768 pixels.
#[cfg(feature = "autocast")]
fn pipe_tf32_shape() -> impl Strategy<Value = ConvShape> {
    let ch = || prop_oneof![6 => prop::sample::select(vec![4usize, 8, 12, 20, 36, 68]), 1 => prop::sample::select(vec![3usize, 6])];
    let k = prop::sample::select(vec![(3usize, 3usize), (1, 1), (1, 3)]);
    (1usize..=3, ch(), ch(), 1usize..=16, 1usize..=16, k).prop_map(|(b, ci, co, h, w, (kh, kw))| ConvShape {
        b,
        ci,
        co,
        h,
        w,
        kh,
        kw,
    })
}

#[cfg(feature = "autocast")]
per_device!(check_conv_pipe_tf32, (
    s in pipe_tf32_shape(),
    tile in prop_oneof![Just(64u32), Just(128)],
    with_bias in any::<bool>(),
    seed in any::<u64>(),
));

#[test]
fn even_kernels_and_channel_mismatches_are_errors() {
    let dev = Device::Cpu;
    let x = tensor(&[0.0; 2 * 4 * 4], &[1, 2, 4, 4], &dev);
    let w2 = tensor(&[0.0; 3 * 2 * 2 * 2], &[3, 2, 2, 2], &dev);
    assert!(conv::conv2d(&x, &w2, None, GemmAlgo::Auto).unwrap_err().to_string().contains("kh, kw odd"));
    let w3 = tensor(&[0.0; 3 * 5 * 9], &[3, 5, 3, 3], &dev);
    assert!(conv::conv2d(&x, &w3, None, GemmAlgo::Auto).unwrap_err().to_string().contains("do not fit"));
}

/// Conv1d over tokens (the text branch's k = 3, padding 1) is the 1×k case: checked against the
/// 2-D reference on [B, C, 1, L].
fn check_conv1d(dev: &Device, b: usize, ci: usize, co: usize, l: usize, seed: u64) -> Result<(), TestCaseError> {
    let s = ConvShape { b, ci, co, h: 1, w: l, kh: 1, kw: 3 };
    let x = values(b * ci * l, seed, false);
    let w = values(co * ci * 3, seed ^ 1, false);
    let bias = values(co, seed ^ 2, false);
    let dy = values(b * co * l, seed ^ 3, false);
    let y = conv::conv1d(
        &tensor(&x, &[b, ci, l], dev),
        &tensor(&w, &[co, ci, 3], dev),
        Some(&tensor(&bias, &[co], dev)),
        GemmAlgo::Tiled,
    )
    .unwrap();
    prop_assert_eq!(y.shape(), &[b, co, l][..]);
    let abs = |v: &[f32]| -> Vec<f64> { v.iter().map(|a| a.abs() as f64).collect() };
    let want = reference::conv2d(&f64s(&x), &f64s(&w), Some(&f64s(&bias)), &s);
    let mag = reference::conv2d(&abs(&x), &abs(&w), Some(&abs(&bias)), &s);
    assert_none("forward", mismatch_scaled(&y.to_vec().unwrap(), &want, &mag, tol(GemmAlgo::Tiled, ci * 3), 0.0))?;
    let g = conv::conv1d_backward(
        &tensor(&x, &[b, ci, l], dev),
        &tensor(&w, &[co, ci, 3], dev),
        &tensor(&dy, &[b, co, l], dev),
        true,
        GemmAlgo::Tiled,
    )
    .unwrap();
    prop_assert_eq!(g.dx.shape(), &[b, ci, l][..]);
    prop_assert_eq!(g.dw.shape(), &[co, ci, 3][..]);
    let (wdx, wdw, _) = reference::conv2d_backward(&f64s(&x), &f64s(&w), &f64s(&dy), &s);
    let (mdx, mdw, _) = reference::conv2d_backward(&abs(&x), &abs(&w), &abs(&dy), &s);
    assert_none("dx", mismatch_scaled(&g.dx.to_vec().unwrap(), &wdx, &mdx, tol(GemmAlgo::Tiled, co * 3), 0.0))?;
    assert_none("dw", mismatch_scaled(&g.dw.to_vec().unwrap(), &wdw, &mdw, tol(GemmAlgo::Tiled, b * l + 64), 0.0))
}

per_device!(check_conv1d, (b in 1usize..3, ci in prop::sample::select(vec![1usize, 4, 33]), co in prop::sample::select(vec![1usize, 7, 64]), l in prop::sample::select(vec![1usize, 2, 18, 77]), seed in any::<u64>()));

/// The convolution of a channel concatenation that is never built (`conv2d_cat`): forward and
/// every gradient against the reference convolution of the concatenated input.
fn check_conv_cat(
    dev: &Device,
    s: ConvShape,
    splits: Vec<usize>,
    seed: u64,
    with_bias: bool,
) -> Result<(), TestCaseError> {
    // slice channel counts: the splits (0 allowed), the rest in the last slice
    let mut cs: Vec<usize> = splits.iter().map(|&c| c.min(s.ci)).collect();
    let used: usize = cs.iter().sum();
    prop_assume!(used <= s.ci);
    cs.push(s.ci - used);
    let hw = s.h * s.w;
    let x = values(s.b * s.ci * hw, seed, false);
    let w = values(s.co * s.ci * s.kh * s.kw, seed ^ 1, false);
    let bias = values(s.co, seed ^ 2, false);
    let dy = values(s.b * s.co * hw, seed ^ 3, false);
    // slice p of image b = channels [off_p, off_p + c_p) of the concatenated x
    let mut parts = Vec::new();
    let mut off = 0;
    for &c in &cs {
        let mut v = Vec::with_capacity(s.b * c * hw);
        for b in 0..s.b {
            v.extend_from_slice(&x[(b * s.ci + off) * hw..(b * s.ci + off + c) * hw]);
        }
        parts.push(tensor(&v, &[s.b, c, s.h, s.w], dev));
        off += c;
    }
    let refs: Vec<&reclmis::Tensor> = parts.iter().collect();
    let (wt, bt) = (tensor(&w, &[s.co, s.ci, s.kh, s.kw], dev), tensor(&bias, &[s.co], dev));
    let abs = |v: &[f32]| -> Vec<f64> { v.iter().map(|a| a.abs() as f64).collect() };
    let (bref, babs) = (f64s(&bias), abs(&bias));
    let want = reference::conv2d(&f64s(&x), &f64s(&w), with_bias.then_some(&bref[..]), &s);
    let mag = reference::conv2d(&abs(&x), &abs(&w), with_bias.then_some(&babs[..]), &s);
    let (wdx, wdw, wdb) = reference::conv2d_backward(&f64s(&x), &f64s(&w), &f64s(&dy), &s);
    let (mdx, mdw, mdb) = reference::conv2d_backward(&abs(&x), &abs(&w), &abs(&dy), &s);
    let algos: &[GemmAlgo] =
        if dev.is_gpu_like() { &[GemmAlgo::Tiled, GemmAlgo::TensorCore] } else { &[GemmAlgo::Auto] };
    for &algo in algos {
        let y = conv::conv2d_cat(&refs, &wt, with_bias.then_some(&bt), algo).unwrap();
        // the slices' partial sums are added in f32: one more rounding per slice
        assert_none(
            &format!("{algo:?} forward"),
            mismatch_scaled(&y.to_vec().unwrap(), &want, &mag, tol(algo, s.depth() + cs.len()), 0.0),
        )?;
        let g = conv::conv2d_cat_backward(&refs, &wt, &tensor(&dy, y.shape(), dev), with_bias, algo).unwrap();
        prop_assert_eq!(g.dxs.len(), cs.len());
        let mut off = 0;
        for (p, (&c, dx)) in cs.iter().zip(&g.dxs).enumerate() {
            let (mut wp, mut mp) = (Vec::new(), Vec::new());
            for b in 0..s.b {
                wp.extend_from_slice(&wdx[(b * s.ci + off) * hw..(b * s.ci + off + c) * hw]);
                mp.extend_from_slice(&mdx[(b * s.ci + off) * hw..(b * s.ci + off + c) * hw]);
            }
            assert_none(
                &format!("{algo:?} dx[{p}]"),
                mismatch_scaled(&dx.to_vec().unwrap(), &wp, &mp, tol(algo, s.co * s.kh * s.kw), 0.0),
            )?;
            off += c;
        }
        let kdw = s.b * s.h * s.w + 64;
        assert_none(
            &format!("{algo:?} dw"),
            mismatch_scaled(&g.dw.to_vec().unwrap(), &wdw, &mdw, tol(algo, kdw), 0.0),
        )?;
        prop_assert_eq!(g.db.is_some(), with_bias);
        if let Some(db) = g.db {
            assert_none("db", mismatch_scaled(&db.to_vec().unwrap(), &wdb, &mdb, tol(GemmAlgo::Tiled, kdw), 0.0))?;
        }
    }
    Ok(())
}

per_device!(check_conv_cat, (
    s in conv_shape(),
    splits in prop::collection::vec(prop::sample::select(vec![0usize, 1, 2, 5, 8]), 1..3),
    seed in any::<u64>(),
    with_bias in any::<bool>(),
));

#[test]
fn conv_cat_slices_must_agree() {
    let dev = Device::Cpu;
    let a = tensor(&[0.0; 2 * 4 * 4], &[1, 2, 4, 4], &dev);
    let b = tensor(&[0.0; 2 * 4 * 5], &[1, 2, 4, 5], &dev);
    let w = tensor(&[0.0; 3 * 4 * 9], &[3, 4, 3, 3], &dev);
    let e = conv::conv2d_cat(&[&a, &b], &w, None, GemmAlgo::Auto).err().unwrap().to_string();
    assert!(e.contains("slice 1 [1, 2, 4, 5] must be [B, C_i, H, W]"), "{e}");
    let w5 = tensor(&[0.0; 3 * 5 * 9], &[3, 5, 3, 3], &dev);
    let e = conv::conv2d_cat(&[&a, &a], &w5, None, GemmAlgo::Auto).err().unwrap().to_string();
    assert!(e.contains("must be [Co, 4, kh, kw]"), "{e}");
}

/// Winograd F(2×2, 3×3) and F(4×4, 3×3) on cpu against the f64 reference, directly (any channel
/// count, odd maps whose last tile hangs over, a weight slice with a longer row stride,
/// accumulation) and through `conv2d` and `conv2d_cat` (as the tuner's candidates "winograd" and
/// "winograd4").
fn check_winograd(
    s: ConvShape,
    seed: u64,
    with_bias: bool,
    accumulate: bool,
    tiles: Tiles,
) -> Result<(), TestCaseError> {
    let (nx, k2) = (s.b * s.ci * s.h * s.w, 9);
    // the weights are a column slice of a wider tensor: rows of (ci + 2)·9 floats
    let w_ld = (s.ci + 2) * k2;
    let wfull = values(s.co * w_ld, seed ^ 1, false);
    let w: Vec<f32> = (0..s.co).flat_map(|o| wfull[o * w_ld..o * w_ld + s.ci * k2].to_vec()).collect();
    let x = values(nx, seed, false);
    let bias = values(s.co, seed ^ 2, false);
    let y0 = values(s.b * s.co * s.h * s.w, seed ^ 3, false);
    let bref = f64s(&bias);
    let mut want = reference::conv2d(&f64s(&x), &f64s(&w), with_bias.then_some(&bref[..]), &s);
    let mut mag = reference::winograd_magnitude_tiles(tiles, &f64s(&x), &f64s(&w), with_bias.then_some(&bref[..]), &s);
    let tol = reference::winograd_tol_tiles(tiles, s.ci);
    let mut y = if accumulate { y0.clone() } else { vec![f32::NAN; y0.len()] };
    if accumulate {
        for ((wv, mv), &a) in want.iter_mut().zip(mag.iter_mut()).zip(&y0) {
            *wv += a as f64;
            *mv += (a as f64).abs();
        }
    }
    // as two channel slices when there are several channels (the concatenation path)
    let (k1, hw) = (s.ci / 2, s.h * s.w);
    let (x1, x2): (Vec<f32>, Vec<f32>) = if k1 > 0 {
        let part = |c0: usize, c1: usize| -> Vec<f32> {
            (0..s.b).flat_map(|b| x[(b * s.ci + c0) * hw..(b * s.ci + c1) * hw].to_vec()).collect()
        };
        (part(0, k1), part(k1, s.ci))
    } else {
        (x.clone(), Vec::new())
    };
    let xs: Vec<&[f32]> = if k1 > 0 { vec![&x1, &x2] } else { vec![&x1] };
    conv::winograd::conv2d_into_tiles(
        tiles,
        &xs,
        (&wfull, w_ld),
        with_bias.then_some(&bias[..]),
        &s,
        &mut y,
        accumulate,
    );
    assert_none("winograd", mismatch_scaled(&y, &want, &mag, tol, 0.0))?;
    let through_ops = match tiles {
        Tiles::F2 => conv::winograd::applies(&s),
        Tiles::F4 => true,
    };
    if through_ops && !accumulate {
        let dev = device("cpu");
        let bt = tensor(&bias, &[s.co], &dev);
        let forced = |f: &dyn Fn() -> reclmis::Tensor| match tiles {
            Tiles::F2 => reclmis::ops::tune::with_candidate("winograd", f),
            Tiles::F4 => reclmis::ops::tune::with_candidate("winograd4", f),
        };
        let yt = forced(&|| {
            conv::conv2d(
                &tensor(&x, &[s.b, s.ci, s.h, s.w], &dev),
                &tensor(&w, &[s.co, s.ci, 3, 3], &dev),
                with_bias.then_some(&bt),
                GemmAlgo::Auto,
            )
            .unwrap()
        });
        assert_none("conv2d (winograd)", mismatch_scaled(&yt.to_vec().unwrap(), &want, &mag, tol, 0.0))?;
        let parts: Vec<reclmis::Tensor> =
            xs.iter().map(|p| tensor(p, &[s.b, p.len() / (s.b * hw), s.h, s.w], &dev)).collect();
        let refs: Vec<&reclmis::Tensor> = parts.iter().collect();
        let yc = forced(&|| {
            conv::conv2d_cat(&refs, &tensor(&w, &[s.co, s.ci, 3, 3], &dev), with_bias.then_some(&bt), GemmAlgo::Auto)
                .unwrap()
        });
        assert_none("conv2d_cat (winograd)", mismatch_scaled(&yc.to_vec().unwrap(), &want, &mag, tol, 0.0))?;
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, failure_persistence: None, ..ProptestConfig::default() })]
    #[test]
    fn winograd_matches_reference(
        b in 1usize..3,
        ci in prop::sample::select(vec![1usize, 2, 5, 32, 33]),
        co in prop::sample::select(vec![1usize, 3, 32, 40]),
        h in prop::sample::select(vec![1usize, 2, 3, 4, 7, 14]),
        w in prop::sample::select(vec![1usize, 2, 5, 8, 13, 32, 33]),
        seed in any::<u64>(),
        with_bias in any::<bool>(),
        accumulate in any::<bool>(),
        f4 in any::<bool>(),
    ) {
        let tiles = if f4 { Tiles::F4 } else { Tiles::F2 };
        check_winograd(ConvShape { b, ci, co, h, w, kh: 3, kw: 3 }, seed, with_bias, accumulate, tiles)?;
    }
}

/// A map large enough for several bands per image, run in parallel (the proptest's small maps
/// take the one-band path): 2 images x 2 bands of 20 tile rows.
#[test]
fn winograd_parallel_bands() {
    for tiles in [Tiles::F2, Tiles::F4] {
        check_winograd(ConvShape { b: 2, ci: 32, co: 32, h: 60, w: 100, kh: 3, kw: 3 }, 7, true, false, tiles).unwrap();
        check_winograd(ConvShape { b: 2, ci: 32, co: 33, h: 59, w: 99, kh: 3, kw: 3 }, 8, false, true, tiles).unwrap();
    }
    // F(4×4)'s tiles are twice as tall: 38 tile rows, 3 bands of 18 per image
    check_winograd(ConvShape { b: 2, ci: 32, co: 32, h: 150, w: 99, kh: 3, kw: 3 }, 9, true, false, Tiles::F4).unwrap();
}

/// The Winograd weight gradient on cpu against the f64 reference's dw, directly (any channel
/// count, odd maps) and through `conv2d_backward` where the dispatch picks it.
fn check_winograd_wgrad(s: ConvShape, seed: u64) -> Result<(), TestCaseError> {
    let x = values(s.b * s.ci * s.h * s.w, seed, false);
    let w = values(s.co * s.ci * 9, seed ^ 1, false);
    let dy = values(s.b * s.co * s.h * s.w, seed ^ 3, false);
    let (_, want, _) = reference::conv2d_backward(&f64s(&x), &f64s(&w), &f64s(&dy), &s);
    let mag = reference::winograd_wgrad_magnitude(&f64s(&x), &f64s(&dy), &s);
    let tol = reference::winograd_wgrad_tol(&s);
    let got = conv::winograd::conv2d_wgrad(&x, &dy, &s);
    assert_none("winograd dw", mismatch_scaled(&got, &want, &mag, tol, 0.0))?;
    if conv::winograd::applies_wgrad(&s) {
        let dev = device("cpu");
        let g = conv::conv2d_backward(
            &tensor(&x, &[s.b, s.ci, s.h, s.w], &dev),
            &tensor(&w, &[s.co, s.ci, 3, 3], &dev),
            &tensor(&dy, &[s.b, s.co, s.h, s.w], &dev),
            false,
            GemmAlgo::Auto,
        )
        .unwrap();
        assert_none("conv2d_backward dw (winograd)", mismatch_scaled(&g.dw.to_vec().unwrap(), &want, &mag, tol, 0.0))?;
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 32, failure_persistence: None, ..ProptestConfig::default() })]
    #[test]
    fn winograd_wgrad_matches_reference(
        b in 1usize..3,
        ci in prop::sample::select(vec![1usize, 3, 32, 33]),
        co in prop::sample::select(vec![1usize, 2, 32, 35]),
        h in prop::sample::select(vec![1usize, 2, 3, 6, 9]),
        w in prop::sample::select(vec![1usize, 4, 7, 12]),
        seed in any::<u64>(),
    ) {
        check_winograd_wgrad(ConvShape { b, ci, co, h, w, kh: 3, kw: 3 }, seed)?;
    }
}

/// Several bands per image for the weight gradient (summed band by band), and a shape the
/// dispatch sends to it (256 input channels, 28²).
#[test]
fn winograd_wgrad_several_bands() {
    check_winograd_wgrad(ConvShape { b: 2, ci: 32, co: 32, h: 60, w: 100, kh: 3, kw: 3 }, 9).unwrap();
    check_winograd_wgrad(ConvShape { b: 1, ci: 256, co: 32, h: 28, w: 28, kh: 3, kw: 3 }, 10).unwrap();
}

/// The cpu keeps Winograd-transformed weights per live weight tensor: alternating two weight
/// tensors of the same shape, and making new ones after dropping old ones (their memory may be
/// reused), must always convolve with the weights given.
#[test]
fn winograd_weight_cache_follows_the_tensor() {
    let s = ConvShape { b: 1, ci: 32, co: 33, h: 6, w: 7, kh: 3, kw: 3 };
    let dev = device("cpu");
    let x = values(s.ci * s.h * s.w, 1, false);
    let xt = tensor(&x, &[1, s.ci, s.h, s.w], &dev);
    let check = |wv: &[f32], wt: &reclmis::Tensor| {
        let want = reference::conv2d(&f64s(&x), &f64s(wv), None, &s);
        let mag = reference::winograd_magnitude(&f64s(&x), &f64s(wv), None, &s);
        let y = conv::conv2d(&xt, wt, None, GemmAlgo::Auto).unwrap().to_vec().unwrap();
        assert_eq!(mismatch_scaled(&y, &want, &mag, reference::winograd_tol(s.ci), 0.0), None);
    };
    let (w1, w2) = (values(s.co * s.ci * 9, 2, false), values(s.co * s.ci * 9, 3, false));
    let (t1, t2) = (tensor(&w1, &[s.co, s.ci, 3, 3], &dev), tensor(&w2, &[s.co, s.ci, 3, 3], &dev));
    for _ in 0..3 {
        check(&w1, &t1);
        check(&w2, &t2);
    }
    drop((t1, t2));
    for seed in 4..10 {
        let w = values(s.co * s.ci * 9, seed, false);
        check(&w, &tensor(&w, &[s.co, s.ci, 3, 3], &dev));
    }
}

/// The pipelined tf32 `conv2d_cat` (emu, builds with autocast): its parts packed side by side are
/// the concatenation itself, so the forward, each part's input gradient and the weight gradient
/// are the plain convolution's of the concatenated input bit for bit (the same NHWC buffer, the
/// same kernels, the same sums), with a part of 0 channels and parts that are not multiples of 4.
#[cfg(all(feature = "emu", feature = "autocast"))]
#[test]
fn tf32_cat_is_the_convolution_of_the_concatenation() {
    let dev = Device::emu().unwrap();
    let (b, h, w, co, cs) = (2usize, 6usize, 6usize, 8usize, [3usize, 0, 9]);
    let ci: usize = cs.iter().sum();
    let parts: Vec<Vec<f32>> =
        cs.iter().enumerate().map(|(i, &c)| values(b * c * h * w, 40 + i as u64, false)).collect();
    let mut cat = Vec::new();
    for bi in 0..b {
        for (p, &c) in parts.iter().zip(&cs) {
            cat.extend_from_slice(&p[bi * c * h * w..(bi + 1) * c * h * w]);
        }
    }
    let pts: Vec<_> = parts.iter().zip(&cs).map(|(p, &c)| tensor(p, &[b, c, h, w], &dev)).collect();
    let refs: Vec<&reclmis::Tensor> = pts.iter().collect();
    let xt = tensor(&cat, &[b, ci, h, w], &dev);
    let wt = tensor(&values(co * ci * 9, 50, false), &[co, ci, 3, 3], &dev);
    let bt = tensor(&values(co, 51, false), &[co], &dev);
    let dy = tensor(&values(b * co * h * w, 52, false), &[b, co, h, w], &dev);
    let tc = GemmAlgo::TensorCore;
    let bits = |t: &reclmis::Tensor| t.to_vec().unwrap().iter().map(|v| v.to_bits()).collect::<Vec<_>>();
    let y = conv::conv2d_cat(&refs, &wt, Some(&bt), tc).unwrap();
    assert_eq!(bits(&y), bits(&conv::conv2d(&xt, &wt, Some(&bt), tc).unwrap()), "forward");
    let launched = reclmis::device::emu::launched_kernels();
    assert!(launched.contains(&reclmis::kernels::Kernel::conv2d_pipe64_fwd_f32), "{launched:?}");
    let g = conv::conv2d_cat_backward(&refs, &wt, &dy, true, tc).unwrap();
    let gc = conv::conv2d_backward(&xt, &wt, &dy, true, tc).unwrap();
    assert_eq!(bits(&g.dw), bits(&gc.dw), "dw");
    let dx = gc.dx.to_vec().unwrap();
    let mut off = 0;
    for (k, &c) in cs.iter().enumerate() {
        let want: Vec<u32> = (0..b)
            .flat_map(|bi| dx[(bi * ci + off) * h * w..(bi * ci + off + c) * h * w].to_vec())
            .map(|v| v.to_bits())
            .collect();
        assert_eq!(bits(&g.dxs[k]), want, "dx of part {k}");
        off += c;
    }
}
