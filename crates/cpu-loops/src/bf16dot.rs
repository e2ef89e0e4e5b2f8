//! The bf16 GEMM on AVX512_BF16 (`vdpbf16ps`): C = alpha·A·B (+ bias) from bf16 A and B with f32
//! sums, without widening the operands to f32 first. `vdpbf16ps` multiplies 32 bf16 pairs and
//! adds each lane's two products to an f32 accumulator: per lane twice the multiply-adds of an
//! f32 FMA of the same width, from half the bytes.
//!
//! Arithmetic (the instruction's, measured on the AMD EPYC Zen 4 dev VM against a scalar model:
//! 200,000 random cases bit for bit; Intel documents the same): each product of two bf16 values is
//! exact in f32, and each lane adds the odd element's product, rounds to nearest even, then the
//! even element's product and rounds again; denormal inputs are read as zero and denormal results
//! are flushed to zero, whatever MXCSR says. One output's sum is therefore the sequential chain
//! over k in pairs from 0 (the chain continues through C between k blocks: f32 stores are exact),
//! then `alpha · sum + bias` in the last block. This is the cuda path's arithmetic (exact products,
//! f32 sums, one rounding of C later) up to the order of the sum and the flushed denormals (values
//! below 1.2e-38, far below what a bf16 result can resolve next to normal ones). A CPU without
//! AVX512_BF16 runs the engine's f32 GEMM of widened operands instead: the same function up to
//! the order of the sums, so other bits (the f32 kernels' "same bits on every CPU" does not
//! extend to bf16 products).
//!
//! Layout: B is packed once per product into panels of [`NR`] columns, each pair of k rows
//! interleaved into one u32 per column (the instruction's operand); each task packs its rows of A
//! in [`MR`]-row panels per k block and runs the register tile (MR × NR: 2·MR accumulators of 16
//! lanes, 2 B loads and MR broadcasts per 2·MR instructions) over them.

/// Columns per packed B panel: two 16-lane vectors.
pub const NR: usize = 32;
/// Rows of the register tile (2·MR accumulators + 2 B vectors of the 32 registers).
pub const MR: usize = 12;
/// Pairs of k per block: the tile's B panel (KP · 128 bytes = 32 KB) stays in L1 while a task's
/// row panels pass over it.
const KP: usize = 256;

/// Whether the running CPU has the instructions this kernel is compiled for.
pub fn available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx512f")
            && std::arch::is_x86_feature_detected!("avx512bw")
            && std::arch::is_x86_feature_detected!("avx512vl")
            && std::arch::is_x86_feature_detected!("avx512bf16")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// A bf16 matrix given as raw bits with element (r, c) at `r·rs + c·cs`.
#[derive(Clone, Copy)]
pub struct Strided<'a> {
    pub data: &'a [u16],
    pub rs: usize,
    pub cs: usize,
}

impl Strided<'_> {
    /// Whether every element of a rows × cols matrix lies inside `data`.
    fn covers(&self, rows: usize, cols: usize) -> bool {
        if rows == 0 || cols == 0 {
            return true;
        }
        let last = (rows - 1).checked_mul(self.rs).zip((cols - 1).checked_mul(self.cs));
        last.and_then(|(a, b)| a.checked_add(b)).is_some_and(|i| i < self.data.len())
    }
}

/// B [k, n] packed: panel q holds columns q·NR.. as `kp` rows of NR u32, each the bf16 pair
/// (B[2p][j] low, B[2p + 1][j] high); missing columns and an odd k's last row are zeros (0 · 0
/// adds nothing, whatever the other operand holds).
pub struct PackedB {
    data: Vec<u32>,
    k: usize,
    n: usize,
    kp: usize,
}

impl PackedB {
    /// Packs B [k, n] on this thread; panics if `b` does not hold every element.
    pub fn new(b: Strided<'_>, k: usize, n: usize) -> PackedB {
        PackedB::new_in(b, k, n, &|groups, pack| (0..groups).for_each(pack))
    }

    /// Packs B [k, n] in groups of [`PACK_PANELS`] column panels, `run(groups, pack)` calling
    /// `pack(g)` once for every g < groups, on any threads (the engine's thread pool: B is an
    /// activation of megabytes when it is a 1×1 convolution's input). Panics if `b` does not hold
    /// every element.
    pub fn new_in(b: Strided<'_>, k: usize, n: usize, run: Runner<'_>) -> PackedB {
        assert!(b.covers(k, n), "bf16 dot GEMM: B [{k}, {n}] does not fit its buffer");
        let kp = k.div_ceil(2);
        let panels = n.div_ceil(NR);
        let mut data = vec![0u32; panels * kp * NR];
        let out = crate::math::SendPtr(data.as_mut_ptr());
        run(panels.div_ceil(PACK_PANELS), &|g| {
            let qs = g * PACK_PANELS..panels.min((g + 1) * PACK_PANELS);
            // SAFETY: group g alone writes panels qs, floats [qs.start·kp·NR, qs.end·kp·NR) of data.
            let dst = unsafe { std::slice::from_raw_parts_mut(out.get().add(qs.start * kp * NR), qs.len() * kp * NR) };
            pack_panels(b, k, n, qs, dst);
        });
        PackedB { data, k, n, kp }
    }

    /// Column panels: a task covers a range of them.
    pub fn panels(&self) -> usize {
        self.n.div_ceil(NR)
    }
}

/// Runs `pack(g)` for every g < groups (`PackedB::new_in`).
pub type Runner<'a> = &'a dyn Fn(usize, &(dyn Fn(usize) + Sync));

/// Column panels per packing task.
pub const PACK_PANELS: usize = 16;

/// Panels `qs` of B [k, n] into `dst` (their kp · NR u32 each, zeros included). Where B's rows
/// are contiguous (`cs == 1`) each pair of rows is read in order and interleaved 32 columns at a
/// time; otherwise element by element.
fn pack_panels(b: Strided<'_>, k: usize, n: usize, qs: std::ops::Range<usize>, dst: &mut [u32]) {
    let kp = k.div_ceil(2);
    let q0 = qs.start;
    for p in 0..kp {
        let (r0, r1) = (2 * p, 2 * p + 1);
        for q in qs.clone() {
            let j0 = q * NR;
            let cols = NR.min(n - j0);
            let out = &mut dst[((q - q0) * kp + p) * NR..][..NR];
            if b.cs == 1 {
                let lo = &b.data[r0 * b.rs + j0..][..cols];
                if r1 < k {
                    let hi = &b.data[r1 * b.rs + j0..][..cols];
                    for ((o, &l), &h) in out.iter_mut().zip(lo).zip(hi) {
                        *o = u32::from(l) | u32::from(h) << 16;
                    }
                } else {
                    for (o, &l) in out.iter_mut().zip(lo) {
                        *o = u32::from(l);
                    }
                }
            } else {
                let at = |r: usize, c: usize| if r < k { u32::from(b.data[r * b.rs + c * b.cs]) } else { 0 };
                for (jj, o) in out[..cols].iter_mut().enumerate() {
                    *o = at(r0, j0 + jj) | at(r1, j0 + jj) << 16;
                }
            }
        }
    }
}

/// Where a task's results go: f32 C, or bf16 C with an optional ReLU (`v > 0 ? v : 0` in f32,
/// so NaN and -0 give +0) before the one rounding to nearest even (NaN stays NaN, quietened).
/// Either is [m, n] at its pointer with row stride `ld`.
#[derive(Clone, Copy)]
pub enum Dst {
    F32 { ptr: *mut f32, ld: usize },
    Bf16 { ptr: *mut u16, ld: usize, relu: bool },
}

/// C rows `rows` × the columns of B's panels `panels` of the product [m, n] = alpha · A·B + bias
/// (then the ReLU and rounding `dst` asks for), A [m, k] as `a`.
///
/// # Safety
/// `available()` must be true; `dst` must be valid for writes at `i·ld + j` for every i in
/// `rows` and column j < n of those panels, and no other thread may access them during the
/// call. Panics (before writing) if A does not hold rows.end × k elements, the bias is shorter
/// than n or `panels` exceeds B's.
pub unsafe fn block(
    a: Strided<'_>,
    b: &PackedB,
    rows: std::ops::Range<usize>,
    panels: std::ops::Range<usize>,
    dst: Dst,
    alpha: f32,
    bias: Option<&[f32]>,
) {
    assert!(a.covers(rows.end, b.k), "bf16 dot GEMM: A [{}, {}] does not fit its buffer", rows.end, b.k);
    assert!(bias.is_none_or(|v| v.len() >= b.n), "bf16 dot GEMM: the bias must hold n = {} values", b.n);
    assert!(panels.end <= b.panels(), "bf16 dot GEMM: panels {panels:?} of {}", b.panels());
    if rows.is_empty() || panels.is_empty() || b.k == 0 {
        return;
    }
    #[cfg(target_arch = "x86_64")]
    // SAFETY: the caller's contract (the CPU's features, dst's extent); A and bias checked above.
    unsafe {
        x86::block(a, b, rows, panels, dst, alpha, bias)
    }
    #[cfg(not(target_arch = "x86_64"))]
    unreachable!("bf16 dot GEMM: `available()` is false off x86_64");
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::{Dst, PackedB, Strided, KP, MR, NR};
    use std::arch::x86_64::*;

    /// The last k block's epilogue: alpha, the bias (this tile's columns) and where to write.
    #[derive(Clone, Copy)]
    struct Last<'a> {
        alpha: f32,
        bias: Option<&'a [f32]>,
        dst: Dst,
    }

    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16")]
    pub(super) unsafe fn block(
        a: Strided<'_>,
        b: &PackedB,
        rows: std::ops::Range<usize>,
        panels: std::ops::Range<usize>,
        dst: Dst,
        alpha: f32,
        bias: Option<&[f32]>,
    ) {
        let kp = b.kp;
        let row_panels = rows.len().div_ceil(MR);
        let j_first = panels.start * NR;
        let width = (panels.end * NR).min(b.n) - j_first;
        // this task's rows of A for one k block: row panel t, pair p, row r at (t·np + p)·MR + r
        let mut pa = vec![0u32; row_panels * KP.min(kp) * MR];
        // the f32 sums between k blocks (only when k spans more than one): rows × width
        let mut chain = if kp > KP { vec![0f32; rows.len() * width] } else { Vec::new() };
        let mut p0 = 0;
        while p0 < kp {
            let np = KP.min(kp - p0);
            let (first, last) = (p0 == 0, p0 + np == kp);
            // pack A's pairs (k = 2p, 2p + 1) for rows in this task, row by row (each row's
            // elements read in order); rows past the end are zeros
            for t in 0..row_panels {
                let panel = &mut pa[t * np * MR..][..np * MR];
                for r in 0..MR {
                    let i = rows.start + t * MR + r;
                    if i >= rows.end {
                        (0..np).for_each(|p| panel[p * MR + r] = 0);
                        continue;
                    }
                    let kk = 2 * p0;
                    let kn = (2 * np).min(b.k - kk);
                    if a.cs == 1 {
                        let row = &a.data[i * a.rs + kk..][..kn];
                        let mut pairs = row.chunks_exact(2);
                        for (p, pr) in pairs.by_ref().enumerate() {
                            panel[p * MR + r] = u32::from(pr[0]) | u32::from(pr[1]) << 16;
                        }
                        if let [last] = pairs.remainder() {
                            panel[(kn / 2) * MR + r] = u32::from(*last);
                        }
                    } else {
                        let at = |c: usize| if c < kn { u32::from(a.data[i * a.rs + (kk + c) * a.cs]) } else { 0 };
                        (0..np).for_each(|p| panel[p * MR + r] = at(2 * p) | at(2 * p + 1) << 16);
                    }
                }
            }
            for q in panels.clone() {
                let bp = &b.data[(q * kp + p0) * NR..][..np * NR];
                let j0 = q * NR;
                let cols = NR.min(b.n - j0);
                for t in 0..row_panels {
                    let ap = &pa[t * np * MR..][..np * MR];
                    let i0 = rows.start + t * MR;
                    let nr = MR.min(rows.end - i0);
                    let at_chain = (i0 - rows.start) * width + (j0 - j_first);
                    let last = last.then(|| Last {
                        alpha,
                        bias: bias.map(|v| &v[j0..j0 + cols]),
                        // SAFETY (of the offsets): rows i0.., columns j0..: the caller's block.
                        dst: match dst {
                            Dst::F32 { ptr, ld } => Dst::F32 { ptr: unsafe { ptr.add(i0 * ld + j0) }, ld },
                            Dst::Bf16 { ptr, ld, relu } => {
                                Dst::Bf16 { ptr: unsafe { ptr.add(i0 * ld + j0) }, ld, relu }
                            }
                        },
                    });
                    // the chain's tile (unused when k fits one block)
                    let ch =
                        if chain.is_empty() { std::ptr::null_mut() } else { chain.as_mut_ptr().wrapping_add(at_chain) };
                    // SAFETY: rows i0..i0 + nr and columns j0..j0 + cols of dst (the caller's
                    // contract) and of the chain (rows.len() × width, allocated when kp > KP).
                    unsafe { tile(ap, bp, (ch, width), nr, cols, first, last) };
                }
            }
            p0 += np;
        }
    }

    /// The register tile over one k block: acc[r][h] (row r, columns h·16..) starts at 0 in the
    /// first block or at the chain's sums, takes np pairs, and goes back to the chain, or in the
    /// last block as alpha · acc + bias to the destination.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16")]
    unsafe fn tile(
        ap: &[u32],
        bp: &[u32],
        (chain, ldc): (*mut f32, usize),
        nr: usize,
        cols: usize,
        first: bool,
        last: Option<Last<'_>>,
    ) {
        let np = bp.len() / NR;
        debug_assert!(ap.len() == np * MR && nr <= MR && cols <= NR);
        // the two halves' lane masks (columns past n are neither read nor written)
        let m0: __mmask16 = if cols >= 16 { 0xffff } else { (1u32 << cols) as u16 - 1 };
        let m1: __mmask16 = if cols >= NR {
            0xffff
        } else if cols > 16 {
            (1u32 << (cols - 16)) as u16 - 1
        } else {
            0
        };
        let mut acc = [[_mm512_setzero_ps(); 2]; MR];
        if !first {
            for (r, row) in acc.iter_mut().enumerate().take(nr) {
                // SAFETY: row r < nr and the masked columns < cols: inside the chain's tile.
                unsafe {
                    let cr = chain.add(r * ldc);
                    row[0] = _mm512_maskz_loadu_ps(m0, cr);
                    row[1] = _mm512_maskz_loadu_ps(m1, cr.add(16));
                }
            }
        }
        let (ap, bp) = (ap.as_ptr(), bp.as_ptr());
        for p in 0..np {
            // SAFETY: p < np: pair p's NR columns of B and MR rows of A are inside the slices.
            unsafe {
                let b0: __m512bh = std::mem::transmute(_mm512_loadu_si512(bp.add(p * NR) as *const _));
                let b1: __m512bh = std::mem::transmute(_mm512_loadu_si512(bp.add(p * NR + 16) as *const _));
                for (r, row) in acc.iter_mut().enumerate() {
                    let av: __m512bh = std::mem::transmute(_mm512_set1_epi32(*ap.add(p * MR + r) as i32));
                    row[0] = _mm512_dpbf16_ps(row[0], av, b0);
                    row[1] = _mm512_dpbf16_ps(row[1], av, b1);
                }
            }
        }
        let Some(Last { alpha, bias, dst }) = last else {
            for (r, row) in acc.iter().enumerate().take(nr) {
                // SAFETY: as the loads above.
                unsafe {
                    let cr = chain.add(r * ldc);
                    _mm512_mask_storeu_ps(cr, m0, row[0]);
                    _mm512_mask_storeu_ps(cr.add(16), m1, row[1]);
                }
            }
            return;
        };
        let scale = _mm512_set1_ps(alpha);
        let (bias0, bias1) = match bias {
            // SAFETY: the bias slice holds `cols` values; the masked lanes stay below cols.
            Some(v) => unsafe {
                (_mm512_maskz_loadu_ps(m0, v.as_ptr()), _mm512_maskz_loadu_ps(m1, v.as_ptr().add(16)))
            },
            None => (_mm512_setzero_ps(), _mm512_setzero_ps()),
        };
        for (r, row) in acc.iter().enumerate().take(nr) {
            let v0 = _mm512_add_ps(_mm512_mul_ps(scale, row[0]), bias0);
            let v1 = _mm512_add_ps(_mm512_mul_ps(scale, row[1]), bias1);
            // SAFETY: row r < nr and the masked columns < cols: inside the caller's block.
            unsafe {
                match dst {
                    Dst::F32 { ptr, ld } => {
                        let cr = ptr.add(r * ld);
                        _mm512_mask_storeu_ps(cr, m0, v0);
                        _mm512_mask_storeu_ps(cr.add(16), m1, v1);
                    }
                    Dst::Bf16 { ptr, ld, relu } => {
                        let cr = ptr.add(r * ld);
                        _mm256_mask_storeu_epi16(cr as *mut i16, m0, round_bf16(v0, relu));
                        _mm256_mask_storeu_epi16(cr.add(16) as *mut i16, m1, round_bf16(v1, relu));
                    }
                }
            }
        }
    }

    /// `super::few_rows_block`'s tile: F features × R rows.
    const F: usize = 6;
    const R: usize = 3;

    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16")]
    pub(super) unsafe fn few_rows(
        x: &[u16],
        w: &[u16],
        bias: Option<&[f32]>,
        y: *mut u16,
        ldy: usize,
        k: usize,
        rows: usize,
        relu: bool,
    ) {
        const L: usize = 32;
        let nf = w.len() / k;
        let (kv, tail) = (k / L * L, k % L);
        let tail_mask: __mmask32 = if tail == 0 { 0 } else { (1u32 << tail) - 1 };
        let mut j = 0;
        while j < nf {
            let jn = (nf - j).min(F);
            // fixed tile bounds: a missing row or feature repeats the last one (sums dropped)
            let wr: [*const u16; F] = std::array::from_fn(|jj| w[(j + jj.min(jn - 1)) * k..][..k].as_ptr());
            let mut r = 0;
            while r < rows {
                let rn = (rows - r).min(R);
                let xr: [*const u16; R] = std::array::from_fn(|ri| x[(r + ri.min(rn - 1)) * k..][..k].as_ptr());
                let mut acc = [_mm512_setzero_ps(); F * R];
                let mut c = 0;
                // SAFETY (loads): every row holds k values; c + 32 <= kv <= k, and the tail's
                // masked lanes stay below k.
                while c < kv {
                    let xs: [__m512bh; R] = std::array::from_fn(|ri| unsafe { load(xr[ri].add(c)) });
                    for jj in 0..F {
                        let wv = unsafe { load(wr[jj].add(c)) };
                        for ri in 0..R {
                            acc[jj * R + ri] = _mm512_dpbf16_ps(acc[jj * R + ri], xs[ri], wv);
                        }
                    }
                    c += L;
                }
                if tail > 0 {
                    let xs: [__m512bh; R] = std::array::from_fn(|ri| unsafe { load_first(xr[ri].add(kv), tail_mask) });
                    for jj in 0..F {
                        let wv = unsafe { load_first(wr[jj].add(kv), tail_mask) };
                        for ri in 0..R {
                            acc[jj * R + ri] = _mm512_dpbf16_ps(acc[jj * R + ri], xs[ri], wv);
                        }
                    }
                }
                for jj in 0..jn {
                    let b = bias.map_or(0.0, |b| b[j + jj]);
                    for ri in 0..rn {
                        // SAFETY: __m512 and [f32; 16] are the same 64 bytes.
                        let lanes: [f32; 16] = unsafe { std::mem::transmute(acc[jj * R + ri]) };
                        let v = crate::math::hsum(lanes) + b;
                        let v = if relu && v.partial_cmp(&0.0) != Some(std::cmp::Ordering::Greater) { 0.0 } else { v };
                        // SAFETY: r + ri < rows and j + jj < nf: the caller's contract.
                        unsafe { *y.add((r + ri) * ldy + j + jj) = super::round_bf16_model(v) };
                    }
                }
                r += rn;
            }
            j += jn;
        }
    }

    /// 32 bf16 at p.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16")]
    unsafe fn load(p: *const u16) -> __m512bh {
        // SAFETY: the caller's (64 readable bytes); __m512i and __m512bh are plain bits.
        unsafe { std::mem::transmute(_mm512_loadu_si512(p as *const _)) }
    }

    /// The first lanes of `mask` at p, zeros after (nothing past them is read).
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16")]
    unsafe fn load_first(p: *const u16, mask: __mmask32) -> __m512bh {
        // SAFETY: the caller's (the masked lanes readable); plain bits.
        unsafe { std::mem::transmute(_mm512_maskz_loadu_epi16(mask, p as *const i16)) }
    }

    /// 16 f32 (after the ReLU if asked) rounded to bf16 bits: to nearest even, a NaN kept and
    /// quietened (the engine's `cast` to bf16, lane by lane).
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
    pub(super) fn round_bf16(v: __m512, relu: bool) -> __m256i {
        // max(v, +0) returns its second operand for NaN and for ±0: `v > 0 ? v : 0`
        let v = if relu { _mm512_max_ps(v, _mm512_setzero_ps()) } else { v };
        let u = _mm512_castps_si512(v);
        let lsb = _mm512_and_si512(_mm512_srli_epi32::<16>(u), _mm512_set1_epi32(1));
        let rounded = _mm512_srli_epi32::<16>(_mm512_add_epi32(u, _mm512_add_epi32(_mm512_set1_epi32(0x7fff), lsb)));
        let nan = _mm512_cmpgt_epu32_mask(
            _mm512_and_si512(u, _mm512_set1_epi32(0x7fff_ffff)),
            _mm512_set1_epi32(0x7f80_0000),
        );
        let quiet = _mm512_or_si512(_mm512_srli_epi32::<16>(u), _mm512_set1_epi32(0x0040));
        _mm512_cvtepi32_epi16(_mm512_mask_blend_epi32(nan, rounded, quiet))
    }
}

/// The few-rows bf16 Linear (the text tower's 18-token rows): y[r][j] = act(⟨x_r, w_j⟩ + bias_j)
/// rounded to bf16, for output features j < w.len() / k, written at `y + r·ldy + j`; x [rows, k]
/// and w [nf, k] bf16 with rows contiguous. No packing (the weights are read once, as they are
/// stored: half the bytes of the widened f32 copy the f32 kernel would need): lane l of a
/// feature-row accumulator sums the pairs k = 32c + 2l, 2l + 1 in c order (`vdpbf16ps`, the tail
/// through masked loads, both operands zero past k), then the lanes by halving
/// (`math::hsum`), + bias, the ReLU, one rounding. Register tile F features × R rows as the f32
/// kernel's (`gemm::few_rows_block`).
///
/// # Safety
/// `available()` must be true; `y` must be valid for writes at `r·ldy + j` for every r < rows
/// and j < w.len() / k, and no other thread may access those values during the call. Panics if
/// x holds fewer than rows × k values or the bias fewer than the features.
#[allow(clippy::too_many_arguments)]
pub unsafe fn few_rows_block(
    x: &[u16],
    w: &[u16],
    bias: Option<&[f32]>,
    y: *mut u16,
    ldy: usize,
    k: usize,
    rows: usize,
    relu: bool,
) {
    if k == 0 || rows == 0 {
        return;
    }
    let nf = w.len() / k;
    assert!(x.len() >= rows * k && bias.is_none_or(|b| b.len() >= nf), "few-rows bf16 Linear: x [rows, k], bias [n]");
    #[cfg(target_arch = "x86_64")]
    // SAFETY: the caller's contract; x, w (whole rows of k) and the bias checked above.
    unsafe {
        x86::few_rows(x, &w[..nf * k], bias, y, ldy, k, rows, relu)
    }
    #[cfg(not(target_arch = "x86_64"))]
    unreachable!("bf16 dot GEMM: `available()` is false off x86_64");
}

/// f32 → bf16 bits as `Dst::Bf16` rounds (the tests' model).
pub fn round_bf16_model(x: f32) -> u16 {
    let u = x.to_bits();
    if u & 0x7fff_ffff > 0x7f80_0000 {
        ((u >> 16) | 0x0040) as u16
    } else {
        (u.wrapping_add(0x7fff + ((u >> 16) & 1)) >> 16) as u16
    }
}

/// The instruction's arithmetic in plain code (the tests' model of one lane): `acc` plus the odd
/// element's product, rounded, plus the even one's, rounded; denormal inputs read as zero and
/// denormal results flushed.
pub fn dot2_model(acc: f32, a: [u16; 2], b: [u16; 2]) -> f32 {
    let daz = |x: f32| if x.is_subnormal() { 0.0f32.copysign(x) } else { x };
    let w = |h: u16| daz(f32::from_bits(u32::from(h) << 16));
    let s = daz(daz(acc) + w(a[1]) * w(b[1]));
    daz(s + w(a[0]) * w(b[0]))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bits(x: f32) -> u16 {
        (x.to_bits() >> 16) as u16
    }

    /// Random bf16 values over many binades (all 8 significand bits used), a few zeros.
    fn draw(n: usize, seed: u64) -> Vec<u16> {
        let mut s = seed;
        (0..n)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                let e = 120 + (s >> 40) as u32 % 14;
                if s.is_multiple_of(29) {
                    0
                } else {
                    bits(f32::from_bits((s as u32 & 0x807f_0000) | e << 23))
                }
            })
            .collect()
    }

    /// The chain of `dot2_model` over k, then alpha · sum + bias: the kernel's arithmetic.
    fn model(a: &Strided<'_>, b: &Strided<'_>, (i, j, k): (usize, usize, usize), alpha: f32, bias: f32) -> f32 {
        let at =
            |m: &Strided<'_>, r: usize, c: usize, lim: usize| if r < lim { m.data[r * m.rs + c * m.cs] } else { 0 };
        let mut acc = 0.0f32;
        for p in 0..k.div_ceil(2) {
            let av = [
                a.data[i * a.rs + 2 * p * a.cs],
                if 2 * p + 1 < k { a.data[i * a.rs + (2 * p + 1) * a.cs] } else { 0 },
            ];
            acc = dot2_model(acc, av, [at(b, 2 * p, j, k), at(b, 2 * p + 1, j, k)]);
        }
        alpha * acc + bias
    }

    /// Every tile edge (m, n, k around MR, NR, 2 and the k block), transposed operands, alpha and
    /// bias: bit for bit the model's chain, and within the f32 sum's bound of the f64 product
    /// (k roundings of at most 2⁻²⁴ of the running |sum| ≤ Σ|a·b|, two more in the epilogue).
    #[test]
    fn matches_the_model_bit_for_bit_and_f64_within_the_sum_bound() {
        if !available() {
            eprintln!("skipped: this CPU has no AVX512_BF16");
            return;
        }
        let cases = [
            (1, 1, 1),
            (3, 5, 2),
            (12, 32, 16),
            (13, 33, 17),
            (25, 70, 511),
            (7, 31, 2 * KP + 3),
            (40, 64, 1024),
            (5, 1100, 33),
        ];
        for (ci, &(m, n, k)) in cases.iter().enumerate() {
            for trans in [false, true] {
                let av = draw(m * k, 11 + ci as u64);
                let bv = draw(k * n, 97 + ci as u64);
                // A [m, k] row-major or stored transposed ([k, m]); B [k, n] likewise
                let (a, b) = if trans {
                    (Strided { data: &av, rs: 1, cs: m }, Strided { data: &bv, rs: 1, cs: k })
                } else {
                    (Strided { data: &av, rs: k, cs: 1 }, Strided { data: &bv, rs: n, cs: 1 })
                };
                let bias: Vec<f32> = (0..n).map(|j| j as f32 * 0.125 - 1.0).collect();
                let (alpha, with_bias) = if trans { (0.375, None) } else { (1.0, Some(bias.as_slice())) };
                let packed = PackedB::new(b, k, n);
                let (mut c, mut h) = (vec![f32::NAN; m * n], vec![0x7fc1u16; m * n]);
                let relu = ci % 2 == 0;
                // two tasks over rows and panels, as the engine splits them; f32 and bf16 C
                let (mh, ph) = (m / 2, packed.panels() / 2);
                for (rows, panels) in [(0..mh, 0..ph), (0..mh, ph..packed.panels()), (mh..m, 0..packed.panels())] {
                    for dst in [Dst::F32 { ptr: c.as_mut_ptr(), ld: n }, Dst::Bf16 { ptr: h.as_mut_ptr(), ld: n, relu }]
                    {
                        // SAFETY: available(); each (rows, panels) written by one call, inside m × n.
                        unsafe { block(a, &packed, rows.clone(), panels.clone(), dst, alpha, with_bias) };
                    }
                }
                for i in 0..m {
                    for j in 0..n {
                        let bj = with_bias.map_or(0.0, |v| v[j]);
                        let want = model(&a, &b, (i, j, k), alpha, bj);
                        let got = c[i * n + j];
                        assert_eq!(
                            got.to_bits(),
                            want.to_bits(),
                            "m {m} n {n} k {k} trans {trans}: C[{i}][{j}] {got} vs {want}"
                        );
                        let act = if relu && want.partial_cmp(&0.0) != Some(std::cmp::Ordering::Greater) {
                            0.0
                        } else {
                            want
                        };
                        assert_eq!(h[i * n + j], round_bf16_model(act), "bf16 C[{i}][{j}] (relu {relu}) of {want}");
                        let w = |h: u16| f32::from_bits(u32::from(h) << 16) as f64;
                        let prods = (0..k).map(|kk| w(a.data[i * a.rs + kk * a.cs]) * w(b.data[kk * b.rs + j * b.cs]));
                        let (exact, mag) = prods.fold((0.0, 0.0), |(s, m), p| (s + p, m + p.abs()));
                        let exact = alpha as f64 * exact + bj as f64;
                        let bound = (k as f64 + 2.0) * 2f64.powi(-24) * (alpha as f64 * mag + bj.abs() as f64) + 1e-37;
                        assert!((got as f64 - exact).abs() <= bound, "C[{i}][{j}] = {got}, f64 {exact}, bound {bound}");
                    }
                }
            }
        }
    }

    /// The few-rows kernel: every tile edge (rows around R, features around F, k around 32),
    /// bit for bit the model (each lane's chain of pairs, the halving sum, bias, ReLU, one
    /// rounding) and within the sum bound of the f64 product.
    #[test]
    fn few_rows_matches_the_model() {
        if !available() {
            eprintln!("skipped: this CPU has no AVX512_BF16");
            return;
        }
        for (ci, &(rows, k, nf)) in
            [(1usize, 1usize, 1usize), (2, 31, 5), (3, 32, 6), (4, 33, 7), (7, 100, 13), (18, 512, 20)]
                .iter()
                .enumerate()
        {
            let x = draw(rows * k, 3 + ci as u64);
            let w = draw(nf * k, 300 + ci as u64);
            let bias: Vec<f32> = (0..nf).map(|j| j as f32 * 0.25 - 1.5).collect();
            let relu = ci % 2 == 1;
            let mut y = vec![0x7fc1u16; rows * nf];
            // SAFETY: available(); y holds rows × nf.
            unsafe { few_rows_block(&x, &w, Some(&bias), y.as_mut_ptr(), nf, k, rows, relu) };
            let f = |h: u16| f32::from_bits(u32::from(h) << 16);
            for r in 0..rows {
                for j in 0..nf {
                    let mut lanes = [0f32; 16];
                    for (l, lane) in lanes.iter_mut().enumerate() {
                        let mut c = 2 * l;
                        while c < k {
                            let at = |v: &[u16], row: usize, cc: usize| if cc < k { v[row * k + cc] } else { 0 };
                            *lane =
                                dot2_model(*lane, [at(&x, r, c), at(&x, r, c + 1)], [at(&w, j, c), at(&w, j, c + 1)]);
                            c += 32;
                        }
                    }
                    let v = crate::math::hsum(lanes) + bias[j];
                    let act = if relu && v.partial_cmp(&0.0) != Some(std::cmp::Ordering::Greater) { 0.0 } else { v };
                    assert_eq!(y[r * nf + j], round_bf16_model(act), "rows {rows} k {k}: y[{r}][{j}]");
                    let (exact, mag) = (0..k)
                        .map(|c| f(x[r * k + c]) as f64 * f(w[j * k + c]) as f64)
                        .fold((bias[j] as f64, bias[j].abs() as f64), |(s, m), p| (s + p, m + p.abs()));
                    let bound = (k as f64 + 20.0) * 2f64.powi(-24) * mag + 2f64.powi(-8) * exact.abs() + 1e-37;
                    let exact = if relu { exact.max(0.0) } else { exact };
                    assert!((f(y[r * nf + j]) as f64 - exact).abs() <= bound, "y[{r}][{j}] vs f64 {exact}");
                }
            }
        }
    }

    /// The model is the instruction: random lanes over many binades, denormals and specials.
    #[test]
    fn the_model_is_the_instruction() {
        if !available() {
            eprintln!("skipped: this CPU has no AVX512_BF16");
            return;
        }
        let v = draw(4 * 4096, 5);
        let special = [0x0040u16, 0x8001, 0x7f80, 0xff80, 0x7fc0, 0x0000, 0x8000, 0x0080];
        for (t, q) in v.chunks(4).enumerate() {
            let q: Vec<u16> =
                q.iter().enumerate().map(|(i, &x)| if (t + i) % 37 == 0 { special[t % 8] } else { x }).collect();
            let acc = if t % 53 == 0 {
                f32::from_bits(0x0000_1234)
            } else {
                f32::from_bits(u32::from(q[0] ^ q[3]) << 16 | 0x1234)
            };
            let (a, b) = ([q[0], q[1]], [q[2], q[3]]);
            // SAFETY: available() is true.
            let got = unsafe { instruction(acc, a, b) };
            let want = dot2_model(acc, a, b);
            assert!(
                got.to_bits() == want.to_bits() || (got.is_nan() && want.is_nan()),
                "acc {acc:e} a {a:04x?} b {b:04x?}: instruction {got:e}, model {want:e}"
            );
        }
    }

    /// The vector rounding is the model's (the engine's cast) on ties, carries into the
    /// exponent, overflow to inf, denormals, NaN payloads and signed zeros, with and without the
    /// ReLU.
    #[test]
    fn the_rounding_is_the_casts() {
        if !available() {
            eprintln!("skipped: this CPU has no AVX512_BF16");
            return;
        }
        let mut xs: Vec<u32> = vec![
            0x3f80_8000,
            0x3f81_8000,
            0x3f80_8001,
            0x3f80_7fff,
            0x7f7f_ffff,
            0xff7f_8000,
            0x0000_8000,
            0x0001_8000,
            0x8000_0001,
            0x7f80_0000,
            0xff80_0000,
            0x7f80_0001,
            0xffc0_1234,
            0x7fbf_ffff,
            0x0000_0000,
            0x8000_0000,
            0x807f_ffff,
            0x3fff_ffff,
            0xbf80_7fff,
        ];
        let mut s = 99u64;
        xs.extend((0..4096).map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            s as u32
        }));
        for chunk in xs.chunks(16) {
            let mut v = [0f32; 16];
            chunk.iter().enumerate().for_each(|(l, &u)| v[l] = f32::from_bits(u));
            for relu in [false, true] {
                // SAFETY: available() is true.
                let got = unsafe { rounded(v, relu) };
                for (l, &x) in v.iter().enumerate().take(chunk.len()) {
                    let act = if relu && x.partial_cmp(&0.0) != Some(std::cmp::Ordering::Greater) { 0.0 } else { x };
                    assert_eq!(got[l], round_bf16_model(act), "{:08x} relu {relu}", x.to_bits());
                }
            }
        }
        // the model is the engine's rounding of a finite value: ties to even
        assert_eq!(round_bf16_model(f32::from_bits(0x3f80_8000)), 0x3f80);
        assert_eq!(round_bf16_model(f32::from_bits(0x3f81_8000)), 0x3f82);
        assert_eq!(round_bf16_model(f32::from_bits(0x7f7f_ffff)), 0x7f80);
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16")]
    unsafe fn rounded(v: [f32; 16], relu: bool) -> [u16; 16] {
        use std::arch::x86_64::*;
        // SAFETY: 16 floats in, 16 u16 out; both plain bits.
        unsafe { std::mem::transmute(super::x86::round_bf16(std::mem::transmute::<[f32; 16], __m512>(v), relu)) }
    }

    /// One lane of `vdpbf16ps`.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f,avx512bf16")]
    unsafe fn instruction(acc: f32, a: [u16; 2], b: [u16; 2]) -> f32 {
        use std::arch::x86_64::*;
        let pair = |v: [u16; 2]| -> __m512bh {
            // SAFETY: __m512i and __m512bh are both 64 bytes of plain bits.
            unsafe { std::mem::transmute(_mm512_set1_epi32((u32::from(v[0]) | u32::from(v[1]) << 16) as i32)) }
        };
        _mm512_cvtss_f32(_mm512_dpbf16_ps(_mm512_set1_ps(acc), pair(a), pair(b)))
    }
}
