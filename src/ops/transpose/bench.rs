//! Layout benchmark cases (a batched transpose, the attention head split, a row narrow) and the
//! transpose self-check.

use crate::bench::{check_with, host, rand_tensor, Case, Group};
use crate::device::Device;
use crate::error::Result;
use crate::ops::transpose;
use crate::selfcheck::Checks;
use crate::tensor::Tensor;
use crate::testing::{f64s, mismatch};

pub const GROUP: Group = Group { names: &["transpose", "permute", "narrow"], cases, shaped: &[], check: Some(check) };

/// Transpose and the attention head split.
fn cases(dev: &Device, small: bool, v: &mut Vec<Case>) -> Result<()> {
    let (tb, tr, tc) = if small { (2, 36, 40) } else { (32, 196, 512) };
    let t = rand_tensor(&[tb, tr, tc], 7, dev)?;
    v.push(Case {
        op: "transpose",
        shape: format!("{tb}x{tr}x{tc} -> {tb}x{tc}x{tr}"),
        flops: 0.0,
        bytes: 8.0 * (tb * tr * tc) as f64,
        peer: Some(format!("transpose {tb} {tr} {tc}")),
        validate: {
            let t = t.clone();
            check_with("transpose", (0.0, 0.0), move || {
                Ok(transpose::reference::permute(&host(&t)?, &[tb, tr, tc], &[0, 2, 1]))
            })
        },
        run: Box::new(move || transpose::transpose(&t, 1, 2)),
    });
    // The attention head split: [B, T, H, D] -> [B, H, T, D] (a general permutation).
    let (pb, pt, ph, pd) = if small { (2, 17, 4, 16) } else { (32, 196, 4, 128) };
    let q = rand_tensor(&[pb, pt, ph, pd], 10, dev)?;
    v.push(Case {
        op: "permute",
        shape: format!("{pb}x{pt}x{ph}x{pd} [0,2,1,3]"),
        flops: 0.0,
        bytes: 8.0 * (pb * pt * ph * pd) as f64,
        peer: Some(format!("permute0213 {pb} {pt} {ph} {pd}")),
        validate: {
            let q = q.clone();
            check_with("permute", (0.0, 0.0), move || {
                Ok(transpose::reference::permute(&host(&q)?, &[pb, pt, ph, pd], &[0, 2, 1, 3]))
            })
        },
        run: Box::new(move || transpose::permute(&q, &[0, 2, 1, 3])),
    });
    // The model's packed attention weights: the k rows of in_proj [3d, d].
    let d = if small { 64 } else { 512 };
    let w = rand_tensor(&[3 * d, d], 16, dev)?;
    v.push(Case {
        op: "narrow",
        shape: format!("{}x{d} rows {d}..{}", 3 * d, 2 * d),
        flops: 0.0,
        bytes: 8.0 * (d * d) as f64,
        peer: Some(format!("narrow {} {d} {d} {d}", 3 * d)),
        validate: {
            let w = w.clone();
            check_with("narrow", (0.0, 0.0), move || Ok(transpose::reference::narrow(&host(&w)?, &[3 * d, d], 0, d, d)))
        },
        run: Box::new(move || transpose::narrow(&w, 0, d, d)),
    });
    Ok(())
}

fn check(dev: &Device, c: &mut Checks) -> Result<()> {
    let x = c.rng.vec(37 * 53, -4.0, 4.0);
    let t = transpose::transpose(&Tensor::from_vec(x.clone(), &[37, 53], dev)?, 0, 1)?.to_vec()?;
    c.record("transpose", mismatch(&t, &transpose::reference::permute(&f64s(&x), &[37, 53], &[1, 0]), 0.0, 0.0));
    Ok(())
}
