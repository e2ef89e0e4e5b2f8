//! One training step: the training forward on a recording graph, backward from the total loss,
//! optional clipping, Adam over the trainable parameters, and the batch-norm running statistics.
//!
//! A step may gather its gradient over several micro-batches (`accumulate` N times, then
//! `apply`), as PyTorch's `loss * w; loss.backward()` loop does: each micro-batch's gradient is
//! weighted by its share of the step's samples, so for a loss that is a mean over samples the
//! sum equals the gradient of one batch N times larger up to rounding. Batch norm sees each
//! micro-batch alone (its batch statistics, one running-statistics update and one
//! `num_batches_tracked` per micro-batch), exactly as PyTorch computes it.

use super::{Batch, MaskIndices, RecLmis};

use crate::error::{Error, Result};
use crate::nn::params::ParamId;
use crate::ops::elementwise;
use crate::optim::{clip_factor, clip_to, Adam, AdamConfig};
use crate::rng::Rng;
use crate::tensor::Tensor;
use std::collections::BTreeMap;
use std::time::Instant;

pub struct Trainer {
    pub model: RecLmis,
    pub adam: Adam,
    trainable: Vec<ParamId>,
    /// Clip the global gradient norm to this (None: no clipping, as the official recipe).
    pub clip: Option<f32>,
    /// Seconds spent by the last step in (forward, backward, optimiser), summed over its
    /// micro-batches.
    pub last_times: [f64; 3],
    /// Global L2 norm of the last step's gradients (before clipping).
    pub last_grad_norm: f32,
    /// The step being gathered (None between steps).
    pending: Option<Pending>,
}

/// A step's micro-batches so far.
struct Pending {
    /// Weighted gradient sums, one per trainable parameter (None: no gradient yet).
    grads: Vec<Option<Tensor>>,
    /// Weighted sums of the loss terms.
    losses: BTreeMap<&'static str, f32>,
    /// The buffers (running statistics, counters) as they were before the step: a failed
    /// micro-batch puts them back, so nothing changes from a step that does not complete.
    buffers_before: Vec<(ParamId, Tensor)>,
    counters_before: Vec<(String, i64)>,
    /// Forward and backward seconds.
    times: [f64; 2],
}

impl Trainer {
    pub fn new(model: RecLmis, cfg: AdamConfig) -> Trainer {
        let trainable: Vec<ParamId> = model.params.ids().filter(|&id| model.params.trainable(id)).collect();
        let adam = Adam::new(cfg, trainable.len());
        Trainer { model, adam, trainable, clip: None, last_times: [0.0; 3], last_grad_norm: 0.0, pending: None }
    }

    /// Whether `clip` scaled the last step's gradients down.
    pub fn last_clipped(&self) -> bool {
        self.clip.is_some_and(|c| clip_factor(self.last_grad_norm, c).is_some())
    }

    /// One step on one batch; returns the loss terms (before the update).
    pub fn step(
        &mut self,
        batch: &Batch,
        masks: Option<MaskIndices>,
        rng: &mut Rng,
    ) -> Result<BTreeMap<&'static str, f32>> {
        self.accumulate(batch, masks, rng, 1.0)?;
        self.apply()
    }

    /// Forward and backward of one micro-batch; its gradient, times `weight` (its share of the
    /// step's samples: its batch size over the step's), is added to the step's. Returns this
    /// micro-batch's loss terms. On an error the step is dropped and the buffers are restored.
    pub fn accumulate(
        &mut self,
        batch: &Batch,
        masks: Option<MaskIndices>,
        rng: &mut Rng,
        weight: f32,
    ) -> Result<BTreeMap<&'static str, f32>> {
        if !(weight.is_finite() && weight > 0.0) {
            return Err(Error::Config(format!("micro-batch weight {weight}: must be a number > 0")));
        }
        if self.pending.is_none() {
            let params = &self.model.params;
            let buffers_before =
                params.ids().filter(|&id| params.is_buffer(id)).map(|id| (id, params.value(id).clone())).collect();
            self.pending = Some(Pending {
                grads: vec![None; self.trainable.len()],
                losses: BTreeMap::new(),
                buffers_before,
                counters_before: params.counters().to_vec(),
                times: [0.0; 2],
            });
        }
        match self.micro_batch(batch, masks, rng, weight) {
            Ok(l) => Ok(l),
            Err(e) => {
                self.discard();
                Err(e)
            }
        }
    }

    fn micro_batch(
        &mut self,
        batch: &Batch,
        masks: Option<MaskIndices>,
        rng: &mut Rng,
        weight: f32,
    ) -> Result<BTreeMap<&'static str, f32>> {
        let t0 = Instant::now();
        let g = self.model.train_graph()?.with_dropout_seed(rng.next_u64());
        let out = self.model.forward_train(&g, batch, masks, rng)?;
        // the recorded intermediates would keep every activation alive through the backward
        let (total, losses) = (out.total, out.losses);
        drop(out.record);
        // nothing is updated from a non-finite loss: checked before the backward's work
        if let Some((k, v)) = losses.iter().find(|(_, v)| !v.is_finite()) {
            return Err(Error::NonFinite(format!("loss term {k} is {v}")));
        }
        let t1 = Instant::now();
        crate::autograd::count::at("backward");
        let grads = g.backward(&total, self.model.params.len())?;
        drop(total);
        let pending = self.pending.as_mut().ok_or_else(|| Error::Other("no step being gathered".into()))?;
        for (acc, &id) in pending.grads.iter_mut().zip(&self.trainable) {
            let Some(gi) = grads.get(id) else { continue };
            // weight 1 (a step of one micro-batch) keeps the gradient bit for bit
            let gi = if weight == 1.0 { gi.clone() } else { elementwise::scale(gi, weight)? };
            *acc = Some(match acc.take() {
                Some(a) => elementwise::add(&a, &gi)?,
                None => gi,
            });
        }
        drop(grads);
        for (k, v) in &losses {
            *pending.losses.entry(k).or_default() += weight * v;
        }
        // the next micro-batch's running statistics continue from this one's, as in PyTorch
        for (id, t) in g.take_buffer_updates() {
            self.model.params.set(id, t)?;
        }
        self.model.params.bump_counters();
        pending.times[0] += (t1 - t0).as_secs_f64();
        pending.times[1] += t1.elapsed().as_secs_f64();
        Ok(losses)
    }

    /// The gradient gathered so far for the step being gathered (trainable parameters that got
    /// one), before clipping.
    pub fn gathered(&self) -> Vec<(ParamId, &Tensor)> {
        let Some(p) = &self.pending else { return vec![] };
        self.trainable.iter().zip(&p.grads).filter_map(|(&id, g)| g.as_ref().map(|g| (id, g))).collect()
    }

    /// Drops the step being gathered and puts the buffers back as they were before it.
    pub fn discard(&mut self) {
        if let Some(p) = self.pending.take() {
            for (id, t) in p.buffers_before {
                // the same shapes on the same device: cannot fail
                let _ = self.model.params.set(id, t);
            }
            for (name, v) in p.counters_before {
                self.model.params.set_counter(&name, v);
            }
        }
    }

    /// The optimiser step from the gathered gradient; returns the step's loss terms (the
    /// micro-batches' weighted sum).
    pub fn apply(&mut self) -> Result<BTreeMap<&'static str, f32>> {
        let p = self.pending.as_ref().ok_or_else(|| Error::Other("apply: no micro-batch was accumulated".into()))?;
        let t2 = Instant::now();
        crate::autograd::count::at("optimizer");
        let mut gs = p.grads.clone();
        let norm = crate::optim::grad_norm(&gs).inspect_err(|_| self.discard())?;
        if !norm.is_finite() {
            self.discard();
            return Err(Error::NonFinite(format!("gradient norm is {norm}")));
        }
        self.last_grad_norm = norm;
        // the norm just measured: clipping does not sum the squares a second time
        if let Some(c) = self.clip {
            clip_to(&mut gs, norm, c)?;
        }
        let values: Vec<_> = self.trainable.iter().map(|&id| self.model.params.value(id)).collect();
        let updated = self.adam.step(&values, &gs)?;
        for (&id, t) in self.trainable.iter().zip(updated) {
            if let Some(t) = t {
                self.model.params.set(id, t)?;
            }
        }
        let p = self.pending.take().ok_or_else(|| Error::Other("the step vanished".into()))?;
        self.last_times = [p.times[0], p.times[1], t2.elapsed().as_secs_f64()];
        Ok(p.losses)
    }
}
