//! RecLMIS as the official implementation computes it (tests/fixtures/official_tiny/README.md,
//! "The official computation"): text tower → text_module4; U-Net encoder; Interactor; W_poi and
//! W_woi; PLAM decoder; and for training the CVR/CLR reconstructions, the CCL and Dice + BCE.

/// Its `reclmis bench` cases (registered in `bench::registry`).
#[cfg(feature = "cli")]
pub mod bench;
pub mod config;
pub mod hf_clip;
pub mod interactor;
pub mod reconstruction;
pub mod summary;
pub mod text_tower;
#[cfg(feature = "train")]
pub mod train;
pub mod unet;

use crate::autograd::{count, Graph, Precision, Var};
use crate::device::Device;
use crate::error::{Error, Result};
use crate::nn::params::Params;
use crate::nn::{Builder, Conv, Linear};
use crate::rng::Rng;
use crate::tensor::Tensor;
pub use config::Config;
use interactor::Interactor;
use reconstruction::RecTransformer;
use std::collections::BTreeMap;
use text_tower::TextTower;
use unet::UNet;

/// Linear(d,d) → ReLU → Linear(d,1) (`mlp_visual`, `mlp_woi`).
struct ScoreMlp {
    l0: Linear,
    l2: Linear,
}

impl ScoreMlp {
    fn new(bd: &mut Builder, name: &str, d: usize) -> Result<ScoreMlp> {
        bd.scope(name, |bd| {
            Ok(ScoreMlp { l0: Linear::new(bd, "0", d, d, true)?, l2: Linear::new(bd, "2", d, 1, true)? })
        })
    }
    /// x [B,T,d] -> [B,T]
    fn forward(&self, g: &Graph, p: &Params, x: &Var) -> Result<Var> {
        let s = self.l2.forward(g, p, &self.l0.forward_relu(g, p, x)?)?;
        g.reshape(&s, &x.shape()[..2])
    }
}

pub struct RecLmis {
    pub cfg: Config,
    pub params: Params,
    /// Autocast precision of the graphs the model makes itself (evaluation, inference, the
    /// trainer's steps); a caller's own graph carries its own.
    pub precision: Precision,
    unet: UNet,
    text_module4: Conv,
    clip: TextTower,
    interact: Interactor,
    mlp_visual: ScoreMlp,
    mlp_woi: ScoreMlp,
    rec_text: RecTransformer,
    rec_img: RecTransformer,
}

/// A batch: images [B,C,H,W] in [0,1], token ids and their validity [B,L] (i32), and for
/// training the masks [B,H,W] (0/1).
pub struct Batch {
    pub images: Tensor,
    pub ids: Tensor,
    pub valid: Tensor,
    pub masks: Option<Tensor>,
    /// The frozen text tower's output [B,L,D] when cached (then the tower is not run).
    pub text_hidden: Option<Tensor>,
}

/// The stored intermediates of a forward, by the fixture's names (`probs`, `W_poi`, `up4`, ...).
pub type Record = BTreeMap<String, Var>;

/// Which image / text tokens the reconstruction masks out, per sample (positions, without
/// repetition). Drawn from W when not given.
#[derive(Clone, Debug, Default)]
pub struct MaskIndices {
    pub img: Vec<Vec<usize>>,
    pub text: Vec<Vec<usize>>,
}

pub struct TrainOut {
    pub total: Var,
    /// dice, bce, criterion, ccl, ccl_t2v, ccl_v2t, text_rec, img_rec, total (host f32)
    pub losses: BTreeMap<&'static str, f32>,
    pub record: Record,
    pub masks: MaskIndices,
}

impl RecLmis {
    /// The device the model's weights live on (every input must be there too).
    pub fn device(&self) -> &Device {
        self.params.device()
    }

    /// A model with PyTorch's default initialisation (seeded), CLIP frozen.
    pub fn new(cfg: Config, device: &Device, seed: u64) -> Result<RecLmis> {
        Self::build(cfg, device, Some(seed))
    }

    /// A model whose tensors are declared but hold nothing (no memory, no initialisation time)
    /// until a checkpoint sets them: what loading for inference starts from.
    pub fn shell(cfg: Config, device: &Device) -> Result<RecLmis> {
        Self::build(cfg, device, None)
    }

    /// Tensors only training reads (the CVR / CLR reconstruction transformers): an inference
    /// checkpoint leaves them out.
    pub const TRAINING_ONLY: [&'static str; 2] = ["rec_text_trans1.", "rec_img_trans1."];
    /// The scoring MLPs that give W_poi and W_woi (`explain`); the mask does not need them.
    pub const WEIGHTS_OF_INTEREST: [&'static str; 2] = ["mlp_visual.", "mlp_woi."];

    /// Whether `mlp_visual` and `mlp_woi` hold values (a model loaded from an inference
    /// checkpoint exported without them cannot give W_poi / W_woi).
    pub fn has_weights_of_interest(&self) -> bool {
        self.params
            .ids()
            .filter(|&id| Self::WEIGHTS_OF_INTEREST.iter().any(|p| self.params.name(id).starts_with(p)))
            .all(|id| self.params.is_set(id))
    }

    fn build(cfg: Config, device: &Device, seed: Option<u64>) -> Result<RecLmis> {
        cfg.validate()?;
        let mut params = Params::new(device);
        let mut bd = match seed {
            Some(seed) => Builder::new(&mut params, seed),
            None => Builder::shell(&mut params),
        };
        let d = cfg.d_model;
        let (unet, interact) = UNet::new_with(&mut bd, cfg.in_channels, cfg.unet_widths, d, |bd| {
            Interactor::new(bd, d, cfg.interactor_heads, cfg.grid(), cfg.sincos_positions)
        })?;
        let text_module4 = Conv::new1d(&mut bd, "text_module4", d, d, 3)?;
        let clip = TextTower::new(
            &mut bd,
            cfg.clip_width,
            cfg.clip_layers,
            cfg.clip_heads,
            cfg.vocab_size,
            cfg.context_length,
            d,
        )?;
        let mlp_woi = ScoreMlp::new(&mut bd, "mlp_woi", d)?;
        let mlp_visual = ScoreMlp::new(&mut bd, "mlp_visual", d)?;
        let mut rec_text =
            RecTransformer::new(&mut bd, "rec_text_trans1", d, cfg.rec_heads, cfg.rec_ffn, cfg.rec_layers)?;
        let mut rec_img =
            RecTransformer::new(&mut bd, "rec_img_trans1", d, cfg.rec_heads, cfg.rec_ffn, cfg.rec_layers)?;
        for r in [&mut rec_text, &mut rec_img] {
            r.on_logits = cfg.condition_on_logits;
            r.causal = !cfg.bidirectional_reconstruction;
            r.dropout = cfg.dropout;
        }
        if !cfg.text_trainable {
            params.set_trainable("clip.", false);
        }
        Ok(RecLmis {
            precision: Precision::F32,
            cfg,
            params,
            unet,
            text_module4,
            clip,
            interact,
            mlp_visual,
            mlp_woi,
            rec_text,
            rec_img,
        })
    }

    fn check_batch(&self, b: &Batch) -> Result<()> {
        let (is, ids) = (b.images.shape(), b.ids.shape());
        let (h, w) = self.cfg.img_size;
        let bad = |m: String| Err(Error::shape("reclmis", m));
        if is.len() != 4 || is[1] != self.cfg.in_channels || is[2] != h || is[3] != w {
            return bad(format!("images {is:?} must be [B,{},{h},{w}]", self.cfg.in_channels));
        }
        if ids.len() != 2
            || ids[0] != is[0]
            || ids[1] == 0
            || ids[1] > self.cfg.context_length
            || b.valid.shape() != ids
        {
            return bad(format!(
                "token ids {ids:?} and mask {:?} must be [{}, L] with 1 <= L <= {}",
                b.valid.shape(),
                is[0],
                self.cfg.context_length
            ));
        }
        if let Some(m) = &b.masks {
            if m.shape() != [is[0], h, w] {
                return bad(format!("masks {:?} must be [{}, {h}, {w}]", m.shape(), is[0]));
            }
        }
        Ok(())
    }

    /// Everything the mask and the weights need; records intermediates into `rec`.
    /// With `rec` None (inference), each activation is dropped after its last use, so that the
    /// eval graph (which keeps no tape) frees it: the peak is the decoder's working set, not the
    /// whole forward's.
    // one copy for its callers: inlined into `infer` it cost reclmis-infer 2 KB of its budget
    #[inline(never)]
    fn trunk(&self, g: &Graph, b: &Batch, mut rec: Option<&mut Record>, need_weights: bool) -> Result<Trunk> {
        self.check_batch(b)?;
        let p = &self.params;
        // (count::at names the module whose multiply-adds follow: `reclmis model --flops`)
        count::at("clip");
        let hidden = match &b.text_hidden {
            Some(h) if !self.cfg.text_trainable => Var::constant(h.clone()),
            _ => self.clip.forward(g, p, &b.ids, &b.valid)?,
        };
        count::at("text_module4");
        let tf = self.text_module4.forward(g, p, &g.transpose_last(&hidden)?)?;
        let text_feat = g.transpose_last(&tf)?;
        count::at("inc");
        let x1 = self.unet.inc.forward(g, p, &Var::constant(b.images.clone()))?;
        count::at("down1");
        let x2 = self.unet.down[0].forward(g, p, &x1)?;
        count::at("down2");
        let x3 = self.unet.down[1].forward(g, p, &x2)?;
        count::at("down3");
        let x4 = self.unet.down[2].forward(g, p, &x3)?;
        count::at("down4");
        let x5 = self.unet.down[3].forward(g, p, &x4)?;
        count::at("interact");
        let it = self.interact.forward(g, p, &x5, &text_feat, need_weights, self.cfg.dropout)?;
        let (mut w_poi, mut w_woi) = (None, None);
        if it.text.is_some() && self.cfg.no_condition {
            // w/o CI: every valid token weighs the same (the padding still exactly 0)
            let (bsz, n) = (it.img.shape()[0], it.img.shape()[1]);
            let uniform = Tensor::from_vec(vec![1.0 / n as f32; bsz * n], &[bsz, n], p.device())?;
            w_poi = Some(Var::constant(uniform));
            let bias = valid_bias(&b.valid)?;
            w_woi = Some(Var::constant(crate::ops::softmax::softmax(&bias)?));
        } else if let Some(text2) = &it.text {
            // the official `config.dropout` (MosMedData+: p 0.5) drops the scoring MLPs' inputs only
            count::at("mlp_visual");
            let sv = self.mlp_visual.forward(g, p, &g.dropout(&it.img, self.cfg.score_dropout)?)?;
            count::at("mlp_woi");
            let sw = self.mlp_woi.forward(g, p, &g.dropout(text2, self.cfg.score_dropout)?)?;
            w_poi = Some(g.softmax(&sv)?);
            // −inf where the text mask is 0: padding gets exactly 0
            let bias = valid_bias(&b.valid)?;
            w_woi = Some(g.softmax(&g.add(&sw, &Var::constant(bias))?)?);
            if let Some(rec) = rec.as_deref_mut() {
                rec.insert("mlp_visual_score".into(), sv.clone());
                rec.insert("mlp_woi_score".into(), sw.clone());
                rec.insert("interact_text".into(), text2.clone());
            }
        }
        // decoder: img' [B,N,d] -> [B,d,h,w]
        let (gh, gw) = self.cfg.grid();
        let s = it.img.shape().to_vec();
        let dec_in = g.reshape(&g.transpose_last(&it.img)?, &[s[0], s[2], gh, gw])?;
        let Some(rec) = rec else {
            // inference: each skip connection and decoder output is given up to the stage that
            // consumes it, which frees it after its last use
            drop(tf);
            count::at("up4");
            let u4 = self.unet.up[0].forward_infer(g, p, dec_in, x4)?;
            count::at("up3");
            let u3 = self.unet.up[1].forward_infer(g, p, u4, x3)?;
            count::at("up2");
            let u2 = self.unet.up[2].forward_infer(g, p, u3, x2)?;
            count::at("up1");
            let u1 = self.unet.up[3].forward_infer(g, p, u2, x1)?;
            count::at("outc");
            let logits = self.unet.outc.forward(g, p, &u1)?;
            drop(u1);
            let probs = g.sigmoid(&logits)?;
            return Ok(Trunk { hidden, text_feat, x5, img: it.img, logits, probs, w_poi, w_woi });
        };
        count::at("up4");
        let (u4, pl4) = self.unet.up[0].forward(g, p, &dec_in, &x4)?;
        count::at("up3");
        let (u3, pl3) = self.unet.up[1].forward(g, p, &u4, &x3)?;
        count::at("up2");
        let (u2, _) = self.unet.up[2].forward(g, p, &u3, &x2)?;
        count::at("up1");
        let (u1, _) = self.unet.up[3].forward(g, p, &u2, &x1)?;
        count::at("outc");
        let logits = self.unet.outc.forward(g, p, &u1)?;
        let probs = g.sigmoid(&logits)?;
        for (k, v) in [
            ("clip_hidden", &hidden),
            ("text_feat", &text_feat),
            ("down3", &x4),
            ("img_feat4", &x5),
            ("interact_img_tokens", &it.tokens),
            ("interact_text_attn", &it.text_attn),
            ("interact_img", &it.img),
            ("decoder_input", &dec_in),
            ("plam_up4", &pl4),
            ("plam_up3", &pl3),
            ("up4", &u4),
            ("up3", &u3),
            ("up2", &u2),
            ("up1", &u1),
            ("logits", &logits),
            ("probs", &probs),
        ] {
            rec.insert(k.into(), v.clone());
        }
        if let (Some(a), Some(b)) = (&w_poi, &w_woi) {
            rec.insert("W_poi".into(), a.clone());
            rec.insert("W_woi".into(), b.clone());
        }
        Ok(Trunk { hidden, text_feat, x5, img: it.img, logits, probs, w_poi, w_woi })
    }

    /// An evaluation graph at the model's precision.
    pub fn eval_graph(&self) -> Result<Graph> {
        Graph::eval().with_precision(self.precision)
    }

    /// A recording training graph at the model's precision.
    #[cfg(feature = "train")]
    pub fn train_graph(&self) -> Result<Graph> {
        Graph::train().with_precision(self.precision)
    }

    /// The text tower's output [B,L,D] for ids and validity [B,L] (to cache when it is frozen).
    pub fn text_hidden(&self, ids: &Tensor, valid: &Tensor) -> Result<Tensor> {
        Ok(self.clip.forward(&self.eval_graph()?, &self.params, ids, valid)?.into_tensor())
    }

    /// Evaluation (running BN statistics): probs [B,1,H,W], W_poi [B,N], W_woi [B,L] and every
    /// intermediate the fixture stores.
    pub fn forward_eval(&self, b: &Batch) -> Result<Record> {
        self.forward_eval_on(&self.eval_graph()?, b)
    }

    /// `forward_eval` on a graph of the caller's (another precision, a perturbed autocast).
    pub fn forward_eval_on(&self, g: &Graph, b: &Batch) -> Result<Record> {
        let mut rec = Record::new();
        self.trunk(g, b, Some(&mut rec), true)?;
        Ok(rec)
    }

    /// Only what the mask needs (no CTBN, MLPs, reconstruction or losses): probs [B,1,H,W].
    pub fn infer(&self, b: &Batch) -> Result<Tensor> {
        let g = self.eval_graph()?;
        Ok(self.trunk(&g, b, None, false)?.probs.into_tensor())
    }

    /// The training forward on graph `g` (use `Graph::train()`): every loss term; the caller runs
    /// `g.backward(&out.total, ..)` and applies `g.take_buffer_updates()`.
    pub fn forward_train(&self, g: &Graph, b: &Batch, masks: Option<MaskIndices>, rng: &mut Rng) -> Result<TrainOut> {
        let target = b.masks.as_ref().ok_or_else(|| Error::shape("reclmis", "training needs the masks"))?;
        let mut rec = Record::new();
        let t = self.trunk(g, b, Some(&mut rec), true)?;
        let p = &self.params;
        let (w_poi, w_woi) = (t.w_poi.expect("asked for"), t.w_woi.expect("asked for"));
        let s = t.x5.shape().to_vec();
        let (bsz, c, n) = (s[0], s[1], s[2] * s[3]);
        let img_tok = g.transpose_last(&g.reshape(&t.x5, &[bsz, c, n])?)?; // [B,N,C], n = y·w + x
        let valid = b.valid.to_vec_i32()?;
        let l = b.ids.shape()[1];
        let masks = match masks {
            Some(m) => m,
            None => {
                // the random-masking ablation draws every position with the same weight
                let (wp, ww) = if self.cfg.random_masking {
                    (vec![1.0; bsz * n], vec![1.0; bsz * l])
                } else {
                    (w_poi.tensor().to_vec()?, w_woi.tensor().to_vec()?)
                };
                let n_valid: Vec<usize> = valid.chunks(l).map(|r| r.iter().filter(|&&v| v != 0).count()).collect();
                MaskIndices {
                    img: (0..bsz).map(|i| sample_indices(&wp[i * n..][..n], n, self.cfg.img_mask_rate, rng)).collect(),
                    text: (0..bsz)
                        .map(|i| sample_indices(&ww[i * l..][..l], n_valid[i], self.cfg.text_mask_rate, rng))
                        .collect(),
                }
            }
        };
        let keep_img = keep_mask(&masks.img, bsz, n, p.device())?;
        let keep_txt = keep_mask(&masks.text, bsz, l, p.device())?;
        let masked_img = g.mul(&img_tok, &Var::constant(keep_img))?;
        let masked_txt = g.mul(&t.text_feat, &Var::constant(keep_txt))?;
        count::at("rec_img_trans1");
        let (cvr_enc, cvr_out) = self.rec_img.forward(g, p, &t.text_feat, &masked_img, &w_woi)?;
        count::at("rec_text_trans1");
        let (clr_enc, clr_out) = self.rec_text.forward(g, p, &img_tok, &masked_txt, &w_poi)?;
        // a text tower trained from scratch would collapse its own target; the official tower is
        // frozen, so this is the same computation there
        let text_target =
            if self.cfg.text_trainable { Var::constant(t.hidden.tensor().clone()) } else { t.hidden.clone() };
        let (text_rec, img_rec) = if self.cfg.weighted_reconstruction {
            (
                weighted_mse(g, &clr_out, &text_target, w_woi.tensor())?,
                weighted_mse(g, &cvr_out, &t.img, w_poi.tensor())?,
            )
        } else {
            (g.mse(&clr_out, &text_target)?, g.mse(&cvr_out, &t.img)?)
        };
        // CCL: a second softmax of W; unmasked text_feat and down4 tokens
        let tw = g.softmax(&w_woi)?;
        let vw = g.softmax(&w_poi)?;
        let mask_f = Tensor::from_vec(valid.iter().map(|&v| (v != 0) as i32 as f32).collect(), &[bsz, l], p.device())?;
        count::at("ccl");
        let (ccl_logits, t2v, v2t) = g.ccl_logits(&t.text_feat, &img_tok, &mask_f, &tw, &vw)?;
        let scale = p.value(self.clip.logit_scale).to_vec()?[0].exp();
        let (ccl, ccl_parts) = g.info_nce(&ccl_logits, scale)?;
        let target = target.reshape(t.logits.shape())?;
        let (criterion, seg_parts) = g.dice_bce(&t.logits, &target)?;
        let [w_crit, w_ccl, w_text, w_img] = self.cfg.loss_weights;
        let mut total = g.scale(&ccl, w_ccl)?;
        total = g.add(&total, &g.scale(&text_rec, w_text)?)?;
        total = g.add(&total, &g.scale(&img_rec, w_img)?)?;
        total = g.add(&total, &g.scale(&criterion, w_crit)?)?;
        let seg = seg_parts.to_vec()?;
        let cp = ccl_parts.to_vec()?;
        let scalar = |v: &Var| -> Result<f32> { Ok(v.tensor().to_vec()?[0]) };
        let losses = BTreeMap::from([
            ("dice", seg[0]),
            ("bce", seg[1]),
            ("criterion", seg[2]),
            ("ccl", cp[0]),
            ("ccl_t2v", cp[1]),
            ("ccl_v2t", cp[2]),
            ("text_rec", scalar(&text_rec)?),
            ("img_rec", scalar(&img_rec)?),
            ("total", scalar(&total)?),
        ]);
        for (k, v) in [
            ("cvr_enc", cvr_enc),
            ("cvr_out", cvr_out),
            ("clr_enc", clr_enc),
            ("clr_out", clr_out),
            ("masked_img_feat", masked_img),
            ("masked_text_feat", masked_txt),
            ("ccl_logits", ccl_logits),
            ("ccl_t2v", Var::constant(t2v)),
            ("ccl_v2t", Var::constant(v2t)),
        ] {
            rec.insert(k.into(), v);
        }
        Ok(TrainOut { total, losses, record: rec, masks })
    }
}

/// x, y [B,L,D], w [B,L] (rows summing to 1): (1/B) Σ_b Σ_l w_bl · mean_d (x − y)², w constant.
/// With w uniform (1/L) it is the plain mean squared error.
fn weighted_mse(g: &Graph, x: &Var, y: &Var, w: &Tensor) -> Result<Var> {
    let s = x.shape().to_vec();
    if s.len() != 3 || w.shape() != [s[0], s[1]] {
        return Err(Error::shape("weighted_mse", format!("x {s:?} and w {:?} must be [B,L,D] and [B,L]", w.shape())));
    }
    let d = g.sub(x, y)?;
    // mean_all divides by B·L·D; the weight times L leaves (1/(B·D)) Σ w · Σ_d
    let wl = crate::ops::elementwise::unary(w, crate::ops::elementwise::UnaryOp::Scale(s[1] as f32))?;
    let sq = g.mul(&g.mul(&d, &d)?, &Var::constant(wl.reshape(&[s[0], s[1], 1])?))?;
    g.mean_all(&sq)
}

struct Trunk {
    hidden: Var,
    text_feat: Var,
    x5: Var,
    img: Var,
    logits: Var,
    probs: Var,
    w_poi: Option<Var>,
    w_woi: Option<Var>,
}

/// 0 where valid, −inf where not: [B,L].
fn valid_bias(valid: &Tensor) -> Result<Tensor> {
    let v = valid.to_vec_i32()?;
    Tensor::from_vec(
        v.iter().map(|&x| if x != 0 { 0.0 } else { f32::NEG_INFINITY }).collect(),
        valid.shape(),
        valid.device(),
    )
}

/// [B,T,1]: 0 at the listed positions, 1 elsewhere.
fn keep_mask(idx: &[Vec<usize>], b: usize, t: usize, dev: &Device) -> Result<Tensor> {
    let mut keep = vec![1.0f32; b * t];
    for (i, row) in idx.iter().enumerate().take(b) {
        for &j in row {
            if j >= t {
                return Err(Error::shape("mask indices", format!("position {j} of sample {i} is outside 0..{t}")));
            }
            keep[i * t + j] = 0.0;
        }
    }
    Tensor::from_vec(keep, &[b, t, 1], dev)
}

/// The official sampler: n = max(⌊n_valid·rate⌋, 1) positions among 0..n_valid, without
/// replacement, each draw proportional to the remaining weights.
pub fn sample_indices(w: &[f32], n_valid: usize, rate: f64, rng: &mut Rng) -> Vec<usize> {
    let n_valid = n_valid.min(w.len());
    let n = ((n_valid as f64 * rate).floor() as usize).max(1).min(n_valid);
    let mut weights: Vec<f64> = w[..n_valid].iter().map(|&x| x.max(0.0) as f64).collect();
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        let total: f64 = weights.iter().sum();
        let pick = if total > 0.0 {
            let mut r = rng.uniform(0.0, 1.0) as f64 * total;
            let mut k = weights.iter().rposition(|&x| x > 0.0).unwrap_or(0);
            for (i, &x) in weights.iter().enumerate() {
                if r < x {
                    k = i;
                    break;
                }
                r -= x;
            }
            k
        } else {
            // all remaining weights are zero: the first unused position
            (0..n_valid).find(|i| !out.contains(i)).unwrap_or(0)
        };
        weights[pick] = 0.0;
        out.push(pick);
    }
    out
}
