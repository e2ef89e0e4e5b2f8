//! Permutations (tiled transpose and general gather) and their backward; exact equality.

mod common;
use common::*;
use proptest::prelude::*;
use reclmis::ops::transpose::{self, reference, simplify};
use reclmis::testing::mismatch;
use reclmis::Device;

fn shape_perm() -> impl Strategy<Value = (Vec<usize>, Vec<usize>)> {
    prop::collection::vec(prop_oneof![small_dim(), dim()], 2..6)
        .prop_filter("small enough to emulate", |s| s.iter().product::<usize>() <= 60_000)
        .prop_flat_map(|s| {
            let r = s.len();
            (Just(s), Just((0..r).collect::<Vec<usize>>()).prop_shuffle())
        })
}

fn check_permute(dev: &Device, sp: (Vec<usize>, Vec<usize>), seed: u64) -> Result<(), TestCaseError> {
    let (shape, perm) = sp;
    let x = values(shape.iter().product(), seed, false);
    let xt = tensor(&x, &shape, dev);
    let y = transpose::permute(&xt, &perm).unwrap();
    let want_shape: Vec<usize> = perm.iter().map(|&p| shape[p]).collect();
    prop_assert_eq!(y.shape(), want_shape.as_slice());
    assert_none("forward", mismatch(&y.to_vec().unwrap(), &reference::permute(&f64s(&x), &shape, &perm), 0.0, 0.0))?;
    // Backward: the inverse permutation restores the input exactly.
    let back = transpose::permute_backward(&y, &perm).unwrap();
    prop_assert_eq!(back.shape(), shape.as_slice());
    assert_none("backward", mismatch(&back.to_vec().unwrap(), &f64s(&x), 0.0, 0.0))
}

per_device!(check_permute, (sp in shape_perm(), seed in any::<u64>()));

#[test]
fn simplify_merges_adjacent_dims() {
    assert_eq!(simplify(&[2, 3, 4], &[0, 2, 1]), (vec![2, 3, 4], vec![0, 2, 1]));
    assert_eq!(simplify(&[2, 3, 4], &[1, 2, 0]), (vec![2, 12], vec![1, 0]));
    assert_eq!(simplify(&[2, 1, 4], &[1, 0, 2]), (vec![8], vec![0]));
}

#[test]
fn bad_permutation_is_an_error() {
    let x = tensor(&[0.0; 6], &[2, 3], &Device::Cpu);
    assert!(transpose::permute(&x, &[0, 0]).unwrap_err().to_string().contains("not a permutation"));
}

/// A shape, an axis and a range start..start+len inside it.
fn narrow_case() -> impl Strategy<Value = (Vec<usize>, usize, usize, usize)> {
    prop::collection::vec(prop_oneof![small_dim(), dim()], 1..5)
        .prop_filter("small enough to emulate", |s| s.iter().product::<usize>() <= 60_000)
        .prop_flat_map(|s| {
            let r = s.len();
            (Just(s), 0..r)
        })
        .prop_flat_map(|(s, axis)| {
            let n = s[axis];
            (Just(s), Just(axis), 0..n)
        })
        .prop_flat_map(|(s, axis, start)| {
            let n = s[axis];
            (Just(s), Just(axis), Just(start), 0..=n - start)
        })
}

/// narrow copies exactly; its backward puts dy back in place with exact zeros around it.
fn check_narrow(dev: &Device, case: (Vec<usize>, usize, usize, usize), seed: u64) -> Result<(), TestCaseError> {
    let (shape, axis, start, len) = case;
    let x = values(shape.iter().product(), seed, false);
    let y = transpose::narrow(&tensor(&x, &shape, dev), axis, start, len).unwrap();
    let want = reference::narrow(&f64s(&x), &shape, axis, start, len);
    assert_none("forward", mismatch(&y.to_vec().unwrap(), &want, 0.0, 0.0))?;
    let back = transpose::narrow_backward(&y, &shape, axis, start).unwrap();
    // the reference backward: each input element is dy's when inside the range, else 0
    let outer: usize = shape[..axis].iter().product();
    let inner: usize = shape[axis + 1..].iter().product();
    let n = shape[axis];
    let mut wb = vec![0.0f64; x.len()];
    for o in 0..outer {
        for k in start..start + len {
            for i in 0..inner {
                wb[(o * n + k) * inner + i] = x[(o * n + k) * inner + i] as f64;
            }
        }
    }
    assert_none("backward", mismatch(&back.to_vec().unwrap(), &wb, 0.0, 0.0))
}

per_device!(check_narrow, (case in narrow_case(), seed in any::<u64>()));

#[test]
fn narrow_out_of_range_is_an_error() {
    let x = tensor(&[0.0; 6], &[2, 3], &Device::Cpu);
    assert!(transpose::narrow(&x, 1, 2, 2).unwrap_err().to_string().contains("of dim 1"));
}
