//! cpu GEMM through the `gemm` crate (AVX-512/AVX2/FMA microkernels, rayon), which takes
//! arbitrary row and column strides, so transposed operands need no copy.

use super::GemmShape;
use gemm::Parallelism;
use rayon::prelude::*;

/// Below this many multiply-adds per matrix, parallelise across the batch instead of inside one
/// product (threading a small product costs more than it saves).
const PAR_INSIDE: usize = 1 << 18;

/// C = alpha·A·B (+ bias [n] on every row: C starts as the bias rows and the product is
/// accumulated onto them, so the epilogue costs no extra pass).
pub fn gemm(a: &[f32], b: &[f32], s: &GemmShape, alpha: f32, bias: Option<&[f32]>) -> Vec<f32> {
    let (m, n, k) = (s.m, s.n, s.k);
    let mut c = vec![0.0f32; s.batch * m * n];
    if c.is_empty() {
        return c;
    }
    if let Some(bias) = bias {
        c.par_chunks_mut(n).for_each(|row| row.copy_from_slice(bias));
    }
    let read_dst = bias.is_some();
    let one = |z: usize, cz: &mut [f32], par: Parallelism| {
        let (pa, pb) = (&a[z * s.sa.0..], &b[z * s.sb.0..]);
        // SAFETY: the plan's strides address only elements inside `a` and `b` for every (i, kk, j)
        // below m, k, n (checked by the shapes in `plan`); cz holds exactly m x n.
        unsafe {
            gemm::gemm(
                m,
                n,
                k,
                cz.as_mut_ptr(),
                1,
                n as isize,
                read_dst,
                pa.as_ptr(),
                s.sa.2 as isize,
                s.sa.1 as isize,
                pb.as_ptr(),
                s.sb.2 as isize,
                s.sb.1 as isize,
                1.0,   // gemm's alpha scales the old C (read only when it holds the bias)
                alpha, // gemm's beta scales A·B
                false,
                false,
                false,
                par,
            )
        }
    };
    if m * n * k >= PAR_INSIDE || s.batch == 1 {
        let par = if m * n * k >= PAR_INSIDE { Parallelism::Rayon(0) } else { Parallelism::None };
        for (z, cz) in c.chunks_mut(m * n).enumerate() {
            one(z, cz, par);
        }
    } else {
        c.par_chunks_mut(m * n).enumerate().for_each(|(z, cz)| one(z, cz, Parallelism::None));
    }
    c
}
