//! cpu attention: per (batch, head), blocks of query rows (`Problem::block_rows`). A block's
//! logits live in a per-task buffer that stays in cache, stored transposed (key-major, St[j][i]) so that every
//! product of the forward and backward has the form "scalars of one operand broadcast against
//! contiguous rows of the other" (`bmm`), which needs no packing: only the block's q (and dO)
//! rows are transposed, [rows, Dh] -> [Dh, rows]. Tasks run in parallel over (batch, head) with
//! rayon. (The gemm crate was 2-3x slower here: at 18 x 196 x 128 its per-call packing and set-up
//! cost more than the arithmetic.) The same layout serves Tq > S: a query-major variant, which
//! transposed K and V once per head instead of every query block, padded the 18 text keys to 32
//! and was 10-20% slower at 196 -> 18.

use super::{AttnShape, COND_EPS};
use crate::ops::cpu_math::{self, SendPtr, Unfilled};
use rayon::prelude::*;

/// Query rows per block at least: 64 x 196 keys x 4 B = 50 KB of logits, inside L2 with the
/// operands; more when there are fewer keys.
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

/// Zero rows [j0, s) of head h's columns of dk and dv of batch b: the keys that no block
/// reached (causally unseen, or masked after the last valid key).
///
/// SAFETY: as `bwd_products`.
unsafe fn zero_unreached_keys(pr: &Problem, (b, h, j0): (usize, usize, usize), outs: BwdOut) {
    for j in j0..pr.sh.s {
        for dst in [outs.dk, outs.dv] {
            // raw writes: the memory may not have been initialised yet
            std::ptr::write_bytes(dst.at(pr.at(b, pr.sh.s, j, h)), 0, pr.sh.dh);
        }
    }
}

/// Scalars A(r, k) = ptr[r·rs + k·cs] of a product's left operand.
#[derive(Clone, Copy)]
struct Bcast {
    ptr: *const f32,
    rs: usize,
    cs: usize,
}

/// Contiguous rows: element (r, c) at ptr[r·ld + c].
#[derive(Clone, Copy)]
struct Rows {
    ptr: *const f32,
    ld: usize,
}

#[derive(Clone, Copy)]
struct RowsMut {
    ptr: *mut f32,
    ld: usize,
}

/// One register tile of `bmm`: R rows x C columns of C at (i0, j0), over all of k.
///
/// SAFETY: the caller's contract of `bmm`, with i0 + R <= m and j0 + C <= n.
#[inline(always)]
unsafe fn tile<const R: usize, const C: usize>(
    (i0, j0, (k0, k1)): (usize, usize, (usize, usize)),
    a: Bcast,
    b: Rows,
    c: RowsMut,
    accumulate: bool,
) {
    let mut acc = [[0.0f32; C]; R];
    if accumulate {
        for (rr, row) in acc.iter_mut().enumerate() {
            *row = *(c.ptr.add((i0 + rr) * c.ld + j0) as *const [f32; C]);
        }
    }
    for kk in k0..k1 {
        let brow = &*(b.ptr.add(kk * b.ld + j0) as *const [f32; C]);
        for (rr, row) in acc.iter_mut().enumerate() {
            let av = *a.ptr.add((i0 + rr) * a.rs + kk * a.cs);
            for l in 0..C {
                row[l] = av.mul_add(brow[l], row[l]);
            }
        }
    }
    for (rr, row) in acc.iter().enumerate() {
        *(c.ptr.add((i0 + rr) * c.ld + j0) as *mut [f32; C]) = *row;
    }
}

/// A column remainder narrower than 16: R rows x w columns at (i0, j0), accumulated in
/// registers like `tile` (w is known only at run time).
///
/// SAFETY: as `tile`, with j0 + w <= n and w <= 16.
#[inline(always)]
unsafe fn edge<const R: usize>(
    (i0, j0, (k0, k1)): (usize, usize, (usize, usize)),
    w: usize,
    a: Bcast,
    b: Rows,
    c: RowsMut,
    accumulate: bool,
) {
    let mut acc = [[0.0f32; 16]; R];
    if accumulate {
        for (rr, row) in acc.iter_mut().enumerate() {
            row[..w].copy_from_slice(std::slice::from_raw_parts(c.ptr.add((i0 + rr) * c.ld + j0), w));
        }
    }
    for kk in k0..k1 {
        let brow = std::slice::from_raw_parts(b.ptr.add(kk * b.ld + j0), w);
        for (rr, row) in acc.iter_mut().enumerate() {
            let av = *a.ptr.add((i0 + rr) * a.rs + kk * a.cs);
            for (x, &bv) in row[..w].iter_mut().zip(brow) {
                *x = av.mul_add(bv, *x);
            }
        }
    }
    for (rr, row) in acc.iter().enumerate() {
        // a raw copy: C may be memory not yet initialised (`Unfilled`)
        std::ptr::copy_nonoverlapping(row.as_ptr(), c.ptr.add((i0 + rr) * c.ld + j0), w);
    }
}

/// R rows of C at i0, all n columns: 32-wide tiles, a 16-wide one, then the remainder.
///
/// SAFETY: as `tile`, with i0 + R <= m.
#[inline(always)]
unsafe fn row_block<const R: usize>(
    (i0, n, k): (usize, usize, (usize, usize)),
    a: Bcast,
    b: Rows,
    c: RowsMut,
    accumulate: bool,
) {
    let mut j0 = 0;
    while j0 + 32 <= n {
        tile::<R, 32>((i0, j0, k), a, b, c, accumulate);
        j0 += 32;
    }
    if j0 + 16 <= n {
        tile::<R, 16>((i0, j0, k), a, b, c, accumulate);
        j0 += 16;
    }
    if j0 + 8 <= n {
        tile::<R, 8>((i0, j0, k), a, b, c, accumulate);
        j0 += 8;
    }
    if j0 < n {
        edge::<R>((i0, j0, k), n - j0, a, b, c, accumulate);
    }
}

cpu_math::multiversion! {
    /// C (m x n) = [C +] A (m x k) · B (k x n) in register tiles of 4 rows x 32 columns (each k
    /// step broadcasts 4 scalars of A against a 32-wide row of B: two vector loads, eight FMAs);
    /// 16-wide and narrower column remainders (the 18 text tokens are 16 + 2) and single
    /// leftover rows get their own register tiles.
    fn bmm_impl(mnk: (usize, usize, usize), band: Band, a: Bcast, b: Rows, c: RowsMut, accumulate: bool) {
        let (m, n, k) = mnk;
        // SAFETY (whole body): the caller's contract of `bmm`; every tile stays inside m x n and
        // its k range inside 0..k.
        unsafe {
            let m6 = m - m % 8;
            for i0 in (0..m6).step_by(8) {
                row_block::<8>((i0, n, band.range(i0, i0 + 8, k)), a, b, c, accumulate);
            }
            let r = band.range(m6, m, k);
            match m - m6 {
                0 => {}
                1 => row_block::<1>((m6, n, r), a, b, c, accumulate),
                2 => row_block::<2>((m6, n, r), a, b, c, accumulate),
                3 => row_block::<3>((m6, n, r), a, b, c, accumulate),
                4 => row_block::<4>((m6, n, r), a, b, c, accumulate),
                5 => row_block::<5>((m6, n, r), a, b, c, accumulate),
                6 => row_block::<6>((m6, n, r), a, b, c, accumulate),
                _ => row_block::<7>((m6, n, r), a, b, c, accumulate),
            }
        }
    }
}

/// C = [C +] A·B, single-threaded. FMAs in the AVX2/AVX-512 builds (the baseline build, for
/// CPUs without them, calls fmaf and is slow but right).
///
/// SAFETY: for every r < m, kk < k, j < n: A(r, kk), B(kk, j) and C(r, j) lie inside live
/// slices, and C does not overlap A or B.
unsafe fn bmm(mnk: (usize, usize, usize), a: Bcast, b: Rows, c: RowsMut, accumulate: bool) {
    bmm_band(mnk, Band::FULL, a, b, c, accumulate)
}

/// `bmm` over only the k range that `band` gives each block of rows (the rest of A is zero:
/// causally masked probabilities).
///
/// SAFETY: as `bmm`.
unsafe fn bmm_band(mnk: (usize, usize, usize), band: Band, a: Bcast, b: Rows, c: RowsMut, accumulate: bool) {
    if mnk.0 > 0 && mnk.1 > 0 {
        bmm_impl(mnk, band, a, b, c, accumulate)
    }
}

/// Which k a block of rows [r0, r1) of a product needs when A is causally banded: k < r1 + hi
/// (A(r, k) = 0 for k > r + hi) and k >= r0 + lo (A(r, k) = 0 for k < r + lo).
#[derive(Clone, Copy)]
struct Band {
    hi: Option<isize>,
    lo: Option<isize>,
}

impl Band {
    const FULL: Band = Band { hi: None, lo: None };

    /// Keys j <= i0 + i of query row i (products over keys, rows = the block's queries).
    fn keys_upto(i0: usize, causal: bool) -> Band {
        Band { hi: causal.then_some(i0 as isize), lo: None }
    }

    /// Queries i with i0 + i >= j of key row j = j0 + r (products over queries, rows = keys
    /// from j0 on).
    fn queries_from(j0: usize, i0: usize, causal: bool) -> Band {
        Band { hi: None, lo: causal.then_some(j0 as isize - i0 as isize) }
    }

    fn range(&self, r0: usize, r1: usize, k: usize) -> (usize, usize) {
        let clamp = |x: isize| x.clamp(0, k as isize) as usize;
        let k1 = self.hi.map_or(k, |h| clamp(r1 as isize + h));
        let k0 = self.lo.map_or(0, |l| clamp(r0 as isize + l)).min(k1);
        (k0, k1)
    }
}

/// [rows, dh] rows of x (row stride e) -> [dh, ld], zero in the columns rows..ld: 16 x 16
/// blocks through AVX-512 shuffles where the CPU has them (a last partial block of rows reads
/// zeros for the missing rows, which also writes the first padding columns), element by element
/// elsewhere.
fn transpose_block(x: &[f32], e: usize, (rows, ld): (usize, usize), dh: usize, out: &mut [f32]) {
    assert!(rows <= ld && out.len() >= dh * ld && (rows == 0 || x.len() >= (rows - 1) * e + dh));
    // rows [0, r0) of the columns [0, db) are done by the vector path; the columns from z0 on are
    // zeroed by the final loop
    let (mut r0, mut db, mut z0) = (0, 0, rows);
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx512f") {
        // whole blocks of 16 rows, and a partial last one when its 16 columns fit in ld
        let rv = if rows.next_multiple_of(16) <= ld { rows } else { rows - rows % 16 };
        db = dh - dh % 16;
        // SAFETY: the CPU has AVX-512F; every block reads rows r..r + nr (<= rows) at columns
        // d..d+16 (<= dh) of x and writes rows d..d+16 at columns r..r+16 (<= ld) of out,
        // inside the bounds asserted above.
        unsafe {
            for r in (0..rv).step_by(16) {
                let nr = 16.min(rv - r);
                for d in (0..db).step_by(16) {
                    transpose16(x.as_ptr().add(r * e + d), e, nr, out.as_mut_ptr().add(d * ld + r), ld);
                }
            }
        }
        r0 = rv;
        if db > 0 {
            z0 = rv.next_multiple_of(16).max(rows);
        }
    }
    for r in 0..rows {
        // the columns d >= db of every row, and all columns of the rows r >= r0
        let d0 = if r < r0 { db } else { 0 };
        for (d, &v) in x[r * e + d0..r * e + dh].iter().enumerate() {
            out[(d0 + d) * ld + r] = v;
        }
    }
    for (d, orow) in out.chunks_exact_mut(ld).take(dh).enumerate() {
        orow[if d < db { z0 } else { rows }..].fill(0.0);
    }
}

/// out[c·lo + r] = x[r·lx + c] for a 16 x 16 block: four rounds of unpack / lane shuffles.
///
/// Rows nr..16 of x are taken as zero (not read).
///
/// SAFETY: AVX-512F; nr <= 16 rows of 16 floats readable at x (stride lx), 16 rows of 16 floats
/// writable at out (stride lo).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn transpose16(x: *const f32, lx: usize, nr: usize, out: *mut f32, lo: usize) {
    use std::arch::x86_64::*;
    let mut r = [_mm512_setzero_ps(); 16];
    for (i, v) in r.iter_mut().enumerate().take(nr) {
        *v = _mm512_loadu_ps(x.add(i * lx));
    }
    // interleave pairs of rows (32-bit), then pairs of pairs (64-bit)
    let mut t = [_mm512_setzero_ps(); 16];
    for i in 0..8 {
        t[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
        t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
    }
    for i in 0..4 {
        let (a, b, c, d) = (t[4 * i], t[4 * i + 1], t[4 * i + 2], t[4 * i + 3]);
        r[4 * i] = _mm512_castpd_ps(_mm512_unpacklo_pd(_mm512_castps_pd(a), _mm512_castps_pd(c)));
        r[4 * i + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(_mm512_castps_pd(a), _mm512_castps_pd(c)));
        r[4 * i + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(_mm512_castps_pd(b), _mm512_castps_pd(d)));
        r[4 * i + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(_mm512_castps_pd(b), _mm512_castps_pd(d)));
    }
    // 128-bit lanes: combine row groups 0-3 with 4-7 and 8-11 with 12-15, then the halves
    for i in 0..4 {
        t[i] = _mm512_shuffle_f32x4::<0x88>(r[i], r[i + 4]);
        t[i + 4] = _mm512_shuffle_f32x4::<0xdd>(r[i], r[i + 4]);
        t[i + 8] = _mm512_shuffle_f32x4::<0x88>(r[i + 8], r[i + 12]);
        t[i + 12] = _mm512_shuffle_f32x4::<0xdd>(r[i + 8], r[i + 12]);
    }
    for i in 0..4 {
        r[i] = _mm512_shuffle_f32x4::<0x88>(t[i], t[i + 8]);
        r[i + 8] = _mm512_shuffle_f32x4::<0xdd>(t[i], t[i + 8]);
        r[i + 4] = _mm512_shuffle_f32x4::<0x88>(t[i + 4], t[i + 12]);
        r[i + 12] = _mm512_shuffle_f32x4::<0xdd>(t[i + 4], t[i + 12]);
    }
    for (i, v) in r.iter().enumerate() {
        _mm512_storeu_ps(out.add(i * lo), *v);
    }
}

/// Per key: (additive bias, logit multiplier, ln(w + eps)).
type KeyTerms = (Vec<f32>, Vec<f32>, Vec<f32>);

/// A block of query rows [i0, i0 + rows) of head (b, h), which sees keys [0, kn). Its St
/// buffers have rows of ld = rows rounded up to 16 (whole vector tiles; the extra columns hold
/// finite values from zero queries, and no result reads them).
struct Block {
    b: usize,
    h: usize,
    i0: usize,
    rows: usize,
    ld: usize,
    kn: usize,
}

impl Block {
    fn new(b: usize, h: usize, i0: usize, rows: usize, kn: usize) -> Block {
        Block { b, h, i0, rows, ld: rows.next_multiple_of(16), kn }
    }
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

    /// Keys a query block [i0, i1) of batch row b can see: up to i1 when causal, and never the
    /// masked keys after the last valid one (padding tokens at the end of a note), whose
    /// probabilities and gradients are zero anyway.
    fn key_end(&self, b: usize, i1: usize) -> usize {
        let s = self.sh.s;
        let valid_end = match self.valid {
            Some(v) => v[b * s..(b + 1) * s].iter().rposition(|&x| x != 0).map_or(0, |j| j + 1),
            None => s,
        };
        if self.causal {
            valid_end.min(i1)
        } else {
            valid_end
        }
    }

    /// Query rows per key-major block: QB, or more when there are few keys (the block's logits,
    /// kn x rows floats, stay about 64 KB), so that 196 queries over 18 keys are one block.
    fn block_rows(&self) -> usize {
        ((QB * 256 / self.sh.s.max(1)) / 16 * 16).clamp(QB, 512)
    }

    /// Offset of row t, head h, of a [B, T, E] tensor.
    fn at(&self, b: usize, t_len: usize, t: usize, h: usize) -> usize {
        (b * t_len + t) * self.sh.e() + h * self.sh.dh
    }

    /// St[j][i] = ⟨k_j, q_{i0+i}⟩ (raw products) for the block, from qt = the block's q rows
    /// transposed [dh, ld]. st holds kn x ld.
    fn dots(&self, k: &[f32], qt: &[f32], bl: &Block, st: &mut [f32]) {
        let (e, dh) = (self.sh.e(), self.sh.dh);
        let ka = Bcast { ptr: k[self.at(bl.b, self.sh.s, 0, bl.h)..].as_ptr(), rs: e, cs: 1 };
        // SAFETY: kn rows of dh of k (head h of batch b), dh x ld of qt, kn x ld of st.
        unsafe {
            bmm(
                (bl.kn, bl.ld, dh),
                ka,
                Rows { ptr: qt.as_ptr(), ld: bl.ld },
                RowsMut { ptr: st.as_mut_ptr(), ld: bl.ld },
                false,
            )
        }
    }

    /// Raw products -> logits z = t·scale·mult + bias, −inf where causally masked (St layout).
    fn logits(&self, st: &mut [f32], bl: &Block, bias: &[f32], mult: &[f32]) {
        let first_masked = if self.causal { bl.i0 + 1 } else { usize::MAX };
        logits_keymajor(&mut st[..bl.kn * bl.ld], (bl.ld, bl.rows, bl.i0, first_masked), self.scale, bias, mult);
    }
}

cpu_math::multiversion! {
    /// The key rows of St: z = t·scale·mult_j + bias_j; from key first_masked on (causal: i0 + 1),
    /// query i0 + i sees key j only when j <= i0 + i.
    fn logits_keymajor(st: &mut [f32], geom: (usize, usize, usize, usize), scale: f32, bias: &[f32], mult: &[f32]) {
        let (ld, rows, i0, first_masked) = geom;
        for (j, row) in st.chunks_exact_mut(ld).enumerate() {
            let (f, add) = (scale * mult[j], bias[j]);
            for z in row.iter_mut() {
                *z = *z * f + add;
            }
            if j >= first_masked {
                for z in row.iter_mut().take((j - i0).min(rows)) {
                    *z = f32::NEG_INFINITY;
                }
            }
        }
    }
}

cpu_math::multiversion! {
    /// delta_i = ⟨o_i, dO_i⟩ for `out.len()` rows of dh from offset off (row stride e), once per
    /// block inside the vector build (a scalar dot per row costs more than the row's exps here).
    fn row_dots(o: &[f32], dout: &[f32], at: (usize, usize, usize), out: &mut [f32]) {
        let (off, e, dh) = at;
        for (i, dl) in out.iter_mut().enumerate() {
            let r = off + i * e;
            *dl = cpu_math::dot_lanes(&o[r..r + dh], &dout[r..r + dh]);
        }
    }
}

cpu_math::multiversion! {
    /// Column softmax of St [kn][rows] in place (one column per query); writes lse per column.
    fn softmax_columns(st: &mut [f32], rows: usize, m: &mut [f32], l: &mut [f32], lse: &mut [f32]) {
        m.fill(f32::NEG_INFINITY);
        l.fill(0.0);
        for row in st.chunks_exact(rows) {
            for (mx, &z) in m.iter_mut().zip(row) {
                *mx = if z > *mx { z } else { *mx };
            }
        }
        // a column with no key keeps max −inf: shift it by 0 instead, so exp(−inf − 0) = 0, not
        // NaN (its lse is set to −inf below from l = 0, whatever m holds)
        for mx in m.iter_mut() {
            if *mx == f32::NEG_INFINITY {
                *mx = 0.0;
            }
        }
        for row in st.chunks_exact_mut(rows) {
            for ((z, &s), acc) in row.iter_mut().zip(m.iter()).zip(l.iter_mut()) {
                *z = cpu_math::exp(*z - s);
                *acc += *z;
            }
        }
        for i in 0..rows {
            let inv = if l[i] > 0.0 { 1.0 / l[i] } else { 0.0 };
            lse[i] = if l[i] > 0.0 { m[i] + l[i].ln() } else { f32::NEG_INFINITY };
            m[i] = inv;
        }
        for row in st.chunks_exact_mut(rows) {
            for (z, &inv) in row.iter_mut().zip(m.iter()) {
                *z *= inv;
            }
        }
    }
}

/// Panics unless the slices hold what `pr.sh` says (the loops below write through raw pointers).
fn check_slices(pr: &Problem, q: usize, kv: [usize; 2], rows: &[(&str, usize)]) {
    use crate::ops::{assert_len, product};
    let AttnShape { b, tq, s, .. } = pr.sh;
    let e = pr.sh.h.checked_mul(pr.sh.dh);
    assert_len("attention", "q", q, e.and_then(|e| product(&[b, tq, e])));
    for (n, what) in kv.into_iter().zip(["k", "v"]) {
        assert_len("attention", what, n, e.and_then(|e| product(&[b, s, e])));
    }
    if let Some(v) = pr.valid {
        assert_len("attention", "valid", v.len(), product(&[b, s]));
    }
    if let Cond::Probs(w) | Cond::Logits(w) = pr.cond {
        assert_len("attention", "condition", w.len(), product(&[b, s]));
    }
    for &(what, n) in rows {
        let want = match what {
            "lse" => product(&[b, pr.sh.h, tq]),
            _ => e.and_then(|e| product(&[b, tq, e])),
        };
        assert_len("attention", what, n, want);
    }
}

pub fn forward(q: &[f32], k: &[f32], v: &[f32], pr: &Problem, want_probs: bool) -> Forward {
    check_slices(pr, q.len(), [k.len(), v.len()], &[]);
    let AttnShape { b: nb, h: nh, tq, s, dh } = pr.sh;
    let e = pr.sh.e();
    let terms: Vec<KeyTerms> = (0..nb).map(|b| pr.key_terms(b)).collect();
    let (mut o, mut lse) = (Unfilled::new(nb * tq * e), vec![f32::NEG_INFINITY; nb * nh * tq]);
    let mut probs = if want_probs { Some(vec![0.0; nb * nh * tq * s]) } else { None };
    // One task per (b, h), writing its columns of o (all of them: the product with V writes
    // every query row, zeros for a row that sees no key) and its rows of lse and probs in place.
    let outs =
        FwdOut { o: o.ptr(), lse: SendPtr(lse.as_mut_ptr()), probs: probs.as_mut().map(|p| SendPtr(p.as_mut_ptr())) };
    // scratch per rayon worker: the logits block, the transposed q block, column statistics
    let qrows = pr.block_rows();
    let qb = qrows.min(tq).next_multiple_of(16);
    let scratch =
        || (vec![0.0f32; qb * s], vec![0.0f32; qb * dh], vec![0.0f32; qb], vec![0.0f32; qb], vec![0.0f32; qb]);
    (0..nb * nh).into_par_iter().for_each_init(scratch, |sc, bh| {
        let (b, h) = (bh / nh, bh % nh);
        let (bias, mult, _) = &terms[b];
        // SAFETY: this task alone writes lse[(b·H + h)·Tq ..][..Tq] and that head's
        // probabilities [Tq, S].
        let lse = unsafe { std::slice::from_raw_parts_mut(outs.lse.at(bh * tq), tq) };
        let mut probs = outs.probs.map(|p| unsafe { std::slice::from_raw_parts_mut(p.at(bh * tq * s), tq * s) });
        let (st, qt, m, l, lse_b) = (&mut sc.0, &mut sc.1, &mut sc.2, &mut sc.3, &mut sc.4);
        for i0 in (0..tq).step_by(qrows) {
            let rows = qrows.min(tq - i0);
            let bl = Block::new(b, h, i0, rows, pr.key_end(b, i0 + rows));
            let ld = bl.ld;
            transpose_block(&q[pr.at(b, tq, i0, h)..], e, (rows, ld), dh, &mut qt[..]);
            pr.dots(k, &qt[..], &bl, &mut st[..]);
            pr.logits(&mut st[..], &bl, bias, mult);
            let st_b = &mut st[..bl.kn * ld];
            softmax_columns(st_b, ld, &mut m[..ld], &mut l[..ld], &mut lse_b[..ld]);
            lse[i0..i0 + rows].copy_from_slice(&lse_b[..rows]);
            if let Some(probs) = &mut probs {
                for (j, row) in st_b.chunks_exact(ld).enumerate() {
                    for (i, &p) in row[..rows].iter().enumerate() {
                        probs[(i0 + i) * s + j] = p;
                    }
                }
            }
            // o[i][d] = Σ_j St[j][i]·v[j][d], written into head h's columns of o
            // SAFETY: St holds kn x ld, v has kn rows of dh at row stride e; o's rows i0..
            // of batch b at row stride e, columns h·dh.. (this task's alone).
            unsafe {
                bmm_band(
                    (rows, dh, bl.kn),
                    Band::keys_upto(i0, pr.causal),
                    Bcast { ptr: st.as_ptr(), rs: 1, cs: ld },
                    Rows { ptr: v[pr.at(b, s, 0, h)..].as_ptr(), ld: e },
                    RowsMut { ptr: outs.o.at(pr.at(b, tq, i0, h)), ld: e },
                    false,
                )
            }
        }
    });
    // SAFETY: every task wrote all of its head's columns of o (see above).
    Forward { o: unsafe { o.filled() }, lse, probs }
}

/// Where the forward's tasks write.
#[derive(Clone, Copy)]
struct FwdOut {
    o: SendPtr,
    lse: SendPtr,
    probs: Option<SendPtr>,
}

/// Where the backward's tasks write (dq, dk, dv in place; dw per head, [B, H, S]).
#[derive(Clone, Copy)]
struct BwdOut {
    dq: SendPtr,
    dk: SendPtr,
    dv: SendPtr,
    dw: Option<SendPtr>,
}

pub fn backward(q: &[f32], k: &[f32], v: &[f32], o: &[f32], lse: &[f32], dout: &[f32], pr: &Problem) -> Grads {
    check_slices(pr, q.len(), [k.len(), v.len()], &[("o", o.len()), ("lse", lse.len()), ("dout", dout.len())]);
    let AttnShape { b: nb, h: nh, tq, s, dh } = pr.sh;
    let e = pr.sh.e();
    let terms: Vec<KeyTerms> = (0..nb).map(|b| pr.key_terms(b)).collect();
    let has_w = !matches!(pr.cond, Cond::None);
    let (mut dq, mut dk, mut dv) = (Unfilled::new(q.len()), Unfilled::new(k.len()), Unfilled::new(v.len()));
    let mut dw_heads = vec![0.0f32; if has_w { nb * nh * s } else { 0 }];
    // One task per (b, h), writing all of its columns of dq, dk, dv in place (dq by the product
    // with K, dk and dv by the first block that reaches a key and `zero_unreached_keys`) and
    // its share of dw into the [B, H, S] slot (b, h).
    let outs = BwdOut { dq: dq.ptr(), dk: dk.ptr(), dv: dv.ptr(), dw: has_w.then_some(SendPtr(dw_heads.as_mut_ptr())) };
    // scratch per rayon worker: key-major buffers [kn][ld] (raw products, probabilities, dP then
    // the dS coefficients), the q and dO blocks transposed, per-column delta and exp shift
    let qrows = pr.block_rows();
    let qb = qrows.min(tq).next_multiple_of(16);
    let scratch = || {
        let blk = || vec![0.0f32; qb * s];
        (blk(), blk(), blk(), vec![0.0f32; qb * dh], vec![0.0f32; qb * dh], vec![0.0f32; qb], vec![0.0f32; qb])
    };
    (0..nb * nh).into_par_iter().for_each_init(scratch, |sc, bh| {
        let (b, h) = (bh / nh, bh % nh);
        let (bias, mult, lnw) = &terms[b];
        // SAFETY: slot (b, h) of dw_heads is this task's alone.
        let dw: &mut [f32] = match outs.dw {
            Some(p) => unsafe { std::slice::from_raw_parts_mut(p.at(bh * s), s) },
            None => &mut [],
        };
        let (t, p, dp, qt, dot, delta, shift) =
            (&mut sc.0, &mut sc.1, &mut sc.2, &mut sc.3, &mut sc.4, &mut sc.5, &mut sc.6);
        // keys whose dk/dv rows earlier blocks wrote
        let mut done = 0;
        for i0 in (0..tq).step_by(qrows) {
            let rows = qrows.min(tq - i0);
            let kn = pr.key_end(b, i0 + rows);
            let bl = Block::new(b, h, i0, rows, kn);
            let ld = bl.ld;
            let (qo, doo) = (pr.at(b, tq, i0, h), pr.at(b, tq, i0, h));
            transpose_block(&q[qo..], e, (rows, ld), dh, &mut qt[..]);
            transpose_block(&dout[doo..], e, (rows, ld), dh, &mut dot[..]);
            pr.dots(k, &qt[..], &bl, &mut t[..]);
            let n = kn * ld;
            p[..n].copy_from_slice(&t[..n]);
            pr.logits(&mut p[..], &bl, bias, mult);
            // dPt[j][i] = ⟨v_j, dO_i⟩
            // SAFETY: kn rows of v, dh x ld of dot, kn x ld of dp.
            unsafe {
                bmm(
                    (kn, ld, dh),
                    Bcast { ptr: v[pr.at(b, s, 0, h)..].as_ptr(), rs: e, cs: 1 },
                    Rows { ptr: dot.as_ptr(), ld },
                    RowsMut { ptr: dp.as_mut_ptr(), ld },
                    false,
                )
            }
            // per column: lse (−inf marks "no key", which the padding columns also get) and
            // delta = Σ_d dO·O
            // per column the shift −lse of the exps: 0 for a query row with no key (lse = −inf, only
            // −inf logits, so exp gives 0, where −lse = +inf would give NaN) and for the padding
            shift[..ld].fill(0.0);
            for (sh, &l) in shift.iter_mut().zip(&lse[(b * nh + h) * tq + i0..][..rows]) {
                *sh = if l == f32::NEG_INFINITY { 0.0 } else { -l };
            }
            delta[..ld].fill(0.0);
            row_dots(o, dout, (pr.at(b, tq, i0, h), e, dh), &mut delta[..rows]);
            backward_elems(
                (&mut p[..n], &mut t[..n], &mut dp[..n]),
                (rows, ld),
                (&shift[..ld], &delta[..ld]),
                (mult, lnw),
                (&pr.cond, pr.scale),
                dw,
            );
            // SAFETY: see `bwd_products`.
            unsafe { bwd_products(pr, (b, h, i0), (rows, kn, ld, done), (&p[..], &dp[..]), (q, k, dout), outs) }
            done = done.max(kn);
        }
        // SAFETY: see `bwd_products`.
        unsafe { zero_unreached_keys(pr, (b, h, done), outs) }
    });
    // SAFETY: every task wrote all of its head's columns of dq, dk and dv (see above).
    let mut g = unsafe { Grads { dq: dq.filled(), dk: dk.filled(), dv: dv.filled(), dw: None } };
    if has_w {
        // Σ over heads, in head order
        let mut dw = vec![0.0f32; nb * s];
        for (bh, part) in dw_heads.chunks_exact(s.max(1)).enumerate().take(nb * nh) {
            for (x, y) in dw[(bh / nh) * s..][..s].iter_mut().zip(part) {
                *x += y;
            }
        }
        g.dw = Some(dw);
    }
    g
}

/// The backward's three products for one block, into the shared outputs: dv[j] += Σ_i P·dO_i,
/// dk[j] += Σ_i G·q_i, dq_i = Σ_j G·k_j, with P and G (= dS·scale·mult) key-major [kn][ld].
///
/// SAFETY: p and dp hold the block's kn x ld values; the outputs are the full dq [B,Tq,E], dk,
/// dv [B,S,E], of which only head h's columns of batch b are written (this task's alone).
unsafe fn bwd_products(
    pr: &Problem,
    (b, h, i0): (usize, usize, usize),
    (rows, kn, ld, done): (usize, usize, usize, usize),
    (p, dp): (&[f32], &[f32]),
    (q, k, dout): (&[f32], &[f32], &[f32]),
    outs: BwdOut,
) {
    let AttnShape { tq, s, dh, .. } = pr.sh;
    let e = pr.sh.e();
    // A(j, i) = x[j·ld + i] for dv/dk, A(i, j) for dq
    let (rs_ji, cs_ji) = (ld, 1);
    let (qo, ko) = (pr.at(b, tq, i0, h), pr.at(b, s, 0, h));
    // Keys below `done` were written by earlier blocks of this head and accumulate; the others
    // are assigned (the output starts unwritten, see `Unfilled`).
    for (j0, j1, acc) in [(0, done.min(kn), true), (done.min(kn), kn, false)] {
        for (src, ops, dst) in [(p, dout, outs.dv), (dp, q, outs.dk)] {
            bmm_band(
                (j1 - j0, dh, rows),
                Band::queries_from(j0, i0, pr.causal),
                Bcast { ptr: src.as_ptr().add(j0 * rs_ji), rs: rs_ji, cs: cs_ji },
                Rows { ptr: ops[qo..].as_ptr(), ld: e },
                RowsMut { ptr: dst.at(ko + j0 * e), ld: e },
                acc,
            );
        }
    }
    bmm_band(
        (rows, dh, kn),
        Band::keys_upto(i0, pr.causal),
        Bcast { ptr: dp.as_ptr(), rs: cs_ji, cs: rs_ji },
        Rows { ptr: k[ko..].as_ptr(), ld: e },
        RowsMut { ptr: outs.dq.at(qo), ld: e },
        false,
    );
}

cpu_math::multiversion! {
    /// The elementwise part of the backward for one block, St layout [kn][ld], per key row j (only
    /// the first `rows` columns are queries; the rest are padding and stay out of dw):
    /// p: logits in, probabilities out (exp(z + shift) with shift = −lse per column, 0 where the
    /// column has no key); dp: dP in, dS·scale·mult out; t: raw products (scratch afterwards); dw[j]
    /// gets this head's share.
    fn backward_elems(bufs: (&mut [f32], &mut [f32], &mut [f32]), geom: (usize, usize), stats: (&[f32], &[f32]), terms: (&[f32], &[f32]), cs: (&Cond, f32), dw: &mut [f32]) {
        let ((p, t, dp), (rows, ld), (nl, delta), (mult, lnw), (cond, scale)) = (bufs, geom, stats, terms, cs);
        for (j, ((prow, trow), dprow)) in
            p.chunks_exact_mut(ld).zip(t.chunks_exact_mut(ld)).zip(dp.chunks_exact_mut(ld)).enumerate()
        {
            // Official condition: dw_j gets p/(w_j + eps)·(dP − delta), and
            // p/(w_j + eps) = exp(z − ln(w_j + eps) − lse) without dividing by a tiny w (masked
            // logits are −inf and give 0).
            if let Cond::Probs(_) = cond {
                for ((x, &z), &n) in trow.iter_mut().zip(prow.iter()).zip(nl) {
                    *x = z - lnw[j] + n;
                }
                trow.iter_mut().for_each(|x| *x = cpu_math::exp(*x));
                let mut acc = 0.0f32;
                for ((&x, &g), &dl) in trow[..rows].iter().zip(dprow.iter()).zip(delta) {
                    acc += x * (g - dl);
                }
                dw[j] += acc;
            }
            let keep_t = matches!(cond, Cond::Logits(_));
            for (z, &n) in prow.iter_mut().zip(nl) {
                *z += n;
            }
            prow.iter_mut().for_each(|x| *x = cpu_math::exp(*x));
            if keep_t {
                // z = t·scale·w_j: dz/dw_j = t·scale
                let mut acc = 0.0f32;
                for (((&pv, &g), &dl), &tv) in prow[..rows].iter().zip(dprow.iter()).zip(delta).zip(trow.iter()) {
                    acc += pv * (g - dl) * tv * scale;
                }
                dw[j] += acc;
            }
            let f = scale * mult[j];
            for ((g, &pv), &dl) in dprow.iter_mut().zip(prow.iter()).zip(delta) {
                *g = pv * (*g - dl) * f;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    /// The blocked transpose (AVX-512 16 x 16 shuffles where available) against the definition,
    /// at sizes with and without full blocks, and the zeroed padding columns.
    #[test]
    fn transpose_block_is_a_transpose() {
        for (rows, dh, e, ld) in [
            (16, 16, 16, 16),
            (18, 64, 512, 32),
            (37, 33, 40, 48),
            (64, 128, 512, 64),
            (1, 3, 3, 16),
            (0, 5, 5, 16),
            (20, 16, 16, 24),
        ] {
            let x: Vec<f32> = (0..rows.max(1) * e).map(|i| i as f32).collect();
            let mut out = vec![f32::NAN; dh * ld];
            super::transpose_block(&x, e, (rows, ld), dh, &mut out);
            for d in 0..dh {
                for r in 0..ld {
                    let want = if r < rows { x[r * e + d] } else { 0.0 };
                    assert_eq!(out[d * ld + r], want, "rows {rows} dh {dh} e {e} ld {ld}: out[{d}][{r}]");
                }
            }
        }
    }
}
