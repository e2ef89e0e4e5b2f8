//! `reclmis selfcheck`: every op family on the chosen device against its f64 reference, on
//! seeded data with odd sizes. A quick way to see that a device computes what the cpu does.

use crate::device::Device;
use crate::error::Result;
use crate::ops::elementwise::{self, BinaryOp, UnaryOp};
use crate::ops::gemm::{self, GemmAlgo, GemmOpts};
use crate::ops::{attention, ccl, conv, layer_norm, loss, pool, reduce, softmax, transpose};
use crate::tensor::{DType, Tensor};
use crate::testing::{f64s, mismatch, mismatch_scaled, Rng, EPS32, EPS_TF32};

pub struct Report {
    pub ok: bool,
    pub text: String,
}

pub fn run(dev: &Device) -> Result<Report> {
    let mut rng = Rng::new(2026);
    let mut lines = vec![format!("selfcheck on {}", dev.describe())];
    let mut ok = true;
    let mut record = |name: &str, m: Option<String>| {
        ok &= m.is_none();
        lines.push(match m {
            None => format!("  ok    {name}"),
            Some(e) => format!("  FAIL  {name}: {e}"),
        });
    };

    let x = rng.vec(37 * 53, -4.0, 4.0);
    let xt = Tensor::from_vec(x.clone(), &[37, 53], dev)?;
    for op in [UnaryOp::Relu, UnaryOp::Sigmoid, UnaryOp::Exp, UnaryOp::Scale(-1.5), UnaryOp::AddScalar(0.25)] {
        let y = elementwise::unary(&xt, op)?.to_vec()?;
        record(
            &format!("unary {op:?}"),
            mismatch(&y, &elementwise::reference::unary(&f64s(&x), op), 1e-6, 4.0 * EPS32),
        );
    }
    let b = rng.vec(53, -2.0, 2.0);
    let bt = Tensor::from_vec(b.clone(), &[1, 53], dev)?;
    for op in [BinaryOp::Add, BinaryOp::Sub, BinaryOp::Mul] {
        let y = elementwise::binary(&xt, &bt, op)?.to_vec()?;
        let want = elementwise::reference::binary(&f64s(&x), &[37, 53], &f64s(&b), &[1, 53], op);
        record(&format!("binary {op:?} (broadcast)"), mismatch(&y, &want, 1e-6, 2.0 * EPS32));
    }
    for (axis, (outer, n, inner)) in [(1isize, (37, 53, 1)), (0, (1, 37, 53))] {
        for op in [reduce::ReduceOp::Sum, reduce::ReduceOp::Max] {
            let (y, _) = reduce::reduce(&xt, axis, op)?;
            let (want, _) = reduce::reference::reduce(&f64s(&x), outer, n, inner, op);
            // a sum of n values of magnitude <= 4 has rounding error below n·eps·4
            record(
                &format!("reduce {op:?} axis {axis}"),
                mismatch(&y.to_vec()?, &want, 4.0 * n as f64 * EPS32 * 4.0, 0.0),
            );
        }
    }
    let s = softmax::softmax(&xt)?.to_vec()?;
    record("softmax", mismatch(&s, &softmax::reference::forward(&f64s(&x), 53, false), 1e-7, 64.0 * EPS32));
    let t = transpose::transpose(&xt, 0, 1)?.to_vec()?;
    record("transpose", mismatch(&t, &transpose::reference::permute(&f64s(&x), &[37, 53], &[1, 0]), 0.0, 0.0));

    let (m, k, n) = (67, 45, 71);
    let a = rng.vec(m * k, -1.0, 1.0);
    let bb = rng.vec(k * n, -1.0, 1.0);
    let (at, bt2) = (Tensor::from_vec(a.clone(), &[m, k], dev)?, Tensor::from_vec(bb.clone(), &[k, n], dev)?);
    let (plan, _) = gemm::plan(&[m, k], &[k, n], false, false)?;
    let (want, mag) = gemm::reference::gemm(&f64s(&a), &f64s(&bb), &plan, 1.0);
    let algos: &[(GemmAlgo, f64)] = if dev.is_gpu_like() {
        &[(GemmAlgo::Tiled, k as f64 * EPS32), (GemmAlgo::TensorCore, 2.0 * EPS_TF32 + k as f64 * EPS32)]
    } else {
        &[(GemmAlgo::Auto, k as f64 * EPS32)]
    };
    for &(algo, tol) in algos {
        let c = gemm::matmul(&at, &bt2, GemmOpts { algo, ..Default::default() })?.to_vec()?;
        record(&format!("gemm {algo:?} {m}x{k}x{n}"), mismatch_scaled(&c, &want, &mag, tol, 0.0));
    }
    // bf16 (the pipelined kernel on cuda/emu: sizes multiples of 8), against the f64 product of
    // the bf16-rounded operands: one bf16 rounding of C (2^-8 of |C| <= the magnitude) plus the
    // f32 sum's k roundings
    let (m, k, n) = (136, 40, 72);
    let bf = |v: &[f32]| -> Vec<f32> { v.iter().map(|&x| half::bf16::from_f32(x).to_f32()).collect() };
    let (a, bb) = (bf(&rng.vec(m * k, -1.0, 1.0)), bf(&rng.vec(k * n, -1.0, 1.0)));
    let to_bf16 =
        |v: &[f32], shape: &[usize]| crate::ops::cast::cast(&Tensor::from_vec(v.to_vec(), shape, dev)?, DType::BF16);
    let (plan, _) = gemm::plan(&[m, k], &[k, n], false, false)?;
    let (want, mag) = gemm::reference::gemm(&f64s(&a), &f64s(&bb), &plan, 1.0);
    let c = gemm::matmul(&to_bf16(&a, &[m, k])?, &to_bf16(&bb, &[k, n])?, GemmOpts::default())?.to_vec()?;
    record(&format!("gemm bf16 {m}x{k}x{n}"), mismatch_scaled(&c, &want, &mag, 1.0 / 256.0 + k as f64 * EPS32, 0.0));

    // U-Net pieces: a 3×3 convolution with bias, 2×2 max-pool.
    let cs = conv::ConvShape { b: 2, ci: 5, co: 7, h: 9, w: 11, kh: 3, kw: 3 };
    let (xv, wv, bv) = (rng.vec(2 * 5 * 99, -1.0, 1.0), rng.vec(7 * 5 * 9, -1.0, 1.0), rng.vec(7, -1.0, 1.0));
    let want = conv::reference::conv2d(&f64s(&xv), &f64s(&wv), Some(&f64s(&bv)), &cs);
    let abs = |v: &[f32]| -> Vec<f64> { v.iter().map(|a| a.abs() as f64).collect() };
    let mag = conv::reference::conv2d(&abs(&xv), &abs(&wv), Some(&abs(&bv)), &cs);
    let (xt, wt, bt) = (
        Tensor::from_vec(xv.clone(), &[2, 5, 9, 11], dev)?,
        Tensor::from_vec(wv, &[7, 5, 3, 3], dev)?,
        Tensor::from_vec(bv, &[7], dev)?,
    );
    for &(algo, tol) in algos {
        let y = conv::conv2d(&xt, &wt, Some(&bt), algo)?.to_vec()?;
        // tol was set for k = 45 terms above; the convolution sums 45 too
        record(&format!("conv2d 3x3 {algo:?}"), mismatch_scaled(&y, &want, &mag, tol, 0.0));
    }
    if let Device::Cpu = dev {
        // 32 channels in and out: the cpu takes Winograd F(2×2, 3×3), whose rounding is bounded
        // through the transformed magnitudes
        let ws = conv::ConvShape { b: 1, ci: 32, co: 32, h: 9, w: 11, kh: 3, kw: 3 };
        let (xw, ww) = (rng.vec(32 * 99, -1.0, 1.0), rng.vec(32 * 32 * 9, -1.0, 1.0));
        let want = conv::reference::conv2d(&f64s(&xw), &f64s(&ww), None, &ws);
        let mag = conv::reference::winograd_magnitude(&f64s(&xw), &f64s(&ww), None, &ws);
        let (xt, wt) = (Tensor::from_vec(xw, &[1, 32, 9, 11], dev)?, Tensor::from_vec(ww, &[32, 32, 3, 3], dev)?);
        let y = conv::conv2d(&xt, &wt, None, GemmAlgo::Auto)?.to_vec()?;
        record(
            "conv2d 3x3 32->32 (Winograd)",
            mismatch_scaled(&y, &want, &mag, conv::reference::winograd_tol(32), 0.0),
        );
    }
    let (pooled, _) = pool::max_pool2(&xt)?;
    let (pw, _) = pool::reference::max_pool2(&f64s(&xv), 10, 9, 11);
    record("max_pool2", mismatch(&pooled.to_vec()?, &pw, 0.0, 0.0));

    // Losses: Dice + BCE from logits, the CCL similarity.
    let (z, g) = (rng.vec(3 * 50, -4.0, 4.0), (0..150).map(|i| (i % 3 == 0) as u8 as f32).collect::<Vec<_>>());
    let seg =
        loss::dice_bce(&Tensor::from_vec(z.clone(), &[3, 50], dev)?, &Tensor::from_vec(g.clone(), &[3, 50], dev)?)?;
    let (dice, bce, crit) = loss::reference::dice_bce(&f64s(&z), &f64s(&g), 3, 50);
    record("dice + bce", mismatch(&seg.loss.to_vec()?, &[dice, bce, crit], 1e-5, 1e-5));
    let s = ccl::reference::Sizes { b: 3, l: 5, n: 7, d: 16 };
    let (tv, vv) = (rng.vec(3 * 5 * 16, -1.0, 1.0), rng.vec(3 * 7 * 16, -1.0, 1.0));
    let (mv, twv, vwv) = (vec![1.0f32; 15], rng.vec(15, 0.0, 1.0), rng.vec(21, 0.0, 1.0));
    let t = |v: &[f32], sh: &[usize]| Tensor::from_vec(v.to_vec(), sh, dev);
    let f = ccl::ccl_similarity(
        &t(&tv, &[3, 5, 16])?,
        &t(&vv, &[3, 7, 16])?,
        &t(&mv, &[3, 5])?,
        &t(&twv, &[3, 5])?,
        &t(&vwv, &[3, 7])?,
    )?;
    let (_, _, logits, _, _) = ccl::reference::ccl(&f64s(&tv), &f64s(&vv), &f64s(&mv), &f64s(&twv), &f64s(&vwv), &s);
    // dot products of 16 unit-vector terms, weighted sums of 5 and 7: well within 1e-5
    record("ccl similarity", mismatch(&f.logits.to_vec()?, &logits, 1e-5, 0.0));

    // Transformer pieces: conditioned causal attention (both product kinds), layer norm.
    let (bq, tq, sk, heads, dh) = (2, 7, 19, 2, 24);
    let e = heads * dh;
    let (qv, kv, vv) =
        (rng.vec(bq * tq * e, -1.0, 1.0), rng.vec(bq * sk * e, -1.0, 1.0), rng.vec(bq * sk * e, -1.0, 1.0));
    let wv = rng.vec(bq * sk, 0.0, 1.0);
    let (qt, kt, vt, wt) = (t(&qv, &[bq, tq, e])?, t(&kv, &[bq, sk, e])?, t(&vv, &[bq, sk, e])?, t(&wv, &[bq, sk])?);
    let problem = attention::reference::Problem {
        b: bq,
        h: heads,
        tq,
        s: sk,
        dh,
        scale: 1.0 / (dh as f64).sqrt(),
        causal: true,
        valid: None,
        cond: attention::reference::Cond::Probs(f64s(&wv)),
    };
    let want = problem.forward(&f64s(&qv), &f64s(&kv), &f64s(&vv));
    let algos: &[GemmAlgo] =
        if dev.is_gpu_like() { &[GemmAlgo::Tiled, GemmAlgo::TensorCore] } else { &[GemmAlgo::Auto] };
    for &algo in algos {
        let o = attention::AttnOpts {
            causal: true,
            condition: attention::Condition::Probs(&wt),
            algo,
            ..attention::AttnOpts::new(heads)
        };
        let got = attention::attention(&qt, &kt, &vt, &o)?.o.to_vec()?;
        // logits of |q||k| <= 24/√24 ≈ 4.9: tf32 operands move them by ~2·2^-11·4.9, which moves
        // the output (a probability-weighted mean of |v| <= 1) by about twice that
        let tol = if algo == GemmAlgo::TensorCore { 16.0 * EPS_TF32 * 5.0 } else { 64.0 * EPS32 * 5.0 };
        record(
            &format!("attention (causal, official condition) {algo:?}"),
            mismatch_scaled(&got, &want.o, &want.o_mag, tol, 1e-30),
        );
    }
    let lv: Vec<f32> = rng.vec(9 * 40, -3.0, 3.0).iter().map(|x| x + 4.0).collect();
    let ln = layer_norm::layer_norm(&t(&lv, &[9, 40])?, None, None, 1e-5)?;
    // values of a few units with a spread of ~1.7: eps·(|x| / std)·√40 per element
    record(
        "layer_norm",
        mismatch(&ln.y.to_vec()?, &layer_norm::reference::forward(&f64s(&lv), None, None, 40, 1e-5), 2e-5, 0.0),
    );

    // the emulator's count of ldmatrix bank conflicts (a report: conflicts cost time, not results)
    #[cfg(feature = "emu")]
    if matches!(dev, Device::Emu) {
        for (k, s) in crate::device::emu::smem_report() {
            lines.push(format!(
                "  smem  {}: {} ldmatrix phases, {} extra wavefronts from bank conflicts",
                k.name(),
                s.phases,
                s.extra_wavefronts
            ));
        }
    }
    lines.push(if ok { "all ok".into() } else { "FAILED".into() });
    Ok(Report { ok, text: lines.join("\n") + "\n" })
}
