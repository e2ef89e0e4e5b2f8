//! Naive GEMM in f64. Tests only.

use super::GemmShape;

/// Returns (C, |A|·|B|): the second is the scale of the rounding error of each element, which the
/// tests use to set their tolerance (the error of a sum of k products is bounded by it).
pub fn gemm(a: &[f64], b: &[f64], s: &GemmShape, alpha: f64) -> (Vec<f64>, Vec<f64>) {
    let mut c = vec![0.0; s.batch * s.m * s.n];
    let mut mag = vec![0.0; c.len()];
    for z in 0..s.batch {
        for i in 0..s.m {
            for j in 0..s.n {
                let (mut acc, mut abs) = (0.0f64, 0.0f64);
                for kk in 0..s.k {
                    let av = a[z * s.sa.0 + i * s.sa.1 + kk * s.sa.2];
                    let bv = b[z * s.sb.0 + kk * s.sb.1 + j * s.sb.2];
                    acc += av * bv;
                    abs += (av * bv).abs();
                }
                c[(z * s.m + i) * s.n + j] = alpha * acc;
                mag[(z * s.m + i) * s.n + j] = alpha.abs() * abs;
            }
        }
    }
    (c, mag)
}

/// (dA, dB) in the operands' storage layout, accumulated element by element from
/// C[z,i,j] = alpha Σ_k A[z,i,k] B[z,k,j] (a shared operand has batch stride 0 and so collects
/// every batch's contribution).
pub fn gemm_backward(a: &[f64], b: &[f64], dc: &[f64], s: &GemmShape, alpha: f64) -> (Vec<f64>, Vec<f64>) {
    let (mut da, mut db) = (vec![0.0; a.len()], vec![0.0; b.len()]);
    for z in 0..s.batch {
        for i in 0..s.m {
            for j in 0..s.n {
                let g = alpha * dc[(z * s.m + i) * s.n + j];
                for kk in 0..s.k {
                    let ia = z * s.sa.0 + i * s.sa.1 + kk * s.sa.2;
                    let ib = z * s.sb.0 + kk * s.sb.1 + j * s.sb.2;
                    da[ia] += g * b[ib];
                    db[ib] += g * a[ia];
                }
            }
        }
    }
    (da, db)
}
