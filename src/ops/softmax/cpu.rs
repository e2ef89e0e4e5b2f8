//! Fast cpu softmax: rayon over rows; each row is three passes (max, exp-and-sum, scale) over data
//! that stays in L1, with 16 independent lanes per pass so that they vectorise, and the
//! polynomial exp of `cpu_math` instead of libm's scalar call.

use crate::ops::cpu_math::{self, dot_lanes, multiversion, LANES};
use rayon::prelude::*;

/// Elements per rayon task.
const TASK: usize = 1 << 14;

/// Row max, ignoring NaN: a NaN then reaches the sum through exp(NaN - m) and poisons the whole
/// row, as it must, without a separate check.
#[inline(always)]
fn row_max(x: &[f32]) -> f32 {
    let mut m = [f32::NEG_INFINITY; LANES];
    let chunks = x.chunks_exact(LANES);
    let tail = chunks.remainder();
    for c in chunks {
        for l in 0..LANES {
            m[l] = if c[l] > m[l] { c[l] } else { m[l] };
        }
    }
    let mm = m.iter().fold(f32::NEG_INFINITY, |a, &b| if b > a { b } else { a });
    tail.iter().fold(mm, |a, &b| if b > a { b } else { a })
}

/// Writes exp(x - m) into y and returns the sum.
#[inline(always)]
fn exp_shifted(x: &[f32], m: f32, y: &mut [f32]) -> f32 {
    let mut acc = [0.0f32; LANES];
    let mut xc = x.chunks_exact(LANES);
    let mut yc = y.chunks_exact_mut(LANES);
    for (xs, ys) in (&mut xc).zip(&mut yc) {
        for l in 0..LANES {
            ys[l] = cpu_math::exp(xs[l] - m);
            acc[l] += ys[l];
        }
    }
    let mut s: f32 = acc.iter().sum();
    for (o, &v) in yc.into_remainder().iter_mut().zip(xc.remainder()) {
        *o = cpu_math::exp(v - m);
        s += *o;
    }
    s
}

multiversion! {
    fn forward_row(xr: &[f32], yr: &mut [f32], log: bool) {
        let m = row_max(xr);
        let s = exp_shifted(xr, m, yr);
        if log {
            // x - m - ln s: exact up to the rounding of each term, unlike ln(exp(x - m) / s)
            let lse = m + s.ln();
            for (o, &v) in yr.iter_mut().zip(xr) {
                *o = v - lse;
            }
        } else {
            let inv = 1.0 / s;
            yr.iter_mut().for_each(|o| *o *= inv);
        }
    }
}

pub fn forward(x: &[f32], cols: usize, log: bool) -> Vec<f32> {
    let mut y = vec![0.0f32; x.len()];
    if cols == 0 {
        return y;
    }
    // Several rows per task: attention rows are short (18 to 196 floats) and there are many.
    let rows = (TASK / cols).max(1);
    y.par_chunks_mut(cols * rows).zip(x.par_chunks(cols * rows)).for_each(|(yt, xt)| {
        for (yr, xr) in yt.chunks_mut(cols).zip(xt.chunks(cols)) {
            forward_row(xr, yr, log)
        }
    });
    y
}

multiversion! {
    fn backward_row(yr: &[f32], gr: &[f32], dr: &mut [f32], log: bool) {
        if log {
            let s: f32 = gr.iter().sum();
            for ((o, &yv), &g) in dr.iter_mut().zip(yr).zip(gr) {
                *o = g - cpu_math::exp(yv) * s;
            }
        } else {
            let s = dot_lanes(yr, gr);
            for ((o, &yv), &g) in dr.iter_mut().zip(yr).zip(gr) {
                *o = yv * (g - s);
            }
        }
    }
}

pub fn backward(y: &[f32], dy: &[f32], cols: usize, log: bool) -> Vec<f32> {
    let mut dx = vec![0.0f32; y.len()];
    if cols == 0 {
        return dx;
    }
    let rows = (TASK / cols).max(1);
    dx.par_chunks_mut(cols * rows).enumerate().for_each(|(task, dt)| {
        for (k, dr) in dt.chunks_mut(cols).enumerate() {
            let r = task * rows + k;
            backward_row(&y[r * cols..(r + 1) * cols], &dy[r * cols..(r + 1) * cols], dr, log)
        }
    });
    dx
}
