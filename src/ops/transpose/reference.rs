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
