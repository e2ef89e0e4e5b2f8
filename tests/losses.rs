//! Dice + BCE (forward, backward), evaluation metrics and MSE on cpu, emu and cuda against the
//! f64 references (written as the official code computes them); the references' gradients
//! against finite differences; empty and full masks, B = 1, saturated logits.

mod common;
use common::*;
use proptest::prelude::*;
use reclmis::ops::loss::{self, reference};
use reclmis::testing::{fd_mismatch, mismatch, EPS32};
use reclmis::Device;

/// Targets per sample: 0 random, 1 empty (all 0), 2 full (all 1).
fn targets(b: usize, p: usize, kinds: &[u8], seed: u64) -> Vec<f32> {
    let mut rng = reclmis::testing::Rng::new(seed);
    let mut g = Vec::with_capacity(b * p);
    for s in 0..b {
        let k = kinds[s % kinds.len()];
        g.extend((0..p).map(|_| match k {
            1 => 0.0,
            2 => 1.0,
            _ => (rng.next_u64() % 2) as f32,
        }));
    }
    g
}

fn sizes() -> impl Strategy<Value = (usize, usize)> {
    (prop::sample::select(vec![1usize, 2, 3, 5]), prop::sample::select(vec![1usize, 7, 64, 1000, 5000, 9001]))
}

fn check_dice_bce(dev: &Device, bp: (usize, usize), kinds: Vec<u8>, seed: u64) -> Result<(), TestCaseError> {
    let (b, p) = bp;
    let z: Vec<f32> = values(b * p, seed, false).iter().map(|x| x * 5.0).collect(); // |z| <= 15
    let g = targets(b, p, &kinds, seed ^ 1);
    let (zt, gt) = (tensor(&z, &[b, p], dev), tensor(&g, &[b, p], dev));
    let f = loss::dice_bce(&zt, &gt).unwrap();
    let (dice, bce, crit) = reference::dice_bce(&f64s(&z), &f64s(&g), b, p);
    // Dice is a ratio of two sums of p terms in [0, ¼]: random-walk rounding sqrt(p)·eps
    // relative, 16x slack. BCE averages terms up to 15 computed to a few ulp.
    let tol_dice = 16.0 * ((p as f64).sqrt() + 1.0) * EPS32;
    let tol_bce = 16.0 * EPS32 * 16.0;
    let got = f.loss.to_vec().unwrap();
    assert_none("dice", mismatch(&got[0..1], &[dice], tol_dice, 0.0))?;
    assert_none("bce", mismatch(&got[1..2], &[bce], tol_bce, 0.0))?;
    assert_none("criterion", mismatch(&got[2..3], &[crit], tol_dice + tol_bce, 0.0))?;
    let dz = loss::dice_bce_backward(&zt, &gt, &f, 1.0).unwrap().to_vec().unwrap();
    let want = reference::dice_bce_grad(&f64s(&z), &f64s(&g), b, p);
    let scale = want.iter().fold(0.0f64, |m, x| m.max(x.abs()));
    assert_none("grad", mismatch(&dz, &want, 16.0 * ((p as f64).sqrt() + 4.0) * EPS32 * scale, 0.0))
}

per_device!(check_dice_bce, (bp in sizes(), kinds in prop::collection::vec(0u8..3, 1..4), seed in any::<u64>()));

fn check_metrics(dev: &Device, bp: (usize, usize), kinds: Vec<u8>, seed: u64) -> Result<(), TestCaseError> {
    let (b, p) = bp;
    let mut rng = reclmis::testing::Rng::new(seed);
    // probabilities with exact 0.5s (not foreground: the threshold is strict) and, per kind,
    // predictions that are empty or full
    let probs: Vec<f32> = (0..b * p)
        .map(|i| match kinds[(i / p) % kinds.len()] {
            1 => 0.2,
            2 => 0.9,
            _ if rng.next_u64().is_multiple_of(5) => 0.5,
            _ => rng.uniform(0.0, 1.0),
        })
        .collect();
    let g = targets(b, p, &kinds.iter().rev().copied().collect::<Vec<_>>(), seed ^ 3);
    let m = loss::metrics(&tensor(&probs, &[b, p], dev), &tensor(&g, &[b, p], dev)).unwrap();
    let want = reference::metrics(&f64s(&probs), &f64s(&g), b, p);
    let per = m.per_image.to_vec().unwrap();
    for (s, w) in want.iter().enumerate() {
        // counts are exact; the ratios round once or twice
        assert_none(&format!("image {s}"), mismatch(&per[s * 4..s * 4 + 3], w, 0.0, 4.0 * EPS32))?;
    }
    let mean: Vec<f64> = (0..3).map(|k| want.iter().map(|w| w[k]).sum::<f64>() / b as f64).collect();
    assert_none("means", mismatch(&m.mean.to_vec().unwrap(), &mean, 0.0, 8.0 * EPS32))
}

per_device!(check_metrics, (bp in sizes(), kinds in prop::collection::vec(0u8..3, 1..4), seed in any::<u64>()));

fn check_mse(dev: &Device, n: usize, seed: u64) -> Result<(), TestCaseError> {
    let (x, y) = (values(n, seed, false), values(n, seed ^ 5, false));
    let (xt, yt) = (tensor(&x, &[n], dev), tensor(&y, &[n], dev));
    let m = loss::mse(&xt, &yt).unwrap().to_vec().unwrap();
    let want = reference::mse(&f64s(&x), &f64s(&y));
    assert_none("mse", mismatch(&m, &[want], 0.0, 16.0 * ((n as f64).sqrt() + 2.0) * EPS32))?;
    let (dx, dy) = loss::mse_backward(&xt, &yt, 0.7).unwrap();
    let wdx: Vec<f64> = x.iter().zip(&y).map(|(a, b)| 0.7 * 2.0 * (*a as f64 - *b as f64) / n as f64).collect();
    assert_none("dx", mismatch(&dx.to_vec().unwrap(), &wdx, 0.0, 4.0 * EPS32))?;
    let wdy: Vec<f64> = wdx.iter().map(|v| -v).collect();
    assert_none("dy", mismatch(&dy.to_vec().unwrap(), &wdy, 0.0, 4.0 * EPS32))
}

per_device!(check_mse, (n in prop::sample::select(vec![1usize, 3, 255, 256, 257, 70_001]), seed in any::<u64>()));

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn reference_dice_bce_grad_matches_finite_differences(b in 1usize..4, p in 1usize..20, kinds in prop::collection::vec(0u8..3, 1..4), seed in any::<u64>()) {
        let z = f64s(&values(b * p, seed, false));
        let g = f64s(&targets(b, p, &kinds, seed ^ 1));
        let grad = reference::dice_bce_grad(&z, &g, b, p);
        assert_none("fd", fd_mismatch(|z| vec![reference::dice_bce(z, &g, b, p).2], &z, &[1.0], &grad, 1e-6))?;
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 16, failure_persistence: None, ..ProptestConfig::default() })]

    /// MSE's analytic gradient (what `check_mse` compares the devices with) against finite
    /// differences.
    #[test]
    fn mse_grad_matches_finite_differences(n in 1usize..50, seed in any::<u64>()) {
        let (x, y) = (f64s(&values(n, seed, false)), f64s(&values(n, seed ^ 5, false)));
        let grad: Vec<f64> = x.iter().zip(&y).map(|(a, b)| 2.0 * (a - b) / n as f64).collect();
        assert_none("fd", fd_mismatch(|x| vec![reference::mse(x, &y)], &x, &[1.0], &grad, 1e-6))?;
    }
}

/// Where the logits saturate, the official BCE of probabilities reads log(0) and clamps it to
/// −100; from logits we keep the true value up to the same clamp.
#[test]
fn saturated_logits_keep_their_true_bce() {
    for kind in ["cpu", "emu"] {
        let dev = device(kind);
        for (z, want) in [(30.0f32, 30.0f64), (60.0, 60.0), (200.0, 100.0)] {
            let f = loss::dice_bce(&tensor(&[z], &[1, 1], &dev), &tensor(&[0.0], &[1, 1], &dev)).unwrap();
            let bce = f.loss.to_vec().unwrap()[1] as f64;
            assert!((bce - want).abs() <= 1e-5 * want, "{kind}: z = {z}: bce {bce}, want {want}");
        }
    }
    // The official formula in f64 already saturates at z = 60 (1 − σ(60) rounds to 0), and at
    // z = 30 it has lost most digits (1 − σ(30) ≈ 9e-14 is formed from a q rounded at 1e-16).
    assert_eq!(reference::dice_bce(&[60.0], &[0.0], 1, 1).1, 100.0);
    assert!((reference::dice_bce(&[30.0], &[0.0], 1, 1).1 - 30.0).abs() < 1e-2);
}

#[test]
fn empty_truth_and_empty_prediction_score_zero() {
    for kind in ["cpu", "emu"] {
        let dev = device(kind);
        let z = tensor(&[0.1; 8], &[2, 4], &dev);
        let m = loss::metrics(&z, &tensor(&[0.0; 8], &[2, 4], &dev)).unwrap();
        let per = m.per_image.to_vec().unwrap();
        assert_eq!((per[0], per[1]), (0.0, 0.0), "{kind}: dice and IoU of empty vs empty");
        assert!((per[2] - 1.0).abs() < 1e-6, "{kind}: the training hard Dice of empty vs empty is 1: {}", per[2]);
    }
}

#[test]
fn shape_mismatch_names_both_shapes() {
    let dev = Device::Cpu;
    let e =
        loss::dice_bce(&tensor(&[0.0; 6], &[2, 3], &dev), &tensor(&[0.0; 6], &[3, 2], &dev)).err().unwrap().to_string();
    assert!(e.contains("[2, 3]") && e.contains("[3, 2]"), "{e}");
}
