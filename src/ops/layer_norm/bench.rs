//! Layer norm benchmark cases (forward and backward at the reconstruction transformers' sizes)
//! and the layer norm self-check.

use crate::bench::{check_with, host, rand_tensor, Case, Group};
use crate::device::Device;
use crate::error::Result;
use crate::ops::layer_norm;
use crate::selfcheck::Checks;
use crate::tensor::Tensor;
use crate::testing::{f64s, mismatch};

pub const GROUP: Group = Group { names: &["layer_norm", "layer_norm_bwd"], cases, shaped: &[], check: Some(check) };

/// LayerNorm over 32 images x 196 tokens x 512 channels, with its backward.
fn cases(dev: &Device, small: bool, v: &mut Vec<Case>) -> Result<()> {
    let (rows, c) = if small { (64, 64) } else { (32 * 196, 512) };
    let x = rand_tensor(&[rows, c], 31, dev)?;
    let gamma = rand_tensor(&[c], 32, dev)?;
    let beta = rand_tensor(&[c], 33, dev)?;
    let dy = rand_tensor(&[rows, c], 34, dev)?;
    let n = (rows * c) as f64;
    let ln_in = std::rc::Rc::new((x, gamma, beta, dy));
    let a = ln_in.clone();
    v.push(Case {
        op: "layer_norm",
        shape: format!("{rows}x{c}"),
        flops: 8.0 * n,
        bytes: 8.0 * n,
        peer: Some(format!("layer_norm {rows} {c}")),
        validate: {
            let a = a.clone();
            // unit-scale rows (values in [-1, 1), γ and β too): selfcheck's eps·(|x| / std)·√C
            // bound, for a std of about 0.58
            check_with("layer_norm", (2e-5, 0.0), move || {
                Ok(layer_norm::reference::forward(&host(&a.0)?, Some(&host(&a.1)?), Some(&host(&a.2)?), c, 1e-5))
            })
        },
        run: Box::new(move || Ok(layer_norm::layer_norm(&a.0, Some(&a.1), Some(&a.2), 1e-5)?.y)),
    });
    let a = ln_in;
    let f = layer_norm::layer_norm(&a.0, Some(&a.1), Some(&a.2), 1e-5)?;
    v.push(Case {
        op: "layer_norm_bwd",
        shape: format!("{rows}x{c}"),
        flops: 10.0 * n,
        bytes: 12.0 * n,
        peer: Some(format!("layer_norm_bwd {rows} {c}")),
        validate: None,
        run: Box::new(move || Ok(layer_norm::layer_norm_backward(&a.0, Some(&a.1), Some(&a.2), &f, &a.3)?.dx)),
    });
    Ok(())
}

fn check(dev: &Device, c: &mut Checks) -> Result<()> {
    let lv: Vec<f32> = c.rng.vec(9 * 40, -3.0, 3.0).iter().map(|x| x + 4.0).collect();
    let ln = layer_norm::layer_norm(&Tensor::from_vec(lv.clone(), &[9, 40], dev)?, None, None, 1e-5)?;
    // values of a few units with a spread of ~1.7: eps·(|x| / std)·√40 per element
    c.record(
        "layer_norm",
        mismatch(&ln.y.to_vec()?, &layer_norm::reference::forward(&f64s(&lv), None, None, 40, 1e-5), 2e-5, 0.0),
    );
    Ok(())
}
