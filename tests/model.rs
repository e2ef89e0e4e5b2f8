//! The model's structure against the official key list, the tape's bookkeeping, checkpoints.

mod common;
use reclmis::autograd::{Graph, Var};
use reclmis::checkpoint;
use reclmis::model::summary::{counts_by_role, Role};
use reclmis::model::{Config, RecLmis};
use reclmis::nn::params::{Kind, Params};
use reclmis::{Device, Tensor};
use std::collections::BTreeMap;

/// The official preset registers exactly the official state_dict keys with their shapes (all but
/// the never-built CLIP image tower), and its element counts by role equal the official ones.
#[test]
fn official_preset_has_the_official_keys_and_counts() {
    let path = common::fixture::root().join("official_tiny/full_size_state_dict_keys.json");
    let json: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let mut want: BTreeMap<String, Vec<usize>> = BTreeMap::new();
    for k in json["keys"].as_array().unwrap() {
        let key = k["key"].as_str().unwrap();
        if key.starts_with("clip.visual.") {
            continue;
        }
        let shape = k["shape"].as_array().unwrap().iter().map(|d| d.as_u64().unwrap() as usize).collect();
        want.insert(key.to_string(), shape);
    }
    assert_eq!(want.len(), 619);
    let m = RecLmis::new(Config::preset("official").unwrap(), &Device::Cpu, 0).unwrap();
    let mut got: BTreeMap<String, Vec<usize>> = BTreeMap::new();
    for id in m.params.ids() {
        got.insert(m.params.name(id).to_string(), m.params.value(id).shape().to_vec());
    }
    for (n, _) in m.params.counters() {
        got.insert(n.clone(), vec![]);
    }
    let missing: Vec<_> = want.keys().filter(|k| !got.contains_key(*k)).collect();
    let extra: Vec<_> = got.keys().filter(|k| !want.contains_key(*k)).collect();
    assert!(missing.is_empty() && extra.is_empty(), "missing {missing:?}, extra {extra:?}");
    for (k, s) in &want {
        assert_eq!(&got[k], s, "{k}");
    }
    // trainable / frozen as in the official training (CLIP frozen)
    for k in json["keys"].as_array().unwrap() {
        let key = k["key"].as_str().unwrap();
        if let Some(id) = m.params.id(key) {
            let official = k["trainable"].as_bool().unwrap();
            assert_eq!(m.params.trainable(id), official, "{key}");
        }
    }
    let by_role = &json["numel_by_role"];
    let n = |k: &str| by_role[k].as_u64().unwrap() as usize;
    let r = counts_by_role(&m);
    assert_eq!(r[&Role::Mask], n("needed for the segmentation mask"));
    assert_eq!(
        r[&Role::Weights],
        n("W maps only (official mode=\"test\" returns W_poi/W_woi); not needed for the mask")
    );
    assert_eq!(r[&Role::Train], n("training only (CVR/CLR)") + n("training only (CCL temperature, frozen)"));
    assert_eq!(
        r[&Role::Unused],
        n("unused (PLAM conv_sig never called)") + n("unused (decoder1 cross-attention, decoding=2)")
    );
}

fn leaf(p: &mut Params, name: &str, v: Vec<f32>, trainable: bool) -> reclmis::nn::params::ParamId {
    let n = v.len();
    p.add(name, &[n], v, Kind::Param { trainable }).unwrap()
}

/// A var used twice accumulates both gradients; a frozen parameter gets none; an evaluation
/// graph records nothing.
#[test]
fn tape_accumulates_and_respects_frozen() {
    let dev = Device::Cpu;
    let mut p = Params::new(&dev);
    let a = leaf(&mut p, "a", vec![1.0, 2.0, 3.0], true);
    let b = leaf(&mut p, "b", vec![0.5, -1.0, 4.0], false);
    let g = Graph::train();
    let (va, vb) = (g.param(&p, a), g.param(&p, b));
    assert!(va.tracked() && !vb.tracked());
    // loss = mean(a·a + a·b) -> d/da = (2a + b)/3
    let aa = g.mul(&va, &va).unwrap();
    let ab = g.mul(&va, &vb).unwrap();
    let loss = g.mean_all(&g.add(&aa, &ab).unwrap()).unwrap();
    let grads = g.backward(&loss, p.len()).unwrap();
    let da = grads.get(a).unwrap().to_vec().unwrap();
    let want = [(2.0 + 0.5) / 3.0, (4.0 - 1.0) / 3.0, (6.0 + 4.0) / 3.0];
    for (x, w) in da.iter().zip(want) {
        assert!((x - w).abs() < 1e-6, "{da:?}");
    }
    assert!(grads.get(b).is_none(), "a frozen parameter gets no gradient");

    let e = Graph::eval();
    let va = e.param(&p, a);
    let y = e.mul(&va, &va).unwrap();
    assert!(!va.tracked() && !y.tracked(), "evaluation records nothing");
    assert!(e.backward(&e.mean_all(&y).unwrap(), p.len()).is_err(), "nothing to differentiate");
}

/// The tape's gradient of a small composite (linear → layer norm → attention → loss) against
/// central finite differences in f64 of the same forward (evaluated in f32, so the step and the
/// tolerance follow f32: h = 1e-2 on O(1) values, 2e-2 relative).
#[test]
fn tape_gradient_matches_finite_differences() {
    let dev = Device::Cpu;
    let mut rng = reclmis::testing::Rng::new(7);
    let mut p = Params::new(&dev);
    let (b, t, d) = (2, 5, 8);
    let w = leaf(&mut p, "w", rng.vec(d * d, -0.5, 0.5), true);
    let x = rng.vec(b * t * d, -1.0, 1.0);
    let target = rng.vec(b * t * d, -1.0, 1.0);
    let cond = rng.vec(b * t, 0.1, 1.0);
    let f = |p: &Params, g: &Graph| -> Var {
        let xv = Var::constant(Tensor::from_vec(x.clone(), &[b, t, d], &dev).unwrap());
        let wv = g.reshape(&g.param(p, w), &[d, d]).unwrap();
        let h = g.linear(&xv, &wv, None).unwrap();
        let cv = Var::constant(Tensor::from_vec(cond.clone(), &[b, t], &dev).unwrap());
        let att = reclmis::autograd::Attention {
            heads: 2,
            causal: true,
            key_valid: None,
            condition: Some(&cv),
            condition_on_logits: false,
        };
        let o = g.attention(&h, &h, &h, &att).unwrap();
        let tv = Var::constant(Tensor::from_vec(target.clone(), &[b, t, d], &dev).unwrap());
        g.mse(&o, &tv).unwrap()
    };
    let g = Graph::train();
    let loss = f(&p, &g);
    let grad = g.backward(&loss, p.len()).unwrap().get(w).unwrap().to_vec().unwrap();
    let base = p.value(w).to_vec().unwrap();
    let h = 1e-2f32;
    for i in [0, 5, 17, 33, 63] {
        let mut eval_at = |delta: f32| {
            let mut v = base.clone();
            v[i] += delta;
            p.set(w, Tensor::from_vec(v, &[d * d], &dev).unwrap()).unwrap();
            f(&p, &Graph::eval()).tensor().to_vec().unwrap()[0] as f64
        };
        let fd = (eval_at(h) - eval_at(-h)) / (2.0 * h as f64);
        let scale = grad.iter().fold(0f32, |a, x| a.max(x.abs())) as f64;
        assert!((grad[i] as f64 - fd).abs() <= 2e-2 * scale, "w[{i}]: tape {} vs finite difference {fd}", grad[i]);
    }
}

#[test]
fn checkpoint_round_trip_and_errors() {
    let dev = Device::Cpu;
    let m = RecLmis::new(Config::preset("tiny").unwrap(), &dev, 3).unwrap();
    let dir = std::env::temp_dir().join(format!("reclmis-ckpt-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("model.safetensors");
    checkpoint::save(&m.params, &path).unwrap();
    let mut other = RecLmis::new(Config::preset("tiny").unwrap(), &dev, 4).unwrap();
    let rep = checkpoint::load(&mut other.params, &path).unwrap();
    assert!(rep.missing.is_empty() && rep.unexpected.is_empty(), "{}", rep.summary());
    for id in m.params.ids() {
        assert_eq!(
            m.params.value(id).to_vec().unwrap(),
            other.params.value(id).to_vec().unwrap(),
            "{}",
            m.params.name(id)
        );
    }
    // truncated file: a clear error naming the file
    let bytes = std::fs::read(&path).unwrap();
    let cut = dir.join("cut.safetensors");
    std::fs::write(&cut, &bytes[..bytes.len() / 2]).unwrap();
    let e = checkpoint::load(&mut other.params, &cut).unwrap_err().to_string();
    assert!(e.contains("cut.safetensors") && e.contains("not a valid safetensors"), "{e}");
    // missing file
    let e = checkpoint::load(&mut other.params, &dir.join("nope.safetensors")).unwrap_err().to_string();
    assert!(e.contains("nope.safetensors") && e.contains("cannot read"), "{e}");
    // another preset's checkpoint: the shape mismatch names the key
    let mut small = RecLmis::new(Config::preset("official").unwrap(), &dev, 0).unwrap();
    let e = checkpoint::load(&mut small.params, &path).unwrap_err().to_string();
    assert!(e.contains("has shape") && e.contains("expects"), "{e}");
    std::fs::remove_dir_all(&dir).unwrap();
}
