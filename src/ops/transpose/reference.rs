//! Naive permutation by coordinates. Tests only.

use crate::ops::contiguous_strides;

pub fn permute(x: &[f64], shape: &[usize], perm: &[usize]) -> Vec<f64> {
    let out: Vec<usize> = perm.iter().map(|&p| shape[p]).collect();
    let (so, si) = (contiguous_strides(&out), contiguous_strides(shape));
    (0..x.len())
        .map(|i| {
            let src: usize = (0..out.len()).map(|d| ((i / so[d]) % out[d]) * si[perm[d]]).sum();
            x[src]
        })
        .collect()
}

/// Element by element: y[o, j, i] = x[o, start + j, i]. Tests only.
pub fn narrow(x: &[f64], shape: &[usize], axis: usize, start: usize, len: usize) -> Vec<f64> {
    let outer: usize = shape[..axis].iter().product();
    let inner: usize = shape[axis + 1..].iter().product();
    let n = shape[axis];
    let mut y = vec![0.0; outer * len * inner];
    for o in 0..outer {
        for j in 0..len {
            for i in 0..inner {
                y[(o * len + j) * inner + i] = x[(o * n + start + j) * inner + i];
            }
        }
    }
    y
}
