//! Optimiser benchmark cases: one Adam step.

use crate::bench::{rand_tensor, Case, Group};
use crate::device::Device;
use crate::error::Result;
use crate::tensor::Tensor;

pub const GROUP: Group = Group { names: &["adam"], cases, shaped: &[], check: None };

/// One Adam step over a parameter tensor the size of the official CVR/CLR FFN weight (512·1024),
/// reading p, g, m, v and writing the three results.
fn cases(dev: &Device, small: bool, v: &mut Vec<Case>) -> Result<()> {
    let n = if small { 4096 } else { 1 << 19 };
    let (p, g) = (rand_tensor(&[n], 17, dev)?, rand_tensor(&[n], 18, dev)?);
    let (m, s) = (Tensor::zeros(&[n], dev)?, Tensor::zeros(&[n], dev)?);
    v.push(Case {
        op: "adam",
        shape: format!("{n}"),
        flops: 0.0,
        bytes: 28.0 * n as f64,
        peer: Some(format!("adam {n}")),
        run: Box::new(
            move || Ok(crate::optim::adam_update(&crate::optim::AdamConfig::default(), 1, &p, &g, &m, &s)?.0),
        ),
        validate: None,
    });
    Ok(())
}
