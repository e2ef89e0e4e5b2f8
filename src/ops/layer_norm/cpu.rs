//! cpu layer norm: rows in parallel (rayon), two passes per row like the kernel; dγ and dβ are
//! summed per chunk of rows and the chunks added in order (deterministic).

use rayon::prelude::*;

/// Rows per rayon task.
const ROWS: usize = 64;

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
                let m = xr.iter().sum::<f32>() / c as f32;
                let v = xr.iter().map(|&a| (a - m) * (a - m)).sum::<f32>() / c as f32;
                let rs = 1.0 / (v + eps).sqrt();
                for j in 0..c {
                    let xh = (xr[j] - m) * rs;
                    yr[j] = xh * gamma.map_or(1.0, |g| g[j]) + beta.map_or(0.0, |b| b[j]);
                }
                mc[r] = m;
                rc[r] = rs;
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
            let mut g = vec![0.0f32; c];
            for (r, dxr) in dxc.chunks_mut(c).enumerate() {
                let row = t * ROWS + r;
                let (xr, dyr) = (&x[row * c..][..c], &dy[row * c..][..c]);
                let (m, rs) = (mean[row], rstd[row]);
                let (mut sg, mut sgx) = (0.0f32, 0.0f32);
                for j in 0..c {
                    let xh = (xr[j] - m) * rs;
                    g[j] = dyr[j] * gamma.map_or(1.0, |w| w[j]);
                    sg += g[j];
                    sgx += g[j] * xh;
                    dg[j] += dyr[j] * xh;
                    db[j] += dyr[j];
                }
                let (sg, sgx) = (sg / c as f32, sgx / c as f32);
                for j in 0..c {
                    dxr[j] = rs * (g[j] - sg - (xr[j] - m) * rs * sgx);
                }
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
