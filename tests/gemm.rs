//! Batched GEMM with transposes and shared operands: the exact-f32 tiled kernel, the tf32
//! tensor-core kernel, the cpu path and the backward, against the f64 reference; on a GPU, the
//! tensor-core kernel against the emulator (the only check of the mma fragment layout).

mod common;
use common::gemm_case::{case, Case};
use common::*;
use proptest::prelude::*;
use reclmis::ops::gemm::{self, reference, GemmAlgo, GemmOpts};
use reclmis::testing::{fd_mismatch, mismatch_scaled, EPS32, EPS_TF32};
use reclmis::Device;

/// Error bounds, per element, in units of alpha·Σ_k |a||b| (the reference's `mag`):
/// f32 FMA accumulation over k terms: k·eps (the classic γ_k bound). tf32 also rounds each
/// operand to 10 mantissa bits: + 2·2^-11.
fn tolerance(algo: GemmAlgo, k: usize) -> f64 {
    let f32_acc = (k as f64 + 2.0) * EPS32;
    match algo {
        GemmAlgo::TensorCore => 2.0 * EPS_TF32 + f32_acc,
        _ => f32_acc,
    }
}

fn check_gemm(dev: &Device, c: Case, seed: u64) -> Result<(), TestCaseError> {
    let (sa, sb) = c.shapes();
    let a = values(sa.iter().product(), seed, false);
    let b = values(sb.iter().product(), seed ^ 7, false);
    let (at, bt) = (tensor(&a, &sa, dev), tensor(&b, &sb, dev));
    let (plan, out) = gemm::plan(&sa, &sb, c.trans_a, c.trans_b).unwrap();
    let (want, mag) = reference::gemm(&f64s(&a), &f64s(&b), &plan, c.alpha as f64);
    let algos: &[GemmAlgo] =
        if dev.is_gpu_like() { &[GemmAlgo::Tiled, GemmAlgo::TensorCore] } else { &[GemmAlgo::Auto] };
    for &algo in algos {
        let y = gemm::matmul(&at, &bt, c.opts(algo)).unwrap();
        prop_assert_eq!(y.shape(), out.as_slice());
        assert_none(
            &format!("{algo:?}"),
            mismatch_scaled(&y.to_vec().unwrap(), &want, &mag, tolerance(algo, c.k), 0.0),
        )?;
    }
    // Backward (exact-f32 GEMMs): each gradient element sums n (dA) or m·batch (dB) products.
    let dc = values(out.iter().product(), seed ^ 11, false);
    let (da, db) = gemm::matmul_backward(&at, &bt, &tensor(&dc, &out, dev), c.opts(GemmAlgo::Tiled)).unwrap();
    let (wa, wb) = reference::gemm_backward(&f64s(&a), &f64s(&b), &f64s(&dc), &plan, c.alpha as f64);
    let abs = |v: &[f32]| -> Vec<f64> { v.iter().map(|x| x.abs() as f64).collect() };
    let (ma, mb) = reference::gemm_backward(&abs(&a), &abs(&b), &abs(&dc), &plan, c.alpha.abs() as f64);
    let terms = (c.m.max(c.n) * c.batch) as f64;
    assert_none("dA", mismatch_scaled(&da.to_vec().unwrap(), &wa, &ma, (terms + 2.0) * EPS32, 0.0))?;
    assert_none("dB", mismatch_scaled(&db.to_vec().unwrap(), &wb, &mb, (terms + 2.0) * EPS32, 0.0))
}

per_device!(check_gemm, (c in case(), seed in any::<u64>()));

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn reference_grad_matches_finite_differences(c in case(), seed in any::<u64>()) {
        let c = Case { m: c.m.min(9), n: c.n.min(9), k: c.k.min(9), ..c };
        let (sa, sb) = c.shapes();
        let (plan, out) = gemm::plan(&sa, &sb, c.trans_a, c.trans_b).unwrap();
        let a = f64s(&values(sa.iter().product(), seed, false));
        let b = f64s(&values(sb.iter().product(), seed ^ 7, false));
        let dc = f64s(&values(out.iter().product(), seed ^ 11, false));
        let alpha = c.alpha as f64;
        let (ga, gb) = reference::gemm_backward(&a, &b, &dc, &plan, alpha);
        assert_none("fd a", fd_mismatch(|a| reference::gemm(a, &b, &plan, alpha).0, &a, &dc, &ga, 1e-6))?;
        assert_none("fd b", fd_mismatch(|b| reference::gemm(&a, b, &plan, alpha).0, &b, &dc, &gb, 1e-6))?;
    }
}

/// The tensor-core kernels on the GPU against the same kernels on the emulator. Both round the
/// operands to tf32 identically, so they differ only by f32 accumulation order: a wrong fragment
/// layout in the emulator or the kernel shows as O(1) errors, far beyond this tolerance.
#[test]
#[ignore = "needs a CUDA GPU"]
fn tensor_core_gemm_gpu_matches_emulator() {
    let gpu = device("cuda");
    let emu = device("emu");
    // the element-loading kernel, and (builds with autocast, sizes multiples of 4) the pipelined
    // ones in every layout: ldmatrix of k-contiguous tiles, 32-bit loads of the others
    let mut cands = vec![("tf32_mma", false, false)];
    if cfg!(feature = "autocast") {
        for (ta, tb) in [(false, false), (false, true), (true, false), (true, true)] {
            cands.extend([("tf32_pipe64", ta, tb), ("tf32_pipe128", ta, tb)]);
        }
    }
    for (batch, m, n, k) in [(1, 16, 8, 8), (1, 64, 64, 16), (2, 67, 45, 33), (3, 129, 97, 131), (2, 132, 68, 52)] {
        for &(cand, trans_a, trans_b) in &cands {
            let a = values(batch * m * k, 1, false);
            let b = values(batch * k * n, 2, false);
            let (sa, sb) = (
                if trans_a { [batch, k, m] } else { [batch, m, k] },
                if trans_b { [batch, n, k] } else { [batch, k, n] },
            );
            let opts = GemmOpts { algo: GemmAlgo::TensorCore, trans_a, trans_b, ..Default::default() };
            let run = |dev: &Device| {
                reclmis::ops::tune::with_candidate(cand, || {
                    gemm::matmul(&tensor(&a, &sa, dev), &tensor(&b, &sb, dev), opts)
                })
                .unwrap()
                .to_vec()
                .unwrap()
            };
            let (g, e) = (run(&gpu), run(&emu));
            let (plan, _) = gemm::plan(&sa, &sb, trans_a, trans_b).unwrap();
            let (_, mag) = reference::gemm(&f64s(&a), &f64s(&b), &plan, 1.0);
            let e64: Vec<f64> = e.iter().map(|&x| x as f64).collect();
            if let Some(err) = mismatch_scaled(&g, &e64, &mag, 2.0 * (k as f64 + 2.0) * EPS32, 0.0) {
                panic!("{cand} {batch}x{m}x{n}x{k} trans {trans_a}/{trans_b}: GPU vs emulator: {err}");
            }
        }
    }
}

/// The pipelined tf32 kernels (cp.async ring; ldmatrix of k-contiguous tiles, warp-wide 32-bit
/// loads of m-/n-contiguous ones) at both block tiles and every layout, on sizes that are
/// multiples of 4 (whole 16-byte chunks) around the 64 and 128 tile edges and the 16-deep k tile,
/// with and without the bias epilogue (Linear): the same C bit for bit as the unpipelined tf32
/// kernel (the same cvt.rna rounding of each operand and the same k order of the mma steps, so
/// any difference is a pipeline or layout bug, not rounding), within the tf32 bound of the f64
/// reference, the pipelined kernel really launched, and its shared-memory reads free of bank
/// conflicts (the emulator counts ldmatrix and the 32-bit loads). On the cpu: the f32 product.
#[cfg(feature = "autocast")]
fn check_gemm_pipe_tf32(dev: &Device, c: Case, tile: u32, bias: bool, seed: u64) -> Result<(), TestCaseError> {
    use reclmis::ops::tune::with_candidate;
    let (sa, sb) = c.shapes();
    let a = values(sa.iter().product(), seed, false);
    let b = values(sb.iter().product(), seed ^ 7, false);
    let (at, bt) = (tensor(&a, &sa, dev), tensor(&b, &sb, dev));
    let (plan, _) = gemm::plan(&sa, &sb, c.trans_a, c.trans_b).unwrap();
    let (want, mag) = reference::gemm(&f64s(&a), &f64s(&b), &plan, c.alpha as f64);
    let opts = c.opts(GemmAlgo::TensorCore);
    let name = if tile == 128 { "tf32_pipe128" } else { "tf32_pipe64" };
    let y = with_candidate(name, || gemm::matmul(&at, &bt, opts)).unwrap().to_vec().unwrap();
    assert_none("C", mismatch_scaled(&y, &want, &mag, tolerance(GemmAlgo::TensorCore, c.k), 0.0))?;
    if !dev.is_gpu_like() {
        return Ok(());
    }
    let pipe = gemm::with_bf16_tile(tile, || gemm::tf32_pipe_kernel(&plan, [at.dev_ptr(), bt.dev_ptr()]));
    prop_assert!(pipe.is_some_and(|p| p.1 == tile), "{:?}: the pipelined tf32 kernel must apply", pipe);
    #[cfg(feature = "emu")]
    if matches!(dev, Device::Emu) {
        let launched = reclmis::device::emu::launched_kernels();
        prop_assert!(launched.contains(&pipe.unwrap().0), "{:?} not in {:?}", pipe, launched);
        let s = reclmis::device::emu::last_smem_stats();
        prop_assert!(s.phases > 0 && s.extra_wavefronts == 0, "shared-memory phases {:?}", s);
    }
    let y0 = with_candidate("tf32_mma", || gemm::matmul(&at, &bt, opts)).unwrap().to_vec().unwrap();
    let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
    prop_assert!(bits(&y) == bits(&y0), "the pipelined tf32 kernel differs from gemm_tc_fwd_f32");
    if bias {
        // Linear: x [batch·m, k] · wᵀ (w [n, k]: both k-contiguous) + bias in the epilogue
        use reclmis::ops::gemm::linear;
        let rows = c.batch * c.m;
        let x = tensor(&values(rows * c.k, seed ^ 1, false), &[rows, c.k], dev);
        let w = tensor(&values(c.n * c.k, seed ^ 2, false), &[c.n, c.k], dev);
        let bv = tensor(&values(c.n, seed ^ 3, false), &[c.n], dev);
        let run = |cand| with_candidate(cand, || linear::linear(&x, &w, Some(&bv), GemmAlgo::TensorCore));
        let (yp, y0) = (run(name).unwrap().to_vec().unwrap(), run("tf32_mma").unwrap().to_vec().unwrap());
        prop_assert!(bits(&yp) == bits(&y0), "the pipelined tf32 Linear (bias epilogue) differs");
    }
    Ok(())
}

/// Sizes that are multiples of 4 (whole 16-byte chunks of f32) near the tile edges.
#[cfg(feature = "autocast")]
fn pipe_tf32_case() -> impl Strategy<Value = Case> {
    let edge = || prop_oneof![1usize..=3, 15usize..=17, 31usize..=33].prop_map(|u| 4 * u);
    (case(), edge(), edge(), prop_oneof![1usize..=5, 7usize..=9].prop_map(|u| 4 * u)).prop_map(|(c, m, n, k)| Case {
        m,
        n,
        k,
        ..c
    })
}

#[cfg(feature = "autocast")]
per_device!(check_gemm_pipe_tf32, (
    c in pipe_tf32_case(),
    tile in prop_oneof![Just(64u32), Just(128)],
    bias in any::<bool>(),
    seed in any::<u64>(),
));

#[test]
fn shape_errors_are_typed() {
    let dev = Device::Cpu;
    let a = tensor(&[0.0; 6], &[2, 3], &dev);
    let e = gemm::matmul(&a, &a, GemmOpts::default()).unwrap_err().to_string();
    assert!(e.contains("inner dims differ"), "{e}");
    let b = tensor(&[0.0; 24], &[4, 3, 2], &dev);
    let c = tensor(&[0.0; 36], &[3, 2, 6], &dev);
    let e = gemm::matmul(&b, &c, GemmOpts::default()).unwrap_err().to_string();
    assert!(e.contains("batch dims"), "{e}");
}

/// Linear (y = x·wᵀ + b, torch's layout) with the bias in the GEMM epilogue, and its backward.
fn check_linear(
    dev: &Device,
    lead: Vec<usize>,
    kn: (usize, usize),
    bias: bool,
    seed: u64,
) -> Result<(), TestCaseError> {
    use reclmis::ops::gemm::linear;
    let (k, n) = kn;
    let rows: usize = lead.iter().product();
    let xs = [lead.clone(), vec![k]].concat();
    let x = values(rows * k, seed, false);
    let w = values(n * k, seed ^ 1, false);
    let b = values(n, seed ^ 2, false);
    let (xt, wt, bt) = (tensor(&x, &xs, dev), tensor(&w, &[n, k], dev), tensor(&b, &[n], dev));
    let (plan, _) = gemm::plan(&[rows, k], &[n, k], false, true).unwrap();
    let (mut want, mut mag) = reference::gemm(&f64s(&x), &f64s(&w), &plan, 1.0);
    if bias {
        for (i, (y, m)) in want.iter_mut().zip(mag.iter_mut()).enumerate() {
            *y += b[i % n] as f64;
            *m += b[i % n].abs() as f64;
        }
    }
    let algos: &[GemmAlgo] =
        if dev.is_gpu_like() { &[GemmAlgo::Tiled, GemmAlgo::TensorCore] } else { &[GemmAlgo::Auto] };
    for &algo in algos {
        let y = linear::linear(&xt, &wt, bias.then_some(&bt), algo).unwrap();
        let want_shape = [lead.clone(), vec![n]].concat();
        prop_assert_eq!(y.shape(), want_shape.as_slice());
        assert_none(
            &format!("{algo:?}"),
            mismatch_scaled(&y.to_vec().unwrap(), &want, &mag, tolerance(algo, k + 1), 0.0),
        )?;
    }
    let dy = values(rows * n, seed ^ 3, false);
    let outs = [lead.clone(), vec![n]].concat();
    let g = linear::linear_backward(&xt, &wt, &tensor(&dy, &outs, dev), bias, GemmAlgo::Tiled).unwrap();
    let (wx, ww) = reference::gemm_backward(&f64s(&x), &f64s(&w), &f64s(&dy), &plan, 1.0);
    let abs = |v: &[f32]| -> Vec<f64> { v.iter().map(|x| x.abs() as f64).collect() };
    let (mx, mw) = reference::gemm_backward(&abs(&x), &abs(&w), &abs(&dy), &plan, 1.0);
    let terms = rows.max(n) as f64;
    assert_none("dx", mismatch_scaled(&g.dx.to_vec().unwrap(), &wx, &mx, (terms + 2.0) * EPS32, 0.0))?;
    assert_none("dw", mismatch_scaled(&g.dw.to_vec().unwrap(), &ww, &mw, (terms + 2.0) * EPS32, 0.0))?;
    match g.db {
        Some(db) => {
            let mut wb = vec![0.0f64; n];
            let mut mb = vec![0.0f64; n];
            for (i, d) in dy.iter().enumerate() {
                wb[i % n] += *d as f64;
                mb[i % n] += d.abs() as f64;
            }
            assert_none("db", mismatch_scaled(&db.to_vec().unwrap(), &wb, &mb, (rows as f64 + 2.0) * EPS32, 0.0))
        }
        None => {
            prop_assert!(!bias);
            Ok(())
        }
    }
}

per_device!(check_linear, (
    lead in prop::collection::vec(small_dim(), 1..3),
    kn in (dim(), dim()),
    bias in any::<bool>(),
    seed in any::<u64>(),
));
