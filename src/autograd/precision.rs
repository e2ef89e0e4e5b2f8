//! Autocast: the precision a graph runs its heavy ops at, and the one place that says which ops
//! those are (the README's autocast table is this file in words).
//!
//! * `F32`: every op in exact f32 (FMA kernels on cuda/emu). The reference numerics.
//! * `Tf32`: Linear, the convolutions, the PLAM gate's convolutions and the attention's inner
//!   products on the tf32 tensor-core kernels (operands rounded to 10-bit mantissas, f32
//!   accumulation), as PyTorch's `allow_tf32`. The cpu has no tf32: there it is `F32`.
//! * `Bf16`: the autocast ops (Linear, conv2d, the fused-concat conv2d, conv1d and the fused
//!   attention) read bf16 operands (activations, weights and biases rounded to bf16 once, as a
//!   bf16 tensor stores them) and store bf16 outputs; their products are exact in f32 and summed
//!   in f32 (the tensor-core kernels on cuda/emu, f32 GEMMs on cpu), so every device computes
//!   the same function up to the order of f32 sums. Batch norm and the PLAM gate compute in f32
//!   (statistics included) and store bf16 outputs (the gate's backward also bf16 dA and dM, the
//!   gradients of its bf16 convolution outputs); ReLU, pooling and upsampling of a bf16 value
//!   store bf16 too (exact). A stored bf16 value is a bf16 tensor: an f32 op widens it as it
//!   reads it, a backward keeps it as is. The gradients flowing into and out of bf16 values are
//!   bf16 tensors too (rounded where the tape stores them). Everything else stays f32, as in
//!   PyTorch's autocast: layer norm and the residual adds (a post-LN transformer's residual
//!   stream stored in bf16 averaged 0.015 lower test Dice and a 0.05 smaller note gap over the
//!   quickstart's two seeds, within seed-to-seed noise: BENCHMARKS.md), dropout, softmax and the attention's statistics and condition weights,
//!   the other elementwise ops, the embedding, the losses and every reduction, and the
//!   optimiser: master weights, their gradients and Adam's moments.

use crate::error::{Error, Result};
use crate::ops::gemm::GemmAlgo;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Precision {
    #[default]
    F32,
    Tf32,
    Bf16,
}

impl Precision {
    pub const ALL: [Precision; 3] = [Precision::F32, Precision::Tf32, Precision::Bf16];

    pub fn name(self) -> &'static str {
        match self {
            Precision::F32 => "f32",
            Precision::Tf32 => "tf32",
            Precision::Bf16 => "bf16",
        }
    }

    pub fn parse(s: &str) -> Result<Precision> {
        Self::ALL
            .into_iter()
            .find(|p| p.name() == s)
            .ok_or_else(|| Error::Config(format!("precision `{s}`: expected f32, tf32 or bf16")))
    }

    /// The GEMM-like kernels' algorithm: tensor cores at tf32 and bf16 (bf16 operands are exact
    /// in tf32, so the tf32 mma computes the bf16 products exactly), exact FMA at f32.
    pub fn algo(self) -> GemmAlgo {
        match self {
            Precision::F32 => GemmAlgo::Auto,
            Precision::Tf32 | Precision::Bf16 => GemmAlgo::TensorCore,
        }
    }
}

impl std::fmt::Display for Precision {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}
