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
