//! Batch norm benchmark cases: training-mode batch norm + ReLU and its backward (f32 and with
//! bf16 activations).

use crate::bench::{rand_tensor, Case, Group};
use crate::device::Device;
use crate::error::Result;
use crate::ops::norm;
use crate::tensor::{DType, Tensor};

pub const GROUP: Group = Group {
    names: &["batch_norm_relu", "batch_norm_relu_bwd", "batch_norm_relu_bwd_bf16"],
    cases,
    shaped: &[],
    check: None,
};

/// Training-mode batch norm + ReLU on the first U-Net activation (8×64×224²), and its backward.
fn cases(dev: &Device, small: bool, v: &mut Vec<Case>) -> Result<()> {
    let (b, c, hw) = if small { (2, 4, 16) } else { (8, 64, 224) };
    let x = rand_tensor(&[b, c, hw, hw], 90, dev)?;
    let (g, bt) = (rand_tensor(&[c], 91, dev)?, rand_tensor(&[c], 92, dev)?);
    let (rm, rv) = (Tensor::zeros(&[c], dev)?, Tensor::from_vec(vec![1.0; c], &[c], dev)?);
    let o = norm::BnOpts { relu: true, ..Default::default() };
    let n = (b * c * hw * hw) as f64;
    let shape = format!("{b}x{c}x{hw}x{hw} train");
    let p = std::rc::Rc::new((x, g, bt, rm, rv));
    let q = p.clone();
    v.push(Case {
        op: "batch_norm_relu",
        shape: shape.clone(),
        flops: 0.0,
        bytes: 3.0 * 4.0 * n, // two reads for the statistics, one for the output, one write
        peer: Some(format!("bn_relu {b} {c} {hw}")),
        validate: None,
        run: Box::new(move || Ok(norm::batch_norm(&q.0, &q.1, &q.2, &q.3, &q.4, o)?.y)),
    });
    let f = norm::batch_norm(&p.0, &p.1, &p.2, &p.3, &p.4, o)?;
    let dy = rand_tensor(&[b, c, hw, hw], 93, dev)?;
    // x and y in bf16, as bf16 autocast keeps them (the kernel widens them as it reads)
    let bf16 = |t: &Tensor| crate::ops::cast::cast(t, DType::BF16);
    let half = (bf16(&p.0)?, p.1.clone(), norm::BnForward { y: bf16(&f.y)?, ..f.clone() }, dy.clone());
    v.push(Case {
        op: "batch_norm_relu_bwd",
        shape: shape.clone(),
        flops: 0.0,
        bytes: 7.0 * 4.0 * n,
        peer: None,
        validate: None,
        run: Box::new(move || Ok(norm::batch_norm_backward(&p.0, &p.1, &f, &dy, o)?.dx)),
    });
    v.push(Case {
        op: "batch_norm_relu_bwd_bf16",
        shape,
        flops: 0.0,
        bytes: 5.0 * 4.0 * n, // x and y as bf16 (read twice each), dy twice, dx once
        peer: None,
        validate: None,
        run: Box::new(move || Ok(norm::batch_norm_backward(&half.0, &half.1, &half.2, &half.3, o)?.dx)),
    });
    Ok(())
}
