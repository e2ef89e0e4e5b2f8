//! Named parameters and buffers of a model, in registration order, under the official
//! `state_dict` key names (so checkpoints load by name). Modules hold `ParamId`s into the store.

use crate::device::Device;
use crate::error::{Error, Result};
use crate::tensor::Tensor;
use std::collections::HashMap;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ParamId(pub usize);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// Learned; `trainable` = false when frozen (the CLIP text tower).
    Param { trainable: bool },
    /// Batch-norm running statistics (f32).
    Buffer,
}

pub struct Params {
    device: Device,
    names: Vec<String>,
    /// Each tensor's shape as registered (a declared tensor's value is empty until loaded).
    shapes: Vec<Vec<usize>>,
    values: Vec<Tensor>,
    kinds: Vec<Kind>,
    index: HashMap<String, ParamId>,
    /// Batch norms' `num_batches_tracked` (int64 in checkpoints), by key.
    counters: Vec<(String, i64)>,
    /// Each value's bf16 copy, made the first time an evaluation graph at bf16 reads it and
    /// dropped when the value is replaced or a training graph reads it (`bf16_copy`).
    #[cfg(feature = "autocast")]
    bf16: Vec<std::sync::Mutex<Option<Tensor>>>,
}

impl Params {
    pub fn new(device: &Device) -> Params {
        Params {
            device: device.clone(),
            names: Vec::new(),
            shapes: Vec::new(),
            values: Vec::new(),
            kinds: Vec::new(),
            index: HashMap::new(),
            counters: Vec::new(),
            #[cfg(feature = "autocast")]
            bf16: Vec::new(),
        }
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Registers a tensor (values on the host, moved to the store's device).
    pub fn add(&mut self, name: &str, shape: &[usize], values: Vec<f32>, kind: Kind) -> Result<ParamId> {
        let t = Tensor::from_vec(values, shape, &self.device)?;
        self.register(name, shape, t, kind)
    }

    /// Registers a tensor without allocating it: its value is empty (any op refuses it by shape)
    /// until a checkpoint sets it. Loading for inference declares every tensor, so that what the
    /// checkpoint does not hold (the training-only reconstruction) never takes memory or time.
    pub fn declare(&mut self, name: &str, shape: &[usize], kind: Kind) -> Result<ParamId> {
        let t = Tensor::from_vec(vec![], &[0], &self.device)?;
        self.register(name, shape, t, kind)
    }

    /// Whether a tensor holds values (registered with `add`, or declared and since set).
    pub fn is_set(&self, p: ParamId) -> bool {
        self.values[p.0].shape() == self.shapes[p.0].as_slice()
    }

    /// The registered shape.
    pub fn shape(&self, p: ParamId) -> &[usize] {
        &self.shapes[p.0]
    }

    fn register(&mut self, name: &str, shape: &[usize], t: Tensor, kind: Kind) -> Result<ParamId> {
        if self.index.contains_key(name) {
            return Err(Error::shape("params", format!("{name} registered twice")));
        }
        let id = ParamId(self.values.len());
        self.values.push(t);
        #[cfg(feature = "autocast")]
        self.bf16.push(std::sync::Mutex::new(None));
        self.shapes.push(shape.to_vec());
        self.names.push(name.to_string());
        self.kinds.push(kind);
        self.index.insert(name.to_string(), id);
        Ok(id)
    }

    pub fn add_counter(&mut self, name: &str) {
        self.counters.push((name.to_string(), 0));
    }
    pub fn counters(&self) -> &[(String, i64)] {
        &self.counters
    }
    pub fn set_counter(&mut self, name: &str, v: i64) -> bool {
        match self.counters.iter_mut().find(|(n, _)| n == name) {
            Some(c) => {
                c.1 = v;
                true
            }
            None => false,
        }
    }
    /// One training forward: every batch norm counted one more batch.
    pub fn bump_counters(&mut self) {
        for c in &mut self.counters {
            c.1 += 1;
        }
    }

    pub fn len(&self) -> usize {
        self.values.len()
    }
    pub fn is_empty(&self) -> bool {
        self.values.is_empty()
    }
    pub fn ids(&self) -> impl Iterator<Item = ParamId> {
        (0..self.values.len()).map(ParamId)
    }
    pub fn id(&self, name: &str) -> Option<ParamId> {
        self.index.get(name).copied()
    }
    pub fn name(&self, p: ParamId) -> &str {
        &self.names[p.0]
    }
    pub fn kind(&self, p: ParamId) -> Kind {
        self.kinds[p.0]
    }
    pub fn value(&self, p: ParamId) -> &Tensor {
        &self.values[p.0]
    }
    /// A buffer (batch-norm running statistics): updated by training forwards, not the optimiser.
    pub fn is_buffer(&self, p: ParamId) -> bool {
        matches!(self.kinds[p.0], Kind::Buffer)
    }
    pub fn trainable(&self, p: ParamId) -> bool {
        matches!(self.kinds[p.0], Kind::Param { trainable: true })
    }

    /// Replaces a value; the shape must be the registered one.
    pub fn set(&mut self, p: ParamId, t: Tensor) -> Result<()> {
        if t.shape() != self.shapes[p.0].as_slice() {
            return Err(Error::shape(
                "params",
                format!("{}: new value {:?}, expected {:?}", self.names[p.0], t.shape(), self.shapes[p.0]),
            ));
        }
        self.values[p.0] = t.to_device(&self.device)?;
        #[cfg(feature = "autocast")]
        self.drop_bf16_copy(p);
        Ok(())
    }

    /// The value rounded to bf16, made once and kept until the value is replaced: an
    /// evaluation graph at bf16 reads its weights' copies as PyTorch's autocast caches the casts
    /// of its weights, instead of rounding every weight on every call (and, on the cpu, the
    /// Winograd transform of a convolution's weights, cached per weight tensor, is then made once
    /// too). Costs half the f32 values' memory while kept. A training graph does not use it (the
    /// optimiser replaces every value each step) and lets it go (`drop_bf16_copy`), so that the
    /// copies an evaluation made do not sit through the next training step.
    #[cfg(feature = "autocast")]
    pub fn bf16_copy(&self, p: ParamId) -> Result<Tensor> {
        // a poisoned lock only means another thread panicked mid-update: the slot is still valid
        let mut slot = self.bf16[p.0].lock().unwrap_or_else(|e| e.into_inner());
        if let Some(t) = &*slot {
            return Ok(t.clone());
        }
        let t = crate::ops::cast::cast(&self.values[p.0], crate::tensor::DType::BF16)?;
        *slot = Some(t.clone());
        Ok(t)
    }

    /// Lets the kept bf16 copy of a value go (a training graph reads the value).
    #[cfg(feature = "autocast")]
    pub(crate) fn drop_bf16_copy(&self, p: ParamId) {
        self.bf16[p.0].lock().unwrap_or_else(|e| e.into_inner()).take();
    }

    /// Freezes or unfreezes every parameter whose name starts with `prefix`.
    pub fn set_trainable(&mut self, prefix: &str, trainable: bool) {
        for (n, k) in self.names.iter().zip(&mut self.kinds) {
            if n.starts_with(prefix) {
                if let Kind::Param { .. } = k {
                    *k = Kind::Param { trainable };
                }
            }
        }
    }

    /// Element counts: (trainable, frozen, buffers incl. counters).
    pub fn counts(&self) -> (usize, usize, usize) {
        let (mut t, mut f, mut b) = (0, 0, self.counters.len());
        for (v, k) in self.values.iter().zip(&self.kinds) {
            match k {
                Kind::Param { trainable: true } => t += v.numel(),
                Kind::Param { trainable: false } => f += v.numel(),
                Kind::Buffer => b += v.numel(),
            }
        }
        (t, f, b)
    }
}
