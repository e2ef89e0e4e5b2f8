//! cpu PLAM gate after the 1×1 convolutions: channel-outer loops over contiguous ranges of
//! pixels (vectorisable), then the 3→6→1 MLP per pixel, each phase split over the threads by
//! pixel ranges or rows (not by image: at batch 1 that left one thread idle).

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

/// Pixels per task: one image's map is cut into ranges so that batch 1 keeps every thread busy
/// (per channel a task reads 16 KB of a row).
const PIX: usize = 4096;

/// (mean_c ReLU(A), max_c ReLU(M), argmax) of every pixel of every image ([B, HW] each), in
/// parallel over ranges of pixels; each pixel visits its channels in order.
fn features(a: &[f32], m: &[f32], b: usize, c: usize, hw: usize) -> (Vec<f32>, Vec<f32>, Vec<i32>) {
    let n = b * hw;
    let (mut sa, mut mm, mut arg) = (vec![0.0f32; n], vec![f32::NEG_INFINITY; n], vec![0i32; n]);
    sa.par_chunks_mut(hw.max(1))
        .zip(mm.par_chunks_mut(hw.max(1)))
        .zip(arg.par_chunks_mut(hw.max(1)))
        .enumerate()
        .for_each(|(i, ((sa, mm), arg))| {
            let (ai, mi) = (&a[i * c * hw..(i + 1) * c * hw], &m[i * c * hw..(i + 1) * c * hw]);
            sa.par_chunks_mut(PIX).zip(mm.par_chunks_mut(PIX)).zip(arg.par_chunks_mut(PIX)).enumerate().for_each(
                |(j, ((sa, mm), arg))| {
                    let p0 = j * PIX;
                    for ch in 0..c {
                        let (ar, mr) = (&ai[ch * hw + p0..][..sa.len()], &mi[ch * hw + p0..][..sa.len()]);
                        for p in 0..sa.len() {
                            sa[p] += ar[p].max(0.0);
                            let v = mr[p].max(0.0);
                            if v > mm[p] {
                                mm[p] = v;
                                arg[p] = ch as i32;
                            }
                        }
                    }
                    sa.iter_mut().for_each(|v| *v /= c as f32);
                },
            );
        });
    (sa, mm, arg)
}

/// out[i, ch, p] = f[i, p] · x[i, ch, p] over every row of x [B, C, HW], rows in parallel.
fn scale_rows(f: &[f32], x: &[f32], c: usize, hw: usize) -> Vec<f32> {
    let mut out = vec![0.0f32; x.len()];
    out.par_chunks_mut(hw.max(1)).zip(x.par_chunks(hw.max(1))).enumerate().for_each(|(r, (o, xr))| {
        let fi = &f[(r / c.max(1)) * hw..][..hw];
        for p in 0..hw {
            o[p] = fi[p] * xr[p];
        }
    });
    out
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
    let (fa, fm, arg) = features(a, m, b, c, hw);
    let g: Vec<f32> = fa.par_iter().zip(fm.par_iter()).map(|(&x, &y)| gate(fc, [x, y, x + y]).0).collect();
    (scale_rows(&g, s, c, hw), g, arg)
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
    // every phase runs over all the threads at any batch (the gate is per pixel, its products
    // per row): the features before a and m are overwritten
    let (fa, fm, arg) = features(a, m, b, c, hw);
    // dg = Σ_ch dout·s per pixel, channels in order
    let mut dg = vec![0.0f32; b * hw];
    dg.par_chunks_mut(hw.max(1)).enumerate().for_each(|(i, dgi)| {
        dgi.par_chunks_mut(PIX).enumerate().for_each(|(j, d)| {
            for ch in 0..c {
                let off = i * c * hw + ch * hw + j * PIX;
                let (dr, sr) = (&dout[off..][..d.len()], &s[off..][..d.len()]);
                for p in 0..d.len() {
                    d[p] += dr[p] * sr[p];
                }
            }
        })
    });
    let ds = scale_rows(g, dout, c, hw);
    // per pixel: the gate's parameter gradients (f64 sums per range, then over ranges) and the
    // gradients reaching mean ReLU(A) and max ReLU(M)
    let (mut dav, mut dmv) = (vec![0.0f32; b * hw], vec![0.0f32; b * hw]);
    let parts: Vec<Vec<f64>> = dav
        .par_chunks_mut(PIX)
        .zip(dmv.par_chunks_mut(PIX))
        .enumerate()
        .map(|(j, (dav, dmv))| {
            let mut acc = vec![0.0f64; 31];
            for (k, q) in (j * PIX..j * PIX + dav.len()).enumerate() {
                let f = [fa[q], fm[q], fa[q] + fm[q]];
                let (_, z) = gate(fc, f);
                let mut df = [0.0f32; 3];
                for jj in 0..6 {
                    acc[24 + jj] += (dg[q] * z[jj].max(0.0)) as f64;
                    let dz = if z[jj] > 0.0 { dg[q] * fc.w2[jj] } else { 0.0 };
                    for kk in 0..3 {
                        acc[jj * 3 + kk] += (dz * f[kk]) as f64;
                        df[kk] += dz * fc.w1[jj * 3 + kk];
                    }
                    acc[18 + jj] += dz as f64;
                }
                acc[30] += dg[q] as f64;
                dav[k] = (df[0] + df[2]) / c as f32;
                dmv[k] = df[1] + df[2];
            }
            acc
        })
        .collect();
    // dA and dM over a and m, rows in parallel
    a.par_chunks_mut(hw.max(1)).zip(m.par_chunks_mut(hw.max(1))).enumerate().for_each(|(r, (ar, mr))| {
        let (i, ch) = (r / c.max(1), r % c.max(1));
        let (dav, dmv, arg) = (&dav[i * hw..][..hw], &dmv[i * hw..][..hw], &arg[i * hw..][..hw]);
        for p in 0..hw {
            ar[p] = if ar[p] > 0.0 { dav[p] } else { 0.0 };
            mr[p] = if arg[p] == ch as i32 && mr[p] > 0.0 { dmv[p] } else { 0.0 };
        }
    });
    let fcg = (0..31).map(|k| parts.iter().map(|p| p[k]).sum::<f64>() as f32).collect();
    (ds, fcg)
}
