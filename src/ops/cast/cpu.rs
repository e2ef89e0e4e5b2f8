//! The cpu conversions, through `half` (round to nearest even; its f16 path uses the F16C
//! instructions where the CPU has them).

use crate::error::{Error, Result};
use crate::tensor::{CpuStorage, DType};
use half::{bf16, f16};

/// The values of a float storage widened to f32 (exact).
fn widened(x: &CpuStorage) -> Result<std::borrow::Cow<'_, [f32]>> {
    Ok(match x {
        CpuStorage::BF16(v) => v.iter().map(|b| b.to_f32()).collect::<Vec<_>>().into(),
        CpuStorage::F16(v) => v.iter().map(|h| h.to_f32()).collect::<Vec<_>>().into(),
        other => other.as_f32().ok_or(Error::DType { op: "cast", expected: DType::F32, got: other.dtype() })?.into(),
    })
}

/// `x` converted to `to` (float types only).
pub fn cast(x: &CpuStorage, to: DType) -> Result<CpuStorage> {
    let v = widened(x)?;
    Ok(match to {
        DType::F32 => CpuStorage::F32(v.into_owned()),
        DType::BF16 => CpuStorage::BF16(v.iter().map(|&f| bf16::from_f32(f)).collect()),
        DType::F16 => CpuStorage::F16(v.iter().map(|&f| f16::from_f32(f)).collect()),
        DType::I32 => return Err(Error::Unsupported { op: "cast", detail: "to i32: only float types convert".into() }),
    })
}
