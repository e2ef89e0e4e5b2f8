//! Naive embedding in f64. Tests only.

pub fn forward(ids: &[i32], table: &[f64], d: usize) -> Vec<f64> {
    ids.iter().flat_map(|&id| table[id as usize * d..(id as usize + 1) * d].to_vec()).collect()
}

pub fn backward(ids: &[i32], dy: &[f64], vocab: usize, d: usize) -> Vec<f64> {
    let mut dt = vec![0.0; vocab * d];
    for (tok, &id) in ids.iter().enumerate() {
        for c in 0..d {
            dt[id as usize * d + c] += dy[tok * d + c];
        }
    }
    dt
}
