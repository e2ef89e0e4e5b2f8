//! Activations a backward closure keeps. At bf16 autocast the values autocast stores are bf16
//! tensors (`Var::bf16`): keeping one costs half the bytes of f32 and no copy, and the backward
//! widens it to f32 when it runs. PLAM's a and m, bf16 values the gate's f32 math holds in f32,
//! are packed to bf16 as they are kept (`Graph::save`). A weight's bf16 copy is not kept at all:
//! the backward rounds the f32 master weight again (alive anyway until the optimiser's step).

use crate::error::Result;
use crate::tensor::{DType, Tensor};

pub(crate) enum Saved {
    Kept(Tensor),
    /// bf16(master), made again when the backward reads it.
    #[cfg_attr(not(feature = "autocast"), allow(dead_code))]
    Rounded(Tensor),
}

impl Saved {
    pub(crate) fn new(t: Tensor) -> Saved {
        Saved::Kept(t)
    }

    /// The saved value in f32, the saved handle given up: nothing else of the closure's refers
    /// to it (an op may write it in place when no one else does).
    pub(crate) fn take(self) -> Result<Tensor> {
        self.get()
    }

    /// The saved value as kept: bf16 for a bf16 value (for a kernel that reads bf16 itself).
    pub(crate) fn stored(&self) -> Result<Tensor> {
        match self {
            Saved::Kept(t) => Ok(t.clone()),
            Saved::Rounded(m) => crate::ops::cast::cast(m, DType::BF16),
        }
    }

    /// The saved value in f32.
    pub(crate) fn get(&self) -> Result<Tensor> {
        match self {
            Saved::Kept(t) => widen(t),
            Saved::Rounded(m) => widen(&crate::ops::cast::cast(m, DType::BF16)?),
        }
    }
}

/// `t` in f32: a bf16 tensor widened (a new tensor, exact), an f32 one as is (no copy). A build
/// without autocast stores no bf16 value: there a half tensor reaches the op, which refuses it
/// by name (and reclmis-infer carries no cast).
pub(crate) fn widen(t: &Tensor) -> Result<Tensor> {
    #[cfg(feature = "autocast")]
    if t.dtype() == DType::BF16 {
        return crate::ops::cast::cast(t, DType::F32);
    }
    Ok(t.clone())
}
