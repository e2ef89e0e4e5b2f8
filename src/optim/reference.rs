//! torch.optim.Adam / AdamW in f64, element by element. Tests only.

use super::AdamConfig;

/// (p, m, v) after one update at `step` (1-based).
pub fn adam(c: &AdamConfig, step: u64, p: &[f64], g: &[f64], m: &[f64], v: &[f64]) -> (Vec<f64>, Vec<f64>, Vec<f64>) {
    let (b1, b2, lr, eps, wd) = (c.beta1 as f64, c.beta2 as f64, c.lr as f64, c.eps as f64, c.weight_decay as f64);
    let bc1 = 1.0 - b1.powi(step as i32);
    let bc2 = 1.0 - b2.powi(step as i32);
    let mut out = (vec![], vec![], vec![]);
    for i in 0..p.len() {
        let (mut pi, mut gi) = (p[i], g[i]);
        if c.decoupled {
            pi *= 1.0 - lr * wd;
        } else {
            gi += wd * pi;
        }
        let mi = b1 * m[i] + (1.0 - b1) * gi;
        let vi = b2 * v[i] + (1.0 - b2) * gi * gi;
        out.0.push(pi - lr / bc1 * mi / (vi.sqrt() / bc2.sqrt() + eps));
        out.1.push(mi);
        out.2.push(vi);
    }
    out
}
