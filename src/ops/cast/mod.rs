//! Conversions between the float storage types: f32, bf16 (`half::bf16`) and f16 (`half::f16`).
//! Narrowing rounds to nearest, ties to even (NaN stays NaN, overflow goes to ±inf, f16
//! underflows gradually through its subnormals); widening is exact; bf16 ↔ f16 widens to f32 and
//! rounds once. The backward of a cast is the cast of the gradient back to the input's type.

/// Its `reclmis bench` cases and `selfcheck` (registered in `bench::registry`).
#[cfg(feature = "cli")]
pub mod bench;
pub mod cpu;
#[cfg(feature = "refs")]
pub mod reference;

use crate::device::LaunchCfg;
use crate::error::{Error, Result};
use crate::kernels::Kernel;
use crate::tensor::{DType, Tensor};

crate::kernel_params! {
    struct CastParams [24] {
        x: u64,
        y: u64,
        n: u64,
    }
}

/// The kernel converting `from` to `to` (both float, different).
fn kernel(from: DType, to: DType) -> Option<Kernel> {
    use DType::*;
    Some(match (from, to) {
        (F32, BF16) => Kernel::cast_fwd_f32_bf16,
        (BF16, F32) => Kernel::cast_fwd_bf16_f32,
        (F32, F16) => Kernel::cast_fwd_f32_f16,
        (F16, F32) => Kernel::cast_fwd_f16_f32,
        (BF16, F16) => Kernel::cast_fwd_bf16_f16,
        (F16, BF16) => Kernel::cast_fwd_f16_bf16,
        _ => return None,
    })
}

/// `x` as `to` (a float type). The same type returns `x` itself (no copy).
pub fn cast(x: &Tensor, to: DType) -> Result<Tensor> {
    let from = x.dtype();
    if from == to {
        return Ok(x.clone());
    }
    let Some(k) = kernel(from, to) else {
        return Err(Error::Unsupported { op: "cast", detail: format!("{from} to {to}: only float types convert") });
    };
    let dev = x.device();
    // a cpu-only build has no other storage: the pattern is then irrefutable
    #[allow(irrefutable_let_patterns)]
    if let crate::tensor::Storage::Cpu(host) = x.storage() {
        // read in place (to_cpu_storage would copy the input first)
        return Tensor::from_cpu(cpu::cast(host, to)?, x.shape(), dev);
    }
    let y = Tensor::empty(x.shape(), to, dev)?;
    if x.numel() > 0 {
        let p = CastParams { x: x.dev_ptr(), y: y.dev_ptr(), n: x.numel() as u64 };
        // SAFETY: x holds n elements of `from` and y n elements of `to` (allocated above with
        // that dtype), the very types kernel(from, to) reads and writes.
        unsafe { dev.launch(k, LaunchCfg::elementwise(x.numel()), &p) }?;
    }
    Ok(y)
}

/// The gradient of `cast(x, _)` given the output's gradient: `dy` back in `x`'s type.
pub fn cast_backward(dy: &Tensor, input: DType) -> Result<Tensor> {
    cast(dy, input)
}

/// (elements per image, the range of images b0..b0 + nb as elements) of a tensor's axis 0.
fn batch_range(op: &'static str, x: &Tensor, b0: usize, nb: usize) -> Result<(usize, std::ops::Range<usize>)> {
    let b = x.shape().first().copied().unwrap_or(0);
    if x.rank() == 0 || b0 + nb > b {
        return Err(Error::shape(op, format!("images {b0}..{} of {:?}", b0 + nb, x.shape())));
    }
    let inner = x.numel() / b.max(1);
    Ok((inner, b0 * inner..(b0 + nb) * inner))
}

/// Images b0..b0 + nb (axis 0) of `x` as `to`: a batch chunk of a bf16 activation widened for
/// an f32 kernel (a backward in chunks holds one chunk in f32, not the batch). Any pair of float
/// types `cast` converts, and f32 to f32 (a copy); other same-type pairs are refused.
pub fn cast_batch(x: &Tensor, b0: usize, nb: usize, to: DType) -> Result<Tensor> {
    let op = "cast_batch";
    let (inner, r) = batch_range(op, x, b0, nb)?;
    let mut shape = x.shape().to_vec();
    shape[0] = nb;
    let from = x.dtype();
    if from == to && from == DType::F32 {
        return crate::ops::transpose::narrow(x, 0, b0, nb);
    }
    let Some(k) = kernel(from, to) else {
        return Err(Error::Unsupported { op, detail: format!("{from} to {to}") });
    };
    let dev = x.device();
    #[allow(irrefutable_let_patterns)]
    if let crate::tensor::Storage::Cpu(host) = x.storage() {
        return Tensor::from_cpu(cpu::cast_range(host, r, to)?, &shape, dev);
    }
    let y = Tensor::empty(&shape, to, dev)?;
    if y.numel() > 0 {
        let p = CastParams { x: x.dev_ptr() + (b0 * inner * from.size()) as u64, y: y.dev_ptr(), n: y.numel() as u64 };
        // SAFETY: x holds its images b0..b0 + nb (checked by batch_range) as `from`, from the
        // offset given, and y those nb images as `to`; the kernel reads and writes those types.
        unsafe { dev.launch(k, LaunchCfg::elementwise(y.numel()), &p) }?;
    }
    Ok(y)
}

/// Writes `src` (nb images) converted to `dst`'s type over images b0..b0 + nb of `dst`, which no
/// other handle may share: a backward in chunks assembles its bf16 gradient this way. Any pair
/// `cast` converts on cuda and emu; on the cpu f32 into bf16 (the one the backwards use).
pub fn cast_batch_into(src: &Tensor, dst: &mut Tensor, b0: usize) -> Result<()> {
    let op = "cast_batch_into";
    let nb = src.shape().first().copied().unwrap_or(0);
    let (inner, r) = batch_range(op, dst, b0, nb)?;
    if src.rank() != dst.rank() || src.shape()[1..] != dst.shape()[1..] {
        return Err(Error::shape(op, format!("{:?} into {:?}", src.shape(), dst.shape())));
    }
    src.same_device(op, &[dst])?;
    if !dst.is_sole() {
        return Err(Error::Other(format!("{op}: the destination is shared")));
    }
    let (from, to) = (src.dtype(), dst.dtype());
    let Some(k) = kernel(from, to) else {
        return Err(Error::Unsupported { op, detail: format!("{from} to {to}") });
    };
    let dev = src.device();
    if let crate::Device::Cpu = dev {
        if (from, to) != (DType::F32, DType::BF16) {
            return Err(Error::Unsupported { op, detail: format!("{from} to {to} on the cpu") });
        }
        let s = src.cpu_f32(op)?;
        let d = dst.sole_cpu_bf16_mut().ok_or_else(|| Error::Other(format!("{op}: not a bf16 cpu tensor")))?;
        cpu::round_into(&mut d[r], s);
        return Ok(());
    }
    if src.numel() > 0 {
        let p =
            CastParams { x: src.dev_ptr(), y: dst.dev_ptr() + (b0 * inner * to.size()) as u64, n: src.numel() as u64 };
        // SAFETY: src holds nb·inner elements of `from`; dst (sole: nothing else reads it now)
        // holds images b0..b0 + nb (checked) of `to` from the offset given.
        unsafe { dev.launch(k, LaunchCfg::elementwise(src.numel()), &p) }?;
    }
    Ok(())
}
