//! Convolution benchmark cases (the U-Net's 3×3 shapes at batch 1 and 8, a backward, the PLAM
//! gate's 1×1, the decoder's convolution over a concatenation), `--shape BxCIxCOxHW`, and the
//! convolution self-check (every algorithm of the device; Winograd on the cpu).

use crate::bench::{cap, dims, gemm_algo, rand_tensor, Case, Group, Shaped};
use crate::device::Device;
use crate::error::{Error, Result};
use crate::ops::conv;
use crate::ops::gemm::GemmAlgo;
use crate::selfcheck::{gemm_algos, Checks};
use crate::tensor::Tensor;
use crate::testing::{f64s, mismatch_scaled, EPS32};

pub const GROUP: Group = Group {
    names: &[
        "conv3x3",
        "conv3x3_b8",
        "conv3x3_bwd",
        "conv1x1",
        "conv3x3_cat",
        "conv3x3_bf16",
        "conv3x3_bwd_bf16",
        "conv1x1_bf16",
    ],
    cases,
    shaped: &[
        Shaped { op: "conv3x3", form: "BxCIxCOxHW (square maps)", make: shaped3 },
        Shaped { op: "conv1x1", form: "BxCIxCOxHW", make: shaped1 },
    ],
    check: Some(check),
};

/// The U-Net's 3×3 convolutions at the official shapes (encoder 224² × 64 down to 14² × 512, the
/// decoder's 1024→256, 512→128, 256→64, 128→64), batch 1, some at batch 8, one backward; and the
/// PLAM gate's 1×1 convolution.
fn cases(dev: &Device, small: bool, v: &mut Vec<Case>) -> Result<()> {
    // (op, batch, ci, co, hw)
    let shapes: &[(&'static str, usize, usize, usize, usize)] = if small {
        &[
            ("conv3x3", 1, 8, 8, 16),
            ("conv3x3_b8", 2, 8, 8, 16),
            ("conv3x3_bwd", 1, 8, 8, 16),
            ("conv1x1", 1, 16, 16, 16),
            ("conv3x3_cat", 1, 8, 8, 16),
            ("conv3x3_bf16", 1, 8, 8, 16),
            ("conv3x3_bwd_bf16", 1, 8, 8, 16),
            ("conv1x1_bf16", 1, 16, 16, 16),
        ]
    } else {
        &[
            ("conv3x3", 1, 64, 64, 224),
            ("conv3x3", 1, 128, 128, 112),
            ("conv3x3", 1, 256, 256, 56),
            ("conv3x3", 1, 512, 512, 28),
            ("conv3x3", 1, 512, 512, 14),
            ("conv3x3", 1, 1024, 256, 28),
            ("conv3x3", 1, 512, 128, 56),
            ("conv3x3", 1, 256, 64, 112),
            ("conv3x3", 1, 128, 64, 224),
            ("conv3x3_b8", 8, 64, 64, 224),
            ("conv3x3_b8", 8, 256, 256, 28),
            ("conv3x3_bwd", 1, 64, 64, 224),
            ("conv3x3_bwd", 1, 512, 512, 28),
            ("conv1x1", 1, 64, 64, 224),
            ("conv1x1", 1, 512, 512, 28),
            // the decoder's first convolution over concat[gated skip, upsampled], never built
            ("conv3x3_cat", 1, 1024, 256, 28),
            ("conv3x3_cat", 1, 128, 64, 224),
            // bf16 autocast's convolutions (the pipelined kernels on cuda/emu)
            ("conv3x3_bf16", 1, 64, 64, 224),
            ("conv3x3_bf16", 1, 512, 512, 28),
            ("conv3x3_bf16", 8, 64, 64, 224),
            ("conv3x3_bwd_bf16", 1, 64, 64, 224),
            ("conv3x3_bwd_bf16", 1, 512, 512, 28),
            // the PLAM gate's 1×1 convolutions at bf16 (no bias)
            ("conv1x1_bf16", 1, 64, 64, 224),
            ("conv1x1_bf16", 1, 512, 512, 28),
        ]
    };
    for (i, &(op, b, ci, co, hw)) in shapes.iter().enumerate() {
        if op.ends_with("_bf16") {
            v.push(conv_bf16_case(dev, op, (b, ci, co, hw), i as u64)?);
            continue;
        }
        if !matches!(op, "conv3x3_cat" | "conv3x3_bwd") {
            v.push(conv_case(dev, op, (b, ci, co, hw), i as u64)?);
            continue;
        }
        let k = 3;
        let x = rand_tensor(&[b, ci, hw, hw], 20 + i as u64, dev)?;
        let w = rand_tensor(&[co, ci, k, k], 40 + i as u64, dev)?;
        let bias = rand_tensor(&[co], 60 + i as u64, dev)?;
        let s = conv::ConvShape { b, ci, co, h: hw, w: hw, kh: k, kw: k };
        let algo = gemm_algo(dev);
        let bytes = 4.0 * (b * (ci + co) * hw * hw + co * ci * k * k) as f64;
        let shape = format!("b{b} {ci}->{co} {hw}x{hw} k{k}");
        if op == "conv3x3_cat" {
            let half = ci / 2;
            let (x1, x2) =
                (rand_tensor(&[b, half, hw, hw], 90 + i as u64, dev)?, rand_tensor(&[b, ci - half, hw, hw], 95, dev)?);
            v.push(Case {
                op,
                shape: format!("b{b} ({half}+{})->{co} {hw}x{hw} k{k}", ci - half),
                flops: s.flops(),
                bytes,
                peer: Some(format!("conv_cat {b} {half} {} {co} {hw}", ci - half)),
                validate: None,
                run: Box::new(move || conv::conv2d_cat(&[&x1, &x2], &w, Some(&bias), algo)),
            });
        } else {
            let dy = rand_tensor(&[b, co, hw, hw], 80 + i as u64, dev)?;
            v.push(Case {
                op,
                shape,
                flops: 2.0 * s.flops(),
                bytes: 2.0 * bytes,
                peer: Some(format!("conv_bwd {b} {ci} {co} {hw} {k}")),
                validate: None,
                run: Box::new(move || Ok(conv::conv2d_backward(&x, &w, &dy, true, algo)?.dw)),
            });
        }
    }
    Ok(())
}

/// A 3×3 convolution with bias on bf16 operands ("conv3x3_bf16": the forward, validated on
/// sampled outputs against the f64 sums of the bf16 values: one bf16 rounding, 2^-8 of the value,
/// plus the f32 sums far below 1e-4 of the magnitude) or its backward ("conv3x3_bwd_bf16": dx,
/// dw and db, bf16 dy); "conv1x1_bf16": the PLAM gate's 1×1 forward, no bias.
fn conv_bf16_case(
    dev: &Device,
    op: &'static str,
    (b, ci, co, hw): (usize, usize, usize, usize),
    seed: u64,
) -> Result<Case> {
    use crate::ops::cast::cast;
    use crate::tensor::DType;
    let one = op == "conv1x1_bf16";
    let k = if one { 1 } else { 3 };
    let x = cast(&rand_tensor(&[b, ci, hw, hw], 20 + seed, dev)?, DType::BF16)?;
    let w = cast(&rand_tensor(&[co, ci, k, k], 40 + seed, dev)?, DType::BF16)?;
    let bias = if one { Tensor::zeros(&[co], dev)? } else { rand_tensor(&[co], 60 + seed, dev)? };
    let bias = cast(&bias, DType::BF16)?;
    let s = conv::ConvShape { b, ci, co, h: hw, w: hw, kh: k, kw: k };
    let bytes = 2.0 * (b * (ci + co) * hw * hw + co * ci * k * k) as f64;
    let shape = format!("b{b} {ci}->{co} {hw}x{hw} k{k} bf16");
    if op == "conv3x3_bwd_bf16" {
        let dy = cast(&rand_tensor(&[b, co, hw, hw], 80 + seed, dev)?, DType::BF16)?;
        return Ok(Case {
            op,
            shape,
            flops: 2.0 * s.flops(),
            bytes: 2.0 * bytes,
            peer: Some(format!("conv_bwd_bf16 {b} {ci} {co} {hw} {k}")),
            validate: None,
            run: Box::new(move || Ok(conv::bf16::conv2d_backward_bf16(&x, &w, &dy, true)?.dw)),
        });
    }
    Ok(Case {
        op,
        shape,
        flops: s.flops(),
        bytes,
        peer: Some(if one {
            format!("conv1x1_bf16 {b} {ci} {co} {hw}")
        } else {
            format!("conv_bf16 {b} {ci} {co} {hw} {k}")
        }),
        validate: Some({
            let (xf, wf, bf) = (cast(&x, DType::F32)?, cast(&w, DType::F32)?, cast(&bias, DType::F32)?);
            Box::new(move |y: &Tensor| {
                sampled_conv_check(&xf, &wf, &bf, &s, &cast(y, DType::F32)?.to_vec()?, 1.0 / 256.0 + 1e-4)
            })
        }),
        run: Box::new(move || conv::bf16::conv2d_bf16(&x, &w, (!one).then_some(&bias))),
    })
}

/// A square-map convolution with bias ("conv3x3" or "conv1x1"); `seed` varies the data.
fn conv_case(dev: &Device, op: &'static str, (b, ci, co, hw): (usize, usize, usize, usize), seed: u64) -> Result<Case> {
    let k = if op == "conv1x1" { 1 } else { 3 };
    let x = rand_tensor(&[b, ci, hw, hw], 20 + seed, dev)?;
    let w = rand_tensor(&[co, ci, k, k], 40 + seed, dev)?;
    let bias = rand_tensor(&[co], 60 + seed, dev)?;
    let s = conv::ConvShape { b, ci, co, h: hw, w: hw, kh: k, kw: k };
    let algo = gemm_algo(dev);
    Ok(Case {
        op,
        shape: format!("b{b} {ci}->{co} {hw}x{hw} k{k}"),
        flops: s.flops(),
        bytes: 4.0 * (b * (ci + co) * hw * hw + co * ci * k * k) as f64,
        peer: Some(format!("conv {b} {ci} {co} {hw} {k}")),
        validate: Some({
            let (x, w, bias) = (x.clone(), w.clone(), bias.clone());
            // tf32 operands (cuda/emu) round each product by up to 2·2^-11; on the cpu,
            // Winograd's transforms and f32 sums stay far below 1e-4 of the magnitude (the op
            // tests bound them exactly): an indexing error is of the order of the magnitude itself
            let tol = if algo == GemmAlgo::TensorCore { 2e-3 } else { 1e-4 };
            Box::new(move |y: &Tensor| sampled_conv_check(&x, &w, &bias, &s, &y.to_vec()?, tol))
        }),
        run: Box::new(move || conv::conv2d(&x, &w, Some(&bias), algo)),
    })
}

/// 64 sampled outputs of a stride-1 convolution with "same" padding against their f64 sums,
/// each within `tol` of the sum of its terms' magnitudes.
fn sampled_conv_check(x: &Tensor, w: &Tensor, bias: &Tensor, s: &conv::ConvShape, y: &[f32], tol: f64) -> Result<()> {
    let (x, w, bias) = (x.to_vec()?, w.to_vec()?, bias.to_vec()?);
    let (pad_h, pad_w) = (s.kh / 2, s.kw / 2);
    let mut r = crate::rng::Rng::new(98);
    for _ in 0..64 {
        let mut pick = |n: usize| (r.next_u64() % n as u64) as usize;
        let (bi, o, oy, ox) = (pick(s.b), pick(s.co), pick(s.h), pick(s.w));
        let (mut acc, mut mag) = (bias[o] as f64, (bias[o] as f64).abs());
        for c in 0..s.ci {
            for ky in 0..s.kh {
                for kx in 0..s.kw {
                    let (iy, ix) = ((oy + ky).wrapping_sub(pad_h), (ox + kx).wrapping_sub(pad_w));
                    if iy < s.h && ix < s.w {
                        let t = x[((bi * s.ci + c) * s.h + iy) * s.w + ix] as f64
                            * w[((o * s.ci + c) * s.kh + ky) * s.kw + kx] as f64;
                        acc += t;
                        mag += t.abs();
                    }
                }
            }
        }
        let got = y[((bi * s.co + o) * s.h + oy) * s.w + ox] as f64;
        if (got - acc).abs() > tol * mag {
            return Err(Error::Other(format!("conv is wrong at ({bi},{o},{oy},{ox}): {got} vs {acc}")));
        }
    }
    Ok(())
}

fn shaped(dev: &Device, op: &'static str, d: &[usize]) -> Result<Case> {
    let [b, ci, co, hw] = dims(d)?;
    cap(b.checked_mul(ci.max(co)).and_then(|x| x.checked_mul(hw)).and_then(|x| x.checked_mul(hw)))?;
    conv_case(dev, op, (b, ci, co, hw), 0)
}

/// `--shape BxCIxCOxHW` of a 3×3 convolution (pad 1) with bias.
fn shaped3(dev: &Device, d: &[usize]) -> Result<Case> {
    shaped(dev, "conv3x3", d)
}

/// `--shape BxCIxCOxHW` of a 1×1 convolution with bias.
fn shaped1(dev: &Device, d: &[usize]) -> Result<Case> {
    shaped(dev, "conv1x1", d)
}

fn check(dev: &Device, c: &mut Checks) -> Result<()> {
    let cs = conv::ConvShape { b: 2, ci: 5, co: 7, h: 9, w: 11, kh: 3, kw: 3 };
    let (xv, wv, bv) = (c.rng.vec(2 * 5 * 99, -1.0, 1.0), c.rng.vec(7 * 5 * 9, -1.0, 1.0), c.rng.vec(7, -1.0, 1.0));
    let want = conv::reference::conv2d(&f64s(&xv), &f64s(&wv), Some(&f64s(&bv)), &cs);
    let abs = |v: &[f32]| -> Vec<f64> { v.iter().map(|a| a.abs() as f64).collect() };
    let mag = conv::reference::conv2d(&abs(&xv), &abs(&wv), Some(&abs(&bv)), &cs);
    let (xt, wt, bt) = (
        Tensor::from_vec(xv, &[2, 5, 9, 11], dev)?,
        Tensor::from_vec(wv, &[7, 5, 3, 3], dev)?,
        Tensor::from_vec(bv, &[7], dev)?,
    );
    // each output sums 5 · 9 = 45 products
    for (algo, tol) in gemm_algos(dev, 45) {
        let y = conv::conv2d(&xt, &wt, Some(&bt), algo)?.to_vec()?;
        c.record(&format!("conv2d 3x3 {algo:?}"), mismatch_scaled(&y, &want, &mag, tol, 0.0));
    }
    // bf16 operands (the pipelined kernels on cuda/emu: channel counts multiples of 8): the f64
    // convolution of the rounded values, within one bf16 rounding (2^-8 of the value, at most of
    // the magnitude) plus the f32 sums' (k + 2) roundings of the magnitude
    {
        use crate::ops::cast::cast;
        use crate::tensor::DType::{BF16, F32};
        let bs = conv::ConvShape { b: 2, ci: 16, co: 24, h: 9, w: 11, kh: 3, kw: 3 };
        let r = |n: usize, c: &mut Checks| -> Vec<f32> {
            c.rng.vec(n, -1.0, 1.0).iter().map(|&v| half::bf16::from_f32(v).to_f32()).collect()
        };
        let (xv, wv, dyv) = (r(2 * 16 * 99, c), r(24 * 16 * 9, c), r(2 * 24 * 99, c));
        let t =
            |v: &[f32], shape: &[usize]| -> Result<Tensor> { cast(&Tensor::from_vec(v.to_vec(), shape, dev)?, BF16) };
        let (xt, wt, dyt) = (t(&xv, &[2, 16, 9, 11])?, t(&wv, &[24, 16, 3, 3])?, t(&dyv, &[2, 24, 9, 11])?);
        let y = cast(&conv::bf16::conv2d_bf16(&xt, &wt, None)?, F32)?.to_vec()?;
        let want = conv::reference::conv2d(&f64s(&xv), &f64s(&wv), None, &bs);
        let mag = conv::reference::conv2d(&abs(&xv), &abs(&wv), None, &bs);
        let tol = |k: usize| 1.0 / 256.0 + (k + 2) as f64 * EPS32;
        c.record("conv2d 3x3 16->24 bf16", mismatch_scaled(&y, &want, &mag, tol(16 * 9), 0.0));
        let g = conv::bf16::conv2d_backward_bf16(&xt, &wt, &dyt, false)?;
        let (dx, dw, _) = conv::reference::conv2d_backward(&f64s(&xv), &f64s(&wv), &f64s(&dyv), &bs);
        let (mdx, mdw, _) = conv::reference::conv2d_backward(&abs(&xv), &abs(&wv), &abs(&dyv), &bs);
        let dxv = cast(&g.dx, F32)?.to_vec()?;
        c.record("conv2d 3x3 16->24 bf16 dx", mismatch_scaled(&dxv, &dx, &mdx, tol(24 * 9), 0.0));
        let dwv = cast(&g.dw, F32)?.to_vec()?;
        c.record("conv2d 3x3 16->24 bf16 dw", mismatch_scaled(&dwv, &dw, &mdw, tol(2 * 99), 0.0));
    }
    if let Device::Cpu = dev {
        // 32 channels in and out: Winograd F(2×2, 3×3) and F(4×4, 3×3) (the tuner's candidates,
        // forced), whose rounding is bounded through the transformed magnitudes
        let ws = conv::ConvShape { b: 1, ci: 32, co: 32, h: 9, w: 11, kh: 3, kw: 3 };
        let (xw, ww) = (c.rng.vec(32 * 99, -1.0, 1.0), c.rng.vec(32 * 32 * 9, -1.0, 1.0));
        let want = conv::reference::conv2d(&f64s(&xw), &f64s(&ww), None, &ws);
        let (xt, wt) =
            (Tensor::from_vec(xw.clone(), &[1, 32, 9, 11], dev)?, Tensor::from_vec(ww.clone(), &[32, 32, 3, 3], dev)?);
        for (name, tiles) in [("winograd", conv::winograd::Tiles::F2), ("winograd4", conv::winograd::Tiles::F4)] {
            let mag = conv::reference::winograd_magnitude_tiles(tiles, &f64s(&xw), &f64s(&ww), None, &ws);
            let y =
                crate::ops::tune::with_candidate(name, || conv::conv2d(&xt, &wt, None, GemmAlgo::Auto))?.to_vec()?;
            c.record(
                &format!("conv2d 3x3 32->32 (Winograd {tiles:?})"),
                mismatch_scaled(&y, &want, &mag, conv::reference::winograd_tol_tiles(tiles, 32), 0.0),
            );
        }
    }
    Ok(())
}
