//! Softmax and log-softmax over the last axis, forward and backward, with outliers.

mod common;
use common::*;
use proptest::prelude::*;
use reclmis::ops::softmax::{self, reference};
use reclmis::testing::{fd_mismatch, mismatch, EPS32};
use reclmis::Device;

/// Rows x cols; some rows longer than 1024 to reach the block-per-row kernel.
fn rows_cols() -> impl Strategy<Value = (usize, usize)> {
    prop_oneof![
        4 => (dim(), dim()),
        1 => (prop::sample::select(vec![1usize, 2, 3]), prop::sample::select(vec![1025usize, 1500, 2049])),
    ]
}

fn check_softmax(dev: &Device, rc: (usize, usize), seed: u64, log: bool, outliers: bool) -> Result<(), TestCaseError> {
    let (rows, cols) = rc;
    let x = values(rows * cols, seed, outliers);
    let xt = tensor(&x, &[rows, cols], dev);
    let y = if log { softmax::log_softmax(&xt) } else { softmax::softmax(&xt) }.unwrap();
    let want = reference::forward(&f64s(&x), cols, log);
    let xmax = x.iter().fold(0.0f32, |m, v| m.max(v.abs())) as f64;
    // exp(x - m) has relative error eps·|x - m| from rounding x - m, plus a few ulp from expf;
    // log-softmax has absolute error ~eps·(|x| + |m| + log cols). Values below 1e-30 are what
    // e^-80 outliers give; f32 represents them only roughly (denormals).
    let (atol, rtol) = if log {
        (8.0 * EPS32 * (2.0 * xmax + (cols as f64).ln() + 1.0), 4.0 * EPS32)
    } else {
        (1e-30, 8.0 * EPS32 * (2.0 * xmax + 8.0))
    };
    assert_none("forward", mismatch(&y.to_vec().unwrap(), &want, atol, rtol))?;
    let dy = values(rows * cols, seed ^ 9, false);
    let dx = softmax::softmax_backward(&y, &tensor(&dy, &[rows, cols], dev), log).unwrap();
    let wdx = reference::backward(&f64s(&x), &f64s(&dy), cols, log);
    // Σ over a row of cols terms |dy·y| <= 3 (random signs): error ~4·sqrt(cols)·eps·3, carried
    // into each element with factor y <= 1 (softmax) or exp(y) <= 1 (log-softmax); plus the
    // forward's error in y times |dy| <= 3.
    let atol = 4.0 * EPS32 * 3.0 * ((cols as f64).sqrt() + 1.0) + 3.0 * atol;
    assert_none("backward", mismatch(&dx.to_vec().unwrap(), &wdx, atol, rtol))
}

per_device!(check_softmax, (rc in rows_cols(), seed in any::<u64>(), log in any::<bool>(), outliers in any::<bool>()));

proptest! {
    #![proptest_config(ProptestConfig { cases: 32, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn reference_grad_matches_finite_differences(rows in 1usize..4, cols in 1usize..40, seed in any::<u64>(), log in any::<bool>()) {
        let x = f64s(&values(rows * cols, seed, false));
        let dy = f64s(&values(rows * cols, seed ^ 9, false));
        let grad = reference::backward(&x, &dy, cols, log);
        assert_none("fd", fd_mismatch(|x| reference::forward(x, cols, log), &x, &dy, &grad, 1e-6))?;
    }
}

#[test]
fn huge_logits_do_not_overflow_and_all_minus_inf_is_nan() {
    for kind in ["cpu", "emu"] {
        let dev = device(kind);
        let ninf = f32::NEG_INFINITY;
        let x = tensor(&[1e30, 1e30, -1e30, ninf, ninf, ninf, ninf, ninf], &[2, 4], &dev);
        let y = softmax::softmax(&x).unwrap().to_vec().unwrap();
        assert_eq!(&y[..4], &[0.5, 0.5, 0.0, 0.0], "{kind}");
        assert!(y[4..].iter().all(|v| v.is_nan()), "{kind}: a row of -inf is NaN, as in PyTorch: {y:?}");
    }
}
