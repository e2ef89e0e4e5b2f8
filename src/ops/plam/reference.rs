//! The PLAM gate in f64, 1×1 convolutions included. Tests only.

/// out [B,C,HW] for s [B,C,HW], w_avg and w_max [C,C], fc1 [6,3] + [6], fc2 [6] + [1].
#[allow(clippy::too_many_arguments)]
pub fn plam(
    s: &[f64],
    w_avg: &[f64],
    w_max: &[f64],
    fc1w: &[f64],
    fc1b: &[f64],
    fc2w: &[f64],
    fc2b: f64,
    b: usize,
    c: usize,
    hw: usize,
) -> Vec<f64> {
    let mut out = vec![0.0; s.len()];
    for i in 0..b {
        for p in 0..hw {
            let at = |ch: usize| s[(i * c + ch) * hw + p];
            let conv = |w: &[f64], o: usize| (0..c).map(|ch| w[o * c + ch] * at(ch)).sum::<f64>();
            let a = (0..c).map(|o| conv(w_avg, o).max(0.0)).sum::<f64>() / c as f64;
            let m = (0..c).map(|o| conv(w_max, o).max(0.0)).fold(f64::NEG_INFINITY, f64::max);
            let f = [a, m, a + m];
            let g = fc2b
                + (0..6)
                    .map(|j| {
                        fc2w[j]
                            * (fc1w[j * 3] * f[0] + fc1w[j * 3 + 1] * f[1] + fc1w[j * 3 + 2] * f[2] + fc1b[j]).max(0.0)
                    })
                    .sum::<f64>();
            for ch in 0..c {
                out[(i * c + ch) * hw + p] = g * at(ch);
            }
        }
    }
    out
}

/// The smallest distance of any kink input to its kink over all pixels: the ReLUs' arguments
/// (A, M and the MLP's six pre-activations) to 0, and the gap between the two largest ReLU(M)
/// when the largest is positive (the max's routing). Finite differences across a kink are not
/// derivatives, so gradient tests keep away from them.
#[allow(clippy::too_many_arguments)]
pub fn kink_margin(
    s: &[f64],
    w_avg: &[f64],
    w_max: &[f64],
    fc1w: &[f64],
    fc1b: &[f64],
    b: usize,
    c: usize,
    hw: usize,
) -> f64 {
    let mut margin = f64::INFINITY;
    for i in 0..b {
        for p in 0..hw {
            let at = |ch: usize| s[(i * c + ch) * hw + p];
            let conv = |w: &[f64], o: usize| (0..c).map(|ch| w[o * c + ch] * at(ch)).sum::<f64>();
            let av: Vec<f64> = (0..c).map(|o| conv(w_avg, o)).collect();
            let mut mv: Vec<f64> = (0..c).map(|o| conv(w_max, o)).collect();
            for v in av.iter().chain(&mv) {
                margin = margin.min(v.abs());
            }
            let a = av.iter().map(|v| v.max(0.0)).sum::<f64>() / c as f64;
            mv.sort_by(|x, y| y.total_cmp(x));
            let m = mv[0].max(0.0);
            if c > 1 && mv[0] > 0.0 {
                margin = margin.min(mv[0] - mv[1].max(0.0));
            }
            let f = [a, m, a + m];
            for j in 0..6 {
                margin =
                    margin.min((fc1w[j * 3] * f[0] + fc1w[j * 3 + 1] * f[1] + fc1w[j * 3 + 2] * f[2] + fc1b[j]).abs());
            }
        }
    }
    margin
}
