//! Segmentation loss benchmark cases (Dice + BCE and its backward, the metrics, MSE, beside a
//! plain copy of the same bytes) and the Dice + BCE self-check.

use crate::bench::{rand_tensor, Case, Group};
use crate::device::Device;
use crate::error::Result;
use crate::ops::{elementwise, loss};
use crate::selfcheck::Checks;
use crate::tensor::Tensor;
use crate::testing::{f64s, mismatch};

pub const GROUP: Group =
    Group { names: &["copy", "dice_bce", "dice_bce_bwd", "metrics", "mse"], cases, shaped: &[], check: Some(check) };

/// Dice + BCE, metrics and MSE on 32 masks of 224², next to a plain copy of the same bytes.
fn cases(dev: &Device, small: bool, v: &mut Vec<Case>) -> Result<()> {
    let (mb, hw) = if small { (2, 28) } else { (32, 224) };
    let px = mb * hw * hw;
    let z = rand_tensor(&[mb, hw * hw], 16, dev)?;
    let tgt = unary_step(&rand_tensor(&[mb, hw * hw], 17, dev)?)?;
    let seg = std::rc::Rc::new((z, tgt));
    let x = seg.clone();
    v.push(Case {
        op: "copy",
        shape: format!("{mb}x{hw}x{hw} f32 (scale by 1)"),
        flops: 0.0,
        bytes: 8.0 * px as f64,
        peer: None,
        validate: None,
        run: Box::new(move || elementwise::scale(&x.0, 1.0)),
    });
    let x = seg.clone();
    v.push(Case {
        op: "dice_bce",
        shape: format!("{mb}x{hw}x{hw}"),
        flops: 0.0,
        bytes: 8.0 * px as f64,
        peer: Some(format!("dice_bce {mb} {hw}")),
        validate: None,
        run: Box::new(move || Ok(loss::dice_bce(&x.0, &x.1)?.loss)),
    });
    let x = seg.clone();
    v.push(Case {
        op: "dice_bce_bwd",
        shape: format!("{mb}x{hw}x{hw}"),
        flops: 0.0,
        bytes: 12.0 * px as f64,
        peer: None,
        validate: None,
        run: Box::new(move || {
            let f = loss::dice_bce(&x.0, &x.1)?;
            loss::dice_bce_backward(&x.0, &x.1, &f, 1.0)
        }),
    });
    let x = seg.clone();
    v.push(Case {
        op: "metrics",
        shape: format!("{mb}x{hw}x{hw}"),
        flops: 0.0,
        bytes: 8.0 * px as f64,
        peer: None,
        validate: None,
        run: Box::new(move || Ok(loss::metrics(&x.0, &x.1)?.mean)),
    });
    let x = seg;
    v.push(Case {
        op: "mse",
        shape: format!("{mb}x{hw}x{hw}"),
        flops: 0.0,
        bytes: 8.0 * px as f64,
        peer: Some(format!("mse {mb} {hw}")),
        validate: None,
        run: Box::new(move || loss::mse(&x.0, &x.1)),
    });
    Ok(())
}

/// 1 where x > 0, else 0 (a synthetic mask).
fn unary_step(x: &Tensor) -> Result<Tensor> {
    let host: Vec<f32> = x.to_vec()?.iter().map(|&v| if v > 0.0 { 1.0 } else { 0.0 }).collect();
    Tensor::from_vec(host, x.shape(), x.device())
}

fn check(dev: &Device, c: &mut Checks) -> Result<()> {
    let (z, g) = (c.rng.vec(3 * 50, -4.0, 4.0), (0..150).map(|i| (i % 3 == 0) as u8 as f32).collect::<Vec<_>>());
    let seg =
        loss::dice_bce(&Tensor::from_vec(z.clone(), &[3, 50], dev)?, &Tensor::from_vec(g.clone(), &[3, 50], dev)?)?;
    let (dice, bce, crit) = loss::reference::dice_bce(&f64s(&z), &f64s(&g), 3, 50);
    c.record("dice + bce", mismatch(&seg.loss.to_vec()?, &[dice, bce, crit], 1e-5, 1e-5));
    Ok(())
}
