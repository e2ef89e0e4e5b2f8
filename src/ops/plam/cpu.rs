//! cpu PLAM gate after the 1×1 convolutions: per image, channel-outer loops over contiguous rows
//! of pixels (vectorisable), then the 3→6→1 MLP per pixel.

use super::PlamWeights;
use crate::error::Result;
use rayon::prelude::*;

/// The gate MLP's 31 parameters on the host.
pub struct Fc {
    w1: Vec<f32>,
    b1: Vec<f32>,
    w2: Vec<f32>,
    b2: f32,
}

impl Fc {
    pub fn read(w: &PlamWeights) -> Result<Fc> {
        Ok(Fc { w1: w.fc1_w.to_vec()?, b1: w.fc1_b.to_vec()?, w2: w.fc2_w.to_vec()?, b2: w.fc2_b.to_vec()?[0] })
    }
}

/// (mean_c ReLU(A), max_c ReLU(M), argmax) of one image's pixels.
fn features(a: &[f32], m: &[f32], c: usize, hw: usize) -> (Vec<f32>, Vec<f32>, Vec<i32>) {
    let (mut sa, mut mm, mut arg) = (vec![0.0f32; hw], vec![f32::NEG_INFINITY; hw], vec![0i32; hw]);
    for ch in 0..c {
        let (ar, mr) = (&a[ch * hw..(ch + 1) * hw], &m[ch * hw..(ch + 1) * hw]);
        for p in 0..hw {
            sa[p] += ar[p].max(0.0);
            let v = mr[p].max(0.0);
            if v > mm[p] {
                mm[p] = v;
                arg[p] = ch as i32;
            }
        }
    }
    sa.iter_mut().for_each(|v| *v /= c as f32);
    (sa, mm, arg)
}

/// (out, g, arg)
pub fn forward(
    a: &[f32],
    m: &[f32],
    s: &[f32],
    fc: &Fc,
    b: usize,
    c: usize,
    hw: usize,
) -> (Vec<f32>, Vec<f32>, Vec<i32>) {
    let mut out = vec![0.0f32; s.len()];
    let per: Vec<(Vec<f32>, Vec<i32>)> = out
        .par_chunks_mut(c * hw)
        .enumerate()
        .map(|(i, o)| {
            let r = i * c * hw..(i + 1) * c * hw;
            let (fa, fm, arg) = features(&a[r.clone()], &m[r.clone()], c, hw);
            let g: Vec<f32> = fa.iter().zip(&fm).map(|(&x, &y)| gate(fc, [x, y, x + y]).0).collect();
            for ch in 0..c {
                for p in 0..hw {
                    o[ch * hw + p] = g[p] * s[r.start + ch * hw + p];
                }
            }
            (g, arg)
        })
        .collect();
    let _ = b;
    let (g, arg): (Vec<Vec<f32>>, Vec<Vec<i32>>) = per.into_iter().unzip();
    (out, g.concat(), arg.concat())
}

/// (g, the six pre-activations)
fn gate(fc: &Fc, f: [f32; 3]) -> (f32, [f32; 6]) {
    let mut z = [0.0f32; 6];
    let mut g = fc.b2;
    for (j, zj) in z.iter_mut().enumerate() {
        *zj = fc.w1[j * 3] * f[0] + fc.w1[j * 3 + 1] * f[1] + fc.w1[j * 3 + 2] * f[2] + fc.b1[j];
        g += fc.w2[j] * zj.max(0.0);
    }
    (g, z)
}

/// (ds direct, the 31 gate-parameter gradients); dA and dM are written over `a` and `m` (each
/// element of a and m is read before its own gradient replaces it: the backward's working set
/// at the decoder's full resolution is two tensors smaller).
#[allow(clippy::too_many_arguments)]
pub fn backward(
    a: &mut [f32],
    m: &mut [f32],
    s: &[f32],
    dout: &[f32],
    g: &[f32],
    fc: &Fc,
    b: usize,
    c: usize,
    hw: usize,
) -> (Vec<f32>, Vec<f32>) {
    let n = c * hw;
    let mut ds = vec![0.0f32; s.len()];
    let parts: Vec<Vec<f64>> = ds
        .par_chunks_mut(n)
        .zip(a.par_chunks_mut(n))
        .zip(m.par_chunks_mut(n))
        .enumerate()
        .map(|(i, ((dsi, ai), mi))| {
            let r = i * n..(i + 1) * n;
            let (si, di, gi) = (&s[r.clone()], &dout[r], &g[i * hw..(i + 1) * hw]);
            let (fa, fm, arg) = features(ai, mi, c, hw);
            let mut dg = vec![0.0f32; hw];
            for ch in 0..c {
                for p in 0..hw {
                    dg[p] += di[ch * hw + p] * si[ch * hw + p];
                    dsi[ch * hw + p] = gi[p] * di[ch * hw + p];
                }
            }
            let mut acc = vec![0.0f64; 31];
            let (mut dav, mut dmv) = (vec![0.0f32; hw], vec![0.0f32; hw]);
            for p in 0..hw {
                let f = [fa[p], fm[p], fa[p] + fm[p]];
                let (_, z) = gate(fc, f);
                let mut df = [0.0f32; 3];
                for j in 0..6 {
                    acc[24 + j] += (dg[p] * z[j].max(0.0)) as f64;
                    let dz = if z[j] > 0.0 { dg[p] * fc.w2[j] } else { 0.0 };
                    for k in 0..3 {
                        acc[j * 3 + k] += (dz * f[k]) as f64;
                        df[k] += dz * fc.w1[j * 3 + k];
                    }
                    acc[18 + j] += dz as f64;
                }
                acc[30] += dg[p] as f64;
                dav[p] = (df[0] + df[2]) / c as f32;
                dmv[p] = df[1] + df[2];
            }
            for ch in 0..c {
                for p in 0..hw {
                    let e = ch * hw + p;
                    ai[e] = if ai[e] > 0.0 { dav[p] } else { 0.0 };
                    mi[e] = if arg[p] == ch as i32 && mi[e] > 0.0 { dmv[p] } else { 0.0 };
                }
            }
            acc
        })
        .collect();
    let _ = b;
    let fcg = (0..31).map(|k| parts.iter().map(|p| p[k]).sum::<f64>() as f32).collect();
    (ds, fcg)
}
