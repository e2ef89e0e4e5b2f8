//! The fused attention's forward on bf16 q, k, v (bf16 autocast): bf16 output, f32 logits,
//! softmax statistics and logsumexp.
//!
//! cuda / emu: `attention_pipe_fwd_bf16` (kernels/attention.cu on pipe_gemm.cuh's building
//! blocks: cp.async double-buffered K/V tiles, ldmatrix, mma.sync m16n8k16, P rounded to bf16 for
//! the P·V product as FlashAttention does) where the head dim is 16, 32, 64 or 128 and every row
//! of q, k, v is whole, aligned 16-byte chunks; the f32 kernel on widened copies otherwise (and
//! for the probabilities on request). cpu: the f32 forward of widened plain buffers, the output
//! rounded once. The backward is the f32 one on widened copies (`attention_backward`): it needs
//! only the logsumexp, which is f32 here too.

use super::{bh_grid, cpu, cpu_problem, params, shape_of, AttnForward, AttnOpts, OP};
use crate::device::{Device, LaunchCfg};
use crate::error::Result;
use crate::kernels::Kernel;
use crate::ops::cast::cast;
use crate::ops::gemm::{cpu::widened, GemmAlgo};
use crate::tensor::{DType, Tensor};

/// Query rows per block of the pipelined kernel (4 warps of 16).
const PIPE_ROWS: u32 = 64;

/// Its dynamic shared memory at head dim `dh`: the 64-row Q tile and two stages of 32-key K and
/// V tiles, bf16 (attn_pipe_smem in kernels/attention.cu).
pub const fn pipe_smem(dh: u32) -> u32 {
    (64 * dh + 2 * 2 * 32 * dh) * 2
}

/// The forward on bf16 q [B,Tq,E], k and v [B,S,E]: o [B,Tq,E] bf16, lse [B,H,Tq] f32 (and f32
/// probabilities when asked for).
pub fn attention_bf16(q: &Tensor, k: &Tensor, v: &Tensor, o: &AttnOpts) -> Result<AttnForward> {
    let sh = shape_of(q, k, v, o, DType::BF16)?;
    let dev = q.device();
    let aligned = [q, k, v].iter().all(|t| t.dev_ptr().is_multiple_of(16));
    let pipelined = matches!(sh.dh, 16 | 32 | 64 | 128) && !o.want_probs && sh.b * sh.h <= 65535;
    // (the cpu follows the GPU's choice by shape, so that both hold the same tensors)
    match dev {
        Device::Cpu if pipelined => {
            let pr = cpu_problem(sh, o)?;
            let f = cpu::forward(&widened(q, OP)?, &widened(k, OP)?, &widened(v, OP)?, &pr, o.want_probs);
            Ok(AttnForward {
                o: crate::ops::gemm::cpu::bf16_tensor(&f.o, q.shape(), dev)?,
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
                let dh = sh.dh as u32;
                let cfg =
                    LaunchCfg { grid: bh_grid(&sh, sh.tq, PIPE_ROWS)?, block: (128, 1, 1), smem_bytes: pipe_smem(dh) };
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
