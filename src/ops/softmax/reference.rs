//! Naive softmax in f64. Tests only.

pub fn forward(x: &[f64], cols: usize, log: bool) -> Vec<f64> {
    let mut out = Vec::with_capacity(x.len());
    for row in x.chunks(cols) {
        let m = row.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        let s: f64 = row.iter().map(|&v| (v - m).exp()).sum();
        for &v in row {
            out.push(if log { v - m - s.ln() } else { (v - m).exp() / s });
        }
    }
    out
}

/// dx = J^T dy with the Jacobian written out: d softmax_i / d x_j = s_i (δ_ij - s_j);
/// d logsoftmax_i / d x_j = δ_ij - s_j. Computed from x, not from the forward output.
pub fn backward(x: &[f64], dy: &[f64], cols: usize, log: bool) -> Vec<f64> {
    let s = forward(x, cols, false);
    let mut dx = vec![0.0; x.len()];
    for r in 0..x.len() / cols {
        let o = r * cols;
        for j in 0..cols {
            let mut acc = 0.0;
            for i in 0..cols {
                let d = if i == j { 1.0 } else { 0.0 };
                let jac = if log { d - s[o + j] } else { s[o + i] * (d - s[o + j]) };
                acc += jac * dy[o + i];
            }
            dx[o + j] = acc;
        }
    }
    dx
}
