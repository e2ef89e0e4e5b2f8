//! Ops, one folder each: the public API with its backward, the `#[repr(C)]` params struct and
//! launch configuration for cuda and emu, the fast cpu path (`cpu.rs`) and the naive reference
//! with f64 accumulation (`reference.rs`, what the tests compare against).

pub mod attention;
pub mod cast;
pub mod ccl;
pub mod conv;
pub(crate) mod cpu_math;
pub mod elementwise;
pub mod embedding;
pub mod gemm;
pub mod layer_norm;
pub mod loss;
pub mod norm;
pub mod plam;
pub mod pool;
pub mod reduce;
pub mod softmax;
pub mod transpose;
#[cfg(feature = "tune")]
pub mod tune;
/// Without the `tune` feature (reclmis-infer) every op runs its heuristic's choice.
#[cfg(not(feature = "tune"))]
pub mod tune {
    pub fn pick<R>(
        _key: impl FnOnce() -> String,
        _names: &[&'static str],
        heuristic: usize,
        mut run: impl FnMut(usize) -> R,
    ) -> R {
        run(heuristic)
    }

    pub fn pick_on<R, E>(
        _dev: &crate::Device,
        _key: impl FnOnce() -> String,
        _names: &[&'static str],
        heuristic: usize,
        mut run: impl FnMut(usize) -> Result<R, E>,
    ) -> Result<R, E> {
        run(heuristic)
    }
}

use crate::error::{Error, Result};

/// Largest rank the index-decoding kernels take after adjacent dims are merged.
pub const MAX_RANK: usize = 6;

/// Row-major strides of a shape.
pub fn contiguous_strides(shape: &[usize]) -> Vec<usize> {
    let mut s = vec![1; shape.len()];
    for d in (0..shape.len().saturating_sub(1)).rev() {
        s[d] = s[d + 1] * shape[d + 1];
    }
    s
}

/// Kernels index with u32 dims and strides; bigger tensors get an error instead of wrong results.
/// The public raw-slice entry points (cpu GEMM, convolution, attention) index their slices
/// through raw pointers by the sizes in a shape struct: a slice shorter than the shape says is a
/// caller's bug that must panic here, not read or write out of bounds. `want` is None when the
/// shape's element count overflows.
#[track_caller]
pub(crate) fn assert_len(op: &str, what: &str, got: usize, want: Option<usize>) {
    match want {
        Some(w) if got >= w => {}
        Some(w) => panic!("{op}: {what} holds {got} floats, its shape needs {w}"),
        None => panic!("{op}: {what}'s shape overflows"),
    }
}

/// Product of sizes, None on overflow.
pub(crate) fn product(dims: &[usize]) -> Option<usize> {
    dims.iter().try_fold(1usize, |n, &d| n.checked_mul(d))
}

pub(crate) fn check_u32(op: &'static str, what: usize) -> Result<u32> {
    u32::try_from(what).map_err(|_| Error::Unsupported { op, detail: format!("{what} exceeds the u32 index range") })
}

/// Normalises a possibly negative axis.
pub(crate) fn axis_index(op: &'static str, axis: isize, rank: usize) -> Result<usize> {
    let a = if axis < 0 { axis + rank as isize } else { axis };
    if a < 0 || a as usize >= rank {
        return Err(Error::shape(op, format!("axis {axis} out of range for rank {rank}")));
    }
    Ok(a as usize)
}
