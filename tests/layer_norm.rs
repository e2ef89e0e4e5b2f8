//! Layer norm forward and backward on cpu, emu and cuda against the f64 reference, and the
//! reference backward against finite differences.

mod common;
use common::*;
use proptest::prelude::*;
use reclmis::ops::layer_norm::{self as ln, reference};
use reclmis::testing::{fd_mismatch, mismatch_scaled, EPS32};
use reclmis::Device;

const EPS: f32 = 1e-5;

fn check_layer_norm(
    dev: &Device,
    rows: usize,
    c: usize,
    seed: u64,
    affine: bool,
    offset: f32,
) -> Result<(), TestCaseError> {
    // A mean far from 0 (offset) tests the two-pass variance.
    let x: Vec<f32> = values(rows * c, seed, false).iter().map(|v| v + offset).collect();
    let gamma = values(c, seed ^ 1, false);
    let beta = values(c, seed ^ 2, false);
    let dy = values(rows * c, seed ^ 3, false);
    let (xt, gt, bt) = (tensor(&x, &[rows, c], dev), tensor(&gamma, &[c], dev), tensor(&beta, &[c], dev));
    let (g, b) = if affine { (Some(&gt), Some(&bt)) } else { (None, None) };
    let f = ln::layer_norm(&xt, g, b, EPS).unwrap();
    let (x64, g64, b64, dy64) = (f64s(&x), f64s(&gamma), f64s(&beta), f64s(&dy));
    let (gr, br) = if affine { (Some(g64.as_slice()), Some(b64.as_slice())) } else { (None, None) };
    let want = reference::forward(&x64, gr, br, c, EPS as f64);
    // x − mean carries the rounding of x and of the mean (a sum of c terms: ~√c·eps·max|x|),
    // relative to the row's spread: cond = max|x| / std. γ and β scale it.
    let xmax = x.iter().fold(0.0f64, |m, v| m.max(v.abs() as f64));
    let mut cond: f64 = 0.0;
    for r in x64.chunks(c) {
        let m = r.iter().sum::<f64>() / c as f64;
        let v = r.iter().map(|a| (a - m) * (a - m)).sum::<f64>() / c as f64;
        cond = cond.max(xmax / (v + EPS as f64).sqrt());
    }
    let unit = 8.0 * ((c as f64).sqrt() + 2.0) * EPS32 * (1.0 + cond);
    let gmag: Vec<f64> = (0..rows * c)
        .map(|i| if affine { gamma[i % c].abs() as f64 + beta[i % c].abs() as f64 } else { 1.0 })
        .collect();
    assert_none("y", mismatch_scaled(&f.y.to_vec().unwrap(), &want, &gmag, unit, 0.0))?;
    let gd = ln::layer_norm_backward(&xt, g, b, &f, &tensor(&dy, &[rows, c], dev)).unwrap();
    let (wdx, wdg, wdb, dx_mag) = reference::backward(&x64, gr, &dy64, c, EPS as f64);
    assert_none("dx", mismatch_scaled(&gd.dx.to_vec().unwrap(), &wdx, &dx_mag, unit, 0.0))?;
    if affine {
        // Sums over rows: √rows·eps growth of the terms |dy|·(|x̂| + 1), plus x̂'s own error.
        let mut mag = vec![0.0f64; c];
        let mut bmag = vec![0.0f64; c];
        for (i, d) in dy64.iter().enumerate() {
            mag[i % c] += d.abs() * (cond + 1.0);
            bmag[i % c] += d.abs();
        }
        let t = 8.0 * ((rows as f64).sqrt() + (c as f64).sqrt() + 2.0) * EPS32;
        assert_none("dgamma", mismatch_scaled(&gd.dgamma.unwrap().to_vec().unwrap(), &wdg, &mag, t, 0.0))?;
        assert_none("dbeta", mismatch_scaled(&gd.dbeta.unwrap().to_vec().unwrap(), &wdb, &bmag, t, 0.0))?;
    } else {
        prop_assert!(gd.dgamma.is_none() && gd.dbeta.is_none());
    }
    Ok(())
}

per_device!(check_layer_norm, (
    rows in prop::sample::select(vec![1usize, 2, 7, 18, 33, 300]),
    c in prop::sample::select(vec![1usize, 2, 16, 31, 64, 100, 512]),
    seed in any::<u64>(),
    affine in any::<bool>(),
    offset in prop::sample::select(vec![0.0f32, 5.0]),
));

proptest! {
    #![proptest_config(ProptestConfig { cases: 32, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn reference_grads_match_finite_differences(rows in 1usize..4, c in 2usize..12, seed in any::<u64>()) {
        let x = f64s(&values(rows * c, seed, false));
        let g = f64s(&values(c, seed ^ 1, false));
        let b = f64s(&values(c, seed ^ 2, false));
        let dy = f64s(&values(rows * c, seed ^ 3, false));
        let (dx, dg, db, _) = reference::backward(&x, Some(&g), &dy, c, 1e-5);
        assert_none("dx", fd_mismatch(|x| reference::forward(x, Some(&g), Some(&b), c, 1e-5), &x, &dy, &dx, 1e-5))?;
        assert_none("dg", fd_mismatch(|g| reference::forward(&x, Some(g), Some(&b), c, 1e-5), &g, &dy, &dg, 1e-5))?;
        assert_none("db", fd_mismatch(|b| reference::forward(&x, Some(&g), Some(b), c, 1e-5), &b, &dy, &db, 1e-5))?;
    }
}

#[test]
fn bad_shapes_are_named() {
    let dev = Device::Cpu;
    let x = tensor(&[0.0; 6], &[2, 3], &dev);
    let g = tensor(&[1.0; 2], &[2], &dev);
    let e = ln::layer_norm(&x, Some(&g), None, EPS).err().unwrap().to_string();
    assert!(e.contains("gamma must be [3]"), "{e}");
}
