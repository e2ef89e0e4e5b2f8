//! Softmax benchmark cases (attention-like rows), `--shape ROWSxCOLS`, and its self-check.

use crate::bench::{cap, check_with, dims, host, rand_tensor, Case, Group, Shaped};
use crate::device::Device;
use crate::error::Result;
use crate::ops::softmax;
use crate::selfcheck::Checks;
use crate::tensor::Tensor;
use crate::testing::{f64s, mismatch, EPS32};

pub const GROUP: Group = Group {
    names: &["softmax", "softmax_bwd"],
    cases,
    shaped: &[Shaped { op: "softmax", form: "ROWSxCOLS", make: shaped }],
    check: Some(check),
};

/// Attention-like softmax rows.
fn cases(dev: &Device, small: bool, v: &mut Vec<Case>) -> Result<()> {
    // Attention-like shapes of the model: 32 images x 4 heads, 196 image tokens.
    let (rows, cols) = if small { (96, 196) } else { (32 * 4 * 196, 196) };
    let x = rand_tensor(&[rows, cols], 3, dev)?;
    v.push(softmax_case(x.clone()));
    let y = softmax::softmax(&x)?;
    let dy = rand_tensor(&[rows, cols], 4, dev)?;
    v.push(Case {
        op: "softmax_bwd",
        shape: format!("{rows}x{cols}"),
        flops: 4.0 * (rows * cols) as f64,
        bytes: 12.0 * (rows * cols) as f64,
        peer: None,
        run: Box::new(move || softmax::softmax_backward(&y, &dy, false)),
        validate: None,
    });
    Ok(())
}

/// Softmax over the rows of x [rows, cols].
fn softmax_case(x: Tensor) -> Case {
    let (rows, cols) = (x.shape()[0], x.shape()[1]);
    Case {
        op: "softmax",
        shape: format!("{rows}x{cols}"),
        flops: 5.0 * (rows * cols) as f64,
        bytes: 8.0 * (rows * cols) as f64,
        peer: Some(format!("softmax {rows} {cols}")),
        // as selfcheck's bound: each output is exp(x − max) over a sum of `cols` such terms
        validate: {
            let x = x.clone();
            check_with("softmax", (1e-7, 64.0 * EPS32), move || {
                Ok(softmax::reference::forward(&host(&x)?, cols, false))
            })
        },
        run: Box::new(move || softmax::softmax(&x)),
    }
}

/// `--shape ROWSxCOLS`.
fn shaped(dev: &Device, d: &[usize]) -> Result<Case> {
    let [rows, cols] = dims(d)?;
    cap(rows.checked_mul(cols))?;
    Ok(softmax_case(rand_tensor(&[rows, cols], 3, dev)?))
}

fn check(dev: &Device, c: &mut Checks) -> Result<()> {
    let x = c.rng.vec(37 * 53, -4.0, 4.0);
    let s = softmax::softmax(&Tensor::from_vec(x.clone(), &[37, 53], dev)?)?.to_vec()?;
    c.record("softmax", mismatch(&s, &softmax::reference::forward(&f64s(&x), 53, false), 1e-7, 64.0 * EPS32));
    Ok(())
}
