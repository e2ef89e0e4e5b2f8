//! Naive losses in f64, written as the official code computes them (BCE of probabilities with
//! clamped logs). Tests only.

/// (dice, bce, criterion) of logits z [B,P] against targets g.
pub fn dice_bce(z: &[f64], g: &[f64], b: usize, p: usize) -> (f64, f64, f64) {
    let (mut dice, mut bce) = (0.0, 0.0);
    for s in 0..b {
        let (mut inter, mut pp, mut gg) = (0.0, 0.0, 0.0);
        for i in s * p..(s + 1) * p {
            let q = 1.0 / (1.0 + (-z[i]).exp());
            let (qw, gw) = (0.5 * q, 0.5 * g[i]);
            inter += qw * gw;
            pp += qw * qw;
            gg += gw * gw;
            bce -= g[i] * q.ln().max(-100.0) + (1.0 - g[i]) * (1.0 - q).ln().max(-100.0);
        }
        dice += 1.0 - (2.0 * inter + 1e-5) / (pp + gg + 1e-5);
    }
    let (dice, bce) = (dice / b as f64, bce / (b * p) as f64);
    (dice, bce, 0.5 * dice + 0.5 * bce)
}

/// d criterion / d z, analytically (the clamp has zero derivative where active).
pub fn dice_bce_grad(z: &[f64], g: &[f64], b: usize, p: usize) -> Vec<f64> {
    let mut dz = vec![0.0; z.len()];
    for s in 0..b {
        let q: Vec<f64> = (s * p..(s + 1) * p).map(|i| 1.0 / (1.0 + (-z[i]).exp())).collect();
        let inter: f64 = (0..p).map(|j| 0.25 * q[j] * g[s * p + j]).sum();
        let den: f64 = (0..p).map(|j| 0.25 * (q[j] * q[j] + g[s * p + j] * g[s * p + j])).sum::<f64>() + 1e-5;
        for j in 0..p {
            let (i, t, qj) = (s * p + j, g[s * p + j], q[j]);
            let dq = -(0.5 * t * den - (2.0 * inter + 1e-5) * 0.5 * qj) / (den * den);
            let ddice = dq * qj * (1.0 - qj) / b as f64;
            let dpos = if qj.ln() > -100.0 { -(1.0 - qj) } else { 0.0 };
            let dneg = if (1.0 - qj).ln() > -100.0 { qj } else { 0.0 };
            let dbce = (t * dpos + (1.0 - t) * dneg) / (b * p) as f64;
            dz[i] = 0.5 * ddice + 0.5 * dbce;
        }
    }
    dz
}

/// Per image (dice, iou, hard dice) of ŷ = probs > 0.5.
pub fn metrics(probs: &[f64], g: &[f64], b: usize, p: usize) -> Vec<[f64; 3]> {
    (0..b)
        .map(|s| {
            let r = s * p..(s + 1) * p;
            let y: Vec<f64> = probs[r.clone()].iter().map(|&x| if x > 0.5 { 1.0 } else { 0.0 }).collect();
            let t = &g[r];
            let inter: f64 = y.iter().zip(t).map(|(a, b)| a * b).sum();
            let (sy, sg): (f64, f64) = (y.iter().sum(), t.iter().sum());
            let union = sy + sg - inter;
            let dice = 2.0 * inter / (sg + sy + 1e-5);
            let iou = if union > 0.0 { inter / union } else { 0.0 };
            // 1 − the training Dice loss of ŷ (0.5 weights on both maps)
            let hard = (2.0 * 0.25 * inter + 1e-5) / (0.25 * sy + 0.25 * sg + 1e-5);
            [dice, iou, hard]
        })
        .collect()
}

pub fn mse(x: &[f64], y: &[f64]) -> f64 {
    x.iter().zip(y).map(|(a, b)| (a - b) * (a - b)).sum::<f64>() / x.len() as f64
}
