//! The whole U-Net benchmark case: the model's own U-Net modules (`unet::UNet`, evaluation mode,
//! the bottleneck passed straight through) at 224², batch 1. The whole model's scenarios are
//! `reclmis bench-model` (`bench::model`).

use super::unet::UNet;
use crate::autograd::{Graph, Precision, Var};
use crate::bench::{rand_tensor, Case, Group};
use crate::device::Device;
use crate::error::{Error, Result};
use crate::nn::params::Params;
use crate::nn::Builder;

pub const GROUP: Group = Group { names: &["unet"], cases, shaped: &[], check: None };

/// FLOPs of one forward at `hw`² (2·Co·Ci·k²·H·W per convolution; the PLAM gates' two 1×1
/// convolutions per level counted, their pooling and MLP not).
fn unet_flops(widths: [usize; 5], hw: usize) -> f64 {
    let mut f = 0.0;
    let mut conv = |ci: usize, co: usize, k: usize, hw: usize| f += 2.0 * (co * ci * k * k * hw * hw) as f64;
    conv(3, widths[0], 3, hw);
    for k in 1..5 {
        conv(widths[k - 1], widths[k], 3, hw >> k);
        conv(widths[k], widths[k], 3, hw >> k);
    }
    let mut below = widths[4];
    for k in (1..5).rev() {
        let (skip, h) = (widths[k - 1], hw >> (k - 1));
        let out = if k == 1 { widths[0] } else { widths[k - 2] };
        conv(skip, skip, 1, h);
        conv(skip, skip, 1, h);
        conv(skip + below, out, 3, h);
        conv(out, out, 3, h);
        below = out;
    }
    conv(widths[0], 1, 1, hw);
    f
}

/// The official widths for base 64 (64/128/256/512/512) at 224², batch 1; base 8 at 48² on emu.
/// PyTorch's default initialisation (seeded) and unit running statistics.
fn cases(dev: &Device, small: bool, v: &mut Vec<Case>) -> Result<()> {
    let (c, hw) = if small { (8, 48) } else { (64, 224) };
    let widths = [c, 2 * c, 4 * c, 8 * c, 8 * c];
    let mut params = Params::new(dev);
    let (net, ()) = UNet::new_with(&mut Builder::new(&mut params, 1000), 3, widths, widths[4], |_| Ok(()))?;
    let x = rand_tensor(&[1, 3, hw, hw], 7, dev)?;
    // the tensor-core kernels on cuda/emu (tf32), as the other GEMM-based cases time them
    let precision = if dev.is_gpu_like() { Precision::Tf32 } else { Precision::F32 };
    v.push(Case {
        op: "unet",
        shape: format!("b1 3x{hw}x{hw} base {c}"),
        flops: unet_flops(widths, hw),
        bytes: 4.0 * (3 * hw * hw) as f64,
        peer: Some(format!("unet 1 {c} {hw}")),
        // random weights: at least check that the activations stayed finite through 23 layers
        validate: Some(Box::new(|y| {
            if y.to_vec()?.iter().all(|v| v.is_finite()) {
                Ok(())
            } else {
                Err(Error::Other("unet: non-finite logits".into()))
            }
        })),
        run: Box::new(move || {
            let g = Graph::eval().with_precision(precision)?;
            Ok(net.forward(&g, &params, &Var::constant(x.clone()))?.into_tensor())
        }),
    });
    Ok(())
}
