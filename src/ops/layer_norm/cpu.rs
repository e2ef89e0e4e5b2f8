//! cpu layer norm: rows in parallel (rayon), two passes per row like the kernel, the row loops
//! built for AVX-512/AVX2 with lane-wise partial sums; dγ and dβ are summed per chunk of rows and
//! the chunks added in order (deterministic).

use crate::ops::cpu_math::{self, dot_lanes, sum_lanes};
use rayon::prelude::*;

/// Rows per rayon task.
const ROWS: usize = 64;

cpu_math::multiversion! {
    /// One row: y, and (mean, rstd).
    fn row_fwd(xr: &[f32], gamma: Option<&[f32]>, beta: Option<&[f32]>, yr: &mut [f32], eps: f32) -> (f32, f32) {
        let c = xr.len() as f32;
        let m = sum_lanes(xr) / c;
        for (o, &a) in yr.iter_mut().zip(xr) {
            *o = a - m;
        }
        let rs = 1.0 / (dot_lanes(yr, yr) / c + eps).sqrt();
        match (gamma, beta) {
            (Some(g), Some(b)) => yr.iter_mut().zip(g).zip(b).for_each(|((o, &g), &b)| *o = *o * rs * g + b),
            (Some(g), None) => yr.iter_mut().zip(g).for_each(|(o, &g)| *o = *o * rs * g),
            (None, Some(b)) => yr.iter_mut().zip(b).for_each(|(o, &b)| *o = *o * rs + b),
            (None, None) => yr.iter_mut().for_each(|o| *o *= rs),
        }
        (m, rs)
    }
}

cpu_math::multiversion! {
    /// One row of dx (xh and g are scratch rows), accumulating dγ and dβ.
    fn row_bwd(x_dy: (&[f32], &[f32]), gamma: Option<&[f32]>, stats: (f32, f32), dxr: &mut [f32], scratch: (&mut [f32], &mut [f32]), acc: (&mut [f32], &mut [f32])) {
        let ((xr, dyr), (m, rs), (xh, g), (dg, db)) = (x_dy, stats, scratch, acc);
        let c = xr.len() as f32;
        for (h, &a) in xh.iter_mut().zip(xr) {
            *h = (a - m) * rs;
        }
        match gamma {
            Some(w) => g.iter_mut().zip(dyr).zip(w).for_each(|((o, &d), &w)| *o = d * w),
            None => g.copy_from_slice(dyr),
        }
        let sg = sum_lanes(g) / c;
        let sgx = dot_lanes(g, xh) / c;
        for j in 0..xr.len() {
            dxr[j] = rs * (g[j] - sg - xh[j] * sgx);
            dg[j] += dyr[j] * xh[j];
            db[j] += dyr[j];
        }
    }
}

/// (y, mean, rstd)
pub fn forward(
    x: &[f32],
    gamma: Option<&[f32]>,
    beta: Option<&[f32]>,
    c: usize,
    eps: f32,
) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let rows = x.len() / c;
    let mut y = vec![0.0f32; x.len()];
    let (mut mean, mut rstd) = (vec![0.0f32; rows], vec![0.0f32; rows]);
    y.par_chunks_mut(ROWS * c).zip(mean.par_chunks_mut(ROWS).zip(rstd.par_chunks_mut(ROWS))).enumerate().for_each(
        |(t, (yc, (mc, rc)))| {
            for (r, yr) in yc.chunks_mut(c).enumerate() {
                let xr = &x[(t * ROWS + r) * c..][..c];
                (mc[r], rc[r]) = row_fwd(xr, gamma, beta, yr, eps);
            }
        },
    );
    (y, mean, rstd)
}

/// (dx, dγ, dβ)
pub fn backward(
    x: &[f32],
    gamma: Option<&[f32]>,
    mean: &[f32],
    rstd: &[f32],
    dy: &[f32],
    c: usize,
) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let mut dx = vec![0.0f32; x.len()];
    let partials: Vec<(Vec<f32>, Vec<f32>)> = dx
        .par_chunks_mut(ROWS * c)
        .enumerate()
        .map(|(t, dxc)| {
            let (mut dg, mut db) = (vec![0.0f32; c], vec![0.0f32; c]);
            let (mut xh, mut g) = (vec![0.0f32; c], vec![0.0f32; c]);
            for (r, dxr) in dxc.chunks_mut(c).enumerate() {
                let row = t * ROWS + r;
                let (xr, dyr) = (&x[row * c..][..c], &dy[row * c..][..c]);
                row_bwd((xr, dyr), gamma, (mean[row], rstd[row]), dxr, (&mut xh, &mut g), (&mut dg, &mut db));
            }
            (dg, db)
        })
        .collect();
    let (mut dg, mut db) = (vec![0.0f32; c], vec![0.0f32; c]);
    for (pg, pb) in partials {
        for j in 0..c {
            dg[j] += pg[j];
            db[j] += pb[j];
        }
    }
    (dx, dg, db)
}
