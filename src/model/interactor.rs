//! The Interactor: image tokens (1×1 patch conv + position embedding) and text features attend to
//! each other (text queries image, then image queries the attended text; no residuals, no norm,
//! no padding mask), and CTBN = ReLU(BN1d(Conv1d k3(text'))) for the word weights.

use crate::autograd::{Graph, Var};
use crate::error::Result;
use crate::nn::params::{Kind, ParamId, Params};
use crate::nn::{BatchNorm, Builder, Conv, Mha, MhaOpts};

pub struct Interactor {
    patch: Conv,
    position: ParamId,
    attn_text: Mha,
    attn_img: Mha,
    ctbn_conv: Conv,
    ctbn_norm: BatchNorm,
}

/// [h·w, d] a 2-D sine-cosine table (as MAE's): the first half of the channels encode the row,
/// the second the column, each as sin/cos pairs at d/4 frequencies from 1 to 1/100 per token.
/// Zero-init embeddings carry no position until training writes one; image tokens at the
/// bottleneck then differ by content only, and telling the zones apart is learned late.
pub fn sincos_table((h, w): (usize, usize), d: usize) -> Vec<f32> {
    let quarter = (d / 4).max(1);
    let mut t = vec![0.0f32; h * w * d];
    for y in 0..h {
        for x in 0..w {
            let row = &mut t[(y * w + x) * d..][..d];
            for (half, pos) in [(0, y), (1, x)] {
                for k in 0..quarter {
                    let freq = 100f64.powf(-(k as f64) / quarter as f64);
                    let a = pos as f64 * freq;
                    let base = half * d / 2 + 2 * k;
                    if base + 1 < d {
                        row[base] = a.sin() as f32;
                        row[base + 1] = a.cos() as f32;
                    }
                }
            }
        }
    }
    t
}

pub struct InteractOut {
    /// [B,N,d]: patch conv + position embedding
    pub tokens: Var,
    /// [B,L,d]: text'
    pub text_attn: Var,
    /// [B,N,d]: img'
    pub img: Var,
    /// [B,L,d]: text'' (None when not asked for: inference)
    pub text: Option<Var>,
}

impl Interactor {
    /// `grid`: the bottleneck's (rows, columns); `sincos`: start the position embedding as
    /// `sincos_table` instead of the official zeros.
    pub fn new(bd: &mut Builder, d: usize, heads: usize, grid: (usize, usize), sincos: bool) -> Result<Interactor> {
        let n_tokens = grid.0 * grid.1;
        bd.scope("interact", |bd| {
            let (patch, position) = bd.scope("embeddings", |bd| {
                let shape = [1, n_tokens, d];
                let position = if sincos {
                    bd.values("position_embeddings", &shape, sincos_table(grid, d))?
                } else {
                    bd.constant("position_embeddings", &shape, 0.0, Kind::Param { trainable: true })?
                };
                let patch = Conv::new2d(bd, "patch_embeddings", d, d, 1, true)?;
                Ok((patch, position))
            })?;
            let attn_text = Mha::new(bd, "attn_text", d, heads)?;
            let attn_img = Mha::new(bd, "attn_img", d, heads)?;
            let (ctbn_conv, ctbn_norm) =
                bd.scope("CTBN", |bd| Ok((Conv::new1d(bd, "conv", d, d, 3)?, BatchNorm::new(bd, "norm", d)?)))?;
            Ok(Interactor { patch, position, attn_text, attn_img, ctbn_conv, ctbn_norm })
        })
    }

    /// feat4 [B,d,h,w] (down4), text_feat [B,L,d].
    pub fn forward(
        &self,
        g: &Graph,
        p: &Params,
        feat4: &Var,
        text_feat: &Var,
        need_text: bool,
        dropout: f32,
    ) -> Result<InteractOut> {
        let s = feat4.shape().to_vec();
        let (b, d, n) = (s[0], s[1], s[2] * s[3]);
        let t = self.patch.forward(g, p, feat4)?;
        let t = g.transpose_last(&g.reshape(&t, &[b, d, n])?)?;
        let tokens = g.dropout(&g.add(&t, &g.param(p, self.position))?, dropout)?;
        let none = MhaOpts::default();
        let text_attn = self.attn_text.forward(g, p, text_feat, &tokens, &none)?;
        let img = self.attn_img.forward(g, p, &tokens, &text_attn, &none)?;
        let text = if need_text {
            let x = self.ctbn_conv.forward(g, p, &g.transpose_last(&text_attn)?)?; // [B,d,L]
            Some(g.transpose_last(&self.ctbn_norm.forward(g, p, &x, true)?)?)
        } else {
            None
        };
        Ok(InteractOut { tokens, text_attn, img, text })
    }
}
