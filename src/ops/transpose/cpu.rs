//! Fast cpu permutation: 32x32 tiles for a swap of the last two dims (both sides stay in cache),
//! an index walk for anything else.

use crate::ops::contiguous_strides;
use rayon::prelude::*;

const TILE: usize = 32;
/// Elements per rayon task of the general permutation.
const TASK: usize = 1 << 14;

/// `shape`, `perm` as returned by `simplify` (merged, at least 2 dims).
pub fn permute(x: &[f32], shape: &[usize], perm: &[usize]) -> Vec<f32> {
    let r = perm.len();
    let mut y = vec![0.0f32; x.len()];
    if x.is_empty() {
        return y;
    }
    if perm[..r - 2].iter().enumerate().all(|(i, &p)| i == p) && perm[r - 2] == r - 1 {
        let (rows, cols) = (shape[r - 2], shape[r - 1]);
        y.par_chunks_mut(rows * cols).zip(x.par_chunks(rows * cols)).for_each(|(yb, xb)| {
            for r0 in (0..rows).step_by(TILE) {
                for c0 in (0..cols).step_by(TILE) {
                    for c in c0..(c0 + TILE).min(cols) {
                        for rr in r0..(r0 + TILE).min(rows) {
                            yb[c * rows + rr] = xb[rr * cols + c];
                        }
                    }
                }
            }
        });
        return y;
    }
    let st = contiguous_strides(shape);
    let out_shape: Vec<usize> = perm.iter().map(|&p| shape[p]).collect();
    let in_strides: Vec<usize> = perm.iter().map(|&p| st[p]).collect();
    let inner = out_shape[r - 1];
    let s = in_strides[r - 1];
    // Several rows per task: rows can be short (a head of 64 floats) and there are many.
    let rows_per_task = (TASK / inner).max(1);
    y.par_chunks_mut(inner * rows_per_task).enumerate().for_each(|(task, yt)| {
        for (k, yr) in yt.chunks_mut(inner).enumerate() {
            let (mut src, mut rem) = (0, task * rows_per_task + k);
            for d in (0..r - 1).rev() {
                src += (rem % out_shape[d]) * in_strides[d];
                rem /= out_shape[d];
            }
            if s == 1 {
                yr.copy_from_slice(&x[src..src + inner]);
            } else {
                for (j, o) in yr.iter_mut().enumerate() {
                    *o = x[src + j * s];
                }
            }
        }
    });
    y
}

/// x [outer, n, inner] -> [outer, len, inner] from start.
pub fn narrow(x: &[f32], (outer, n, inner): (usize, usize, usize), start: usize, len: usize) -> Vec<f32> {
    let mut y = Vec::with_capacity(outer * len * inner);
    for o in 0..outer {
        y.extend_from_slice(&x[(o * n + start) * inner..(o * n + start + len) * inner]);
    }
    y
}

/// dy [outer, len, inner] placed at start of a zero [outer, n, inner].
pub fn narrow_backward(dy: &[f32], (outer, n, inner): (usize, usize, usize), start: usize, len: usize) -> Vec<f32> {
    let mut dx = vec![0.0; outer * n * inner];
    for o in 0..outer {
        dx[(o * n + start) * inner..(o * n + start + len) * inner]
            .copy_from_slice(&dy[o * len * inner..(o + 1) * len * inner]);
    }
    dx
}
