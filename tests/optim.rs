//! The fused Adam / AdamW update against torch's arithmetic in f64 (optim::reference).

mod common;
use common::*;
use proptest::prelude::*;
use reclmis::optim::{self, reference, AdamConfig};
use reclmis::testing::mismatch;
use reclmis::Device;

/// Several steps of one tensor, checked after each against the f64 reference fed the same
/// (f32-rounded) state. Per element the update is a handful of f32 operations: 8 ulp of the
/// largest operand bounds each result (v's terms are both >= 0, so v is bounded relatively).
fn check_adam(dev: &Device, n: usize, steps: u64, decoupled: bool, wd: bool, seed: u64) -> Result<(), TestCaseError> {
    let mut rng = reclmis::testing::Rng::new(seed);
    let c = AdamConfig { decoupled, weight_decay: if wd { 0.01 } else { 0.0 }, lr: 1e-2, ..AdamConfig::default() };
    let mut p = rng.vec(n, -1.0, 1.0);
    let (mut m, mut v) = (vec![0.0f32; n], vec![0.0f32; n]);
    for step in 1..=steps {
        let mut g = values(n, seed ^ step, true);
        if wd {
            // Adam adds wd·p to g; where g ≈ −wd·p that sum cancels, and every f32 implementation
            // (torch's too) gets its sign, and so the step-1 update ±lr, from rounding. Give g the
            // sign of p so the check measures the kernel's arithmetic, not that conditioning
            // (tests/golden_model.rs bounds the Adam step through such cancellations instead).
            for (gi, pi) in g.iter_mut().zip(&p) {
                *gi = gi.abs().copysign(*pi);
            }
        }
        let t = |x: &[f32]| tensor(x, &[n], dev);
        let (pn, mn, vn) = optim::adam_update(&c, step, &t(&p), &t(&g), &t(&m), &t(&v)).unwrap();
        let (wp, wm, wv) = reference::adam(&c, step, &f64s(&p), &f64s(&g), &f64s(&m), &f64s(&v));
        let eps = 8.0 * f32::EPSILON as f64;
        let scale_p = p.iter().fold(c.lr as f64 * 10.0, |a, x| a.max(x.abs() as f64));
        assert_none("p", mismatch(&pn.to_vec().unwrap(), &wp, eps * scale_p, 0.0))?;
        // m = β1·m + (1−β1)·g can cancel: bound by the operands' size, not the result's
        let scale_m = m.iter().chain(&g).fold(0.0f64, |a, x| a.max(x.abs() as f64));
        assert_none("m", mismatch(&mn.to_vec().unwrap(), &wm, eps * scale_m, 0.0))?;
        assert_none("v", mismatch(&vn.to_vec().unwrap(), &wv, 0.0, eps))?;
        p = pn.to_vec().unwrap();
        m = mn.to_vec().unwrap();
        v = vn.to_vec().unwrap();
    }
    Ok(())
}

per_device!(check_adam, (n in dim(), steps in 1u64..4, decoupled in any::<bool>(), wd in any::<bool>(), seed in any::<u64>()));

/// `Adam::step` writes its moments in place (the cpu over the rayon threads, emu's kernel over
/// its own buffers): checked
/// against the f64 reference (bounds as in `check_adam`) at a size that spans several chunks and
/// a tail; a moment another handle shares is not written; a bad gradient leaves the state as it
/// was.
#[test]
fn adam_step_in_place_matches_the_reference() {
    for kind in ["cpu", "emu"] {
        adam_step_in_place_on(&device(kind));
    }
}

fn adam_step_in_place_on(d: &Device) {
    let d = d.clone();
    let n = 3 * (1 << 14) + 5;
    let c = AdamConfig { weight_decay: 0.01, decoupled: true, lr: 1e-2, ..AdamConfig::default() };
    let mut rng = reclmis::testing::Rng::new(5);
    let p0 = rng.vec(n, -1.0, 1.0);
    let mut opt = optim::Adam::new(c, 1);
    let (mut p, mut m, mut v) = (p0.clone(), vec![0.0f32; n], vec![0.0f32; n]);
    let mut q = tensor(&p0, &[n], &d);
    let eps = 8.0 * f32::EPSILON as f64;
    for step in 1..=3u64 {
        let g = rng.vec(n, -1.0, 1.0);
        let (wp, wm, wv) = reference::adam(&c, step, &f64s(&p), &f64s(&g), &f64s(&m), &f64s(&v));
        // step 2: hold the optimiser's second moment elsewhere, as a checkpoint writer might
        let held = (step == 2).then(|| opt.v[0].clone().unwrap());
        let before = held.as_ref().map(|h| h.to_vec().unwrap());
        q = opt.step(&[&q], &[Some(tensor(&g, &[n], &d))]).unwrap().remove(0).unwrap();
        if let (Some(h), Some(b)) = (held, before) {
            assert_eq!(h.to_vec().unwrap(), b, "a shared moment was written in place");
        }
        let scale_p = p.iter().fold(c.lr as f64 * 10.0, |a, x| a.max(x.abs() as f64));
        let scale_m = m.iter().chain(&g).fold(0.0f64, |a, x| a.max(x.abs() as f64));
        p = q.to_vec().unwrap();
        m = opt.m[0].as_ref().unwrap().to_vec().unwrap();
        v = opt.v[0].as_ref().unwrap().to_vec().unwrap();
        assert_eq!(mismatch(&p, &wp, eps * scale_p, 0.0), None, "p after step {step}");
        assert_eq!(mismatch(&m, &wm, eps * scale_m, 0.0), None, "m after step {step}");
        assert_eq!(mismatch(&v, &wv, 0.0, eps), None, "v after step {step}");
    }
    // a gradient of the wrong shape: an error, and the state is left as it was
    let bad = tensor(&[0.0; 3], &[3], &d);
    assert!(opt.step(&[&q], &[Some(bad)]).is_err());
    assert_eq!(opt.m[0].as_ref().unwrap().to_vec().unwrap(), m);
}

#[test]
fn adam_shape_mismatch_is_an_error() {
    let d = Device::Cpu;
    let t = |n: usize| tensor(&vec![0.0; n], &[n], &d);
    let e = optim::adam_update(&AdamConfig::default(), 1, &t(3), &t(4), &t(3), &t(3)).unwrap_err().to_string();
    assert!(e.contains("grad"), "{e}");
}

#[test]
fn clip_grad_norm_scales_to_the_bound() {
    let d = Device::Cpu;
    let mut gs = vec![Some(tensor(&[3.0, 0.0], &[2], &d)), None, Some(tensor(&[4.0], &[1], &d))];
    let norm = optim::clip_grad_norm(&mut gs, 1.0).unwrap();
    assert!((norm - 5.0).abs() < 1e-6);
    let a = gs[0].as_ref().unwrap().to_vec().unwrap();
    assert!((a[0] - 0.6).abs() < 1e-6, "{a:?}");
}
