//! Naive CCL similarity and InfoNCE in f64. Tests only.
//!
//! Shapes: t [B,L,D], v [B,N,D], mask [B,L] (0/1), tw [B,L], vw [B,N]; outputs [B,B] with rows a
//! (text) and columns b (image).

/// Row-wise L2 normalisation by the plain norm (no epsilon, as the official code), except that a
/// row of norm 0 stays 0 (the official code's 0/0 gives NaN; see the module doc of ops::ccl).
pub fn l2_normalize(x: &[f64], d: usize) -> Vec<f64> {
    x.chunks(d)
        .flat_map(|r| {
            let n = r.iter().map(|v| v * v).sum::<f64>().sqrt();
            r.iter().map(move |v| if n == 0.0 { 0.0 } else { v / n })
        })
        .collect()
}

/// The max rule: NaN wins, ties go to the lowest index (shared by every CCL path).
fn better(v: f64, i: usize, best: f64, bi: usize) -> bool {
    if v.is_nan() != best.is_nan() {
        return v.is_nan();
    }
    if v.is_nan() || v == best {
        return i < bi;
    }
    v > best
}

pub struct Sizes {
    pub b: usize,
    pub l: usize,
    pub n: usize,
    pub d: usize,
}

/// S[a,b,t,v] = <t̂_at, v̂_bv> · mask[a,t].
#[allow(clippy::too_many_arguments)]
fn similarity(th: &[f64], vh: &[f64], mask: &[f64], s: &Sizes, a: usize, b: usize, t: usize, v: usize) -> f64 {
    let (x, y) = (&th[(a * s.l + t) * s.d..][..s.d], &vh[(b * s.n + v) * s.d..][..s.d]);
    x.iter().zip(y).map(|(p, q)| p * q).sum::<f64>() * mask[a * s.l + t]
}

/// (t2v, v2t, logits, argmax over v [B,B,L], argmax over t [B,B,N]).
pub type CclRef = (Vec<f64>, Vec<f64>, Vec<f64>, Vec<usize>, Vec<usize>);

/// The forward pass; see [`CclRef`].
pub fn ccl(t: &[f64], v: &[f64], mask: &[f64], tw: &[f64], vw: &[f64], s: &Sizes) -> CclRef {
    let (th, vh) = (l2_normalize(t, s.d), l2_normalize(v, s.d));
    let (mut t2v, mut v2t) = (vec![0.0; s.b * s.b], vec![0.0; s.b * s.b]);
    let (mut av, mut at) = (vec![0; s.b * s.b * s.l], vec![0; s.b * s.b * s.n]);
    for a in 0..s.b {
        for b in 0..s.b {
            let sim: Vec<Vec<f64>> =
                (0..s.l).map(|ti| (0..s.n).map(|vi| similarity(&th, &vh, mask, s, a, b, ti, vi)).collect()).collect();
            for ti in 0..s.l {
                let mut bi = 0;
                for vi in 1..s.n {
                    if better(sim[ti][vi], vi, sim[ti][bi], bi) {
                        bi = vi;
                    }
                }
                av[(a * s.b + b) * s.l + ti] = bi;
                t2v[a * s.b + b] += tw[a * s.l + ti] * sim[ti][bi];
            }
            for vi in 0..s.n {
                let mut bi = 0;
                for ti in 1..s.l {
                    if better(sim[ti][vi], ti, sim[bi][vi], bi) {
                        bi = ti;
                    }
                }
                at[(a * s.b + b) * s.n + vi] = bi;
                v2t[a * s.b + b] += vw[b * s.n + vi] * sim[bi][vi];
            }
        }
    }
    let logits = t2v.iter().zip(&v2t).map(|(x, y)| (x + y) / 2.0).collect();
    (t2v, v2t, logits, av, at)
}

/// Gradients (dt, dv, dtw, dvw) of Σ d_t2v·t2v + Σ d_v2t·v2t, with the gradient of each max routed
/// to the argmax found by the forward pass. The normalisation's Jacobian is applied explicitly:
/// d x = (d x̂ − x̂ <x̂, d x̂>) / ‖x‖.
/// `av`, `at`: the argmaxes to route through (the reference's own, or a device's, so that a
/// near-tie resolved differently in f32 is checked on its own terms).
#[allow(clippy::too_many_arguments)]
pub fn ccl_backward(
    t: &[f64],
    v: &[f64],
    mask: &[f64],
    tw: &[f64],
    vw: &[f64],
    s: &Sizes,
    d_t2v: &[f64],
    d_v2t: &[f64],
    av: &[usize],
    at: &[usize],
) -> (Vec<f64>, Vec<f64>, Vec<f64>, Vec<f64>) {
    let (th, vh) = (l2_normalize(t, s.d), l2_normalize(v, s.d));
    let (dth, dvh, dtw, dvw) = ccl_backward_unit(&th, &vh, mask, tw, vw, s, d_t2v, d_v2t, av, at);
    (l2_normalize_backward(t, &dth, s.d), l2_normalize_backward(v, &dvh, s.d), dtw, dvw)
}

/// The same gradients w.r.t. the unit vectors t̂ = `th`, v̂ = `vh` (before the normalisation's
/// Jacobian).
#[allow(clippy::too_many_arguments)]
pub fn ccl_backward_unit(
    th: &[f64],
    vh: &[f64],
    mask: &[f64],
    tw: &[f64],
    vw: &[f64],
    s: &Sizes,
    d_t2v: &[f64],
    d_v2t: &[f64],
    av: &[usize],
    at: &[usize],
) -> (Vec<f64>, Vec<f64>, Vec<f64>, Vec<f64>) {
    let (mut dth, mut dvh) = (vec![0.0; th.len()], vec![0.0; vh.len()]);
    let (mut dtw, mut dvw) = (vec![0.0; tw.len()], vec![0.0; vw.len()]);
    for a in 0..s.b {
        for b in 0..s.b {
            for ti in 0..s.l {
                let vi = av[(a * s.b + b) * s.l + ti];
                dtw[a * s.l + ti] += d_t2v[a * s.b + b] * similarity(th, vh, mask, s, a, b, ti, vi);
                let c = d_t2v[a * s.b + b] * tw[a * s.l + ti] * mask[a * s.l + ti];
                for k in 0..s.d {
                    dth[(a * s.l + ti) * s.d + k] += c * vh[(b * s.n + vi) * s.d + k];
                    dvh[(b * s.n + vi) * s.d + k] += c * th[(a * s.l + ti) * s.d + k];
                }
            }
            for vi in 0..s.n {
                let ti = at[(a * s.b + b) * s.n + vi];
                dvw[b * s.n + vi] += d_v2t[a * s.b + b] * similarity(th, vh, mask, s, a, b, ti, vi);
                let c = d_v2t[a * s.b + b] * vw[b * s.n + vi] * mask[a * s.l + ti];
                for k in 0..s.d {
                    dth[(a * s.l + ti) * s.d + k] += c * vh[(b * s.n + vi) * s.d + k];
                    dvh[(b * s.n + vi) * s.d + k] += c * th[(a * s.l + ti) * s.d + k];
                }
            }
        }
    }
    (dth, dvh, dtw, dvw)
}

pub fn l2_normalize_backward(x: &[f64], dy: &[f64], d: usize) -> Vec<f64> {
    let mut dx = vec![0.0; x.len()];
    for ((xr, gr), out) in x.chunks(d).zip(dy.chunks(d)).zip(dx.chunks_mut(d)) {
        let n = xr.iter().map(|v| v * v).sum::<f64>().sqrt();
        // a zero row: its output is constant 0, so it receives no gradient
        if n == 0.0 {
            continue;
        }
        let dot: f64 = xr.iter().zip(gr).map(|(a, b)| a / n * b).sum();
        for ((o, &xv), &g) in out.iter_mut().zip(xr).zip(gr) {
            *o = (g - xv / n * dot) / n;
        }
    }
    dx
}

/// Symmetric InfoNCE: ½ [CE(s·M) + CE(s·Mᵀ)], CE(X) = mean_i −log_softmax_row(X)[i,i].
/// Returns (loss, CE rows, CE columns).
pub fn info_nce(logits: &[f64], b: usize, scale: f64) -> (f64, f64, f64) {
    let ce = |get: &dyn Fn(usize, usize) -> f64| -> f64 {
        (0..b)
            .map(|i| {
                let row: Vec<f64> = (0..b).map(|j| scale * get(i, j)).collect();
                // −log_softmax(row)[i] = (m − row[i]) + ln(1 + Σ_{j≠k} exp(row[j] − m)), k the
                // argmax: never lse − row[i], two numbers near m whose difference loses eps·|m|
                // absolute when the loss is tiny (a saturated softmax; the finite differences of
                // the gradient tests divide that by their step and read it as gradient).
                let k = (0..b).fold(0, |k, j| if row[j] > row[k] { j } else { k });
                let m = row[k];
                let rest: f64 = (0..b).filter(|&j| j != k).map(|j| (row[j] - m).exp()).sum();
                (m - row[i]) + rest.ln_1p()
            })
            .sum::<f64>()
            / b as f64
    };
    let r = ce(&|i, j| logits[i * b + j]);
    let c = ce(&|i, j| logits[j * b + i]);
    ((r + c) / 2.0, r, c)
}

/// The official CCL loss in f64: tw = softmax(W_woi), vw = softmax(W_poi) (row-wise), the
/// similarity, then InfoNCE with s = exp(logit_scale).
#[allow(clippy::too_many_arguments)]
pub fn ccl_loss(t: &[f64], v: &[f64], mask: &[f64], w_woi: &[f64], w_poi: &[f64], s: &Sizes, logit_scale: f64) -> f64 {
    let softmax_rows = |x: &[f64], k: usize| -> Vec<f64> {
        x.chunks(k)
            .flat_map(|r| {
                let m = r.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                let z: f64 = r.iter().map(|v| (v - m).exp()).sum();
                r.iter().map(move |v| (v - m).exp() / z)
            })
            .collect()
    };
    let (tw, vw) = (softmax_rows(w_woi, s.l), softmax_rows(w_poi, s.n));
    let (_, _, logits, _, _) = ccl(t, v, mask, &tw, &vw, s);
    info_nce(&logits, s.b, logit_scale.exp()).0
}
