//! Reductions over one axis: sum, mean, and max with argmax; their backward; and `sum_to_shape`,
//! which undoes a broadcast (the backward of every broadcasting op).

/// Its `reclmis bench` cases and `selfcheck` (registered in `bench::registry`).
#[cfg(feature = "cli")]
pub mod bench;
pub mod cpu;
#[cfg(feature = "refs")]
pub mod reference;

use crate::device::{Device, LaunchCfg};
use crate::error::{Error, Result};
use crate::kernels::Kernel;
use crate::ops::{axis_index, check_u32};
use crate::tensor::{DType, Tensor};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReduceOp {
    Sum = 0,
    Mean = 1,
    /// NaN propagates; among equal maxima the lowest index is the argmax.
    Max = 2,
}

crate::kernel_params! {
    struct ReduceParams [40] {
        x: u64,
        y: u64,
        idx: u64,
        outer: u32,
        n: u32,
        inner: u32,
        op: u32,
    }
}

crate::kernel_params! {
    struct ReduceBwdParams [40] {
        dy: u64,
        idx: u64,
        dx: u64,
        outer: u32,
        n: u32,
        inner: u32,
        op: u32,
    }
}

/// The input viewed as [outer, n, inner] around `axis`.
pub fn split_at_axis(shape: &[usize], axis: usize) -> (usize, usize, usize) {
    (shape[..axis].iter().product(), shape[axis], shape[axis + 1..].iter().product())
}

/// Rows per block of the warp-per-row kernel.
const ROWS_PER_BLOCK: u32 = 8;

/// Reduces `axis` (removed from the output shape). Returns the values and, for max, the argmax
/// (i32, same shape).
pub fn reduce(x: &Tensor, axis: isize, op: ReduceOp) -> Result<(Tensor, Option<Tensor>)> {
    x.expect_dtype("reduce", DType::F32)?;
    let axis = axis_index("reduce", axis, x.rank())?;
    let (outer, n, inner) = split_at_axis(x.shape(), axis);
    if n == 0 && op == ReduceOp::Max {
        return Err(Error::shape("max", format!("axis {axis} of {:?} is empty", x.shape())));
    }
    let mut out_shape = x.shape().to_vec();
    out_shape.remove(axis);
    let dev = x.device();
    if let Device::Cpu = dev {
        let (y, idx) = cpu::reduce(x.cpu_f32("reduce")?, outer, n, inner, op);
        let idx = match idx {
            Some(i) => Some(Tensor::from_vec_i32(i, &out_shape, dev)?),
            None => None,
        };
        return Ok((Tensor::from_vec(y, &out_shape, dev)?, idx));
    }
    let y = Tensor::empty(&out_shape, DType::F32, dev)?;
    let idx = if op == ReduceOp::Max { Some(Tensor::empty(&out_shape, DType::I32, dev)?) } else { None };
    let p = ReduceParams {
        x: x.dev_ptr(),
        y: y.dev_ptr(),
        idx: idx.as_ref().map_or(0, |t| t.dev_ptr()),
        outer: check_u32("reduce", outer)?,
        n: check_u32("reduce", n)?,
        inner: check_u32("reduce", inner)?,
        op: op as u32,
    };
    if outer * inner == 0 {
        return Ok((y, idx));
    }
    if inner == 1 {
        let blocks = (outer as u32).div_ceil(ROWS_PER_BLOCK);
        let cfg = LaunchCfg { grid: (blocks, 1, 1), block: (32, ROWS_PER_BLOCK, 1), smem_bytes: 0 };
        // SAFETY: the params hold pointers to live buffers of the sizes this op checked above, for the kernel they were declared for.
        unsafe { dev.launch(Kernel::reduce_last_fwd_f32, cfg, &p) }?;
    } else {
        // SAFETY: the params hold pointers to live buffers of the sizes this op checked above, for the kernel they were declared for.
        unsafe { dev.launch(Kernel::reduce_mid_fwd_f32, LaunchCfg::elementwise(outer * inner), &p) }?;
    }
    Ok((y, idx))
}

pub fn sum(x: &Tensor, axis: isize) -> Result<Tensor> {
    Ok(reduce(x, axis, ReduceOp::Sum)?.0)
}
pub fn mean(x: &Tensor, axis: isize) -> Result<Tensor> {
    Ok(reduce(x, axis, ReduceOp::Mean)?.0)
}
/// (values, argmax)
pub fn max(x: &Tensor, axis: isize) -> Result<(Tensor, Tensor)> {
    let (y, i) = reduce(x, axis, ReduceOp::Max)?;
    Ok((y, i.expect("max returns indices")))
}

/// dx of shape `in_shape` from dy (the reduced shape): broadcast for sum, divided by n for mean,
/// routed to the argmax for max (`idx` required).
pub fn reduce_backward(
    op: ReduceOp,
    dy: &Tensor,
    idx: Option<&Tensor>,
    in_shape: &[usize],
    axis: isize,
) -> Result<Tensor> {
    let axis = axis_index("reduce_backward", axis, in_shape.len())?;
    let (outer, n, inner) = split_at_axis(in_shape, axis);
    if dy.numel() != outer * inner {
        return Err(Error::shape(
            "reduce_backward",
            format!("dy {:?} does not match input {in_shape:?} without axis {axis}", dy.shape()),
        ));
    }
    dy.expect_dtype("reduce_backward", DType::F32)?;
    let idx = match (op, idx) {
        (ReduceOp::Max, Some(i)) => {
            i.expect_dtype("reduce_backward", DType::I32)?;
            dy.same_device("reduce_backward", &[i])?;
            Some(i)
        }
        (ReduceOp::Max, None) => return Err(Error::shape("reduce_backward", "max needs its argmax indices")),
        _ => None,
    };
    let dev = dy.device();
    if let Device::Cpu = dev {
        let ix = match idx {
            Some(i) => Some(i.cpu_i32("reduce_backward")?),
            None => None,
        };
        let dx = cpu::reduce_backward(dy.cpu_f32("reduce_backward")?, ix, outer, n, inner, op);
        return Tensor::from_vec(dx, in_shape, dev);
    }
    let dx = Tensor::empty(in_shape, DType::F32, dev)?;
    let p = ReduceBwdParams {
        dy: dy.dev_ptr(),
        idx: idx.map_or(0, |t| t.dev_ptr()),
        dx: dx.dev_ptr(),
        outer: check_u32("reduce_backward", outer)?,
        n: check_u32("reduce_backward", n)?,
        inner: check_u32("reduce_backward", inner)?,
        op: op as u32,
    };
    if dx.numel() > 0 {
        // SAFETY: the params hold pointers to live buffers of the sizes this op checked above, for the kernel they were declared for.
        unsafe { dev.launch(Kernel::reduce_bwd_f32, LaunchCfg::elementwise(dx.numel()), &p) }?;
    }
    Ok(dx)
}

/// Sums `x` over the dims along which `shape` was broadcast to reach x's shape, and returns a
/// tensor of `shape` (the gradient of a broadcast).
pub fn sum_to_shape(x: &Tensor, shape: &[usize]) -> Result<Tensor> {
    if x.shape() == shape {
        return Ok(x.clone());
    }
    let r = x.rank();
    if shape.len() > r {
        return Err(Error::shape("sum_to_shape", format!("{:?} cannot come from broadcasting {shape:?}", x.shape())));
    }
    let off = r - shape.len();
    let mut cur = x.clone();
    // Walk from the last dim so earlier axis numbers stay valid after each reduction.
    for d in (0..r).rev() {
        let target = if d < off { 1 } else { shape[d - off] };
        if target == x.shape()[d] {
            continue;
        }
        if target != 1 {
            return Err(Error::shape(
                "sum_to_shape",
                format!("{:?} cannot come from broadcasting {shape:?}", x.shape()),
            ));
        }
        cur = sum(&cur, d as isize)?;
    }
    cur.reshape(shape)
}
