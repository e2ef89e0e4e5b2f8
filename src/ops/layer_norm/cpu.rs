//! cpu layer norm: rows in parallel (rayon), two passes per row like the kernel, the row loops
//! built for AVX-512/AVX2 with lane-wise partial sums; dγ and dβ are summed per chunk of rows and
//! the chunks added in order (deterministic).

use crate::ops::cpu_math::{self, sq_dev_lanes, sum_lanes, SendPtr};
use std::mem::MaybeUninit;

/// Rows per rayon task.
const ROWS: usize = 64;

cpu_math::multiversion! {
    /// One row: y, and (mean, rstd). The deviations are recomputed for the output instead of
    /// stored and re-read (same roundings), so y is written once.
    fn row_fwd(xr: &[f32], gamma: Option<&[f32]>, beta: Option<&[f32]>, yr: &mut [MaybeUninit<f32>], eps: f32) -> (f32, f32) {
        let c = xr.len() as f32;
        let m = sum_lanes(xr) / c;
        let rs = 1.0 / (sq_dev_lanes(xr, m) / c + eps).sqrt();
        let it = yr.iter_mut().zip(xr);
        match (gamma, beta) {
            (Some(g), Some(b)) => it.zip(g).zip(b).for_each(|(((o, &a), &g), &b)| {
                o.write((a - m) * rs * g + b);
            }),
            (Some(g), None) => it.zip(g).for_each(|((o, &a), &g)| {
                o.write((a - m) * rs * g);
            }),
            (None, Some(b)) => it.zip(b).for_each(|((o, &a), &b)| {
                o.write((a - m) * rs + b);
            }),
            (None, None) => it.for_each(|(o, &a)| {
                o.write((a - m) * rs);
            }),
        }
        (m, rs)
    }
}

cpu_math::multiversion! {
    /// One row of dx (xh and g are scratch rows), accumulating dγ and dβ; w = γ (all ones when
    /// the norm has none: the products are then exact). One pass makes x̂, g = dy·w, their two
    /// lane sums (in `sum_lanes` / `dot_lanes` order) and dγ, dβ; a second writes dx.
    fn row_bwd(x_dy: (&[f32], &[f32]), w: &[f32], stats: (f32, f32), dxr: &mut [MaybeUninit<f32>], scratch: (&mut [f32], &mut [f32]), acc: (&mut [f32], &mut [f32])) {
        let ((xr, dyr), (m, rs), (xh, g), (dg, db)) = (x_dy, stats, scratch, acc);
        let c = xr.len() as f32;
        const L: usize = cpu_math::LANES;
        let (mut s1, mut s2) = ([0.0f32; L], [0.0f32; L]);
        let full = xr.len() - xr.len() % L;
        {
            let it = xr[..full].chunks_exact(L).zip(dyr[..full].chunks_exact(L)).zip(w[..full].chunks_exact(L));
            let out = xh[..full].chunks_exact_mut(L).zip(g[..full].chunks_exact_mut(L));
            let accs = dg[..full].chunks_exact_mut(L).zip(db[..full].chunks_exact_mut(L));
            for ((((xc, dyc), wc), (hc, gc)), (dgc, dbc)) in it.zip(out).zip(accs) {
                for l in 0..L {
                    let h = (xc[l] - m) * rs;
                    let gv = dyc[l] * wc[l];
                    hc[l] = h;
                    gc[l] = gv;
                    s1[l] += gv;
                    s2[l] += gv * h;
                    dgc[l] += dyc[l] * h;
                    dbc[l] += dyc[l];
                }
            }
        }
        let (mut t1, mut t2) = (0.0f32, 0.0f32);
        for j in full..xr.len() {
            let h = (xr[j] - m) * rs;
            let gv = dyr[j] * w[j];
            xh[j] = h;
            g[j] = gv;
            t1 += gv;
            t2 += gv * h;
            dg[j] += dyr[j] * h;
            db[j] += dyr[j];
        }
        let sg = (cpu_math::hsum(s1) + t1) / c;
        let sgx = (cpu_math::hsum(s2) + t2) / c;
        for ((o, &gv), &h) in dxr.iter_mut().zip(g.iter()).zip(xh.iter()) {
            o.write(rs * (gv - sg - h * sgx));
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
    let (mut mean, mut rstd) = (vec![0.0f32; rows], vec![0.0f32; rows]);
    // y written row by row in parallel (`par_new`), the statistics by the same tasks
    let (mp, rp) = (SendPtr(mean.as_mut_ptr()), SendPtr(rstd.as_mut_ptr()));
    let y = cpu_math::par_new(x.len(), ROWS * c, |t, yc| {
        for (r, yr) in yc.chunks_mut(c).enumerate() {
            let row = t * ROWS + r;
            let stats = row_fwd(&x[row * c..][..c], gamma, beta, yr, eps);
            // SAFETY: row < rows, and only this task writes this row's statistics.
            unsafe { (*mp.at(row), *rp.at(row)) = stats };
        }
    });
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
    let ones;
    let w = match gamma {
        Some(w) => w,
        None => {
            ones = vec![1.0f32; c];
            &ones[..]
        }
    };
    // dx written row by row in parallel (`par_new`); dγ, dβ summed per task, one slot each
    let tasks = x.len().div_ceil((ROWS * c).max(1));
    let mut partials: Vec<(Vec<f32>, Vec<f32>)> = vec![(Vec::new(), Vec::new()); tasks];
    let pp = SendPtr(partials.as_mut_ptr());
    let dx = cpu_math::par_new(x.len(), ROWS * c, |t, dxc| {
        let (mut dg, mut db) = (vec![0.0f32; c], vec![0.0f32; c]);
        let (mut xh, mut g) = (vec![0.0f32; c], vec![0.0f32; c]);
        for (r, dxr) in dxc.chunks_mut(c).enumerate() {
            let row = t * ROWS + r;
            let (xr, dyr) = (&x[row * c..][..c], &dy[row * c..][..c]);
            row_bwd((xr, dyr), w, (mean[row], rstd[row]), dxr, (&mut xh, &mut g), (&mut dg, &mut db));
        }
        // SAFETY: t < tasks, and only task t writes slot t.
        unsafe { *pp.at(t) = (dg, db) };
    });
    let (mut dg, mut db) = (vec![0.0f32; c], vec![0.0f32; c]);
    for (pg, pb) in partials {
        for j in 0..c {
            dg[j] += pg[j];
            db[j] += pb[j];
        }
    }
    (dx, dg, db)
}
