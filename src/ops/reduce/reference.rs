//! Naive reductions in f64. Tests only.

use super::ReduceOp;

/// (values, argmax) over n of [outer, n, inner]. Max follows the documented rule: NaN wins, ties
/// go to the lowest index.
pub fn reduce(x: &[f64], outer: usize, n: usize, inner: usize, op: ReduceOp) -> (Vec<f64>, Vec<i32>) {
    let (mut y, mut idx) = (Vec::new(), Vec::new());
    for b in 0..outer {
        for c in 0..inner {
            let col: Vec<f64> = (0..n).map(|j| x[(b * n + j) * inner + c]).collect();
            match op {
                ReduceOp::Sum => y.push(col.iter().sum()),
                ReduceOp::Mean => y.push(col.iter().sum::<f64>() / n as f64),
                ReduceOp::Max => {
                    let mut best = 0;
                    for j in 1..n {
                        let (v, bv) = (col[j], col[best]);
                        if (v.is_nan() && !bv.is_nan()) || (!bv.is_nan() && v > bv) {
                            best = j;
                        }
                    }
                    y.push(col[best]);
                    idx.push(best as i32);
                }
            }
        }
    }
    (y, idx)
}

/// dx[b, j, c] for dy[b, c]: the derivative of the reduction written out element by element.
pub fn reduce_backward(dy: &[f64], idx: &[i32], outer: usize, n: usize, inner: usize, op: ReduceOp) -> Vec<f64> {
    let mut dx = vec![0.0; outer * n * inner];
    for b in 0..outer {
        for j in 0..n {
            for c in 0..inner {
                let g = dy[b * inner + c];
                dx[(b * n + j) * inner + c] = match op {
                    ReduceOp::Sum => g,
                    ReduceOp::Mean => g / n as f64,
                    ReduceOp::Max => {
                        if idx[b * inner + c] as usize == j {
                            g
                        } else {
                            0.0
                        }
                    }
                };
            }
        }
    }
    dx
}
