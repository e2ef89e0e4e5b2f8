//! Naive attention in f64, written as the official code computes it: logits, mask, softmax, then
//! (official condition) multiply the probabilities by w + 1e-10 and renormalise. The backward is
//! the chain rule through exactly those steps (not through the log-weight identity the kernels
//! use), so agreement also checks that identity.
//!
//! Layouts as the op: q [B,Tq,E], k and v [B,S,E], E = H·Dh, head h = columns h·Dh..(h+1)·Dh.

use super::COND_EPS;

#[derive(Clone, Debug, PartialEq)]
pub enum Cond {
    None,
    /// Official: P ← P·(w + 1e-10), rows renormalised. w [B,S].
    Probs(Vec<f64>),
    /// Paper: the scaled logits multiplied by w before the softmax. w [B,S].
    Logits(Vec<f64>),
}

#[derive(Clone, Debug)]
pub struct Problem {
    pub b: usize,
    pub h: usize,
    pub tq: usize,
    pub s: usize,
    pub dh: usize,
    pub scale: f64,
    pub causal: bool,
    /// [B,S], true = the key takes part.
    pub valid: Option<Vec<bool>>,
    pub cond: Cond,
}

pub struct Forward {
    /// [B,Tq,E]
    pub o: Vec<f64>,
    /// [B,H,Tq,S]: the final probabilities (after the condition); rows with no key are zero.
    pub probs: Vec<f64>,
    /// o's error scale: Σ_j P_ij·|v_jd|.
    pub o_mag: Vec<f64>,
}

pub struct Grads {
    pub dq: Vec<f64>,
    pub dk: Vec<f64>,
    pub dv: Vec<f64>,
    /// [B,S]; empty without a condition.
    pub dw: Vec<f64>,
    /// Error scales: the same sums over absolute values of their terms.
    pub dq_mag: Vec<f64>,
    pub dk_mag: Vec<f64>,
    pub dv_mag: Vec<f64>,
    pub dw_mag: Vec<f64>,
}

impl Problem {
    fn e(&self) -> usize {
        self.h * self.dh
    }
    fn allowed(&self, b: usize, i: usize, j: usize) -> bool {
        !(self.causal && j > i) && self.valid.as_ref().is_none_or(|v| v[b * self.s + j])
    }
    fn w(&self, b: usize, j: usize) -> f64 {
        match &self.cond {
            Cond::None => 1.0,
            Cond::Probs(w) | Cond::Logits(w) => w[b * self.s + j],
        }
    }
    /// (scale·⟨q_i, k_j⟩, scale·Σ|q_i||k_j|) for head h: the logit and the size of its terms
    /// (which bounds the rounding error of a computed logit, even when the terms cancel).
    fn dot(&self, q: &[f64], k: &[f64], b: usize, h: usize, i: usize, j: usize) -> (f64, f64) {
        let (e, dh) = (self.e(), self.dh);
        let qi = &q[(b * self.tq + i) * e + h * dh..][..dh];
        let kj = &k[(b * self.s + j) * e + h * dh..][..dh];
        let dot = qi.iter().zip(kj).map(|(a, c)| a * c).sum::<f64>();
        let abs = qi.iter().zip(kj).map(|(a, c)| (a * c).abs()).sum::<f64>();
        (self.scale * dot, self.scale * abs)
    }

    /// One row: (t = scaled dots, z = logits, softmax p, final probabilities pf, R = Σ p(w+eps)).
    fn row(&self, q: &[f64], k: &[f64], b: usize, h: usize, i: usize) -> Row {
        let s = self.s;
        let (t, t_abs): (Vec<f64>, Vec<f64>) = (0..s).map(|j| self.dot(q, k, b, h, i, j)).unzip();
        let z: Vec<f64> = (0..s)
            .map(|j| match self.cond {
                Cond::Logits(_) => t[j] * self.w(b, j),
                _ => t[j],
            })
            .collect();
        let ok: Vec<bool> = (0..s).map(|j| self.allowed(b, i, j)).collect();
        let m = (0..s).filter(|&j| ok[j]).map(|j| z[j]).fold(f64::NEG_INFINITY, f64::max);
        let ex: Vec<f64> = (0..s).map(|j| if ok[j] { (z[j] - m).exp() } else { 0.0 }).collect();
        let sum: f64 = ex.iter().sum();
        let p: Vec<f64> = ex.iter().map(|x| if sum > 0.0 { x / sum } else { 0.0 }).collect();
        let (pf, r) = if let Cond::Probs(_) = self.cond {
            let rr: Vec<f64> = (0..s).map(|j| p[j] * (self.w(b, j) + COND_EPS as f64)).collect();
            let r: f64 = rr.iter().sum();
            (rr.iter().map(|x| if r > 0.0 { x / r } else { 0.0 }).collect(), r)
        } else {
            (p.clone(), 1.0)
        };
        Row { t, t_abs, p, pf, r }
    }

    pub fn forward(&self, q: &[f64], k: &[f64], v: &[f64]) -> Forward {
        let (e, dh) = (self.e(), self.dh);
        let mut o = vec![0.0; self.b * self.tq * e];
        let mut o_mag = vec![0.0; o.len()];
        let mut probs = vec![0.0; self.b * self.h * self.tq * self.s];
        for b in 0..self.b {
            for h in 0..self.h {
                for i in 0..self.tq {
                    let row = self.row(q, k, b, h, i);
                    for j in 0..self.s {
                        probs[((b * self.h + h) * self.tq + i) * self.s + j] = row.pf[j];
                        for d in 0..dh {
                            let vv = v[(b * self.s + j) * e + h * dh + d];
                            o[(b * self.tq + i) * e + h * dh + d] += row.pf[j] * vv;
                            o_mag[(b * self.tq + i) * e + h * dh + d] += row.pf[j] * vv.abs();
                        }
                    }
                }
            }
        }
        Forward { o, probs, o_mag }
    }

    pub fn backward(&self, q: &[f64], k: &[f64], v: &[f64], dout: &[f64]) -> Grads {
        let (e, dh, s) = (self.e(), self.dh, self.s);
        let mut g = Grads {
            dq: vec![0.0; q.len()],
            dk: vec![0.0; k.len()],
            dv: vec![0.0; v.len()],
            dw: vec![0.0; if self.cond == Cond::None { 0 } else { self.b * s }],
            dq_mag: vec![0.0; q.len()],
            dk_mag: vec![0.0; k.len()],
            dv_mag: vec![0.0; v.len()],
            dw_mag: vec![0.0; if self.cond == Cond::None { 0 } else { self.b * s }],
        };
        for b in 0..self.b {
            for h in 0..self.h {
                for i in 0..self.tq {
                    let row = self.row(q, k, b, h, i);
                    let qo = (b * self.tq + i) * e + h * dh;
                    let ko = |j: usize| (b * s + j) * e + h * dh;
                    let dov = &dout[qo..qo + dh];
                    // o = Σ pf_j v_j
                    let dpf: Vec<f64> = (0..s).map(|j| (0..dh).map(|d| dov[d] * v[ko(j) + d]).sum()).collect();
                    let dpf_mag: Vec<f64> =
                        (0..s).map(|j| (0..dh).map(|d| (dov[d] * v[ko(j) + d]).abs()).sum()).collect();
                    for j in 0..s {
                        for (d, &dod) in dov.iter().enumerate() {
                            g.dv[ko(j) + d] += row.pf[j] * dod;
                            g.dv_mag[ko(j) + d] += row.pf[j] * dod.abs();
                        }
                    }
                    let dfd: f64 = (0..s).map(|j| row.pf[j] * dpf[j]).sum();
                    let dfd_mag: f64 = (0..s).map(|j| row.pf[j] * dpf_mag[j]).sum();
                    // pf_j = p_j (w_j + eps) / R: back to p (and to w).
                    let dp: Vec<f64> = match self.cond {
                        Cond::Probs(_) => (0..s)
                            .map(|j| {
                                let we = self.w(b, j) + COND_EPS as f64;
                                let dr = if row.r > 0.0 { (dpf[j] - dfd) / row.r } else { 0.0 };
                                g.dw[b * s + j] += dr * row.p[j];
                                if row.r > 0.0 {
                                    g.dw_mag[b * s + j] += row.p[j] / row.r * (dpf_mag[j] + dfd_mag);
                                }
                                dr * we
                            })
                            .collect(),
                        _ => dpf.clone(),
                    };
                    let dpd: f64 = (0..s).map(|j| row.p[j] * dp[j]).sum();
                    for j in 0..s {
                        let dz = row.p[j] * (dp[j] - dpd);
                        let dz_mag = row.pf[j] * (dpf_mag[j] + dfd_mag);
                        let (wj, wabs) = match self.cond {
                            Cond::Logits(_) => {
                                g.dw[b * s + j] += dz * row.t[j];
                                g.dw_mag[b * s + j] += dz_mag * row.t_abs[j];
                                (self.w(b, j), self.w(b, j).abs())
                            }
                            _ => (1.0, 1.0),
                        };
                        for d in 0..dh {
                            g.dq[qo + d] += dz * wj * self.scale * k[ko(j) + d];
                            g.dq_mag[qo + d] += dz_mag * wabs * self.scale * k[ko(j) + d].abs();
                            g.dk[ko(j) + d] += dz * wj * self.scale * q[qo + d];
                            g.dk_mag[ko(j) + d] += dz_mag * wabs * self.scale * q[qo + d].abs();
                        }
                    }
                }
            }
        }
        g
    }
}

struct Row {
    t: Vec<f64>,
    t_abs: Vec<f64>,
    p: Vec<f64>,
    pf: Vec<f64>,
    r: f64,
}
