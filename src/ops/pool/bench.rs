//! Pooling benchmark cases (the U-Net's first max-pool and last upsampling, with backwards) and
//! the max-pool self-check.

use crate::bench::{check_with, host, rand_tensor, Case, Group};
use crate::device::Device;
use crate::error::Result;
use crate::ops::pool;
use crate::selfcheck::Checks;
use crate::tensor::Tensor;
use crate::testing::{f64s, mismatch, EPS32};

pub const GROUP: Group = Group {
    names: &[
        "max_pool2",
        "max_pool2_bwd",
        "max_pool2_bwd_x",
        "upsample2",
        "upsample2_bwd",
        "max_pool2_bf16",
        "max_pool2_bwd_x_bf16",
        "upsample2_bf16",
    ],
    cases,
    shaped: &[],
    check: Some(check),
};

/// The U-Net's first pooling (8×64×224² -> 112²) and last upsampling (112² -> 224²).
fn cases(dev: &Device, small: bool, v: &mut Vec<Case>) -> Result<()> {
    let (b, c, hw) = if small { (2, 4, 28) } else { (8, 64, 224) };
    let big = rand_tensor(&[b, c, hw, hw], 18, dev)?;
    let (pooled, idx) = pool::max_pool2(&big)?;
    let n = (b * c * hw * hw) as f64;
    let shape = format!("{b}x{c}x{hw}x{hw} <-> {}x{}", hw / 2, hw / 2);
    let x = big.clone();
    v.push(Case {
        op: "max_pool2",
        shape: shape.clone(),
        flops: 0.75 * n,
        bytes: 4.0 * n * 1.5,
        peer: Some(format!("maxpool {b} {c} {hw}")),
        validate: {
            let x = big.clone();
            check_with("max_pool2", (0.0, 0.0), move || Ok(pool::reference::max_pool2(&host(&x)?, b * c, hw, hw).0))
        },
        run: Box::new(move || Ok(pool::max_pool2(&x)?.0)),
    });
    let (g, i, full) = (pooled.clone(), idx, big.shape().to_vec());
    v.push(Case {
        op: "max_pool2_bwd",
        shape: shape.clone(),
        flops: 0.0,
        bytes: 4.0 * n * 1.5,
        peer: None,
        validate: None,
        run: Box::new(move || pool::max_pool2_backward(&g, &i, &full)),
    });
    // the training graph's backward: the maxima found again from x (read: x, dy; written: dx)
    let (g, xb) = (pooled.clone(), big.clone());
    v.push(Case {
        op: "max_pool2_bwd_x",
        shape: shape.clone(),
        flops: 0.0,
        bytes: 4.0 * n * 2.25,
        peer: None,
        validate: None,
        run: Box::new(move || pool::max_pool2_backward_from_input(&g, &xb)),
    });
    // bf16 values as bf16 autocast keeps them: pooled and upsampled in bf16, the pool's backward
    // from the bf16 input (read: x bf16, dy f32; written: dx f32)
    {
        use crate::ops::cast::cast;
        use crate::tensor::DType::BF16;
        let xh = cast(&big, BF16)?;
        let x = xh.clone();
        v.push(Case {
            op: "max_pool2_bf16",
            shape: format!("{shape} bf16"),
            flops: 0.75 * n,
            bytes: 2.0 * n * 1.25,
            peer: Some(format!("maxpool_bf16 {b} {c} {hw}")),
            validate: None,
            run: Box::new(move || pool::max_pool2_bf16(&x)),
        });
        let g = pooled.clone();
        v.push(Case {
            op: "max_pool2_bwd_x_bf16",
            shape: format!("{shape} bf16"),
            flops: 0.0,
            bytes: 2.0 * n + 4.0 * n * 1.25,
            peer: None,
            validate: None,
            run: Box::new(move || pool::max_pool2_backward_from_input(&g, &xh)),
        });
        let ph = cast(&pooled, BF16)?;
        v.push(Case {
            op: "upsample2_bf16",
            shape: format!("{shape} bf16"),
            flops: 0.0,
            bytes: 2.0 * n * 1.25,
            peer: Some(format!("upsample_bf16 {b} {c} {}", hw / 2)),
            validate: None,
            run: Box::new(move || pool::upsample2_bf16(&ph)),
        });
    }
    let x = pooled;
    v.push(Case {
        op: "upsample2",
        shape: shape.clone(),
        flops: 0.0,
        bytes: 4.0 * n * 1.25,
        peer: Some(format!("upsample {b} {c} {}", hw / 2)),
        validate: {
            let x = x.clone();
            check_with("upsample2", (0.0, 0.0), move || {
                Ok(pool::reference::upsample2(&host(&x)?, b * c, hw / 2, hw / 2))
            })
        },
        run: Box::new(move || pool::upsample2(&x)),
    });
    v.push(Case {
        op: "upsample2_bwd",
        shape,
        flops: 0.75 * n,
        bytes: 4.0 * n * 1.25,
        peer: None,
        validate: {
            let dy = big.clone();
            // sums of four values of magnitude < 1: two roundings
            check_with("upsample2_bwd", (4.0 * EPS32, 0.0), move || {
                Ok(pool::reference::upsample2_backward(&host(&dy)?, b * c, hw / 2, hw / 2))
            })
        },
        run: Box::new(move || pool::upsample2_backward(&big)),
    });
    Ok(())
}

/// Odd sizes (9 x 11: the last row and column are dropped, as PyTorch does).
fn check(dev: &Device, c: &mut Checks) -> Result<()> {
    let x = c.rng.vec(2 * 5 * 99, -1.0, 1.0);
    let (pooled, _) = pool::max_pool2(&Tensor::from_vec(x.clone(), &[2, 5, 9, 11], dev)?)?;
    let (want, _) = pool::reference::max_pool2(&f64s(&x), 10, 9, 11);
    c.record("max_pool2", mismatch(&pooled.to_vec()?, &want, 0.0, 0.0));
    // the bf16 kernels on the rounded values: the same maxima and copies, exactly
    {
        use crate::ops::cast::cast;
        use crate::tensor::DType::{BF16, F32};
        let xh = cast(&Tensor::from_vec(x, &[2, 5, 9, 11], dev)?, BF16)?;
        let xr = cast(&xh, F32)?.to_vec()?;
        let (want, _) = pool::reference::max_pool2(&f64s(&xr), 10, 9, 11);
        c.record("max_pool2 bf16", mismatch(&cast(&pool::max_pool2_bf16(&xh)?, F32)?.to_vec()?, &want, 0.0, 0.0));
        let want = pool::reference::upsample2(&f64s(&xr), 10, 9, 11);
        c.record("upsample2 bf16", mismatch(&cast(&pool::upsample2_bf16(&xh)?, F32)?.to_vec()?, &want, 0.0, 0.0));
    }
    Ok(())
}
