//! 2×2 max-pool (stride 2) and nearest ×2 upsampling over the last two dims of NCHW tensors,
//! forward and backward (the U-Net's down and up steps).
//!
//! Max-pool output sizes are floor(H/2) × floor(W/2), as PyTorch's MaxPool2d(2); a trailing odd
//! row or column is ignored and gets zero gradient. Inputs smaller than 2×2 are an error (PyTorch
//! refuses them too). Within a window NaN wins and ties go to the first element in row-major
//! order; the backward sends each output's gradient to that element.
//!
//! bf16 values (bf16 autocast): `max_pool2_bf16` and `upsample2_bf16` keep them in bf16 (a
//! maximum or a copy is exact), and the pool's backward reads a bf16 input itself; gradients are
//! f32.

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
    struct Pool2Params [40] {
        x: u64,
        y: u64,
        idx: u64,
        planes: u64,
        h: u32,
        w: u32,
    }
}

crate::kernel_params! {
    struct Pool2BwdParams [40] {
        dy: u64,
        idx: u64,
        dx: u64,
        planes: u64,
        h: u32,
        w: u32,
    }
}

crate::kernel_params! {
    struct Pool2FromInputParams [40] {
        x: u64,
        dy: u64,
        dx: u64,
        planes: u64,
        h: u32,
        w: u32,
    }
}

crate::kernel_params! {
    struct Up2Params [32] {
        x: u64,
        y: u64,
        planes: u64,
        h: u32,
        w: u32,
    }
}

/// (planes, h, w) of a [..., H, W] tensor.
fn planes(op: &'static str, x: &Tensor) -> Result<(usize, usize, usize)> {
    x.expect_dtype(op, DType::F32)?;
    plane_dims(op, x)
}

/// (planes, H, W) of x [..., H, W], whatever its type.
fn plane_dims(op: &'static str, x: &Tensor) -> Result<(usize, usize, usize)> {
    if x.rank() < 2 {
        return Err(Error::shape(op, format!("{:?} has no H, W dims", x.shape())));
    }
    let r = x.rank();
    let (h, w) = (x.shape()[r - 2], x.shape()[r - 1]);
    Ok((x.numel() / (h * w).max(1), h, w))
}

fn with_hw(shape: &[usize], h: usize, w: usize) -> Vec<usize> {
    let mut s = shape.to_vec();
    let r = s.len();
    s[r - 2] = h;
    s[r - 1] = w;
    s
}

/// (y, argmax within each window as dy·2 + dx, i32).
pub fn max_pool2(x: &Tensor) -> Result<(Tensor, Tensor)> {
    let op = "max_pool2";
    let (np, h, w) = planes(op, x)?;
    if h < 2 || w < 2 {
        return Err(Error::shape(op, format!("input {:?} is smaller than one 2x2 window", x.shape())));
    }
    let out = with_hw(x.shape(), h / 2, w / 2);
    let dev = x.device();
    if let Device::Cpu = dev {
        let (y, idx) = cpu::max_pool2(x.cpu_f32(op)?, np, h, w);
        return Ok((Tensor::from_vec(y, &out, dev)?, Tensor::from_vec_i32(idx, &out, dev)?));
    }
    let y = Tensor::empty(&out, DType::F32, dev)?;
    let idx = Tensor::empty(&out, DType::I32, dev)?;
    let p = Pool2Params {
        x: x.dev_ptr(),
        y: y.dev_ptr(),
        idx: idx.dev_ptr(),
        planes: np as u64,
        h: check_u32(op, h)?,
        w: check_u32(op, w)?,
    };
    if y.numel() > 0 {
        // SAFETY: the params hold pointers to live buffers of the sizes this op checked above, for the kernel they were declared for.
        unsafe { dev.launch(Kernel::maxpool2_fwd_f32, LaunchCfg::elementwise(y.numel()), &p) }?;
    }
    Ok((y, idx))
}

/// A cpu pooling input as the fused backward reads it.
#[derive(Clone, Copy)]
pub enum PoolInput<'a> {
    F32(&'a [f32]),
    Bf16(&'a [half::bf16]),
}

/// The gradient of `max_pool2(x)` from x itself (f32, or bf16 as bf16 autocast keeps it) instead
/// of the forward's indices: the maxima are found again by the forward's rule (the same indices),
/// so a training graph keeps x (the previous batch norm's output, which its backward keeps
/// anyway) and no i32 index per pooled element. On the cpu one pass per row pair; on cuda and emu
/// the forward's kernel again (its indices), then the indexed backward.
pub fn max_pool2_backward_from_input(dy: &Tensor, x: &Tensor) -> Result<Tensor> {
    let op = "max_pool2_backward";
    if x.dtype() != DType::BF16 {
        x.expect_dtype(op, DType::F32)?;
    }
    let (np, h, w) = plane_dims(op, x)?;
    dy.same_device(op, &[x])?;
    dy.expect_dtype(op, DType::F32)?;
    if dy.shape() != with_hw(x.shape(), h / 2, w / 2) {
        return Err(Error::shape(op, format!("dy {:?} for input {:?}", dy.shape(), x.shape())));
    }
    let dev = dy.device();
    if let Device::Cpu = dev {
        let xi = match x.dtype() {
            DType::BF16 => PoolInput::Bf16(x.cpu_bf16(op)?),
            _ => PoolInput::F32(x.cpu_f32(op)?),
        };
        return Tensor::from_vec(cpu::max_pool2_backward_from_input(dy.cpu_f32(op)?, xi, np, h, w), x.shape(), dev);
    }
    #[cfg(feature = "autocast")]
    if x.dtype() == DType::BF16 {
        // one gather from the bf16 input: no f32 copy of x, no index array
        let dx = Tensor::empty(x.shape(), DType::F32, dev)?;
        let p = Pool2FromInputParams {
            x: x.dev_ptr(),
            dy: dy.dev_ptr(),
            dx: dx.dev_ptr(),
            planes: np as u64,
            h: check_u32(op, h)?,
            w: check_u32(op, w)?,
        };
        if dx.numel() > 0 {
            // SAFETY: x is a bf16 [planes, h, w] tensor, dy f32 of its pooled shape (checked
            // above), dx a new f32 tensor of x's shape.
            unsafe { dev.launch(Kernel::maxpool2_input_bwd_bf16, LaunchCfg::elementwise(dx.numel()), &p) }?;
        }
        return Ok(dx);
    }
    let (_, idx) = max_pool2(&crate::ops::cast::cast(x, DType::F32)?)?;
    max_pool2_backward(dy, &idx, x.shape())
}

/// `max_pool2`'s values on a bf16 x, in bf16 (a window's maximum is one of its values, exactly),
/// without indices (the backward finds them again from x).
#[cfg(feature = "autocast")]
pub fn max_pool2_bf16(x: &Tensor) -> Result<Tensor> {
    let op = "max_pool2";
    x.expect_dtype(op, DType::BF16)?;
    let (np, h, w) = plane_dims(op, x)?;
    if h < 2 || w < 2 {
        return Err(Error::shape(op, format!("input {:?} is smaller than one 2x2 window", x.shape())));
    }
    let out = with_hw(x.shape(), h / 2, w / 2);
    let dev = x.device();
    if let Device::Cpu = dev {
        return Tensor::from_vec_bf16(cpu::max_pool2_bf16(x.cpu_bf16(op)?, np, h, w), &out, dev);
    }
    let y = Tensor::empty(&out, DType::BF16, dev)?;
    let p = Pool2Params {
        x: x.dev_ptr(),
        y: y.dev_ptr(),
        idx: 0,
        planes: np as u64,
        h: check_u32(op, h)?,
        w: check_u32(op, w)?,
    };
    if y.numel() > 0 {
        // SAFETY: x is a bf16 [planes, h, w] tensor (h, w >= 2), y a new bf16 tensor of its
        // pooled shape; the bf16 kernel writes no indices.
        unsafe { dev.launch(Kernel::maxpool2_fwd_bf16, LaunchCfg::elementwise(y.numel()), &p) }?;
    }
    Ok(y)
}

/// `upsample2` of a bf16 x, in bf16 (copies).
#[cfg(feature = "autocast")]
pub fn upsample2_bf16(x: &Tensor) -> Result<Tensor> {
    let op = "upsample2";
    x.expect_dtype(op, DType::BF16)?;
    let (np, h, w) = plane_dims(op, x)?;
    let out = with_hw(x.shape(), 2 * h, 2 * w);
    let dev = x.device();
    if let Device::Cpu = dev {
        return Tensor::from_vec_bf16(cpu::upsample2_bf16(x.cpu_bf16(op)?, np, h, w), &out, dev);
    }
    let y = Tensor::empty(&out, DType::BF16, dev)?;
    let p = Up2Params { x: x.dev_ptr(), y: y.dev_ptr(), planes: np as u64, h: check_u32(op, h)?, w: check_u32(op, w)? };
    if y.numel() > 0 {
        // SAFETY: x is a bf16 [planes, h, w] tensor, y a new bf16 tensor of the upsampled shape.
        unsafe { dev.launch(Kernel::upsample2_fwd_bf16, LaunchCfg::elementwise(y.numel()), &p) }?;
    }
    Ok(y)
}

/// dx of the input's shape `in_shape` from dy and the forward's argmax.
pub fn max_pool2_backward(dy: &Tensor, idx: &Tensor, in_shape: &[usize]) -> Result<Tensor> {
    let op = "max_pool2_backward";
    idx.expect_dtype(op, DType::I32)?;
    dy.same_device(op, &[idx])?;
    dy.expect_dtype(op, DType::F32)?;
    let r = in_shape.len();
    if r < 2 || dy.shape() != with_hw(in_shape, in_shape[r - 2] / 2, in_shape[r - 1] / 2) || idx.shape() != dy.shape() {
        return Err(Error::shape(op, format!("dy {:?}, idx {:?} for input {in_shape:?}", dy.shape(), idx.shape())));
    }
    let (h, w) = (in_shape[r - 2], in_shape[r - 1]);
    let np = in_shape.iter().product::<usize>() / (h * w).max(1);
    let dev = dy.device();
    if let Device::Cpu = dev {
        return Tensor::from_vec(cpu::max_pool2_backward(dy.cpu_f32(op)?, idx.cpu_i32(op)?, np, h, w), in_shape, dev);
    }
    let dx = Tensor::empty(in_shape, DType::F32, dev)?;
    let p = Pool2BwdParams {
        dy: dy.dev_ptr(),
        idx: idx.dev_ptr(),
        dx: dx.dev_ptr(),
        planes: np as u64,
        h: check_u32(op, h)?,
        w: check_u32(op, w)?,
    };
    if dx.numel() > 0 {
        // SAFETY: the params hold pointers to live buffers of the sizes this op checked above, for the kernel they were declared for.
        unsafe { dev.launch(Kernel::maxpool2_bwd_f32, LaunchCfg::elementwise(dx.numel()), &p) }?;
    }
    Ok(dx)
}

/// Nearest-neighbour ×2: [..., H, W] -> [..., 2H, 2W].
pub fn upsample2(x: &Tensor) -> Result<Tensor> {
    let op = "upsample2";
    let (np, h, w) = planes(op, x)?;
    let out = with_hw(x.shape(), 2 * h, 2 * w);
    let dev = x.device();
    if let Device::Cpu = dev {
        return Tensor::from_vec(cpu::upsample2(x.cpu_f32(op)?, np, h, w), &out, dev);
    }
    let y = Tensor::empty(&out, DType::F32, dev)?;
    let p = Up2Params { x: x.dev_ptr(), y: y.dev_ptr(), planes: np as u64, h: check_u32(op, h)?, w: check_u32(op, w)? };
    if y.numel() > 0 {
        // SAFETY: the params hold pointers to live buffers of the sizes this op checked above, for the kernel they were declared for.
        unsafe { dev.launch(Kernel::upsample2_fwd_f32, LaunchCfg::elementwise(y.numel()), &p) }?;
    }
    Ok(y)
}

/// dx [..., H, W]: each element's gradient is the sum over its four copies in dy [..., 2H, 2W].
pub fn upsample2_backward(dy: &Tensor) -> Result<Tensor> {
    let op = "upsample2_backward";
    let (np, h2, w2) = planes(op, dy)?;
    if h2 % 2 != 0 || w2 % 2 != 0 {
        return Err(Error::shape(op, format!("dy {:?} is not an upsampled shape (odd H or W)", dy.shape())));
    }
    let (h, w) = (h2 / 2, w2 / 2);
    let out = with_hw(dy.shape(), h, w);
    let dev = dy.device();
    if let Device::Cpu = dev {
        return Tensor::from_vec(cpu::upsample2_backward(dy.cpu_f32(op)?, np, h, w), &out, dev);
    }
    let dx = Tensor::empty(&out, DType::F32, dev)?;
    // upsample2_bwd_f32 reads x = dy (the large map) and writes y = dx (the small one)
    let p =
        Up2Params { x: dy.dev_ptr(), y: dx.dev_ptr(), planes: np as u64, h: check_u32(op, h)?, w: check_u32(op, w)? };
    if dx.numel() > 0 {
        // SAFETY: the params hold pointers to live buffers of the sizes this op checked above, for the kernel they were declared for.
        unsafe { dev.launch(Kernel::upsample2_bwd_f32, LaunchCfg::elementwise(dx.numel()), &p) }?;
    }
    Ok(dx)
}
