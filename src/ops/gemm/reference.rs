//! Naive GEMM in f64. Tests only.

use super::GemmShape;

/// Returns (C, |A|·|B|): the second is the scale of the rounding error of each element, which the
/// tests use to set their tolerance (the error of a sum of k products is bounded by it).
pub fn gemm(a: &[f32], b: &[f32], s: &GemmShape, alpha: f32) -> (Vec<f64>, Vec<f64>) {
    let mut c = vec![0.0; s.batch * s.m * s.n];
    let mut mag = vec![0.0; c.len()];
    for z in 0..s.batch {
        for i in 0..s.m {
            for j in 0..s.n {
                let (mut acc, mut abs) = (0.0f64, 0.0f64);
                for kk in 0..s.k {
                    let av = a[z * s.sa.0 + i * s.sa.1 + kk * s.sa.2] as f64;
                    let bv = b[z * s.sb.0 + kk * s.sb.1 + j * s.sb.2] as f64;
                    acc += av * bv;
                    abs += (av * bv).abs();
                }
                c[(z * s.m + i) * s.n + j] = alpha as f64 * acc;
                mag[(z * s.m + i) * s.n + j] = (alpha as f64).abs() * abs;
            }
        }
    }
    (c, mag)
}
