//! Embedding lookup and its scatter-add backward (repeated ids), and the out-of-range id error.

mod common;
use common::*;
use proptest::prelude::*;
use reclmis::ops::embedding::{self as emb, reference};
use reclmis::testing::{mismatch, mismatch_scaled, Rng, EPS32};
use reclmis::{Device, Tensor};

fn check_embedding(dev: &Device, lead: Vec<usize>, vocab: usize, d: usize, seed: u64) -> Result<(), TestCaseError> {
    let n: usize = lead.iter().product();
    let mut rng = Rng::new(seed);
    // Few distinct ids, so that most are repeated (the scatter-add's interesting case).
    let ids: Vec<i32> = (0..n).map(|_| (rng.next_u64() % vocab.min(5) as u64) as i32).collect();
    let table = values(vocab * d, seed ^ 1, false);
    let idt = Tensor::from_vec_i32(ids.clone(), &lead, dev).unwrap();
    let y = emb::embedding(&idt, &tensor(&table, &[vocab, d], dev)).unwrap();
    let want_shape = [lead.clone(), vec![d]].concat();
    prop_assert_eq!(y.shape(), want_shape.as_slice());
    assert_none("forward", mismatch(&y.to_vec().unwrap(), &reference::forward(&ids, &f64s(&table), d), 0.0, 0.0))?;
    let dy = values(n * d, seed ^ 2, false);
    let dt = emb::embedding_backward(&idt, &tensor(&dy, &want_shape, dev), vocab).unwrap();
    let want = reference::backward(&ids, &f64s(&dy), vocab, d);
    let abs: Vec<f64> = dy.iter().map(|x| x.abs() as f64).collect();
    let mag = reference::backward(&ids, &abs, vocab, d);
    // a sequential f32 sum of the tokens sharing an id: at most n·eps of Σ|terms|
    assert_none("backward", mismatch_scaled(&dt.to_vec().unwrap(), &want, &mag, (n as f64 + 1.0) * EPS32, 0.0))
}

per_device!(check_embedding, (
    lead in prop::collection::vec(prop::sample::select(vec![1usize, 2, 3, 18]), 1..3),
    vocab in prop::sample::select(vec![1usize, 2, 7, 100]),
    d in prop::sample::select(vec![1usize, 3, 64, 130]),
    seed in any::<u64>(),
));

#[test]
fn out_of_range_ids_are_named() {
    for kind in ["cpu", "emu"] {
        let dev = device(kind);
        let table = tensor(&[0.5; 12], &[3, 4], &dev);
        for bad in [3, -1] {
            let ids = Tensor::from_vec_i32(vec![0, 2, bad, 1], &[4], &dev).unwrap();
            let e = emb::embedding(&ids, &table).expect_err("an error").to_string();
            assert!(e.contains(&format!("token 2 has id {bad}, outside the table's 3 rows")), "{kind}: {e}");
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 16, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn reference_grad_matches_finite_differences(n in 1usize..6, vocab in 1usize..5, d in 1usize..4, seed in any::<u64>()) {
        let mut rng = Rng::new(seed);
        let ids: Vec<i32> = (0..n).map(|_| (rng.next_u64() % vocab as u64) as i32).collect();
        let table = f64s(&values(vocab * d, seed ^ 1, false));
        let dy = f64s(&values(n * d, seed ^ 2, false));
        let g = reference::backward(&ids, &dy, vocab, d);
        assert_none("fd", reclmis::testing::fd_mismatch(|t| reference::forward(&ids, t, d), &table, &dy, &g, 1e-6))?;
    }
}
