//! Layer norm over the last axis, forward and backward: y = (x − mean)/√(var + eps)·γ + β with
//! the biased variance, as torch.nn.LayerNorm (eps 1e-5 in the model). Pre-LN (CLIP tower) and
//! post-LN (reconstruction transformers) are the same op at different places.
//!
//! The forward keeps the per-row mean and 1/std for the backward. dγ and dβ are sums over rows,
//! done in parts and then summed, so they are deterministic on every device.

/// Its `reclmis bench` cases and `selfcheck` (registered in `bench::registry`).
#[cfg(feature = "cli")]
pub mod bench;
pub mod cpu;
#[cfg(feature = "refs")]
pub mod reference;

use crate::device::{Device, LaunchCfg};
use crate::error::{Error, Result};
use crate::kernels::Kernel;
use crate::ops::{check_u32, reduce};
use crate::tensor::{DType, Tensor};

crate::kernel_params! {
    struct LnParams [96] {
        x: u64,
        gamma: u64,
        beta: u64,
        y: u64,
        mean: u64,
        rstd: u64,
        dy: u64,
        dx: u64,
        dgamma_part: u64,
        dbeta_part: u64,
        rows: u32,
        c: u32,
        eps: f32,
        rows_per_part: u32,
    }
}

const OP: &str = "layer_norm";
/// Rows summed by one block of the dγ/dβ kernel.
const ROWS_PER_PART: usize = 256;

pub struct LnForward {
    pub y: Tensor,
    /// [rows]
    pub mean: Tensor,
    /// [rows]: 1/√(var + eps)
    pub rstd: Tensor,
}

pub struct LnGrads {
    pub dx: Tensor,
    pub dgamma: Option<Tensor>,
    pub dbeta: Option<Tensor>,
}

/// (rows, C) after checking x, γ and β.
fn check(x: &Tensor, gamma: Option<&Tensor>, beta: Option<&Tensor>) -> Result<(usize, usize)> {
    x.expect_dtype(OP, DType::F32)?;
    if x.rank() == 0 {
        return Err(Error::shape(OP, "x needs at least one dim"));
    }
    let c = x.shape()[x.rank() - 1];
    for (name, t) in [("gamma", gamma), ("beta", beta)] {
        if let Some(t) = t {
            x.same_device(OP, &[t])?;
            t.expect_dtype(OP, DType::F32)?;
            if t.shape() != [c] {
                return Err(Error::shape(OP, format!("{name} must be [{c}] (x's last dim), got {:?}", t.shape())));
            }
        }
    }
    if c == 0 {
        return Err(Error::shape(OP, format!("cannot normalise over an empty last dim: x {:?}", x.shape())));
    }
    Ok((x.numel() / c, c))
}

fn params(rows: usize, c: usize, eps: f32, ptrs: [u64; 10]) -> Result<LnParams> {
    let [xp, gamma, beta, y, mean, rstd, dy, dx, dgamma_part, dbeta_part] = ptrs;
    Ok(LnParams {
        x: xp,
        gamma,
        beta,
        y,
        mean,
        rstd,
        dy,
        dx,
        dgamma_part,
        dbeta_part,
        rows: check_u32(OP, rows)?,
        c: check_u32(OP, c)?,
        eps,
        rows_per_part: ROWS_PER_PART as u32,
    })
}

fn row_cfg(rows: usize) -> LaunchCfg {
    LaunchCfg { grid: ((rows as u32).div_ceil(8), 1, 1), block: (32, 8, 1), smem_bytes: 0 }
}

pub fn layer_norm(x: &Tensor, gamma: Option<&Tensor>, beta: Option<&Tensor>, eps: f32) -> Result<LnForward> {
    let (rows, c) = check(x, gamma, beta)?;
    let dev = x.device();
    if let Device::Cpu = dev {
        let g = gamma.map(|t| t.cpu_f32(OP)).transpose()?;
        let b = beta.map(|t| t.cpu_f32(OP)).transpose()?;
        let (y, mean, rstd) = cpu::forward(x.cpu_f32(OP)?, g, b, c, eps);
        return Ok(LnForward {
            y: Tensor::from_vec(y, x.shape(), dev)?,
            mean: Tensor::from_vec(mean, &[rows], dev)?,
            rstd: Tensor::from_vec(rstd, &[rows], dev)?,
        });
    }
    let y = Tensor::empty(x.shape(), DType::F32, dev)?;
    let mean = Tensor::empty(&[rows], DType::F32, dev)?;
    let rstd = Tensor::empty(&[rows], DType::F32, dev)?;
    let ptr = |t: Option<&Tensor>| t.map_or(0, |t| t.dev_ptr());
    let p = params(
        rows,
        c,
        eps,
        [x.dev_ptr(), ptr(gamma), ptr(beta), y.dev_ptr(), mean.dev_ptr(), rstd.dev_ptr(), 0, 0, 0, 0],
    )?;
    if rows > 0 {
        // SAFETY: the params hold pointers to live buffers of the sizes this op checked above, for the kernel they were declared for.
        unsafe { dev.launch(Kernel::layer_norm_fwd_f32, row_cfg(rows), &p) }?;
    }
    Ok(LnForward { y, mean, rstd })
}

/// dx, and dγ / dβ for the affine parameters that were given.
pub fn layer_norm_backward(
    x: &Tensor,
    gamma: Option<&Tensor>,
    beta: Option<&Tensor>,
    f: &LnForward,
    dy: &Tensor,
) -> Result<LnGrads> {
    let (rows, c) = check(x, gamma, beta)?;
    x.same_device(OP, &[dy, &f.mean, &f.rstd])?;
    Tensor::expect_f32(OP, &[dy, &f.mean, &f.rstd])?;
    if dy.shape() != x.shape() || f.mean.shape() != [rows] || f.rstd.shape() != [rows] {
        return Err(Error::shape(
            OP,
            format!("backward: dy {:?} must be x's shape {:?}; mean, rstd [{rows}]", dy.shape(), x.shape()),
        ));
    }
    let dev = x.device();
    if let Device::Cpu = dev {
        let g = gamma.map(|t| t.cpu_f32(OP)).transpose()?;
        let (dx, dg, db) =
            cpu::backward(x.cpu_f32(OP)?, g, f.mean.cpu_f32(OP)?, f.rstd.cpu_f32(OP)?, dy.cpu_f32(OP)?, c);
        return Ok(LnGrads {
            dx: Tensor::from_vec(dx, x.shape(), dev)?,
            dgamma: if gamma.is_some() { Some(Tensor::from_vec(dg, &[c], dev)?) } else { None },
            dbeta: if beta.is_some() { Some(Tensor::from_vec(db, &[c], dev)?) } else { None },
        });
    }
    let dx = Tensor::empty(x.shape(), DType::F32, dev)?;
    let parts = rows.div_ceil(ROWS_PER_PART).max(1);
    let (dgp, dbp) = (Tensor::zeros(&[parts, c], dev)?, Tensor::zeros(&[parts, c], dev)?);
    let ptr = |t: Option<&Tensor>| t.map_or(0, |t| t.dev_ptr());
    let p = params(
        rows,
        c,
        0.0,
        [
            x.dev_ptr(),
            ptr(gamma),
            ptr(beta),
            0,
            f.mean.dev_ptr(),
            f.rstd.dev_ptr(),
            dy.dev_ptr(),
            dx.dev_ptr(),
            dgp.dev_ptr(),
            dbp.dev_ptr(),
        ],
    )?;
    if rows > 0 {
        // SAFETY: the params hold pointers to live buffers of the sizes this op checked above, for the kernel they were declared for.
        unsafe { dev.launch(Kernel::layer_norm_bwd_f32, row_cfg(rows), &p) }?;
        let cfg = LaunchCfg { grid: ((c as u32).div_ceil(32), parts as u32, 1), block: (32, 8, 1), smem_bytes: 0 };
        // SAFETY: the params hold pointers to live buffers of the sizes this op checked above, for the kernel they were declared for.
        unsafe { dev.launch(Kernel::layer_norm_params_bwd_f32, cfg, &p) }?;
    }
    Ok(LnGrads {
        dx,
        dgamma: if gamma.is_some() { Some(reduce::sum(&dgp, 0)?) } else { None },
        dbeta: if beta.is_some() { Some(reduce::sum(&dbp, 0)?) } else { None },
    })
}
