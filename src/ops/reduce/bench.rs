//! Reduction benchmark cases (sum over channels, max over pixels, the sum's backward on a U-Net
//! activation) and the reduction self-check.

use crate::bench::{check_with, host, rand_tensor, Case, Group};
use crate::device::Device;
use crate::error::Result;
use crate::ops::reduce;
use crate::selfcheck::Checks;
use crate::tensor::Tensor;
use crate::testing::{f64s, mismatch, EPS32};

pub const GROUP: Group = Group { names: &["sum", "max", "sum_bwd"], cases, shaped: &[], check: Some(check) };

/// Reductions on a U-Net activation.
fn cases(dev: &Device, small: bool, v: &mut Vec<Case>) -> Result<()> {
    // A U-Net activation: batch 8 (2 on emu), 64 channels, 224x224 (28x28 on emu).
    let (bt, c, hw) = if small { (2, 8, 28) } else { (8, 64, 224) };
    let act = rand_tensor(&[bt, c, hw, hw], 5, dev)?;
    let n = (bt * c * hw * hw) as f64;
    let a3 = act.clone();
    v.push(Case {
        op: "sum",
        shape: format!("{bt}x{c}x{hw}x{hw} axis 1"),
        flops: n,
        bytes: 4.0 * n + 4.0 * n / c as f64,
        peer: Some(format!("sum1 {bt} {c} {hw} {hw}")),
        validate: {
            let x = a3.clone();
            // c values of magnitude < 1 summed in f32: c roundings of at most the sum of magnitudes
            check_with("sum", (c as f64 * EPS32, 0.0), move || {
                Ok(reduce::reference::reduce(&host(&x)?, bt, c, hw * hw, reduce::ReduceOp::Sum).0)
            })
        },
        run: Box::new(move || reduce::sum(&a3, 1)),
    });
    let a4 = act.clone();
    v.push(Case {
        op: "max",
        shape: format!("{bt}x{c}x{} axis -1", hw * hw),
        flops: n,
        bytes: 4.0 * n + 8.0 * n / (hw * hw) as f64,
        peer: None,
        validate: {
            let x = a4.clone();
            check_with("max", (0.0, 0.0), move || {
                Ok(reduce::reference::reduce(&host(&x)?, bt * c, hw * hw, 1, reduce::ReduceOp::Max).0)
            })
        },
        run: Box::new(move || Ok(reduce::max(&a4.reshape(&[bt, c, hw * hw])?, -1)?.0)),
    });
    let g6 = rand_tensor(&[bt, hw, hw], 9, dev)?;
    let shape6 = [bt, c, hw, hw];
    v.push(Case {
        op: "sum_bwd",
        shape: format!("{bt}x{hw}x{hw} -> {bt}x{c}x{hw}x{hw}"),
        flops: 0.0,
        bytes: 4.0 * n + 4.0 * n / c as f64,
        peer: None,
        run: Box::new(move || reduce::reduce_backward(reduce::ReduceOp::Sum, &g6, None, &shape6, 1)),
        validate: None,
    });
    Ok(())
}

fn check(dev: &Device, c: &mut Checks) -> Result<()> {
    let x = c.rng.vec(37 * 53, -4.0, 4.0);
    let xt = Tensor::from_vec(x.clone(), &[37, 53], dev)?;
    for (axis, (outer, n, inner)) in [(1isize, (37, 53, 1)), (0, (1, 37, 53))] {
        for op in [reduce::ReduceOp::Sum, reduce::ReduceOp::Max] {
            let (y, _) = reduce::reduce(&xt, axis, op)?;
            let (want, _) = reduce::reference::reduce(&f64s(&x), outer, n, inner, op);
            // a sum of n values of magnitude <= 4 has rounding error below n·eps·4
            c.record(
                &format!("reduce {op:?} axis {axis}"),
                mismatch(&y.to_vec()?, &want, 4.0 * n as f64 * EPS32 * 4.0, 0.0),
            );
        }
    }
    Ok(())
}
