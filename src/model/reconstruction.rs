//! CVR / CLR reconstruction transformers: two stacks of post-LN (fairseq-style) decoder layers.
//! decoder1: x = LN(x + SA_w(x)); x = LN(x + FFN(x)) (its `encoder_attn` is registered, unused).
//! decoder2: x = LN(x + SA(x)); x = LN(x + CA_w(x, E)); x = LN(x + FFN(x)).
//! Every self-attention is causal; w conditions the keys (official: on the probabilities).

use crate::autograd::{Graph, Var};
use crate::error::Result;
use crate::nn::params::Params;
use crate::nn::{Builder, LayerNorm, Linear, Mha, MhaOpts};

struct Layer {
    self_attn: Mha,
    self_attn_layer_norm: LayerNorm,
    encoder_attn: Mha,
    encoder_attn_layer_norm: LayerNorm,
    fc1: Linear,
    fc2: Linear,
    final_layer_norm: LayerNorm,
}

impl Layer {
    fn new(bd: &mut Builder, name: &str, d: usize, heads: usize, ffn: usize) -> Result<Layer> {
        bd.scope(name, |bd| {
            Ok(Layer {
                self_attn: Mha::new(bd, "self_attn", d, heads)?,
                self_attn_layer_norm: LayerNorm::new(bd, "self_attn_layer_norm", d)?,
                encoder_attn: Mha::new(bd, "encoder_attn", d, heads)?,
                encoder_attn_layer_norm: LayerNorm::new(bd, "encoder_attn_layer_norm", d)?,
                fc1: Linear::new(bd, "fc1", d, ffn, true)?,
                fc2: Linear::new(bd, "fc2", ffn, d, true)?,
                final_layer_norm: LayerNorm::new(bd, "final_layer_norm", d)?,
            })
        })
    }

    /// `memory` = None: a decoder1 layer (self-attention conditioned by w); Some(E): a decoder2
    /// layer (plain causal self-attention, cross-attention to E conditioned by w).
    fn forward(
        &self,
        g: &Graph,
        p: &Params,
        x: &Var,
        memory: Option<&Var>,
        w: &Var,
        t: &RecTransformer,
    ) -> Result<Var> {
        let on_logits = t.on_logits;
        let cond = MhaOpts { condition: Some(w), condition_on_logits: on_logits, ..MhaOpts::default() };
        let self_opts = if memory.is_none() {
            MhaOpts { causal: t.causal, ..cond }
        } else {
            MhaOpts { causal: t.causal, ..MhaOpts::default() }
        };
        // dropout on each sub-layer's output before its residual add (official 0.1)
        let h = g.dropout(&self.self_attn.forward(g, p, x, x, &self_opts)?, t.dropout)?;
        let mut x = self.self_attn_layer_norm.forward(g, p, &g.add(x, &h)?)?;
        if let Some(e) = memory {
            let cross = MhaOpts { condition: Some(w), condition_on_logits: on_logits, ..MhaOpts::default() };
            let h = g.dropout(&self.encoder_attn.forward(g, p, &x, e, &cross)?, t.dropout)?;
            x = self.encoder_attn_layer_norm.forward(g, p, &g.add(&x, &h)?)?;
        }
        let h = g.dropout(&self.fc2.forward(g, p, &self.fc1.forward_relu(g, p, &x)?)?, t.dropout)?;
        self.final_layer_norm.forward(g, p, &g.add(&x, &h)?)
    }
}

pub struct RecTransformer {
    decoder1: Vec<Layer>,
    decoder2: Vec<Layer>,
    pub on_logits: bool,
    /// Causal self-attention (official); false = the paper's bidirectional reading.
    pub causal: bool,
    pub dropout: f32,
}

impl RecTransformer {
    pub fn new(
        bd: &mut Builder,
        name: &str,
        d: usize,
        heads: usize,
        ffn: usize,
        layers: usize,
    ) -> Result<RecTransformer> {
        bd.scope(name, |bd| {
            let mut stack = |nm: &str| {
                bd.scope(nm, |bd| {
                    bd.scope("decoder_layers", |bd| {
                        (0..layers).map(|i| Layer::new(bd, &i.to_string(), d, heads, ffn)).collect::<Result<Vec<_>>>()
                    })
                })
            };
            let decoder1 = stack("decoder1")?;
            let decoder2 = stack("decoder2")?;
            Ok(RecTransformer { decoder1, decoder2, on_logits: false, causal: true, dropout: 0.0 })
        })
    }

    /// (E = decoder1(src), decoder2(query, E)); w [B, S] conditions src's positions.
    pub fn forward(&self, g: &Graph, p: &Params, src: &Var, query: &Var, w: &Var) -> Result<(Var, Var)> {
        let mut e = src.clone();
        for l in &self.decoder1 {
            e = l.forward(g, p, &e, None, w, self)?;
        }
        let mut x = query.clone();
        for l in &self.decoder2 {
            x = l.forward(g, p, &x, Some(&e), w, self)?;
        }
        Ok((e, x))
    }
}
