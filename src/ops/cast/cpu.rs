//! The cpu conversions: round to nearest even, in parallel pieces. f32 → bf16 is written as the
//! integer arithmetic below (it vectorises; `half::bf16::from_f32` is the same rounding one
//! element at a time); f16 goes through `half`'s slice conversions (F16C where the CPU has it).

use crate::error::{Error, Result};
use crate::tensor::{CpuStorage, DType};
use half::slice::HalfFloatSliceExt;
use half::{bf16, f16};
use rayon::prelude::*;

/// Elements per parallel piece: large enough that a piece costs more than handing it out.
const PIECE: usize = 1 << 16;

/// f32 → bf16 bits, round to nearest even; NaN stays NaN (quietened, as `half` does).
#[inline(always)]
pub(crate) fn bf16_bits(x: f32) -> u16 {
    let u = x.to_bits();
    // the carry of a round-up may run into the exponent: the right next value (or inf)
    let rounded = (u.wrapping_add(0x7fff + ((u >> 16) & 1)) >> 16) as u16;
    let nan = ((u >> 16) | 0x0040) as u16;
    // a select rather than a branch, so that the loop vectorises
    if u & 0x7fff_ffff > 0x7f80_0000 {
        nan
    } else {
        rounded
    }
}

/// `src` rounded to bf16 over `dst` (the same length), in parallel pieces.
pub(crate) fn round_into(dst: &mut [bf16], src: &[f32]) {
    dst.par_chunks_mut(PIECE).zip(src.par_chunks(PIECE)).for_each(|(o, x)| {
        for (o, &x) in o.iter_mut().zip(x) {
            *o = bf16::from_bits(bf16_bits(x));
        }
    });
}

/// The values `r` of a float storage widened to f32 (exact).
fn widened(x: &CpuStorage, r: std::ops::Range<usize>) -> Result<std::borrow::Cow<'_, [f32]>> {
    let widen = |n: usize, f: &(dyn Fn(&mut [f32], usize) + Sync)| {
        let mut out = vec![0f32; n];
        out.par_chunks_mut(PIECE).enumerate().for_each(|(i, o)| f(o, i * PIECE));
        out
    };
    Ok(match x {
        CpuStorage::BF16(v) => {
            let v = &v[r];
            widen(v.len(), &|o, at| v[at..at + o.len()].convert_to_f32_slice(o)).into()
        }
        CpuStorage::F16(v) => {
            let v = &v[r];
            widen(v.len(), &|o, at| v[at..at + o.len()].convert_to_f32_slice(o)).into()
        }
        other => other.as_f32().ok_or(Error::DType { op: "cast", expected: DType::F32, got: other.dtype() })?[r].into(),
    })
}

/// `x` converted to `to` (float types only).
pub fn cast(x: &CpuStorage, to: DType) -> Result<CpuStorage> {
    cast_range(x, 0..x.as_bytes().len() / x.dtype().size(), to)
}

/// Elements `r` of `x` converted to `to` (float types only), read in place.
pub fn cast_range(x: &CpuStorage, r: std::ops::Range<usize>, to: DType) -> Result<CpuStorage> {
    let v = widened(x, r)?;
    Ok(match to {
        DType::F32 => CpuStorage::F32(v.into_owned()),
        // collected in place: no zero-filling pass over the output first
        DType::BF16 => {
            // written once, without a zero-filling pass first
            let mut out: Vec<bf16> = Vec::with_capacity(v.len());
            out.spare_capacity_mut()[..v.len()].par_chunks_mut(PIECE).zip(v.par_chunks(PIECE)).for_each(|(o, x)| {
                for (o, &x) in o.iter_mut().zip(x) {
                    o.write(bf16::from_bits(bf16_bits(x)));
                }
            });
            // SAFETY: the two sides were cut into the same pieces of equal total length v.len(),
            // so every one of the first v.len() elements was written above.
            unsafe { out.set_len(v.len()) };
            CpuStorage::BF16(out)
        }
        DType::F16 => {
            let mut out = vec![f16::ZERO; v.len()];
            out.par_chunks_mut(PIECE).zip(v.par_chunks(PIECE)).for_each(|(o, x)| o.convert_from_f32_slice(x));
            CpuStorage::F16(out)
        }
        DType::I32 => return Err(Error::Unsupported { op: "cast", detail: "to i32: only float types convert".into() }),
    })
}
