//! Shared by the integration tests: devices, data, proptest settings, the golden fixture.
#![allow(dead_code)]

pub mod fixture;
pub mod gemm_case;
pub mod golden;
pub mod torch_save;

use proptest::prelude::*;
use reclmis::device::{set_poison, Device};
use reclmis::Tensor;

/// The device a test runs on. Output buffers are NaN-poisoned so an unwritten element fails.
pub fn device(kind: &str) -> Device {
    set_poison(true);
    match kind {
        "cpu" => Device::Cpu,
        "emu" => Device::emu().expect("the emu device is built in"),
        "cuda" => Device::cuda(0).expect("cuda tests were asked for, but no CUDA GPU is usable"),
        _ => unreachable!(),
    }
}

/// Fewer cases on the emulator: it runs every CUDA thread as a fiber and CI has two cores.
/// `PROPTEST_CASES` overrides both (a stress run looking for rare failures before CI finds them).
pub fn cases(kind: &str) -> ProptestConfig {
    let default = if kind == "emu" { 48 } else { 64 };
    ProptestConfig {
        cases: std::env::var("PROPTEST_CASES").ok().and_then(|n| n.parse().ok()).unwrap_or(default),
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

/// Sizes that catch tile edges: 1, primes, and neighbours of the tile sizes 8, 16, 32, 64.
pub fn dim() -> impl Strategy<Value = usize> {
    prop::sample::select(vec![1usize, 2, 3, 5, 7, 8, 13, 15, 16, 17, 31, 32, 33, 37, 63, 64, 65, 67, 97, 127, 129])
}

/// Small dims for higher-rank shapes (the product stays small enough for the emulator).
pub fn small_dim() -> impl Strategy<Value = usize> {
    prop::sample::select(vec![1usize, 2, 3, 4, 5, 7, 8, 11, 13])
}

/// Values with occasional outliers and exact ties (repeated values).
pub fn values(n: usize, seed: u64, outliers: bool) -> Vec<f32> {
    let mut rng = reclmis::testing::Rng::new(seed);
    let mut v = rng.vec(n, -3.0, 3.0);
    if outliers && n > 2 {
        for _ in 0..(n / 10).max(1) {
            let i = (rng.next_u64() % n as u64) as usize;
            v[i] = if rng.next_u64().is_multiple_of(2) { 80.0 } else { -80.0 };
        }
        let (i, j) = ((rng.next_u64() % n as u64) as usize, (rng.next_u64() % n as u64) as usize);
        v[i] = v[j];
    }
    v
}

pub fn tensor(v: &[f32], shape: &[usize], dev: &Device) -> Tensor {
    Tensor::from_vec(v.to_vec(), shape, dev).unwrap()
}

pub fn f64s(v: &[f32]) -> Vec<f64> {
    reclmis::testing::f64s(v)
}

/// Fails the proptest case with the mismatch description.
pub fn assert_none(what: &str, m: Option<String>) -> Result<(), TestCaseError> {
    match m {
        None => Ok(()),
        Some(e) => Err(TestCaseError::fail(format!("{what}: {e}"))),
    }
}

/// Declares the same proptest for cpu, emu and cuda (the cuda one ignored without a GPU).
#[macro_export]
macro_rules! per_device {
    ($check:ident, ($($arg:ident in $strat:expr),* $(,)?)) => {
        mod $check {
            use super::*;
            proptest! {
                #![proptest_config(common::cases("cpu"))]
                #[test]
                fn cpu($($arg in $strat),*) { super::$check(&common::device("cpu"), $($arg),*)?; }
            }
            proptest! {
                #![proptest_config(common::cases("emu"))]
                #[test]
                fn emu($($arg in $strat),*) { super::$check(&common::device("emu"), $($arg),*)?; }
            }
            proptest! {
                #![proptest_config(common::cases("cuda"))]
                #[test]
                #[ignore = "needs a CUDA GPU"]
                fn cuda($($arg in $strat),*) { super::$check(&common::device("cuda"), $($arg),*)?; }
            }
        }
    };
}
