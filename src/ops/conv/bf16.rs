//! The convolution on bf16 operands (bf16 autocast): f32 sums of the exact products, one bf16
//! rounding of each output (after the bias), as the GEMM's bf16 path.
//!
//! cuda / emu: implicit GEMMs on the pipelined tensor-core core (kernels/conv.cu over
//! pipe_gemm.cuh: cp.async ring, ldmatrix, mma.sync m16n8k16) over NHWC copies of the
//! activations and packed weights, so that each 16-byte copy is 8 channels of one input pixel.
//! That needs the channel counts the kernels read along in multiples of 8 (Ci for the forward,
//! Co for the input gradient, both for the weight gradient); other shapes (the first layer's 3
//! input channels) run the f32 kernels on widened copies.
//! cpu: the f32 convolutions on widened plain buffers (the same products; sums in another
//! order), with the temporaries a GPU allocates counted on the cpu's gauge (`Mirrored`), so that
//! both devices report the same memory.

use super::{bias_grad, cat_shape_of, shape_of, Conv2dGrads, ConvCatGrads, ConvShape};
use crate::device::memory::Mirrored;
use crate::device::{Device, LaunchCfg};
use crate::error::{Error, Result};
use crate::kernels::Kernel;
use crate::ops::cast::cast;
use crate::ops::check_u32;
use crate::ops::gemm::{self, cpu::widened, GemmAlgo};
use crate::tensor::{DType, Tensor};

const OP: &str = "conv2d";

crate::kernel_params! {
    struct ConvPipeParams [64] {
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
    }
}

crate::kernel_params! {
    struct NhwcParams [40] {
        x: u64,
        y: u64,
        b: u32,
        c: u32,
        hw: u32,
        c_total: u32,
        c_off: u32,
        pad: u32,
    }
}

crate::kernel_params! {
    struct WpackParams [32] {
        w: u64,
        wp: u64,
        co: u32,
        ci: u32,
        k2: u32,
        flip: u32,
    }
}

crate::kernel_params! {
    struct WgradSumParams [32] {
        part: u64,
        dw: u64,
        co: u32,
        ci: u32,
        k2: u32,
        splits: u32,
    }
}

/// The element type of the pipelined convolution kernels' operands: bf16 (autocast), or f32 read
/// as tf32 (`conv::tf32`). The host code here serves both; the kernels differ.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(super) enum Elem {
    Bf16,
    Tf32,
}

impl Elem {
    /// The forward's pipelined kernels: the 128- and 64-square block tiles (the GEMM's tiles, the
    /// same dynamic shared memory), in FWD_NAMES' order.
    fn fwd_kernels(self) -> [(Kernel, u32, u32); 2] {
        match self {
            Elem::Bf16 => [
                (Kernel::conv2d_pipe128_fwd_bf16, 128, gemm::PIPE128_SMEM),
                (Kernel::conv2d_pipe64_fwd_bf16, 64, gemm::PIPE64_SMEM),
            ],
            Elem::Tf32 => [
                (Kernel::conv2d_pipe128_fwd_f32, 128, gemm::PIPE128_SMEM),
                (Kernel::conv2d_pipe64_fwd_f32, 64, gemm::PIPE64_SMEM),
            ],
        }
    }
    /// The weight gradient's pipelined kernels: the 128- and 64-square block tiles, in
    /// FWD_NAMES' order.
    fn wgrad_kernels(self) -> [(Kernel, u32, u32); 2] {
        match self {
            Elem::Bf16 => [
                (Kernel::conv2d_pipe128_wgrad_bwd_bf16, 128, gemm::PIPE128_SMEM),
                (Kernel::conv2d_pipe64_wgrad_bwd_bf16, 64, gemm::PIPE64_SMEM),
            ],
            Elem::Tf32 => [
                (Kernel::conv2d_pipe128_wgrad_bwd_f32, 128, gemm::PIPE128_SMEM),
                (Kernel::conv2d_pipe64_wgrad_bwd_f32, 64, gemm::PIPE64_SMEM),
            ],
        }
    }
    /// The NCHW -> NHWC copy, the weight packing and the sum of the weight gradient's splits.
    fn aux(self) -> [Kernel; 3] {
        match self {
            Elem::Bf16 => [Kernel::conv_nhwc_fwd_bf16, Kernel::conv_wpack_fwd_bf16, Kernel::conv_wgrad_sum_bwd_bf16],
            Elem::Tf32 => [Kernel::conv_nhwc_fwd_f32, Kernel::conv_wpack_fwd_f32, Kernel::conv_wgrad_sum_bwd_f32],
        }
    }
}

pub const FWD_NAMES: [&str; 2] = ["pipe128", "pipe64"];

/// A temporary of the cuda/emu path: a tensor there, its bytes counted on the cpu.
enum Scratch {
    Tensor(Tensor),
    // held for its Drop (uncounting the bytes), never read
    Mirrored(#[allow(dead_code)] Mirrored),
}

impl Scratch {
    fn new(dev: &Device, numel: usize, dtype: DType) -> Result<Scratch> {
        Ok(match dev {
            Device::Cpu => Scratch::Mirrored(Mirrored::new(dev.kind(), (numel * dtype.size()) as u64)),
            _ => Scratch::Tensor(Tensor::empty(&[numel], dtype, dev)?),
        })
    }
    fn ptr(&self) -> u64 {
        match self {
            Scratch::Tensor(t) => t.dev_ptr(),
            Scratch::Mirrored(_) => 0,
        }
    }
}

/// y [B,Co,H,W] bf16 = conv(x, w) + bias, all bf16.
pub fn conv2d_bf16(x: &Tensor, w: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
    let s = shape_of(x, w, bias, DType::BF16)?;
    let dev = x.device();
    let out = [s.b, s.co, s.h, s.w];
    if !s.ci.is_multiple_of(8) || crate::tensor::numel(&out) == 0 || s.ci == 0 {
        let b = bias.map(|b| cast(b, DType::F32)).transpose()?;
        let y = super::conv2d(&cast(x, DType::F32)?, &cast(w, DType::F32)?, b.as_ref(), GemmAlgo::TensorCore)?;
        return cast(&y, DType::BF16);
    }
    let xn = Scratch::new(dev, x.numel(), DType::BF16)?;
    let wp = Scratch::new(dev, w.numel(), DType::BF16)?;
    if let Device::Cpu = dev {
        if s.kh == 1 && s.kw == 1 && bias.is_none() && reclmis_cpu_loops::bf16dot::available() {
            // a 1×1 convolution is a product per image: y_b [Co, HW] = w [Co, Ci] · x_b [Ci, HW],
            // on the bf16 values as stored (AVX512_BF16 dot products, f32 sums, one rounding)
            let hw = s.h * s.w;
            let gs = gemm::GemmShape { batch: s.b, m: s.co, n: hw, k: s.ci, sa: (0, s.ci, 1), sb: (s.ci * hw, hw, 1) };
            return Tensor::from_vec_bf16(gemm::cpu::gemm_bf16_dot(w, x, &gs, 1.0, None, false)?, &out, dev);
        }
        let bv = bias.map(|b| widened(b, OP)).transpose()?;
        let y = super::cpu_forward(&widened(x, OP)?, (&widened(w, OP)?, w), bv.as_deref(), &s);
        return gemm::cpu::bf16_tensor(&y, &out, dev);
    }
    let y = Tensor::empty(&out, DType::BF16, dev)?;
    // SAFETY: x is a bf16 [b, ci, h, w] tensor (checked by shape_of), xn holds as many elements.
    unsafe { to_nhwc(dev, Elem::Bf16, x.dev_ptr(), xn.ptr(), &s, s.ci, (s.ci, 0)) }?;
    // SAFETY: w is a bf16 [co, ci, kh, kw] tensor (checked), wp holds as many elements.
    unsafe { pack_weights(dev, Elem::Bf16, w.dev_ptr(), wp.ptr(), &s, false) }?;
    let ptrs = [xn.ptr(), wp.ptr(), bias.map_or(0, |b| b.dev_ptr()), y.dev_ptr()];
    // SAFETY: xn is x in NHWC, wp the packed weights, the bias (checked) [co] bf16, y a new
    // [b, co, h, w] bf16 tensor; ci is a multiple of 8 (checked above) and the scratch buffers
    // are fresh allocations (16-byte aligned), so every 16-byte chunk the kernels copy is whole.
    unsafe { launch_fwd(dev, Elem::Bf16, ptrs, &s, "conv2d") }?;
    Ok(y)
}

/// Gradients of Σ dy · conv2d_bf16(x, w, bias) from a bf16 dy: dx and dw in bf16 (f32 sums
/// rounded once, as the tape stores the gradient of a bf16 value, which x and the weights' bf16
/// copy both are) and db = Σ dy in f32.
pub fn conv2d_backward_bf16(x: &Tensor, w: &Tensor, dy: &Tensor, with_bias: bool) -> Result<Conv2dGrads> {
    let op = "conv2d_backward";
    let s = shape_of(x, w, None, DType::BF16)?;
    dy.expect_dtype(op, DType::BF16)?;
    dy.same_device(op, &[x])?;
    if dy.shape() != [s.b, s.co, s.h, s.w] {
        return Err(Error::shape(
            op,
            format!("dy {:?} is not the output shape {:?}", dy.shape(), [s.b, s.co, s.h, s.w]),
        ));
    }
    let dev = x.device();
    let db = if with_bias { Some(bias_grad(&cast(dy, DType::F32)?, &s)?) } else { None };
    if !(s.ci.is_multiple_of(8) && s.co.is_multiple_of(8)) || x.numel() == 0 || w.numel() == 0 {
        let g = super::conv2d_backward(
            &cast(x, DType::F32)?,
            &cast(w, DType::F32)?,
            &cast(dy, DType::F32)?,
            false,
            GemmAlgo::TensorCore,
        )?;
        return Ok(Conv2dGrads { dx: cast(&g.dx, DType::BF16)?, dw: cast(&g.dw, DType::BF16)?, db });
    }
    // The input gradient: the forward kernel over dy (NHWC) with the flipped packed weights.
    let st = ConvShape { ci: s.co, co: s.ci, ..s };
    let dyn_ = Scratch::new(dev, dy.numel(), DType::BF16)?;
    if let Device::Cpu = dev {
        if s.kh == 1 && s.kw == 1 && reclmis_cpu_loops::bf16dot::available() {
            // (the scratch a GPU allocates, counted as the forward's 1×1 path counts it)
            let (_wf, _xn) = (Scratch::new(dev, w.numel(), DType::BF16)?, Scratch::new(dev, x.numel(), DType::BF16)?);
            let _part = Scratch::new(dev, wgrad_splits(&s) * s.co * s.ci, DType::F32)?;
            return backward_1x1_dot(x, w, dy, &s, db);
        }
    }
    let cpu_dy = if let Device::Cpu = dev { Some(widened(dy, op)?) } else { None };
    let dx = {
        let wf = Scratch::new(dev, w.numel(), DType::BF16)?;
        if let Some(dyv) = &cpu_dy {
            let wt = super::cpu::flip_weights(&widened(w, op)?, s.co, s.ci, s.kh * s.kw);
            gemm::cpu::bf16_tensor(&super::cpu::conv2d(dyv, &wt, None, &st), x.shape(), dev)?
        } else {
            let dx = Tensor::empty(x.shape(), DType::BF16, dev)?;
            // SAFETY: dy is a bf16 [b, co, h, w] tensor (checked), dyn_ holds as many elements.
            unsafe { to_nhwc(dev, Elem::Bf16, dy.dev_ptr(), dyn_.ptr(), &s, s.co, (s.co, 0)) }?;
            // SAFETY: w is a bf16 [co, ci, kh, kw] tensor (checked), wf holds as many elements.
            unsafe { pack_weights(dev, Elem::Bf16, w.dev_ptr(), wf.ptr(), &s, true) }?;
            // SAFETY: dyn_ is dy in NHWC, wf the flipped weights packed [ci, kh·kw, co], dx a new
            // [b, ci, h, w] bf16 tensor; co (this launch's input channels) a multiple of 8.
            unsafe { launch_fwd(dev, Elem::Bf16, [dyn_.ptr(), wf.ptr(), 0, dx.dev_ptr()], &st, op) }?;
            dx
        }
    };
    // The weight gradient: split-K partial sums over the pixels, summed in order.
    let splits = wgrad_splits(&s);
    let xn = Scratch::new(dev, x.numel(), DType::BF16)?;
    let part = Scratch::new(dev, splits * s.co * s.kh * s.kw * s.ci, DType::F32)?;
    let dw = if let Some(dyv) = &cpu_dy {
        gemm::cpu::bf16_tensor(&super::cpu::conv2d_wgrad(&widened(x, op)?, dyv, &s), w.shape(), dev)?
    } else {
        let dw = Tensor::empty(w.shape(), DType::BF16, dev)?;
        // SAFETY: x is a bf16 [b, ci, h, w] tensor (checked), xn holds as many elements.
        unsafe { to_nhwc(dev, Elem::Bf16, x.dev_ptr(), xn.ptr(), &s, s.ci, (s.ci, 0)) }?;
        // SAFETY: xn is x and dyn_ dy in NHWC (ci and co multiples of 8, fresh 16-byte aligned
        // buffers), part holds [splits, co, kh·kw·ci] f32, dw is a new [co, ci, kh, kw] bf16.
        unsafe { wgrad_into(dev, Elem::Bf16, [xn.ptr(), dyn_.ptr(), part.ptr(), dw.dev_ptr()], &s, op) }?;
        dw
    };
    Ok(Conv2dGrads { dx, dw, db })
}

/// A 1×1 convolution's gradients on the cpu's AVX512_BF16 dot products, from the bf16 values
/// as stored: per image dx [Ci, HW] = wᵀ [Ci, Co] · dy [Co, HW] (one rounding), and
/// dw [Co, Ci] = Σ_images dy [Co, HW] · xᵀ [HW, Ci], each image's product in f32, summed over
/// the images in order and rounded once. Callers check the CPU and that the shapes are not empty.
fn backward_1x1_dot(x: &Tensor, w: &Tensor, dy: &Tensor, s: &ConvShape, db: Option<Tensor>) -> Result<Conv2dGrads> {
    let dev = x.device();
    let hw = s.h * s.w;
    let gx = gemm::GemmShape { batch: s.b, m: s.ci, n: hw, k: s.co, sa: (0, 1, s.ci), sb: (s.co * hw, hw, 1) };
    let dx = Tensor::from_vec_bf16(gemm::cpu::gemm_bf16_dot(w, dy, &gx, 1.0, None, false)?, x.shape(), dev)?;
    let gw = gemm::GemmShape { batch: s.b, m: s.co, n: s.ci, k: hw, sa: (s.co * hw, hw, 1), sb: (s.ci * hw, 1, hw) };
    let per = gemm::cpu::gemm_bf16_dot_f32(dy, x, &gw)?;
    let mut dw = per[..s.co * s.ci].to_vec();
    for img in per.chunks_exact(s.co * s.ci).skip(1) {
        dw.iter_mut().zip(img).for_each(|(d, v)| *d += v);
    }
    Ok(Conv2dGrads { dx, dw: gemm::cpu::bf16_tensor(&dw, w.shape(), dev)?, db })
}

/// The splits of the 64-square tile's weight gradient, which the partial sums' buffer
/// ([splits, Co, kh·kw·Ci] f32) is sized for: its blocks should cover a GPU's multiprocessors
/// about twice (an H100 SXM has 132): the output is small (Co × kh·kw·Ci), the reduction long
/// (B·H·W), so the pixels are split over grid.z. Each split keeps at least 8 of its 32-pixel
/// k-tiles.
pub(super) fn wgrad_splits(s: &ConvShape) -> usize {
    tile_splits(s, 64)
}

fn tile_splits(s: &ConvShape, tile: usize) -> usize {
    let tiles = s.co.div_ceil(tile) * (s.kh * s.kw * s.ci).div_ceil(tile);
    let ktiles = (s.b * s.h * s.w).div_ceil(32);
    (2 * 132usize).div_ceil(tiles).clamp(1, (ktiles / 8).max(1)).min(65535)
}

/// The splits of the weight gradient's block tile `i` (FWD_NAMES' index: 0 the 128-square, 1 the
/// 64-square). The 128 tile takes at most the 64 tile's splits (the buffer is sized for those):
/// the heuristic picks it only where its own tiles fill the GPU (132 or more), which needs no
/// split.
fn tile_splits_capped(s: &ConvShape, i: usize) -> usize {
    let splits64 = wgrad_splits(s);
    if i == 0 {
        tile_splits(s, 128).min(splits64)
    } else {
        splits64
    }
}

fn pipe_params(ptrs: [u64; 4], s: &ConvShape, splits: usize, op: &'static str) -> Result<ConvPipeParams> {
    Ok(ConvPipeParams {
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
    })
}

/// The pipelined forward over NHWC `x` and packed weights: its tile tuned per shape and GPU (the
/// 128 tile first when it fills an H100's 132 SMs), unless a test fixed it.
///
/// # Safety
/// `ptrs` (x, w, bias or 0, y) must be live buffers of `elem`'s type on `dev`: x NHWC [b, h, w, ci]
/// with ci a multiple of a 16-byte chunk's elements (8 bf16, 4 f32) and 16-byte aligned, w packed
/// [co, kh·kw, ci] 16-byte aligned, the bias [co], y [b, co, h, w] not overlapping the others.
pub(super) unsafe fn launch_fwd(
    dev: &Device,
    elem: Elem,
    ptrs: [u64; 4],
    s: &ConvShape,
    op: &'static str,
) -> Result<()> {
    let p = pipe_params(ptrs, s, 1, op)?;
    let n = s.b * s.h * s.w;
    let kernels = elem.fwd_kernels();
    let run = |i: usize| {
        let (kernel, tile, smem_bytes) = kernels[i];
        let grid = (check_u32(op, n.div_ceil(tile as usize))?, check_u32(op, s.co.div_ceil(tile as usize))?, 1);
        if grid.1 > 65535 {
            return Err(Error::Unsupported { op, detail: format!("{} output channels", s.co) });
        }
        // SAFETY: the caller guarantees the buffers (this function's contract); ConvPipeParams
        // mirrors the kernels' params struct (the same for both tiles).
        unsafe { dev.launch(kernel, LaunchCfg { grid, block: (128, 1, 1), smem_bytes }, &p) }
    };
    match gemm::fixed_bf16_tile() {
        Some(t) => run(usize::from(t != 128)),
        None => {
            let big = n.div_ceil(128) * s.co.div_ceil(128) >= 132;
            let key = || super::tune_key(if elem == Elem::Bf16 { "conv2d_bf16" } else { "conv2d_tf32_pipe" }, s);
            crate::ops::tune::pick_on(dev, key, &FWD_NAMES, usize::from(!big), run)
        }
    }
}

/// Copies NCHW `x` [b, c, h, w] into channels [c_off, c_off + c) of NHWC `y` [b, h, w,
/// c_total] (`elem`'s type: bf16 or f32).
///
/// # Safety
/// `x` must be a live buffer of `elem`'s type on `dev` of b·c·h·w elements and `y` one of
/// b·h·w·c_total, with c_off + c <= c_total.
pub(super) unsafe fn to_nhwc(
    dev: &Device,
    elem: Elem,
    x: u64,
    y: u64,
    s: &ConvShape,
    c: usize,
    (c_total, c_off): (usize, usize),
) -> Result<()> {
    let op = "conv2d";
    let hw = s.h * s.w;
    if c * hw * s.b == 0 {
        // an empty slice of a concatenation: nothing to copy
        return Ok(());
    }
    let p = NhwcParams {
        x,
        y,
        b: check_u32(op, s.b)?,
        c: check_u32(op, c)?,
        hw: check_u32(op, hw)?,
        c_total: check_u32(op, c_total)?,
        c_off: check_u32(op, c_off)?,
        pad: 0,
    };
    let grid = (check_u32(op, hw.div_ceil(32))?, check_u32(op, c.div_ceil(32))?, check_u32(op, s.b)?);
    if grid.1 > 65535 || grid.2 > 65535 {
        return Err(Error::Unsupported { op, detail: format!("{c} channels of {} images", s.b) });
    }
    // SAFETY: the caller guarantees both buffers; the grid covers [b, c, hw] in 32 x 32 tiles.
    unsafe { dev.launch(elem.aux()[0], LaunchCfg { grid, block: (32, 8, 1), smem_bytes: 0 }, &p) }
}

/// Packs weights [co, ci, kh, kw] into [co, kh·kw, ci] (flip: [ci, kh·kw, co], both kernel axes
/// reversed).
///
/// # Safety
/// `w` and `wp` must be live buffers of `elem`'s type on `dev` of co·ci·kh·kw elements each.
pub(super) unsafe fn pack_weights(dev: &Device, elem: Elem, w: u64, wp: u64, s: &ConvShape, flip: bool) -> Result<()> {
    let op = "conv2d";
    let p = WpackParams {
        w,
        wp,
        co: check_u32(op, s.co)?,
        ci: check_u32(op, s.ci)?,
        k2: check_u32(op, s.kh * s.kw)?,
        flip: flip as u32,
    };
    // SAFETY: the caller guarantees both buffers.
    unsafe { dev.launch(elem.aux()[1], LaunchCfg::elementwise(s.co * s.ci * s.kh * s.kw), &p) }
}

/// y [B,Co,H,W] bf16 = conv2d_bf16(concat(parts, channel axis), w) + bias: on cuda/emu the parts
/// are packed side by side into one NHWC buffer (the concatenation costs nothing more than the
/// layout change) and convolved once; this needs only the total channel count to be a multiple
/// of 8. The cpu runs `conv2d_cat`'s f32 path on widened buffers and rounds once.
pub fn conv2d_cat_bf16(parts: &[&Tensor], w: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
    let s = cat_shape_of(parts, w, bias, DType::BF16)?;
    let dev = w.device();
    let out = [s.b, s.co, s.h, s.w];
    if !s.ci.is_multiple_of(8) || crate::tensor::numel(&out) == 0 || s.ci == 0 {
        let wide = parts.iter().map(|p| cast(p, DType::F32)).collect::<Result<Vec<_>>>()?;
        let refs: Vec<&Tensor> = wide.iter().collect();
        let b = bias.map(|b| cast(b, DType::F32)).transpose()?;
        let y = super::conv2d_cat(&refs, &cast(w, DType::F32)?, b.as_ref(), GemmAlgo::TensorCore)?;
        return cast(&y, DType::BF16);
    }
    let xn = Scratch::new(dev, s.b * s.h * s.w * s.ci, DType::BF16)?;
    let wp = Scratch::new(dev, w.numel(), DType::BF16)?;
    if let Device::Cpu = dev {
        let xs = parts.iter().map(|p| widened(p, OP)).collect::<Result<Vec<_>>>()?;
        let refs: Vec<&[f32]> = xs.iter().map(|v| &v[..]).collect();
        let cis: Vec<usize> = parts.iter().map(|p| p.shape()[1]).collect();
        let bv = bias.map(|b| widened(b, OP)).transpose()?;
        let y = super::cpu_cat_forward(&refs, &cis, (&widened(w, OP)?, w), bv.as_deref(), &s);
        return gemm::cpu::bf16_tensor(&y, &out, dev);
    }
    let y = Tensor::empty(&out, DType::BF16, dev)?;
    let mut c_off = 0;
    for p in parts {
        let c = p.shape()[1];
        // SAFETY: each part is a bf16 [b, c, h, w] tensor (checked by cat_shape_of, channels
        // summing to s.ci); xn holds b·h·w·s.ci elements.
        unsafe { to_nhwc(dev, Elem::Bf16, p.dev_ptr(), xn.ptr(), &s, c, (s.ci, c_off)) }?;
        c_off += c;
    }
    // SAFETY: w is a bf16 [co, ci, kh, kw] tensor (checked), wp holds as many elements.
    unsafe { pack_weights(dev, Elem::Bf16, w.dev_ptr(), wp.ptr(), &s, false) }?;
    // SAFETY: as in conv2d_bf16: xn is the concatenation in NHWC (ci a multiple of 8), wp the
    // packed weights, the bias [co] bf16, y a new [b, co, h, w] bf16 tensor.
    unsafe {
        launch_fwd(
            dev,
            Elem::Bf16,
            [xn.ptr(), wp.ptr(), bias.map_or(0, |b| b.dev_ptr()), y.dev_ptr()],
            &s,
            "conv2d_cat",
        )
    }?;
    Ok(y)
}

/// Gradients of `conv2d_cat_bf16` from a bf16 dy: each part's dx in bf16 (the input gradient's
/// kernel once per part, over that part's rows of the flipped packed weights), dw in bf16 (one
/// split-K weight gradient over the concatenation packed in NHWC), db in f32.
pub fn conv2d_cat_backward_bf16(parts: &[&Tensor], w: &Tensor, dy: &Tensor, with_bias: bool) -> Result<ConvCatGrads> {
    let op = "conv2d_cat_backward";
    let s = cat_shape_of(parts, w, None, DType::BF16)?;
    dy.expect_dtype(op, DType::BF16)?;
    dy.same_device(op, &[w])?;
    if dy.shape() != [s.b, s.co, s.h, s.w] {
        return Err(Error::shape(
            op,
            format!("dy {:?} is not the output shape {:?}", dy.shape(), [s.b, s.co, s.h, s.w]),
        ));
    }
    let dev = w.device();
    let db = if with_bias { Some(bias_grad(&cast(dy, DType::F32)?, &s)?) } else { None };
    let k2 = s.kh * s.kw;
    if !(s.ci.is_multiple_of(8) && s.co.is_multiple_of(8)) || dy.numel() == 0 || w.numel() == 0 {
        let wide = parts.iter().map(|p| cast(p, DType::F32)).collect::<Result<Vec<_>>>()?;
        let refs: Vec<&Tensor> = wide.iter().collect();
        let g = super::conv2d_cat_backward(
            &refs,
            &cast(w, DType::F32)?,
            &cast(dy, DType::F32)?,
            false,
            GemmAlgo::TensorCore,
        )?;
        let dxs = g.dxs.iter().map(|d| cast(d, DType::BF16)).collect::<Result<Vec<_>>>()?;
        return Ok(ConvCatGrads { dxs, dw: cast(&g.dw, DType::BF16)?, db });
    }
    let dyn_ = Scratch::new(dev, dy.numel(), DType::BF16)?;
    let cpu = if let Device::Cpu = dev { Some((widened(dy, op)?, widened(w, op)?)) } else { None };
    let mut dxs = Vec::with_capacity(parts.len());
    {
        let wf = Scratch::new(dev, w.numel(), DType::BF16)?;
        if cpu.is_none() {
            // SAFETY: dy is a bf16 [b, co, h, w] tensor (checked), dyn_ holds as many elements.
            unsafe { to_nhwc(dev, Elem::Bf16, dy.dev_ptr(), dyn_.ptr(), &s, s.co, (s.co, 0)) }?;
            // SAFETY: w is a bf16 [co, ci, kh, kw] tensor (checked), wf holds as many elements.
            unsafe { pack_weights(dev, Elem::Bf16, w.dev_ptr(), wf.ptr(), &s, true) }?;
        }
        let mut c_off = 0;
        for p in parts {
            let c = p.shape()[1];
            let st = ConvShape { ci: s.co, co: c, ..s };
            dxs.push(if let Some((dyv, wv)) = &cpu {
                // as conv2d_backward on the part's columns of w: dy convolved with their flip
                let wk: Vec<f32> =
                    (0..s.co * c * k2).map(|i| wv[(i / (c * k2)) * s.ci * k2 + c_off * k2 + i % (c * k2)]).collect();
                let wt = super::cpu::flip_weights(&wk, s.co, c, k2);
                gemm::cpu::bf16_tensor(&super::cpu::conv2d(dyv, &wt, None, &st), p.shape(), dev)?
            } else {
                let dx = Tensor::empty(p.shape(), DType::BF16, dev)?;
                if dx.numel() > 0 {
                    let wk = wf.ptr() + (c_off * k2 * s.co * 2) as u64;
                    // SAFETY: wk starts at this part's rows of the flipped weights packed [ci,
                    // kh·kw, co] (16-byte aligned: co is a multiple of 8), dyn_ is dy in NHWC, dx
                    // a new [b, c, h, w] bf16 tensor.
                    unsafe { launch_fwd(dev, Elem::Bf16, [dyn_.ptr(), wk, 0, dx.dev_ptr()], &st, op) }?;
                }
                dx
            });
            c_off += c;
        }
    }
    let splits = wgrad_splits(&s);
    let xn = Scratch::new(dev, s.b * s.h * s.w * s.ci, DType::BF16)?;
    let part = Scratch::new(dev, splits * s.co * s.ci * k2, DType::F32)?;
    let dw = if let Some((dyv, _)) = &cpu {
        // each part's weight gradient into its columns of dw
        let mut dw = vec![0.0f32; s.co * s.ci * k2];
        let mut c_off = 0;
        for p in parts {
            let sp = ConvShape { ci: p.shape()[1], ..s };
            let dwp = super::cpu::conv2d_wgrad(&widened(p, op)?, dyv, &sp);
            for o in 0..s.co {
                dw[(o * s.ci + c_off) * k2..][..sp.ci * k2].copy_from_slice(&dwp[o * sp.ci * k2..][..sp.ci * k2]);
            }
            c_off += sp.ci;
        }
        gemm::cpu::bf16_tensor(&dw, w.shape(), dev)?
    } else {
        let mut c_off = 0;
        for p in parts {
            let c = p.shape()[1];
            // SAFETY: as in conv2d_cat_bf16.
            unsafe { to_nhwc(dev, Elem::Bf16, p.dev_ptr(), xn.ptr(), &s, c, (s.ci, c_off)) }?;
            c_off += c;
        }
        let dw = Tensor::empty(w.shape(), DType::BF16, dev)?;
        // SAFETY: xn is the concatenation and dyn_ dy in NHWC (ci and co multiples of 8), part
        // holds [splits, co, kh·kw·ci] f32, dw is a new [co, ci, kh, kw] bf16 tensor.
        unsafe { wgrad_into(dev, Elem::Bf16, [xn.ptr(), dyn_.ptr(), part.ptr(), dw.dev_ptr()], &s, op) }?;
        dw
    };
    Ok(ConvCatGrads { dxs, dw, db })
}

/// The split-K weight gradient and the sum of its splits into dw.
///
/// # Safety
/// `[xn, dyn, part, dw]` must be live buffers on `dev`: bf16: x and dy in NHWC bf16 (ci and co
/// multiples of 8, 16-byte aligned), f32 [splits, co, kh·kw·ci] and bf16 [co, ci, kh, kw]; tf32: x
/// in NHWC f32 (ci a multiple of 4, 16-byte aligned), dy in NCHW f32 (h·w a multiple of 4,
/// 16-byte aligned), f32 [splits, co, kh·kw·ci] and f32 [co, ci, kh, kw]; splits =
/// `wgrad_splits(s)` (the most either tile uses).
pub(super) unsafe fn wgrad_into(
    dev: &Device,
    elem: Elem,
    [xn, dyn_, part, dw]: [u64; 4],
    s: &ConvShape,
    op: &'static str,
) -> Result<()> {
    let k = s.kh * s.kw * s.ci;
    let run = |i: usize| {
        let splits = tile_splits_capped(s, i);
        let (kernel, tile, smem_bytes) = elem.wgrad_kernels()[i];
        let p = pipe_params([xn, dyn_, 0, part], s, splits, op)?;
        let t = tile as usize;
        let grid = (check_u32(op, k.div_ceil(t))?, check_u32(op, s.co.div_ceil(t))?, splits as u32);
        if grid.1 > 65535 {
            return Err(Error::Unsupported { op, detail: format!("{} output channels", s.co) });
        }
        // SAFETY: the caller guarantees the buffers; the grid covers [splits, co, k] exactly,
        // splits at most `wgrad_splits` (what part holds).
        unsafe { dev.launch(kernel, LaunchCfg { grid, block: (128, 1, 1), smem_bytes }, &p) }?;
        let sp = WgradSumParams {
            part,
            dw,
            co: check_u32(op, s.co)?,
            ci: check_u32(op, s.ci)?,
            k2: check_u32(op, s.kh * s.kw)?,
            splits: splits as u32,
        };
        // SAFETY: part holds the splits' [co, kh·kw, ci] sums, dw [co, ci, kh, kw] bf16.
        unsafe { dev.launch(elem.aux()[2], LaunchCfg::elementwise(s.co * s.ci * s.kh * s.kw), &sp) }
    };
    match gemm::fixed_bf16_tile() {
        Some(t) => run(usize::from(t != 128)),
        None => {
            // the 128 tile where its own tiles fill the GPU, tuned per shape and GPU
            let big = s.co.div_ceil(128) * k.div_ceil(128) >= 132;
            let key =
                || super::tune_key(if elem == Elem::Bf16 { "conv2d_wgrad_bf16" } else { "conv2d_wgrad_tf32_pipe" }, s);
            crate::ops::tune::pick_on(dev, key, &FWD_NAMES, usize::from(!big), run)
        }
    }
}

/// conv1d on bf16 operands (x [B, Ci, L], w [Co, Ci, k]): `conv2d_bf16` of the 1×k case.
pub fn conv1d_bf16(x: &Tensor, w: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
    let (x4, w4) = super::as_2d(x, w)?;
    conv2d_bf16(&x4, &w4, bias)?.reshape(&[x.shape()[0], w.shape()[0], x.shape()[2]])
}

/// Gradients of `conv1d_bf16` from a bf16 dy [B, Co, L].
pub fn conv1d_backward_bf16(x: &Tensor, w: &Tensor, dy: &Tensor, with_bias: bool) -> Result<Conv2dGrads> {
    let (x4, w4) = super::as_2d(x, w)?;
    if dy.rank() != 3 {
        return Err(Error::shape("conv1d_backward", format!("dy {:?} must be [B, Co, L]", dy.shape())));
    }
    let dy4 = dy.reshape(&[dy.shape()[0], dy.shape()[1], 1, dy.shape()[2]])?;
    let g = conv2d_backward_bf16(&x4, &w4, &dy4, with_bias)?;
    Ok(Conv2dGrads { dx: g.dx.reshape(x.shape())?, dw: g.dw.reshape(w.shape())?, db: g.db })
}
