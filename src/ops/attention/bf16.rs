//! The fused attention's forward on bf16 q, k, v (bf16 autocast): bf16 output, f32 logits,
//! softmax statistics and logsumexp.
//!
//! cuda / emu: `attention_pipe_fwd_bf16` (kernels/attention.cu on pipe_gemm.cuh's building
//! blocks: cp.async double-buffered K/V tiles, ldmatrix, mma.sync m16n8k16, P rounded to bf16 for
//! the P·V product as FlashAttention does) where the head dim is 16, 32, 64 or 128 and every row
//! of q, k, v is whole, aligned 16-byte chunks; the f32 kernel on widened copies otherwise (and
//! for the probabilities on request). cpu: the f32 forward of widened plain buffers, the output
//! rounded once.
//!
//! The backward (`attention_backward_bf16`) on bf16 q, k, v, o and dout: dq, dk, dv in bf16 (f32
//! sums rounded once, as the tape stores the gradient of a bf16 value), dw in f32. cuda / emu:
//! `attention_delta_bwd_bf16`, then `attention_pipe_dq_bwd_bf16` and
//! `attention_pipe_dkdv_bwd_bf16` (the forward's building blocks; P and dS recomputed in f32 from
//! the logsumexp and rounded to bf16 as the A operands of their products, as FlashAttention),
//! under the forward's conditions; the f32 kernels on widened copies otherwise. cpu: the f32
//! backward of widened plain buffers, rounded once.

use super::pipe::{geometry, pipelined, Kind};
use super::{
    backward_on_device, bh_grid, check_backward_shapes, cpu, cpu_problem, params, shape_of, AttnForward, AttnGrads,
    AttnOpts, BwdKernels, OP,
};
use crate::device::memory::Mirrored;
use crate::device::{Device, LaunchCfg};
use crate::error::Result;
use crate::kernels::Kernel;
use crate::ops::cast::cast;
use crate::ops::gemm::{
    cpu::{bf16_tensor, widened},
    GemmAlgo,
};
use crate::tensor::{DType, Tensor};

/// The forward on bf16 q [B,Tq,E], k and v [B,S,E]: o [B,Tq,E] bf16, lse [B,H,Tq] f32 (and f32
/// probabilities when asked for).
pub fn attention_bf16(q: &Tensor, k: &Tensor, v: &Tensor, o: &AttnOpts) -> Result<AttnForward> {
    let sh = shape_of(q, k, v, o, DType::BF16)?;
    let dev = q.device();
    let aligned = [q, k, v].iter().all(|t| t.dev_ptr().is_multiple_of(16));
    let pipelined = pipelined(sh.dh, sh.b * sh.h, o.want_probs);
    match dev {
        Device::Cpu if pipelined => {
            let pr = cpu_problem(sh, o)?;
            let f = cpu::forward(&widened(q, OP)?, &widened(k, OP)?, &widened(v, OP)?, &pr, o.want_probs);
            Ok(AttnForward {
                o: bf16_tensor(&f.o, q.shape(), dev)?,
                lse: Tensor::from_vec(f.lse, &[sh.b, sh.h, sh.tq], dev)?,
                probs: f.probs.map(|p| Tensor::from_vec(p, &[sh.b, sh.h, sh.tq, sh.s], dev)).transpose()?,
            })
        }
        _ if pipelined && aligned => {
            let out = Tensor::empty(q.shape(), DType::BF16, dev)?;
            let lse = Tensor::empty(&[sh.b, sh.h, sh.tq], DType::F32, dev)?;
            let ptr = |t: Option<&Tensor>| t.map_or(0, |t| t.dev_ptr());
            let mut ptrs = [0u64; 14];
            ptrs[..7].copy_from_slice(&[
                q.dev_ptr(),
                k.dev_ptr(),
                v.dev_ptr(),
                out.dev_ptr(),
                lse.dev_ptr(),
                ptr(o.condition.weights()),
                ptr(o.key_valid),
            ]);
            let p = params(&sh, o, ptrs)?;
            if sh.b * sh.h * sh.tq > 0 {
                let g = geometry(Kind::Bf16, sh.dh as u32, sh.tq, sh.s).fwd;
                let cfg =
                    LaunchCfg { grid: bh_grid(&sh, sh.tq, g.rows)?, block: (g.threads, 1, 1), smem_bytes: g.smem };
                // SAFETY: shape_of checked q, k, v (bf16 [B,T,E] with E = H·dh), the mask and the
                // condition weights against sh; out is a new bf16 [B,Tq,E] and lse a new f32
                // [B,H,Tq]; dh is the kernel's tile width (16, 32, 64 or 128, so E is a multiple
                // of 8) and the bases are 16-byte aligned: every 16-byte chunk it copies is whole.
                unsafe { dev.launch(Kernel::attention_pipe_fwd_bf16, cfg, &p) }?;
            }
            Ok(AttnForward { o: out, lse, probs: None })
        }
        _ => {
            let wide = AttnOpts { algo: GemmAlgo::TensorCore, ..*o };
            let f = super::attention(&cast(q, DType::F32)?, &cast(k, DType::F32)?, &cast(v, DType::F32)?, &wide)?;
            Ok(AttnForward { o: cast(&f.o, DType::BF16)?, lse: f.lse, probs: f.probs })
        }
    }
}

/// Gradients of Σ d_out · attention_bf16(q, k, v) from the forward's bf16 output and f32
/// logsumexp and a bf16 d_out [B,Tq,E]: dq, dk, dv bf16, dw [B,S] f32 under a condition.
pub fn attention_backward_bf16(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    fwd: &AttnForward,
    d_out: &Tensor,
    o: &AttnOpts,
) -> Result<AttnGrads> {
    let sh = shape_of(q, k, v, o, DType::BF16)?;
    q.same_device(OP, &[&fwd.o, &fwd.lse, d_out])?;
    fwd.o.expect_dtype(OP, DType::BF16)?;
    d_out.expect_dtype(OP, DType::BF16)?;
    fwd.lse.expect_dtype(OP, DType::F32)?;
    check_backward_shapes(q, fwd, d_out, &sh)?;
    let dev = q.device();
    let weights = o.condition.weights();
    let aligned = [q, k, v, &fwd.o, d_out].iter().all(|t| t.dev_ptr().is_multiple_of(16));
    let pipelined = pipelined(sh.dh, sh.b * sh.h, false);
    match dev {
        Device::Cpu if pipelined => {
            // the GPU path's delta and per-head dw, counted
            let _delta = Mirrored::new(dev.kind(), (sh.b * sh.h * sh.tq * 4) as u64);
            let _dw_heads = weights.map(|_| Mirrored::new(dev.kind(), (sh.b * sh.h * sh.s * 4) as u64));
            let pr = cpu_problem(sh, o)?;
            let g = cpu::backward(
                &widened(q, OP)?,
                &widened(k, OP)?,
                &widened(v, OP)?,
                &widened(&fwd.o, OP)?,
                fwd.lse.cpu_f32(OP)?,
                &widened(d_out, OP)?,
                &pr,
            );
            Ok(AttnGrads {
                dq: bf16_tensor(&g.dq, q.shape(), dev)?,
                dk: bf16_tensor(&g.dk, k.shape(), dev)?,
                dv: bf16_tensor(&g.dv, v.shape(), dev)?,
                dw: g.dw.map(|w| Tensor::from_vec(w, &[sh.b, sh.s], dev)).transpose()?,
            })
        }
        _ if pipelined && aligned => {
            let g = geometry(Kind::Bf16, sh.dh as u32, sh.tq, sh.s);
            let kernels = BwdKernels {
                delta: Kernel::attention_delta_bwd_bf16,
                dq: (Kernel::attention_pipe_dq_bwd_bf16, g.dq),
                dkdv: (Kernel::attention_pipe_dkdv_bwd_bf16, g.dkdv),
                grad: DType::BF16,
            };
            // SAFETY: q, k, v, o and d_out are bf16 of the checked shapes, lse f32 [B,H,Tq]; dh
            // is the pipelined kernels' tile width (16, 32, 64 or 128, so E is a multiple of 8)
            // and the bases are 16-byte aligned: every 16-byte chunk they copy is whole.
            unsafe { backward_on_device(q, k, v, fwd, d_out, o, &sh, kernels) }
        }
        _ => {
            let wide = AttnOpts { algo: GemmAlgo::TensorCore, ..*o };
            let f32 = |t: &Tensor| cast(t, DType::F32);
            let wf = AttnForward { o: f32(&fwd.o)?, lse: fwd.lse.clone(), probs: None };
            let g = super::attention_backward(&f32(q)?, &f32(k)?, &f32(v)?, &wf, &f32(d_out)?, &wide)?;
            let bf16 = |t: &Tensor| cast(t, DType::BF16);
            Ok(AttnGrads { dq: bf16(&g.dq)?, dk: bf16(&g.dk)?, dv: bf16(&g.dv)?, dw: g.dw })
        }
    }
}
