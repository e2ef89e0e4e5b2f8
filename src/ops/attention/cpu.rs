//! cpu attention: per (batch, head), blocks of at most QB query rows. A block's logits
//! [rows, S] live in a per-task buffer that stays in cache; the products go through the `gemm`
//! crate with the strides of the [B,T,E] layout (no copies of q, k, v). Tasks run in parallel
//! over (batch, head) with rayon; each product inside a task is single-threaded.

use super::{AttnShape, COND_EPS};
use crate::ops::cpu_math::exp_slice;
use gemm::Parallelism;
use rayon::prelude::*;

/// Query rows per block: 64 x 196 keys x 4 B = 50 KB of logits, inside L2 with the operands.
const QB: usize = 64;

pub enum Cond<'a> {
    None,
    Probs(&'a [f32]),
    Logits(&'a [f32]),
}

pub struct Problem<'a> {
    pub sh: AttnShape,
    pub scale: f32,
    pub causal: bool,
    pub valid: Option<&'a [i32]>,
    pub cond: Cond<'a>,
}

pub struct Forward {
    pub o: Vec<f32>,
    pub lse: Vec<f32>,
    pub probs: Option<Vec<f32>>,
}

pub struct Grads {
    pub dq: Vec<f32>,
    pub dk: Vec<f32>,
    pub dv: Vec<f32>,
    pub dw: Option<Vec<f32>>,
}

/// A strided matrix operand: element (r, c) at ptr[r·rs + c·cs].
#[derive(Clone, Copy)]
struct Mat {
    ptr: *const f32,
    rs: isize,
    cs: isize,
}

/// The destination of a product: rows of `rs` floats; `accumulate` adds to what is there.
struct Dst {
    ptr: *mut f32,
    rs: usize,
    accumulate: bool,
}

/// Per key: (additive bias, logit multiplier, ln(w + eps)).
type KeyTerms = (Vec<f32>, Vec<f32>, Vec<f32>);

/// A block of query rows [i0, i0 + rows) of head (b, h), which sees keys [0, kn).
struct Block {
    b: usize,
    h: usize,
    i0: usize,
    rows: usize,
    kn: usize,
}

/// dst = [dst +] a (m x k) · b (k x n), single-threaded.
///
/// The gemm crate's microkernels tile the rows of C by 32 or 64, so attention's short sides
/// (18 text tokens) waste most of a tile as rows; when m < n the transposed product
/// Cᵀ = Bᵀ·Aᵀ is computed instead (only strides change, C is written in place).
///
/// SAFETY: a, b address m x k and k x n elements inside live slices; dst holds m rows of n.
unsafe fn mm((m, n, k): (usize, usize, usize), dst: Dst, a: Mat, b: Mat) {
    if m == 0 || n == 0 {
        return;
    }
    let (dst_rs, dst_cs) = (dst.rs as isize, 1isize);
    let (m, n, dst_rs, dst_cs, a, b) = if m < n {
        let t = |x: Mat| Mat { ptr: x.ptr, rs: x.cs, cs: x.rs };
        (n, m, dst_cs, dst_rs, t(b), t(a))
    } else {
        (m, n, dst_rs, dst_cs, a, b)
    };
    gemm::gemm(
        m,
        n,
        k,
        dst.ptr,
        dst_cs,
        dst_rs,
        dst.accumulate,
        a.ptr,
        a.cs,
        a.rs,
        b.ptr,
        b.cs,
        b.rs,
        1.0,
        1.0,
        false,
        false,
        false,
        Parallelism::None,
    )
}

impl Problem<'_> {
    /// Per key of batch row b: (additive bias, logit multiplier, ln(w + eps) or 0); bias −inf =
    /// key not taken.
    fn key_terms(&self, b: usize) -> KeyTerms {
        let s = self.sh.s;
        let mut bias = vec![0.0f32; s];
        let mut mult = vec![1.0f32; s];
        let lnw: Vec<f32> = match self.cond {
            Cond::Probs(w) => w[b * s..(b + 1) * s].iter().map(|&x| (x + COND_EPS).ln()).collect(),
            _ => vec![0.0; s],
        };
        for j in 0..s {
            if self.valid.is_some_and(|v| v[b * s + j] == 0) {
                bias[j] = f32::NEG_INFINITY;
                continue;
            }
            match self.cond {
                Cond::None => {}
                Cond::Probs(_) => bias[j] = lnw[j],
                Cond::Logits(w) => mult[j] = w[b * s + j],
            }
        }
        (bias, mult, lnw)
    }

    /// Keys a query block [i0, i1) can see.
    fn key_end(&self, i1: usize) -> usize {
        if self.causal {
            self.sh.s.min(i1)
        } else {
            self.sh.s
        }
    }

    /// Raw products t[r][j] = ⟨q_{i0+r}, k_j⟩ of a block into buf (row stride S).
    fn dots(&self, q: &[f32], k: &[f32], bl: &Block, buf: &mut [f32]) {
        let AttnShape { tq, s, dh, .. } = self.sh;
        let e = self.sh.e();
        let qa = Mat { ptr: q[(bl.b * tq + bl.i0) * e + bl.h * dh..].as_ptr(), rs: e as isize, cs: 1 };
        let kt = Mat { ptr: k[bl.b * s * e + bl.h * dh..].as_ptr(), rs: 1, cs: e as isize };
        // SAFETY: rows x dh of q and dh x kn of kᵀ lie inside q and k (shapes checked by the op);
        // buf holds rows x S >= rows x kn.
        unsafe { mm((bl.rows, bl.kn, dh), Dst { ptr: buf.as_mut_ptr(), rs: s, accumulate: false }, qa, kt) }
    }

    /// Turns the raw products of one block into logits z = t·scale·mult + bias (−inf where masked).
    fn logits(&self, buf: &mut [f32], bl: &Block, bias: &[f32], mult: &[f32]) {
        let (ld, i0, kn) = (self.sh.s, bl.i0, bl.kn);
        for r in 0..bl.rows {
            let row = &mut buf[r * ld..r * ld + kn];
            for (j, z) in row.iter_mut().enumerate() {
                *z = *z * self.scale * mult[j] + bias[j];
            }
            if self.causal {
                for z in row.iter_mut().skip(i0 + r + 1) {
                    *z = f32::NEG_INFINITY;
                }
            }
        }
    }
}

/// In place: a row of logits becomes exp(z − max); returns (max, sum). Masked entries give 0.
fn exp_row(row: &mut [f32]) -> (f32, f32) {
    let m = row.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b));
    if m == f32::NEG_INFINITY {
        row.fill(0.0);
        return (m, 0.0);
    }
    for z in row.iter_mut() {
        *z -= m;
    }
    exp_slice(row);
    (m, row.iter().sum())
}

pub fn forward(q: &[f32], k: &[f32], v: &[f32], pr: &Problem, want_probs: bool) -> Forward {
    let AttnShape { b: nb, h: nh, tq, s, dh } = pr.sh;
    let e = pr.sh.e();
    let terms: Vec<KeyTerms> = (0..nb).map(|b| pr.key_terms(b)).collect();
    // One task per (b, h): its output columns [Tq, Dh], lse [Tq] and probabilities [Tq, S].
    let parts: Vec<(Vec<f32>, Vec<f32>, Vec<f32>)> = (0..nb * nh)
        .into_par_iter()
        .map(|bh| {
            let (b, h) = (bh / nh, bh % nh);
            let (bias, mult, _) = &terms[b];
            let mut o = vec![0.0f32; tq * dh];
            let mut lse = vec![f32::NEG_INFINITY; tq];
            let mut probs = if want_probs { vec![0.0f32; tq * s] } else { Vec::new() };
            let mut buf = vec![0.0f32; QB.min(tq) * s];
            for i0 in (0..tq).step_by(QB) {
                let rows = QB.min(tq - i0);
                let kn = pr.key_end(i0 + rows);
                let bl = Block { b, h, i0, rows, kn };
                pr.dots(q, k, &bl, &mut buf);
                pr.logits(&mut buf, &bl, bias, mult);
                for r in 0..rows {
                    let row = &mut buf[r * s..r * s + kn];
                    let (m, l) = exp_row(row);
                    let inv = if l > 0.0 { 1.0 / l } else { 0.0 };
                    for x in row.iter_mut() {
                        *x *= inv;
                    }
                    lse[i0 + r] = if l > 0.0 { m + l.ln() } else { f32::NEG_INFINITY };
                    if want_probs {
                        probs[(i0 + r) * s..(i0 + r) * s + kn].copy_from_slice(row);
                    }
                }
                let pa = Mat { ptr: buf.as_ptr(), rs: s as isize, cs: 1 };
                let vb = Mat { ptr: v[b * s * e + h * dh..].as_ptr(), rs: e as isize, cs: 1 };
                // SAFETY: rows x kn probabilities in buf, kn x dh of v, rows x dh of o.
                unsafe { mm((rows, dh, kn), Dst { ptr: o[i0 * dh..].as_mut_ptr(), rs: dh, accumulate: false }, pa, vb) }
            }
            (o, lse, probs)
        })
        .collect();
    let mut out = Forward {
        o: vec![0.0; nb * tq * e],
        lse: Vec::with_capacity(nb * nh * tq),
        probs: if want_probs { Some(Vec::with_capacity(nb * nh * tq * s)) } else { None },
    };
    for (bh, (o, lse, probs)) in parts.into_iter().enumerate() {
        let (b, h) = (bh / nh, bh % nh);
        for i in 0..tq {
            out.o[(b * tq + i) * e + h * dh..][..dh].copy_from_slice(&o[i * dh..(i + 1) * dh]);
        }
        out.lse.extend_from_slice(&lse);
        if let Some(p) = &mut out.probs {
            p.extend_from_slice(&probs);
        }
    }
    out
}

pub fn backward(q: &[f32], k: &[f32], v: &[f32], o: &[f32], lse: &[f32], dout: &[f32], pr: &Problem) -> Grads {
    let AttnShape { b: nb, h: nh, tq, s, dh } = pr.sh;
    let e = pr.sh.e();
    let terms: Vec<KeyTerms> = (0..nb).map(|b| pr.key_terms(b)).collect();
    let has_w = !matches!(pr.cond, Cond::None);
    // Per (b, h): dq [Tq, Dh], dk and dv [S, Dh], dw [S] (this head's share).
    type Part = (Vec<f32>, Vec<f32>, Vec<f32>, Vec<f32>);
    let parts: Vec<Part> = (0..nb * nh)
        .into_par_iter()
        .map(|bh| {
            let (b, h) = (bh / nh, bh % nh);
            let (bias, mult, lnw) = &terms[b];
            let (mut dq, mut dk, mut dv) = (vec![0.0f32; tq * dh], vec![0.0f32; s * dh], vec![0.0f32; s * dh]);
            let mut dw = vec![0.0f32; if has_w { s } else { 0 }];
            let cap = QB.min(tq) * s;
            let (mut t, mut p, mut dp) = (vec![0.0f32; cap], vec![0.0f32; cap], vec![0.0f32; cap]);
            for i0 in (0..tq).step_by(QB) {
                let rows = QB.min(tq - i0);
                let kn = pr.key_end(i0 + rows);
                // t: raw products; p: probabilities from the saved lse; dp = dO·Vᵀ.
                let bl = Block { b, h, i0, rows, kn };
                pr.dots(q, k, &bl, &mut t);
                p[..rows * s].copy_from_slice(&t[..rows * s]);
                pr.logits(&mut p, &bl, bias, mult);
                let doa = Mat { ptr: dout[(b * tq + i0) * e + h * dh..].as_ptr(), rs: e as isize, cs: 1 };
                let vt = Mat { ptr: v[b * s * e + h * dh..].as_ptr(), rs: 1, cs: e as isize };
                // SAFETY: rows x dh of dO, dh x kn of vᵀ, rows x s buffer.
                unsafe { mm((rows, kn, dh), Dst { ptr: dp.as_mut_ptr(), rs: s, accumulate: false }, doa, vt) }
                for r in 0..rows {
                    let i = i0 + r;
                    let l = lse[(b * nh + h) * tq + i];
                    let orow = &o[(b * tq + i) * e + h * dh..][..dh];
                    let drow = &dout[(b * tq + i) * e + h * dh..][..dh];
                    let delta: f32 = orow.iter().zip(drow).map(|(x, y)| x * y).sum();
                    let (prow, trow) = (&mut p[r * s..r * s + kn], &mut t[r * s..r * s + kn]);
                    let dprow = &mut dp[r * s..r * s + kn];
                    if l == f32::NEG_INFINITY {
                        // a row with no key: no gradient anywhere
                        prow.fill(0.0);
                        dprow.fill(0.0);
                        continue;
                    }
                    // Official condition: dw_j gets p/(w_j + eps)·(dP − delta), and
                    // p/(w_j + eps) = exp(z − ln(w_j + eps) − lse), with no division by a tiny w
                    // (masked logits are −inf, so they give 0).
                    if let Cond::Probs(_) = pr.cond {
                        for j in 0..kn {
                            trow[j] = prow[j] - lnw[j] - l;
                        }
                        exp_slice(trow);
                        for j in 0..kn {
                            dw[j] += trow[j] * (dprow[j] - delta);
                        }
                    }
                    for z in prow.iter_mut() {
                        *z -= l;
                    }
                    exp_slice(prow);
                    if let Cond::Logits(_) = pr.cond {
                        // z = t·scale·w_j: dz/dw_j = t·scale
                        for j in 0..kn {
                            dw[j] += prow[j] * (dprow[j] - delta) * trow[j] * pr.scale;
                        }
                    }
                    // dp becomes dS·scale·mult: the coefficient of the q and k products.
                    for j in 0..kn {
                        dprow[j] = prow[j] * (dprow[j] - delta) * pr.scale * mult[j];
                    }
                }
                let pa_t = Mat { ptr: p.as_ptr(), rs: 1, cs: s as isize };
                let ds_t = Mat { ptr: dp.as_ptr(), rs: 1, cs: s as isize };
                let ds = Mat { ptr: dp.as_ptr(), rs: s as isize, cs: 1 };
                let qa = Mat { ptr: q[(b * tq + i0) * e + h * dh..].as_ptr(), rs: e as isize, cs: 1 };
                let ka = Mat { ptr: k[b * s * e + h * dh..].as_ptr(), rs: e as isize, cs: 1 };
                // SAFETY: every operand addresses rows x kn, kn x dh or rows x dh elements inside
                // its buffer; dv, dk hold s x dh, dq holds tq x dh.
                unsafe {
                    mm((kn, dh, rows), Dst { ptr: dv.as_mut_ptr(), rs: dh, accumulate: true }, pa_t, doa);
                    mm((kn, dh, rows), Dst { ptr: dk.as_mut_ptr(), rs: dh, accumulate: true }, ds_t, qa);
                    mm((rows, dh, kn), Dst { ptr: dq[i0 * dh..].as_mut_ptr(), rs: dh, accumulate: false }, ds, ka);
                }
            }
            (dq, dk, dv, dw)
        })
        .collect();
    let mut g = Grads {
        dq: vec![0.0; q.len()],
        dk: vec![0.0; k.len()],
        dv: vec![0.0; v.len()],
        dw: if has_w { Some(vec![0.0; nb * s]) } else { None },
    };
    for (bh, (dq, dk, dv, dw)) in parts.into_iter().enumerate() {
        let (b, h) = (bh / nh, bh % nh);
        for i in 0..tq {
            g.dq[(b * tq + i) * e + h * dh..][..dh].copy_from_slice(&dq[i * dh..(i + 1) * dh]);
        }
        for j in 0..s {
            g.dk[(b * s + j) * e + h * dh..][..dh].copy_from_slice(&dk[j * dh..(j + 1) * dh]);
            g.dv[(b * s + j) * e + h * dh..][..dh].copy_from_slice(&dv[j * dh..(j + 1) * dh]);
        }
        if let Some(w) = &mut g.dw {
            for (x, y) in w[b * s..(b + 1) * s].iter_mut().zip(&dw) {
                *x += y;
            }
        }
    }
    g
}
