//! Naive layer norm in f64 with its analytic backward. Tests only.

/// (y, mean, rstd) over rows of length c.
pub fn forward(x: &[f64], gamma: Option<&[f64]>, beta: Option<&[f64]>, c: usize, eps: f64) -> Vec<f64> {
    let mut y = vec![0.0; x.len()];
    for (xr, yr) in x.chunks(c).zip(y.chunks_mut(c)) {
        let m = xr.iter().sum::<f64>() / c as f64;
        let v = xr.iter().map(|a| (a - m) * (a - m)).sum::<f64>() / c as f64;
        let rs = 1.0 / (v + eps).sqrt();
        for j in 0..c {
            yr[j] = (xr[j] - m) * rs * gamma.map_or(1.0, |g| g[j]) + beta.map_or(0.0, |b| b[j]);
        }
    }
    y
}

/// (dx, dγ, dβ, and the error scales Σ|terms| of dx): dx = rstd·(g − mean g − x̂·mean(g·x̂)),
/// g = dy·γ.
pub fn backward(
    x: &[f64],
    gamma: Option<&[f64]>,
    dy: &[f64],
    c: usize,
    eps: f64,
) -> (Vec<f64>, Vec<f64>, Vec<f64>, Vec<f64>) {
    let (mut dx, mut dx_mag) = (vec![0.0; x.len()], vec![0.0; x.len()]);
    let (mut dg, mut db) = (vec![0.0; c], vec![0.0; c]);
    for ((xr, dyr), (dxr, magr)) in x.chunks(c).zip(dy.chunks(c)).zip(dx.chunks_mut(c).zip(dx_mag.chunks_mut(c))) {
        let m = xr.iter().sum::<f64>() / c as f64;
        let v = xr.iter().map(|a| (a - m) * (a - m)).sum::<f64>() / c as f64;
        let rs = 1.0 / (v + eps).sqrt();
        let xh: Vec<f64> = xr.iter().map(|a| (a - m) * rs).collect();
        let g: Vec<f64> = (0..c).map(|j| dyr[j] * gamma.map_or(1.0, |w| w[j])).collect();
        let sg = g.iter().sum::<f64>() / c as f64;
        let sgx = g.iter().zip(&xh).map(|(a, b)| a * b).sum::<f64>() / c as f64;
        let sg_abs = g.iter().map(|a| a.abs()).sum::<f64>() / c as f64;
        let sgx_abs = g.iter().zip(&xh).map(|(a, b)| (a * b).abs()).sum::<f64>() / c as f64;
        for j in 0..c {
            dxr[j] = rs * (g[j] - sg - xh[j] * sgx);
            magr[j] = rs * (g[j].abs() + sg_abs + xh[j].abs() * sgx_abs);
            dg[j] += dyr[j] * xh[j];
            db[j] += dyr[j];
        }
    }
    (dx, dg, db, dx_mag)
}
