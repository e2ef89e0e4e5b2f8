//! Cast benchmark cases: f32 -> bf16 / f16 over a U-Net activation.

use crate::bench::{rand_tensor, Case, Group};
use crate::device::Device;
use crate::error::{Error, Result};
use crate::tensor::DType;

pub const GROUP: Group = Group { names: &["cast_bf16", "cast_f16"], cases, shaped: &[], check: None };

/// f32 -> bf16 and f32 -> f16 over a U-Net activation (the conversions autocast adds around
/// each bf16 op): 6 bytes moved per element. Each is checked against the half crate's rounding.
fn cases(dev: &Device, small: bool, v: &mut Vec<Case>) -> Result<()> {
    let (b, c, hw) = if small { (1, 8, 32) } else { (4, 64, 224) };
    let x = rand_tensor(&[b, c, hw, hw], 21, dev)?;
    let host = x.to_vec()?;
    for (op, to) in [("cast_bf16", DType::BF16), ("cast_f16", DType::F16)] {
        let (x, host) = (x.clone(), host.clone());
        v.push(Case {
            op,
            shape: format!("{b}x{c}x{hw}x{hw} f32 -> {to}"),
            flops: 0.0,
            bytes: 6.0 * x.numel() as f64,
            peer: Some(format!("cast_{to} {b} {c} {hw}")),
            run: Box::new(move || crate::ops::cast::cast(&x, to)),
            validate: Some(Box::new(move |y| {
                let want: Vec<f32> = match to {
                    DType::BF16 => host.iter().map(|&v| half::bf16::from_f32(v).to_f32()).collect(),
                    _ => host.iter().map(|&v| half::f16::from_f32(v).to_f32()).collect(),
                };
                match y.to_vec()? == want {
                    true => Ok(()),
                    false => Err(Error::Other(format!("{op}: not the round-to-nearest-even values"))),
                }
            })),
        });
    }
    Ok(())
}
