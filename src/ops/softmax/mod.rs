//! Softmax and log-softmax over the last axis, forward and backward.
//!
//! The row max is subtracted first, so large inputs do not overflow; a row of only -inf gives NaN
//! (as PyTorch does); NaN anywhere in a row makes the row NaN.

/// Its `reclmis bench` cases and `selfcheck` (registered in `bench::registry`).
#[cfg(feature = "cli")]
pub mod bench;
pub mod cpu;
#[cfg(feature = "refs")]
pub mod reference;

use crate::device::{Device, LaunchCfg};
use crate::error::{Error, Result};
use crate::kernels::Kernel;
use crate::ops::check_u32;
use crate::tensor::{DType, Tensor};

crate::kernel_params! {
    struct SoftmaxParams [32] {
        x: u64,
        y: u64,
        rows: u32,
        cols: u32,
        log: u32,
        pad: u32,
    }
}

crate::kernel_params! {
    struct SoftmaxBwdParams [40] {
        y: u64,
        dy: u64,
        dx: u64,
        rows: u32,
        cols: u32,
        log: u32,
        pad: u32,
    }
}

/// A warp per row with 4 rows per block up to 1024 columns; beyond, 256 threads per row.
fn launch_cfg(rows: usize, cols: usize) -> LaunchCfg {
    if cols <= 1024 {
        LaunchCfg { grid: ((rows as u32).div_ceil(4), 1, 1), block: (32, 4, 1), smem_bytes: 0 }
    } else {
        LaunchCfg { grid: (rows as u32, 1, 1), block: (256, 1, 1), smem_bytes: 0 }
    }
}

fn rows_cols(x: &Tensor, op: &'static str) -> Result<(usize, usize)> {
    if x.rank() == 0 {
        return Err(Error::shape(op, "needs at least one dim"));
    }
    let cols = x.shape()[x.rank() - 1];
    Ok((x.numel() / cols.max(1), cols))
}

fn forward(x: &Tensor, log: bool) -> Result<Tensor> {
    let op = if log { "log_softmax" } else { "softmax" };
    x.expect_dtype(op, DType::F32)?;
    let (rows, cols) = rows_cols(x, op)?;
    let dev = x.device();
    if let Device::Cpu = dev {
        return Tensor::from_vec(cpu::forward(x.cpu_f32(op)?, cols, log), x.shape(), dev);
    }
    let y = Tensor::empty(x.shape(), DType::F32, dev)?;
    if x.numel() == 0 {
        return Ok(y);
    }
    let p = SoftmaxParams {
        x: x.dev_ptr(),
        y: y.dev_ptr(),
        rows: check_u32(op, rows)?,
        cols: check_u32(op, cols)?,
        log: log as u32,
        pad: 0,
    };
    // SAFETY: the params hold pointers to live buffers of the sizes this op checked above, for the kernel they were declared for.
    unsafe { dev.launch(Kernel::softmax_fwd_f32, launch_cfg(rows, cols), &p) }?;
    Ok(y)
}

pub fn softmax(x: &Tensor) -> Result<Tensor> {
    forward(x, false)
}

pub fn log_softmax(x: &Tensor) -> Result<Tensor> {
    forward(x, true)
}

/// dx from the forward output `y` and `dy` (`log` as in the forward call).
pub fn softmax_backward(y: &Tensor, dy: &Tensor, log: bool) -> Result<Tensor> {
    let op = "softmax_backward";
    y.same_device(op, &[dy])?;
    Tensor::expect_f32(op, &[y, dy])?;
    if y.shape() != dy.shape() {
        return Err(Error::shape(op, format!("y {:?} vs dy {:?}", y.shape(), dy.shape())));
    }
    let (rows, cols) = rows_cols(y, op)?;
    let dev = y.device();
    if let Device::Cpu = dev {
        return Tensor::from_vec(cpu::backward(y.cpu_f32(op)?, dy.cpu_f32(op)?, cols, log), y.shape(), dev);
    }
    let dx = Tensor::empty(y.shape(), DType::F32, dev)?;
    if y.numel() == 0 {
        return Ok(dx);
    }
    let p = SoftmaxBwdParams {
        y: y.dev_ptr(),
        dy: dy.dev_ptr(),
        dx: dx.dev_ptr(),
        rows: check_u32(op, rows)?,
        cols: check_u32(op, cols)?,
        log: log as u32,
        pad: 0,
    };
    // SAFETY: the params hold pointers to live buffers of the sizes this op checked above, for the kernel they were declared for.
    unsafe { dev.launch(Kernel::softmax_bwd_f32, launch_cfg(rows, cols), &p) }?;
    Ok(dx)
}
