//! The transforms of the cpu Winograd F(2×2, 3×3) convolution (`reclmis::ops::conv::winograd`,
//! which holds the algorithm, the bands and the GEMMs): 16 input channels or tiles at a time on
//! explicit vectors (`simd`), so that they stay vectorised in the size profile too. The sums are
//! formed in the order the scalar definitions write them: every path gives the same bits.

use crate::math::SendPtr;
use crate::simd::{dispatch, Kernel, Simd};

/// x[iy][ix] of one channel's plane, 0 outside the image (the compact scalar input transforms'
/// patch reads).
pub(crate) fn pixel(x: &[f32], dims: Chw, iy: isize, ix: isize) -> f32 {
    if iy < 0 || ix < 0 || iy >= dims.h as isize || ix >= dims.w as isize {
        0.0
    } else {
        x[iy as usize * dims.w + ix as usize]
    }
}

/// Channels, height and width of the image a transform reads or writes.
#[derive(Clone, Copy, Debug)]
pub struct Chw {
    pub c: usize,
    pub h: usize,
    pub w: usize,
}

/// The first n (<= 16) lanes of v to p.
///
/// # Safety
/// n floats writable at p.
#[inline(always)]
pub(crate) unsafe fn store<S: Simd>(s: S, p: *mut f32, v: S::V, n: usize) {
    // SAFETY: the caller's contract.
    unsafe {
        if n == 16 {
            s.store_ptr(p, v)
        } else {
            s.store_first_ptr(p, v, n)
        }
    }
}

/// Row r of a patch for 16 tiles: columns 0..4 from the even and odd splits (e, o at the tile).
#[inline(always)]
fn patch_row<S: Simd>(s: S, e: &[f32], o: &[f32]) -> [S::V; 4] {
    [s.load(e), s.load(o), s.load(&e[1..]), s.load(&o[1..])]
}

/// Column c of Aᵀ·e for 16 tiles: (e[c] + e[4 + c]) + e[8 + c] and (e[4 + c] − e[8 + c]) −
/// e[12 + c], where `at` indexes e[c] (row 0, column c) and element 4r + c is at at + 4r·plane.
#[inline(always)]
fn out_col<S: Simd>(s: S, m: &[f32], plane: usize, at: usize) -> (S::V, S::V) {
    let (e0, e1) = (s.load(&m[at..]), s.load(&m[4 * plane + at..]));
    let (e2, e3) = (s.load(&m[8 * plane + at..]), s.load(&m[12 * plane + at..]));
    (s.add(s.add(e0, e1), e2), s.sub(s.sub(e1, e2), e3))
}

/// Row o of every plane of U = G g Gᵀ (16 planes of co x ci at u), the filters g = wo[ci][3×3]
/// of output channel o, G = [[1, 0, 0], [½, ½, ½], [½, −½, ½], [0, 0, 1]]; 16 input channels
/// at a time on lanes.
///
/// # Safety
/// u points to 16 planes of co × ci floats; row o of each is the caller's to write.
pub unsafe fn weight_rows(wo: &[f32], oci: (usize, usize, usize), u: SendPtr) {
    dispatch(WeightRows { wo, oci, u })
}

/// Made only by `weight_rows`, whose caller vouches for `u`.
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
        let half = s.splat(0.5);
        let mut i0 = 0;
        while i0 < ci {
            let n = 16.min(ci - i0);
            // g[k][l] = tap k of input channel i0 + l (a strided gather)
            let mut gl = [[0.0f32; 16]; 9];
            for (k, gk) in gl.iter_mut().enumerate() {
                for (l, x) in gk.iter_mut().enumerate().take(n) {
                    *x = self.wo[(i0 + l) * 9 + k];
                }
            }
            let g: [S::V; 9] = std::array::from_fn(|k| s.load(&gl[k]));
            // t = G·g, per column c (g[3r + c] is row r, column c)
            let mut t = [[s.zero(); 3]; 4];
            for c in 0..3 {
                let (g0, g1, g2) = (g[c], g[3 + c], g[6 + c]);
                t[0][c] = g0;
                t[1][c] = s.mul(half, s.add(s.add(g0, g1), g2));
                t[2][c] = s.mul(half, s.add(s.sub(g0, g1), g2));
                t[3][c] = g2;
            }
            // U = t·Gᵀ
            for (r, tr) in t.iter().enumerate() {
                let row = [
                    tr[0],
                    s.mul(half, s.add(s.add(tr[0], tr[1]), tr[2])),
                    s.mul(half, s.add(s.sub(tr[0], tr[1]), tr[2])),
                    tr[2],
                ];
                for (c, &v) in row.iter().enumerate() {
                    // SAFETY: n <= ci − i0 floats of row o of plane 4r + c (weight_rows' contract).
                    unsafe { store(s, self.u.get().add((4 * r + c) * plane + o * ci + i0), v, n) };
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
        let g_col = |g0: f32, g1: f32, g2: f32| [g0, 0.5 * ((g0 + g1) + g2), 0.5 * ((g0 - g1) + g2), g2];
        for i in 0..ci {
            let g = &self.wo[i * 9..i * 9 + 9];
            let t = [g_col(g[0], g[3], g[6]), g_col(g[1], g[4], g[7]), g_col(g[2], g[5], g[8])];
            for r in 0..4 {
                for (c, v) in g_col(t[0][r], t[1][r], t[2][r]).into_iter().enumerate() {
                    // SAFETY: element i of row o of plane 4r + c (weight_rows' contract).
                    unsafe { *self.u.get().add((4 * r + c) * plane + o * ci + i) = v };
                }
            }
        }
    }
}

/// V[ξ][ci][t] = (Bᵀ d B)[ξ] for the band's tiles t (tile rows ty0.., tw tiles per row) of
/// image xb [Ci, H, W], d = the 4×4 patch at (2ty − 1, 2tx − 1), zero outside the image;
/// Bᵀ = [[1, 0, −1, 0], [0, 1, 1, 0], [0, −1, 1, 0], [0, 1, 0, −1]]. Each patch row is read
/// from a zero-padded copy of the input row split into even and odd columns, so a tile row's
/// patches are contiguous loads and the arithmetic runs on vectors of 16 tiles.
///
/// Only channels [ci0, ci1) are transformed (callers split the channels across threads); xb is
/// one image's channels of one input slice, its channel c going to row v_off + c of V. `s` is
/// (Ci, H, W) of the whole input (all slices).
///
/// # Safety
/// v points to 16 planes of Ci·nt floats; rows v_off + [ci0, ci1) of each are the caller's to
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

/// Made only by `input_transform`, whose caller vouches for `vrows`.
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
        let m = tw + 1;
        // per patch row r: even[t] = padded[2t], odd[t] = padded[2t + 1], t in 0..=tw, where
        // padded[j] = x[row][j − 1] (0 outside); 2·(tw + 1) >= W + 2 leaves room for the zeros
        // (16 floats of slack: every patch load below is a full 16-lane one; lanes past a row's
        // last tile read the next slot or the slack and are never stored)
        let mut ev = vec![0.0f32; 4 * m + 16];
        let mut od = vec![0.0f32; 4 * m + 16];
        let mut padded = vec![0.0f32; 2 * m];
        for ci in cis.0..cis.1 {
            let x = &xb[ci * dims.h * dims.w..(ci + 1) * dims.h * dims.w];
            for ty in 0..nty {
                // patch row r of tile row ty lives in slot (2·ty + r) mod 4: tile rows overlap by
                // two input rows, so after the first only rows 2 and 3 are new (each input row
                // is split into its even and odd columns once, not twice)
                for r in if ty == 0 { 0 } else { 2 }..4 {
                    let iy = 2 * (ty0 + ty) as isize - 1 + r as isize;
                    let k = (2 * ty + r) % 4;
                    let (e, o) = (&mut ev[k * m..(k + 1) * m], &mut od[k * m..(k + 1) * m]);
                    if iy < 0 || iy >= dims.h as isize {
                        e.fill(0.0);
                        o.fill(0.0);
                        continue;
                    }
                    padded[1..=dims.w].copy_from_slice(&x[iy as usize * dims.w..(iy as usize + 1) * dims.w]);
                    let mut t = 0;
                    while t + 16 <= m {
                        let (pe, po) = s.deinterleave(s.load(&padded[2 * t..]), s.load(&padded[2 * t + 16..]));
                        s.store(&mut e[t..], pe);
                        s.store(&mut o[t..], po);
                        t += 16;
                    }
                    for t in t..m {
                        e[t] = padded[2 * t];
                        o[t] = padded[2 * t + 1];
                    }
                }
                let base = (v_off + ci) * nt + ty * tw;
                // patch column c of tile t is even[t + c/2] (c even) or odd[t + c/2] (c odd)
                let mut t0 = 0;
                while t0 < tw {
                    let n = 16.min(tw - t0);
                    // (no `array::from_fn`: its closures do not inherit the path's target
                    // features, and their arrays of vectors were copied through memmove: 7 % of
                    // the batch-1 inference)
                    let at = |r: usize| ((2 * ty + r) % 4) * m + t0;
                    let d = [
                        patch_row(s, &ev[at(0)..], &od[at(0)..]),
                        patch_row(s, &ev[at(1)..], &od[at(1)..]),
                        patch_row(s, &ev[at(2)..], &od[at(2)..]),
                        patch_row(s, &ev[at(3)..], &od[at(3)..]),
                    ];
                    // t = Bᵀ·d (rows), then V = t·B (columns)
                    let (d0, d1, d2, d3) = (d[0], d[1], d[2], d[3]);
                    let tt: [[S::V; 4]; 4] = [
                        [s.sub(d0[0], d2[0]), s.sub(d0[1], d2[1]), s.sub(d0[2], d2[2]), s.sub(d0[3], d2[3])],
                        [s.add(d1[0], d2[0]), s.add(d1[1], d2[1]), s.add(d1[2], d2[2]), s.add(d1[3], d2[3])],
                        [s.sub(d2[0], d1[0]), s.sub(d2[1], d1[1]), s.sub(d2[2], d1[2]), s.sub(d2[3], d1[3])],
                        [s.sub(d1[0], d3[0]), s.sub(d1[1], d3[1]), s.sub(d1[2], d3[2]), s.sub(d1[3], d3[3])],
                    ];
                    for (r, tr) in tt.iter().enumerate() {
                        let row = [s.sub(tr[0], tr[2]), s.add(tr[1], tr[2]), s.sub(tr[2], tr[1]), s.sub(tr[1], tr[3])];
                        for (c, &val) in row.iter().enumerate() {
                            // SAFETY: n floats of channel ci's row of plane 4r + c
                            // (input_transform's contract)
                            unsafe { store(s, v.get().add((4 * r + c) * plane + base + t0), val, n) };
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
                    let (y0, x0) = (2 * (ty0 + ty) as isize - 1, 2 * tx as isize - 1);
                    let mut tt = [[0.0f32; 4]; 4];
                    for c in 0..4 {
                        let d: [f32; 4] = std::array::from_fn(|r| at(y0 + r as isize, x0 + c as isize));
                        tt[0][c] = d[0] - d[2];
                        tt[1][c] = d[1] + d[2];
                        tt[2][c] = d[2] - d[1];
                        tt[3][c] = d[1] - d[3];
                    }
                    let base = (v_off + ci) * nt + ty * tw + tx;
                    for (r, tr) in tt.iter().enumerate() {
                        let row = [tr[0] - tr[2], tr[1] + tr[2], tr[2] - tr[1], tr[1] - tr[3]];
                        for (c, val) in row.into_iter().enumerate() {
                            // SAFETY: channel ci's row of plane 4r + c (input_transform's contract)
                            unsafe { *v.get().add((4 * r + c) * plane + base) = val };
                        }
                    }
                }
            }
        }
    }
}

/// y (+)= Aᵀ m A + bias for the band's tiles, m[ξ][co][t]; Aᵀ = [[1, 1, 1, 0], [0, 1, −1, −1]].
/// Writes only pixels inside the image (a last tile row or column may hang over). Runs on
/// vectors of 16 tiles of a tile row (each plane's row is contiguous), interleaving each
/// output row's even and odd pixels in registers. Only output channels [co0, co1); m holds the
/// rows of output channels [m_co0, m_co0 + m_nco) of each plane and at least
/// `winograd4::SLACK` floats after the last (its loads are all 16 lanes wide; a shorter m
/// panics). `s` is (Co, H, W) of the output.
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

/// Made only by `output_transform`, whose caller vouches for `out`.
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
        for co in cos.0..cos.1 {
            let bv = s.splat(bias.map_or(0.0, |b| b[co]));
            for ty in 0..nty {
                let base = (co - m_co0) * nt + ty * tw;
                let mut t0 = 0;
                while t0 < tw {
                    let n = 16.min(tw - t0);
                    // full 16-lane loads (m's slack, see the doc comment); lanes past the row's
                    // last tile are never stored
                    // (no `array::from_fn`: see the input transform)
                    let (a00, a10) = out_col(s, m, plane, base + t0);
                    let (a01, a11) = out_col(s, m, plane, plane + base + t0);
                    let (a02, a12) = out_col(s, m, plane, 2 * plane + base + t0);
                    let (a03, a13) = out_col(s, m, plane, 3 * plane + base + t0);
                    let (a0, a1) = ([a00, a01, a02, a03], [a10, a11, a12, a13]);
                    let y = [
                        s.add(s.add(s.add(a0[0], a0[1]), a0[2]), bv),
                        s.add(s.sub(s.sub(a0[1], a0[2]), a0[3]), bv),
                        s.add(s.add(s.add(a1[0], a1[1]), a1[2]), bv),
                        s.add(s.sub(s.sub(a1[1], a1[2]), a1[3]), bv),
                    ];
                    // output pixels 2·t0 .. of the two rows (the last may be cut by the width)
                    let cnt = (2 * n).min(dims.w - 2 * t0);
                    for i in 0..2 {
                        let yy = 2 * (ty0 + ty) + i;
                        if yy >= dims.h {
                            continue;
                        }
                        let (lo, hi) = s.interleave(y[2 * i], y[2 * i + 1]);
                        let (nlo, nhi) = (cnt.min(16), cnt.saturating_sub(16));
                        // SAFETY: pixels [2·t0, 2·t0 + cnt) of row yy of channel co of image b's
                        // output, inside the row (cnt is cut to the width); the band's rows are
                        // this task's (output_transform's contract); raw pointers: without
                        // `accumulate` the output may be unwritten memory.
                        unsafe {
                            let p = yb.get().add((co * dims.h + yy) * dims.w + 2 * t0);
                            let (lo, hi) = if accumulate {
                                let old = std::slice::from_raw_parts(p, cnt);
                                let old_hi = if nhi > 0 { s.load_first(&old[16..], nhi) } else { s.zero() };
                                (s.add(s.load_first(old, nlo), lo), s.add(old_hi, hi))
                            } else {
                                (lo, hi)
                            };
                            store(s, p, lo, nlo);
                            if nhi > 0 {
                                store(s, p.add(16), hi, nhi);
                            }
                        }
                    }
                    t0 += 16;
                }
            }
        }
    }

    /// One tile at a time, the same operations as `run`'s lanes.
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
                    let e: [f32; 16] = std::array::from_fn(|k| m[k * plane + base]);
                    let a0: [f32; 4] = std::array::from_fn(|c| (e[c] + e[4 + c]) + e[8 + c]);
                    let a1: [f32; 4] = std::array::from_fn(|c| (e[4 + c] - e[8 + c]) - e[12 + c]);
                    let y = [
                        [((a0[0] + a0[1]) + a0[2]) + bv, ((a0[1] - a0[2]) - a0[3]) + bv],
                        [((a1[0] + a1[1]) + a1[2]) + bv, ((a1[1] - a1[2]) - a1[3]) + bv],
                    ];
                    for (i, yr) in y.iter().enumerate() {
                        let yy = 2 * (ty0 + ty) + i;
                        for (j, &val) in yr.iter().enumerate() {
                            let xx = 2 * tx + j;
                            if yy >= dims.h || xx >= dims.w {
                                continue;
                            }
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

crate::multiversion! {
    /// dM[ξ][co][t] = (A e Aᵀ)[ξ] for the band's tiles, e = the 2×2 output gradient of tile t
    /// (zero where the tile hangs over the image); A = [[1, 0], [1, 1], [1, −1], [0, −1]]. Only output
    /// channels [co0, co1); m holds 16·Co·nt floats, these channels' rows of every plane the caller's.
    /// `s` is (Co, H, W) of the output gradient.
    ///
    /// # Safety
    /// m points to 16 planes of Co·nt floats; rows [co0, co1) of each are the caller's to write.
    pub unsafe fn grad_transform(dyb: &[f32], s: Chw, band: (usize, usize, usize), cos: (usize, usize), m: SendPtr) {
        let (ty0, nty, tw) = band;
        let nt = nty * tw;
        let plane = s.c * nt;
        // the two output rows of a tile row, split into even and odd columns (0 past the edge)
        let mut eo = [vec![0.0f32; tw], vec![0.0f32; tw], vec![0.0f32; tw], vec![0.0f32; tw]];
        for co in cos.0..cos.1 {
            for ty in 0..nty {
                for i in 0..2 {
                    let yy = 2 * (ty0 + ty) + i;
                    let (ev, od) = eo.split_at_mut(2);
                    let (e, o) = (&mut ev[i], &mut od[i]);
                    if yy >= s.h {
                        e.fill(0.0);
                        o.fill(0.0);
                        continue;
                    }
                    let row = &dyb[(co * s.h + yy) * s.w..][..s.w];
                    for t in 0..tw {
                        e[t] = row[2 * t];
                        o[t] = if 2 * t + 1 < s.w { row[2 * t + 1] } else { 0.0 };
                    }
                }
                let base = co * nt + ty * tw;
                let (r0, r1) = (eo[0].iter().zip(&eo[2]), eo[1].iter().zip(&eo[3]));
                for (t, ((&a, &b), (&c, &d))) in r0.zip(r1).enumerate() {
                    // e = [[a, b], [c, d]]; A e Aᵀ, A's rows [1, 0], [1, 1], [1, −1], [0, −1]
                    let rows = [[a, b], [a + c, b + d], [a - c, b - d], [-c, -d]];
                    for (r, &[p, q]) in rows.iter().enumerate() {
                        let vals = [p, p + q, p - q, -q];
                        for (cc, &v) in vals.iter().enumerate() {
                            // SAFETY: channel co's row of plane 4r + cc (the caller's contract)
                            unsafe { *m.get().add((4 * r + cc) * plane + base + t) = v };
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

    /// Values that are not round in binary, so that a changed order of sums would show.
    fn values(n: usize, seed: usize) -> Vec<f32> {
        (0..n).map(|i| (((i * 7919 + seed * 104729) % 1000) as f32 - 500.0) / 37.0).collect()
    }

    /// The three transforms on one shape, into fresh buffers (NaN where nothing is written).
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
            let (th, tw) = (h.div_ceil(2), w.div_ceil(2));
            let nt = th * tw;
            let wts = values(co * ci * 9, 1);
            let mut u = vec![f32::NAN; 16 * co * ci];
            for o in 0..co {
                let k = WeightRows { wo: &wts[o * ci * 9..], oci: (o, co, ci), u: SendPtr(u.as_mut_ptr()) };
                if compact {
                    k.scalar()
                } else {
                    k.run(s)
                }
            }
            let x = values(ci * h * w, 2);
            let mut v = vec![f32::NAN; 16 * ci * nt];
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
            let m = values(16 * co * nt + crate::winograd4::SLACK, 3);
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
        for (ci, co, h, w) in [(1, 1, 1, 1), (3, 2, 5, 7), (17, 5, 6, 33), (33, 3, 4, 64), (16, 16, 3, 100)] {
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
