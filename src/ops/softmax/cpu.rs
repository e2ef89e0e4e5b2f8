//! Fast cpu softmax: rayon over rows; max, exp-and-sum and scale are three simple passes over a row
//! that stays in L1.

use rayon::prelude::*;

pub fn forward(x: &[f32], cols: usize, log: bool) -> Vec<f32> {
    let mut y = vec![0.0f32; x.len()];
    if cols == 0 {
        return y;
    }
    y.par_chunks_mut(cols)
        .zip(x.par_chunks(cols))
        .for_each(|(yr, xr)| {
            // f32::max ignores NaN, so NaN is checked for separately: it must poison the row.
            let m = xr.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            if xr.iter().any(|v| v.is_nan()) {
                yr.fill(f32::NAN);
                return;
            }
            let mut s = 0.0f32;
            for (o, &v) in yr.iter_mut().zip(xr) {
                *o = (v - m).exp();
                s += *o;
            }
            if log {
                let lse = m + s.ln();
                for (o, &v) in yr.iter_mut().zip(xr) {
                    *o = v - lse;
                }
            } else {
                let inv = 1.0 / s;
                yr.iter_mut().for_each(|o| *o *= inv);
            }
        });
    y
}

pub fn backward(y: &[f32], dy: &[f32], cols: usize, log: bool) -> Vec<f32> {
    let mut dx = vec![0.0f32; y.len()];
    if cols == 0 {
        return dx;
    }
    dx.par_chunks_mut(cols).enumerate().for_each(|(r, dr)| {
        let (yr, gr) = (&y[r * cols..(r + 1) * cols], &dy[r * cols..(r + 1) * cols]);
        if log {
            let s: f32 = gr.iter().sum();
            for ((o, &yv), &g) in dr.iter_mut().zip(yr).zip(gr) {
                *o = g - yv.exp() * s;
            }
        } else {
            let s: f32 = yr.iter().zip(gr).map(|(a, b)| a * b).sum();
            for ((o, &yv), &g) in dr.iter_mut().zip(yr).zip(gr) {
                *o = yv * (g - s);
            }
        }
    });
    dx
}
