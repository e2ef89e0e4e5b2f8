//! Segmentation loss (soft Dice + BCE from logits, sigmoid fused), evaluation metrics (hard Dice,
//! IoU) and mean squared error, each with its backward where it has one.
//!
//! Dice + BCE follow the official training loss: per sample, with p = σ(logits) and the 0.5
//! weights on both p and g, dice_b = 1 − (2·¼Σpg + 1e-5) / (¼Σp² + ¼Σg² + 1e-5); dice = mean_b;
//! bce = mean over pixels of −[g log p + (1−g) log(1−p)] with the logs clamped at −100;
//! criterion = ½ dice + ½ bce. The logs are computed from the logits (log σ(z) = −softplus(−z)),
//! not from p: this agrees with the official BCE of probabilities wherever p is not rounded to 0
//! or 1, and differs for saturated logits (in f32, |z| > ~17 with the opposite target; in f64,
//! |z| > ~37), where the official code reads log(0) and clamps to −100 while we give the true
//! value −|z| (still clamped at −100 beyond |z| = 100).

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
    struct SegPartialParams [40] {
        x: u64,
        g: u64,
        partial: u64,
        b: u32,
        p: u32,
        chunks: u32,
        mode: u32,
    }
}

crate::kernel_params! {
    struct SegFinalParams [40] {
        partial: u64,
        per_sample: u64,
        loss: u64,
        b: u32,
        chunks: u32,
        p: u32,
        mode: u32,
    }
}

crate::kernel_params! {
    struct DiceBceBwdParams [48] {
        x: u64,
        g: u64,
        per_sample: u64,
        dx: u64,
        b: u32,
        p: u32,
        scale: f32,
        pad: u32,
    }
}

crate::kernel_params! {
    struct MseParams [32] {
        x: u64,
        y: u64,
        partial: u64,
        n: u64,
    }
}

crate::kernel_params! {
    struct MseBwdParams [48] {
        x: u64,
        y: u64,
        dx: u64,
        dy: u64,
        n: u64,
        scale: f32,
        pad: u32,
    }
}

const MODE_DICE_BCE: u32 = 0;
const MODE_METRICS: u32 = 1;

/// Dice + BCE forward.
pub struct SegLoss {
    /// [3]: dice, bce, criterion = ½ dice + ½ bce
    pub loss: Tensor,
    /// [B,4]: (¼Σpg, ¼(Σp² + Σg²), dice_b, Σ bce_b), what the backward needs
    pub per_sample: Tensor,
}

/// Evaluation metrics of thresholded probabilities (ŷ = p > 0.5), as the official test script
/// defines them: dice_b = 2Σgŷ / (Σg + Σŷ + 1e-5) (empty truth and empty prediction score 0),
/// iou_b = |g ∧ ŷ| / |g ∨ ŷ| (0 when both are empty), hard_dice_b = 1 − the training Dice loss of
/// ŷ (what validation selects checkpoints by).
pub struct Metrics {
    /// [3]: mean dice, mean iou, mean hard dice
    pub mean: Tensor,
    /// [B,4]: dice_b, iou_b, hard_dice_b, 0
    pub per_image: Tensor,
}

/// (B, P) for predictions and targets of the same shape [B, ...].
fn per_sample_shape(op: &'static str, x: &Tensor, g: &Tensor) -> Result<(usize, usize)> {
    x.expect_dtype(op, DType::F32)?;
    g.expect_dtype(op, DType::F32)?;
    x.same_device(op, &[g])?;
    if x.shape() != g.shape() {
        return Err(Error::shape(op, format!("prediction {:?} and target {:?} differ", x.shape(), g.shape())));
    }
    if x.rank() < 1 || x.numel() == 0 {
        return Err(Error::shape(op, format!("empty prediction {:?}", x.shape())));
    }
    let b = x.shape()[0];
    Ok((b, x.numel() / b))
}

/// Chunks per sample: enough blocks to fill a GPU (about 4096 pixels each), at most 64.
fn chunks(p: usize) -> usize {
    p.div_ceil(4096).clamp(1, 64)
}

/// Partial sums then per-sample results on cuda / emu; returns (per_sample [B,4], loss [3]).
fn seg_reduce(op: &'static str, x: &Tensor, g: &Tensor, b: usize, p: usize, mode: u32) -> Result<(Tensor, Tensor)> {
    let dev = x.device();
    let c = chunks(p);
    let partial = Tensor::empty(&[b, c, 4], DType::F32, dev)?;
    let pp = SegPartialParams {
        x: x.dev_ptr(),
        g: g.dev_ptr(),
        partial: partial.dev_ptr(),
        b: check_u32(op, b)?,
        p: check_u32(op, p)?,
        chunks: c as u32,
        mode,
    };
    if b > 65535 {
        return Err(Error::Unsupported { op, detail: format!("batch {b} exceeds a grid's y range") });
    }
    // SAFETY: the params hold pointers to live buffers of the sizes this op checked above, for the kernel they were declared for.
    unsafe {
        dev.launch(
            Kernel::seg_partial_fwd_f32,
            LaunchCfg { grid: (c as u32, b as u32, 1), block: (256, 1, 1), smem_bytes: 0 },
            &pp,
        )
    }?;
    let per_sample = Tensor::empty(&[b, 4], DType::F32, dev)?;
    let loss = Tensor::empty(&[3], DType::F32, dev)?;
    let fp = SegFinalParams {
        partial: partial.dev_ptr(),
        per_sample: per_sample.dev_ptr(),
        loss: loss.dev_ptr(),
        b: b as u32,
        chunks: c as u32,
        p: p as u32,
        mode,
    };
    // SAFETY: the params hold pointers to live buffers of the sizes this op checked above, for the kernel they were declared for.
    unsafe {
        dev.launch(Kernel::seg_final_fwd_f32, LaunchCfg { grid: (1, 1, 1), block: (256, 1, 1), smem_bytes: 0 }, &fp)
    }?;
    Ok((per_sample, loss))
}

/// Dice + BCE of `logits` [B, ...] against 0/1 `target` of the same shape.
pub fn dice_bce(logits: &Tensor, target: &Tensor) -> Result<SegLoss> {
    let op = "dice_bce";
    let (b, p) = per_sample_shape(op, logits, target)?;
    let dev = logits.device();
    if let Device::Cpu = dev {
        let (per, loss) = cpu::dice_bce(logits.cpu_f32(op)?, target.cpu_f32(op)?, b, p);
        return Ok(SegLoss {
            loss: Tensor::from_vec(loss.to_vec(), &[3], dev)?,
            per_sample: Tensor::from_vec(per, &[b, 4], dev)?,
        });
    }
    let (per_sample, loss) = seg_reduce(op, logits, target, b, p, MODE_DICE_BCE)?;
    Ok(SegLoss { loss, per_sample })
}

/// d(scale · criterion) / d logits.
pub fn dice_bce_backward(logits: &Tensor, target: &Tensor, fwd: &SegLoss, scale: f32) -> Result<Tensor> {
    let op = "dice_bce_backward";
    let (b, p) = per_sample_shape(op, logits, target)?;
    fwd.per_sample.expect_dtype(op, DType::F32)?;
    logits.same_device(op, &[&fwd.per_sample])?;
    if fwd.per_sample.shape() != [b, 4] {
        return Err(Error::shape(op, format!("forward state {:?} is not for batch {b}", fwd.per_sample.shape())));
    }
    let dev = logits.device();
    if let Device::Cpu = dev {
        let dx =
            cpu::dice_bce_backward(logits.cpu_f32(op)?, target.cpu_f32(op)?, fwd.per_sample.cpu_f32(op)?, b, p, scale);
        return Tensor::from_vec(dx, logits.shape(), dev);
    }
    let dx = Tensor::empty(logits.shape(), DType::F32, dev)?;
    let pr = DiceBceBwdParams {
        x: logits.dev_ptr(),
        g: target.dev_ptr(),
        per_sample: fwd.per_sample.dev_ptr(),
        dx: dx.dev_ptr(),
        b: check_u32(op, b)?,
        p: check_u32(op, p)?,
        scale,
        pad: 0,
    };
    // SAFETY: the params hold pointers to live buffers of the sizes this op checked above, for the kernel they were declared for.
    unsafe { dev.launch(Kernel::dicebce_bwd_f32, LaunchCfg::elementwise(b * p), &pr) }?;
    Ok(dx)
}

/// Hard Dice, IoU and the validation hard Dice of `probs` [B, ...] against 0/1 `target`.
pub fn metrics(probs: &Tensor, target: &Tensor) -> Result<Metrics> {
    let op = "metrics";
    let (b, p) = per_sample_shape(op, probs, target)?;
    let dev = probs.device();
    if let Device::Cpu = dev {
        let (per, mean) = cpu::metrics(probs.cpu_f32(op)?, target.cpu_f32(op)?, b, p);
        return Ok(Metrics {
            mean: Tensor::from_vec(mean.to_vec(), &[3], dev)?,
            per_image: Tensor::from_vec(per, &[b, 4], dev)?,
        });
    }
    let (per_image, mean) = seg_reduce(op, probs, target, b, p, MODE_METRICS)?;
    Ok(Metrics { mean, per_image })
}

/// mean((x − y)²) as a scalar tensor (shape []).
pub fn mse(x: &Tensor, y: &Tensor) -> Result<Tensor> {
    let op = "mse";
    Tensor::expect_f32(op, &[x, y])?;
    x.same_device(op, &[y])?;
    if x.shape() != y.shape() || x.numel() == 0 {
        return Err(Error::shape(op, format!("{:?} vs {:?} (both non-empty and equal)", x.shape(), y.shape())));
    }
    let dev = x.device();
    if let Device::Cpu = dev {
        return Tensor::from_vec(vec![cpu::mse(x.cpu_f32(op)?, y.cpu_f32(op)?)], &[], dev);
    }
    let cfg = LaunchCfg::elementwise(x.numel());
    let partial = Tensor::empty(&[cfg.grid.0 as usize], DType::F32, dev)?;
    let p = MseParams { x: x.dev_ptr(), y: y.dev_ptr(), partial: partial.dev_ptr(), n: x.numel() as u64 };
    // SAFETY: the params hold pointers to live buffers of the sizes this op checked above, for the kernel they were declared for.
    unsafe { dev.launch(Kernel::mse_fwd_f32, cfg, &p) }?;
    let total = reduce::sum(&partial, 0)?;
    crate::ops::elementwise::scale(&total, 1.0 / x.numel() as f32)
}

/// (dx, dy) of scale · mse(x, y).
pub fn mse_backward(x: &Tensor, y: &Tensor, scale: f32) -> Result<(Tensor, Tensor)> {
    let op = "mse_backward";
    x.same_device(op, &[y])?;
    Tensor::expect_f32(op, &[x, y])?;
    if x.shape() != y.shape() || x.numel() == 0 {
        return Err(Error::shape(op, format!("{:?} vs {:?} (both non-empty and equal)", x.shape(), y.shape())));
    }
    let dev = x.device();
    if let Device::Cpu = dev {
        let (dx, dy) = cpu::mse_backward(x.cpu_f32(op)?, y.cpu_f32(op)?, scale);
        return Ok((Tensor::from_vec(dx, x.shape(), dev)?, Tensor::from_vec(dy, x.shape(), dev)?));
    }
    let dx = Tensor::empty(x.shape(), DType::F32, dev)?;
    let dy = Tensor::empty(x.shape(), DType::F32, dev)?;
    let p = MseBwdParams {
        x: x.dev_ptr(),
        y: y.dev_ptr(),
        dx: dx.dev_ptr(),
        dy: dy.dev_ptr(),
        n: x.numel() as u64,
        scale,
        pad: 0,
    };
    // SAFETY: the params hold pointers to live buffers of the sizes this op checked above, for the kernel they were declared for.
    unsafe { dev.launch(Kernel::mse_bwd_f32, LaunchCfg::elementwise(x.numel()), &p) }?;
    Ok((dx, dy))
}
