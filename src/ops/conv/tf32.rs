//! The convolution at tf32 on the pipelined tensor-core core (cuda/emu, builds with autocast):
//! the bf16 path's implicit GEMMs (`conv::bf16`'s host code, kernels/conv.cu's loaders) with the
//! tf32 element kind of kernels/pipe_gemm.cuh: f32 NHWC copies of the activations and packed f32
//! weights, 4 channels per 16-byte cp.async copy, `mma.sync` m16n8k8 on operands rounded with
//! cvt.rna as the element-loading tf32 kernels round them. The sums run in another order than
//! those kernels' (k = tap·Ci + c rather than c·k² + tap): within the same tf32 bound, not bit for
//! bit. Each part applies where its 16-byte chunks are whole (the caller checks with `*_applies`);
//! the element-loading `conv2d_tc_*` kernels run elsewhere. A channel concatenation (`conv2d_cat`,
//! the decoder's skip ++ upsampled input) costs nothing more: its parts are copied side by side
//! into one NHWC buffer, and the input gradient of each part reads its rows of the packed weights.
//!
//! The copies are temporaries of the op (x and dy in NHWC, the packed weights): at most one
//! activation-sized f32 buffer more than the element-loading path holds at a time.

use super::bf16::{launch_fwd, pack_weights, to_nhwc, wgrad_into, wgrad_splits, Elem};
use super::ConvShape;
use crate::error::Result;
use crate::tensor::{DType, Tensor};

/// The forward applies: Ci (the channels a chunk runs along; a concatenation's total) a multiple
/// of 4, something to do.
pub(super) fn forward_applies(s: &ConvShape) -> bool {
    s.ci > 0 && s.ci.is_multiple_of(4) && s.b * s.co * s.h * s.w > 0
}

/// The input gradient applies: the forward's kernel over dy, whose channels are Co.
pub(super) fn input_grad_applies(s: &ConvShape) -> bool {
    forward_applies(&ConvShape { ci: s.co, co: s.ci, ..*s })
}

/// The weight gradient applies: Ci a multiple of 4 (x's chunks) and H·W too (dy is read in NCHW,
/// 4 pixels of one image per chunk, from its 16-byte aligned base).
pub(super) fn weight_grad_applies(s: &ConvShape, dy: &Tensor) -> bool {
    forward_applies(s) && (s.h * s.w).is_multiple_of(4) && dy.dev_ptr().is_multiple_of(16)
}

/// The channel concatenation of `parts` ([b, c_i, h, w] f32 each, c_i summing to s.ci) in NHWC.
fn nhwc_of(parts: &[&Tensor], s: &ConvShape) -> Result<Tensor> {
    let dev = parts[0].device();
    let xn = Tensor::empty(&[s.b * s.h * s.w * s.ci], DType::F32, dev)?;
    let mut c_off = 0;
    for p in parts {
        let c = p.shape()[1];
        // SAFETY: each part is an f32 [b, c, h, w] tensor (the caller checked them against s, the
        // channels summing to s.ci), xn holds b·h·w·s.ci elements.
        unsafe { to_nhwc(dev, Elem::Tf32, p.dev_ptr(), xn.dev_ptr(), s, c, (s.ci, c_off)) }?;
        c_off += c;
    }
    Ok(xn)
}

/// y [B,Co,H,W] = conv(concat(parts), w) + bias at tf32 (one part: a plain convolution); the
/// parts, w and the bias f32 on cuda/emu, checked against `s` by the caller, `forward_applies(s)`.
pub(super) fn forward(parts: &[&Tensor], w: &Tensor, bias: Option<&Tensor>, s: &ConvShape) -> Result<Tensor> {
    let dev = w.device();
    let xn = nhwc_of(parts, s)?;
    let wp = Tensor::empty(&[w.numel()], DType::F32, dev)?;
    // SAFETY: w is an f32 [co, ci, kh, kw] tensor (the caller checked), wp holds as many.
    unsafe { pack_weights(dev, Elem::Tf32, w.dev_ptr(), wp.dev_ptr(), s, false) }?;
    let y = Tensor::empty(&[s.b, s.co, s.h, s.w], DType::F32, dev)?;
    let ptrs = [xn.dev_ptr(), wp.dev_ptr(), bias.map_or(0, |b| b.dev_ptr()), y.dev_ptr()];
    // SAFETY: xn is the input in NHWC with ci a multiple of 4 (`forward_applies`), wp the packed
    // weights, both fresh (16-byte aligned) allocations, the bias [co] f32, y a new [b, co, h, w].
    unsafe { launch_fwd(dev, Elem::Tf32, ptrs, s, "conv2d") }?;
    Ok(y)
}

/// dx of each part (shapes [b, c_i, h, w]) at tf32: the forward kernel over dy in NHWC with the
/// part's rows of the flipped packed weights; dy [B,Co,H,W] and w f32 on cuda/emu (checked by the
/// caller), `input_grad_applies(s)`.
pub(super) fn input_grads(part_channels: &[usize], dy: &Tensor, w: &Tensor, s: &ConvShape) -> Result<Vec<Tensor>> {
    let (dev, op) = (dy.device(), "conv2d_backward");
    let k2 = s.kh * s.kw;
    let dyn_ = Tensor::empty(&[dy.numel()], DType::F32, dev)?;
    let wf = Tensor::empty(&[w.numel()], DType::F32, dev)?;
    // SAFETY: dy is an f32 [b, co, h, w] tensor (checked), dyn_ holds as many elements.
    unsafe { to_nhwc(dev, Elem::Tf32, dy.dev_ptr(), dyn_.dev_ptr(), s, s.co, (s.co, 0)) }?;
    // SAFETY: w is an f32 [co, ci, kh, kw] tensor (checked), wf holds as many elements.
    unsafe { pack_weights(dev, Elem::Tf32, w.dev_ptr(), wf.dev_ptr(), s, true) }?;
    let mut dxs = Vec::with_capacity(part_channels.len());
    let mut c_off = 0;
    for &c in part_channels {
        let st = ConvShape { ci: s.co, co: c, ..*s };
        let dx = Tensor::empty(&[s.b, c, s.h, s.w], DType::F32, dev)?;
        if dx.numel() > 0 {
            let wk = wf.dev_ptr() + (c_off * k2 * s.co * 4) as u64;
            // SAFETY: dyn_ is dy in NHWC (co, this launch's input channels, a multiple of 4), wk
            // starts at this part's rows of the flipped weights packed [ci, kh·kw, co] (16-byte
            // aligned: co is a multiple of 4), dx a new [b, c, h, w] tensor.
            unsafe { launch_fwd(dev, Elem::Tf32, [dyn_.dev_ptr(), wk, 0, dx.dev_ptr()], &st, op) }?;
        }
        dxs.push(dx);
        c_off += c;
    }
    Ok(dxs)
}

/// dw [Co,Ci,kh,kw] at tf32 (Ci the concatenation's): split-K partial sums over the pixels,
/// summed in order; the parts and dy f32 on cuda/emu (checked by the caller),
/// `weight_grad_applies(s, dy)`.
pub(super) fn weight_grad(parts: &[&Tensor], dy: &Tensor, s: &ConvShape) -> Result<Tensor> {
    let (dev, op) = (dy.device(), "conv2d_backward");
    let splits = wgrad_splits(s);
    let xn = nhwc_of(parts, s)?;
    let part = Tensor::empty(&[splits * s.co * s.kh * s.kw * s.ci], DType::F32, dev)?;
    let dw = Tensor::empty(&[s.co, s.ci, s.kh, s.kw], DType::F32, dev)?;
    // SAFETY: xn is the input in NHWC (ci a multiple of 4, a fresh allocation), dy the caller's
    // f32 [b, co, h, w] tensor (h·w a multiple of 4, its base 16-byte aligned: checked), part
    // holds [splits, co, kh·kw·ci] f32, dw is a new [co, ci, kh, kw] f32 tensor.
    unsafe { wgrad_into(dev, Elem::Tf32, [xn.dev_ptr(), dy.dev_ptr(), part.dev_ptr(), dw.dev_ptr()], s, op) }?;
    Ok(dw)
}
