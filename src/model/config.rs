//! Model configuration and presets. `official` is the published Covid19 configuration,
//! `tiny` the golden fixture's, `small` a width that trains in minutes on a cpu.

use crate::error::{Error, Result};

#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub name: String,
    /// Image height and width, multiples of 16.
    pub img_size: (usize, usize),
    pub in_channels: usize,
    /// inc, down1..down4 (down4 = d_model).
    pub unet_widths: [usize; 5],
    /// Interactor / text_module4 / MLPs / CVR-CLR width.
    pub d_model: usize,
    pub interactor_heads: usize,
    pub rec_heads: usize,
    pub rec_ffn: usize,
    /// K layers per stack (decoder1 and decoder2).
    pub rec_layers: usize,
    pub clip_width: usize,
    pub clip_layers: usize,
    pub clip_heads: usize,
    pub vocab_size: usize,
    pub context_length: usize,
    pub token_len: usize,
    pub img_mask_rate: f64,
    pub text_mask_rate: f64,
    /// criterion, ccl, text_rec, img_rec
    pub loss_weights: [f32; 4],
    /// Train the text tower (from scratch, with a tokenizer trained on the notes) instead of
    /// freezing it as the official training does.
    pub text_trainable: bool,
    /// Dropout in training (official 0.1): after the Interactor's position embedding and on each
    /// CVR/CLR sub-layer's output before its residual add. (The official code also drops 0.1 of
    /// the Interactor attentions' probabilities; the fused attention kernel does not do that yet.)
    pub dropout: f32,
    /// The paper's reading of the reconstruction attention (bidirectional) instead of the
    /// official code's causal self-attention.
    pub bidirectional_reconstruction: bool,
    /// The paper's reading of the condition (logits · w before the softmax) instead of the
    /// official code's (probabilities · (w + 1e-10), renormalised).
    pub condition_on_logits: bool,
    /// Dropout on the inputs of the W_poi / W_woi scoring MLPs in training (the official
    /// `config.dropout` / `dropout_value`: off for QaTa-COV19, 0.5 for MosMedData+).
    #[serde(default)]
    pub score_dropout: f32,
    /// The ablation of the paper's W-guided masking: reconstruction masks drawn uniformly
    /// instead of in proportion to W_poi / W_woi.
    #[serde(default)]
    pub random_masking: bool,
    /// The Interactor's position embedding starts as a 2-D sine-cosine table (each token's row
    /// and column) instead of the official zeros, so that text queries can tell the lung zones
    /// apart from the first step (the `small` preset; see README, text guidance).
    #[serde(default)]
    pub sincos_positions: bool,
    /// The paper's W-weighted reconstruction losses: each token's squared error is weighted by
    /// its W (W_woi for the text, W_poi for the image tokens, held constant in the backward)
    /// instead of the official code's plain mean over tokens.
    #[serde(default)]
    pub weighted_reconstruction: bool,
    /// The ablation without the conditioned interaction ("w/o CI"): W_poi and W_woi are uniform
    /// over the valid tokens instead of scored by the MLPs, so masks are drawn at random, the
    /// reconstructions attend unconditioned and the CCL pools evenly.
    #[serde(default)]
    pub no_condition: bool,
}

/// Limits on what a checkpoint's metadata may ask for (far above every published setting:
/// 224² images, CLIP's 49,408 tokens and 77 positions).
pub const MAX_IMAGE_SIDE: usize = 4096;
pub const MAX_VOCAB: usize = 1 << 20;
pub const MAX_CONTEXT: usize = 4096;
pub const MAX_WIDTH: usize = 8192;
pub const MAX_LAYERS: usize = 64;

impl Config {
    pub fn preset(name: &str) -> Result<Config> {
        let official = Config {
            name: "official".into(),
            img_size: (224, 224),
            in_channels: 3,
            unet_widths: [64, 128, 256, 512, 512],
            d_model: 512,
            interactor_heads: 4,
            rec_heads: 4,
            rec_ffn: 1024,
            rec_layers: 4,
            clip_width: 512,
            clip_layers: 12,
            clip_heads: 8,
            vocab_size: 49408,
            context_length: 77,
            token_len: 18,
            img_mask_rate: 0.5,
            text_mask_rate: 0.3,
            loss_weights: [5.0, 0.2, 1.0, 1.0],
            condition_on_logits: false,
            text_trainable: false,
            dropout: 0.1,
            bidirectional_reconstruction: false,
            score_dropout: 0.0,
            random_masking: false,
            sincos_positions: false,
            weighted_reconstruction: false,
            no_condition: false,
        };
        match name {
            "official" => Ok(official),
            "tiny" => Ok(Config {
                name: "tiny".into(),
                img_size: (64, 64),
                unet_widths: [8, 16, 32, 64, 64],
                d_model: 64,
                rec_ffn: 128,
                rec_layers: 2,
                clip_width: 64,
                clip_layers: 2,
                clip_heads: 2,
                ..official
            }),
            // trains in minutes on a cpu: narrow U-Net, one reconstruction layer per stack, and a
            // small text tower trained from scratch with a word-level tokenizer (vocab set from it)
            "small" => Ok(Config {
                name: "small".into(),
                img_size: (96, 96),
                unet_widths: [8, 16, 32, 64, 64],
                d_model: 64,
                rec_ffn: 128,
                rec_layers: 1,
                clip_width: 64,
                clip_layers: 1,
                clip_heads: 2,
                vocab_size: 64,
                text_trainable: true,
                sincos_positions: true,
                ..official
            }),
            other => Err(Error::Config(format!("unknown preset {other:?} (official, tiny, small)"))),
        }
    }

    /// The settings a checkpoint records (safetensors metadata) to rebuild the model: the whole
    /// configuration as JSON under `config`, and the main fields on their own for a reader.
    pub fn to_metadata(&self) -> Vec<(String, String)> {
        vec![
            ("config".into(), serde_json::to_string(self).expect("a Config always serialises")),
            ("preset".into(), self.name.clone()),
            ("img_h".into(), self.img_size.0.to_string()),
            ("img_w".into(), self.img_size.1.to_string()),
            ("vocab_size".into(), self.vocab_size.to_string()),
            ("text_trainable".into(), self.text_trainable.to_string()),
            ("condition_on_logits".into(), self.condition_on_logits.to_string()),
            ("bidirectional_reconstruction".into(), self.bidirectional_reconstruction.to_string()),
        ]
    }

    pub fn from_metadata(m: &std::collections::HashMap<String, String>) -> Result<Config> {
        if let Some(json) = m.get("config") {
            let c: Config = serde_json::from_str(json)
                .map_err(|e| Error::Config(format!("checkpoint metadata \"config\" is not a configuration: {e}")))?;
            c.validate()?;
            // the fields recorded on their own must say the same (a header edited in one place)
            for (k, v) in c.to_metadata() {
                if let Some(other) = m.get(&k).filter(|o| k != "config" && **o != v) {
                    return Err(Error::Config(format!(
                        "checkpoint metadata {k:?} is {other:?} but its configuration says {v:?}"
                    )));
                }
            }
            return Ok(c);
        }
        // checkpoints written before the whole configuration was recorded
        let get = |k: &str| m.get(k).ok_or_else(|| Error::Config(format!("checkpoint metadata lacks {k:?}")));
        let num = |k: &str| -> Result<usize> {
            get(k)?.parse().map_err(|_| Error::Config(format!("metadata {k:?} is not a number")))
        };
        let flag = |k: &str| -> Result<bool> { Ok(get(k)? == "true") };
        let c = Config {
            img_size: (num("img_h")?, num("img_w")?),
            vocab_size: num("vocab_size")?,
            text_trainable: flag("text_trainable")?,
            condition_on_logits: flag("condition_on_logits")?,
            bidirectional_reconstruction: flag("bidirectional_reconstruction").unwrap_or(false),
            ..Config::preset(get("preset")?)?
        };
        c.validate()?;
        Ok(c)
    }

    /// The configuration a state dict without metadata was trained with (the official code saves
    /// none): the preset whose widths match its shapes (`official` or `tiny`, or `preset` when
    /// given), and the image size from the Interactor's position embedding [1, N, d] (a square
    /// image of side 16·√N, or `img_size` when given). Keys may carry the `module.` prefix.
    pub fn from_shapes(
        shapes: &std::collections::HashMap<String, Vec<usize>>,
        preset: Option<&str>,
        img_size: Option<(usize, usize)>,
    ) -> Result<Config> {
        let get = |k: &str| shapes.get(k).or_else(|| shapes.get(&format!("module.{k}")));
        let need =
            |k: &str| get(k).ok_or_else(|| Error::Config(format!("the checkpoint has no {k}: not a RecLMIS model")));
        let pos = need("interact.embeddings.position_embeddings")?;
        let tok = need("clip.token_embedding.weight")?;
        let inc = need("inc.conv.weight")?;
        let (n, d) = match pos.as_slice() {
            [1, n, d] => (*n, *d),
            other => {
                return Err(Error::Config(format!(
                    "interact.embeddings.position_embeddings has shape {other:?}, not [1, N, d]"
                )))
            }
        };
        let (vocab, clip_width) = match tok.as_slice() {
            [v, w] => (*v, *w),
            other => return Err(Error::Config(format!("clip.token_embedding.weight has shape {other:?}"))),
        };
        let clip_layers =
            (0..).take_while(|i| get(&format!("clip.transformer.resblocks.{i}.ln_1.weight")).is_some()).count();
        let candidates: Vec<&str> = match preset {
            Some(p) => vec![p],
            None => vec!["official", "tiny"],
        };
        let img_size = match img_size {
            Some(s) => s,
            None => {
                let side = (n as f64).sqrt().round() as usize;
                if side * side != n {
                    return Err(Error::Config(format!(
                        "the Interactor has {n} image tokens, not a square grid: give the image size"
                    )));
                }
                (16 * side, 16 * side)
            }
        };
        for name in candidates {
            let c = Config { img_size, vocab_size: vocab, ..Config::preset(name)? };
            if c.d_model == d
                && c.clip_width == clip_width
                && c.clip_layers == clip_layers
                && c.unet_widths[0] == inc[0]
            {
                c.validate()?;
                if c.n_tokens() != n {
                    return Err(Error::Config(format!(
                        "image size {}x{} gives {} tokens, the checkpoint has {n}",
                        img_size.0,
                        img_size.1,
                        c.n_tokens()
                    )));
                }
                return Ok(c);
            }
        }
        Err(Error::Config(format!(
            "no preset has the checkpoint's widths (d_model {d}, text tower {clip_width} wide and {clip_layers} deep, first U-Net width {})",
            inc[0]
        )))
    }

    /// The learning rate `train` uses unless told otherwise: the official code's 3e-4 for the
    /// presets with its text tower, 1e-3 for `small` (trains from scratch in minutes).
    pub fn default_lr(&self) -> f32 {
        if self.text_trainable {
            1e-3
        } else {
            3e-4
        }
    }

    /// Bottleneck grid (H/16, W/16).
    pub fn grid(&self) -> (usize, usize) {
        (self.img_size.0 / 16, self.img_size.1 / 16)
    }
    pub fn n_tokens(&self) -> usize {
        let (h, w) = self.grid();
        h * w
    }

    pub fn validate(&self) -> Result<()> {
        let (h, w) = self.img_size;
        let bad = |m: String| Err(Error::Config(format!("preset {}: {m}", self.name)));
        if h % 16 != 0 || w % 16 != 0 || h == 0 || w == 0 {
            return bad(format!("image size {h}x{w} must be a nonzero multiple of 16"));
        }
        if self.unet_widths[4] != self.d_model || self.clip_width == 0 {
            return bad(format!("down4 width {} must equal d_model {}", self.unet_widths[4], self.d_model));
        }
        for (what, d, heads) in [
            ("interactor", self.d_model, self.interactor_heads),
            ("rec", self.d_model, self.rec_heads),
            ("clip", self.clip_width, self.clip_heads),
        ] {
            if heads == 0 || d % heads != 0 {
                return bad(format!("{what} width {d} is not divisible by {heads} heads"));
            }
        }
        // limits checked before anything is allocated: a checkpoint's metadata is user data, and
        // img_h = 128000 once asked for a 16 GB positional table
        if h > MAX_IMAGE_SIDE || w > MAX_IMAGE_SIDE {
            return bad(format!("image size {h}x{w}: each side must be at most {MAX_IMAGE_SIDE}"));
        }
        if self.vocab_size == 0 || self.vocab_size > MAX_VOCAB {
            return bad(format!("vocabulary of {} tokens: must be 1 to {MAX_VOCAB}", self.vocab_size));
        }
        if self.token_len == 0 || self.context_length > MAX_CONTEXT {
            return bad(format!(
                "token length {} / context {}: at most {MAX_CONTEXT}",
                self.token_len, self.context_length
            ));
        }
        if self
            .unet_widths
            .iter()
            .chain([&self.d_model, &self.clip_width, &self.rec_ffn])
            .any(|&x| x == 0 || x > MAX_WIDTH)
            || self.clip_layers > MAX_LAYERS
            || self.rec_layers > MAX_LAYERS
        {
            return bad(format!("widths must be 1 to {MAX_WIDTH} and depths at most {MAX_LAYERS}"));
        }
        for (what, r) in [("image mask rate", self.img_mask_rate), ("text mask rate", self.text_mask_rate)] {
            if !(r > 0.0 && r <= 1.0) {
                return bad(format!("{what} {r}: must be in (0, 1]"));
            }
        }
        for (what, p) in [("dropout", self.dropout), ("score dropout", self.score_dropout)] {
            if !(0.0..1.0).contains(&p) {
                return bad(format!("{what} {p}: must be in [0, 1)"));
            }
        }
        if self.loss_weights.iter().any(|w| !(w.is_finite() && *w >= 0.0)) {
            return bad(format!("loss weights {:?}: must be finite and non-negative", self.loss_weights));
        }
        if self.token_len > self.context_length {
            return bad(format!("token_len {} exceeds context {}", self.token_len, self.context_length));
        }
        Ok(())
    }
}
