//! One training step: the training forward on a recording graph, backward from the total loss,
//! optional clipping, Adam over the trainable parameters, and the batch-norm running statistics.

use super::{Batch, MaskIndices, RecLmis};
use crate::autograd::Graph;
use crate::error::Result;
use crate::nn::params::ParamId;
use crate::optim::{clip_grad_norm, Adam, AdamConfig};
use crate::testing::Rng;
use std::collections::BTreeMap;

pub struct Trainer {
    pub model: RecLmis,
    pub adam: Adam,
    trainable: Vec<ParamId>,
    /// Clip the global gradient norm to this (None: no clipping, as the official recipe).
    pub clip: Option<f32>,
}

impl Trainer {
    pub fn new(model: RecLmis, cfg: AdamConfig) -> Trainer {
        let trainable: Vec<ParamId> = model.params.ids().filter(|&id| model.params.trainable(id)).collect();
        let adam = Adam::new(cfg, trainable.len());
        Trainer { model, adam, trainable, clip: None }
    }

    /// One step; returns the loss terms (before the update).
    pub fn step(
        &mut self,
        batch: &Batch,
        masks: Option<MaskIndices>,
        rng: &mut Rng,
    ) -> Result<BTreeMap<&'static str, f32>> {
        let g = Graph::train();
        let out = self.model.forward_train(&g, batch, masks, rng)?;
        let grads = g.backward(&out.total, self.model.params.len())?;
        drop(out.record);
        let mut gs: Vec<_> = self.trainable.iter().map(|&id| grads.get(id).cloned()).collect();
        drop(grads);
        if let Some(c) = self.clip {
            clip_grad_norm(&mut gs, c)?;
        }
        let values: Vec<_> = self.trainable.iter().map(|&id| self.model.params.value(id)).collect();
        let updated = self.adam.step(&values, &gs)?;
        for (&id, t) in self.trainable.iter().zip(updated) {
            if let Some(t) = t {
                self.model.params.set(id, t)?;
            }
        }
        for (id, t) in g.take_buffer_updates() {
            self.model.params.set(id, t)?;
        }
        self.model.params.bump_counters();
        Ok(out.losses)
    }
}
