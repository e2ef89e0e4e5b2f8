//! Activations a backward closure keeps. At bf16 autocast a value that bf16 autocast rounded
//! (`Var::bf16`) is kept as a bf16 tensor, half the bytes and no information lost, and widened
//! back to f32 when the backward runs: the memory a bf16 training step saves on its
//! activations, with the f32 kernels. One tensor saved by several closures (a batch norm's output
//! is also the next convolution's input) is packed once.

use crate::error::Result;
use crate::tensor::{DType, Storage, Tensor};
use std::collections::HashMap;
use std::sync::Weak;

pub(crate) enum Saved {
    Full(Tensor),
    /// A bf16 copy of an f32 tensor whose values are all bf16 numbers.
    #[cfg_attr(not(feature = "autocast"), allow(dead_code))]
    Packed(Tensor),
}

impl Saved {
    /// The saved value in f32.
    pub(crate) fn get(&self) -> Result<Tensor> {
        match self {
            Saved::Full(t) => Ok(t.clone()),
            Saved::Packed(h) => crate::ops::cast::cast(h, DType::F32),
        }
    }
}

/// Packed copies by the f32 storage they copy. The key's `Weak` keeps the storage's address from
/// being reused by another tensor while the entry exists (it does not keep the data alive).
#[derive(Default)]
pub(crate) struct PackCache {
    by_storage: HashMap<usize, (Weak<Storage>, Tensor)>,
}

impl PackCache {
    /// The bf16 copy of `t` (an f32 tensor of bf16 values), made once per storage.
    #[cfg_attr(not(feature = "autocast"), allow(dead_code))]
    pub(crate) fn pack(&mut self, t: &Tensor) -> Result<Tensor> {
        let arc = t.storage_arc();
        let key = std::sync::Arc::as_ptr(arc) as usize;
        if let Some((w, h)) = self.by_storage.get(&key) {
            if w.upgrade().is_some_and(|a| std::sync::Arc::ptr_eq(&a, arc)) && h.numel() == t.numel() {
                return h.reshape(t.shape());
            }
        }
        let h = crate::ops::cast::cast(t, DType::BF16)?;
        self.by_storage.insert(key, (std::sync::Arc::downgrade(arc), h.clone()));
        Ok(h)
    }

    #[cfg_attr(not(feature = "autocast"), allow(dead_code))]
    pub(crate) fn clear(&mut self) {
        self.by_storage.clear();
    }
}
