//! The official training recipes (`train --recipe qata|mosmed`): every value the official
//! configuration files set for each dataset (ShawnHuang497/RecLMIS @ 00a7385, `Config_covid19.py`
//! and `Config_MosMedPlus.py`; the optimiser and schedules from `train_model.py`). Explicit flags
//! override them; the README's recipe table lists the same values.

use crate::error::{Error, Result};
use crate::model::Config;
use crate::optim::schedule::Schedule;

/// Model settings a run may change from its preset (recorded in every checkpoint's configuration).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ModelOptions {
    /// K: layers per reconstruction stack (`rec_trans_num_layers1`).
    pub rec_layers: Option<usize>,
    pub img_mask_rate: Option<f64>,
    pub text_mask_rate: Option<f64>,
    /// Dropout on the scoring MLPs' inputs (`config.dropout` / `dropout_value`).
    pub score_dropout: Option<f32>,
    /// criterion, CCL, text reconstruction, image reconstruction (0 removes a term: the
    /// ablations without CCL, CLR or CVR).
    pub loss_weights: Option<[f32; 4]>,
    /// Masks drawn uniformly instead of from W (ablation).
    pub random_masking: Option<bool>,
    /// The paper's reading of the condition, on the logits (ablation of the official code's).
    pub condition_on_logits: Option<bool>,
    /// Bidirectional instead of causal reconstruction attention (ablation).
    pub bidirectional_reconstruction: Option<bool>,
    /// The paper's W-weighted reconstruction losses.
    pub weighted_reconstruction: Option<bool>,
    /// Uniform W instead of the scored ones (the ablation without the conditioned interaction).
    pub no_condition: Option<bool>,
}

impl ModelOptions {
    pub fn apply(&self, c: &mut Config) {
        if let Some(k) = self.rec_layers {
            c.rec_layers = k;
        }
        if let Some(r) = self.img_mask_rate {
            c.img_mask_rate = r;
        }
        if let Some(r) = self.text_mask_rate {
            c.text_mask_rate = r;
        }
        if let Some(p) = self.score_dropout {
            c.score_dropout = p;
        }
        if let Some(w) = self.loss_weights {
            c.loss_weights = w;
        }
        if let Some(b) = self.random_masking {
            c.random_masking = b;
        }
        if let Some(b) = self.condition_on_logits {
            c.condition_on_logits = b;
        }
        if let Some(b) = self.bidirectional_reconstruction {
            c.bidirectional_reconstruction = b;
        }
        if let Some(b) = self.weighted_reconstruction {
            c.weighted_reconstruction = b;
        }
        if let Some(b) = self.no_condition {
            c.no_condition = b;
        }
    }

    /// `self` with every value `over` sets replaced.
    pub fn overridden_by(&self, over: &ModelOptions) -> ModelOptions {
        ModelOptions {
            rec_layers: over.rec_layers.or(self.rec_layers),
            img_mask_rate: over.img_mask_rate.or(self.img_mask_rate),
            text_mask_rate: over.text_mask_rate.or(self.text_mask_rate),
            score_dropout: over.score_dropout.or(self.score_dropout),
            loss_weights: over.loss_weights.or(self.loss_weights),
            random_masking: over.random_masking.or(self.random_masking),
            condition_on_logits: over.condition_on_logits.or(self.condition_on_logits),
            bidirectional_reconstruction: over.bidirectional_reconstruction.or(self.bidirectional_reconstruction),
            weighted_reconstruction: over.weighted_reconstruction.or(self.weighted_reconstruction),
            no_condition: over.no_condition.or(self.no_condition),
        }
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct Recipe {
    pub name: &'static str,
    pub preset: &'static str,
    pub batch: usize,
    pub epochs: usize,
    pub patience: usize,
    pub lr: f32,
    pub schedule: Schedule,
    pub seed: u64,
    pub model: ModelOptions,
}

impl Recipe {
    pub const NAMES: [&'static str; 2] = ["qata", "mosmed"];

    pub fn get(name: &str) -> Result<Recipe> {
        match name {
            // Config_covid19.py: epochs 2000, early_stopping_patience 100, learning_rate 3e-4,
            // batch_size 32, lr 'cosineLR', seed 3407, rec_trans_num_layers1 4, img_mask_rate 0.5,
            // text_mask_rate 0.3, dropout False; optimizer "Adam" (weight_decay only for AdamW)
            "qata" => Ok(Recipe {
                name: "qata",
                preset: "official",
                batch: 32,
                epochs: 2000,
                patience: 100,
                lr: 3e-4,
                schedule: Schedule::Restarts,
                seed: 3407,
                model: ModelOptions {
                    rec_layers: Some(4),
                    img_mask_rate: Some(0.5),
                    text_mask_rate: Some(0.3),
                    score_dropout: Some(0.0),
                    ..Default::default()
                },
            }),
            // Config_MosMedPlus.py: epochs 400, early_stopping_patience 30, learning_rate 3e-4,
            // batch_size 20, lr 'exp', seed 3407, rec_trans_num_layers1 3, img_mask_rate 0.3,
            // text_mask_rate 0.3, dropout True with dropout_value 0.5
            "mosmed" => Ok(Recipe {
                name: "mosmed",
                preset: "official",
                batch: 20,
                epochs: 400,
                patience: 30,
                lr: 3e-4,
                schedule: Schedule::Exp,
                seed: 3407,
                model: ModelOptions {
                    rec_layers: Some(3),
                    img_mask_rate: Some(0.3),
                    text_mask_rate: Some(0.3),
                    score_dropout: Some(0.5),
                    ..Default::default()
                },
            }),
            other => Err(Error::Config(format!("--recipe {other:?}: one of {:?}", Self::NAMES))),
        }
    }
}
