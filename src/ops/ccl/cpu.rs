//! Fused cpu CCL. Forward: blocks of text × image samples (in parallel); each block's similarities
//! come from one GEMM (through the `gemm` crate) into a per-task slab that is reduced at once to
//! the maxima over v and over t; the B×B×L×N tensor never exists (per task: 32L × 4N floats).
//! Padded words (mask 0) stay out of the GEMM when the inputs are finite: their similarities are
//! exactly ±0. Backward: only the argmax pairs are touched, so it costs O(B²(L+N)D) instead of
//! the composed version's two more B·L × B·N × D GEMMs.

use super::CclSizes;
use crate::ops::cpu_math::{self, multiversion};
use gemm::Parallelism;
use rayon::prelude::*;

/// Text samples per block of the backward's text side (its accumulators, CHUNK·L·D floats, stay
/// in L2).
const CHUNK: usize = 8;
/// Texts × images per block of the forward: one GEMM of (32L × D)·(D × 4N) = 576 × 784 × 512 at the
/// official size, large enough for the gemm crate to run near peak and packing each image block
/// once; its slab (1.8 MB) stays in L2. Measured on the 2-core dev machine: 32 × 4 11.8 ms,
/// 32 × 8 11.5 ms, 16 × 4 12.9 ms, 8 × 8 15.5 ms.
const A_CHUNK: usize = 32;
const B_CHUNK: usize = 4;

pub fn l2_normalize(x: &[f32], d: usize) -> (Vec<f32>, Vec<f32>) {
    if d == 0 {
        return (Vec::new(), Vec::new());
    }
    // a zero (or underflowing) row: inverse norm 0, so the row stays 0 and gets no gradient
    let inv: Vec<f32> = x
        .par_chunks(d)
        .map(|row| {
            let s = row_dot(row, row);
            if s == 0.0 {
                0.0
            } else {
                1.0 / s.sqrt()
            }
        })
        .collect();
    // 64 rows per task, written without a zeroing pass
    let y = cpu_math::par_new(x.len(), 64 * d, |i, out| {
        for (j, (orow, xrow)) in out.chunks_mut(d).zip(x[i * 64 * d..].chunks(d)).enumerate() {
            let iv = inv[i * 64 + j];
            for (o, &v) in orow.iter_mut().zip(xrow) {
                o.write(v * iv);
            }
        }
    });
    (y, inv)
}

multiversion! {
    /// Σ x·y of one row through `cpu_math::dot_lanes` (a strict left-to-right sum does not
    /// vectorise: 512 dependent adds per row made the normalisation ~1.4 ms of the official-size
    /// CCL forward).
    fn row_dot(x: &[f32], y: &[f32]) -> f32 {
        cpu_math::dot_lanes(x, y)
    }
}

pub fn l2_normalize_backward(y: &[f32], inv: &[f32], dy: &[f32], d: usize) -> Vec<f32> {
    if d == 0 {
        return Vec::new();
    }
    // 64 rows per task, written without a zeroing pass
    cpu_math::par_new(y.len(), 64 * d, |i, out| {
        for (j, orow) in out.chunks_mut(d).enumerate() {
            let r = i * 64 + j;
            let (yr, gr) = (&y[r * d..(r + 1) * d], &dy[r * d..(r + 1) * d]);
            let dot = row_dot(yr, gr);
            for ((o, &yv), &g) in orow.iter_mut().zip(yr).zip(gr) {
                o.write(inv[r] * (g - yv * dot));
            }
        }
    })
}

pub struct Forward {
    pub t2v: Vec<f32>,
    pub v2t: Vec<f32>,
    pub logits: Vec<f32>,
    pub max_v: Vec<f32>,
    pub arg_v: Vec<i32>,
    pub max_t: Vec<f32>,
    pub arg_t: Vec<i32>,
}

multiversion! {
    /// Max and argmax of one row: the max by lanes (vectorised), then the first index holding it.
    /// A NaN anywhere falls back to the scalar rule.
    fn row_argmax(x: &[f32]) -> (f32, usize) {
        let mut m = [f32::NEG_INFINITY; 16];
        let mut nan = false;
        let chunks = x.chunks_exact(16);
        let tail = chunks.remainder();
        for c in chunks {
            for l in 0..16 {
                m[l] = if c[l] > m[l] { c[l] } else { m[l] };
                nan |= c[l].is_nan();
            }
        }
        let mut mm = m.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        for &v in tail {
            mm = if v > mm { v } else { mm };
            nan |= v.is_nan();
        }
        if nan {
            let mut bi = 0;
            for (i, &v) in x.iter().enumerate().skip(1) {
                if cpu_math::max_better(v, i, x[bi], bi) {
                    bi = i;
                }
            }
            return (x[bi], bi);
        }
        (mm, x.iter().position(|&v| v == mm).unwrap_or(0))
    }
}

/// A word that is not in the GEMM (padded, inputs finite): its similarities are all exactly ±0.
const PADDED: usize = usize::MAX;

multiversion! {
    /// Column maxima over the words of one text: word t's row of similarities is row `row_of[t]`
    /// of s (row stride `stride`, n columns from `off`), scaled by the mask, or all zeros where
    /// `row_of[t]` is PADDED; words in order, so that "strictly greater" keeps the lowest t.
    fn col_argmax(s: &[f32], stride: usize, off: usize, row_of: &[usize], mask: &[f32], cmax: &mut [f32], carg: &mut [i32]) {
        cmax.fill(f32::NEG_INFINITY);
        carg.fill(0);
        let mut nan = false;
        for (t, (&m, &r)) in mask.iter().zip(row_of).enumerate() {
            if r == PADDED {
                for (c, a) in cmax.iter_mut().zip(carg.iter_mut()) {
                    if 0.0 > *c {
                        *c = 0.0;
                        *a = t as i32;
                    }
                }
                continue;
            }
            let row = &s[r * stride + off..r * stride + off + cmax.len()];
            for ((c, a), &x) in cmax.iter_mut().zip(carg.iter_mut()).zip(row) {
                let x = x * m;
                nan |= x.is_nan();
                if x > *c {
                    *c = x;
                    *a = t as i32;
                }
            }
        }
        if nan {
            // rare: redo with the scalar rule so NaN propagates like everywhere else (only the
            // all-rows path can hold a NaN: PADDED needs finite inputs)
            for v in 0..cmax.len() {
                let (mut best, mut bi) = (s[row_of[0] * stride + off + v] * mask[0], 0usize);
                for (t, &m) in mask.iter().enumerate().skip(1) {
                    let x = s[row_of[t] * stride + off + v] * m;
                    if cpu_math::max_better(x, t, best, bi) {
                        best = x;
                        bi = t;
                    }
                }
                cmax[v] = best;
                carg[v] = bi as i32;
            }
        }
    }
}

/// Results for one block of text samples × image samples.
struct Block {
    a0: usize,
    b0: usize,
    ac: usize,
    bc: usize,
    t2v: Vec<f32>,
    v2t: Vec<f32>,
    max_v: Vec<f32>,
    arg_v: Vec<i32>,
    max_t: Vec<f32>,
    arg_t: Vec<i32>,
}

/// th [B,L,D], vh [B,N,D] normalised; mask, tw [B,L]; vw [B,N]. `finite`: every element of th
/// and vh is finite (the caller knows it from the norms); then a padded word's similarities are
/// exactly ±0 and its row is left out of the GEMM (a fifth of the work for notes of 12 to 17 of
/// 18 words), else every word goes through it so that NaN propagates.
///
/// The B×B pairs are cut into blocks of A_CHUNK texts × B_CHUNK images; each block is one GEMM
/// (the block's words · (D × B_CHUNK·N)) into a per-task slab, reduced at once. Blocks run in
/// parallel, each GEMM single-threaded.
pub fn forward(th: &[f32], vh: &[f32], mask: &[f32], tw: &[f32], vw: &[f32], s: CclSizes, finite: bool) -> Forward {
    let CclSizes { b: nb, l, n, d } = s;
    // row_of[a·L + t]: word t's row in the GEMM's text matrix (PADDED: not in it); start[a]: text
    // a's first row there
    let mut row_of = vec![PADDED; nb * l];
    let mut start = vec![0usize; nb + 1];
    let mut rows_kept = 0;
    for a in 0..nb {
        start[a] = rows_kept;
        for t in 0..l {
            if !finite || mask[a * l + t] != 0.0 {
                row_of[a * l + t] = rows_kept;
                rows_kept += 1;
            }
        }
    }
    start[nb] = rows_kept;
    let compact: Vec<f32>;
    let tm: &[f32] = if rows_kept == nb * l {
        th
    } else {
        compact =
            (0..nb * l).filter(|&i| row_of[i] != PADDED).flat_map(|i| th[i * d..(i + 1) * d].iter().copied()).collect();
        &compact
    };
    let tasks: Vec<(usize, usize)> =
        (0..nb).step_by(A_CHUNK).flat_map(|a0| (0..nb).step_by(B_CHUNK).map(move |b0| (a0, b0))).collect();
    let blocks: Vec<Block> = tasks
        .into_par_iter()
        .map(|(a0, b0)| {
            let (ac, bc) = (A_CHUNK.min(nb - a0), B_CHUNK.min(nb - b0));
            let (r0, rows, w) = (start[a0], start[a0 + ac] - start[a0], bc * n);
            let mut sim = vec![0.0f32; rows * w];
            if rows > 0 {
                // SAFETY: sim holds rows x w; the text block is rows x d row-major from row r0;
                // the image block is w x d row-major, read transposed through its strides.
                unsafe {
                    gemm::gemm(
                        rows,
                        w,
                        d,
                        sim.as_mut_ptr(),
                        1,
                        w as isize,
                        false,
                        tm[r0 * d..].as_ptr(),
                        1,
                        d as isize,
                        vh[b0 * n * d..].as_ptr(),
                        d as isize,
                        1,
                        0.0,
                        1.0,
                        false,
                        false,
                        false,
                        Parallelism::None,
                    )
                };
            }
            let mut blk = Block {
                a0,
                b0,
                ac,
                bc,
                t2v: vec![0.0; ac * bc],
                v2t: vec![0.0; ac * bc],
                max_v: vec![0.0; ac * bc * l],
                arg_v: vec![0; ac * bc * l],
                max_t: vec![0.0; ac * bc * n],
                arg_t: vec![0; ac * bc * n],
            };
            let mut scaled = vec![0.0f32; n];
            let mut local = vec![0usize; l];
            for ai in 0..ac {
                let a = a0 + ai;
                let ma = &mask[a * l..(a + 1) * l];
                // rows of this text in the slab
                for (lr, &r) in local.iter_mut().zip(&row_of[a * l..(a + 1) * l]) {
                    *lr = if r == PADDED { PADDED } else { r - r0 };
                }
                for bi in 0..bc {
                    let b = b0 + bi;
                    let pair = ai * bc + bi;
                    let mut acc = 0.0f32;
                    for t in 0..l {
                        let (mx, ix) = if local[t] == PADDED {
                            (0.0, 0)
                        } else {
                            let row = &sim[local[t] * w + bi * n..local[t] * w + bi * n + n];
                            if ma[t] == 1.0 {
                                row_argmax(row)
                            } else if ma[t] == 0.0 {
                                // every value is ±0 (ties: v = 0) unless the row holds a NaN
                                let (mx, ix) = row_argmax(row);
                                if mx.is_nan() {
                                    (mx, ix)
                                } else {
                                    (0.0, 0)
                                }
                            } else {
                                for (o, x) in scaled.iter_mut().zip(row) {
                                    *o = x * ma[t];
                                }
                                row_argmax(&scaled)
                            }
                        };
                        blk.max_v[pair * l + t] = mx;
                        blk.arg_v[pair * l + t] = ix as i32;
                        acc += tw[a * l + t] * mx;
                    }
                    blk.t2v[pair] = acc;
                    let (cm, ca) = (&mut blk.max_t[pair * n..(pair + 1) * n], &mut blk.arg_t[pair * n..(pair + 1) * n]);
                    col_argmax(&sim, w, bi * n, &local, ma, cm, ca);
                    blk.v2t[pair] = cm.iter().zip(&vw[b * n..(b + 1) * n]).map(|(x, y)| x * y).sum();
                }
            }
            blk
        })
        .collect();
    let mut f = Forward {
        t2v: vec![0.0; nb * nb],
        v2t: vec![0.0; nb * nb],
        logits: Vec::new(),
        max_v: vec![0.0; nb * nb * l],
        arg_v: vec![0; nb * nb * l],
        max_t: vec![0.0; nb * nb * n],
        arg_t: vec![0; nb * nb * n],
    };
    for blk in blocks {
        for ai in 0..blk.ac {
            for bi in 0..blk.bc {
                let (pair, q) = ((blk.a0 + ai) * nb + blk.b0 + bi, ai * blk.bc + bi);
                f.t2v[pair] = blk.t2v[q];
                f.v2t[pair] = blk.v2t[q];
                f.max_v[pair * l..(pair + 1) * l].copy_from_slice(&blk.max_v[q * l..(q + 1) * l]);
                f.arg_v[pair * l..(pair + 1) * l].copy_from_slice(&blk.arg_v[q * l..(q + 1) * l]);
                f.max_t[pair * n..(pair + 1) * n].copy_from_slice(&blk.max_t[q * n..(q + 1) * n]);
                f.arg_t[pair * n..(pair + 1) * n].copy_from_slice(&blk.arg_t[q * n..(q + 1) * n]);
            }
        }
    }
    f.logits = f.t2v.iter().zip(&f.v2t).map(|(x, y)| 0.5 * (x + y)).collect();
    f
}

/// Routes grouped by destination row (a counting sort): `count` every route's row, `start`,
/// then `push` the routes in the same order.
struct Groups {
    /// group g holds items[begin[g]..begin[g + 1]]; during the pushes, begin[g + 1] is g's fill
    begin: Vec<usize>,
    items: Vec<(u32, f32)>,
}

impl Groups {
    fn new(groups: usize, cap: usize) -> Groups {
        Groups { begin: vec![0; groups + 1], items: vec![(0, 0.0); cap] }
    }

    fn clear(&mut self) {
        self.begin.fill(0);
    }

    fn count(&mut self, g: usize) {
        self.begin[g + 1] += 1;
    }

    /// Counts -> starts: begin[g + 1] held g's count; an exclusive prefix sum leaves g's start
    /// there (one slot to the right), which is g's fill pointer during the pushes.
    fn start(&mut self) {
        let mut run = 0;
        for x in self.begin.iter_mut() {
            let c = *x;
            *x = run;
            run += c;
        }
        if self.items.len() < run {
            self.items.resize(run, (0, 0.0));
        }
    }

    fn push(&mut self, g: usize, src: usize, c: f32) {
        let at = self.begin[g + 1];
        self.items[at] = (src as u32, c);
        self.begin[g + 1] = at + 1;
    }

    /// Group g's routes (after all pushes, begin[g + 1] is g's end and begin[g] its start).
    fn get(&self, g: usize) -> &[(u32, f32)] {
        &self.items[self.begin[g]..self.begin[g + 1]]
    }
}

/// out += Σ c · src[i·d ..][..d] over the routes (i, c), in their order.
fn gather(out: &mut [f32], src: &[f32], d: usize, routes: &[(u32, f32)]) {
    if !routes.is_empty() {
        gather_impl(out, src, d, routes)
    }
}

multiversion! {
    /// 64 columns at a time in registers: each route adds one source row segment, and the output
    /// segment is loaded and stored once for all of them.
    fn gather_impl(out: &mut [f32], src: &[f32], d: usize, routes: &[(u32, f32)]) {
        const W: usize = 64;
        let mut c0 = 0;
        while c0 + W <= d {
            let mut r: [f32; W] = out[c0..c0 + W].try_into().expect("W columns");
            for &(i, c) in routes {
                let row = &src[i as usize * d + c0..][..W];
                for x in 0..W {
                    r[x] += c * row[x];
                }
            }
            out[c0..c0 + W].copy_from_slice(&r);
            c0 += W;
        }
        for &(i, c) in routes {
            let row = &src[i as usize * d..(i as usize + 1) * d];
            for (o, &v) in out[c0..].iter_mut().zip(&row[c0..]) {
                *o += c * v;
            }
        }
    }
}

/// Gradients w.r.t. the normalised t̂, v̂ and the weights: (dth, dvh, dtw, dvw).
#[allow(clippy::too_many_arguments)]
pub fn backward(
    th: &[f32],
    vh: &[f32],
    mask: &[f32],
    tw: &[f32],
    vw: &[f32],
    d_t2v: &[f32],
    d_v2t: &[f32],
    (max_v, arg_v): (&[f32], &[i32]),
    (max_t, arg_t): (&[f32], &[i32]),
    s: CclSizes,
) -> (Vec<f32>, Vec<f32>, Vec<f32>, Vec<f32>) {
    let CclSizes { b: nb, l, n, d } = s;
    let mut dth = vec![0.0f32; nb * l * d];
    let mut dvh = vec![0.0f32; nb * n * d];
    // Every (t, v, coefficient) through which pair (a, b) routes gradient: the max over v of each
    // word (t2v), then the max over t of each patch (v2t). Both sides below walk the same routes
    // in this order, grouped by the row they add to, so that each output row is loaded and
    // stored once per group while the group's source rows stream through registers (`gather`);
    // within a row the additions keep the order of the routes.
    let routes = |a: usize, b: usize, f: &mut dyn FnMut(usize, usize, f32)| {
        let pair = a * nb + b;
        for t in 0..l {
            let c = d_t2v[pair] * tw[a * l + t] * mask[a * l + t];
            if c != 0.0 {
                f(t, arg_v[pair * l + t] as usize, c);
            }
        }
        for vi in 0..n {
            let t = arg_t[pair * n + vi] as usize;
            let c = d_v2t[pair] * vw[b * n + vi] * mask[a * l + t];
            if c != 0.0 {
                f(t, vi, c);
            }
        }
    };
    // Text side: text sample a gathers from every image sample's chosen tokens. Blocks of CHUNK
    // texts walk the image samples in the outer loop, so each v̂_b (N·D floats) is read once per
    // block while the block's accumulators (CHUNK·L·D floats) stay in L2; per (a, b) the routes
    // are grouped by word t.
    dth.par_chunks_mut(CHUNK * l * d).enumerate().for_each(|(blk, acc)| {
        let a0 = blk * CHUNK;
        let ac = acc.len() / (l * d);
        let mut groups = Groups::new(l, l + n);
        for b in 0..nb {
            let vb = &vh[b * n * d..(b + 1) * n * d];
            for ai in 0..ac {
                let a = a0 + ai;
                groups.clear();
                routes(a, b, &mut |t, _, _| groups.count(t));
                groups.start();
                routes(a, b, &mut |t, vi, c| groups.push(t, vi, c));
                let acc_a = &mut acc[ai * l * d..(ai + 1) * l * d];
                for t in 0..l {
                    gather(&mut acc_a[t * d..(t + 1) * d], vb, d, groups.get(t));
                }
            }
        }
    });
    // Image side: sample b gathers from every text sample's chosen tokens, grouped by patch v
    // over all text samples (in sample order) at once: about B routes per patch.
    dvh.par_chunks_mut(n * d).enumerate().for_each(|(b, acc)| {
        let mut groups = Groups::new(n, nb * (l + n));
        for a in 0..nb {
            routes(a, b, &mut |_, vi, _| groups.count(vi));
        }
        groups.start();
        for a in 0..nb {
            routes(a, b, &mut |t, vi, c| groups.push(vi, a * l + t, c));
        }
        for vi in 0..n {
            gather(&mut acc[vi * d..(vi + 1) * d], th, d, groups.get(vi));
        }
    });
    let dtw = (0..nb * l)
        .map(|i| (0..nb).map(|b| d_t2v[(i / l) * nb + b] * max_v[((i / l) * nb + b) * l + i % l]).sum())
        .collect();
    let dvw = (0..nb * n)
        .map(|j| {
            let (b, vi) = (j / n, j % n);
            (0..nb).map(|a| d_v2t[a * nb + b] * max_t[(a * nb + b) * n + vi]).sum()
        })
        .collect();
    (dth, dvh, dtw, dvw)
}

/// ([loss, CE rows, CE cols], d loss / d logits).
///
/// Written for the saturated case, which is the usual one at the official s = 100: with the
/// diagonal probability p_ii within 1e-4 of 1, `p_ii - 1` in f32 keeps only ~eps / (1 - p_ii) of
/// relative accuracy (a few 1e-4), and the normalisation backward multiplies that error by
/// 1 / |token| (a proptest case with a token of norm 0.08 failed on it). So the diagonal gradient
/// is -(sum of the other probabilities), a sum of positive terms, and the log-sum-exp adds the
/// non-maximal terms through ln_1p, which keeps the loss itself accurate when it is near 0.
pub fn info_nce(logits: &[f32], b: usize, s: f32) -> ([f32; 3], Vec<f32>) {
    let g = 0.5 * s / b as f32;
    let mut dl = vec![0.0f32; b * b];
    let (mut ce_r, mut ce_c) = (0.0f32, 0.0f32);
    for pass in 0..2 {
        for i in 0..b {
            // pass 0: row i of s·L; pass 1: column i (row i of s·Lᵀ)
            let at = |j: usize| if pass == 0 { i * b + j } else { j * b + i };
            let (mut m, mut k) = (f32::NEG_INFINITY, 0);
            for j in 0..b {
                if s * logits[at(j)] > m {
                    (m, k) = (s * logits[at(j)], j);
                }
            }
            let rest: f32 = (0..b).filter(|&j| j != k).map(|j| (s * logits[at(j)] - m).exp()).sum();
            let lse = m + rest.ln_1p();
            let ce = (m - s * logits[at(i)]) + rest.ln_1p();
            if pass == 0 {
                ce_r += ce;
            } else {
                ce_c += ce;
            }
            let mut off = 0.0f32;
            for j in (0..b).filter(|&j| j != i) {
                let p = (s * logits[at(j)] - lse).exp();
                off += p;
                dl[at(j)] += g * p;
            }
            dl[at(i)] -= g * off;
        }
    }
    let (r, c) = (ce_r / b as f32, ce_c / b as f32);
    ([0.5 * (r + c), r, c], dl)
}
