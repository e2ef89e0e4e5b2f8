//! cpu losses: rayon over samples (or chunks), 16-lane f32 sums per 4096-element chunk with the
//! chunk totals added in f64, and the vectorisable exp / log1p of `cpu_math`.

use crate::ops::cpu_math::{self, multiversion};
use rayon::prelude::*;

const CHUNK: usize = 4096;

/// −log σ(z), clamped at 100 as the official log is clamped at −100.
#[inline(always)]
fn neg_log_sigmoid(z: f32) -> f32 {
    ((-z).max(0.0) + cpu_math::log1p_unit(cpu_math::exp(-z.abs()))).min(100.0)
}

multiversion! {
    /// (Σ p·g, Σ p², Σ g², Σ bce) over one chunk, p = σ(z).
    fn dice_bce_sums(z: &[f32], g: &[f32]) -> [f32; 4] {
        let mut acc = [[0.0f32; 16]; 4];
        let (zc, gc) = (z.chunks_exact(16), g.chunks_exact(16));
        let tail: Vec<(f32, f32)> = zc.remainder().iter().copied().zip(gc.remainder().iter().copied()).collect();
        for (zs, gs) in zc.zip(gc) {
            for l in 0..16 {
                let (x, t) = (zs[l], gs[l]);
                let q = 1.0 / (1.0 + cpu_math::exp(-x));
                acc[0][l] += q * t;
                acc[1][l] += q * q;
                acc[2][l] += t * t;
                acc[3][l] += t * neg_log_sigmoid(x) + (1.0 - t) * neg_log_sigmoid(-x);
            }
        }
        let mut out = [0.0f32; 4];
        for k in 0..4 {
            out[k] = acc[k].iter().sum();
        }
        for (x, t) in tail {
            let q = 1.0 / (1.0 + cpu_math::exp(-x));
            out[0] += q * t;
            out[1] += q * q;
            out[2] += t * t;
            out[3] += t * neg_log_sigmoid(x) + (1.0 - t) * neg_log_sigmoid(-x);
        }
        out
    }
}

/// (per_sample [B,4], [dice, bce, criterion]); see `loss::SegLoss`.
pub fn dice_bce(z: &[f32], g: &[f32], b: usize, p: usize) -> (Vec<f32>, [f32; 3]) {
    let sums: Vec<[f64; 4]> = (0..b)
        .into_par_iter()
        .map(|s| {
            let (zs, gs) = (&z[s * p..(s + 1) * p], &g[s * p..(s + 1) * p]);
            zs.par_chunks(CHUNK)
                .zip(gs.par_chunks(CHUNK))
                .map(|(zc, gc)| dice_bce_sums(zc, gc).map(|x| x as f64))
                .reduce(|| [0.0; 4], |a, c| [a[0] + c[0], a[1] + c[1], a[2] + c[2], a[3] + c[3]])
        })
        .collect();
    let mut per = Vec::with_capacity(b * 4);
    let (mut dice, mut bce) = (0.0f64, 0.0f64);
    for s in &sums {
        let (inter, uni) = (0.25 * s[0], 0.25 * (s[1] + s[2]));
        let d = 1.0 - (2.0 * inter + 1e-5) / (uni + 1e-5);
        per.extend([inter as f32, uni as f32, d as f32, s[3] as f32]);
        dice += d;
        bce += s[3];
    }
    let (dice, bce) = (dice / b as f64, bce / (b * p) as f64);
    (per, [dice as f32, bce as f32, (0.5 * dice + 0.5 * bce) as f32])
}

multiversion! {
    /// dx over one chunk of one sample; `inter`, `den` = ¼Σpg and ¼(Σp² + Σg²) + ε of the sample.
    fn dice_bce_grad_chunk(z: &[f32], g: &[f32], dx: &mut [f32], inter: f32, den: f32, wd: f32, wb: f32) {
        for ((o, &x), &t) in dx.iter_mut().zip(z).zip(g) {
            // 1 − q as σ(−z): forming it from q would cancel to a few bits for large z
            let (q, qn) = (1.0 / (1.0 + cpu_math::exp(-x)), 1.0 / (1.0 + cpu_math::exp(x)));
            let dq = -(0.5 * t * den - (2.0 * inter + 1e-5) * 0.5 * q) / (den * den);
            let dpos = if neg_log_sigmoid(x) < 100.0 { -qn } else { 0.0 };
            let dneg = if neg_log_sigmoid(-x) < 100.0 { q } else { 0.0 };
            *o = wd * dq * q * qn + wb * (t * dpos + (1.0 - t) * dneg);
        }
    }
}

pub fn dice_bce_backward(z: &[f32], g: &[f32], per: &[f32], b: usize, p: usize, scale: f32) -> Vec<f32> {
    let mut dx = vec![0.0f32; z.len()];
    let (wd, wb) = (0.5 * scale / b as f32, 0.5 * scale / (b as f32 * p as f32));
    dx.par_chunks_mut(p).enumerate().for_each(|(s, ds)| {
        let (inter, den) = (per[s * 4], per[s * 4 + 1] + 1e-5);
        let (zs, gs) = (&z[s * p..(s + 1) * p], &g[s * p..(s + 1) * p]);
        ds.par_chunks_mut(CHUNK)
            .zip(zs.par_chunks(CHUNK))
            .zip(gs.par_chunks(CHUNK))
            .for_each(|((o, zc), gc)| dice_bce_grad_chunk(zc, gc, o, inter, den, wd, wb));
    });
    dx
}

/// (per_image [B,4], [mean dice, mean iou, mean hard dice]); see `loss::Metrics`.
pub fn metrics(probs: &[f32], g: &[f32], b: usize, p: usize) -> (Vec<f32>, [f32; 3]) {
    let per: Vec<[f64; 3]> = (0..b)
        .into_par_iter()
        .map(|s| {
            let (mut inter, mut sg, mut sy, mut uni) = (0u64, 0u64, 0u64, 0u64);
            for (&x, &t) in probs[s * p..(s + 1) * p].iter().zip(&g[s * p..(s + 1) * p]) {
                let (y, t) = (x > 0.5, t > 0.5);
                inter += (y && t) as u64;
                sg += t as u64;
                sy += y as u64;
                uni += (y || t) as u64;
            }
            let (i, sg, sy, u) = (inter as f64, sg as f64, sy as f64, uni as f64);
            let dice = 2.0 * i / (sg + sy + 1e-5);
            let iou = if u > 0.0 { i / u } else { 0.0 };
            let hard = (0.5 * i + 1e-5) / (0.25 * (sg + sy) + 1e-5);
            [dice, iou, hard]
        })
        .collect();
    let mut mean = [0.0f64; 3];
    let mut flat = Vec::with_capacity(b * 4);
    for r in &per {
        for k in 0..3 {
            mean[k] += r[k] / b as f64;
        }
        flat.extend([r[0] as f32, r[1] as f32, r[2] as f32, 0.0]);
    }
    (flat, mean.map(|m| m as f32))
}

multiversion! {
    fn sq_diff_sum(x: &[f32], y: &[f32]) -> f32 {
        let mut acc = [0.0f32; 16];
        let (xc, yc) = (x.chunks_exact(16), y.chunks_exact(16));
        let tail: f32 = xc.remainder().iter().zip(yc.remainder()).map(|(a, b)| (a - b) * (a - b)).sum();
        for (xs, ys) in xc.zip(yc) {
            for l in 0..16 {
                let e = xs[l] - ys[l];
                acc[l] += e * e;
            }
        }
        acc.iter().sum::<f32>() + tail
    }
}

pub fn mse(x: &[f32], y: &[f32]) -> f32 {
    let s: f64 = x.par_chunks(CHUNK).zip(y.par_chunks(CHUNK)).map(|(a, b)| sq_diff_sum(a, b) as f64).sum();
    (s / x.len() as f64) as f32
}

pub fn mse_backward(x: &[f32], y: &[f32], scale: f32) -> (Vec<f32>, Vec<f32>) {
    let k = 2.0 * scale / x.len() as f32;
    let dx: Vec<f32> = x.par_iter().zip(y).map(|(a, b)| k * (a - b)).collect();
    let dy = dx.par_iter().map(|d| -d).collect();
    (dx, dy)
}
