//! The PLAM gate at bf16 autocast, as PyTorch's autocast runs the official gate: the two 1×1
//! convolutions read bf16 s and weights and store bf16 a and m (`conv2d_bf16`); the gate reads
//! them, computes in f32 (features, the MLP, g) and stores its output g·s in bf16. The backward
//! reads bf16 s and dout, writes bf16 dA and dM over a and m, runs the convolutions' bf16
//! backward on them (bf16 input and weight gradients) and sums the input gradient
//! (g·dout + dxa) + dxm in f32, rounded once (`plam_gate_ds_bwd_bf16`). g, the channel argmax and
//! the MLP's parameter gradients stay f32 / i32.
//!
//! Each tensor the f32 path holds in f32 is half the bytes here: at the decoder's full
//! resolution this op's backward is among a training step's largest working sets.

use super::{check, cpu, params, sole, PlamForward, PlamGrads, PlamWeights};
use crate::device::{Device, LaunchCfg};
use crate::error::{Error, Result};
use crate::kernels::Kernel;
use crate::ops::conv::bf16::{conv2d_backward_bf16, conv2d_bf16};
use crate::ops::{check_u32, reduce};
use crate::tensor::{DType, Tensor};

crate::kernel_params! {
    struct PlamDsParams [56] {
        g: u64,
        dout: u64,
        dxa: u64,
        dxm: u64,
        ds: u64,
        n: u64,
        c: u32,
        hw: u32,
    }
}

/// The gate's forward on bf16 s [B, C, H, W] and bf16 conv_avg / conv_max weights [C, C, 1, 1]
/// (the MLP's parameters f32): out bf16, g f32, a and m bf16 (kept for the backward).
pub fn plam_gate_bf16(s: &Tensor, w: &PlamWeights) -> Result<PlamForward> {
    let op = "plam_gate";
    let (b, c, hw) = check(s, w, DType::BF16)?;
    // the same call in the backward's recomputation: the same bits, so the same gate and argmax
    let a = conv2d_bf16(s, w.w_avg, None)?;
    let m = conv2d_bf16(s, w.w_max, None)?;
    let gshape = [b, 1, s.shape()[2], s.shape()[3]];
    let dev = s.device();
    if let Device::Cpu = dev {
        #[cfg(not(feature = "train"))]
        return Err(Error::Other(format!("{op}: the backward's state needs the `train` feature")));
        #[cfg(feature = "train")]
        {
            let fc = cpu::Fc::read(w)?;
            let (av, mv, sv) = (a.cpu_bf16(op)?, m.cpu_bf16(op)?, s.cpu_bf16(op)?);
            let (out, g, arg) = cpu::forward(av, mv, sv, &fc, b, c, hw);
            return Ok(PlamForward {
                out: Tensor::from_vec_bf16(out, s.shape(), dev)?,
                g: Tensor::from_vec(g, &gshape, dev)?,
                a,
                m,
                arg: Tensor::from_vec_i32(arg, &gshape, dev)?,
            });
        }
    }
    // (the f32 forward's launch in mod.rs, written again: one function of the kernel for both
    // cost reclmis-infer about 1 KB, more than its size budget had left)
    let out = Tensor::empty(s.shape(), DType::BF16, dev)?;
    let g = Tensor::empty(&gshape, DType::F32, dev)?;
    let arg = Tensor::empty(&gshape, DType::I32, dev)?;
    let p = params(&a, &m, s, w, (b, c, hw), [out.dev_ptr(), g.dev_ptr(), arg.dev_ptr(), 0, 0, 0, 0, 0])?;
    if b * hw > 0 {
        // SAFETY: a, m (conv2d_bf16 of s by [C, C, 1, 1] weights: [B, C, H, W] bf16), s (checked
        // bf16 [B, C, H, W]), the MLP's f32 parameters (checked shapes) and the new out (bf16, s's
        // shape), g and arg ([B, HW] f32 / i32) are live buffers of the sizes the kernel reads.
        unsafe { dev.launch(Kernel::plam_gate_fwd_bf16, LaunchCfg::elementwise(b * hw), &p) }?;
    }
    Ok(PlamForward { out, g, a, m, arg })
}

/// Gradients of Σ dout · plam_gate_bf16(s, w) from a bf16 dout: ds, dw_avg and dw_max bf16 (the
/// gradients of bf16 values, as the tape stores them), the MLP's parameter gradients f32.
pub fn plam_gate_backward_bf16(s: &Tensor, w: &PlamWeights, f: PlamForward, dout: &Tensor) -> Result<PlamGrads> {
    let op = "plam_gate_backward";
    let (b, c, hw) = check(s, w, DType::BF16)?;
    if dout.shape() != s.shape() {
        return Err(Error::shape(op, format!("dout {:?} vs skip input {:?}", dout.shape(), s.shape())));
    }
    dout.expect_dtype(op, DType::BF16)?;
    let gshape = [b, 1, s.shape()[2], s.shape()[3]];
    f.g.expect_dtype(op, DType::F32)?;
    f.arg.expect_dtype(op, DType::I32)?;
    if f.g.shape() != gshape || f.arg.shape() != gshape {
        return Err(Error::shape(op, format!("the forward's gate {:?}, expected {gshape:?}", f.g.shape())));
    }
    for t in [&f.a, &f.m] {
        t.expect_dtype(op, DType::BF16)?;
        if t.shape() != s.shape() {
            return Err(Error::shape(op, format!("the forward's a/m {:?}, expected {:?}", t.shape(), s.shape())));
        }
    }
    s.same_device(op, &[dout, &f.g, &f.arg, &f.a, &f.m])?;
    let dev = s.device();
    // dA and dM are written over a and m (their last use); a forward the caller still shares is
    // copied first
    let PlamForward { g, a, m, arg, .. } = f;
    let (mut a, mut m) = (sole(a)?, sole(m)?);
    let fcg = if let Device::Cpu = dev {
        let fc = cpu::Fc::read(w)?;
        let (sv, dv, gv) = (s.cpu_bf16(op)?, dout.cpu_bf16(op)?, g.cpu_f32(op)?);
        let (Some(av), Some(mv)) = (a.sole_cpu_bf16_mut(), m.sole_cpu_bf16_mut()) else {
            return Err(Error::Other(format!("{op}: a and m must be cpu bf16 tensors of their own")));
        };
        Tensor::from_vec(cpu::backward(av, mv, sv, dv, gv, &fc, b, c, hw), &[31], dev)?
    } else {
        let cfg = LaunchCfg::elementwise((b * hw).max(1));
        let fcgrad = Tensor::empty(&[cfg.grid.0 as usize, 31], DType::F32, dev)?;
        let p = params(
            &a,
            &m,
            s,
            w,
            (b, c, hw),
            [0, g.dev_ptr(), arg.dev_ptr(), dout.dev_ptr(), 0, a.dev_ptr(), m.dev_ptr(), fcgrad.dev_ptr()],
        )?;
        // SAFETY: a, m, s and dout are bf16 [B, C, H, W] and g, arg [B, HW] (all checked above),
        // fcgrad [blocks, 31] f32 for this launch's grid; the bf16 kernel writes no ds (null);
        // da and dm alias a and m, which no other tensor shares (`sole`), and each thread reads
        // an element of a (m) before it writes that element's gradient (kernels/plam.cu).
        unsafe { dev.launch(Kernel::plam_gate_bwd_bf16, cfg, &p) }?;
        reduce::sum(&fcgrad, 0)?
    };
    drop(arg);
    let (da, dm) = (a, m);
    // each [B, C, H, W] gradient is freed as soon as it is used
    let ga = conv2d_backward_bf16(s, w.w_avg, &da, false)?;
    drop(da);
    let gm = conv2d_backward_bf16(s, w.w_max, &dm, false)?;
    drop(dm);
    // ds = (g·dout + dxa) + dxm, rounded once, over dxa
    let mut ds = sole(ga.dx)?;
    for t in [&ds, &gm.dx] {
        if t.dtype() != DType::BF16 || t.shape() != s.shape() {
            return Err(Error::Other(format!("{op}: a 1×1 convolution's input gradient is not [B, C, H, W] bf16")));
        }
    }
    if let Device::Cpu = dev {
        let (gv, dv, mv) = (g.cpu_f32(op)?, dout.cpu_bf16(op)?, gm.dx.cpu_bf16(op)?);
        let Some(av) = ds.sole_cpu_bf16_mut() else {
            return Err(Error::Other(format!("{op}: the input gradient must be a cpu bf16 tensor of its own")));
        };
        cpu::ds_bf16(gv, dv, av, mv, c, hw);
    } else if s.numel() > 0 {
        let p = PlamDsParams {
            g: g.dev_ptr(),
            dout: dout.dev_ptr(),
            dxa: ds.dev_ptr(),
            dxm: gm.dx.dev_ptr(),
            ds: ds.dev_ptr(),
            n: s.numel() as u64,
            c: check_u32(op, c)?,
            hw: check_u32(op, hw)?,
        };
        // SAFETY: g is [B, HW] f32, dout, dxm and ds (= dxa, shared by no one: `sole`) bf16
        // [B, C, H, W] (checked above); each thread reads an element of dxa before it writes
        // that element of ds.
        unsafe { dev.launch(Kernel::plam_gate_ds_bwd_bf16, LaunchCfg::elementwise(s.numel()), &p) }?;
    }
    let fcv = fcg.to_vec()?;
    Ok(PlamGrads {
        ds,
        dw_avg: ga.dw,
        dw_max: gm.dw,
        dfc1_w: Tensor::from_vec(fcv[0..18].to_vec(), &[6, 3], dev)?,
        dfc1_b: Tensor::from_vec(fcv[18..24].to_vec(), &[6], dev)?,
        dfc2_w: Tensor::from_vec(fcv[24..30].to_vec(), &[1, 6], dev)?,
        dfc2_b: Tensor::from_vec(fcv[30..31].to_vec(), &[1], dev)?,
    })
}
