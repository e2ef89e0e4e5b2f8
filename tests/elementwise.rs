//! Unary and broadcasting binary ops and their backward, on cpu, emu and cuda, against the f64
//! references; the references' backward against finite differences.

mod common;
use common::*;
use proptest::prelude::*;
use reclmis::ops::elementwise::{self as ew, reference, BinaryOp, UnaryOp};
use reclmis::testing::{fd_mismatch, mismatch, mismatch_scaled, EPS32};
use reclmis::Device;

fn unary_op() -> impl Strategy<Value = UnaryOp> {
    prop_oneof![
        Just(UnaryOp::Relu),
        Just(UnaryOp::Sigmoid),
        Just(UnaryOp::Exp),
        Just(UnaryOp::Log),
        (-3.0f32..3.0).prop_map(UnaryOp::Scale),
        (-3.0f32..3.0).prop_map(UnaryOp::AddScalar),
        Just(UnaryOp::Gelu),
        Just(UnaryOp::QuickGelu),
    ]
}

fn binary_op() -> impl Strategy<Value = BinaryOp> {
    prop_oneof![Just(BinaryOp::Add), Just(BinaryOp::Sub), Just(BinaryOp::Mul), Just(BinaryOp::Div)]
}

/// Inputs inside the op's domain: log needs x > 0.
fn unary_input(op: UnaryOp, n: usize, seed: u64) -> Vec<f32> {
    let v = values(n, seed, false);
    match op {
        UnaryOp::Log => v.iter().map(|x| x.abs() + 0.05).collect(),
        _ => v,
    }
}

fn check_unary(dev: &Device, shape: Vec<usize>, seed: u64, op: UnaryOp) -> Result<(), TestCaseError> {
    let n = shape.iter().product();
    let x = unary_input(op, n, seed);
    let dy = values(n, seed ^ 1, false);
    let xt = tensor(&x, &shape, dev);
    let y = ew::unary(&xt, op).unwrap();
    // libm and CUDA's expf/logf are within 2 ulp; a few ulp of slack covers the f32 rounding of
    // the surrounding arithmetic (sigmoid: 1 + e, one division).
    assert_none("forward", mismatch(&y.to_vec().unwrap(), &reference::unary(&f64s(&x), op), 1e-7, 8.0 * EPS32))?;
    let dx = ew::unary_backward(op, &xt, &y, &tensor(&dy, &shape, dev)).unwrap();
    // The fast paths use y (sigmoid: y(1-y), exp: y), rounded to f32: the product of three
    // rounded factors is within ~6 eps of the exact value, plus 1 - y's absolute error near y = 1.
    let want = reference::unary_backward(op, &f64s(&x), &f64s(&dy));
    assert_none("backward", mismatch(&dx.to_vec().unwrap(), &want, 4.0 * EPS32 * 3.0, 16.0 * EPS32))
}

per_device!(check_unary, (shape in prop::collection::vec(dim(), 1..3), seed in any::<u64>(), op in unary_op()));

/// An output shape and two operand shapes that broadcast to it (dims set to 1, leading dims
/// dropped).
fn broadcast_shapes() -> impl Strategy<Value = (Vec<usize>, Vec<usize>)> {
    (prop::collection::vec(small_dim(), 1..5), any::<u64>(), any::<u64>(), 0usize..3, 0usize..3).prop_map(
        |(out, ma, mb, da, db)| {
            let make = |mask: u64, drop: usize| -> Vec<usize> {
                let s: Vec<usize> =
                    out.iter().enumerate().map(|(i, &d)| if mask >> i & 1 == 1 { 1 } else { d }).collect();
                s[drop.min(s.len() - 1)..].to_vec()
            };
            (make(ma % 16, da), make(mb % 16, db))
        },
    )
}

/// Divisors are kept at |b| >= 0.5 so that a/b and a/b² stay well conditioned.
fn divisor(op: BinaryOp, b: Vec<f32>) -> Vec<f32> {
    if op != BinaryOp::Div {
        return b;
    }
    b.into_iter().map(|x| if x < 0.0 { x - 0.5 } else { x + 0.5 }).collect()
}

fn check_binary(dev: &Device, shapes: (Vec<usize>, Vec<usize>), seed: u64, op: BinaryOp) -> Result<(), TestCaseError> {
    let (sa, sb) = shapes;
    let out = ew::broadcast_shape(&sa, &sb).unwrap();
    let a = values(sa.iter().product(), seed, false);
    let b = divisor(op, values(sb.iter().product(), seed ^ 2, false));
    let dy = values(out.iter().product(), seed ^ 3, false);
    let (at, bt) = (tensor(&a, &sa, dev), tensor(&b, &sb, dev));
    let y = ew::binary(&at, &bt, op).unwrap();
    prop_assert_eq!(y.shape(), out.as_slice());
    let want = reference::binary(&f64s(&a), &sa, &f64s(&b), &sb, op);
    assert_none("forward", mismatch(&y.to_vec().unwrap(), &want, 0.0, EPS32))?;
    let (da, db) = ew::binary_backward(op, &at, &bt, &tensor(&dy, &out, dev)).unwrap();
    let (wa, wb) = reference::binary_backward(&f64s(&a), &sa, &f64s(&b), &sb, &f64s(&dy), op);
    // Gradients of a broadcast operand are sums of up to `reps` terms. Rounding errors of a
    // sequential f32 sum of random-sign terms grow like sqrt(reps)·eps·Σ|terms| (Higham's
    // probabilistic bound); 4x slack. Σ|terms| is the reference evaluated on absolute values.
    let abs = |v: &[f32]| -> Vec<f64> { v.iter().map(|x| x.abs() as f64).collect() };
    let (ma, mb) = reference::binary_backward(&abs(&a), &sa, &abs(&b), &sb, &abs(&dy), op);
    let (ma, mb): (Vec<f64>, Vec<f64>) = (ma.iter().map(|x| x.abs()).collect(), mb.iter().map(|x| x.abs()).collect());
    let reps = |s: &[usize]| (out.iter().product::<usize>() / s.iter().product::<usize>().max(1)) as f64;
    assert_none("da", mismatch_scaled(&da.to_vec().unwrap(), &wa, &ma, 4.0 * EPS32 * (reps(&sa).sqrt() + 1.0), 0.0))?;
    assert_none("db", mismatch_scaled(&db.to_vec().unwrap(), &wb, &mb, 4.0 * EPS32 * (reps(&sb).sqrt() + 1.0), 0.0))
}

per_device!(check_binary, (shapes in broadcast_shapes(), seed in any::<u64>(), op in binary_op()));

proptest! {
    #![proptest_config(ProptestConfig { cases: 32, failure_persistence: None, ..ProptestConfig::default() })]

    /// The reference backward equals central finite differences of the reference forward.
    #[test]
    fn reference_unary_grad_matches_finite_differences(n in 1usize..40, seed in any::<u64>(), op in unary_op()) {
        let x = f64s(&unary_input(op, n, seed));
        let dy = f64s(&values(n, seed ^ 1, false));
        let grad = reference::unary_backward(op, &x, &dy);
        assert_none("fd", fd_mismatch(|x| reference::unary(x, op), &x, &dy, &grad, 1e-6))?;
    }

    #[test]
    fn reference_binary_grad_matches_finite_differences(shapes in broadcast_shapes(), seed in any::<u64>(), op in binary_op()) {
        let (sa, sb) = shapes;
        let out = ew::broadcast_shape(&sa, &sb).unwrap();
        prop_assume!(out.iter().product::<usize>() <= 2000);
        let a = f64s(&values(sa.iter().product(), seed, false));
        let b = f64s(&divisor(op, values(sb.iter().product(), seed ^ 2, false)));
        let dy = f64s(&values(out.iter().product(), seed ^ 3, false));
        let (ga, gb) = reference::binary_backward(&a, &sa, &b, &sb, &dy, op);
        assert_none("fd a", fd_mismatch(|a| reference::binary(a, &sa, &b, &sb, op), &a, &dy, &ga, 1e-6))?;
        assert_none("fd b", fd_mismatch(|b| reference::binary(&a, &sa, b, &sb, op), &b, &dy, &gb, 1e-6))?;
    }
}

#[test]
fn broadcast_errors_are_typed() {
    let dev = Device::Cpu;
    let a = tensor(&[1.0; 6], &[2, 3], &dev);
    let b = tensor(&[1.0; 4], &[2, 2], &dev);
    let e = ew::add(&a, &b).unwrap_err().to_string();
    assert!(e.contains("do not broadcast"), "{e}");
}

#[test]
fn device_mismatch_is_an_error() {
    let a = tensor(&[1.0; 3], &[3], &Device::Cpu);
    let b = tensor(&[1.0; 3], &[3], &common::device("emu"));
    let e = ew::add(&a, &b).unwrap_err().to_string();
    assert!(e.contains("different devices"), "{e}");
}

#[test]
fn sigmoid_saturates_without_nan() {
    for dev in [common::device("cpu"), common::device("emu")] {
        let x = tensor(&[-1000.0, -88.0, 0.0, 88.0, 1000.0], &[5], &dev);
        let y = ew::sigmoid(&x).unwrap().to_vec().unwrap();
        assert_eq!(y[0], 0.0);
        assert_eq!(y[4], 1.0);
        assert!(y.iter().all(|v| v.is_finite()), "{y:?}");
    }
}
