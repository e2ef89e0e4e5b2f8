//! Attention benchmark cases (fused and composed, forward and forward + backward, at the model's
//! shapes) and the conditioned causal attention self-check.

use crate::bench::{rand_tensor, Case, Group};
use crate::device::Device;
use crate::error::Result;
use crate::ops::attention::{self as attn, pipe::with_unpipelined, AttnOpts, Condition};
use crate::ops::gemm::GemmAlgo;
use crate::ops::softmax;
use crate::selfcheck::Checks;
use crate::tensor::Tensor;
use crate::testing::{f64s, mismatch_scaled, EPS32, EPS_TF32};

pub const GROUP: Group = Group {
    names: &[
        "attention",
        "attention_composed",
        "attention_fwd_bwd",
        "attention_composed_fwd_bwd",
        "attention_bf16",
        "attention_fwd_bwd_bf16",
        "attention_elem",
        "attention_fwd_bwd_elem",
    ],
    cases,
    shaped: &[],
    check: Some(check),
};

/// Attention at the model's shapes: the reconstruction transformers' conditioned cross-attention
/// both ways (18 text tokens and 196 image tokens of a 224² input, 4 heads of 128, official
/// condition), their causal conditioned self-attention over the 196 image tokens, and the CLIP
/// tower's causal, key-masked self-attention (8 heads of 64 over 18 tokens); batch 1 and 32.
/// Each fused next to the composition of primitive ops on the same device.
type AttnInputs = (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor);

#[derive(Clone, Copy)]
struct AttnCfg {
    h: usize,
    causal: bool,
    cond: bool,
    masked: bool,
}

fn attn_opts(x: &AttnInputs, c: AttnCfg) -> AttnOpts<'_> {
    AttnOpts {
        causal: c.causal,
        key_valid: if c.masked { Some(&x.5) } else { None },
        condition: if c.cond { Condition::Probs(&x.4) } else { Condition::None },
        algo: GemmAlgo::TensorCore,
        ..AttnOpts::new(c.h)
    }
}

/// The fused forward's output (`attention`, `attention_elem`).
fn fused_forward(x: &AttnInputs, c: AttnCfg) -> Result<Tensor> {
    Ok(attn::attention(&x.0, &x.1, &x.2, &attn_opts(x, c))?.o)
}

/// The fused forward and backward's dq (`attention_fwd_bwd`, `attention_fwd_bwd_elem`).
fn fused_forward_backward(x: &AttnInputs, c: AttnCfg) -> Result<Tensor> {
    let o = attn_opts(x, c);
    let f = attn::attention(&x.0, &x.1, &x.2, &o)?;
    Ok(attn::attention_backward(&x.0, &x.1, &x.2, &f, &x.3, &o)?.dq)
}

fn cases(dev: &Device, small: bool, v: &mut Vec<Case>) -> Result<()> {
    // (heads, dh, tq, s, causal, conditioned, key mask)
    let shapes: &[(usize, usize, usize, usize, bool, bool, bool)] = &[
        (4, 128, 18, 196, false, true, false),
        (4, 128, 196, 18, false, true, false),
        (4, 128, 196, 196, true, true, false),
        (8, 64, 18, 18, true, false, true),
    ];
    let batches: &[usize] = if small { &[1] } else { &[1, 32] };
    for &b in batches {
        for &(h, dh, tq0, s0, causal, cond, masked) in shapes {
            let (tq, s) = if small { (tq0.min(36), s0.min(36)) } else { (tq0, s0) };
            let e = h * dh;
            let q = rand_tensor(&[b, tq, e], 21, dev)?;
            let k = rand_tensor(&[b, s, e], 22, dev)?;
            let val = rand_tensor(&[b, s, e], 23, dev)?;
            let dout = rand_tensor(&[b, tq, e], 24, dev)?;
            let w = softmax::softmax(&rand_tensor(&[b, s], 25, dev)?)?;
            // 12..17 valid tokens per note, as in QaTa
            let valid: Vec<i32> = (0..b * s).map(|x| (x % s < 12 + (x / s) % 6) as i32).collect();
            let valid = Tensor::from_vec_i32(valid, &[b, s], dev)?;
            let inputs = std::rc::Rc::new((q, k, val, dout, w, valid));
            let shape = format!(
                "B{b} H{h}x{dh} Tq{tq} S{s}{}{}{}",
                if causal { " causal" } else { "" },
                if cond { " cond" } else { "" },
                if masked { " keymask" } else { "" }
            );
            let sh = attn::AttnShape { b, h, tq, s, dh };
            let flops = sh.flops();
            let bytes = 4.0 * (2 * b * tq * e + 2 * b * s * e) as f64;
            let spec = |kind: &str| {
                Some(format!("{kind} {b} {h} {tq} {s} {dh} {} {} {}", causal as u8, cond as u8, masked as u8))
            };
            let cfg = AttnCfg { h, causal, cond, masked };
            let x = inputs.clone();
            v.push(Case {
                op: "attention",
                shape: shape.clone(),
                flops,
                bytes,
                peer: spec("attn"),
                validate: None,
                run: Box::new(move || fused_forward(&x, cfg)),
            });
            // bf16 q, k, v and d_out (cast once for both bf16 cases; the mask and the weights
            // from `inputs`)
            let xb = {
                use crate::ops::cast::cast;
                use crate::tensor::DType::BF16;
                let (q, k, val, dout, ..) = &*inputs;
                std::rc::Rc::new((cast(q, BF16)?, cast(k, BF16)?, cast(val, BF16)?, cast(dout, BF16)?, inputs.clone()))
            };
            // the pipelined forward on cuda/emu, bf16 output
            let x = xb.clone();
            v.push(Case {
                op: "attention_bf16",
                shape: format!("{shape} bf16"),
                flops,
                bytes: bytes / 2.0,
                peer: spec("attn_bf16"),
                validate: None,
                run: Box::new(move || Ok(attn::bf16::attention_bf16(&x.0, &x.1, &x.2, &attn_opts(&x.4, cfg))?.o)),
            });
            // and its backward (the pipelined dQ and dK/dV kernels on cuda/emu) from the bf16 d_out
            v.push(Case {
                op: "attention_fwd_bwd_bf16",
                shape: format!("{shape} bf16"),
                flops: 3.5 * flops,
                bytes,
                peer: spec("attn_fb_bf16"),
                validate: None,
                run: Box::new(move || {
                    let o = attn_opts(&xb.4, cfg);
                    let f = attn::bf16::attention_bf16(&xb.0, &xb.1, &xb.2, &o)?;
                    Ok(attn::bf16::attention_backward_bf16(&xb.0, &xb.1, &xb.2, &f, &xb.3, &o)?.dq)
                }),
            });
            // the same at tf32 on the unpipelined kernels' tensor-core branch (element loads, no
            // cp.async): the pipeline's gain in the same run
            let x = inputs.clone();
            v.push(Case {
                op: "attention_elem",
                shape: shape.clone(),
                flops,
                bytes,
                peer: spec("attn"),
                validate: None,
                run: Box::new(move || with_unpipelined(|| fused_forward(&x, cfg))),
            });
            let x = inputs.clone();
            v.push(Case {
                op: "attention_fwd_bwd_elem",
                shape: shape.clone(),
                flops: 3.5 * flops,
                bytes: 2.0 * bytes,
                peer: spec("attn_fb"),
                validate: None,
                run: Box::new(move || with_unpipelined(|| fused_forward_backward(&x, cfg))),
            });
            let x = inputs.clone();
            v.push(Case {
                op: "attention_composed",
                shape: shape.clone(),
                flops,
                bytes,
                peer: spec("attn"),
                validate: None,
                run: Box::new(move || Ok(attn::composed::forward(&x.0, &x.1, &x.2, &attn_opts(&x, cfg))?.o)),
            });
            let x = inputs.clone();
            v.push(Case {
                op: "attention_fwd_bwd",
                shape: shape.clone(),
                flops: 3.5 * flops,
                bytes: 2.0 * bytes,
                peer: spec("attn_fb"),
                validate: None,
                run: Box::new(move || fused_forward_backward(&x, cfg)),
            });
            let x = inputs;
            v.push(Case {
                op: "attention_composed_fwd_bwd",
                shape,
                flops: 3.5 * flops,
                bytes: 2.0 * bytes,
                peer: spec("attn_fb"),
                validate: None,
                run: Box::new(move || {
                    let o = attn_opts(&x, cfg);
                    let f = attn::composed::forward(&x.0, &x.1, &x.2, &o)?;
                    Ok(attn::composed::backward(&f, &x.3, &o)?.0)
                }),
            });
        }
    }
    Ok(())
}

/// Conditioned causal attention (both product kinds on cuda/emu) on odd sizes.
fn check(dev: &Device, c: &mut Checks) -> Result<()> {
    let t = |v: &[f32], sh: &[usize]| Tensor::from_vec(v.to_vec(), sh, dev);
    let (bq, tq, sk, heads, dh) = (2, 7, 19, 2, 24);
    let e = heads * dh;
    let (qv, kv, vv) =
        (c.rng.vec(bq * tq * e, -1.0, 1.0), c.rng.vec(bq * sk * e, -1.0, 1.0), c.rng.vec(bq * sk * e, -1.0, 1.0));
    let wv = c.rng.vec(bq * sk, 0.0, 1.0);
    let (qt, kt, vt, wt) = (t(&qv, &[bq, tq, e])?, t(&kv, &[bq, sk, e])?, t(&vv, &[bq, sk, e])?, t(&wv, &[bq, sk])?);
    let problem = attn::reference::Problem {
        b: bq,
        h: heads,
        tq,
        s: sk,
        dh,
        scale: 1.0 / (dh as f64).sqrt(),
        causal: true,
        valid: None,
        cond: attn::reference::Cond::Probs(f64s(&wv)),
    };
    let want = problem.forward(&f64s(&qv), &f64s(&kv), &f64s(&vv));
    let algos: &[GemmAlgo] =
        if dev.is_gpu_like() { &[GemmAlgo::Tiled, GemmAlgo::TensorCore] } else { &[GemmAlgo::Auto] };
    for &algo in algos {
        let o = AttnOpts { causal: true, condition: Condition::Probs(&wt), algo, ..AttnOpts::new(heads) };
        let got = attn::attention(&qt, &kt, &vt, &o)?.o.to_vec()?;
        // logits of |q||k| <= 24/√24 ≈ 4.9: tf32 operands move them by ~2·2^-11·4.9, which moves
        // the output (a probability-weighted mean of |v| <= 1) by about twice that
        let tol = if algo == GemmAlgo::TensorCore { 16.0 * EPS_TF32 * 5.0 } else { 64.0 * EPS32 * 5.0 };
        c.record(
            &format!("attention (causal, official condition) {algo:?}"),
            mismatch_scaled(&got, &want.o, &want.o_mag, tol, 1e-30),
        );
    }
    // f32 q, k, v at head dim 32 on tensor cores: the pipelined tf32 forward and backward on
    // cuda/emu (the loop above, at head dim 24, ran the element-loading branch). Logits of
    // |q||k| <= 32/√32 ≈ 5.7: the forward's bound as above; the backward's dS carries P's error
    // and delta's (o's), summed over keys or queries: twice it. A wrong fragment layout or a
    // missing pipeline wait is O(1) off.
    if dev.is_gpu_like() {
        let dh = 32;
        let e = heads * dh;
        let (qv, kv, vv, dov) = (
            c.rng.vec(bq * tq * e, -1.0, 1.0),
            c.rng.vec(bq * sk * e, -1.0, 1.0),
            c.rng.vec(bq * sk * e, -1.0, 1.0),
            c.rng.vec(bq * tq * e, -1.0, 1.0),
        );
        let (qt, kt, vt, dot) =
            (t(&qv, &[bq, tq, e])?, t(&kv, &[bq, sk, e])?, t(&vv, &[bq, sk, e])?, t(&dov, &[bq, tq, e])?);
        let o = AttnOpts {
            causal: true,
            condition: Condition::Probs(&wt),
            algo: GemmAlgo::TensorCore,
            ..AttnOpts::new(heads)
        };
        let f = attn::attention(&qt, &kt, &vt, &o)?;
        let p = attn::reference::Problem { dh, scale: 1.0 / (dh as f64).sqrt(), ..problem.clone() };
        let want = p.forward(&f64s(&qv), &f64s(&kv), &f64s(&vv));
        c.record(
            "attention tf32 pipelined (causal, official condition, dh 32)",
            mismatch_scaled(&f.o.to_vec()?, &want.o, &want.o_mag, 16.0 * EPS_TF32 * 6.0, 1e-30),
        );
        let g = attn::attention_backward(&qt, &kt, &vt, &f, &dot, &o)?;
        let wg = p.backward(&f64s(&qv), &f64s(&kv), &f64s(&vv), &f64s(&dov));
        for (name, got, want, mag) in
            [("dq", &g.dq, &wg.dq, &wg.dq_mag), ("dk", &g.dk, &wg.dk, &wg.dk_mag), ("dv", &g.dv, &wg.dv, &wg.dv_mag)]
        {
            c.record(
                &format!("attention tf32 pipelined backward {name} (causal, official condition, dh 32)"),
                mismatch_scaled(&got.to_vec()?, want, mag, 32.0 * EPS_TF32 * 6.0, 1e-30),
            );
        }
    }
    // bf16 q, k, v at head dim 32 (the pipelined forward on cuda/emu) against the f64 reference
    // of the rounded values: the exact-f32 bound (bf16 products are exact in f32) plus P's and
    // the output's bf16 roundings, each at most 2^-8 of the output's magnitude
    {
        use crate::ops::cast::cast;
        use crate::tensor::DType::{BF16, F32};
        let dh = 32;
        let e = heads * dh;
        let r = |n: usize, c: &mut Checks| -> Vec<f32> {
            c.rng.vec(n, -1.0, 1.0).iter().map(|&v| half::bf16::from_f32(v).to_f32()).collect()
        };
        let (qv, kv, vv) = (r(bq * tq * e, c), r(bq * sk * e, c), r(bq * sk * e, c));
        let b = |v: &[f32], sh: &[usize]| -> Result<Tensor> { cast(&t(v, sh)?, BF16) };
        let (qb, kb, vb) = (b(&qv, &[bq, tq, e])?, b(&kv, &[bq, sk, e])?, b(&vv, &[bq, sk, e])?);
        let o = AttnOpts { causal: true, condition: Condition::Probs(&wt), ..AttnOpts::new(heads) };
        let f = attn::bf16::attention_bf16(&qb, &kb, &vb, &o)?;
        let got = cast(&f.o, F32)?.to_vec()?;
        let p = attn::reference::Problem { dh, scale: 1.0 / (dh as f64).sqrt(), ..problem };
        let want = p.forward(&f64s(&qv), &f64s(&kv), &f64s(&vv));
        c.record(
            "attention bf16 (causal, official condition, dh 32)",
            mismatch_scaled(&got, &want.o, &want.o_mag, 64.0 * EPS32 * 6.0 + 2.0 / 256.0, 1e-30),
        );
        // its backward (the pipelined dQ and dK/dV kernels on cuda/emu) from a bf16 d_out: o's
        // two roundings through delta, P's and dS's as product operands and the outputs' own,
        // each at most 2^-8 of the gradients' magnitudes (tests/attention.rs derives it)
        let dov = r(bq * tq * e, c);
        let g = attn::bf16::attention_backward_bf16(&qb, &kb, &vb, &f, &b(&dov, &[bq, tq, e])?, &o)?;
        let wg = p.backward(&f64s(&qv), &f64s(&kv), &f64s(&vv), &f64s(&dov));
        let tol = 128.0 * EPS32 * 6.0 + 4.0 / 256.0;
        for (name, got, want, mag) in
            [("dq", &g.dq, &wg.dq, &wg.dq_mag), ("dk", &g.dk, &wg.dk, &wg.dk_mag), ("dv", &g.dv, &wg.dv, &wg.dv_mag)]
        {
            c.record(
                &format!("attention bf16 backward {name} (causal, official condition, dh 32)"),
                mismatch_scaled(&cast(got, F32)?.to_vec()?, want, mag, tol, 1e-30),
            );
        }
    }
    Ok(())
}
