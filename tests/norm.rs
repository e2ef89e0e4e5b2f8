//! Batch norm (training and evaluation, with and without the fused ReLU) forward, running
//! statistics and backward, on cpu, emu and cuda against the f64 reference and its finite
//! differences.

mod common;
use common::*;
use proptest::prelude::*;
use reclmis::ops::cast::cast;
use reclmis::ops::norm::{self, reference, BnOpts};
use reclmis::testing::{mismatch, EPS32};
use reclmis::{DType, Device};

fn dims() -> impl Strategy<Value = (usize, usize, usize)> {
    (1usize..4, prop::sample::select(vec![1usize, 3, 8]), prop::sample::select(vec![1usize, 2, 5, 16, 50]))
        .prop_filter("training needs two values per channel", |(b, _, s)| b * s >= 2)
}

fn check_bn(dev: &Device, d: (usize, usize, usize), seed: u64, relu: bool, train: bool) -> Result<(), TestCaseError> {
    let (b, c, s) = d;
    let n = b * c * s;
    let x: Vec<f32> = values(n, seed, false).iter().map(|v| v * 2.0 + 1.5).collect(); // mean far from 0
    let gamma = values(c, seed ^ 1, false);
    let beta = values(c, seed ^ 2, false);
    let rm = values(c, seed ^ 3, false);
    let rv: Vec<f32> = values(c, seed ^ 4, false).iter().map(|v| v.abs() + 0.5).collect();
    let dy = values(n, seed ^ 5, false);
    let o = BnOpts { relu, train, ..Default::default() };
    let t = |v: &[f32], sh: &[usize]| tensor(v, sh, dev);
    let shape = [b, c, s];
    let (xt, gt) = (t(&x, &shape), t(&gamma, &[c]));
    let f = norm::batch_norm(&xt, &gt, &t(&beta, &[c]), &t(&rm, &[c]), &t(&rv, &[c]), o).unwrap();
    let eval_ref = |x: &[f64], g: &[f64], bt: &[f64]| {
        reference::forward(x, g, bt, &f64s(&rm), &f64s(&rv), d, 1e-5, 0.1, relu, train)
    };
    let (y, _, var, nrm, nrv) = eval_ref(&f64s(&x), &f64s(&gamma), &f64s(&beta));
    // Normalised values carry the statistics' rounding (sums of b·s terms) amplified by the
    // conditioning |x| / std (x − mean loses digits when the spread is small next to the mean).
    let tol = 16.0 * ((b * s) as f64).sqrt() * EPS32 + 8.0 * EPS32;
    let inv_max = var.iter().map(|v| 1.0 / (v + 1e-5).sqrt()).fold(0.0, f64::max);
    let xmax = x.iter().fold(0.0f64, |m, v| m.max(v.abs() as f64));
    let gmax = gamma.iter().fold(0.0f64, |m, v| m.max(v.abs() as f64));
    assert_none("y", mismatch(&f.y.to_vec().unwrap(), &y, 4.0 * tol * (1.0 + xmax * inv_max * gmax), 4.0 * tol))?;
    assert_none("running mean", mismatch(&f.running_mean.to_vec().unwrap(), &nrm, tol, tol))?;
    assert_none("running var", mismatch(&f.running_var.to_vec().unwrap(), &nrv, tol, tol))?;
    let g = norm::batch_norm_backward(&xt, &gt, &f, &t(&dy, &shape), o).unwrap();
    // Gradients against central finite differences (h = 1e-6) of the f64 reference forward.
    let dyf = f64s(&dy);
    let loss =
        |x: &[f64], gm: &[f64], bt: &[f64]| -> f64 { eval_ref(x, gm, bt).0.iter().zip(&dyf).map(|(a, b)| a * b).sum() };
    let fd = |which: usize, base: &[f32]| -> Vec<f64> {
        let base = f64s(base);
        (0..base.len())
            .map(|j| {
                let eval = |h: f64| {
                    let mut p = base.clone();
                    p[j] += h;
                    match which {
                        0 => loss(&p, &f64s(&gamma), &f64s(&beta)),
                        1 => loss(&f64s(&x), &p, &f64s(&beta)),
                        _ => loss(&f64s(&x), &f64s(&gamma), &p),
                    }
                };
                (eval(1e-6) - eval(-1e-6)) / 2e-6
            })
            .collect()
    };
    // dx is γ·inv·(g − mean(g) − x̂·mean(g·x̂)): with few values per channel its terms cancel, so
    // the error scale is the size of a term, γ·inv·|dy|, not of the result.
    let term = gamma.iter().fold(0.0f64, |m, v| m.max(v.abs() as f64)) * inv_max * 3.0;
    for (name, got, which, base) in
        [("dx", &g.dx, 0, &x), ("dgamma", &g.dgamma, 1, &gamma), ("dbeta", &g.dbeta, 2, &beta)]
    {
        let want = fd(which, base);
        let scale = want.iter().fold(if which == 0 { term } else { 1e-3f64 }, |m, v| m.max(v.abs()));
        assert_none(name, mismatch(&got.to_vec().unwrap(), &want, 64.0 * tol * scale + 1e-6, 0.0))?;
    }
    // bf16 x and y (as bf16 autocast keeps them: `bn_*_bwd_bf16`) are read widened, exactly: the
    // gradients are the f32 kernels' on the widened tensors, bit for bit (an exact equality, so
    // no bound to derive; the f32 path's own error is checked above)
    let half = |t: &reclmis::Tensor| cast(t, DType::BF16).unwrap();
    let (xh, yh) = (half(&xt), half(&f.y));
    let fh = norm::BnForward { y: yh.clone(), ..f.clone() };
    let gh = norm::batch_norm_backward(&xh, &gt, &fh, &t(&dy, &shape), o).unwrap();
    let fw = norm::BnForward { y: cast(&yh, DType::F32).unwrap(), ..f };
    let gw = norm::batch_norm_backward(&cast(&xh, DType::F32).unwrap(), &gt, &fw, &t(&dy, &shape), o).unwrap();
    // dx comes back in x's type: the f32 call's dx rounded once
    prop_assert_eq!(gh.dx.dtype(), DType::BF16);
    prop_assert_eq!(gh.dx.to_vec().unwrap(), half(&gw.dx).to_vec().unwrap(), "bf16 dx vs the f32 call's, rounded");
    for (name, a, b) in [("dgamma", &gh.dgamma, &gw.dgamma), ("dbeta", &gh.dbeta, &gw.dbeta)] {
        prop_assert_eq!(a.to_vec().unwrap(), b.to_vec().unwrap(), "bf16 {} vs f32 of the widened inputs", name);
    }
    Ok(())
}

per_device!(check_bn, (d in dims(), seed in any::<u64>(), relu in any::<bool>(), train in any::<bool>()));

#[test]
fn training_on_one_value_per_channel_is_an_error() {
    let dev = Device::Cpu;
    let one = tensor(&[1.0], &[1], &dev);
    let e =
        norm::batch_norm(&tensor(&[1.0], &[1, 1, 1], &dev), &one, &one, &one, &one, BnOpts::default()).err().unwrap();
    assert!(e.to_string().contains("more than one value"), "{e}");
}
