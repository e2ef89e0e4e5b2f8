//! CCL benchmark cases (fused and composed, forward and forward + backward) and the similarity
//! self-check.

use crate::bench::{rand_tensor, Case, Group};
use crate::device::Device;
use crate::error::Result;
use crate::ops::{ccl, softmax};
use crate::selfcheck::Checks;
use crate::tensor::Tensor;
use crate::testing::{f64s, mismatch};

pub const GROUP: Group = Group {
    names: &["ccl", "ccl_composed", "ccl_fwd_bwd", "ccl_composed_fwd_bwd"],
    cases,
    shaped: &[],
    check: Some(check),
};

/// CCL at the official size (B = 32 texts and images, L = 18 words, N = 196 patches, D = 512),
/// fused and composed, forward and forward + backward.
fn cases(dev: &Device, small: bool, v: &mut Vec<Case>) -> Result<()> {
    let (b, l, n, d) = if small { (4, 18, 16, 64) } else { (32, 18, 196, 512) };
    let t = rand_tensor(&[b, l, d], 11, dev)?;
    let im = rand_tensor(&[b, n, d], 12, dev)?;
    let mut mv = vec![1.0f32; b * l];
    for a in 0..b {
        mv[a * l + 12 + a % 6..(a + 1) * l].fill(0.0); // 12..17 valid words, as in QaTa notes
    }
    let mask = Tensor::from_vec(mv, &[b, l], dev)?;
    let tw = softmax::softmax(&rand_tensor(&[b, l], 13, dev)?)?;
    let vw = softmax::softmax(&rand_tensor(&[b, n], 14, dev)?)?;
    let g = rand_tensor(&[b, b], 15, dev)?;
    let flops = 2.0 * (b * b * l * n * d) as f64;
    let bytes = 4.0 * (b * (l + n) * d) as f64;
    let shape = format!("B{b} L{l} N{n} D{d}");
    let inputs = std::rc::Rc::new((t, im, mask, tw, vw, g));
    let spec = Some(format!("ccl {b} {l} {n} {d}"));
    let x = inputs.clone();
    v.push(Case {
        op: "ccl",
        shape: shape.clone(),
        flops,
        bytes,
        peer: spec.clone(),
        validate: None,
        run: Box::new(move || Ok(ccl::ccl_similarity(&x.0, &x.1, &x.2, &x.3, &x.4)?.logits)),
    });
    let x = inputs.clone();
    v.push(Case {
        op: "ccl_composed",
        shape: shape.clone(),
        flops,
        bytes,
        peer: spec,
        validate: None,
        run: Box::new(move || Ok(ccl::composed::forward(&x.0, &x.1, &x.2, &x.3, &x.4)?.logits)),
    });
    let x = inputs.clone();
    let spec_fb = Some(format!("ccl_fb {b} {l} {n} {d}"));
    v.push(Case {
        op: "ccl_fwd_bwd",
        shape: shape.clone(),
        flops,
        bytes: 2.0 * bytes,
        peer: spec_fb.clone(),
        validate: None,
        run: Box::new(move || {
            let f = ccl::ccl_similarity(&x.0, &x.1, &x.2, &x.3, &x.4)?;
            Ok(ccl::ccl_similarity_backward(&f, &x.2, &x.3, &x.4, &x.5, &x.5)?.dv)
        }),
    });
    let x = inputs;
    v.push(Case {
        op: "ccl_composed_fwd_bwd",
        shape,
        flops: 3.0 * flops,
        bytes: 2.0 * bytes,
        peer: spec_fb,
        validate: None,
        run: Box::new(move || {
            let f = ccl::composed::forward(&x.0, &x.1, &x.2, &x.3, &x.4)?;
            Ok(ccl::composed::backward(&f, &x.2, &x.3, &x.4, &x.5, &x.5)?.1)
        }),
    });

    Ok(())
}

fn check(dev: &Device, c: &mut Checks) -> Result<()> {
    let s = ccl::reference::Sizes { b: 3, l: 5, n: 7, d: 16 };
    let (tv, vv) = (c.rng.vec(3 * 5 * 16, -1.0, 1.0), c.rng.vec(3 * 7 * 16, -1.0, 1.0));
    let (mv, twv, vwv) = (vec![1.0f32; 15], c.rng.vec(15, 0.0, 1.0), c.rng.vec(21, 0.0, 1.0));
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
    c.record("ccl similarity", mismatch(&f.logits.to_vec()?, &logits, 1e-5, 0.0));
    Ok(())
}
