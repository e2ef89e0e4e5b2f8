//! The whole model against the official implementation's numbers (tests/fixtures/official_tiny,
//! or RECLMIS_FIXTURES): evaluation outputs and intermediates, the training forward's losses and
//! intermediates, every parameter's gradient, the batch-norm running statistics, and one Adam
//! step, on cpu and emu. Sizes (B, H, W, L, N) come from the fixture, never from constants.

mod common;
use common::fixture::Fixture;
use common::golden::{
    batch, fixture_masks, model, rel_l2, scaled_error, structural_zeros, EVAL_KEYS, FIXTURE, TRAIN_KEYS,
};
use reclmis::autograd::Graph;
use reclmis::model::{Config, RecLmis};
use reclmis::nn::params::{Kind, ParamId};
use reclmis::optim::{Adam, AdamConfig};
use reclmis::testing::Rng;
use reclmis::{Device, Tensor};

fn dev(kind: &str) -> Device {
    common::device(kind)
}

fn compare(what: &str, got: &Tensor, f: &Fixture, key: &str, tol: f64) {
    let (ws, want) = f.get(key);
    let g = got.to_vec().unwrap();
    assert_eq!(got.numel(), want.len(), "{what}: {key} has shape {ws:?}, ours {:?}", got.shape());
    let e = scaled_error(&g, &want);
    eprintln!("{what:>4} {key:<28} scaled error {e:.2e}");
    assert!(e <= tol, "{what}: {key}: scaled error {e:.3e} > {tol:.1e}");
}

/// Forward tolerance: the fixture's float32 run of the same code is within 2e-5 relative of these
/// float64 references; our kernels round differently from PyTorch's (Winograd convolutions add
/// up to ~1e-5 relative at these widths, fused attention and f32 sums), so 1e-4 of each tensor's
/// scale bounds an f32 implementation while a wrong formula (a missing mask, the condition in
/// the wrong place) moves these outputs by 1e-2 or more (the fixture README's mutation list).
const FWD_TOL: f64 = 1e-4;

fn check_eval(kind: &str) {
    let dev = dev(kind);
    let f = Fixture::open(FIXTURE);
    let m = model(&f, &dev);
    let rec = m.forward_eval(&batch(&f, &dev)).unwrap();
    for key in EVAL_KEYS {
        compare(kind, rec[key].tensor(), &f, &format!("eval.{key}"), FWD_TOL);
    }
}

#[test]
fn eval_matches_official_cpu() {
    check_eval("cpu");
}

#[test]
fn eval_matches_official_emu() {
    check_eval("emu");
}

fn check_train(kind: &str) {
    let dev = dev(kind);
    let f = Fixture::open(FIXTURE);
    let m = model(&f, &dev);
    let g = Graph::train();
    let out = m.forward_train(&g, &batch(&f, &dev), Some(fixture_masks(&f)), &mut Rng::new(1)).unwrap();
    for (name, v) in &out.losses {
        let want = f.scalar(&format!("train.loss.{name}"));
        eprintln!("{kind:>4} loss.{name:<10} {v:.7} vs {want:.7}");
        // the fixture's float32 guidance: losses within 1e-5 absolute; 5e-5 leaves room for our
        // different rounding order (the total sums 5x the criterion)
        assert!((*v as f64 - want).abs() <= 5e-5 * want.abs().max(1.0), "{kind}: loss.{name} {v} vs {want}");
    }
    for key in TRAIN_KEYS {
        compare(kind, out.record[key].tensor(), &f, &format!("train.{key}"), FWD_TOL);
    }

    // gradients
    let grads = g.backward(&out.total, m.params.len()).unwrap();
    let zeros = structural_zeros();
    let mut worst = (0.0f64, String::new());
    let mut n = 0;
    let mut errors = vec![];
    for id in m.params.ids().filter(|&id| m.params.trainable(id)) {
        let name = m.params.name(id);
        let (_, want) = f.get(&format!("grad.{name}"));
        let got = match grads.get(id) {
            Some(t) => t.to_vec().unwrap(),
            None => vec![0.0; want.len()], // never reached by the loss (conv_sig, decoder1 encoder_attn)
        };
        n += 1;
        let zero = zeros.iter().find(|z| z.0 == name).map(|z| z.1.start..z.1.end.min(got.len()));
        let (mut got, mut want) = (got, want);
        if let Some(r) = zero {
            // round-off around an exact zero: absolute, on the scale of the f32 run's 4.9e-5
            let e = got[r.clone()].iter().fold(0.0f32, |a, &x| a.max(x.abs())) as f64;
            assert!(e <= 2e-4, "{kind}: grad.{name}[{r:?}] should be ~0, max |g| = {e:.3e}");
            got.drain(r.clone());
            want.drain(r);
            if got.is_empty() {
                continue;
            }
        }
        let e = rel_l2(&got, &want);
        errors.push(e);
        if e > worst.0 {
            worst = (e, name.to_string());
        }
        let tol = if name.contains("pixModule.bottleneck.") { GRAD_TOL_PLAM_FC } else { GRAD_TOL };
        assert!(e <= tol, "{kind}: grad.{name}: relative L2 error {e:.3e} > {tol:.0e}");
    }
    errors.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let median = errors[errors.len() / 2];
    eprintln!("{kind}: {n} gradients, median relative L2 error {median:.2e}, worst {:.2e} ({})", worst.0, worst.1);
    assert!(median <= GRAD_TOL_MEDIAN, "{kind}: median gradient error {median:.2e}");
    assert_eq!(n, f.count_prefix("grad."), "every stored gradient is checked");

    // batch-norm running statistics after the training forward
    let mut params = m.params;
    for (id, t) in g.take_buffer_updates() {
        params.set(id, t).unwrap();
    }
    params.bump_counters();
    let mut n_bn = 0;
    for id in params.ids().filter(|&id| params.kind(id) == Kind::Buffer) {
        let key = format!("train.bn_after.{}", params.name(id));
        compare(kind, params.value(id), &f, &key, FWD_TOL);
        n_bn += 1;
    }
    for (name, c) in params.counters() {
        assert_eq!(*c as f64, f.scalar(&format!("train.bn_after.{name}")), "{name}");
        n_bn += 1;
    }
    assert_eq!(n_bn, f.count_prefix("train.bn_after."), "every stored buffer is checked");

    // one Adam step (torch defaults, lr 3e-4). Step 1 moves p by −lr·g/(|g| + 1e-8), i.e. about
    // lr·sign(g): where a gradient is within its own (checked) f32 error of 0, the sign can go
    // either way. So each element may differ from the reference by lr·|u(g) − u(g_ref)| with
    // u(g) = g/(|g| + 1e-8) (the gradient's error carried through the update) plus f32 rounding
    // of p (2 ulp); a wrong update (no bias correction, another eps, a missed parameter) is off
    // by a multiple of lr everywhere.
    let trainable: Vec<ParamId> = params.ids().filter(|&id| params.trainable(id)).collect();
    let values: Vec<&Tensor> = trainable.iter().map(|&id| params.value(id)).collect();
    let gs: Vec<Option<Tensor>> = trainable.iter().map(|&id| grads.get(id).cloned()).collect();
    let mut adam = Adam::new(AdamConfig::default(), trainable.len());
    let stepped = adam.step(&values, &gs).unwrap();
    let lr = AdamConfig::default().lr as f64;
    let u = |g: f64| g / (g.abs() + 1e-8);
    for (i, &id) in trainable.iter().enumerate() {
        let name = params.name(id);
        let got = match &stepped[i] {
            Some(t) => t.to_vec().unwrap(),
            None => values[i].to_vec().unwrap(), // no gradient: unchanged, as torch leaves it
        };
        let (_, want) = f.get(&format!("after_adam.{name}"));
        let (_, g_ref) = f.get(&format!("grad.{name}"));
        let g_ours = gs[i].as_ref().map_or(vec![0.0; got.len()], |t| t.to_vec().unwrap());
        for j in 0..got.len() {
            let tol = lr * (u(g_ours[j] as f64) - u(g_ref[j])).abs() + 2.0 * f32::EPSILON as f64 * want[j].abs() + 1e-9;
            let d = (got[j] as f64 - want[j]).abs();
            assert!(d <= tol, "{kind}: after_adam.{name}[{j}] = {} vs {} (tolerance {tol:.2e})", got[j], want[j]);
        }
    }
}

/// Gradients, per tensor, as ‖ours − ref‖₂ / ‖ref‖₂. The fixture's float32 run of the official
/// code has a median of 1.5e-6 (ours: 1.5e-6 cpu, 1.3e-6 emu), 26 of 219 tensors above 1e-3, and
/// up to 5.4e-2 on the PLAM bottleneck (Linear 3→6→1 per pixel: its 25 weights' gradients are
/// sums over every pixel of terms that cancel, and a ReLU that rounds to the other side of 0 at
/// one pixel moves them by percents; our cpu path sees 7.3e-2 there, from exactly such a flip in
/// up1 that we traced). A formula error moves many tensors by far more (a detached W: up to 138%;
/// the fixture README), which the median and the 2e-2 bound both catch.
const GRAD_TOL: f64 = 2e-2;
const GRAD_TOL_PLAM_FC: f64 = 0.15;
const GRAD_TOL_MEDIAN: f64 = 1e-5;

#[test]
fn train_matches_official_cpu() {
    check_train("cpu");
}

#[test]
fn train_matches_official_emu() {
    check_train("emu");
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn eval_matches_official_cuda() {
    check_eval("cuda");
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn train_matches_official_cuda() {
    check_train("cuda");
}

/// The paper's readings, offered as options, are not the official computation: each moves the
/// total loss away from the official one by more than the fixture README's 1e-3.
#[test]
fn paper_options_differ_from_the_official_computation() {
    let dev = dev("cpu");
    let f = Fixture::open(FIXTURE);
    let want = f.scalar("train.loss.total");
    for (name, tweak) in [
        ("bidirectional reconstruction", (|c: &mut Config| c.bidirectional_reconstruction = true) as fn(&mut Config)),
        ("condition on logits", |c: &mut Config| c.condition_on_logits = true),
        ("W-weighted reconstruction", |c: &mut Config| c.weighted_reconstruction = true),
        ("without the conditioned interaction", |c: &mut Config| c.no_condition = true),
    ] {
        let mut m = model(&f, &dev);
        tweak(&mut m.cfg);
        let mut m2 = RecLmis::new(m.cfg.clone(), &dev, 0).unwrap();
        reclmis::checkpoint::load_bytes(&mut m2.params, f.bytes(), std::path::Path::new("fixture")).unwrap();
        let out =
            m2.forward_train(&Graph::train(), &batch(&f, &dev), Some(fixture_masks(&f)), &mut Rng::new(1)).unwrap();
        let got = out.losses["total"] as f64;
        assert!((got - want).abs() > 1e-3, "{name}: total {got} is the official {want}");
    }
}
