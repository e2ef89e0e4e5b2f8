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
    crate::ops::assert_len("gemm", "A", a.len(), s.span(s.sa, m, k));
    crate::ops::assert_len("gemm", "B", b.len(), s.span(s.sb, k, n));
    if let Some(bias) = bias {
        crate::ops::assert_len("gemm", "bias", bias.len(), Some(n));
    }
    let mut c = vec![0.0f32; crate::ops::product(&[s.batch, m, n]).expect("the output's size overflows")];
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

/// Below this many rows a Linear skips the GEMM library: packing the weights costs as much as the
/// product (the text tower's 18-token rows read 151 MB of weights per note at the official size).
pub const FEW_ROWS: usize = 32;

crate::ops::cpu_math::multiversion! {
    /// yᵀ for a block of output features: yt[j][r] = ⟨x_r, w_j⟩ (+ bias_j), w rows contiguous.
    /// Register tiles of 4 features × 2 rows (8 accumulators of 16 lanes): 6 loads per 8 FMAs
    /// (4 × 4 spilled and ran 15x slower).
    fn few_rows_block(x: &[f32], w: &[f32], bias: Option<&[f32]>, yt: &mut [f32], k: usize, rows: usize) {
        const L: usize = crate::ops::cpu_math::LANES;
        let nf = yt.len() / rows.max(1);
        let kv = k / L * L;
        let mut j = 0;
        while j < nf {
            let jn = (nf - j).min(4);
            let mut r = 0;
            while r < rows {
                let rn = (rows - r).min(2);
                let mut acc = [[0.0f32; L]; 8];
                let mut c = 0;
                while c < kv {
                    let mut xv = [[0.0f32; L]; 2];
                    for (ri, xr) in xv.iter_mut().enumerate().take(rn) {
                        xr.copy_from_slice(&x[(r + ri) * k + c..(r + ri) * k + c + L]);
                    }
                    for jj in 0..jn {
                        let wv = &w[(j + jj) * k + c..(j + jj) * k + c + L];
                        for ri in 0..2 {
                            for l in 0..L {
                                acc[jj * 2 + ri][l] += xv[ri][l] * wv[l];
                            }
                        }
                    }
                    c += L;
                }
                for jj in 0..jn {
                    let b = bias.map_or(0.0, |b| b[j + jj]);
                    for ri in 0..rn {
                        let tail: f32 = (kv..k).map(|cc| x[(r + ri) * k + cc] * w[(j + jj) * k + cc]).sum();
                        yt[(j + jj) * rows + r + ri] = crate::ops::cpu_math::hsum(acc[jj * 2 + ri]) + tail + b;
                    }
                }
                r += rn;
            }
            j += jn;
        }
    }
}

/// y [rows, n] = x [rows, k] · wᵀ (+ bias), w [n, k], for few rows: each weight row is read once
/// and dotted with every input row (which stay in cache); features are spread over the threads.
pub fn linear_few_rows(x: &[f32], w: &[f32], bias: Option<&[f32]>, rows: usize, k: usize, n: usize) -> Vec<f32> {
    const BLOCK: usize = 64;
    let mut yt = vec![0.0f32; n * rows];
    yt.par_chunks_mut(BLOCK * rows).enumerate().for_each(|(blk, chunk)| {
        let j0 = blk * BLOCK;
        let nb = chunk.len() / rows.max(1);
        few_rows_block(x, &w[j0 * k..(j0 + nb) * k], bias.map(|b| &b[j0..j0 + nb]), chunk, k, rows);
    });
    let mut y = vec![0.0f32; rows * n];
    for j in 0..n {
        for r in 0..rows {
            y[r * n + j] = yt[j * rows + r];
        }
    }
    y
}
