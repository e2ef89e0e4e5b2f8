//! cpu convolution as implicit GEMM over bands of output rows: each task builds the im2col of a
//! few rows (at most 256K floats, within L2) and runs one GEMM (`gemm` crate) straight into the
//! output; the whole batch's im2col never exists. 1×1 convolutions need no im2col at all.

use super::ConvShape;
use crate::ops::cpu_math::SendPtr;
use gemm::Parallelism;
use rayon::prelude::*;

/// At most this many floats of im2col per task (1 MB): the band's im2col stays in L2 while the
/// GEMM streams it. Measured on the 2-core dev machine against bands of >= 1024 pixels (up to
/// 16 MB of im2col): the L2-sized bands were 5-20% faster on every 3×3 shape of the model.
pub const COL_FLOATS: usize = 1 << 18;
/// The weight gradient is summed in this many fixed parts (then in order), so the result does not
/// depend on the thread count or the schedule.
const WGRAD_PARTS: usize = 4;

/// Output rows per task: an im2col band of about `col_floats` floats.
fn band_rows(s: &ConvShape, col_floats: usize) -> usize {
    let per_row = if is_pointwise(s) { s.w } else { s.depth() * s.w };
    (col_floats / per_row.max(1)).clamp(1, s.h.max(1))
}

/// With fewer tasks than this, tasks run one after another and each GEMM uses every thread
/// (the deep layers' small maps give only a few bands; 14² × 512 went from 4.6 to 2.7 ms).
fn few_tasks() -> usize {
    4 * rayon::current_num_threads()
}

/// 1×1: the input itself is the GEMM operand, no im2col.
fn is_pointwise(s: &ConvShape) -> bool {
    s.kh == 1 && s.kw == 1
}

/// The im2col of rows [r0, r0 + rows) of image `xb` [Ci, H, W]: col [Ci·kh·kw, rows·W].
fn im2col(xb: &[f32], s: &ConvShape, r0: usize, rows: usize, col: &mut [f32]) {
    let (ph, pw, w) = (s.kh / 2, s.kw / 2, s.w);
    let px = rows * w;
    for ci in 0..s.ci {
        let plane = &xb[ci * s.h * w..(ci + 1) * s.h * w];
        for kh in 0..s.kh {
            for kw in 0..s.kw {
                let dst = &mut col[((ci * s.kh + kh) * s.kw + kw) * px..][..px];
                for r in 0..rows {
                    let iy = (r0 + r + kh) as isize - ph as isize;
                    let out = &mut dst[r * w..(r + 1) * w];
                    if iy < 0 || iy >= s.h as isize {
                        out.fill(0.0);
                        continue;
                    }
                    let src = &plane[iy as usize * w..(iy as usize + 1) * w];
                    // out[x] = src[x + kw - pad] where in range
                    let shift = kw as isize - pw as isize;
                    let (lo, hi) = ((-shift).max(0) as usize, (w as isize - shift).min(w as isize).max(0) as usize);
                    out[..lo.min(w)].fill(0.0);
                    if hi > lo {
                        out[lo..hi]
                            .copy_from_slice(&src[(lo as isize + shift) as usize..(hi as isize + shift) as usize]);
                    }
                    out[hi.max(lo)..].fill(0.0);
                }
            }
        }
    }
}

/// Panics unless x, the weights (rows `w_ld` apart), the bias and y (when given) hold what `s`
/// says: the raw-pointer loops below trust these sizes.
pub(crate) fn check_slices(
    op: &str,
    x: usize,
    (w, w_ld): (usize, usize),
    bias: Option<usize>,
    y: Option<usize>,
    s: &ConvShape,
) {
    use crate::ops::{assert_len, product};
    assert_len(op, "x", x, product(&[s.b, s.ci, s.h, s.w]));
    assert!(w_ld >= s.depth(), "{op}: weight rows {w_ld} apart are shorter than Ci·kh·kw = {}", s.depth());
    let wn = if s.co == 0 { Some(0) } else { (s.co - 1).checked_mul(w_ld).and_then(|r| r.checked_add(s.depth())) };
    assert_len(op, "w", w, wn);
    if let Some(b) = bias {
        assert_len(op, "bias", b, Some(s.co));
    }
    if let Some(y) = y {
        assert_len(op, "y", y, product(&[s.b, s.co, s.h, s.w]));
    }
}

/// y [B,Co,H,W] = conv(x [B,Ci,H,W], w [Co,Ci,kh,kw]) + bias.
pub fn conv2d(x: &[f32], w: &[f32], bias: Option<&[f32]>, s: &ConvShape) -> Vec<f32> {
    if super::winograd::applies(s) {
        return super::winograd::conv2d_new(&[x], (w, s.depth()), bias, s);
    }
    conv2d_im2col(x, w, bias, s)
}

/// `conv2d` by im2col + GEMM whatever the shape (the autotuner's other candidate).
pub fn conv2d_im2col(x: &[f32], w: &[f32], bias: Option<&[f32]>, s: &ConvShape) -> Vec<f32> {
    conv2d_im2col_banded(x, w, bias, s, COL_FLOATS)
}

/// `conv2d_im2col` with im2col bands of about `col_floats` floats instead of the default (an
/// autotuning candidate; the GEMM library blocks its sums by the band's width, so the order of
/// each pixel's sum, not its terms, changes with the bands: within f32 summation rounding).
pub fn conv2d_im2col_banded(x: &[f32], w: &[f32], bias: Option<&[f32]>, s: &ConvShape, col_floats: usize) -> Vec<f32> {
    check_slices("conv2d", x.len(), (w.len(), s.depth()), bias.map(|b| b.len()), None, s);
    let mut y = vec![0.0f32; s.b * s.co * s.h * s.w];
    if !y.is_empty() {
        im2col_into(x, (w, s.depth()), bias, (s, col_floats), &mut y, false);
    }
    y
}

/// y (+)= conv(x, w) + bias, with the weights' rows w_ld floats apart (a slice of the input
/// channels reads its columns of the full weights, see conv2d_cat).
pub fn conv2d_into(
    x: &[f32],
    (w, w_ld): (&[f32], usize),
    bias: Option<&[f32]>,
    s: &ConvShape,
    y: &mut [f32],
    accumulate: bool,
) {
    check_slices("conv2d", x.len(), (w.len(), w_ld), bias.map(|b| b.len()), Some(y.len()), s);
    if y.is_empty() {
        return;
    }
    if super::winograd::applies(s) {
        return super::winograd::conv2d_into(&[x], (w, w_ld), bias, s, y, accumulate);
    }
    im2col_into(x, (w, w_ld), bias, (s, COL_FLOATS), y, accumulate)
}

/// conv2d_into by im2col + GEMM (slices checked by the caller, y not empty).
fn im2col_into(
    x: &[f32],
    (w, w_ld): (&[f32], usize),
    bias: Option<&[f32]>,
    (s, col_floats): (&ConvShape, usize),
    y: &mut [f32],
    accumulate: bool,
) {
    let (hw, kk) = (s.h * s.w, s.depth());
    let rows = band_rows(s, col_floats);
    let bands = s.h.div_ceil(rows);
    let yp = SendPtr(y.as_mut_ptr());
    let tasks = s.b * bands;
    let parallel_tasks = tasks >= few_tasks();
    let inner = if parallel_tasks { Parallelism::None } else { Parallelism::Rayon(0) };
    let run = |col: &mut Vec<f32>, task: usize| {
        let (b, band) = (task / bands, task % bands);
        let (r0, nr) = (band * rows, rows.min(s.h - band * rows));
        let px = nr * s.w;
        let xb = &x[b * s.ci * hw..(b + 1) * s.ci * hw];
        // SAFETY: this task alone writes rows [r0, r0 + nr) of every channel of image b.
        let yb = unsafe { yp.get().add(b * s.co * hw + r0 * s.w) };
        for co in 0..s.co {
            let v = bias.map_or(0.0, |bv| bv[co]);
            // SAFETY: as above; px floats of channel co's band.
            let band = unsafe { std::slice::from_raw_parts_mut(yb.add(co * hw), px) };
            if !accumulate {
                band.fill(v);
            } else if v != 0.0 {
                band.iter_mut().for_each(|o| *o += v);
            }
        }
        let (rhs, rhs_rs) = if is_pointwise(s) {
            (xb[r0 * s.w..].as_ptr(), hw as isize)
        } else {
            crate::ops::cpu_math::grow(col, kk * px);
            im2col(xb, s, r0, nr, col);
            (col.as_ptr(), px as isize)
        };
        // SAFETY: dst is co x px with row stride hw inside image b's band; lhs is co x kk
        // row-major; rhs is kk x px with row stride rhs_rs.
        unsafe {
            gemm::gemm(
                s.co,
                px,
                kk,
                yb,
                1,
                hw as isize,
                true,
                w.as_ptr(),
                1,
                w_ld as isize,
                rhs,
                1,
                rhs_rs,
                1.0,
                1.0,
                false,
                false,
                false,
                inner,
            )
        }
    };
    if parallel_tasks {
        (0..tasks).into_par_iter().for_each_init(Vec::new, run);
    } else {
        let mut col = Vec::new();
        (0..tasks).for_each(|t| run(&mut col, t));
    }
}

/// w [Co,Ci,kh,kw] -> [Ci,Co,kh,kw] with both kernel axes reversed (k2 = kh·kw; reversing the
/// flattened index reverses both): the weights of the convolution that maps dy to dx.
pub fn flip_weights(w: &[f32], co: usize, ci: usize, k2: usize) -> Vec<f32> {
    let mut wt = vec![0.0f32; w.len()];
    for o in 0..co {
        for i in 0..ci {
            for r in 0..k2 {
                wt[(i * co + o) * k2 + r] = w[(o * ci + i) * k2 + (k2 - 1 - r)];
            }
        }
    }
    wt
}

/// dw [Co, Ci·kh·kw] = Σ over images and bands of dy_band [Co, px] · col_bandᵀ.
pub fn conv2d_wgrad(x: &[f32], dy: &[f32], s: &ConvShape) -> Vec<f32> {
    check_slices("conv2d_wgrad", x.len(), (s.co * s.depth(), s.depth()), None, Some(dy.len()), s);
    if s.kh != 3 || s.kw != 3 {
        return wgrad_im2col(x, dy, s);
    }
    let heuristic = if super::winograd::applies_wgrad(s) { 0 } else { 1 };
    crate::ops::tune::pick(
        || super::tune_key("conv2d_wgrad", s),
        &["winograd", "im2col"],
        heuristic,
        |i| {
            if i == 0 {
                super::winograd::conv2d_wgrad(x, dy, s)
            } else {
                wgrad_im2col(x, dy, s)
            }
        },
    )
}

/// `conv2d_wgrad` by im2col + GEMM.
pub fn wgrad_im2col(x: &[f32], dy: &[f32], s: &ConvShape) -> Vec<f32> {
    let (hw, kk) = (s.h * s.w, s.depth());
    let rows = band_rows(s, COL_FLOATS);
    let bands = s.h.div_ceil(rows);
    let tasks = s.b * bands;
    let (parts_n, inner) =
        if tasks < few_tasks() { (1, Parallelism::Rayon(0)) } else { (WGRAD_PARTS, Parallelism::None) };
    let parts: Vec<Vec<f32>> = (0..parts_n)
        .into_par_iter()
        .map(|part| {
            let mut dw = vec![0.0f32; s.co * kk];
            let mut col = Vec::new();
            for task in (part * tasks / parts_n)..((part + 1) * tasks / parts_n) {
                let (b, band) = (task / bands, task % bands);
                let (r0, nr) = (band * rows, rows.min(s.h - band * rows));
                let px = nr * s.w;
                let xb = &x[b * s.ci * hw..(b + 1) * s.ci * hw];
                let (col_ptr, col_rs) = if is_pointwise(s) {
                    (xb[r0 * s.w..].as_ptr(), hw as isize)
                } else {
                    crate::ops::cpu_math::grow(&mut col, kk * px);
                    im2col(xb, s, r0, nr, &mut col);
                    (col.as_ptr(), px as isize)
                };
                // SAFETY: dw is co x kk; lhs = dy band (co x px, row stride hw); rhs = colᵀ
                // (px x kk: element (p, j) at col[j * col_rs + p]).
                unsafe {
                    gemm::gemm(
                        s.co,
                        kk,
                        px,
                        dw.as_mut_ptr(),
                        1,
                        kk as isize,
                        true,
                        dy[b * s.co * hw + r0 * s.w..].as_ptr(),
                        1,
                        hw as isize,
                        col_ptr,
                        col_rs,
                        1,
                        1.0,
                        1.0,
                        false,
                        false,
                        false,
                        inner,
                    )
                }
            }
            dw
        })
        .collect();
    let mut dw = vec![0.0f32; s.co * kk];
    for p in parts {
        for (o, v) in dw.iter_mut().zip(p) {
            *o += v;
        }
    }
    dw
}
