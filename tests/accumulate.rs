//! Gradient accumulation (`Trainer::accumulate` / `apply`, `train --accumulate N`): a step's
//! gradient is the sample-weighted sum of its micro-batches' gradients, each micro-batch
//! normalised by batch norm alone (PyTorch's accumulation loop), and equal to one larger batch
//! wherever the batch statistics coincide.

use reclmis::model::train::Trainer;
use reclmis::model::{Batch, Config, MaskIndices, RecLmis};
use reclmis::optim::AdamConfig;
use reclmis::testing::Rng;
use reclmis::{Device, Tensor};

/// The tiny preset at 32² without dropout (so a forward depends on its inputs only), CCL off
/// unless `ccl` (the contrastive loss couples the samples of a batch).
fn model(ccl: bool) -> RecLmis {
    let mut cfg = Config::preset("tiny").unwrap();
    cfg.img_size = (32, 32);
    cfg.dropout = 0.0;
    if !ccl {
        cfg.loss_weights[1] = 0.0;
    }
    RecLmis::new(cfg, &Device::Cpu, 7).unwrap()
}

/// `n` samples of random images, ids and masks.
fn batch(m: &RecLmis, n: usize, seed: u64) -> Batch {
    let dev = Device::Cpu;
    let (h, w) = m.cfg.img_size;
    let l = m.cfg.token_len;
    let mut r = Rng::new(seed);
    let ids: Vec<i32> = (0..n * l).map(|_| (r.next_u64() % m.cfg.vocab_size as u64) as i32).collect();
    let valid: Vec<i32> = (0..n * l).map(|i| (i % l < 6) as i32).collect();
    let masks: Vec<f32> = (0..n * h * w).map(|_| (r.uniform(0.0, 1.0) < 0.3) as u8 as f32).collect();
    Batch {
        images: Tensor::from_vec(r.vec(n * 3 * h * w, 0.0, 1.0), &[n, 3, h, w], &dev).unwrap(),
        ids: Tensor::from_vec_i32(ids, &[n, l], &dev).unwrap(),
        valid: Tensor::from_vec_i32(valid, &[n, l], &dev).unwrap(),
        masks: Some(Tensor::from_vec(masks, &[n, h, w], &dev).unwrap()),
        text_hidden: None,
    }
}

/// The batch `b` twice over (samples 0..n, then 0..n again).
fn doubled(b: &Batch) -> Batch {
    let twice = |t: &Tensor| -> Tensor {
        let mut shape = t.shape().to_vec();
        shape[0] *= 2;
        match t.dtype() {
            reclmis::DType::I32 => {
                let v = t.to_vec_i32().unwrap();
                Tensor::from_vec_i32([v.clone(), v].concat(), &shape, t.device()).unwrap()
            }
            _ => {
                let v = t.to_vec().unwrap();
                Tensor::from_vec([v.clone(), v].concat(), &shape, t.device()).unwrap()
            }
        }
    };
    Batch {
        images: twice(&b.images),
        ids: twice(&b.ids),
        valid: twice(&b.valid),
        masks: b.masks.as_ref().map(twice),
        text_hidden: None,
    }
}

/// The reconstruction masks a training forward of `b` draws (fixed, so that every gradient
/// below masks the same tokens of the same sample).
fn masks_of(m: &RecLmis, b: &Batch) -> MaskIndices {
    let g = reclmis::autograd::Graph::train();
    m.forward_train(&g, b, None, &mut Rng::new(11)).unwrap().masks
}

/// The gradient one trainer gathers from `micro` (batch, weight) pairs.
fn gathered(m: &RecLmis, micro: &[(&Batch, &MaskIndices, f32)]) -> Vec<(usize, Vec<f32>)> {
    let mut tr = Trainer::new(RecLmis::new(m.cfg.clone(), &Device::Cpu, 7).unwrap(), AdamConfig::default());
    for (b, k, w) in micro {
        tr.accumulate(b, Some((*k).clone()), &mut Rng::new(5), *w).unwrap();
    }
    tr.gathered().into_iter().map(|(id, t)| (id.0, t.to_vec().unwrap())).collect()
}

/// max |a - b| over max |b|, per tensor; the worst. A tensor whose gradient is zero in exact
/// arithmetic (a bias just before a batch norm, which removes any shift) holds rounding noise
/// only (~1e-10 here), so each tensor's scale is at least 1e-4 of the largest gradient element
/// of all.
fn worst_relative(a: &[(usize, Vec<f32>)], b: &[(usize, Vec<f32>)]) -> f64 {
    assert_eq!(a.len(), b.len(), "the same parameters get gradients");
    let global = b.iter().flat_map(|(_, v)| v).fold(0f64, |s, x| s.max(x.abs() as f64));
    let mut worst = 0f64;
    for ((ia, va), (ib, vb)) in a.iter().zip(b) {
        assert_eq!(ia, ib);
        let scale = vb.iter().fold(1e-4 * global, |s, x| s.max(x.abs() as f64));
        let diff = va.iter().zip(vb).fold(0f64, |s, (x, y)| s.max((x - y).abs() as f64));
        if scale > 0.0 {
            worst = worst.max(diff / scale);
        }
    }
    worst
}

/// Two different micro-batches: the gathered gradient is w1·g(S1) + w2·g(S2), each g computed
/// alone (so batch norm saw each micro-batch by itself, the contrastive loss each one's pairs).
/// The bound: the only difference is the rounding of the weighted sum (a few f32 roundings of
/// each element, u = 6e-8), far below 1e-6 of each tensor's largest element.
#[test]
fn accumulated_gradient_is_the_weighted_sum_of_micro_batches() {
    let m = model(true);
    let (s1, s2) = (batch(&m, 3, 1), batch(&m, 1, 2));
    let (k1, k2) = (masks_of(&m, &s1), masks_of(&m, &s2));
    let g1 = gathered(&m, &[(&s1, &k1, 1.0)]);
    let g2 = gathered(&m, &[(&s2, &k2, 1.0)]);
    let both = gathered(&m, &[(&s1, &k1, 0.75), (&s2, &k2, 0.25)]);
    let want: Vec<(usize, Vec<f32>)> = g1
        .iter()
        .zip(&g2)
        .map(|((i, a), (_, b))| (*i, a.iter().zip(b).map(|(x, y)| 0.75 * x + 0.25 * y).collect()))
        .collect();
    let e = worst_relative(&both, &want);
    assert!(e <= 1e-6, "accumulated vs weighted sum: {e:e}");
    // and it is not the plain sum (the weights matter)
    let plain: Vec<(usize, Vec<f32>)> =
        g1.iter().zip(&g2).map(|((i, a), (_, b))| (*i, a.iter().zip(b).map(|(x, y)| x + y).collect())).collect();
    assert!(worst_relative(&both, &plain) > 0.1);
}

/// Where the batch statistics of the micro-batches equal the large batch's (the large batch is
/// a micro-batch twice over: the same batch-norm mean and biased variance, the same Dice, BCE
/// and reconstruction means; the contrastive loss is off, as duplicated pairs change it), two
/// micro-batches of weight 1/2 give the large batch's gradient. The bound: the large batch sums
/// twice the elements in another order, so its batch statistics and reductions differ from the
/// micro-batch's by rounding, k·u with k up to the 4,096 elements of a 32² map (2e-4 at most,
/// ~1e-5 as random rounding grows), carried through the backward of every layer (measured:
/// 2e-6); 1e-4 of each tensor's largest element leaves room for that and catches a missing or
/// doubled weight (a factor 2) or a mixed-up sample.
#[test]
fn accumulation_equals_the_larger_batch_where_statistics_agree() {
    let m = model(false);
    let s = batch(&m, 2, 3);
    let k = masks_of(&m, &s);
    let big = doubled(&s);
    let kk =
        MaskIndices { img: [k.img.clone(), k.img.clone()].concat(), text: [k.text.clone(), k.text.clone()].concat() };
    let large = gathered(&m, &[(&big, &kk, 1.0)]);
    let acc = gathered(&m, &[(&s, &k, 0.5), (&s, &k, 0.5)]);
    let e = worst_relative(&acc, &large);
    assert!(e <= 1e-4, "two micro-batches vs the batch twice as large: {e:e}");
    let once = gathered(&m, &[(&s, &k, 0.5)]);
    assert!(worst_relative(&once, &large) > 0.4, "half the weight is half the gradient");
}

/// Each micro-batch updates the running statistics and counts one batch, as each PyTorch
/// forward does; a failed micro-batch puts every buffer back as it was before the step and
/// leaves nothing to apply.
#[test]
fn buffers_count_every_micro_batch_and_a_failure_restores_them() {
    let m = model(true);
    let s = batch(&m, 2, 4);
    let mut tr = Trainer::new(RecLmis::new(m.cfg.clone(), &Device::Cpu, 7).unwrap(), AdamConfig::default());
    let snapshot = |tr: &Trainer| -> (Vec<Vec<f32>>, Vec<(String, i64)>) {
        let p = &tr.model.params;
        (p.ids().map(|id| p.value(id).to_vec().unwrap()).collect(), p.counters().to_vec())
    };
    let before = snapshot(&tr);
    tr.accumulate(&s, None, &mut Rng::new(1), 0.5).unwrap();
    let once = snapshot(&tr);
    assert!(once.1.iter().all(|(_, c)| *c == 1), "one micro-batch counted: {:?}", once.1);
    assert_ne!(once.0, before.0, "the running statistics moved");
    tr.accumulate(&s, None, &mut Rng::new(1), 0.5).unwrap();
    let twice = snapshot(&tr);
    assert!(twice.1.iter().all(|(_, c)| *c == 2));
    assert_ne!(twice.0, once.0, "the second micro-batch moved them again");
    let mut bad = batch(&m, 2, 5);
    let mut px = bad.images.to_vec().unwrap();
    px[9] = f32::NAN;
    bad.images = Tensor::from_vec(px, bad.images.shape(), &Device::Cpu).unwrap();
    let e = tr.accumulate(&bad, None, &mut Rng::new(1), 0.5).unwrap_err().to_string();
    assert!(e.contains("non-finite"), "{e}");
    assert_eq!(snapshot(&tr), before, "weights, running statistics and counters as before the step");
    assert!(tr.gathered().is_empty());
    assert!(tr.apply().is_err(), "nothing left to apply");
    // a step of one micro-batch at weight 1 is the plain step
    let mut a = Trainer::new(RecLmis::new(m.cfg.clone(), &Device::Cpu, 7).unwrap(), AdamConfig::default());
    let mut b = Trainer::new(RecLmis::new(m.cfg.clone(), &Device::Cpu, 7).unwrap(), AdamConfig::default());
    let la = a.step(&s, None, &mut Rng::new(2)).unwrap();
    b.accumulate(&s, None, &mut Rng::new(2), 1.0).unwrap();
    let lb = b.apply().unwrap();
    assert_eq!(la, lb);
    assert_eq!(snapshot(&a), snapshot(&b));
}
