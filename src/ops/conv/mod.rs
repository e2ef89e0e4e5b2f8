//! 2-D convolution, kh x kw with both odd (the U-Net uses 3×3 and 1×1; the text branch's Conv1d
//! over tokens is a 1×3 convolution of [B, C, 1, L], see `conv1d`), padding (kh/2, kw/2)
//! ("same"), stride 1, NCHW, with bias; forward and backward to the input, the weights and the
//! bias.
//!
//! cuda / emu: implicit GEMMs on the shared tile core (kernels/conv.cu); `GemmAlgo::TensorCore`
//! uses tf32 mma.sync with f32 accumulation, `Tiled` exact f32. The input gradient is the forward
//! convolution of dy with the flipped, transposed weights; the weight gradient is split over the
//! pixels into partial sums that are then added in a fixed order (deterministic).
//! cpu: implicit GEMM over bands of output rows (see cpu.rs).

/// Its `reclmis bench` cases and `selfcheck` (registered in `bench::registry`).
#[cfg(feature = "cli")]
pub mod bench;
#[cfg(feature = "autocast")]
pub mod bf16;
pub mod cpu;
#[cfg(feature = "refs")]
pub mod reference;
#[cfg(feature = "autocast")]
mod tf32;
pub mod weight_cache;
pub mod winograd;

use crate::device::{Device, LaunchCfg};
use crate::error::{Error, Result};
use crate::kernels::Kernel;
use crate::ops::check_u32;
use crate::ops::gemm::GemmAlgo;
use crate::ops::reduce;
use crate::tensor::{DType, Tensor};

crate::kernel_params! {
    struct ConvParams [72] {
        x: u64,
        w: u64,
        bias: u64,
        y: u64,
        b: u32,
        ci: u32,
        co: u32,
        h: u32,
        w_: u32,
        kh: u32,
        kw: u32,
        splits: u32,
        w_ld: u32,
        accumulate: u32,
    }
}

crate::kernel_params! {
    struct WflipParams [32] {
        w: u64,
        wt: u64,
        co: u32,
        ci: u32,
        k2: u32,
        pad: u32,
    }
}

/// Sizes of one convolution: x [b, ci, h, w], weights [co, ci, kh, kw].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConvShape {
    pub b: usize,
    pub ci: usize,
    pub co: usize,
    pub h: usize,
    pub w: usize,
    pub kh: usize,
    pub kw: usize,
}

/// The autotuner's key for a shape: the op and every size that changes which algorithm wins.
pub(crate) fn tune_key(op: &str, s: &ConvShape) -> String {
    format!("{op} b{} ci{} co{} {}x{} k{}x{}", s.b, s.ci, s.co, s.h, s.w, s.kh, s.kw)
}

impl ConvShape {
    pub fn flops(&self) -> f64 {
        2.0 * (self.b * self.co * self.h * self.w * self.ci * self.kh * self.kw) as f64
    }
    /// Ci·kh·kw, the GEMM depth of the forward.
    pub fn depth(&self) -> usize {
        self.ci * self.kh * self.kw
    }
}

pub struct Conv2dGrads {
    pub dx: Tensor,
    pub dw: Tensor,
    pub db: Option<Tensor>,
}

/// Checks x [B,Ci,H,W], w [Co,Ci,kh,kw] (both odd), bias [Co].
pub fn shape(x: &Tensor, w: &Tensor, bias: Option<&Tensor>) -> Result<ConvShape> {
    shape_of(x, w, bias, DType::F32)
}

/// `shape` for operands (and bias) of `dtype`.
fn shape_of(x: &Tensor, w: &Tensor, bias: Option<&Tensor>, dtype: DType) -> Result<ConvShape> {
    let op = "conv2d";
    x.expect_dtype(op, dtype)?;
    w.expect_dtype(op, dtype)?;
    if x.rank() != 4 || w.rank() != 4 {
        return Err(Error::shape(
            op,
            format!("input {:?} must be [B,C,H,W] and weights {:?} [Co,Ci,kh,kw]", x.shape(), w.shape()),
        ));
    }
    let (xs, ws) = (x.shape(), w.shape());
    if ws[1] != xs[1] || ws[2] % 2 == 0 || ws[3] % 2 == 0 {
        return Err(Error::shape(
            op,
            format!("weights {ws:?} do not fit input {xs:?} (need [Co,{},kh,kw] with kh, kw odd)", xs[1]),
        ));
    }
    if let Some(b) = bias {
        b.expect_dtype(op, dtype)?;
        x.same_device(op, &[b])?;
        if b.shape() != [ws[0]] {
            return Err(Error::shape(op, format!("bias {:?} must be [{}]", b.shape(), ws[0])));
        }
    }
    x.same_device(op, &[w])?;
    Ok(ConvShape { b: xs[0], ci: xs[1], co: ws[0], h: xs[2], w: xs[3], kh: ws[2], kw: ws[3] })
}

/// The params of one conv launch; `ptrs`: x, w (or dy), bias (or 0), y (or the partial sums).
/// `w_ld`: the weights' row stride (forward) or the partial sums' (weight gradient); `accumulate`:
/// the forward adds to y.
fn conv_params(ptrs: [u64; 4], s: &ConvShape, splits: usize, (w_ld, accumulate): (usize, bool)) -> Result<ConvParams> {
    let op = "conv2d";
    Ok(ConvParams {
        x: ptrs[0],
        w: ptrs[1],
        bias: ptrs[2],
        y: ptrs[3],
        b: check_u32(op, s.b)?,
        ci: check_u32(op, s.ci)?,
        co: check_u32(op, s.co)?,
        h: check_u32(op, s.h)?,
        w_: check_u32(op, s.w)?,
        kh: check_u32(op, s.kh)?,
        kw: check_u32(op, s.kw)?,
        splits: check_u32(op, splits)?,
        w_ld: check_u32(op, w_ld)?,
        accumulate: accumulate as u32,
    })
}

/// `ptrs`: x, w, bias (or 0), y; `w_ld`, `accumulate` as in `conv_params`.
///
/// # Safety
/// The pointers must be live f32 buffers on `dev`: x [b, ci, h, w], w with `co` rows of stride
/// `w_ld` holding ci·kh·kw values each, the bias [co] when nonzero, and y [b, co, h, w] not
/// overlapping the others.
unsafe fn launch_fwd(dev: &Device, ptrs: [u64; 4], s: &ConvShape, wl_acc: (usize, bool), algo: GemmAlgo) -> Result<()> {
    let op = "conv2d";
    let n = s.b * s.h * s.w;
    let p = conv_params(ptrs, s, 1, wl_acc)?;
    let grid = (check_u32(op, n.div_ceil(64))?, check_u32(op, s.co.div_ceil(64))?, 1);
    if grid.1 > 65535 {
        return Err(Error::Unsupported { op, detail: format!("{} output channels", s.co) });
    }
    let run = |i: usize| {
        let (kernel, threads) = FWD_KERNELS[i];
        // SAFETY: the caller guarantees the buffers (this function's contract); ConvParams
        // mirrors the kernels' params struct (the same for both).
        unsafe { dev.launch(kernel, LaunchCfg { grid, block: (threads, 1, 1), smem_bytes: 0 }, &p) }
    };
    match algo {
        // tf32 allowed: the tensor cores or the exact FMA kernel, tuned per shape and GPU; not
        // when y accumulates (a concatenation's later parts): timing runs it twice
        GemmAlgo::TensorCore if !wl_acc.1 => crate::ops::tune::pick_on(
            dev,
            || format!("{} depth{} bias{}", tune_key("conv2d_f32", s), wl_acc.0, ptrs[2] != 0),
            &crate::ops::gemm::F32_NAMES,
            0,
            run,
        ),
        GemmAlgo::TensorCore => run(0),
        _ => run(1),
    }
}

/// The implicit-GEMM forward kernels, in `gemm::F32_NAMES`' order: tf32 tensor cores, exact FMA.
const FWD_KERNELS: [(Kernel, u32); 2] = [(Kernel::conv2d_tc_fwd_f32, 128), (Kernel::conv2d_fwd_f32, 256)];

/// The cpu 3×3 forward's tuning candidates: (algorithm, band size in floats); F(4×4, 3×3)
/// Winograd beside F(2×2, 3×3) and im2col; the split variants (a quarter and twice F(2×2)'s bands:
/// on the AMD EPYC VM the best band differed by shape, within 5% of the default; a quarter and four
/// times im2col's) are timed by `--tune exhaustive` only.
const CPU_FWD: [(CpuFwd, usize); 7] = [
    (CpuFwd::Winograd(winograd::Tiles::F2), winograd::BAND_FLOATS),
    (CpuFwd::Im2col, cpu::COL_FLOATS),
    (CpuFwd::Winograd(winograd::Tiles::F4), winograd::BAND_FLOATS),
    (CpuFwd::Winograd(winograd::Tiles::F2), winograd::BAND_FLOATS / 4),
    (CpuFwd::Winograd(winograd::Tiles::F2), winograd::BAND_FLOATS * 2),
    (CpuFwd::Im2col, cpu::COL_FLOATS / 4),
    (CpuFwd::Im2col, cpu::COL_FLOATS * 4),
];
pub const CPU_FWD_NAMES: [&str; 7] =
    ["winograd", "im2col", "winograd4", "winograd:band/4", "winograd:band*2", "im2col:band/4", "im2col:band*4"];

#[derive(Clone, Copy)]
enum CpuFwd {
    Winograd(winograd::Tiles),
    Im2col,
}

/// y [B,Co,H,W] = conv(x, w) + bias.
pub fn conv2d(x: &Tensor, w: &Tensor, bias: Option<&Tensor>, algo: GemmAlgo) -> Result<Tensor> {
    let s = shape(x, w, bias)?;
    let out = [s.b, s.co, s.h, s.w];
    let dev = x.device();
    if let Device::Cpu = dev {
        let bv = match bias {
            Some(b) => Some(b.cpu_f32("conv2d")?),
            None => None,
        };
        let (xv, wv) = (x.cpu_f32("conv2d")?, w.cpu_f32("conv2d")?);
        return Tensor::from_vec(cpu_forward(xv, (wv, w), bv, &s), &out, dev);
    }
    #[cfg(feature = "autocast")]
    if algo == GemmAlgo::TensorCore && tf32::forward_applies(&s) {
        return tf32::forward(&[x], w, bias, &s);
    }
    let y = Tensor::empty(&out, DType::F32, dev)?;
    if y.numel() > 0 {
        let ptrs = [x.dev_ptr(), w.dev_ptr(), bias.map_or(0, |b| b.dev_ptr()), y.dev_ptr()];
        // SAFETY: `shape` checked x, w and the bias against s; y is a new [b, co, h, w] tensor.
        unsafe { launch_fwd(dev, ptrs, &s, (s.depth(), false), algo) }?;
    }
    Ok(y)
}

/// The cpu forward of f32 values: im2col for kernels other than 3×3, else the tuned choice
/// among Winograd F(2×2), F(4×4) and im2col (`wt`: the weights' tensor, the key of Winograd's
/// transformed-weight cache).
fn cpu_forward(xv: &[f32], (wv, wt): (&[f32], &Tensor), bv: Option<&[f32]>, s: &ConvShape) -> Vec<f32> {
    if s.kh != 3 || s.kw != 3 {
        return cpu::conv2d_im2col(xv, wv, bv, s);
    }
    crate::ops::tune::pick(
        || tune_key("conv2d", s),
        &CPU_FWD_NAMES,
        cpu_heuristic(s),
        |i| match CPU_FWD[i] {
            (CpuFwd::Winograd(tiles), floats) => {
                let u = winograd::cached_weights(tiles, wt, (wv, s.depth()), s);
                winograd::conv2d_new_banded(tiles, &[xv], (wv, s.depth()), Some(&u), bv, s, floats)
            }
            (CpuFwd::Im2col, floats) => cpu::conv2d_im2col_banded(xv, wv, bv, s, floats),
        },
    )
}

/// Gradients of Σ dy · conv2d(x, w, bias): dx, dw [Co,Ci,kh,kw] and (with a bias) db [Co].
pub fn conv2d_backward(x: &Tensor, w: &Tensor, dy: &Tensor, with_bias: bool, algo: GemmAlgo) -> Result<Conv2dGrads> {
    let op = "conv2d_backward";
    let s = shape(x, w, None)?;
    dy.expect_dtype(op, DType::F32)?;
    dy.same_device(op, &[x])?;
    if dy.shape() != [s.b, s.co, s.h, s.w] {
        return Err(Error::shape(
            op,
            format!("dy {:?} is not the output shape {:?}", dy.shape(), [s.b, s.co, s.h, s.w]),
        ));
    }
    let dev = x.device();
    // The input gradient: dy convolved with the flipped, transposed weights.
    let st = ConvShape { ci: s.co, co: s.ci, ..s };
    let (dx, dw) = if let Device::Cpu = dev {
        let wt = cpu::flip_weights(w.cpu_f32(op)?, s.co, s.ci, s.kh * s.kw);
        let dx = cpu::conv2d(dy.cpu_f32(op)?, &wt, None, &st);
        let dw = cpu::conv2d_wgrad(x.cpu_f32(op)?, dy.cpu_f32(op)?, &s);
        (Tensor::from_vec(dx, x.shape(), dev)?, Tensor::from_vec(dw, w.shape(), dev)?)
    } else {
        // tf32: the pipelined kernels where their 16-byte chunks are whole
        #[cfg(feature = "autocast")]
        let tc = algo == GemmAlgo::TensorCore;
        #[cfg(feature = "autocast")]
        let dx = if tc && tf32::input_grad_applies(&s) { tf32::input_grads(&[s.ci], dy, w, &s)?.pop() } else { None };
        #[cfg(not(feature = "autocast"))]
        let dx: Option<Tensor> = None;
        let dx = match dx {
            Some(dx) => dx,
            None => {
                let wt = flipped_weights(w, &s)?;
                let dx = Tensor::empty(x.shape(), DType::F32, dev)?;
                if dx.numel() > 0 {
                    // SAFETY: dy is [b, co, h, w] (checked above), wt the flipped [ci, co, kh, kw]
                    // weights, dx a new tensor of x's shape.
                    let ptrs = [dy.dev_ptr(), wt.dev_ptr(), 0, dx.dev_ptr()];
                    unsafe { launch_fwd(dev, ptrs, &st, (st.depth(), false), algo) }?;
                }
                dx
            }
        };
        #[cfg(feature = "autocast")]
        if tc && tf32::weight_grad_applies(&s, dy) {
            return Ok(Conv2dGrads {
                dx,
                dw: tf32::weight_grad(&[x], dy, &s)?,
                db: if with_bias { Some(bias_grad(dy, &s)?) } else { None },
            });
        }
        (dx, wgrad(dev, &[x], dy, &s, algo)?.reshape(w.shape())?)
    };
    let db = if with_bias { Some(bias_grad(dy, &s)?) } else { None };
    Ok(Conv2dGrads { dx, dw, db })
}

/// On cuda / emu: w [Co,Ci,kh,kw] -> [Ci,Co,kh,kw] with both kernel axes reversed, the weights of
/// the convolution that maps dy to dx.
fn flipped_weights(w: &Tensor, s: &ConvShape) -> Result<Tensor> {
    let op = "conv2d_backward";
    let wt = Tensor::empty(&[s.ci, s.co, s.kh, s.kw], DType::F32, w.device())?;
    let fp = WflipParams {
        w: w.dev_ptr(),
        wt: wt.dev_ptr(),
        co: check_u32(op, s.co)?,
        ci: check_u32(op, s.ci)?,
        k2: check_u32(op, s.kh * s.kw)?,
        pad: 0,
    };
    if wt.numel() > 0 {
        // SAFETY: the params hold pointers to live buffers of the sizes this op checked above, for the kernel they were declared for.
        unsafe { w.device().launch(Kernel::conv_wflip_bwd_f32, LaunchCfg::elementwise(wt.numel()), &fp) }?;
    }
    Ok(wt)
}

/// db [Co] = Σ over images and pixels of dy.
fn bias_grad(dy: &Tensor, s: &ConvShape) -> Result<Tensor> {
    let per_image = reduce::sum(&dy.reshape(&[s.b, s.co, s.h * s.w])?, 2)?;
    reduce::sum(&per_image, 0)
}

/// The weight gradient on cuda / emu: split-K partial sums [splits, Co, Ci·kh·kw], then their sum.
/// `parts` are the input's channel slices (one tensor for a plain convolution); `s` has the total
/// channel count. Each slice writes its columns of the shared partial sums.
fn wgrad(dev: &Device, parts: &[&Tensor], dy: &Tensor, s: &ConvShape, algo: GemmAlgo) -> Result<Tensor> {
    let kk = s.depth();
    let pixels = s.b * s.h * s.w;
    let tiles_mn = kk.div_ceil(64) * s.co.div_ceil(64);
    // Enough blocks to fill a large GPU; each split keeps at least one 16-pixel tile.
    let splits_for = |blocks: usize| blocks.div_ceil(tiles_mn).clamp(1, pixels.div_ceil(16).clamp(1, 65535));
    match algo {
        // tf32 allowed: tensor cores or exact FMA, each at the heuristic split (256 blocks) or a
        // 4x finer one (more blocks in flight, more partial sums to add), tuned per shape and
        // GPU; the splits change the order of the f32 sum, within the kernels' tested bound
        GemmAlgo::TensorCore => crate::ops::tune::pick_on(
            dev,
            || format!("{} parts{}", tune_key("conv2d_wgrad_f32", s), parts.len()),
            &WGRAD_NAMES,
            0,
            |i| wgrad_with(dev, parts, dy, s, WGRAD_KERNELS[i / 2], splits_for(256 << (2 * (i % 2)))),
        ),
        _ => wgrad_with(dev, parts, dy, s, WGRAD_KERNELS[1], splits_for(256)),
    }
}

/// The weight-gradient kernels, in `gemm::F32_NAMES`' order, and the tuning candidates: each
/// kernel at the heuristic split and at a 4x finer one.
const WGRAD_KERNELS: [(Kernel, u32); 2] = [(Kernel::conv2d_tc_wgrad_bwd_f32, 128), (Kernel::conv2d_wgrad_bwd_f32, 256)];
pub const WGRAD_NAMES: [&str; 4] = ["tf32_mma", "tf32_mma_split4x", "f32_fma", "f32_fma_split4x"];

/// `wgrad` by one kernel over `splits` partial sums.
fn wgrad_with(
    dev: &Device,
    parts: &[&Tensor],
    dy: &Tensor,
    s: &ConvShape,
    (kernel, threads): (Kernel, u32),
    splits: usize,
) -> Result<Tensor> {
    let op = "conv2d_backward";
    let kk = s.depth();
    let k2 = s.kh * s.kw;
    let partial = Tensor::empty(&[splits, s.co, kk], DType::F32, dev)?;
    let mut c_off = 0;
    for x in parts {
        let sp = ConvShape { ci: x.shape()[1], ..*s };
        let y = partial.dev_ptr() + (c_off * k2 * 4) as u64;
        let p = conv_params([x.dev_ptr(), dy.dev_ptr(), 0, y], &sp, splits, (kk, false))?;
        let grid = (check_u32(op, sp.depth().div_ceil(64))?, check_u32(op, s.co.div_ceil(64))?, splits as u32);
        if sp.depth() * s.co * splits > 0 {
            // SAFETY: the params hold pointers to live buffers of the sizes this op checked above, for the kernel they were declared for.
            unsafe { dev.launch(kernel, LaunchCfg { grid, block: (threads, 1, 1), smem_bytes: 0 }, &p) }?;
        }
        c_off += sp.ci;
    }
    reduce::sum(&partial, 0)
}

/// 1-D convolution over the last axis, kernel k odd, padding k/2, stride 1: x [B, Ci, L],
/// w [Co, Ci, k], bias [Co] (PyTorch's Conv1d(k, padding = k/2)), as the 1×k 2-D convolution of
/// [B, Ci, 1, L].
pub fn conv1d(x: &Tensor, w: &Tensor, bias: Option<&Tensor>, algo: GemmAlgo) -> Result<Tensor> {
    let (x4, w4) = as_2d(x, w)?;
    let y = conv2d(&x4, &w4, bias, algo)?;
    y.reshape(&[x.shape()[0], w.shape()[0], x.shape()[2]])
}

/// Gradients of `conv1d`: dx [B, Ci, L], dw [Co, Ci, k], db [Co].
pub fn conv1d_backward(x: &Tensor, w: &Tensor, dy: &Tensor, with_bias: bool, algo: GemmAlgo) -> Result<Conv2dGrads> {
    let (x4, w4) = as_2d(x, w)?;
    let dy4 = dy.reshape(&[dy.shape()[0], dy.shape()[1], 1, dy.shape()[2]])?;
    let g = conv2d_backward(&x4, &w4, &dy4, with_bias, algo)?;
    Ok(Conv2dGrads { dx: g.dx.reshape(x.shape())?, dw: g.dw.reshape(w.shape())?, db: g.db })
}

fn as_2d(x: &Tensor, w: &Tensor) -> Result<(Tensor, Tensor)> {
    if x.rank() != 3 || w.rank() != 3 {
        return Err(Error::shape(
            "conv1d",
            format!("input {:?} must be [B,C,L] and weights {:?} [Co,Ci,k]", x.shape(), w.shape()),
        ));
    }
    let (xs, ws) = (x.shape(), w.shape());
    Ok((x.reshape(&[xs[0], xs[1], 1, xs[2]])?, w.reshape(&[ws[0], ws[1], 1, ws[2]])?))
}

/// The heuristic's index in `CPU_FWD_NAMES` and `CPU_CAT_NAMES` (the same first three: F(2×2),
/// the other algorithm, F(4×4)).
fn cpu_heuristic(s: &ConvShape) -> usize {
    match (winograd::applies(s), winograd::tiles_for(s)) {
        (false, _) => 1,
        (true, winograd::Tiles::F2) => 0,
        (true, winograd::Tiles::F4) => 2,
    }
}

/// The cpu 3×3 `conv2d_cat`'s tuning candidates: one Winograd convolution over all slices
/// (F(2×2, 3×3) or F(4×4, 3×3)), or each slice by its own choice, accumulated.
pub const CPU_CAT_NAMES: [&str; 3] = ["winograd", "per-part", "winograd4"];

/// Gradients of `conv2d_cat`: one dx per input slice, dw [Co, Ci_total, kh, kw], db [Co].
pub struct ConvCatGrads {
    pub dxs: Vec<Tensor>,
    pub dw: Tensor,
    pub db: Option<Tensor>,
}

/// Checks the slices (same batch, height, width, device; channel counts summing to the weights'
/// Ci) and returns the shape of the whole convolution.
fn cat_shape(parts: &[&Tensor], w: &Tensor, bias: Option<&Tensor>) -> Result<ConvShape> {
    cat_shape_of(parts, w, bias, DType::F32)
}

/// `cat_shape` for slices, weights (and bias) of `dtype`.
fn cat_shape_of(parts: &[&Tensor], w: &Tensor, bias: Option<&Tensor>, dtype: DType) -> Result<ConvShape> {
    let op = "conv2d_cat";
    let first = parts.first().ok_or_else(|| Error::shape(op, "no input slices"))?;
    let mut ci = 0;
    for (i, x) in parts.iter().enumerate() {
        x.same_device(op, &[first, w])?;
        x.expect_dtype(op, dtype)?;
        if x.rank() != 4 || x.shape()[0] != first.shape()[0] || x.shape()[2..] != first.shape()[2..] {
            return Err(Error::shape(
                op,
                format!("slice {i} {:?} must be [B, C_i, H, W] with slice 0's B, H, W {:?}", x.shape(), first.shape()),
            ));
        }
        ci += x.shape()[1];
    }
    w.expect_dtype(op, dtype)?;
    if let Some(b) = bias {
        b.expect_dtype(op, dtype)?;
    }
    let fs = first.shape();
    if w.rank() != 4 || w.shape()[1] != ci {
        return Err(Error::shape(
            op,
            format!("weights {:?} must be [Co, {ci}, kh, kw] (the slices' channels)", w.shape()),
        ));
    }
    let s = ConvShape { b: fs[0], ci, co: w.shape()[0], h: fs[2], w: fs[3], kh: w.shape()[2], kw: w.shape()[3] };
    if s.kh.is_multiple_of(2) || s.kw.is_multiple_of(2) {
        return Err(Error::shape(op, format!("weights {:?}: kh, kw odd expected", w.shape())));
    }
    if let Some(b) = bias {
        if b.shape() != [s.co] {
            return Err(Error::shape(op, format!("bias {:?} must be [{}]", b.shape(), s.co)));
        }
    }
    Ok(s)
}

/// y = conv2d(concat(parts, channel axis), w) + bias, without materialising the concatenation
/// (the U-Net decoder's ConvBN(concat[gated skip, upsampled])): each slice is convolved with its
/// columns of the weights and accumulated into y.
pub fn conv2d_cat(parts: &[&Tensor], w: &Tensor, bias: Option<&Tensor>, algo: GemmAlgo) -> Result<Tensor> {
    let op = "conv2d_cat";
    let s = cat_shape(parts, w, bias)?;
    let (k2, dev) = (s.kh * s.kw, w.device());
    let out = [s.b, s.co, s.h, s.w];
    if let Device::Cpu = dev {
        let wv = w.cpu_f32(op)?;
        let xs = parts.iter().map(|x| x.cpu_f32(op)).collect::<Result<Vec<_>>>()?;
        let cis: Vec<usize> = parts.iter().map(|x| x.shape()[1]).collect();
        let bv = bias.map(|b| b.cpu_f32(op)).transpose()?;
        return Tensor::from_vec(cpu_cat_forward(&xs, &cis, (wv, w), bv, &s), &out, dev);
    }
    // tf32: the pipelined kernels over the parts packed side by side, where the total channel
    // count is a multiple of 4
    #[cfg(feature = "autocast")]
    if algo == GemmAlgo::TensorCore && tf32::forward_applies(&s) {
        return tf32::forward(parts, w, bias, &s);
    }
    let y = Tensor::empty(&out, DType::F32, dev)?;
    if y.numel() == 0 {
        return Ok(y);
    }
    let mut c_off = 0;
    for (i, x) in parts.iter().enumerate() {
        let sp = ConvShape { ci: x.shape()[1], ..s };
        let b = if i == 0 { bias.map_or(0, |b| b.dev_ptr()) } else { 0 };
        let wp = w.dev_ptr() + (c_off * k2 * 4) as u64;
        // SAFETY: each part was checked against s (channels summing to w's ci); wp starts at this
        // part's columns of w and strides by w's full depth; y is a new [b, co, h, w] tensor.
        unsafe { launch_fwd(dev, [x.dev_ptr(), wp, b, y.dev_ptr()], &sp, (s.depth(), i > 0), algo) }?;
        c_off += sp.ci;
    }
    if c_off == 0 {
        // no input channels: y is the bias (or zero)
        let zero = Tensor::zeros(&out, dev)?;
        return match bias {
            Some(b) => crate::ops::elementwise::add(&zero, &b.reshape(&[1, s.co, 1, 1])?),
            None => Ok(zero),
        };
    }
    Ok(y)
}

/// The cpu `conv2d_cat` of f32 slices `xs` (`cis` channels each): each part convolved with its
/// columns of w and accumulated, or (3×3) every slice straight into its rows of Winograd's
/// transformed input, as tuned (`wt`: the weights' tensor, the transformed weights' cache key).
fn cpu_cat_forward(
    xs: &[&[f32]],
    cis: &[usize],
    (wv, wt): (&[f32], &Tensor),
    bv: Option<&[f32]>,
    s: &ConvShape,
) -> Vec<f32> {
    let k2 = s.kh * s.kw;
    // each part convolved with its columns of w, accumulated (each part by its own choice)
    let per_part = || {
        let mut y = vec![0.0f32; s.b * s.co * s.h * s.w];
        let mut c_off = 0;
        for (i, x) in xs.iter().enumerate() {
            let sp = ConvShape { ci: cis[i], ..*s };
            let b = if i == 0 { bv } else { None };
            cpu::conv2d_into(x, (&wv[c_off * k2..], s.depth()), b, &sp, &mut y, i > 0);
            c_off += sp.ci;
        }
        y
    };
    if s.kh != 3 || s.kw != 3 {
        return per_part();
    }
    crate::ops::tune::pick(
        || tune_key("conv2d_cat", s),
        &CPU_CAT_NAMES,
        cpu_heuristic(s),
        |i| {
            if i == 1 {
                return per_part();
            }
            // every slice straight into its rows of the transformed input: one convolution
            let tiles = if i == 0 { winograd::Tiles::F2 } else { winograd::Tiles::F4 };
            let u = winograd::cached_weights(tiles, wt, (wv, s.depth()), s);
            winograd::conv2d_new_banded(tiles, xs, (wv, s.depth()), Some(&u), bv, s, winograd::BAND_FLOATS)
        },
    )
}

/// Gradients of `conv2d_cat`: dx of each slice (its rows of the flipped weights), the weight
/// gradient with every slice writing its columns, and the bias gradient.
pub fn conv2d_cat_backward(
    parts: &[&Tensor],
    w: &Tensor,
    dy: &Tensor,
    with_bias: bool,
    algo: GemmAlgo,
) -> Result<ConvCatGrads> {
    let op = "conv2d_cat_backward";
    let s = cat_shape(parts, w, None)?;
    dy.same_device(op, &[w])?;
    dy.expect_dtype(op, DType::F32)?;
    if dy.shape() != [s.b, s.co, s.h, s.w] {
        return Err(Error::shape(
            op,
            format!("dy {:?} is not the output shape {:?}", dy.shape(), [s.b, s.co, s.h, s.w]),
        ));
    }
    let (k2, dev) = (s.kh * s.kw, w.device());
    let mut dxs = Vec::with_capacity(parts.len());
    let dw = if let Device::Cpu = dev {
        let wt = cpu::flip_weights(w.cpu_f32(op)?, s.co, s.ci, k2);
        let mut dw = vec![0.0f32; s.co * s.depth()];
        let mut c_off = 0;
        for x in parts {
            let sp = ConvShape { ci: x.shape()[1], ..s };
            // dx of the slice: dy convolved with rows c_off.. of the flipped weights [Ci, Co, k2]
            let st = ConvShape { ci: s.co, co: sp.ci, ..s };
            let mut dx = vec![0.0f32; x.numel()];
            cpu::conv2d_into(dy.cpu_f32(op)?, (&wt[c_off * s.co * k2..], st.depth()), None, &st, &mut dx, false);
            dxs.push(Tensor::from_vec(dx, x.shape(), dev)?);
            let dwp = cpu::conv2d_wgrad(x.cpu_f32(op)?, dy.cpu_f32(op)?, &sp);
            for o in 0..s.co {
                dw[o * s.depth() + c_off * k2..][..sp.depth()]
                    .copy_from_slice(&dwp[o * sp.depth()..(o + 1) * sp.depth()]);
            }
            c_off += sp.ci;
        }
        Tensor::from_vec(dw, w.shape(), dev)?
    } else {
        #[cfg(feature = "autocast")]
        let tc = algo == GemmAlgo::TensorCore;
        // tf32: the pipelined kernels where their 16-byte chunks are whole
        #[cfg(feature = "autocast")]
        let piped = tc && tf32::input_grad_applies(&s);
        #[cfg(not(feature = "autocast"))]
        let piped = false;
        if piped {
            #[cfg(feature = "autocast")]
            {
                let cis: Vec<usize> = parts.iter().map(|x| x.shape()[1]).collect();
                dxs = tf32::input_grads(&cis, dy, w, &s)?;
            }
        } else {
            let wt = flipped_weights(w, &s)?;
            let mut c_off = 0;
            for x in parts {
                let st = ConvShape { ci: s.co, co: x.shape()[1], ..s };
                let dx = Tensor::empty(x.shape(), DType::F32, dev)?;
                if dx.numel() > 0 {
                    let wp = wt.dev_ptr() + (c_off * s.co * k2 * 4) as u64;
                    // SAFETY: wp starts at this part's rows of the flipped weights [ci_total, co,
                    // kh, kw]; dy was checked against s and dx is a new tensor of the part's shape.
                    let ptrs = [dy.dev_ptr(), wp, 0, dx.dev_ptr()];
                    unsafe { launch_fwd(dev, ptrs, &st, (st.depth(), false), algo) }?;
                }
                dxs.push(dx);
                c_off += x.shape()[1];
            }
        }
        #[cfg(feature = "autocast")]
        if tc && tf32::weight_grad_applies(&s, dy) {
            let db = if with_bias { Some(bias_grad(dy, &s)?) } else { None };
            return Ok(ConvCatGrads { dxs, dw: tf32::weight_grad(parts, dy, &s)?, db });
        }
        wgrad(dev, parts, dy, &s, algo)?.reshape(w.shape())?
    };
    let db = if with_bias { Some(bias_grad(dy, &s)?) } else { None };
    Ok(ConvCatGrads { dxs, dw, db })
}
