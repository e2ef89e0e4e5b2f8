//! Helpers shared by the tests and `reclmis selfcheck`: seeded data and the comparison rule.

pub use crate::rng::Rng;

/// The first element where |got - want| > atol + rtol·|want| (NaN in `got` where `want` is finite
/// counts as a mismatch, NaN where `want` is NaN as a match), described for an assertion message.
pub fn mismatch(got: &[f32], want: &[f64], atol: f64, rtol: f64) -> Option<String> {
    if got.len() != want.len() {
        return Some(format!("length {} vs reference {}", got.len(), want.len()));
    }
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        let g = g as f64;
        let ok = if w.is_nan() {
            g.is_nan()
        } else if w.is_infinite() {
            g == w
        } else {
            (g - w).abs() <= atol + rtol * w.abs()
        };
        if !ok {
            return Some(format!("element {i}: got {g}, reference {w} (atol {atol:e}, rtol {rtol:e})"));
        }
    }
    None
}

/// Like [`mismatch`] with a per-element error scale: |got - want| <= tol · scale[i] + atol.
pub fn mismatch_scaled(got: &[f32], want: &[f64], scale: &[f64], tol: f64, atol: f64) -> Option<String> {
    for (i, ((&g, &w), &s)) in got.iter().zip(want).zip(scale).enumerate() {
        if (g as f64 - w).abs() > tol * s + atol || g.is_nan() {
            return Some(format!("element {i}: got {g}, reference {w} (allowed {:e})", tol * s + atol));
        }
    }
    None
}

/// f32 unit roundoff.
pub const EPS32: f64 = f32::EPSILON as f64 / 2.0;
/// tf32 keeps 10 mantissa bits: unit roundoff 2^-11.
pub const EPS_TF32: f64 = 1.0 / 2048.0;

/// Widens f32 data for the f64 references.
pub fn f64s(v: &[f32]) -> Vec<f64> {
    v.iter().map(|&x| x as f64).collect()
}

/// Checks `grad` (the reference backward: Jᵀ·dy) against central finite differences of
/// L(x) = Σ dy · f(x) in f64. Returns the first disagreement beyond tol·(1 + |fd|).
pub fn fd_mismatch(f: impl Fn(&[f64]) -> Vec<f64>, x: &[f64], dy: &[f64], grad: &[f64], tol: f64) -> Option<String> {
    let h = 1e-6;
    let loss = |x: &[f64]| f(x).iter().zip(dy).map(|(a, b)| a * b).sum::<f64>();
    let mut xp = x.to_vec();
    for j in 0..x.len() {
        xp[j] = x[j] + h;
        let lp = loss(&xp);
        xp[j] = x[j] - h;
        let lm = loss(&xp);
        xp[j] = x[j];
        let fd = (lp - lm) / (2.0 * h);
        if (fd - grad[j]).abs() > tol * (1.0 + fd.abs()) {
            return Some(format!("d/dx[{j}]: finite difference {fd}, backward {}", grad[j]));
        }
    }
    None
}
