//! The CLIP-style text tower (frozen in the official training): token + position embedding,
//! causal pre-LN blocks with QuickGELU and a padding mask, final LayerNorm, projection.

use crate::autograd::{Graph, Var};
use crate::error::Result;
use crate::nn::params::ParamId;
use crate::nn::params::Params;
use crate::nn::{Builder, LayerNorm, Linear, Mha, MhaOpts};
use crate::tensor::Tensor;

struct Block {
    attn: Mha,
    ln_1: LayerNorm,
    c_fc: Linear,
    c_proj: Linear,
    ln_2: LayerNorm,
}

pub struct TextTower {
    token_embedding: ParamId,
    positional_embedding: ParamId,
    blocks: Vec<Block>,
    ln_final: LayerNorm,
    /// [width, embed] (right-multiplied)
    text_projection: ParamId,
    pub logit_scale: ParamId,
}

impl TextTower {
    /// Registers `clip.*` (frozen by the caller).
    pub fn new(
        bd: &mut Builder,
        width: usize,
        layers: usize,
        heads: usize,
        vocab: usize,
        context: usize,
        embed: usize,
    ) -> Result<TextTower> {
        bd.scope("clip", |bd| {
            let token_embedding = bd.scope("token_embedding", |bd| bd.normal("weight", &[vocab, width], 0.02))?;
            let positional_embedding = bd.normal("positional_embedding", &[context, width], 0.01)?;
            let blocks = bd.scope("transformer", |bd| {
                bd.scope("resblocks", |bd| {
                    (0..layers)
                        .map(|i| {
                            bd.scope(&i.to_string(), |bd| {
                                Ok(Block {
                                    attn: Mha::new(bd, "attn", width, heads)?,
                                    ln_1: LayerNorm::new(bd, "ln_1", width)?,
                                    c_fc: bd.scope("mlp", |bd| Linear::new(bd, "c_fc", width, 4 * width, true))?,
                                    c_proj: bd.scope("mlp", |bd| Linear::new(bd, "c_proj", 4 * width, width, true))?,
                                    ln_2: LayerNorm::new(bd, "ln_2", width)?,
                                })
                            })
                        })
                        .collect::<Result<Vec<_>>>()
                })
            })?;
            let ln_final = LayerNorm::new(bd, "ln_final", width)?;
            let text_projection = bd.normal("text_projection", &[width, embed], (width as f32).powf(-0.5))?;
            let logit_scale = bd.constant(
                "logit_scale",
                &[],
                (1.0f32 / 0.07).ln(),
                crate::nn::params::Kind::Param { trainable: true },
            )?;
            Ok(TextTower { token_embedding, positional_embedding, blocks, ln_final, text_projection, logit_scale })
        })
    }

    /// ids [B,L] (i32), valid [B,L] (i32, nonzero = real token) -> hidden [B,L,embed].
    /// Every position, padding included, gets a hidden state (the official code uses them).
    pub fn forward(&self, g: &Graph, p: &Params, ids: &Tensor, valid: &Tensor) -> Result<Var> {
        let l = ids.shape()[1];
        let pos = g.narrow(&g.param(p, self.positional_embedding), 0, 0, l)?;
        let mut x = g.add(&g.embedding(ids, &g.param(p, self.token_embedding))?, &pos)?;
        let opts = MhaOpts { causal: true, key_valid: Some(valid), ..MhaOpts::default() };
        for b in &self.blocks {
            let h = b.ln_1.forward(g, p, &x)?;
            x = g.add(&x, &b.attn.forward(g, p, &h, &h, &opts)?)?;
            let h = b.ln_2.forward(g, p, &x)?;
            let h = b.c_proj.forward(g, p, &g.quick_gelu(&b.c_fc.forward(g, p, &h)?)?)?;
            x = g.add(&x, &h)?;
        }
        let x = self.ln_final.forward(g, p, &x)?;
        let proj_t = g.transpose_last(&g.param(p, self.text_projection))?; // [embed, width]
        g.linear(&x, &proj_t, None)
    }
}
