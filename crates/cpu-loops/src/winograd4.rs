//! The transforms of the cpu Winograd F(4×4, 3×3) convolution (`reclmis::ops::conv::winograd`
//! with `Tiles::F4`): each 4×4 output tile is Aᵀ [Σ_ci (G g Gᵀ) ⊙ (Bᵀ d B)] A from its 6×6 input
//! patch d, 36 products per tile and channel pair for 16 outputs (F(2×2, 3×3): 16 for 4), with
//! the interpolation points 0, ±1, ±2 and ∞:
//!
//! ```text
//! Bᵀ = [4  0 −5  0 1 0]   G = [ 1/4     0    0]   Aᵀ = [1 1  1 1  1 0]
//!      [0 −4 −4  1 1 0]       [−1/6 −1/6 −1/6]        [0 1 −1 2 −2 0]
//!      [0  4 −4 −1 1 0]       [−1/6  1/6 −1/6]        [0 1  1 4  4 0]
//!      [0 −2 −1  2 1 0]       [1/24 1/12  1/6]        [0 1 −1 8 −8 1]
//!      [0  2 −1 −2 1 0]       [1/24 −1/12 1/6]
//!      [0  4  0 −5 0 1]       [   0    0    1]
//! ```
//!
//! The same layout as F(2×2, 3×3)'s transforms (`winograd`): 36 planes of channels × tiles, 16
//! channels or tiles at a time on explicit vectors, sums in a fixed order with fused
//! multiply-adds (`Simd::mul_add`, the same bits on every path).

use crate::math::SendPtr;
use crate::simd::{dispatch, Kernel, Simd};
use crate::winograd::{pixel, store, Chw};

/// Output pixels per tile side, input patch side, and planes of transformed values (one per
/// patch element).
pub const M: usize = 4;
const ALPHA: usize = 6;
pub const PLANES: usize = ALPHA * ALPHA;
/// Floats the output transform's m must hold past its last plane.
pub const SLACK: usize = 16;

/// Bᵀ·d for one column of a patch (d0..d5 down the column).
#[inline(always)]
fn bt<S: Simd>(s: S, d: [S::V; 6]) -> [S::V; 6] {
    let (four, five, two) = (s.splat(4.0), s.splat(-5.0), s.splat(2.0));
    let (m4, m2) = (s.splat(-4.0), s.splat(-2.0));
    let d42 = s.sub(d[4], d[2]);
    let d31 = s.sub(d[3], d[1]);
    [
        s.mul_add(four, d[0], s.mul_add(five, d[2], d[4])),
        s.mul_add(m4, s.add(d[1], d[2]), s.add(d[3], d[4])),
        s.mul_add(four, s.sub(d[1], d[2]), s.sub(d[4], d[3])),
        s.mul_add(two, d31, d42),
        s.mul_add(m2, d31, d42),
        s.mul_add(four, d[1], s.mul_add(five, d[3], d[5])),
    ]
}

/// Six vectors from consecutive rows of a scratch block.
#[inline(always)]
fn load6<S: Simd>(s: S, rows: &[[f32; 16]]) -> [S::V; 6] {
    [s.load(&rows[0]), s.load(&rows[1]), s.load(&rows[2]), s.load(&rows[3]), s.load(&rows[4]), s.load(&rows[5])]
}

/// Aᵀ·m for one column of a tile's products (m0..m5).
#[inline(always)]
fn at<S: Simd>(s: S, m: [S::V; 6]) -> [S::V; 4] {
    let (s12, d12) = (s.add(m[1], m[2]), s.sub(m[1], m[2]));
    let (s34, d34) = (s.add(m[3], m[4]), s.sub(m[3], m[4]));
    [
        s.add(s.add(m[0], s12), s34),
        s.mul_add(s.splat(2.0), d34, d12),
        s.mul_add(s.splat(4.0), s34, s12),
        s.add(s.mul_add(s.splat(8.0), d34, d12), m[5]),
    ]
}

/// G·g for one column of a filter (g0..g2).
#[inline(always)]
fn g_col<S: Simd>(s: S, g: [S::V; 3]) -> [S::V; 6] {
    let sixth = s.splat(1.0 / 6.0);
    let (q, h, mh) = (s.splat(0.25), s.splat(0.5), s.splat(-0.5));
    let g02 = s.add(g[0], g[2]);
    [
        s.mul(q, g[0]),
        s.mul(s.splat(-1.0 / 6.0), s.add(g02, g[1])),
        s.mul(s.splat(-1.0 / 6.0), s.sub(g02, g[1])),
        s.mul(sixth, s.mul_add(q, g[0], s.mul_add(h, g[1], g[2]))),
        s.mul(sixth, s.mul_add(q, g[0], s.mul_add(mh, g[1], g[2]))),
        g[2],
    ]
}

/// `bt` on plain floats: the same operations, so the same bits as each lane.
fn bt1(d: [f32; 6]) -> [f32; 6] {
    let (d42, d31) = (d[4] - d[2], d[3] - d[1]);
    [
        4.0f32.mul_add(d[0], (-5.0f32).mul_add(d[2], d[4])),
        (-4.0f32).mul_add(d[1] + d[2], d[3] + d[4]),
        4.0f32.mul_add(d[1] - d[2], d[4] - d[3]),
        2.0f32.mul_add(d31, d42),
        (-2.0f32).mul_add(d31, d42),
        4.0f32.mul_add(d[1], (-5.0f32).mul_add(d[3], d[5])),
    ]
}

/// `at` on plain floats.
fn at1(m: [f32; 6]) -> [f32; 4] {
    let (s12, d12, s34, d34) = (m[1] + m[2], m[1] - m[2], m[3] + m[4], m[3] - m[4]);
    [(m[0] + s12) + s34, 2.0f32.mul_add(d34, d12), 4.0f32.mul_add(s34, s12), 8.0f32.mul_add(d34, d12) + m[5]]
}

/// `g_col` on plain floats.
fn g_col1(g: [f32; 3]) -> [f32; 6] {
    let g02 = g[0] + g[2];
    [
        0.25 * g[0],
        (-1.0f32 / 6.0) * (g02 + g[1]),
        (-1.0f32 / 6.0) * (g02 - g[1]),
        (1.0f32 / 6.0) * 0.25f32.mul_add(g[0], 0.5f32.mul_add(g[1], g[2])),
        (1.0f32 / 6.0) * 0.25f32.mul_add(g[0], (-0.5f32).mul_add(g[1], g[2])),
        g[2],
    ]
}

/// Row o of every plane of U = G g Gᵀ (36 planes of co × ci at u), the filters g = wo[ci][3×3]
/// of output channel o; 16 input channels at a time on lanes.
///
/// # Safety
/// u points to 36 planes of co × ci floats; row o of each is the caller's to write.
pub unsafe fn weight_rows(wo: &[f32], oci: (usize, usize, usize), u: SendPtr) {
    dispatch(WeightRows { wo, oci, u })
}

struct WeightRows<'a> {
    wo: &'a [f32],
    oci: (usize, usize, usize),
    u: SendPtr,
}

impl Kernel for WeightRows<'_> {
    type Out = ();
    #[inline(always)]
    fn run<S: Simd>(self, s: S) {
        let (o, co, ci) = self.oci;
        let plane = co * ci;
        let mut i0 = 0;
        while i0 < ci {
            let n = 16.min(ci - i0);
            let mut gl = [[0.0f32; 16]; 9];
            for (k, gk) in gl.iter_mut().enumerate() {
                for (l, x) in gk.iter_mut().enumerate().take(n) {
                    *x = self.wo[(i0 + l) * 9 + k];
                }
            }
            // (plain loops, not `array::from_fn`: a closure does not inherit the path's target
            // features, and its vector operations then become calls)
            let mut g = [s.zero(); 9];
            for (k, gk) in g.iter_mut().enumerate() {
                *gk = s.load(&gl[k]);
            }
            // t = G·g per column c (6 x 3), then U = t·Gᵀ per row
            let mut cols = [[s.zero(); 6]; 3];
            for (c, col) in cols.iter_mut().enumerate() {
                *col = g_col(s, [g[c], g[3 + c], g[6 + c]]);
            }
            let [c0, c1, c2] = cols;
            for (r, ((&t0, &t1), &t2)) in c0.iter().zip(&c1).zip(&c2).enumerate() {
                let row = g_col(s, [t0, t1, t2]);
                for (c, &v) in row.iter().enumerate() {
                    // SAFETY: n <= ci − i0 floats of row o of plane 6r + c (weight_rows' contract).
                    unsafe { store(s, self.u.get().add((ALPHA * r + c) * plane + o * ci + i0), v, n) };
                }
            }
            i0 += 16;
        }
    }

    /// One input channel at a time, the same operations as `run`'s lanes.
    #[allow(clippy::needless_range_loop)] // the loop index picks a column of a transposed matrix
    fn scalar(self) {
        let (o, co, ci) = self.oci;
        let plane = co * ci;
        for i in 0..ci {
            let g = &self.wo[i * 9..i * 9 + 9];
            let t: [[f32; 6]; 3] = std::array::from_fn(|c| g_col1([g[c], g[3 + c], g[6 + c]]));
            for r in 0..ALPHA {
                for (c, v) in g_col1([t[0][r], t[1][r], t[2][r]]).into_iter().enumerate() {
                    // SAFETY: element i of row o of plane 6r + c (weight_rows' contract).
                    unsafe { *self.u.get().add((ALPHA * r + c) * plane + o * ci + i) = v };
                }
            }
        }
    }
}

/// V[ξ][ci][t] = (Bᵀ d B)[ξ] for the band's tiles t (tile rows ty0.., tw tiles per row) of image
/// xb [Ci, H, W], d = the 6×6 patch at (4ty − 1, 4tx − 1), zero outside the image. Each patch row
/// is read from a zero-padded copy of the input row split into its four column phases
/// (phase q holds columns 4t + q), so a tile row's patch columns are contiguous loads: column c
/// of tile t is phase c mod 4 at t + c / 4.
///
/// Only channels [ci0, ci1); xb is one image's channels of one input slice, its channel c going to
/// row v_off + c of V; `s` is (Ci, H, W) of the whole input.
///
/// # Safety
/// v points to 36 planes of Ci·nt floats; rows v_off + [ci0, ci1) of each are the caller's to
/// write.
pub unsafe fn input_transform(
    xb: &[f32],
    s: Chw,
    band: (usize, usize, usize),
    cis: (usize, usize),
    vrows: (SendPtr, usize),
) {
    dispatch(InputTransform { xb, s, band, cis, vrows })
}

struct InputTransform<'a> {
    xb: &'a [f32],
    s: Chw,
    band: (usize, usize, usize),
    cis: (usize, usize),
    vrows: (SendPtr, usize),
}

impl Kernel for InputTransform<'_> {
    type Out = ();
    #[inline(always)]
    fn run<S: Simd>(self, s: S) {
        let InputTransform { xb, s: dims, band, cis, vrows: (v, v_off) } = self;
        let (ty0, nty, tw) = band;
        let nt = nty * tw;
        let plane = dims.c * nt;
        // phases of t in 0..=tw (column 4t + q of the padded row, 4·(tw + 1) >= W + 2)
        let m = tw + 1;
        // 8 row slots (row 4·ty + r in slot (4·ty + r) mod 8: tile rows overlap by two input
        // rows, so after the first only rows 2..6 are new), 4 phases each
        // (16 floats of slack at the end: every patch load below is a full 16-lane one, the lanes
        // past a row's last tile read the next row or the slack and are never stored; one load
        // form instead of two halves the code of this loop in the size profile)
        let mut ph = vec![0.0f32; 8 * 4 * m + 16];
        let mut padded = vec![0.0f32; 4 * m + 64];
        // Bᵀ·d of 16 tiles, element (r, c) at 6r + c: explicit stores and loads (L1) rather than
        // arrays of 36 vectors, which do not fit the registers and cost a zeroing and copies
        let mut tb = [[0.0f32; 16]; PLANES];
        for ci in cis.0..cis.1 {
            let x = &xb[ci * dims.h * dims.w..(ci + 1) * dims.h * dims.w];
            for ty in 0..nty {
                for r in if ty == 0 { 0 } else { 2 }..ALPHA {
                    let iy = (M * (ty0 + ty)) as isize - 1 + r as isize;
                    let slot = &mut ph[((M * ty + r) % 8) * 4 * m..][..4 * m];
                    if iy < 0 || iy >= dims.h as isize {
                        slot.fill(0.0);
                        continue;
                    }
                    padded[1..=dims.w].copy_from_slice(&x[iy as usize * dims.w..(iy as usize + 1) * dims.w]);
                    let (p0, rest) = slot.split_at_mut(m);
                    let (p1, rest) = rest.split_at_mut(m);
                    let (p2, p3) = rest.split_at_mut(m);
                    let mut t = 0;
                    while t + 16 <= m {
                        let q: [S::V; 4] = std::array::from_fn(|k| s.load(&padded[4 * t + 16 * k..]));
                        let (e1, o1) = s.deinterleave(q[0], q[1]);
                        let (e2, o2) = s.deinterleave(q[2], q[3]);
                        let (f0, f2) = s.deinterleave(e1, e2);
                        let (f1, f3) = s.deinterleave(o1, o2);
                        s.store(&mut p0[t..], f0);
                        s.store(&mut p1[t..], f1);
                        s.store(&mut p2[t..], f2);
                        s.store(&mut p3[t..], f3);
                        t += 16;
                    }
                    for t in t..m {
                        p0[t] = padded[4 * t];
                        p1[t] = padded[4 * t + 1];
                        p2[t] = padded[4 * t + 2];
                        p3[t] = padded[4 * t + 3];
                    }
                }
                let base = (v_off + ci) * nt + ty * tw;
                let mut t0 = 0;
                while t0 < tw {
                    let n = 16.min(tw - t0);
                    // t = Bᵀ·d per column into tb, then V = t·B per row; patch row r, column c:
                    // phase c % 4 of row r's slot, from tile t0 + c / 4
                    for c in 0..ALPHA {
                        let at_row = |r: usize| ((M * ty + r) % 8) * 4 * m + (c % 4) * m + t0 + c / 4;
                        let d = [
                            s.load(&ph[at_row(0)..]),
                            s.load(&ph[at_row(1)..]),
                            s.load(&ph[at_row(2)..]),
                            s.load(&ph[at_row(3)..]),
                            s.load(&ph[at_row(4)..]),
                            s.load(&ph[at_row(5)..]),
                        ];
                        for (r, v) in bt(s, d).into_iter().enumerate() {
                            s.store(&mut tb[ALPHA * r + c], v);
                        }
                    }
                    for r in 0..ALPHA {
                        let row = bt(s, load6(s, &tb[ALPHA * r..]));
                        for (c, &val) in row.iter().enumerate() {
                            // SAFETY: n floats of channel ci's row of plane 6r + c
                            // (input_transform's contract)
                            unsafe { store(s, v.get().add((ALPHA * r + c) * plane + base + t0), val, n) };
                        }
                    }
                    t0 += 16;
                }
            }
        }
    }

    /// One tile at a time, read straight from the image, the same operations as `run`'s lanes.
    #[allow(clippy::needless_range_loop)] // the loop index picks a column of a transposed matrix
    fn scalar(self) {
        let InputTransform { xb, s: dims, band, cis, vrows: (v, v_off) } = self;
        let (ty0, nty, tw) = band;
        let nt = nty * tw;
        let plane = dims.c * nt;
        for ci in cis.0..cis.1 {
            let x = &xb[ci * dims.h * dims.w..(ci + 1) * dims.h * dims.w];
            let at = |iy: isize, ix: isize| pixel(x, dims, iy, ix);
            for ty in 0..nty {
                for tx in 0..tw {
                    let (y0, x0) = ((M * (ty0 + ty)) as isize - 1, (M * tx) as isize - 1);
                    let cols: [[f32; 6]; 6] =
                        std::array::from_fn(|c| bt1(std::array::from_fn(|r| at(y0 + r as isize, x0 + c as isize))));
                    let base = (v_off + ci) * nt + ty * tw + tx;
                    for r in 0..ALPHA {
                        for (c, val) in bt1(std::array::from_fn(|c| cols[c][r])).into_iter().enumerate() {
                            // SAFETY: channel ci's row of plane 6r + c (input_transform's contract)
                            unsafe { *v.get().add((ALPHA * r + c) * plane + base) = val };
                        }
                    }
                }
            }
        }
    }
}

/// y (+)= Aᵀ m A + bias for the band's tiles, m[ξ][co][t]. Writes only pixels inside the image
/// (a last tile row or column may hang over). 16 tiles of a tile row at a time, each output
/// row's four column phases interleaved in registers. Only output channels [co0, co1); m holds
/// the rows of output channels [m_co0, m_co0 + m_nco) of each plane, and at least 16 floats
/// after its last plane (`SLACK`: the loads are all 16 lanes wide, one code form instead of two in
/// the size-budgeted binary; a shorter m panics); `s` is (Co, H, W).
///
/// # Safety
/// yb is one image's output [Co, H, W] (initialised when accumulating); the band's output rows
/// of channels [co0, co1) are the caller's alone.
pub unsafe fn output_transform(
    mrows: (&[f32], usize, usize),
    s: Chw,
    band: (usize, usize, usize),
    cos: (usize, usize),
    bias: Option<&[f32]>,
    out: (SendPtr, bool),
) {
    dispatch(OutputTransform { mrows, s, band, cos, bias, out })
}

struct OutputTransform<'a> {
    mrows: (&'a [f32], usize, usize),
    s: Chw,
    band: (usize, usize, usize),
    cos: (usize, usize),
    bias: Option<&'a [f32]>,
    out: (SendPtr, bool),
}

impl Kernel for OutputTransform<'_> {
    type Out = ();
    #[inline(always)]
    fn run<S: Simd>(self, s: S) {
        let OutputTransform { mrows: (m, m_co0, m_nco), s: dims, band, cos, bias, out: (yb, accumulate) } = self;
        let (ty0, nty, tw) = band;
        let nt = nty * tw;
        let plane = m_nco * nt;
        // Aᵀ·e of 16 tiles, element (i, c) at 6i + c (see the input transform's tb)
        let mut ab = [[0.0f32; 16]; 4 * ALPHA];
        for co in cos.0..cos.1 {
            let bv = s.splat(bias.map_or(0.0, |b| b[co]));
            for ty in 0..nty {
                let base = (co - m_co0) * nt + ty * tw;
                let mut t0 = 0;
                while t0 < tw {
                    let n = 16.min(tw - t0);
                    // a = Aᵀ·e per column into ab (4 x 6), then y = a·A per row (4 x 4)
                    for c in 0..ALPHA {
                        let at_row = |r: usize| (ALPHA * r + c) * plane + base + t0;
                        // full 16-lane loads (see the slack in the doc comment): lanes past the
                        // row's last tile are never stored
                        let e = [
                            s.load(&m[at_row(0)..]),
                            s.load(&m[at_row(1)..]),
                            s.load(&m[at_row(2)..]),
                            s.load(&m[at_row(3)..]),
                            s.load(&m[at_row(4)..]),
                            s.load(&m[at_row(5)..]),
                        ];
                        for (i, v) in at(s, e).into_iter().enumerate() {
                            s.store(&mut ab[ALPHA * i + c], v);
                        }
                    }
                    // output pixels 4·t0 .. of each row (the last may be cut by the width)
                    let cnt = (M * n).min(dims.w - M * t0);
                    for i in 0..M {
                        let yy = M * (ty0 + ty) + i;
                        if yy >= dims.h {
                            continue;
                        }
                        let y = at(s, load6(s, &ab[ALPHA * i..]));
                        let y = [s.add(y[0], bv), s.add(y[1], bv), s.add(y[2], bv), s.add(y[3], bv)];
                        // pixel 4t + j = y[j][t]: interleave phases (0, 2) and (1, 3), then those
                        let (p_lo, p_hi) = s.interleave(y[0], y[2]);
                        let (q_lo, q_hi) = s.interleave(y[1], y[3]);
                        let (a, b) = s.interleave(p_lo, q_lo);
                        let (c, d) = s.interleave(p_hi, q_hi);
                        // SAFETY: pixels [4·t0, 4·t0 + cnt) of row yy of channel co of the image's
                        // output, inside the row; the band's rows are this task's
                        // (output_transform's contract); raw pointers: without `accumulate` the
                        // output may be unwritten memory.
                        unsafe {
                            let p = yb.get().add((co * dims.h + yy) * dims.w + M * t0);
                            for (k, &v) in [a, b, c, d].iter().enumerate() {
                                let nk = cnt.saturating_sub(16 * k).min(16);
                                if nk == 0 {
                                    break;
                                }
                                let pk = p.add(16 * k);
                                let v = if accumulate {
                                    s.add(s.load_first(std::slice::from_raw_parts(pk, nk), nk), v)
                                } else {
                                    v
                                };
                                store(s, pk, v, nk);
                            }
                        }
                    }
                    t0 += 16;
                }
            }
        }
    }

    /// One tile at a time, the same operations as `run`'s lanes.
    #[allow(clippy::needless_range_loop)] // the loop index picks a column of a transposed matrix
    fn scalar(self) {
        let OutputTransform { mrows: (m, m_co0, m_nco), s: dims, band, cos, bias, out: (yb, accumulate) } = self;
        let (ty0, nty, tw) = band;
        let nt = nty * tw;
        let plane = m_nco * nt;
        for co in cos.0..cos.1 {
            let bv = bias.map_or(0.0, |b| b[co]);
            for ty in 0..nty {
                for tx in 0..tw {
                    let base = (co - m_co0) * nt + ty * tw + tx;
                    let cols: [[f32; 4]; 6] =
                        std::array::from_fn(|c| at1(std::array::from_fn(|r| m[(ALPHA * r + c) * plane + base])));
                    for i in 0..M {
                        let yy = M * (ty0 + ty) + i;
                        if yy >= dims.h {
                            continue;
                        }
                        for (j, val) in at1(std::array::from_fn(|c| cols[c][i])).into_iter().enumerate() {
                            let xx = M * tx + j;
                            if xx >= dims.w {
                                continue;
                            }
                            let val = val + bv;
                            // SAFETY: pixel (yy, xx) of channel co, inside the image, in the band's
                            // rows (output_transform's contract); read only when accumulating.
                            unsafe {
                                let p = yb.get().add((co * dims.h + yy) * dims.w + xx);
                                *p = if accumulate { *p + val } else { val };
                            }
                        }
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn values(n: usize, seed: usize) -> Vec<f32> {
        (0..n).map(|i| (((i * 7919 + seed * 104729) % 1000) as f32 - 500.0) / 37.0).collect()
    }

    #[derive(Clone)]
    struct Probe {
        ci: usize,
        co: usize,
        h: usize,
        w: usize,
        accumulate: bool,
        /// each transform's compact `scalar` instead of `run` on the path given
        compact: bool,
    }

    impl Kernel for Probe {
        type Out = Vec<Vec<f32>>;
        #[inline(always)]
        fn run<S: Simd>(self, s: S) -> Vec<Vec<f32>> {
            let Probe { ci, co, h, w, accumulate, compact } = self;
            let (th, tw) = (h.div_ceil(M), w.div_ceil(M));
            let nt = th * tw;
            let wts = values(co * ci * 9, 1);
            let mut u = vec![f32::NAN; PLANES * co * ci];
            for o in 0..co {
                let k = WeightRows { wo: &wts[o * ci * 9..], oci: (o, co, ci), u: SendPtr(u.as_mut_ptr()) };
                if compact {
                    k.scalar()
                } else {
                    k.run(s)
                }
            }
            let x = values(ci * h * w, 2);
            let mut v = vec![f32::NAN; PLANES * ci * nt];
            let dims = Chw { c: ci, h, w };
            let k = InputTransform {
                xb: &x,
                s: dims,
                band: (0, th, tw),
                cis: (0, ci),
                vrows: (SendPtr(v.as_mut_ptr()), 0),
            };
            if compact {
                k.scalar()
            } else {
                k.run(s)
            }
            let m = values(PLANES * co * nt + SLACK, 3);
            let bias = values(co, 4);
            let mut y = if accumulate { values(co * h * w, 5) } else { vec![f32::NAN; co * h * w] };
            let out = (SendPtr(y.as_mut_ptr()), accumulate);
            let k = OutputTransform {
                mrows: (&m, 0, co),
                s: Chw { c: co, h, w },
                band: (0, th, tw),
                cos: (0, co),
                bias: Some(&bias),
                out,
            };
            if compact {
                k.scalar()
            } else {
                k.run(s)
            }
            vec![u, v, y]
        }
    }

    /// Every path writes every element, and the same bits as the scalar one.
    #[test]
    fn every_path_gives_the_scalar_bits() {
        for (ci, co, h, w) in
            [(1, 1, 1, 1), (3, 2, 5, 7), (17, 5, 6, 33), (33, 3, 4, 64), (16, 16, 3, 100), (2, 2, 9, 130)]
        {
            for accumulate in [false, true] {
                let mut outs = crate::simd::each_path(Probe { ci, co, h, w, accumulate, compact: false });
                outs.push((
                    "compact scalar",
                    Probe { ci, co, h, w, accumulate, compact: true }.run(crate::simd::Scalar),
                ));
                for (k, name) in ["weights", "input", "output"].iter().enumerate() {
                    let want = &outs[0].1[k];
                    assert!(want.iter().all(|x| !x.is_nan()), "scalar {name} transform left a value unwritten");
                    for (path, got) in &outs {
                        let same = got[k].iter().zip(want).all(|(a, b)| a.to_bits() == b.to_bits());
                        assert!(same, "{path} {name} transform differs at ci {ci}, co {co}, {h}x{w}");
                    }
                }
            }
        }
    }
}
