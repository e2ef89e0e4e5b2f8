//! One training step: the training forward on a recording graph, backward from the total loss,
//! optional clipping, Adam over the trainable parameters, and the batch-norm running statistics.

use super::{Batch, MaskIndices, RecLmis};
use crate::autograd::Graph;
use crate::error::{Error, Result};
use crate::nn::params::ParamId;
use crate::optim::{clip_grad_norm, Adam, AdamConfig};
use crate::rng::Rng;
use std::collections::BTreeMap;
use std::time::Instant;

pub struct Trainer {
    pub model: RecLmis,
    pub adam: Adam,
    trainable: Vec<ParamId>,
    /// Clip the global gradient norm to this (None: no clipping, as the official recipe).
    pub clip: Option<f32>,
    /// Seconds spent by the last step in (forward, backward, optimiser).
    pub last_times: [f64; 3],
    /// Global L2 norm of the last step's gradients (before clipping).
    pub last_grad_norm: f32,
}

impl Trainer {
    pub fn new(model: RecLmis, cfg: AdamConfig) -> Trainer {
        let trainable: Vec<ParamId> = model.params.ids().filter(|&id| model.params.trainable(id)).collect();
        let adam = Adam::new(cfg, trainable.len());
        Trainer { model, adam, trainable, clip: None, last_times: [0.0; 3], last_grad_norm: 0.0 }
    }

    /// One step; returns the loss terms (before the update).
    pub fn step(
        &mut self,
        batch: &Batch,
        masks: Option<MaskIndices>,
        rng: &mut Rng,
    ) -> Result<BTreeMap<&'static str, f32>> {
        let t0 = Instant::now();
        let g = Graph::train().with_dropout_seed(rng.next_u64());
        let out = self.model.forward_train(&g, batch, masks, rng)?;
        // the recorded intermediates would keep every activation alive through the backward
        let (total, losses) = (out.total, out.losses);
        drop(out.record);
        let t1 = Instant::now();
        let grads = g.backward(&total, self.model.params.len())?;
        drop(total);
        let t2 = Instant::now();
        let mut gs: Vec<_> = self.trainable.iter().map(|&id| grads.get(id).cloned()).collect();
        drop(grads);
        // nothing is updated from a non-finite loss or gradient: the weights stay as they were
        if let Some((k, v)) = losses.iter().find(|(_, v)| !v.is_finite()) {
            return Err(Error::NonFinite(format!("loss term {k} is {v}")));
        }
        let norm = crate::optim::grad_norm(&gs)?;
        if !norm.is_finite() {
            return Err(Error::NonFinite(format!("gradient norm is {norm}")));
        }
        self.last_grad_norm = norm;
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
        let t3 = Instant::now();
        self.last_times = [(t1 - t0).as_secs_f64(), (t2 - t1).as_secs_f64(), (t3 - t2).as_secs_f64()];
        Ok(losses)
    }
}
