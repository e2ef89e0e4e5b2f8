//! The PLAM skip gate of the official decoder: a = mean_c ReLU(conv_avg s),
//! m = max_c ReLU(conv_max s) (1×1 convolutions, no bias), g = Linear(6→1)(ReLU(Linear(3→6)
//! ([a, m, a + m]))) per pixel with no sigmoid, out = g · s broadcast over channels. The two 1×1
//! convolutions run as GEMMs (the conv op); everything after them is one fused pass per pixel
//! (kernels/plam.cu). Ties in the channel max go to the lowest channel.

/// Its `reclmis bench` cases and `selfcheck` (registered in `bench::registry`).
#[cfg(feature = "cli")]
pub mod bench;
/// The gate at bf16 autocast: bf16 s, a, m, output and gradients, f32 math (`_bf16` kernels).
#[cfg(feature = "autocast")]
pub mod bf16;
pub mod cpu;
#[cfg(feature = "refs")]
pub mod reference;

use crate::device::{Device, LaunchCfg};
use crate::error::{Error, Result};
use crate::kernels::Kernel;
use crate::ops::conv;
use crate::ops::gemm::GemmAlgo;
use crate::ops::{check_u32, elementwise, reduce};
use crate::tensor::{DType, Tensor};

crate::kernel_params! {
    struct PlamParams [136] {
        a: u64,
        m: u64,
        s: u64,
        fc1w: u64,
        fc1b: u64,
        fc2w: u64,
        fc2b: u64,
        dout: u64,
        out: u64,
        g: u64,
        arg: u64,
        ds: u64,
        da: u64,
        dm: u64,
        fcgrad: u64,
        b: u32,
        c: u32,
        hw: u32,
        pad: u32,
    }
}

/// The gate's parameters (official names: conv_avg, conv_max, bottleneck.0, bottleneck.2).
pub struct PlamWeights<'a> {
    /// [C, C, 1, 1]
    pub w_avg: &'a Tensor,
    /// [C, C, 1, 1]
    pub w_max: &'a Tensor,
    /// [6, 3], [6]
    pub fc1_w: &'a Tensor,
    pub fc1_b: &'a Tensor,
    /// [1, 6], [1]
    pub fc2_w: &'a Tensor,
    pub fc2_b: &'a Tensor,
}

#[derive(Clone)]
pub struct PlamForward {
    pub out: Tensor,
    /// [B, 1, H, W]
    pub g: Tensor,
    /// what the backward needs: the two 1×1 convolutions' outputs and the channel argmax
    pub(crate) a: Tensor,
    pub(crate) m: Tensor,
    arg: Tensor,
}

impl PlamForward {
    /// The output, and what the backward reads without it (the output is the next op's input:
    /// a backward that kept it would hold it past that op).
    pub fn split_output(self) -> Result<(Tensor, PlamForward)> {
        let empty = Tensor::from_vec(vec![], &[0], self.out.device())?;
        Ok((self.out, PlamForward { out: empty, ..self }))
    }
}

pub struct PlamGrads {
    pub ds: Tensor,
    pub dw_avg: Tensor,
    pub dw_max: Tensor,
    pub dfc1_w: Tensor,
    pub dfc1_b: Tensor,
    pub dfc2_w: Tensor,
    pub dfc2_b: Tensor,
}

/// (B, C, H·W) of a valid call: s [B, C, H, W] and the 1×1 convolutions' weights of type
/// `dt` (f32, or bf16 at bf16 autocast), the MLP's parameters f32, all on s's device.
fn check(s: &Tensor, w: &PlamWeights, dt: DType) -> Result<(usize, usize, usize)> {
    let op = "plam_gate";
    if s.rank() != 4 {
        return Err(Error::shape(op, format!("skip input {:?} must be [B,C,H,W]", s.shape())));
    }
    s.expect_dtype(op, dt)?;
    let c = s.shape()[1];
    for (name, t, shape, tdt) in [
        ("conv_avg", w.w_avg, vec![c, c, 1, 1], dt),
        ("conv_max", w.w_max, vec![c, c, 1, 1], dt),
        ("bottleneck.0.weight", w.fc1_w, vec![6, 3], DType::F32),
        ("bottleneck.0.bias", w.fc1_b, vec![6], DType::F32),
        ("bottleneck.2.weight", w.fc2_w, vec![1, 6], DType::F32),
        ("bottleneck.2.bias", w.fc2_b, vec![1], DType::F32),
    ] {
        t.expect_dtype(op, tdt)?;
        if t.shape() != shape.as_slice() {
            return Err(Error::shape(op, format!("{name} is {:?}, expected {shape:?}", t.shape())));
        }
    }
    s.same_device(op, &[w.w_avg, w.w_max, w.fc1_w, w.fc1_b, w.fc2_w, w.fc2_b])?;
    Ok((s.shape()[0], c, s.shape()[2] * s.shape()[3]))
}

/// The gate's output alone (inference: nothing kept for a backward). On the cpu the 1×1
/// products, the channel reductions and the scaling run block by block of pixels
/// (`cpu::infer`), the products never stored whole; elsewhere `plam_gate`'s output.
pub fn plam_gate_infer(s: &Tensor, w: &PlamWeights, algo: GemmAlgo) -> Result<Tensor> {
    let dev = s.device();
    if let Device::Cpu = dev {
        let op = "plam_gate";
        let (b, c, hw) = check(s, w, DType::F32)?;
        let fc = cpu::Fc::read(w)?;
        let (wa, wm) = (w.w_avg.cpu_f32(op)?, w.w_max.cpu_f32(op)?);
        return Tensor::from_vec(cpu::infer(s.cpu_f32(op)?, wa, wm, &fc, b, c, hw), s.shape(), dev);
    }
    Ok(plam_gate(s, w, algo)?.out)
}

pub fn plam_gate(s: &Tensor, w: &PlamWeights, algo: GemmAlgo) -> Result<PlamForward> {
    plam_gate_stored(s, w, algo, Ok)
}

/// `plam_gate` with the two 1×1 convolutions' outputs passed through `store` before the gate
/// reads them (bf16 autocast stores them in bf16, as any convolution's output).
pub fn plam_gate_stored(
    s: &Tensor,
    w: &PlamWeights,
    algo: GemmAlgo,
    store: impl Fn(Tensor) -> Result<Tensor>,
) -> Result<PlamForward> {
    plam_gate_with(s, w, |wt| store(conv::conv2d(s, wt, None, algo)?))
}

/// `plam_gate` with a and m made by `conv(w_avg)` and `conv(w_max)` (each [B, C, H, W] f32).
fn plam_gate_with(s: &Tensor, w: &PlamWeights, conv: impl Fn(&Tensor) -> Result<Tensor>) -> Result<PlamForward> {
    let op = "plam_gate";
    let (b, c, hw) = check(s, w, DType::F32)?;
    let a = conv(w.w_avg)?;
    let m = conv(w.w_max)?;
    // the kernels read a and m as [B, C, H, W] f32: conv2d's output is (w is [C, C, 1, 1],
    // checked); what autocast's stores make of it is checked here (a build without autocast
    // has only conv2d's, and not these 336 bytes)
    #[cfg(feature = "autocast")]
    if [&a, &m].iter().any(|t| t.dtype() != DType::F32 || t.shape() != s.shape()) {
        return Err(Error::Other(format!("{op}: a 1×1 convolution's output is not [B, C, H, W] f32")));
    }
    let gshape = [b, 1, s.shape()[2], s.shape()[3]];
    let dev = s.device();
    // an inference-only build has no backward, and its graph runs `plam_gate_infer` on the cpu:
    // the separate cpu forward (and its 3 KB) stays out of reclmis-infer
    #[cfg(not(feature = "train"))]
    if let Device::Cpu = dev {
        return Err(Error::Other(format!(
            "{op}: the backward's state needs the `train` feature; inference uses plam_gate_infer"
        )));
    }
    #[cfg(feature = "train")]
    if let Device::Cpu = dev {
        let fc = cpu::Fc::read(w)?;
        let (out, g, arg) = cpu::forward(a.cpu_f32(op)?, m.cpu_f32(op)?, s.cpu_f32(op)?, &fc, b, c, hw);
        return Ok(PlamForward {
            out: Tensor::from_vec(out, s.shape(), dev)?,
            g: Tensor::from_vec(g, &gshape, dev)?,
            a,
            m,
            arg: Tensor::from_vec_i32(arg, &gshape, dev)?,
        });
    }
    let out = Tensor::empty(s.shape(), DType::F32, dev)?;
    let g = Tensor::empty(&gshape, DType::F32, dev)?;
    let arg = Tensor::empty(&gshape, DType::I32, dev)?;
    let p = params(&a, &m, s, w, (b, c, hw), [out.dev_ptr(), g.dev_ptr(), arg.dev_ptr(), 0, 0, 0, 0, 0])?;
    if b * hw > 0 {
        // SAFETY: the params hold pointers to live buffers of the sizes this op checked above, for the kernel they were declared for.
        unsafe { dev.launch(Kernel::plam_gate_fwd_f32, LaunchCfg::elementwise(b * hw), &p) }?;
    }
    Ok(PlamForward { out, g, a, m, arg })
}

/// `t` as a tensor no other handle shares (itself when it is, else a copy): an op may write it.
fn sole(t: Tensor) -> Result<Tensor> {
    if t.is_sole() {
        Ok(t)
    } else if t.dtype() == DType::F32 {
        elementwise::scale(&t, 1.0)
    } else {
        // (bf16: a shared forward, the tests' case; widened and rounded back, exact)
        let wide = crate::ops::cast::cast(&t, DType::F32)?;
        crate::ops::cast::cast(&wide, t.dtype())
    }
}

/// `ptrs`: out, g, arg, dout, ds, da, dm, fcgrad.
fn params(
    a: &Tensor,
    m: &Tensor,
    s: &Tensor,
    w: &PlamWeights,
    (b, c, hw): (usize, usize, usize),
    ptrs: [u64; 8],
) -> Result<PlamParams> {
    let op = "plam_gate";
    Ok(PlamParams {
        a: a.dev_ptr(),
        m: m.dev_ptr(),
        s: s.dev_ptr(),
        fc1w: w.fc1_w.dev_ptr(),
        fc1b: w.fc1_b.dev_ptr(),
        fc2w: w.fc2_w.dev_ptr(),
        fc2b: w.fc2_b.dev_ptr(),
        out: ptrs[0],
        g: ptrs[1],
        arg: ptrs[2],
        dout: ptrs[3],
        ds: ptrs[4],
        da: ptrs[5],
        dm: ptrs[6],
        fcgrad: ptrs[7],
        b: check_u32(op, b)?,
        c: check_u32(op, c)?,
        hw: check_u32(op, hw)?,
        pad: 0,
    })
}

pub fn plam_gate_backward(
    s: &Tensor,
    w: &PlamWeights,
    f: PlamForward,
    dout: &Tensor,
    algo: GemmAlgo,
) -> Result<PlamGrads> {
    backward_rounded(s, w, f, dout, algo, None)
}

/// `plam_gate_backward` with the bf16 backward's roundings (`bf16::plam_gate_backward_bf16`:
/// dA, dM and the two 1×1 convolutions' input gradients, each stored in bf16) made by `round`:
/// the error model of bf16 autocast (`Graph::with_bf16_perturbation`) multiplies each by 1 ± u.
/// The sums are in the bf16 backward's order.
#[cfg(feature = "autocast")]
pub(crate) fn plam_gate_backward_rounded(
    s: &Tensor,
    w: &PlamWeights,
    f: PlamForward,
    dout: &Tensor,
    algo: GemmAlgo,
    round: &dyn Fn(usize, Tensor) -> Result<Tensor>,
) -> Result<PlamGrads> {
    backward_rounded(s, w, f, dout, algo, Some(round))
}

/// `round(k, t)`, k = 0..4: dA, dM, the input gradients through conv_avg and conv_max.
type Rounding<'a> = Option<&'a dyn Fn(usize, Tensor) -> Result<Tensor>>;

fn backward_rounded(
    s: &Tensor,
    w: &PlamWeights,
    f: PlamForward,
    dout: &Tensor,
    algo: GemmAlgo,
    round: Rounding,
) -> Result<PlamGrads> {
    let op = "plam_gate_backward";
    let round = |k: usize, t: Tensor| match round {
        Some(r) => r(k, t),
        None => Ok(t),
    };
    let (b, c, hw) = check(s, w, DType::F32)?;
    if dout.shape() != s.shape() {
        return Err(Error::shape(op, format!("dout {:?} vs skip input {:?}", dout.shape(), s.shape())));
    }
    dout.expect_dtype(op, DType::F32)?;
    s.same_device(op, &[dout])?;
    // `g`, `a` and `m` are public within the crate and read by the kernel: their shapes and
    // types must hold
    let gshape = [b, 1, s.shape()[2], s.shape()[3]];
    f.g.expect_dtype(op, DType::F32)?;
    if f.g.shape() != gshape {
        return Err(Error::shape(op, format!("the forward's gate {:?}, expected {gshape:?}", f.g.shape())));
    }
    for t in [&f.a, &f.m] {
        t.expect_dtype(op, DType::F32)?;
        if t.shape() != s.shape() {
            return Err(Error::shape(op, format!("the forward's a/m {:?}, expected {:?}", t.shape(), s.shape())));
        }
    }
    s.same_device(op, &[&f.g, &f.a, &f.m])?;
    let dev = s.device();
    // dA and dM are written over a and m (their last use): two full-size tensors fewer in the
    // working set. A forward the caller still shares is copied first.
    let PlamForward { g, a, m, arg, .. } = f;
    let (mut a, mut m) = (sole(a)?, sole(m)?);
    let (ds_direct, fcg) = if let Device::Cpu = dev {
        let fc = cpu::Fc::read(w)?;
        let (sv, dv, gv) = (s.cpu_f32(op)?, dout.cpu_f32(op)?, g.cpu_f32(op)?);
        let (Some(av), Some(mv)) = (a.sole_cpu_f32_mut(), m.sole_cpu_f32_mut()) else {
            return Err(Error::Other(format!("{op}: a and m must be cpu f32 tensors of their own")));
        };
        let fcg = cpu::backward(av, mv, sv, dv, gv, &fc, b, c, hw);
        (Tensor::from_vec(cpu::ds_direct(gv, dv, c, hw), s.shape(), dev)?, Tensor::from_vec(fcg, &[31], dev)?)
    } else {
        let ds = Tensor::empty(s.shape(), DType::F32, dev)?;
        let cfg = LaunchCfg::elementwise((b * hw).max(1));
        let fcgrad = Tensor::empty(&[cfg.grid.0 as usize, 31], DType::F32, dev)?;
        let p = params(
            &a,
            &m,
            s,
            w,
            (b, c, hw),
            [0, g.dev_ptr(), arg.dev_ptr(), dout.dev_ptr(), ds.dev_ptr(), a.dev_ptr(), m.dev_ptr(), fcgrad.dev_ptr()],
        )?;
        // SAFETY: the params hold pointers to live buffers of the sizes this op checked above, for
        // the kernel they were declared for; da and dm alias a and m, which no other tensor
        // shares (`sole`), and each thread reads an element of a (m) before it writes that
        // element's gradient (kernels/plam.cu).
        unsafe { dev.launch(Kernel::plam_gate_bwd_f32, cfg, &p) }?;
        (ds, reduce::sum(&fcgrad, 0)?)
    };
    drop((g, arg));
    let (da, dm) = (round(0, a)?, round(1, m)?);
    // each [B, C, H, W] gradient is freed as soon as it is summed: at the decoder's full
    // resolution this backward is a training step's largest working set
    let ga = conv::conv2d_backward(s, w.w_avg, &da, false, algo)?;
    drop(da);
    let ds = elementwise::add(&ds_direct, &round(2, ga.dx)?)?;
    drop(ds_direct);
    let gm = conv::conv2d_backward(s, w.w_max, &dm, false, algo)?;
    drop(dm);
    let ds = elementwise::add(&ds, &round(3, gm.dx)?)?;
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
