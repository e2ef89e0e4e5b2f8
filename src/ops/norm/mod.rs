//! Batch normalisation over the channel axis (dim 1) of [B, C, ...] tensors (BatchNorm2d and
//! BatchNorm1d), training and evaluation, with an optional fused ReLU, forward and backward.
//!
//! Training normalises with the batch statistics (biased variance) and returns the running
//! statistics updated as PyTorch does (momentum 0.1 by default, unbiased variance); evaluation
//! uses the running statistics. Functional: the caller keeps the new running statistics.

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
    struct BnStatsParams [72] {
        x: u64,
        mean: u64,
        var: u64,
        rm: u64,
        rv: u64,
        new_rm: u64,
        new_rv: u64,
        b: u32,
        c: u32,
        s: u32,
        momentum: f32,
    }
}

crate::kernel_params! {
    struct BnApplyParams [72] {
        x: u64,
        mean: u64,
        var: u64,
        gamma: u64,
        beta: u64,
        y: u64,
        n: u64,
        c: u32,
        s: u32,
        eps: f32,
        relu: u32,
    }
}

crate::kernel_params! {
    struct BnReduceParams [80] {
        x: u64,
        y: u64,
        dy: u64,
        mean: u64,
        var: u64,
        dgamma: u64,
        dbeta: u64,
        b: u32,
        c: u32,
        s: u32,
        eps: f32,
        relu: u32,
        pad: u32,
    }
}

crate::kernel_params! {
    struct BnApplyBwdParams [104] {
        x: u64,
        y: u64,
        dy: u64,
        mean: u64,
        var: u64,
        gamma: u64,
        dgamma: u64,
        dbeta: u64,
        dx: u64,
        n: u64,
        c: u32,
        s: u32,
        eps: f32,
        relu: u32,
        train: u32,
        count: u32,
    }
}

#[derive(Clone, Copy, Debug, PartialEq)]
pub struct BnOpts {
    pub eps: f32,
    pub momentum: f32,
    /// Apply ReLU to the output (BatchNorm + ReLU in one pass).
    pub relu: bool,
    /// Batch statistics (and a running-statistics update) or the running statistics.
    pub train: bool,
}

impl Default for BnOpts {
    fn default() -> Self {
        BnOpts { eps: 1e-5, momentum: 0.1, relu: false, train: true }
    }
}

#[derive(Clone)]
pub struct BnForward {
    pub y: Tensor,
    /// The statistics used: the batch's (training) or the running ones (evaluation), [C].
    pub mean: Tensor,
    pub var: Tensor,
    /// Updated running statistics (training); the inputs unchanged (evaluation).
    pub running_mean: Tensor,
    pub running_var: Tensor,
}

pub struct BnGrads {
    pub dx: Tensor,
    pub dgamma: Tensor,
    pub dbeta: Tensor,
}

/// (B, C, S) of x [B, C, ...].
fn dims(op: &'static str, x: &Tensor, params: &[&Tensor]) -> Result<(usize, usize, usize)> {
    x.expect_dtype(op, DType::F32)?;
    dims_of(op, x, params)
}

/// `dims` for an x of any float type (the caller checks it).
fn dims_of(op: &'static str, x: &Tensor, params: &[&Tensor]) -> Result<(usize, usize, usize)> {
    if x.rank() < 2 {
        return Err(Error::shape(op, format!("input {:?} needs [B, C, ...]", x.shape())));
    }
    let (b, c) = (x.shape()[0], x.shape()[1]);
    for p in params {
        p.expect_dtype(op, DType::F32)?;
        if p.shape() != [c] {
            return Err(Error::shape(op, format!("a per-channel parameter is {:?}, expected [{c}]", p.shape())));
        }
    }
    x.same_device(op, params)?;
    Ok((b, c, x.numel() / (b * c).max(1)))
}

pub fn batch_norm(
    x: &Tensor,
    gamma: &Tensor,
    beta: &Tensor,
    running_mean: &Tensor,
    running_var: &Tensor,
    o: BnOpts,
) -> Result<BnForward> {
    let op = "batch_norm";
    let (b, c, s) = dims(op, x, &[gamma, beta, running_mean, running_var])?;
    if o.train && b * s < 2 {
        return Err(Error::shape(op, format!("training needs more than one value per channel, got {:?}", x.shape())));
    }
    let dev = x.device();
    if let Device::Cpu = dev {
        let f = cpu::forward(
            x.cpu_f32(op)?,
            gamma.cpu_f32(op)?,
            beta.cpu_f32(op)?,
            running_mean.cpu_f32(op)?,
            running_var.cpu_f32(op)?,
            (b, c, s),
            o,
        );
        return Ok(BnForward {
            y: Tensor::from_vec(f.0, x.shape(), dev)?,
            mean: Tensor::from_vec(f.1, &[c], dev)?,
            var: Tensor::from_vec(f.2, &[c], dev)?,
            running_mean: Tensor::from_vec(f.3, &[c], dev)?,
            running_var: Tensor::from_vec(f.4, &[c], dev)?,
        });
    }
    let (mean, var, nrm, nrv) = if o.train {
        let t = |_| Tensor::empty(&[c], DType::F32, dev);
        let (mean, var, nrm, nrv) = (t(0)?, t(1)?, t(2)?, t(3)?);
        let p = BnStatsParams {
            x: x.dev_ptr(),
            mean: mean.dev_ptr(),
            var: var.dev_ptr(),
            rm: running_mean.dev_ptr(),
            rv: running_var.dev_ptr(),
            new_rm: nrm.dev_ptr(),
            new_rv: nrv.dev_ptr(),
            b: check_u32(op, b)?,
            c: check_u32(op, c)?,
            s: check_u32(op, s)?,
            momentum: o.momentum,
        };
        if c > 0 {
            // SAFETY: the params hold pointers to live buffers of the sizes this op checked above, for the kernel they were declared for.
            unsafe {
                dev.launch(
                    Kernel::bn_stats_fwd_f32,
                    LaunchCfg { grid: (c as u32, 1, 1), block: (256, 1, 1), smem_bytes: 0 },
                    &p,
                )
            }?;
        }
        (mean, var, nrm, nrv)
    } else {
        (running_mean.clone(), running_var.clone(), running_mean.clone(), running_var.clone())
    };
    let y = Tensor::empty(x.shape(), DType::F32, dev)?;
    apply(x, (&mean, &var), (gamma, beta), &y, (c, s), o)?;
    Ok(BnForward { y, mean, var, running_mean: nrm, running_var: nrv })
}

/// Evaluation-mode batch norm of a tensor the caller gives up: when no other handle shares it
/// (f32), the output is written over it — on the cpu by `cpu::apply_eval_in_place`, elsewhere by
/// the apply kernel with y = x (each element read, then written, by one thread) — so that an
/// evaluation holds one full-size map fewer at each of the U-Net's batch norms (at batch 8 the
/// decoder's are 103 MB). Otherwise `batch_norm`'s output.
pub fn batch_norm_eval_owned(
    mut x: Tensor,
    gamma: &Tensor,
    beta: &Tensor,
    running_mean: &Tensor,
    running_var: &Tensor,
    o: BnOpts,
) -> Result<Tensor> {
    let op = "batch_norm";
    if o.train || x.dtype() != DType::F32 || !x.is_sole() {
        return Ok(batch_norm(&x, gamma, beta, running_mean, running_var, o)?.y);
    }
    let (b, c, s) = dims(op, &x, &[gamma, beta, running_mean, running_var])?;
    if !matches!(x.device(), Device::Cpu) {
        apply(&x, (running_mean, running_var), (gamma, beta), &x, (c, s), o)?;
        return Ok(x);
    }
    let (g, be) = (gamma.cpu_f32(op)?, beta.cpu_f32(op)?);
    let (m, v) = (running_mean.cpu_f32(op)?, running_var.cpu_f32(op)?);
    match x.sole_cpu_f32_mut() {
        Some(xs) => cpu::apply_eval_in_place(xs, g, be, m, v, (b, c, s), o),
        // a memory-mapped input (not writable)
        None => return Ok(batch_norm(&x, gamma, beta, running_mean, running_var, o)?.y),
    }
    Ok(x)
}

/// y = (ReLU) (x − mean)·γ/√(var + ε) + β by the apply kernel (y may be x).
fn apply(
    x: &Tensor,
    (mean, var): (&Tensor, &Tensor),
    (gamma, beta): (&Tensor, &Tensor),
    y: &Tensor,
    (c, s): (usize, usize),
    o: BnOpts,
) -> Result<()> {
    let op = "batch_norm";
    let p = BnApplyParams {
        x: x.dev_ptr(),
        mean: mean.dev_ptr(),
        var: var.dev_ptr(),
        gamma: gamma.dev_ptr(),
        beta: beta.dev_ptr(),
        y: y.dev_ptr(),
        n: x.numel() as u64,
        c: c as u32,
        s: check_u32(op, s)?,
        eps: o.eps,
        relu: o.relu as u32,
    };
    if x.numel() > 0 {
        // SAFETY: the params hold pointers to live buffers of the sizes the callers checked
        // (`dims`), for the kernel they were declared for; y is x or a tensor of x's shape.
        unsafe { x.device().launch(Kernel::bn_apply_fwd_f32, LaunchCfg::elementwise(x.numel()), &p) }?;
    }
    Ok(())
}

/// A cpu tensor's elements as the backward reads them (bf16 or f32).
fn plane<'a>(t: &'a Tensor, half: bool, op: &'static str) -> Result<cpu::Plane<'a>> {
    Ok(if half { cpu::Plane::Bf16(t.cpu_bf16(op)?) } else { cpu::Plane::F32(t.cpu_f32(op)?) })
}

/// Gradients given the forward's input x, output y (for the fused ReLU's mask) and statistics.
/// x and y are both f32 or both bf16 (as bf16 autocast keeps them: read widened, exactly, so
/// the gradients are those of the f32 call on the widened tensors, bit for bit); dy, dgamma and
/// dbeta are f32, and dx is x's type: with bf16 x the f32 value rounded once (the tape keeps a
/// bf16 value's gradient in bf16 anyway; a full-size f32 dx beside it was a bf16 training
/// step's peak at the official size).
pub fn batch_norm_backward(x: &Tensor, gamma: &Tensor, f: &BnForward, dy: &Tensor, o: BnOpts) -> Result<BnGrads> {
    let op = "batch_norm_backward";
    let half = x.dtype() == DType::BF16;
    if !half {
        x.expect_dtype(op, DType::F32)?;
    }
    let (b, c, s) = dims_of(op, x, &[gamma, &f.mean, &f.var])?;
    // the forward's output is public and read here: it must be x's shape and type too
    for (what, t, dt) in [("dy", dy, DType::F32), ("the forward's y", &f.y, x.dtype())] {
        t.expect_dtype(op, dt)?;
        if t.shape() != x.shape() {
            return Err(Error::shape(op, format!("{what} {:?} vs x {:?}", t.shape(), x.shape())));
        }
    }
    x.same_device(op, &[dy, &f.y])?;
    let dev = x.device();
    if let Device::Cpu = dev {
        let g = cpu::backward(
            plane(x, half, op)?,
            plane(&f.y, half, op)?,
            dy.cpu_f32(op)?,
            f.mean.cpu_f32(op)?,
            f.var.cpu_f32(op)?,
            gamma.cpu_f32(op)?,
            (b, c, s),
            o,
        );
        // (rounded from the host buffer: no f32 tensor, as the kernel writes bf16 directly)
        let dx = crate::tensor::CpuStorage::F32(g.0);
        let dx = if half { crate::ops::cast::cpu::cast(&dx, DType::BF16)? } else { dx };
        return Ok(BnGrads {
            dx: Tensor::from_cpu(dx, x.shape(), dev)?,
            dgamma: Tensor::from_vec(g.1, &[c], dev)?,
            dbeta: Tensor::from_vec(g.2, &[c], dev)?,
        });
    }
    let dgamma = Tensor::empty(&[c], DType::F32, dev)?;
    let dbeta = Tensor::empty(&[c], DType::F32, dev)?;
    let rp = BnReduceParams {
        x: x.dev_ptr(),
        y: f.y.dev_ptr(),
        dy: dy.dev_ptr(),
        mean: f.mean.dev_ptr(),
        var: f.var.dev_ptr(),
        dgamma: dgamma.dev_ptr(),
        dbeta: dbeta.dev_ptr(),
        b: check_u32(op, b)?,
        c: check_u32(op, c)?,
        s: check_u32(op, s)?,
        eps: o.eps,
        relu: o.relu as u32,
        pad: 0,
    };
    if c > 0 {
        // SAFETY: the params hold pointers to live buffers of the sizes this op checked above, for the kernel they were declared for.
        unsafe {
            dev.launch(
                if half { Kernel::bn_reduce_bwd_bf16 } else { Kernel::bn_reduce_bwd_f32 },
                LaunchCfg { grid: (c as u32, 1, 1), block: (256, 1, 1), smem_bytes: 0 },
                &rp,
            )
        }?;
    }
    let dx = Tensor::empty(x.shape(), x.dtype(), dev)?;
    let ap = BnApplyBwdParams {
        x: x.dev_ptr(),
        y: f.y.dev_ptr(),
        dy: dy.dev_ptr(),
        mean: f.mean.dev_ptr(),
        var: f.var.dev_ptr(),
        gamma: gamma.dev_ptr(),
        dgamma: dgamma.dev_ptr(),
        dbeta: dbeta.dev_ptr(),
        dx: dx.dev_ptr(),
        n: x.numel() as u64,
        c: c as u32,
        s: s as u32,
        eps: o.eps,
        relu: o.relu as u32,
        train: o.train as u32,
        count: check_u32(op, b * s)?,
    };
    if x.numel() > 0 {
        // SAFETY: the params hold pointers to live buffers of the sizes this op checked above, for the kernel they were declared for.
        let k = if half { Kernel::bn_apply_bwd_bf16 } else { Kernel::bn_apply_bwd_f32 };
        // SAFETY: as above; x and y are bf16 for the bf16 kernel (checked above), f32 otherwise.
        unsafe { dev.launch(k, LaunchCfg::elementwise(x.numel()), &ap) }?;
    }
    Ok(BnGrads { dx, dgamma, dbeta })
}
