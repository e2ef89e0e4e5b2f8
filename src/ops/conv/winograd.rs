//! cpu 3×3 convolution (stride 1, padding 1) by Winograd's minimal filtering F(2×2, 3×3): each
//! 2×2 output tile is Aᵀ [Σ_ci (G g Gᵀ) ⊙ (Bᵀ d B)] A from the tile's 4×4 input patch d, so
//! the products become 16 GEMMs [Co × Ci] · [Ci × tiles] with 16 multiplications per tile and
//! channel pair instead of 36: 2.25× fewer FLOPs than the direct convolution. The transforms
//! only add, subtract and halve, so the rounding stays within a small multiple of the direct
//! convolution's (the tests bound it through the transformed magnitudes).
//!
//! Tiles are processed in bands of tile rows (the band's transformed input and products stay in
//! cache); the 16 transformed weight matrices are built once per call.
//!
//! `Tiles::F4` runs F(4×4, 3×3) through the same bands and GEMMs instead: 6×6 patches, 36
//! products per 4×4 output tile and channel pair (2.25 per output instead of 4: 1.78× fewer
//! FLOPs than F(2×2, 3×3)), and 36·Ci transformed values per 16 outputs instead of 64·Ci, at the
//! cost of larger transform coefficients (up to 8 and 1/6), so a larger rounding error relative
//! to the output (bounded the same way, through the transformed magnitudes: see
//! `reference::winograd_magnitude`). The autotuner chooses between the two per shape.

use super::ConvShape;
use crate::ops::cpu_math::{SendPtr, Unfilled};
use gemm::Parallelism;
use rayon::prelude::*;
use reclmis_cpu_loops::winograd::{grad_transform, input_transform, output_transform, weight_rows, Chw};
use reclmis_cpu_loops::winograd4;

/// Which minimal filtering: F(2×2, 3×3) (4×4 patches, 16 planes) or F(4×4, 3×3) (6×6, 36).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Tiles {
    F2,
    F4,
}

impl Tiles {
    /// Output pixels per tile side.
    pub fn m(self) -> usize {
        match self {
            Tiles::F2 => 2,
            Tiles::F4 => winograd4::M,
        }
    }

    /// Transformed values per tile and channel (the GEMMs per band).
    pub fn planes(self) -> usize {
        match self {
            Tiles::F2 => 16,
            Tiles::F4 => winograd4::PLANES,
        }
    }

    /// # Safety
    /// `weight_rows`' contract for this transform's planes.
    unsafe fn weight_rows(self, wo: &[f32], oci: (usize, usize, usize), u: SendPtr) {
        // SAFETY: the caller's contract.
        unsafe {
            match self {
                Tiles::F2 => weight_rows(wo, oci, u),
                Tiles::F4 => winograd4::weight_rows(wo, oci, u),
            }
        }
    }

    /// # Safety
    /// `input_transform`'s contract for this transform's planes.
    unsafe fn input_transform(
        self,
        xb: &[f32],
        s: Chw,
        band: (usize, usize, usize),
        cis: (usize, usize),
        v: (SendPtr, usize),
    ) {
        // SAFETY: the caller's contract.
        unsafe {
            match self {
                Tiles::F2 => input_transform(xb, s, band, cis, v),
                Tiles::F4 => winograd4::input_transform(xb, s, band, cis, v),
            }
        }
    }

    /// # Safety
    /// `output_transform`'s contract for this transform's planes.
    #[allow(clippy::too_many_arguments)]
    unsafe fn output_transform(
        self,
        m: (&[f32], usize, usize),
        s: Chw,
        band: (usize, usize, usize),
        cos: (usize, usize),
        bias: Option<&[f32]>,
        out: (SendPtr, bool),
    ) {
        // SAFETY: the caller's contract.
        unsafe {
            match self {
                Tiles::F2 => output_transform(m, s, band, cos, bias, out),
                Tiles::F4 => winograd4::output_transform(m, s, band, cos, bias, out),
            }
        }
    }
}

/// Transformed values per band, Ci and Co rows together (~4 MB): the band's V and M.
pub const BAND_FLOATS: usize = 1 << 20;
/// Output channels per block when one band runs at a time: the block's transformed weights
/// (16·32·Ci floats, 1 MB at Ci = 512) stay in L2 while its 16 GEMMs run.
const CO_BLOCK: usize = 32;

/// When Winograd pays: 3×3 kernels with enough channels on both sides that the 16 GEMMs, not
/// the transforms (O(Ci + Co) per tile), dominate. `RECLMIS_NO_WINOGRAD=1` turns it off (every
/// convolution by im2col + GEMM): the same f32 arithmetic in another order, which is how
/// BENCHMARKS.md measured what a rounding-level change does to a training run.
pub fn applies(s: &ConvShape) -> bool {
    s.kh == 3 && s.kw == 3 && s.ci >= 32 && s.co >= 32 && !winograd_off()
}

/// `RECLMIS_NO_WINOGRAD` set to anything but empty or `0`. Read on every 3×3 dispatch: one
/// getenv is nothing beside a convolution, and a cached flag cost reclmis-infer 400 bytes of
/// its last 432 under the size budget.
fn winograd_off() -> bool {
    std::env::var_os("RECLMIS_NO_WINOGRAD").is_some_and(|v| !v.is_empty() && v != "0")
}

/// Which transform when Winograd applies: F(4×4, 3×3) on maps of 56² or more, where it measured
/// 1.25–1.5x faster than F(2×2, 3×3) on the official shapes (AMD EPYC VM, 2 threads, batch 1:
/// 64→64 at 224², 128→128 at 112², 256→256 and 512→128 at 56², 256→64 at 112², 128→64 at 224²);
/// F(2×2, 3×3) below, where F(4×4)'s fewer tiles make its GEMMs too narrow (512→512 and 1024→256
/// at 28²: 0.90–0.95x; 14²: even).
pub fn tiles_for(s: &ConvShape) -> Tiles {
    if s.h * s.w >= 56 * 56 {
        Tiles::F4
    } else {
        Tiles::F2
    }
}

/// When the Winograd weight gradient pays (measured on the 2-core dev machine, batch 1): with
/// 256 or more input channels on maps of 28² or more it was 1.15–1.75x faster than im2col + GEMM
/// (256→64 at 112², 256→256 at 56², 512→128 at 56², 512→512 at 28²); with fewer channels, or at
/// 14², its bands' small GEMMs (Co × Ci outputs over one band's tiles) lost (0.5–0.9x).
pub fn applies_wgrad(s: &ConvShape) -> bool {
    applies(s) && s.ci >= 256 && s.h * s.w >= 28 * 28
}

/// Channels 0..c cut into at most `parts` contiguous ranges (for spreading a transform over
/// the threads).
fn channel_ranges(c: usize, parts: usize) -> Vec<(usize, usize)> {
    let step = c.div_ceil(parts.max(1)).max(1);
    (0..c).step_by(step).map(|c0| (c0, (c0 + step).min(c))).collect()
}

/// U[ξ][co − co0][ci] = (G g Gᵀ)[ξ] for the filters g = w[co][ci] of output channels
/// [co0, co1) (row stride w_ld per co), for F(2×2, 3×3) G = [[1, 0, 0], [½, ½, ½], [½, −½, ½],
/// [0, 0, 1]]; rows in parallel when `par`.
fn weight_transform(
    tiles: Tiles,
    w: &[f32],
    w_ld: usize,
    (co0, co1): (usize, usize),
    ci: usize,
    par: bool,
) -> Vec<f32> {
    let nco = co1 - co0;
    let mut u = vec![0.0f32; tiles.planes() * nco * ci];
    let up = SendPtr(u.as_mut_ptr());
    // SAFETY: u holds the planes of nco x ci; row o − co0 of every plane is written by o's call
    // alone.
    let row = |o: usize| unsafe { tiles.weight_rows(&w[o * w_ld..], (o - co0, nco, ci), up) };
    if par {
        (co0..co1).into_par_iter().for_each(row);
    } else {
        (co0..co1).for_each(row);
    }
    u
}

/// y (+)= conv3x3(concat(xs, channel axis), w) + bias as `cpu::conv2d_into` (weights' rows
/// w_ld floats apart), the input given as channel slices [B, C_k, H, W] with Σ C_k = s.ci: each
/// slice is transformed into its rows of V, so a concatenation costs nothing extra
/// (`conv2d_cat`).
pub fn conv2d_into(
    xs: &[&[f32]],
    (w, w_ld): (&[f32], usize),
    bias: Option<&[f32]>,
    s: &ConvShape,
    y: &mut [f32],
    accumulate: bool,
) {
    assert_eq!(Some(y.len()), crate::ops::product(&[s.b, s.co, s.h, s.w]), "the output must be [B, Co, H, W]");
    conv2d_into_tiles(tiles_for(s), xs, (w, w_ld), bias, s, y, accumulate)
}

/// `conv2d_into` by either transform.
pub fn conv2d_into_tiles(
    tiles: Tiles,
    xs: &[&[f32]],
    (w, w_ld): (&[f32], usize),
    bias: Option<&[f32]>,
    s: &ConvShape,
    y: &mut [f32],
    accumulate: bool,
) {
    assert_eq!(Some(y.len()), crate::ops::product(&[s.b, s.co, s.h, s.w]), "the output must be [B, Co, H, W]");
    // SAFETY: y holds B·Co·H·W initialised floats.
    unsafe { conv2d_raw(tiles, xs, (w, w_ld, None), bias, (s, BAND_FLOATS), (y.as_mut_ptr(), accumulate)) }
}

/// A new output, written once (no zeroing pass: without accumulation every pixel of every
/// channel is written); NaN-poisoned under the tests' poison switch. The transform is
/// `tiles_for(s)`'s.
pub fn conv2d_new(xs: &[&[f32]], (w, w_ld): (&[f32], usize), bias: Option<&[f32]>, s: &ConvShape) -> Vec<f32> {
    conv2d_new_banded(tiles_for(s), xs, (w, w_ld), None, bias, s, BAND_FLOATS)
}

/// `conv2d_new` with bands of tile rows sized for `band_floats` floats of transformed input and
/// products instead of the default (an autotuning candidate; each output is computed by the
/// same arithmetic whatever the bands, so the result is the same bit for bit).
pub fn conv2d_new_banded(
    tiles: Tiles,
    xs: &[&[f32]],
    (w, w_ld): (&[f32], usize),
    u: Option<&[f32]>,
    bias: Option<&[f32]>,
    s: &ConvShape,
    band_floats: usize,
) -> Vec<f32> {
    let mut y = Unfilled::new(crate::ops::product(&[s.b, s.co, s.h, s.w]).expect("the output's size overflows"));
    // SAFETY: y has room for B·Co·H·W floats, and without accumulation the output transform
    // writes every one of them (and reads none).
    unsafe {
        conv2d_raw(tiles, xs, (w, w_ld, u), bias, (s, band_floats), (y.ptr().get(), false));
        y.filled()
    }
}

/// The transformed weights of a weight tensor (all planes of Co × Ci), from the cache of live
/// weight tensors (`weight_cache`) or made now and kept there.
pub(crate) fn cached_weights(
    tiles: Tiles,
    wt: &crate::Tensor,
    (w, w_ld): (&[f32], usize),
    s: &ConvShape,
) -> std::sync::Arc<Vec<f32>> {
    super::weight_cache::get_or_make(wt.storage_arc(), (w_ld, s.co, s.ci, tiles.planes()), || {
        weight_transform(tiles, w, w_ld, (0, s.co), s.ci, true)
    })
}

/// u: the weights already transformed (`cached_weights`), or None to transform them here.
///
/// SAFETY: y points to B·Co·H·W floats, initialised when `accumulate`.
unsafe fn conv2d_raw(
    tiles: Tiles,
    xs: &[&[f32]],
    (w, w_ld, u_given): (&[f32], usize, Option<&[f32]>),
    bias: Option<&[f32]>,
    (s, band_floats): (&ConvShape, usize),
    (y, accumulate): (*mut f32, bool),
) {
    assert!(s.kh == 3 && s.kw == 3, "Winograd F(m x m, 3x3) needs a 3x3 kernel");
    let (tm, planes) = (tiles.m(), tiles.planes());
    let hw = s.h * s.w;
    let plane = crate::ops::product(&[s.b, hw]).expect("the input's size overflows");
    // (slice, its channels, its first row of V)
    let mut slices = Vec::with_capacity(xs.len());
    let mut off = 0;
    for x in xs {
        assert!(plane == 0 || x.len() % plane == 0, "winograd conv2d: an input slice is not [B, C, H, W]");
        let c = x.len() / plane.max(1);
        slices.push((*x, c, off));
        off += c;
    }
    assert_eq!(off, s.ci, "the slices' channels must add up to Ci");
    let x_len = crate::ops::product(&[s.b, s.ci, hw]).unwrap_or(usize::MAX);
    match u_given {
        Some(u) => crate::ops::assert_len("winograd conv2d", "U", u.len(), crate::ops::product(&[planes, s.co, s.ci])),
        None => super::cpu::check_slices("winograd conv2d", x_len, (w.len(), w_ld), None, None, s),
    }
    if let Some(b) = bias {
        crate::ops::assert_len("winograd conv2d", "bias", b.len(), Some(s.co));
    }
    if s.b * s.co * s.h * s.w == 0 {
        return;
    }
    let (th, tw) = (s.h.div_ceil(tm), s.w.div_ceil(tm));
    // tile rows per band: V and M of the band (planes·(Ci + Co) floats per tile) near band_floats
    let band_rows = (band_floats / (planes * (s.ci + s.co) * tw).max(1)).clamp(1, th.max(1));
    let bands = th.div_ceil(band_rows);
    let tasks = s.b * bands;
    // Many tasks: bands in parallel, each GEMM single-threaded, the weights transformed once.
    // Few tasks (the deep layers' small maps): one band at a time, its input channels, then
    // blocks of output channels across threads, each block transforming its own weights (so
    // the 16·Co·Ci transformed weights are never all in memory at once: at 14² they cost more
    // than the products).
    let parallel_tasks = tasks >= 2 * rayon::current_num_threads();
    let u_made = if parallel_tasks && u_given.is_none() {
        weight_transform(tiles, w, w_ld, (0, s.co), s.ci, true)
    } else {
        Vec::new()
    };
    // all planes of Co x Ci, when given or made here
    let u_all: Option<&[f32]> = u_given.or(if parallel_tasks { Some(&u_made[..]) } else { None });
    let yp = SendPtr(y);
    let (ci_hw, co_hw) = (Chw { c: s.ci, h: s.h, w: s.w }, Chw { c: s.co, h: s.h, w: s.w });
    // the GEMMs M[ξ] (rows of m: nco output channels x nt tiles) = U[ξ] (nco x ci) · V[ξ],
    // u's planes u_plane floats apart
    let gemms = |(u, u_plane): (&[f32], usize), v: &[f32], m: &mut [f32], nco: usize, nt: usize| {
        for xi in 0..planes {
            // SAFETY: plane ξ of m (nco x nt, row stride nt), of u (nco x ci, row stride ci)
            // and of v (ci x nt, row stride nt), all inside their buffers.
            unsafe {
                gemm::gemm(
                    nco,
                    nt,
                    s.ci,
                    m[xi * nco * nt..].as_mut_ptr(),
                    1,
                    nt as isize,
                    false,
                    u[xi * u_plane..].as_ptr(),
                    1,
                    s.ci as isize,
                    v[xi * s.ci * nt..].as_ptr(),
                    1,
                    nt as isize,
                    0.0,
                    1.0,
                    false,
                    false,
                    false,
                    Parallelism::None,
                )
            }
        }
    };
    let run = |bufs: &mut (Vec<f32>, Vec<f32>), task: usize| {
        let (b, band) = (task / bands, task % bands);
        let (ty0, nty) = (band * band_rows, band_rows.min(th - band * band_rows));
        let nt = nty * tw;
        let (v, mm) = bufs;
        crate::ops::cpu_math::grow(v, planes * s.ci * nt);
        // image b of slice k
        let xb = |k: usize| {
            let (x, c, _) = slices[k];
            &x[b * c * hw..(b + 1) * c * hw]
        };
        let vp = SendPtr(v.as_mut_ptr());
        // SAFETY: tile rows [ty0, ty0 + nty) of image b are this task's alone.
        let yb = SendPtr(unsafe { yp.get().add(b * s.co * hw) });
        let band = (ty0, nty, tw);
        if parallel_tasks {
            for (k, &(_, c, off)) in slices.iter().enumerate() {
                // SAFETY: v holds the planes of Ci·nt; slice k's rows start at its offset.
                unsafe { tiles.input_transform(xb(k), ci_hw, band, (0, c), (vp, off)) };
            }
            // (+ SLACK: F(4×4)'s output transform loads 16 lanes past a row's end)
            crate::ops::cpu_math::grow(mm, planes * s.co * nt + winograd4::SLACK);
            gemms((u_all.expect("made or given in this mode"), s.co * s.ci), v, mm, s.co, nt);
            // SAFETY: see yb.
            unsafe { tiles.output_transform((mm, 0, s.co), co_hw, band, (0, s.co), bias, (yb, accumulate)) };
        } else {
            let jobs: Vec<(usize, (usize, usize))> = slices
                .iter()
                .enumerate()
                .flat_map(|(k, &(_, c, _))| channel_ranges(c, 8).into_iter().map(move |r| (k, r)))
                .collect();
            // SAFETY: as above; each job's channel range is its own rows.
            jobs.into_par_iter()
                .for_each(|(k, cis)| unsafe { tiles.input_transform(xb(k), ci_hw, band, cis, (vp, slices[k].2)) });
            let v: &[f32] = v;
            channel_ranges(s.co, s.co.div_ceil(CO_BLOCK)).into_par_iter().for_each(|(c0, c1)| {
                let mut m = vec![0.0f32; planes * (c1 - c0) * nt + winograd4::SLACK];
                match u_all {
                    // rows c0.. of every plane of the given transform
                    Some(u) => gemms((&u[c0 * s.ci..], s.co * s.ci), v, &mut m, c1 - c0, nt),
                    None => {
                        let u = weight_transform(tiles, w, w_ld, (c0, c1), s.ci, false);
                        gemms((&u, (c1 - c0) * s.ci), v, &mut m, c1 - c0, nt)
                    }
                }
                // SAFETY: see yb; output channels [c0, c1) are this block's alone.
                unsafe { tiles.output_transform((&m, c0, c1 - c0), co_hw, band, (c0, c1), bias, (yb, accumulate)) };
            });
        }
    };
    if parallel_tasks {
        (0..tasks).into_par_iter().for_each_init(|| (Vec::new(), Vec::new()), run);
    } else {
        let mut bufs = (Vec::new(), Vec::new());
        (0..tasks).for_each(|t| run(&mut bufs, t));
    }
}

/// dW [Co, Ci, 3, 3] of a 3×3 convolution by Winograd F(2×2, 3×3): with M = U ⊙ V per tile,
/// dU = Σ_tiles (A dY Aᵀ) ⊙ V, i.e. 16 GEMMs dU[ξ] += dM[ξ] (Co × tiles) · V[ξ]ᵀ (tiles × Ci),
/// and dW = Gᵀ dU G. Bands run one after another (a fixed order: deterministic), each band's
/// transforms across threads by channel and its 16 GEMMs across threads by ξ.
pub fn conv2d_wgrad(x: &[f32], dy: &[f32], s: &ConvShape) -> Vec<f32> {
    super::cpu::check_slices("winograd conv2d_wgrad", x.len(), (s.co * s.depth(), s.depth()), None, Some(dy.len()), s);
    let hw = s.h * s.w;
    let (th, tw) = (s.h.div_ceil(2), s.w.div_ceil(2));
    let mut du = vec![0.0f32; 16 * s.co * s.ci];
    if s.b * hw > 0 {
        let band_rows = (BAND_FLOATS / (16 * (s.ci + s.co) * tw).max(1)).clamp(1, th.max(1));
        let bands = th.div_ceil(band_rows);
        let (mut v, mut m) = (Vec::new(), Vec::new());
        for task in 0..s.b * bands {
            let (b, band) = (task / bands, task % bands);
            let (ty0, nty) = (band * band_rows, band_rows.min(th - band * band_rows));
            let nt = nty * tw;
            crate::ops::cpu_math::grow(&mut v, 16 * s.ci * nt);
            crate::ops::cpu_math::grow(&mut m, 16 * s.co * nt);
            let (vp, mp) = (SendPtr(v.as_mut_ptr()), SendPtr(m.as_mut_ptr()));
            let bnd = (ty0, nty, tw);
            let xb = &x[b * s.ci * hw..(b + 1) * s.ci * hw];
            let dyb = &dy[b * s.co * hw..(b + 1) * s.co * hw];
            let (ci_hw, co_hw) = (Chw { c: s.ci, h: s.h, w: s.w }, Chw { c: s.co, h: s.h, w: s.w });
            // SAFETY: v holds 16 planes of Ci·nt and m 16 of Co·nt; each range is its own rows.
            channel_ranges(s.ci, 8)
                .into_par_iter()
                .for_each(|cis| unsafe { input_transform(xb, ci_hw, bnd, cis, (vp, 0)) });
            channel_ranges(s.co, 8).into_par_iter().for_each(|cos| unsafe { grad_transform(dyb, co_hw, bnd, cos, mp) });
            let dup = SendPtr(du.as_mut_ptr());
            (0..16).into_par_iter().for_each(|xi| {
                // SAFETY: plane ξ of du (co x ci) is this call's alone; dM[ξ] is co x nt (row
                // stride nt); V[ξ]ᵀ is nt x ci: element (t, c) at V[ξ][c][t].
                unsafe {
                    gemm::gemm(
                        s.co,
                        s.ci,
                        nt,
                        dup.get().add(xi * s.co * s.ci),
                        1,
                        s.ci as isize,
                        true,
                        mp.get().add(xi * s.co * nt),
                        1,
                        nt as isize,
                        vp.get().add(xi * s.ci * nt),
                        nt as isize,
                        1,
                        1.0,
                        1.0,
                        false,
                        false,
                        false,
                        Parallelism::None,
                    )
                }
            });
        }
    }
    // dW = Gᵀ dU G per filter; Gᵀ = [[1, ½, ½, 0], [0, ½, −½, 0], [0, ½, ½, 1]]
    let plane = s.co * s.ci;
    let mut dw = vec![0.0f32; s.co * s.ci * 9];
    dw.par_chunks_mut(9).enumerate().for_each(|(f, g)| {
        let u = |r: usize, c: usize| du[(4 * r + c) * plane + f];
        // t = Gᵀ·dU (3 x 4), then t·G (3 x 3)
        let t: [[f32; 4]; 3] = [
            std::array::from_fn(|c| u(0, c) + 0.5 * (u(1, c) + u(2, c))),
            std::array::from_fn(|c| 0.5 * (u(1, c) - u(2, c))),
            std::array::from_fn(|c| 0.5 * (u(1, c) + u(2, c)) + u(3, c)),
        ];
        for (k, tr) in t.iter().enumerate() {
            g[3 * k] = tr[0] + 0.5 * (tr[1] + tr[2]);
            g[3 * k + 1] = 0.5 * (tr[1] - tr[2]);
            g[3 * k + 2] = 0.5 * (tr[1] + tr[2]) + tr[3];
        }
    });
    dw
}
