//! Fused multi-head attention, forward and backward, flash style: the Tq×S score matrix is never
//! written to global memory (cuda/emu: one 16-key tile at a time in shared memory with an online
//! softmax; cpu: one block of at most 64 query rows per (batch, head) in a cache-sized buffer).
//!
//! Layouts are the projections' own, so no transposes are needed around the op:
//! q [B,Tq,E], k and v [B,S,E], output [B,Tq,E], with E = H·Dh and head h in columns
//! h·Dh..(h+1)·Dh; any Dh from 1 to 128. Logits are scale·⟨q_i, k_j⟩ (scale defaults to Dh^-½).
//!
//! Options, combinable:
//! - `causal`: key j takes part in query i's row only when j <= i (top-left aligned, also when
//!   Tq != S), as the official code's triangular mask.
//! - `key_valid` [B,S] i32: nonzero = the key takes part (like the model's text mask).
//! - `condition`, per-key weights w [B,S] shared by every head and query:
//!   `Condition::Probs` (official): P ← P·(w + 1e-10), each row renormalised. It is computed as
//!   softmax(logits + ln(w + 1e-10)), which is the same function; w must be >= 0.
//!   `Condition::Logits` (paper): the scaled logits are multiplied by w before the softmax.
//!   The backward gives dw (summed over heads and queries).
//!
//! Rows with no key left (all masked) give an output of zeros, a logsumexp of −inf, zero
//! probabilities and zero gradients (PyTorch gives NaN there).
//!
//! cuda/emu: `GemmAlgo::TensorCore` takes the inner products on tensor cores (tf32 operands, f32
//! accumulation; the softmax is always f32): on the pipelined kernels (`attention_pipe_*_f32`:
//! cp.async double-buffered tiles, ldmatrix; tile shapes in `pipe`) where the head dim is 16, 32, 64 or
//! 128, the operands 16-byte aligned and no probabilities are asked for, else (and in builds
//! without `autocast`) the tensor-core branch of the kernels below; `Auto`/`Tiled` are exact f32
//! FMA on the latter.
//! The backward recomputes the probabilities from the saved logsumexp (FlashAttention-2): one
//! kernel per key tile for dK, dV and dw, one per query tile for dQ, so no atomics and the sums
//! are deterministic.

/// Its `reclmis bench` cases and `selfcheck` (registered in `bench::registry`).
#[cfg(feature = "cli")]
pub mod bench;
#[cfg(feature = "autocast")]
pub mod bf16;
pub mod composed;
pub mod cpu;
#[cfg(feature = "autocast")]
pub mod pipe;
#[cfg(feature = "refs")]
pub mod reference;

use crate::device::{Device, LaunchCfg};
use crate::error::{Error, Result};
use crate::kernels::Kernel;
use crate::ops::check_u32;
use crate::ops::gemm::GemmAlgo;
use crate::ops::reduce;
use crate::tensor::{DType, Tensor};

/// The official code's constant in P·(w + 1e-10).
pub const COND_EPS: f32 = 1e-10;
/// Largest head dimension the kernels take (their register tiles are sized for it).
pub const MAX_HEAD_DIM: usize = 128;

#[derive(Clone, Copy, Debug, Default)]
pub enum Condition<'a> {
    #[default]
    None,
    /// Official: probabilities times (w + 1e-10), rows renormalised. w [B,S], w >= 0.
    Probs(&'a Tensor),
    /// Paper: scaled logits times w before the softmax. w [B,S].
    Logits(&'a Tensor),
}

impl<'a> Condition<'a> {
    fn code(&self) -> u32 {
        match self {
            Condition::None => 0,
            Condition::Probs(_) => 1,
            Condition::Logits(_) => 2,
        }
    }
    fn weights(&self) -> Option<&'a Tensor> {
        match *self {
            Condition::None => None,
            Condition::Probs(w) | Condition::Logits(w) => Some(w),
        }
    }
}

#[derive(Clone, Copy, Debug)]
pub struct AttnOpts<'a> {
    pub heads: usize,
    pub causal: bool,
    pub key_valid: Option<&'a Tensor>,
    pub condition: Condition<'a>,
    /// Logit scale; None = Dh^-½.
    pub scale: Option<f32>,
    /// Also return the probabilities [B,H,Tq,S] (for visualisations; this one does materialise).
    pub want_probs: bool,
    pub algo: GemmAlgo,
}

impl<'a> AttnOpts<'a> {
    pub fn new(heads: usize) -> Self {
        AttnOpts {
            heads,
            causal: false,
            key_valid: None,
            condition: Condition::None,
            scale: None,
            want_probs: false,
            algo: GemmAlgo::Auto,
        }
    }
}

/// Sizes of one attention call.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AttnShape {
    pub b: usize,
    pub h: usize,
    pub tq: usize,
    pub s: usize,
    pub dh: usize,
}

impl AttnShape {
    pub fn e(&self) -> usize {
        self.h * self.dh
    }
    /// Multiply-adds of the two products, ×2 (the usual attention FLOP count, no mask savings).
    pub fn flops(&self) -> f64 {
        4.0 * (self.b * self.h * self.tq * self.s * self.dh) as f64
    }
}

pub struct AttnForward {
    /// [B,Tq,E]
    pub o: Tensor,
    /// [B,H,Tq]: log Σ_j exp(logit_ij) over the keys taken (with ln(w + 1e-10) added under
    /// the official condition); −inf for rows with no key. What the backward needs.
    pub lse: Tensor,
    /// [B,H,Tq,S] when asked for.
    pub probs: Option<Tensor>,
}

pub struct AttnGrads {
    pub dq: Tensor,
    pub dk: Tensor,
    pub dv: Tensor,
    /// [B,S] with a condition, else None.
    pub dw: Option<Tensor>,
}

crate::kernel_params! {
    struct AttnParams [152] {
        q: u64,
        k: u64,
        v: u64,
        o: u64,
        lse: u64,
        w: u64,
        valid: u64,
        dout: u64,
        delta: u64,
        dq: u64,
        dk: u64,
        dv: u64,
        dw: u64,
        probs: u64,
        b: u32,
        h: u32,
        tq: u32,
        s: u32,
        dh: u32,
        e: u32,
        scale: f32,
        causal: u32,
        cond: u32,
        tc: u32,
    }
}

const OP: &str = "attention";

/// Checks shapes, dtypes and devices; returns the sizes.
pub fn shape(q: &Tensor, k: &Tensor, v: &Tensor, o: &AttnOpts) -> Result<AttnShape> {
    shape_of(q, k, v, o, DType::F32)
}

/// `shape` for q, k and v of `dtype` (the mask and the condition weights keep theirs).
fn shape_of(q: &Tensor, k: &Tensor, v: &Tensor, o: &AttnOpts, dtype: DType) -> Result<AttnShape> {
    q.same_device(OP, &[k, v])?;
    for (name, t) in [("q", q), ("k", k), ("v", v)] {
        t.expect_dtype(OP, dtype)?;
        if t.rank() != 3 {
            return Err(Error::shape(OP, format!("{name} must be [B,T,E], got {:?}", t.shape())));
        }
    }
    let (b, tq, e) = (q.shape()[0], q.shape()[1], q.shape()[2]);
    if k.shape() != v.shape() || k.shape()[0] != b || k.shape()[2] != e {
        return Err(Error::shape(
            OP,
            format!(
                "q {:?}, k {:?}, v {:?}: k and v must be [B,S,E] with q's B and E",
                q.shape(),
                k.shape(),
                v.shape()
            ),
        ));
    }
    let s = k.shape()[1];
    if o.heads == 0 || e % o.heads != 0 {
        return Err(Error::shape(OP, format!("width {e} does not split into {} heads", o.heads)));
    }
    let dh = e / o.heads;
    if dh > MAX_HEAD_DIM {
        return Err(Error::Unsupported { op: OP, detail: format!("head dim {dh} > {MAX_HEAD_DIM}") });
    }
    if let Some(m) = o.key_valid {
        q.same_device(OP, &[m])?;
        m.expect_dtype(OP, DType::I32)?;
        if m.shape() != [b, s] {
            return Err(Error::shape(OP, format!("key_valid must be [B,S] = [{b},{s}], got {:?}", m.shape())));
        }
    }
    if let Some(w) = o.condition.weights() {
        q.same_device(OP, &[w])?;
        w.expect_dtype(OP, DType::F32)?;
        if w.shape() != [b, s] {
            return Err(Error::shape(OP, format!("condition weights must be [B,S] = [{b},{s}], got {:?}", w.shape())));
        }
    }
    Ok(AttnShape { b, h: o.heads, tq, s, dh })
}

fn scale_of(sh: &AttnShape, o: &AttnOpts) -> f32 {
    o.scale.unwrap_or(1.0 / (sh.dh.max(1) as f32).sqrt())
}

/// Head dim rounded up to the kernels' register-tile widths.
fn padded_dh(dh: usize) -> u32 {
    match dh {
        0..=16 => 16,
        17..=32 => 32,
        33..=64 => 64,
        _ => 128,
    }
}

/// Warps per block; mirrors attn_fwd_warps / attn_bwd_warps in kernels/attention.cu (chosen so
/// the shared tiles fit in the 48 KiB of static shared memory at every head dim).
fn fwd_warps(dp: u32) -> u32 {
    if dp == 128 {
        2
    } else {
        4
    }
}
fn bwd_warps(dp: u32) -> u32 {
    match dp {
        128 => 1,
        64 => 2,
        _ => 4,
    }
}

fn params(sh: &AttnShape, o: &AttnOpts, ptrs: [u64; 14]) -> Result<AttnParams> {
    let [q, k, v, out, lse, w, valid, dout, delta, dq, dk, dv, dw, probs] = ptrs;
    Ok(AttnParams {
        q,
        k,
        v,
        o: out,
        lse,
        w,
        valid,
        dout,
        delta,
        dq,
        dk,
        dv,
        dw,
        probs,
        b: check_u32(OP, sh.b)?,
        h: check_u32(OP, sh.h)?,
        tq: check_u32(OP, sh.tq)?,
        s: check_u32(OP, sh.s)?,
        dh: check_u32(OP, sh.dh)?,
        e: check_u32(OP, sh.e())?,
        scale: scale_of(sh, o),
        causal: o.causal as u32,
        cond: o.condition.code(),
        tc: (o.algo == GemmAlgo::TensorCore) as u32,
    })
}

/// The pipelined tf32 kernels' launch shapes where they take the problem: tensor cores asked for
/// (`GemmAlgo::TensorCore`), a head dim of their tile widths, no probabilities, and every operand
/// 16-byte aligned. (Builds without `autocast` embed none of them: the unpipelined kernels' tf32
/// branch serves every problem there.)
#[cfg(feature = "autocast")]
fn tf32_pipe(sh: &AttnShape, algo: GemmAlgo, want_probs: bool, operands: &[&Tensor]) -> Option<pipe::Geometry> {
    let aligned = operands.iter().all(|t| t.dev_ptr().is_multiple_of(16));
    let take = algo == GemmAlgo::TensorCore && aligned && !pipe::unpipelined();
    (take && pipe::pipelined(sh.dh, sh.b * sh.h, want_probs))
        .then(|| pipe::geometry(pipe::Kind::Tf32, sh.dh as u32, sh.tq, sh.s))
}

/// grid = (row tiles, batch·heads): the kernels read (b, h) from blockIdx.y, whose range is 65535.
fn bh_grid(sh: &AttnShape, rows: usize, per_block: u32) -> Result<(u32, u32, u32)> {
    let bh = check_u32(OP, sh.b * sh.h)?;
    if bh > 65535 {
        return Err(Error::Unsupported {
            op: OP,
            detail: format!("batch x heads = {bh} exceeds a grid's y range (65535); split the batch"),
        });
    }
    Ok((check_u32(OP, rows.div_ceil(per_block as usize).max(1))?, bh, 1))
}

fn cpu_problem<'a>(sh: AttnShape, o: &AttnOpts<'a>) -> Result<cpu::Problem<'a>> {
    Ok(cpu::Problem {
        sh,
        scale: scale_of(&sh, o),
        causal: o.causal,
        valid: o.key_valid.map(|m| m.cpu_i32(OP)).transpose()?,
        cond: match o.condition {
            Condition::None => cpu::Cond::None,
            Condition::Probs(w) => cpu::Cond::Probs(w.cpu_f32(OP)?),
            Condition::Logits(w) => cpu::Cond::Logits(w.cpu_f32(OP)?),
        },
    })
}

pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor, o: &AttnOpts) -> Result<AttnForward> {
    let sh = shape(q, k, v, o)?;
    let dev = q.device();
    if let Device::Cpu = dev {
        let pr = cpu_problem(sh, o)?;
        let f = cpu::forward(q.cpu_f32(OP)?, k.cpu_f32(OP)?, v.cpu_f32(OP)?, &pr, o.want_probs);
        return Ok(AttnForward {
            o: Tensor::from_vec(f.o, q.shape(), dev)?,
            lse: Tensor::from_vec(f.lse, &[sh.b, sh.h, sh.tq], dev)?,
            probs: f.probs.map(|p| Tensor::from_vec(p, &[sh.b, sh.h, sh.tq, sh.s], dev)).transpose()?,
        });
    }
    let out = Tensor::empty(q.shape(), DType::F32, dev)?;
    let lse = Tensor::empty(&[sh.b, sh.h, sh.tq], DType::F32, dev)?;
    let probs = if o.want_probs { Some(Tensor::empty(&[sh.b, sh.h, sh.tq, sh.s], DType::F32, dev)?) } else { None };
    let ptr = |t: Option<&Tensor>| t.map_or(0, |t| t.dev_ptr());
    let p = params(
        &sh,
        o,
        [
            q.dev_ptr(),
            k.dev_ptr(),
            v.dev_ptr(),
            out.dev_ptr(),
            lse.dev_ptr(),
            ptr(o.condition.weights()),
            ptr(o.key_valid),
            0,
            0,
            0,
            0,
            0,
            0,
            ptr(probs.as_ref()),
        ],
    )?;
    #[cfg(feature = "autocast")]
    if let Some(g) = tf32_pipe(&sh, o.algo, o.want_probs, &[q, k, v]) {
        if sh.b * sh.h * sh.tq > 0 {
            let g = g.fwd;
            let cfg = LaunchCfg { grid: bh_grid(&sh, sh.tq, g.rows)?, block: (g.threads, 1, 1), smem_bytes: g.smem };
            // SAFETY: the params hold pointers to live buffers of the sizes this op checked above
            // (f32 q, k, v; out and lse new); dh is the kernel's tile width (16, 32, 64 or 128,
            // so E is a multiple of 4 floats) and the bases are 16-byte aligned (tf32_pipe): every
            // 16-byte chunk it copies is whole. No probabilities were asked for (tf32_pipe).
            unsafe { dev.launch(Kernel::attention_pipe_fwd_f32, cfg, &p) }?;
        }
        return Ok(AttnForward { o: out, lse, probs });
    }
    if sh.b * sh.h * sh.tq > 0 {
        let dp = padded_dh(sh.dh);
        let nw = fwd_warps(dp);
        let cfg = LaunchCfg { grid: bh_grid(&sh, sh.tq, 16 * nw)?, block: (32 * nw, 1, 1), smem_bytes: 0 };
        // SAFETY: the params hold pointers to live buffers of the sizes this op checked above, for the kernel they were declared for.
        unsafe { dev.launch(Kernel::attention_fwd_f32, cfg, &p) }?;
        if let Some(pt) = &probs {
            if pt.numel() > 0 {
                // SAFETY: the params hold pointers to live buffers of the sizes this op checked above, for the kernel they were declared for.
                unsafe { dev.launch(Kernel::attention_probs_fwd_f32, LaunchCfg::elementwise(pt.numel()), &p) }?;
            }
        }
    }
    Ok(AttnForward { o: out, lse, probs })
}

/// Gradients from the forward's output and logsumexp and d_out [B,Tq,E].
pub fn attention_backward(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    fwd: &AttnForward,
    d_out: &Tensor,
    o: &AttnOpts,
) -> Result<AttnGrads> {
    let sh = shape(q, k, v, o)?;
    q.same_device(OP, &[&fwd.o, &fwd.lse, d_out])?;
    Tensor::expect_f32(OP, &[&fwd.o, &fwd.lse, d_out])?;
    check_backward_shapes(q, fwd, d_out, &sh)?;
    let dev = q.device();
    if let Device::Cpu = dev {
        let pr = cpu_problem(sh, o)?;
        let g = cpu::backward(
            q.cpu_f32(OP)?,
            k.cpu_f32(OP)?,
            v.cpu_f32(OP)?,
            fwd.o.cpu_f32(OP)?,
            fwd.lse.cpu_f32(OP)?,
            d_out.cpu_f32(OP)?,
            &pr,
        );
        return Ok(AttnGrads {
            dq: Tensor::from_vec(g.dq, q.shape(), dev)?,
            dk: Tensor::from_vec(g.dk, k.shape(), dev)?,
            dv: Tensor::from_vec(g.dv, v.shape(), dev)?,
            dw: g.dw.map(|w| Tensor::from_vec(w, &[sh.b, sh.s], dev)).transpose()?,
        });
    }
    #[cfg(feature = "autocast")]
    if let Some(g) = tf32_pipe(&sh, o.algo, false, &[q, k, v, &fwd.o, d_out]) {
        let kernels = BwdKernels {
            delta: Kernel::attention_delta_bwd_f32,
            dq: (Kernel::attention_pipe_dq_bwd_f32, g.dq),
            dkdv: (Kernel::attention_pipe_dkdv_bwd_f32, g.dkdv),
            grad: DType::F32,
        };
        // SAFETY: q, k, v, o and d_out are f32 of the checked shapes, lse f32 [B,H,Tq]; dh is the
        // pipelined kernels' tile width (16, 32, 64 or 128, so E is a multiple of 4 floats) and
        // the bases are 16-byte aligned (tf32_pipe): every 16-byte chunk they copy is whole.
        return unsafe { backward_on_device(q, k, v, fwd, d_out, o, &sh, kernels) };
    }
    let dp = padded_dh(sh.dh);
    let nw = bwd_warps(dp);
    let launch = Launch { rows: 16 * nw, threads: 32 * nw, smem: 0 };
    let kernels = BwdKernels {
        delta: Kernel::attention_delta_bwd_f32,
        dq: (Kernel::attention_dq_bwd_f32, launch),
        dkdv: (Kernel::attention_dkdv_bwd_f32, launch),
        grad: DType::F32,
    };
    // SAFETY: the f32 kernels take any head dim up to 128 (shape checked it) and f32 operands
    // (checked above) at any address.
    unsafe { backward_on_device(q, k, v, fwd, d_out, o, &sh, kernels) }
}

/// d_out and o of q's shape and lse [B,H,Tq] (their devices and types: the caller's checks).
fn check_backward_shapes(q: &Tensor, fwd: &AttnForward, d_out: &Tensor, sh: &AttnShape) -> Result<()> {
    if d_out.shape() != q.shape() || fwd.o.shape() != q.shape() || fwd.lse.shape() != [sh.b, sh.h, sh.tq] {
        return Err(Error::shape(
            OP,
            format!(
                "backward: d_out {:?} and o {:?} must be q's shape {:?}, lse {:?} must be [{}, {}, {}]",
                d_out.shape(),
                fwd.o.shape(),
                q.shape(),
                fwd.lse.shape(),
                sh.b,
                sh.h,
                sh.tq
            ),
        ));
    }
    Ok(())
}

/// One kernel's launch shape: rows per block, threads, dynamic shared memory.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct Launch {
    pub rows: u32,
    pub threads: u32,
    pub smem: u32,
}

/// The backward's kernels on cuda/emu, one set per operand type: delta, then dQ over query tiles
/// and dK/dV (with the per-head dw) over key tiles, each with its launch shape; dq, dk, dv of
/// type `grad`.
struct BwdKernels {
    delta: Kernel,
    dq: (Kernel, Launch),
    dkdv: (Kernel, Launch),
    grad: DType,
}

/// Runs `kernels` on checked operands: dq, dk, dv new tensors of the kernels' type, dw the
/// per-head partials summed over heads (deterministic, no atomics).
///
/// SAFETY: q, k, v, fwd and d_out passed the caller's checks against `sh` for the operand type
/// `kernels` read, and meet the kernels' own conditions (the pipelined ones: a head dim of their
/// tile width, 16-byte aligned bases).
#[allow(clippy::too_many_arguments)]
unsafe fn backward_on_device(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    fwd: &AttnForward,
    d_out: &Tensor,
    o: &AttnOpts,
    sh: &AttnShape,
    kernels: BwdKernels,
) -> Result<AttnGrads> {
    let dev = q.device();
    let weights = o.condition.weights();
    let dq = Tensor::empty(q.shape(), kernels.grad, dev)?;
    let dk = Tensor::empty(k.shape(), kernels.grad, dev)?;
    let dv = Tensor::empty(v.shape(), kernels.grad, dev)?;
    // Per-head partial dw [B,H,S], summed over heads below (deterministic, no atomics).
    let dw_heads = if weights.is_some() { Some(Tensor::empty(&[sh.b, sh.h, sh.s], DType::F32, dev)?) } else { None };
    let delta = Tensor::empty(&[sh.b, sh.h, sh.tq], DType::F32, dev)?;
    let ptr = |t: Option<&Tensor>| t.map_or(0, |t| t.dev_ptr());
    let p = params(
        sh,
        o,
        [
            q.dev_ptr(),
            k.dev_ptr(),
            v.dev_ptr(),
            fwd.o.dev_ptr(),
            fwd.lse.dev_ptr(),
            ptr(weights),
            ptr(o.key_valid),
            d_out.dev_ptr(),
            delta.dev_ptr(),
            dq.dev_ptr(),
            dk.dev_ptr(),
            dv.dev_ptr(),
            ptr(dw_heads.as_ref()),
            0,
        ],
    )?;
    if sh.b * sh.h * sh.tq > 0 {
        let rows = check_u32(OP, sh.b * sh.h * sh.tq)?;
        let cfg = LaunchCfg { grid: (rows.div_ceil(8), 1, 1), block: (32, 8, 1), smem_bytes: 0 };
        // SAFETY: the params hold pointers to live buffers of the sizes the caller checked
        // (this function's contract) and the new ones above, for the kernels they were declared for.
        unsafe { dev.launch(kernels.delta, cfg, &p) }?;
        let (k, l) = kernels.dq;
        let cfg = LaunchCfg { grid: bh_grid(sh, sh.tq, l.rows)?, block: (l.threads, 1, 1), smem_bytes: l.smem };
        // SAFETY: as above.
        unsafe { dev.launch(k, cfg, &p) }?;
    }
    if sh.b * sh.h * sh.s > 0 {
        let (k, l) = kernels.dkdv;
        let cfg = LaunchCfg { grid: bh_grid(sh, sh.s, l.rows)?, block: (l.threads, 1, 1), smem_bytes: l.smem };
        // SAFETY: as above.
        unsafe { dev.launch(k, cfg, &p) }?;
    }
    let dw = dw_heads.map(|d| reduce::sum(&d, 1)).transpose()?;
    Ok(AttnGrads { dq, dk, dv, dw })
}
