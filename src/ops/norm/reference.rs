//! Naive batch norm in f64. Tests only. x: [B, C, S] flattened.

/// (y, mean, biased var, new running mean, new running var); `train` false uses rm / rv.
#[allow(clippy::too_many_arguments, clippy::type_complexity)]
pub fn forward(
    x: &[f64],
    gamma: &[f64],
    beta: &[f64],
    rm: &[f64],
    rv: &[f64],
    (b, c, s): (usize, usize, usize),
    eps: f64,
    momentum: f64,
    relu: bool,
    train: bool,
) -> (Vec<f64>, Vec<f64>, Vec<f64>, Vec<f64>, Vec<f64>) {
    let n = (b * s) as f64;
    let at = |i: usize, ch: usize, k: usize| x[(i * c + ch) * s + k];
    let (mut mean, mut var) = (rm.to_vec(), rv.to_vec());
    let (mut nrm, mut nrv) = (rm.to_vec(), rv.to_vec());
    if train {
        for ch in 0..c {
            let m = (0..b).flat_map(|i| (0..s).map(move |k| (i, k))).map(|(i, k)| at(i, ch, k)).sum::<f64>() / n;
            let v =
                (0..b).flat_map(|i| (0..s).map(move |k| (i, k))).map(|(i, k)| (at(i, ch, k) - m).powi(2)).sum::<f64>()
                    / n;
            mean[ch] = m;
            var[ch] = v;
            nrm[ch] = (1.0 - momentum) * rm[ch] + momentum * m;
            nrv[ch] = (1.0 - momentum) * rv[ch] + momentum * v * n / (n - 1.0);
        }
    }
    let mut y = vec![0.0; x.len()];
    for i in 0..b {
        for ch in 0..c {
            for k in 0..s {
                let v = gamma[ch] * (at(i, ch, k) - mean[ch]) / (var[ch] + eps).sqrt() + beta[ch];
                y[(i * c + ch) * s + k] = if relu && v < 0.0 { 0.0 } else { v };
            }
        }
    }
    (y, mean, var, nrm, nrv)
}
