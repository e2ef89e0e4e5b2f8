//! The roundings in f64 from their definition, independent of `half` and of the kernels. Tests
//! only.

/// A binary float format: significant bits (with the implicit one), the smallest normal exponent
/// and the largest finite value.
#[derive(Clone, Copy, Debug)]
pub struct Format {
    pub bits: i32,
    pub min_exp: i32,
    pub max: f64,
}

pub const BF16: Format = Format { bits: 8, min_exp: -126, max: 3.3895313892515355e38 };
pub const F16: Format = Format { bits: 11, min_exp: -14, max: 65504.0 };

/// `v` rounded to `f` (to nearest, ties to even; subnormals below 2^min_exp; ±inf beyond the
/// rounding boundary above `max`; NaN stays NaN).
pub fn round(v: f64, f: Format) -> f64 {
    if v.is_nan() || v.is_infinite() || v == 0.0 {
        return v;
    }
    // the exponent of v's leading bit, no lower than the smallest normal's (subnormals share it)
    let e = (v.abs().log2().floor() as i32).max(f.min_exp);
    // log2 can be off by one near powers of two: fix it exactly
    let e = if v.abs() >= 2f64.powi(e + 1) {
        e + 1
    } else if e > f.min_exp && v.abs() < 2f64.powi(e) {
        e - 1
    } else {
        e
    };
    let ulp = 2f64.powi(e - (f.bits - 1));
    let q = v / ulp; // exact: a power-of-two scaling of a value with few bits
    let r = q.round();
    let r = if (q - q.trunc()).abs() == 0.5 && r % 2.0 != 0.0 { r - q.signum() } else { r };
    // a value that rounds to zero keeps its sign (-0)
    let out = (r * ulp).copysign(v);
    if out.abs() > f.max {
        return f64::INFINITY.copysign(v);
    }
    out
}
