//! cpu batch norm: rayon over channels for the statistics and the per-channel sums (f64
//! accumulators: one channel sums B·H·W values), rayon over (image, channel) planes for the
//! elementwise passes.

use super::BnOpts;
use crate::ops::cpu_math::multiversion;
use rayon::prelude::*;

type Dims = (usize, usize, usize);

multiversion! {
    /// Σ (x − m) over a plane, or Σ (x − m)² with `square` (16 f32 lanes; the planes' sums are
    /// added in f64 by the caller).
    fn plane_dev_sum(x: &[f32], m: f32, square: bool) -> f32 {
        let mut acc = [0.0f32; 16];
        let c = x.chunks_exact(16);
        let tail = c.remainder();
        for xs in c {
            for l in 0..16 {
                let d = xs[l] - m;
                acc[l] += if square { d * d } else { d };
            }
        }
        acc.iter().sum::<f32>() + tail.iter().map(|&v| if square { (v - m) * (v - m) } else { v - m }).sum::<f32>()
    }
}

/// (y, mean, var, new running mean, new running var)
#[allow(clippy::type_complexity)]
pub fn forward(
    x: &[f32],
    gamma: &[f32],
    beta: &[f32],
    rm: &[f32],
    rv: &[f32],
    d: Dims,
    o: BnOpts,
) -> (Vec<f32>, Vec<f32>, Vec<f32>, Vec<f32>, Vec<f32>) {
    let (b, c, s) = d;
    let n = (b * s) as f64;
    let (mean, var, nrm, nrv) = if o.train {
        let stats: Vec<(f32, f32)> = (0..c)
            .into_par_iter()
            .map(|ch| {
                let planes = (0..b).map(|i| &x[(i * c + ch) * s..(i * c + ch + 1) * s]);
                let m = planes.clone().map(|p| plane_dev_sum(p, 0.0, false) as f64).sum::<f64>() / n;
                let v = planes.map(|p| plane_dev_sum(p, m as f32, true) as f64).sum::<f64>() / n;
                (m as f32, v as f32)
            })
            .collect();
        let mean: Vec<f32> = stats.iter().map(|s| s.0).collect();
        let var: Vec<f32> = stats.iter().map(|s| s.1).collect();
        let m = o.momentum;
        let unb = if n > 1.0 { n / (n - 1.0) } else { 1.0 } as f32;
        let nrm = rm.iter().zip(&mean).map(|(r, v)| (1.0 - m) * r + m * v).collect();
        let nrv = rv.iter().zip(&var).map(|(r, v)| (1.0 - m) * r + m * v * unb).collect();
        (mean, var, nrm, nrv)
    } else {
        (rm.to_vec(), rv.to_vec(), rm.to_vec(), rv.to_vec())
    };
    // one plane per chunk, written once (no zeroing pass)
    let y = crate::ops::cpu_math::par_new(x.len(), s, |plane, yp| {
        let f = channel_apply((gamma, beta), (&mean, &var), plane % c, o);
        for (o_, &v) in yp.iter_mut().zip(&x[plane * s..(plane + 1) * s]) {
            o_.write(f(v));
        }
    });
    (y, mean, var, nrm, nrv)
}

/// Channel ch's normalisation as a function of x: (ReLU) x·scale + shift with scale =
/// γ/√(var + ε), shift = β − mean·scale. `forward` and the in-place evaluation share it, so
/// both give the same bits.
#[inline(always)]
fn channel_apply(
    (gamma, beta): (&[f32], &[f32]),
    (mean, var): (&[f32], &[f32]),
    ch: usize,
    o: BnOpts,
) -> impl Fn(f32) -> f32 {
    let scale = gamma[ch] / (var[ch] + o.eps).sqrt();
    let shift = beta[ch] - mean[ch] * scale;
    move |v| {
        let r = v * scale + shift;
        if o.relu && r < 0.0 {
            0.0
        } else {
            r
        }
    }
}

/// Evaluation-mode (ReLU) x·scale + shift written over x: `forward`'s per-element arithmetic
/// with the running statistics, plane by plane over the threads (one type-erased loop: no
/// generic rayon loop in reclmis-infer).
pub fn apply_eval_in_place(x: &mut [f32], gamma: &[f32], beta: &[f32], rm: &[f32], rv: &[f32], d: Dims, o: BnOpts) {
    let (b, c, s) = d;
    assert!(x.len() == b * c * s && [gamma, beta, rm, rv].iter().all(|p| p.len() == c), "batch norm: x [B, C, S]");
    let xp = crate::ops::cpu_math::SendPtr(x.as_mut_ptr());
    crate::ops::cpu_math::par_tasks(b * c, &|plane| {
        let f = channel_apply((gamma, beta), (rm, rv), plane % c, o);
        // SAFETY: task `plane` alone writes floats [plane·s, (plane + 1)·s) of x.
        let p = unsafe { std::slice::from_raw_parts_mut(xp.get().add(plane * s), s) };
        for v in p {
            *v = f(*v);
        }
    });
}

multiversion! {
    /// (Σ g, Σ g·(x − mean)) over one plane, g = dy masked by y > 0 when the ReLU was fused.
    /// 16-lane arrays (`as_chunks`: no bounds checks in the loop) and the ReLU test outside it, so
    /// it vectorises: with slices from `chunks_exact` and `relu &&` inside, LLVM compiled every lane
    /// as scalar code with a branch, 4x the time of `plane_dx`, which reads as much.
    fn plane_sums(x: &[f32], y: &[f32], dy: &[f32], mean: f32, relu: bool) -> (f32, f32) {
        let (mut sg, mut sgx) = ([0.0f32; 16], [0.0f32; 16]);
        let ((xc, xt), (yc, yt), (gc, gt)) = (x.as_chunks::<16>(), y.as_chunks::<16>(), dy.as_chunks::<16>());
        if relu {
            for ((xs, ys), gs) in xc.iter().zip(yc).zip(gc) {
                for l in 0..16 {
                    // both values read first: a select, not a branch around a load
                    let (gv, yv) = (gs[l], ys[l]);
                    let g = if yv <= 0.0 { 0.0 } else { gv };
                    sg[l] += g;
                    sgx[l] += g * (xs[l] - mean);
                }
            }
        } else {
            for (xs, gs) in xc.iter().zip(gc) {
                for l in 0..16 {
                    sg[l] += gs[l];
                    sgx[l] += gs[l] * (xs[l] - mean);
                }
            }
        }
        let (mut a, mut b) = (sg.iter().sum::<f32>(), sgx.iter().sum::<f32>());
        for ((&xv, &yv), &gv) in xt.iter().zip(yt).zip(gt) {
            let g = if relu && yv <= 0.0 { 0.0 } else { gv };
            a += g;
            b += g * (xv - mean);
        }
        (a, b)
    }
}

multiversion! {
    /// dx over one plane: k1·g − k0 − k2·(x − mean) (training) or k1·g (evaluation).
    fn plane_dx(x: &[f32], y: &[f32], dy: &[f32], dx: &mut [std::mem::MaybeUninit<f32>], mean: f32, k: (f32, f32, f32), relu: bool) {
        for (((o, &xv), &yv), &gv) in dx.iter_mut().zip(x).zip(y).zip(dy) {
            let g = if relu && yv <= 0.0 { 0.0 } else { gv };
            o.write(k.1 * g - k.0 - k.2 * (xv - mean));
        }
    }
}

/// The backward's x or y: f32, or bf16 as bf16 autocast keeps them (each plane widened to f32,
/// exactly, as the planes are read).
#[derive(Clone, Copy)]
pub enum Plane<'a> {
    F32(&'a [f32]),
    Bf16(&'a [half::bf16]),
}

impl Plane<'_> {
    fn len(&self) -> usize {
        match self {
            Plane::F32(v) => v.len(),
            Plane::Bf16(v) => v.len(),
        }
    }
    /// Elements `r` in f32 (borrowed when they are f32).
    fn get(&self, r: std::ops::Range<usize>) -> std::borrow::Cow<'_, [f32]> {
        match self {
            Plane::F32(v) => std::borrow::Cow::Borrowed(&v[r]),
            Plane::Bf16(v) => std::borrow::Cow::Owned(v[r].iter().map(|h| h.to_f32()).collect()),
        }
    }
}

/// (dx, dγ, dβ)
#[allow(clippy::too_many_arguments)]
pub fn backward(
    x: Plane,
    y: Plane,
    dy: &[f32],
    mean: &[f32],
    var: &[f32],
    gamma: &[f32],
    d: Dims,
    o: BnOpts,
) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let (b, c, s) = d;
    // per channel: f32 sums per plane (vectorised), planes added in f64
    let sums: Vec<(f32, f32)> = (0..c)
        .into_par_iter()
        .map(|ch| {
            let inv = 1.0 / (var[ch] as f64 + o.eps as f64).sqrt();
            let (mut sg, mut sgx) = (0.0f64, 0.0f64);
            for i in 0..b {
                let r = (i * c + ch) * s..(i * c + ch + 1) * s;
                let (a, bb) = plane_sums(&x.get(r.clone()), &y.get(r.clone()), &dy[r], mean[ch], o.relu);
                sg += a as f64;
                sgx += bb as f64;
            }
            ((sgx * inv) as f32, sg as f32)
        })
        .collect();
    let dgamma: Vec<f32> = sums.iter().map(|v| v.0).collect();
    let dbeta: Vec<f32> = sums.iter().map(|v| v.1).collect();
    let cnt = (b * s) as f32;
    // one plane per chunk, written once (no zeroing pass)
    let dx = crate::ops::cpu_math::par_new(x.len(), s, |plane, dp| {
        let ch = plane % c;
        let inv = 1.0 / (var[ch] + o.eps).sqrt();
        // training: γ·inv/n · (n·g − dβ − x̂·dγ) = k1·g − k0 − k2·(x − mean)
        let k = if o.train {
            (gamma[ch] * inv / cnt * dbeta[ch], gamma[ch] * inv, gamma[ch] * inv * inv / cnt * dgamma[ch])
        } else {
            (0.0, gamma[ch] * inv, 0.0)
        };
        let r = plane * s..(plane + 1) * s;
        plane_dx(&x.get(r.clone()), &y.get(r.clone()), &dy[r], dp, mean[ch], k, o.relu);
    });
    (dx, dgamma, dbeta)
}
