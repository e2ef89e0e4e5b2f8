//! The bf16 GEMM (`matmul` on bf16 tensors: mma.sync m16n8k16 on cuda and emu, f32 GEMM of the
//! widened operands on cpu) and its backward, against the f64 product of the bf16 operands; on a
//! GPU, the kernel against the emulator (the only check of the bf16 fragment layout).

mod common;
use common::gemm_case::{case, Case};
use common::*;
use proptest::prelude::*;
use reclmis::ops::cast::cast;
use reclmis::ops::gemm::{self, reference, GemmAlgo, GemmOpts};
use reclmis::testing::EPS32;
use reclmis::{DType, Device, Tensor};

/// bf16 unit roundoff: 8 significant bits.
const EPS_BF16: f64 = 1.0 / 256.0;

/// The bound per element, derived: the products of bf16 values are exact in f32, so the f32 sum
/// of k of them is within (k+2)·u32·Σ|a||b| of the exact sum (γ_k, with slack for the order of
/// the sum on the hardware), and the one rounding to bf16 adds at most u_bf16 of the value. With
/// `roundings` = 2 (a shared operand's gradient: per-batch partial sums rounded, then their sum
/// rounded) the rounding term is 2·u_bf16 of Σ|terms|.
fn check(
    what: &str,
    got: &[f32],
    want: &[f64],
    mag: &[f64],
    terms: usize,
    roundings: f64,
) -> Result<(), TestCaseError> {
    for (i, ((&g, &w), &m)) in got.iter().zip(want).zip(mag).enumerate() {
        let allowed = if roundings > 1.0 { roundings * EPS_BF16 * m } else { EPS_BF16 * w.abs() }
            + (terms as f64 + 2.0) * EPS32 * m * (1.0 + EPS_BF16);
        prop_assert!(
            (g as f64 - w).abs() <= allowed && !g.is_nan(),
            "{}: element {} = {} vs {} (allowed {:e})",
            what,
            i,
            g,
            w,
            allowed
        );
    }
    Ok(())
}

/// Random values rounded to bf16, as a bf16 tensor and as the exact f64 values it holds.
fn bf16_operand(shape: &[usize], seed: u64, dev: &Device) -> (Tensor, Vec<f64>) {
    let t = cast(&tensor(&values(shape.iter().product(), seed, false), shape, dev), DType::BF16).unwrap();
    let exact = t.to_vec().unwrap().iter().map(|&v| v as f64).collect();
    (t, exact)
}

fn check_gemm_bf16(dev: &Device, c: Case, seed: u64) -> Result<(), TestCaseError> {
    let (sa, sb) = c.shapes();
    let (at, a) = bf16_operand(&sa, seed, dev);
    let (bt, b) = bf16_operand(&sb, seed ^ 7, dev);
    let opts = c.opts(GemmAlgo::Auto);
    let (plan, out) = gemm::plan(&sa, &sb, c.trans_a, c.trans_b).unwrap();
    let y = gemm::matmul(&at, &bt, opts).unwrap();
    prop_assert_eq!(y.dtype(), DType::BF16);
    prop_assert_eq!(y.shape(), out.as_slice());
    let (want, mag) = reference::gemm(&a, &b, &plan, c.alpha as f64);
    check("C", &y.to_vec().unwrap(), &want, &mag, c.k, 1.0)?;
    // backward: dA sums n products per batch entry (then the batch for a shared A), dB m
    let (dct, dc) = bf16_operand(&out, seed ^ 11, dev);
    let (da, db) = gemm::matmul_backward(&at, &bt, &dct, opts).unwrap();
    prop_assert_eq!((da.dtype(), db.dtype()), (DType::BF16, DType::BF16));
    let (wa, wb) = reference::gemm_backward(&a, &b, &dc, &plan, c.alpha as f64);
    let abs = |v: &[f64]| -> Vec<f64> { v.iter().map(|x| x.abs()).collect() };
    let (ma, mb) = reference::gemm_backward(&abs(&a), &abs(&b), &abs(&dc), &plan, c.alpha.abs() as f64);
    let terms = c.m.max(c.n) * c.batch;
    check("dA", &da.to_vec().unwrap(), &wa, &ma, terms, if c.shared == 1 { 2.0 } else { 1.0 })?;
    check("dB", &db.to_vec().unwrap(), &wb, &mb, terms, if c.shared == 2 { 2.0 } else { 1.0 })
}

per_device!(check_gemm_bf16, (c in case(), seed in any::<u64>()));

/// The pipelined kernels (cp.async ring, ldmatrix from swizzled tiles) at both block tiles and
/// every layout, on sizes that are multiples of 8 around the 64 and 128 tile edges and around the
/// 32-deep k tile: the same bound as every bf16 product, the pipelined kernel really chosen, and
/// ldmatrix free of bank conflicts (the emulator counts them).
fn check_gemm_pipe(dev: &Device, c: Case, tile: u32, seed: u64) -> Result<(), TestCaseError> {
    let (sa, sb) = c.shapes();
    let (at, a) = bf16_operand(&sa, seed, dev);
    let (bt, b) = bf16_operand(&sb, seed ^ 5, dev);
    let (plan, _) = gemm::plan(&sa, &sb, c.trans_a, c.trans_b).unwrap();
    let (kernel, got_tile, _) = gemm::with_bf16_tile(tile, || gemm::bf16_kernel(&plan, [at.dev_ptr(), bt.dev_ptr()]));
    if !matches!(dev, Device::Cpu) {
        prop_assert_eq!(got_tile, tile, "{:?} must take the pipelined kernel", kernel);
    }
    let y = gemm::with_bf16_tile(tile, || gemm::matmul(&at, &bt, c.opts(GemmAlgo::Auto))).unwrap();
    #[cfg(feature = "emu")]
    if matches!(dev, Device::Emu) {
        let s = reclmis::device::emu::last_smem_stats();
        prop_assert!(s.phases > 0 && s.extra_wavefronts == 0, "ldmatrix phases {:?}", s);
    }
    let (want, mag) = reference::gemm(&a, &b, &plan, c.alpha as f64);
    check("C", &y.to_vec().unwrap(), &want, &mag, c.k, 1.0)
}

/// Sizes that are multiples of 8 (whole 16-byte chunks) near the tile edges.
fn pipe_case() -> impl Strategy<Value = Case> {
    let edge = || prop_oneof![1usize..=3, 7usize..=9, 15usize..=17, 23usize..=25].prop_map(|u| 8 * u);
    (case(), edge(), edge(), prop_oneof![1usize..=5, 7usize..=9].prop_map(|u| 8 * u)).prop_map(|(c, m, n, k)| Case {
        m,
        n,
        k,
        ..c
    })
}

per_device!(check_gemm_pipe, (c in pipe_case(), tile in prop_oneof![Just(64u32), Just(128)], seed in any::<u64>()));

/// bf16 with f32, either way round, is refused.
#[test]
fn mixed_operands_are_refused() {
    let dev = Device::Cpu;
    let f = tensor(&[1.0; 4], &[2, 2], &dev);
    let b = cast(&f, DType::BF16).unwrap();
    for (x, y) in [(&f, &b), (&b, &f)] {
        let e = gemm::matmul(x, y, GemmOpts::default()).unwrap_err().to_string();
        assert!(e.contains("dtype"), "{e}");
    }
}

/// The bf16 kernel on the GPU against the same kernel on the emulator: the same bf16 operands
/// and f32 accumulation, differing only in the order of the sum (the emulator's is k order, the
/// hardware's undocumented) and then possibly by one bf16 rounding step. A wrong fragment layout
/// in the emulator or the kernel shows as O(1) errors, far beyond this bound.
#[test]
#[ignore = "needs a CUDA GPU"]
fn bf16_gemm_gpu_matches_emulator() {
    let (gpu, emu) = (device("cuda"), device("emu"));
    for (batch, m, n, k) in [(1, 16, 8, 16), (1, 64, 64, 16), (2, 67, 45, 33), (3, 129, 97, 131)] {
        let run = |dev: &Device| {
            let (a, _) = bf16_operand(&[batch, m, k], 1, dev);
            let (b, _) = bf16_operand(&[batch, k, n], 2, dev);
            gemm::matmul(&a, &b, GemmOpts::default()).unwrap().to_vec().unwrap()
        };
        let (g, e) = (run(&gpu), run(&emu));
        for (i, (x, y)) in g.iter().zip(&e).enumerate() {
            // two bf16 roundings apart at most, plus the f32 sums' difference (|values| <= 3)
            let allowed = 2.0 * EPS_BF16 * x.abs().max(y.abs()) as f64 + (k as f64 + 2.0) * EPS32 * 9.0 * k as f64;
            assert!(((x - y).abs() as f64) <= allowed, "{batch}x{m}x{n}x{k} element {i}: gpu {x} vs emu {y}");
        }
    }
}
