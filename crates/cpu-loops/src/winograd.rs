//! The transforms of the cpu Winograd F(2×2, 3×3) convolution (`reclmis::ops::conv::winograd`,
//! which holds the algorithm, the bands and the GEMMs): 16 input channels or tiles at a time on
//! vector lanes.

use crate::math::SendPtr;

/// Channels, height and width of the image a transform reads or writes.
#[derive(Clone, Copy, Debug)]
pub struct Chw {
    pub c: usize,
    pub h: usize,
    pub w: usize,
}

/// The first n lanes to dst: one vector store when all 16 go (a copy of run-time length is a
/// library call).
///
/// SAFETY: n <= 16 floats writable at dst.
#[inline(always)]
unsafe fn store(vals: &[f32; 16], dst: *mut f32, n: usize) {
    if n == 16 {
        (dst as *mut [f32; 16]).write_unaligned(*vals);
    } else {
        std::ptr::copy_nonoverlapping(vals.as_ptr(), dst, n);
    }
}

crate::multiversion! {
    /// Row o of every plane of U (16 planes of co x ci at u, row o this caller's alone), 16
    /// input channels at a time (the arithmetic on lanes).
    ///
    /// # Safety
    /// u points to 16 planes of co × ci floats; row o of each is the caller's to write.
    pub unsafe fn weight_rows(wo: &[f32], oci: (usize, usize, usize), u: SendPtr) {
        let (o, co, ci) = oci;
        const L: usize = 16;
        let plane = co * ci;
        let mut i0 = 0;
        while i0 < ci {
            let n = L.min(ci - i0);
            let mut g = [[0.0f32; L]; 9];
            for (k, gk) in g.iter_mut().enumerate() {
                for (l, x) in gk.iter_mut().enumerate().take(n) {
                    *x = wo[(i0 + l) * 9 + k];
                }
            }
            // t = G·g, per column c (g[3r + c] is row r, column c)
            let mut t = [[[0.0f32; L]; 3]; 4];
            for c in 0..3 {
                for l in 0..L {
                    let (g0, g1, g2) = (g[c][l], g[3 + c][l], g[6 + c][l]);
                    t[0][c][l] = g0;
                    t[1][c][l] = 0.5 * (g0 + g1 + g2);
                    t[2][c][l] = 0.5 * (g0 - g1 + g2);
                    t[3][c][l] = g2;
                }
            }
            // U = t·Gᵀ
            for (r, tr) in t.iter().enumerate() {
                let mut row = [[0.0f32; L]; 4];
                for l in 0..L {
                    row[0][l] = tr[0][l];
                    row[1][l] = 0.5 * (tr[0][l] + tr[1][l] + tr[2][l]);
                    row[2][l] = 0.5 * (tr[0][l] - tr[1][l] + tr[2][l]);
                    row[3][l] = tr[2][l];
                }
                for (c, vals) in row.iter().enumerate() {
                    // SAFETY: n <= ci − i0 floats of row o of plane 4r + c (the caller's contract).
                    unsafe { store(vals, u.get().add((4 * r + c) * plane + o * ci + i0), n) };
                }
            }
            i0 += L;
        }
    }
}

crate::multiversion! {
    /// V[ξ][ci][t] = (Bᵀ d B)[ξ] for the band's tiles t (tile rows ty0.., tw tiles per row) of
    /// image xb [Ci, H, W], d = the 4×4 patch at (2ty − 1, 2tx − 1), zero outside the image;
    /// Bᵀ = [[1, 0, −1, 0], [0, 1, 1, 0], [0, −1, 1, 0], [0, 1, 0, −1]]. Each patch row is read
    /// from a zero-padded copy of the input row split into even and odd columns, so a tile row's
    /// patches are contiguous loads and the arithmetic runs on vectors of tiles.
    ///
    /// Only channels [ci0, ci1) are transformed (callers split the channels across threads); v holds
    /// 16·Ci·nt floats, of which these channels' rows of every plane are the caller's alone.
    /// xb is one image's channels of one input slice; its channel c goes to row v_off + c of V.
    /// `s` is (Ci, H, W) of the whole input (all slices).
    ///
    /// # Safety
    /// v points to 16 planes of Ci·nt floats; rows v_off + [ci0, ci1) of each are the caller's
    /// to write, and xb holds at least ci1 channels of H·W.
    pub unsafe fn input_transform(xb: &[f32], s: Chw, band: (usize, usize, usize), cis: (usize, usize), vrows: (SendPtr, usize)) {
        let (v, v_off) = vrows;
        let (ty0, nty, tw) = band;
        let nt = nty * tw;
        let plane = s.c * nt;
        // per patch row r: even[t] = padded[2t], odd[t] = padded[2t + 1], t in 0..=tw, where
        // padded[j] = x[row][j − 1] (0 outside)
        let mut ev = vec![0.0f32; 4 * (tw + 1)];
        // 2·(tw + 1) >= W + 2: room for the left zero, the row and a right zero (or two)
        let mut padded = vec![0.0f32; 2 * (tw + 1)];
        let mut od = vec![0.0f32; 4 * (tw + 1)];
        for ci in cis.0..cis.1 {
            let x = &xb[ci * s.h * s.w..(ci + 1) * s.h * s.w];
            for ty in 0..nty {
                for r in 0..4 {
                    let iy = 2 * (ty0 + ty) as isize - 1 + r as isize;
                    let (e, o) = (&mut ev[r * (tw + 1)..(r + 1) * (tw + 1)], &mut od[r * (tw + 1)..(r + 1) * (tw + 1)]);
                    if iy < 0 || iy >= s.h as isize {
                        e.fill(0.0);
                        o.fill(0.0);
                        continue;
                    }
                    // padded[j] = x[row][j − 1], zero at j = 0 and past the row, then split
                    padded[1..=s.w].copy_from_slice(&x[iy as usize * s.w..(iy as usize + 1) * s.w]);
                    for ((ev_t, od_t), pair) in e.iter_mut().zip(o.iter_mut()).zip(padded.chunks_exact(2)) {
                        *ev_t = pair[0];
                        *od_t = pair[1];
                    }
                }
                let base = (v_off + ci) * nt + ty * tw;
                // 16 tiles at a time on lanes: patch column c of tile t is even[t + c/2] (c
                // even) or odd[t + c/2] (c odd) of its row
                const L: usize = 16;
                let mut t0 = 0;
                while t0 < tw {
                    let n = L.min(tw - t0);
                    let mut d = [[[0.0f32; L]; 4]; 4];
                    for (r, dr) in d.iter_mut().enumerate() {
                        let (e, o) = (&ev[r * (tw + 1) + t0..], &od[r * (tw + 1) + t0..]);
                        if n == L {
                            // constant lengths: vector moves, not library calls
                            dr[0].copy_from_slice(&e[..L]);
                            dr[1].copy_from_slice(&o[..L]);
                            dr[2].copy_from_slice(&e[1..L + 1]);
                            dr[3].copy_from_slice(&o[1..L + 1]);
                        } else {
                            dr[0][..n].copy_from_slice(&e[..n]);
                            dr[1][..n].copy_from_slice(&o[..n]);
                            dr[2][..n].copy_from_slice(&e[1..n + 1]);
                            dr[3][..n].copy_from_slice(&o[1..n + 1]);
                        }
                    }
                    // t = Bᵀ·d (rows), then V = t·B (columns)
                    let mut tt = [[[0.0f32; L]; 4]; 4];
                    for c in 0..4 {
                        for l in 0..L {
                            tt[0][c][l] = d[0][c][l] - d[2][c][l];
                            tt[1][c][l] = d[1][c][l] + d[2][c][l];
                            tt[2][c][l] = d[2][c][l] - d[1][c][l];
                            tt[3][c][l] = d[1][c][l] - d[3][c][l];
                        }
                    }
                    for (r, tr) in tt.iter().enumerate() {
                        let mut row = [[0.0f32; L]; 4];
                        for l in 0..L {
                            row[0][l] = tr[0][l] - tr[2][l];
                            row[1][l] = tr[1][l] + tr[2][l];
                            row[2][l] = tr[2][l] - tr[1][l];
                            row[3][l] = tr[1][l] - tr[3][l];
                        }
                        for (c, vals) in row.iter().enumerate() {
                            // SAFETY: n floats of channel ci's row of plane 4r + c (the
                            // caller's contract)
                            unsafe { store(vals, v.get().add((4 * r + c) * plane + base + t0), n) };
                        }
                    }
                    t0 += L;
                }
            }
        }
    }
}

crate::multiversion! {
    /// y (+)= Aᵀ m A + bias for the band's tiles, m[ξ][co][t]; Aᵀ = [[1, 1, 1, 0], [0, 1, −1, −1]].
    /// Writes only pixels inside the image (a last tile row or column may hang over). Runs on
    /// vectors of a tile row's tiles (each plane's row is contiguous), then interleaves. Only
    /// output channels [co0, co1); m holds the rows of output channels [m_co0, m_co0 + m_nco) of
    /// each plane. `s` is (Co, H, W) of the output.
    ///
    /// # Safety
    /// yb is one image's output [Co, H, W] (initialised when accumulating); the band's output rows
    /// of channels [co0, co1) are the caller's alone.
    pub unsafe fn output_transform(mrows: (&[f32], usize, usize), s: Chw, band: (usize, usize, usize), cos: (usize, usize), bias: Option<&[f32]>, out: (SendPtr, bool)) {
        let ((m, m_co0, m_nco), (yb, accumulate)) = (mrows, out);
        let (ty0, nty, tw) = band;
        let nt = nty * tw;
        let plane = m_nco * nt;
        let mut y = [vec![0.0f32; tw], vec![0.0f32; tw], vec![0.0f32; tw], vec![0.0f32; tw]];
        let mut line = vec![0.0f32; 2 * tw];
        for co in cos.0..cos.1 {
            let bv = bias.map_or(0.0, |b| b[co]);
            for ty in 0..nty {
                let base = (co - m_co0) * nt + ty * tw;
                let e: [&[f32]; 16] = std::array::from_fn(|k| &m[k * plane + base..][..tw]);
                // 16 input rows and 4 output rows at the same t: an index loop is the clear form
                #[allow(clippy::needless_range_loop)]
                for t in 0..tw {
                    let mut a = [[0.0f32; 4]; 2];
                    for c in 0..4 {
                        a[0][c] = e[c][t] + e[4 + c][t] + e[8 + c][t];
                        a[1][c] = e[4 + c][t] - e[8 + c][t] - e[12 + c][t];
                    }
                    y[0][t] = a[0][0] + a[0][1] + a[0][2] + bv;
                    y[1][t] = a[0][1] - a[0][2] - a[0][3] + bv;
                    y[2][t] = a[1][0] + a[1][1] + a[1][2] + bv;
                    y[3][t] = a[1][1] - a[1][2] - a[1][3] + bv;
                }
                for i in 0..2 {
                    let yy = 2 * (ty0 + ty) + i;
                    if yy >= s.h {
                        continue;
                    }
                    // interleave the row's even and odd pixels, then one pass into the output
                    for ((pair, &a), &b) in line.chunks_exact_mut(2).zip(&y[2 * i]).zip(&y[2 * i + 1]) {
                        pair[0] = a;
                        pair[1] = b;
                    }
                    // SAFETY: row yy of channel co of image b's output (this task's rows); raw
                    // pointer: without `accumulate` the output may be unwritten memory.
                    let out = unsafe { yb.get().add((co * s.h + yy) * s.w) };
                    if accumulate {
                        for (x, &v) in line[..s.w].iter().enumerate() {
                            // SAFETY: as above, x < W.
                            unsafe { *out.add(x) += v };
                        }
                    } else {
                        // SAFETY: as above, W floats.
                        unsafe { std::ptr::copy_nonoverlapping(line.as_ptr(), out, s.w) };
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
