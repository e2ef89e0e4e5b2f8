//! cpu pooling and upsampling: rayon over planes, row pairs inside.

use half::slice::HalfFloatSliceExt;
use rayon::prelude::*;

use crate::ops::cpu_math::multiversion;

/// The window rule of kernels/pool.cu: NaN wins, ties to the first in row-major order. Written
/// with non-short-circuit operators so that it compiles to vector selects.
#[inline(always)]
fn better(v: f32, best: f32) -> bool {
    (v.is_nan() & !best.is_nan()) | (v > best)
}

multiversion! {
    /// One output row from the two input rows of its windows (straight-line selects, vectorised).
    fn pool_row(r0: &[f32], r1: &[f32], y: &mut [f32], idx: &mut [i32]) {
        for (c, (o, i)) in y.iter_mut().zip(idx.iter_mut()).enumerate() {
            let (a, b, e, f) = (r0[2 * c], r0[2 * c + 1], r1[2 * c], r1[2 * c + 1]);
            let (mut best, mut bi) = (a, 0i32);
            let t = better(b, best);
            best = if t { b } else { best };
            bi = if t { 1 } else { bi };
            let t = better(e, best);
            best = if t { e } else { best };
            bi = if t { 2 } else { bi };
            let t = better(f, best);
            best = if t { f } else { best };
            bi = if t { 3 } else { bi };
            *o = best;
            *i = bi;
        }
    }
}

pub fn max_pool2(x: &[f32], planes: usize, h: usize, w: usize) -> (Vec<f32>, Vec<i32>) {
    let (oh, ow) = (h / 2, w / 2);
    let mut y = vec![0.0f32; planes * oh * ow];
    let mut idx = vec![0i32; planes * oh * ow];
    if y.is_empty() {
        return (y, idx);
    }
    y.par_chunks_mut(oh * ow).zip(idx.par_chunks_mut(oh * ow)).enumerate().for_each(|(pl, (yp, ip))| {
        let xp = &x[pl * h * w..(pl + 1) * h * w];
        for r in 0..oh {
            let (r0, r1) = (&xp[2 * r * w..2 * r * w + w], &xp[(2 * r + 1) * w..(2 * r + 1) * w + w]);
            pool_row(r0, r1, &mut yp[r * ow..(r + 1) * ow], &mut ip[r * ow..(r + 1) * ow]);
        }
    });
    (y, idx)
}

pub fn max_pool2_backward(dy: &[f32], idx: &[i32], planes: usize, h: usize, w: usize) -> Vec<f32> {
    let (oh, ow) = (h / 2, w / 2);
    let mut dx = vec![0.0f32; planes * h * w];
    if dx.is_empty() {
        return dx;
    }
    dx.par_chunks_mut(h * w).enumerate().for_each(|(pl, dp)| {
        for r in 0..oh {
            for c in 0..ow {
                let o = pl * oh * ow + r * ow + c;
                let k = idx[o] as usize;
                dp[(2 * r + k / 2) * w + 2 * c + k % 2] = dy[o];
            }
        }
    });
    dx
}

/// `max_pool2_backward` with the window maxima found again from the input (f32, or bf16 widened
/// two rows at a time) by the forward's own rule: the same indices, and no index array.
pub fn max_pool2_backward_from_input(dy: &[f32], x: super::PoolInput, planes: usize, h: usize, w: usize) -> Vec<f32> {
    let (oh, ow) = (h / 2, w / 2);
    let mut dx = vec![0.0f32; planes * h * w];
    if dx.is_empty() {
        return dx;
    }
    dx.par_chunks_mut(h * w).enumerate().for_each(|(pl, dp)| {
        let (mut rows, mut y, mut idx) = (vec![0.0f32; 2 * w], vec![0.0f32; ow], vec![0i32; ow]);
        for r in 0..oh {
            let at = pl * h * w + 2 * r * w;
            let (r0, r1) = match x {
                super::PoolInput::F32(v) => (&v[at..at + w], &v[at + w..at + 2 * w]),
                super::PoolInput::Bf16(v) => {
                    v[at..at + 2 * w].convert_to_f32_slice(&mut rows);
                    let (a, b) = rows.split_at(w);
                    (a, b)
                }
            };
            pool_row(r0, r1, &mut y, &mut idx);
            for (c, &k) in idx.iter().enumerate() {
                let k = k as usize;
                dp[(2 * r + k / 2) * w + 2 * c + k % 2] = dy[pl * oh * ow + r * ow + c];
            }
        }
    });
    dx
}

/// `max_pool2`'s values on bf16 x (rows widened two at a time, the same rule), in bf16.
#[cfg(feature = "autocast")]
pub fn max_pool2_bf16(x: &[half::bf16], planes: usize, h: usize, w: usize) -> Vec<half::bf16> {
    let (oh, ow) = (h / 2, w / 2);
    let mut y = vec![half::bf16::ZERO; planes * oh * ow];
    if y.is_empty() {
        return y;
    }
    y.par_chunks_mut(oh * ow).enumerate().for_each(|(pl, yp)| {
        let (mut rows, mut yr, mut idx) = (vec![0.0f32; 2 * w], vec![0.0f32; ow], vec![0i32; ow]);
        for r in 0..oh {
            let at = pl * h * w + 2 * r * w;
            x[at..at + 2 * w].convert_to_f32_slice(&mut rows);
            let (r0, r1) = rows.split_at(w);
            pool_row(r0, r1, &mut yr, &mut idx);
            // exact: each maximum is a widened bf16 value
            yp[r * ow..(r + 1) * ow].convert_from_f32_slice(&yr);
        }
    });
    y
}

/// `upsample2` of bf16 values, in bf16 (copies).
#[cfg(feature = "autocast")]
pub fn upsample2_bf16(x: &[half::bf16], planes: usize, h: usize, w: usize) -> Vec<half::bf16> {
    let mut y = vec![half::bf16::ZERO; planes * 4 * h * w];
    if y.is_empty() {
        return y;
    }
    y.par_chunks_mut(4 * h * w).enumerate().for_each(|(pl, yp)| {
        let xp = &x[pl * h * w..(pl + 1) * h * w];
        for (r, pair) in yp.chunks_mut(4 * w).enumerate() {
            let (top, bottom) = pair.split_at_mut(2 * w);
            for (two, &v) in top.chunks_exact_mut(2).zip(&xp[r * w..(r + 1) * w]) {
                two[0] = v;
                two[1] = v;
            }
            bottom.copy_from_slice(top);
        }
    });
    y
}

pub fn upsample2(x: &[f32], planes: usize, h: usize, w: usize) -> Vec<f32> {
    // one output plane per chunk, written once (no zeroing pass: 4x the input's size)
    crate::ops::cpu_math::par_new(planes * 4 * h * w, 4 * h * w, |pl, yp| {
        let xp = &x[pl * h * w..(pl + 1) * h * w];
        for (r, pair) in yp.chunks_mut(4 * w).enumerate() {
            let (top, bottom) = pair.split_at_mut(2 * w);
            for (two, &v) in top.chunks_exact_mut(2).zip(&xp[r * w..(r + 1) * w]) {
                two[0].write(v);
                two[1].write(v);
            }
            bottom.copy_from_slice(top);
        }
    })
}

pub fn upsample2_backward(dy: &[f32], planes: usize, h: usize, w: usize) -> Vec<f32> {
    let mut dx = vec![0.0f32; planes * h * w];
    if dx.is_empty() {
        return dx;
    }
    dx.par_chunks_mut(h * w).enumerate().for_each(|(pl, dp)| {
        let gp = &dy[pl * 4 * h * w..(pl + 1) * 4 * h * w];
        for r in 0..h {
            let (g0, g1) = (&gp[2 * r * 2 * w..(2 * r + 1) * 2 * w], &gp[(2 * r + 1) * 2 * w..(2 * r + 2) * 2 * w]);
            for c in 0..w {
                dp[r * w + c] = (g0[2 * c] + g0[2 * c + 1]) + (g1[2 * c] + g1[2 * c + 1]);
            }
        }
    });
    dx
}
