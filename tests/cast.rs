//! Casts between f32, bf16 and f16 against the definition of rounding (ops::cast::reference, f64,
//! independent of `half`): bit-exact, on random bit patterns (every exponent, subnormals, inf,
//! NaN) and on the exact midpoints between neighbouring values (the ties, which go to even).

mod common;
use common::*;
use half::{bf16, f16};
use proptest::prelude::*;
use reclmis::ops::cast::{self, reference};
use reclmis::{DType, Device, Tensor};

/// Equal as values with the same sign, or both NaN.
fn same(got: f64, want: f64) -> bool {
    (got.is_nan() && want.is_nan()) || (got == want && got.is_sign_negative() == want.is_sign_negative())
}

fn check(what: &str, inputs: &[f64], got: &[f32], want: impl Fn(f64) -> f64) -> Result<(), TestCaseError> {
    prop_assert_eq!(inputs.len(), got.len());
    for (i, (&x, &g)) in inputs.iter().zip(got).enumerate() {
        let w = want(x);
        prop_assert!(same(g as f64, w), "{}: element {} = {:e} gave {:e}, want {:e}", what, i, x, g, w);
    }
    Ok(())
}

/// f32 inputs: random bit patterns and the midpoints between neighbouring bf16 and f16 values.
fn f32_inputs(bits: &[u32]) -> Vec<f32> {
    let mut v: Vec<f32> = bits.iter().map(|&b| f32::from_bits(b)).collect();
    for &b in bits.iter().take(64) {
        // bf16 b and its upper neighbour: their midpoint needs 9 bits, exact in f32
        let lo = bf16::from_bits((b >> 16) as u16);
        let hi = bf16::from_bits(lo.to_bits().wrapping_add(1));
        if lo.is_finite() && hi.is_finite() {
            v.push(((lo.to_f32() as f64 + hi.to_f32() as f64) / 2.0) as f32);
        }
        let lo = f16::from_bits(b as u16 & 0x7bff);
        let hi = f16::from_bits(lo.to_bits() + 1);
        if hi.is_finite() {
            v.push(((lo.to_f32() as f64 + hi.to_f32() as f64) / 2.0) as f32);
        }
    }
    v.extend([65504.0, 65520.0, 65519.99, 3.3895314e38, f32::MAX, 5.9604645e-8, 2.9802322e-8, -0.0]);
    v
}

fn check_casts(dev: &Device, bits: Vec<u32>) -> Result<(), TestCaseError> {
    let x = f32_inputs(&bits);
    let xs: Vec<f64> = x.iter().map(|&v| v as f64).collect();
    let n = x.len();
    let xt = Tensor::from_vec(x, &[n], dev).unwrap();
    let b = cast::cast(&xt, DType::BF16).unwrap();
    let h = cast::cast(&xt, DType::F16).unwrap();
    prop_assert_eq!(b.dtype(), DType::BF16);
    prop_assert_eq!(h.dtype(), DType::F16);
    check("f32 -> bf16", &xs, &b.to_vec().unwrap(), |v| reference::round(v, reference::BF16))?;
    check("f32 -> f16", &xs, &h.to_vec().unwrap(), |v| reference::round(v, reference::F16))?;
    // widening is exact: what the host reads from the narrow tensors
    let (bs, hs): (Vec<f64>, Vec<f64>) = (
        b.to_vec().unwrap().iter().map(|&v| v as f64).collect(),
        h.to_vec().unwrap().iter().map(|&v| v as f64).collect(),
    );
    check("bf16 -> f32", &bs, &cast::cast(&b, DType::F32).unwrap().to_vec().unwrap(), |v| v)?;
    check("f16 -> f32", &hs, &cast::cast(&h, DType::F32).unwrap().to_vec().unwrap(), |v| v)?;
    // between the half types: one rounding of the exact value
    check("bf16 -> f16", &bs, &cast::cast(&b, DType::F16).unwrap().to_vec().unwrap(), |v| {
        reference::round(v, reference::F16)
    })?;
    check("f16 -> bf16", &hs, &cast::cast(&h, DType::BF16).unwrap().to_vec().unwrap(), |v| {
        reference::round(v, reference::BF16)
    })?;
    // the narrow tensors hold 2 bytes an element and read back bit for bit on the host
    let host_b = b.to_vec_bf16().unwrap();
    let again = Tensor::from_vec_bf16(host_b.clone(), &[n], dev).unwrap();
    prop_assert_eq!(
        again.to_vec_bf16().unwrap().iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
        host_b.iter().map(|v| v.to_bits()).collect::<Vec<_>>()
    );
    Ok(())
}

per_device!(check_casts, (bits in prop::collection::vec(any::<u32>(), 1..300)));

/// The reference itself, on values whose rounding is known by hand.
#[test]
fn reference_rounds_as_the_formats_define() {
    use reference::{round, BF16, F16};
    assert_eq!(round(1.0 + 1.0 / 512.0, BF16), 1.0, "a tie goes to the even neighbour (1.0)");
    assert_eq!(round(1.0 + 3.0 / 512.0, BF16), 1.0 + 4.0 / 512.0, "a tie goes to the even neighbour (up)");
    assert_eq!(round(65519.0, F16), 65504.0);
    assert_eq!(round(65520.0, F16), f64::INFINITY, "the tie above the largest half overflows");
    assert_eq!(round(2f64.powi(-25), F16), 0.0, "half the smallest subnormal: a tie to zero");
    assert_eq!(round(1.5 * 2f64.powi(-25), F16), 2f64.powi(-24));
    assert_eq!(round(-1e-30, F16).to_bits(), (-0.0f64).to_bits());
    assert_eq!(round(-(2f64.powi(-25)), F16).to_bits(), (-0.0f64).to_bits(), "a tie to -0");
    assert!(round(f64::NAN, BF16).is_nan());
}

/// Casting to i32, or from it, is refused by name.
#[test]
fn only_float_types_convert() {
    let dev = Device::Cpu;
    let i = Tensor::from_vec_i32(vec![1, 2], &[2], &dev).unwrap();
    let e = cast::cast(&i, DType::F32).unwrap_err().to_string();
    assert!(e.contains("cast") && e.contains("i32"), "{e}");
    let f = Tensor::from_vec(vec![1.0, 2.0], &[2], &dev).unwrap();
    assert!(cast::cast(&f, DType::I32).is_err());
    // the same type is the tensor itself
    assert_eq!(cast::cast(&f, DType::F32).unwrap().to_vec().unwrap(), vec![1.0, 2.0]);
}

/// Through the tape: the gradient of a bf16 activation is bf16 (rounded), and cast's backward
/// hands it back in the input's type. loss = mean(c·f32(bf16(x))) over 4 → dx = f32(bf16(c/4)).
#[test]
fn cast_backward_returns_the_gradient_in_the_input_type() {
    use reclmis::autograd::{Graph, Var};
    use reclmis::nn::params::{Kind, Params};
    for kind in ["cpu", "emu"] {
        let dev = device(kind);
        let mut p = Params::new(&dev);
        let x = p.add("x", &[4], vec![1.0, -2.5, 3.25, 1e-3], Kind::Param { trainable: true }).unwrap();
        let c = vec![0.1f32, 1.0 / 3.0, -7.123, 1.0];
        let g = Graph::train();
        let xb = g.cast(&g.param(&p, x), DType::BF16).unwrap();
        assert_eq!(xb.tensor().dtype(), DType::BF16);
        let back = g.cast(&xb, DType::F32).unwrap();
        let cv = Var::constant(Tensor::from_vec(c.clone(), &[4], &dev).unwrap());
        let loss = g.mean_all(&g.mul(&back, &cv).unwrap()).unwrap();
        let dx = g.backward(&loss, p.len()).unwrap().get(x).unwrap().clone();
        assert_eq!(dx.dtype(), DType::F32);
        let want: Vec<f32> = c.iter().map(|&v| bf16::from_f32(v / 4.0).to_f32()).collect();
        assert_eq!(dx.to_vec().unwrap(), want, "{kind}");
    }
}
