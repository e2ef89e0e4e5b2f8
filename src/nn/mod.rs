//! Modules with parameters. Each registers its tensors under the official key names through a
//! `Builder` (PyTorch's default initialisation) and runs on a `Graph`.

pub mod params;

use crate::autograd::{Attention, Graph, Var};
use crate::error::Result;
use crate::rng::Rng;
use params::{Kind, ParamId, Params};

/// Registers parameters under a key prefix ("up4.nConvs.0.").
pub struct Builder<'a> {
    pub params: &'a mut Params,
    pub rng: Rng,
    pub prefix: String,
    /// false: tensors are declared, not initialised (a model a checkpoint is about to fill).
    pub init: bool,
}

impl<'a> Builder<'a> {
    pub fn new(params: &'a mut Params, seed: u64) -> Builder<'a> {
        Builder { params, rng: Rng::new(seed), prefix: String::new(), init: true }
    }

    /// A builder that declares every tensor without values (see `Params::declare`).
    pub fn shell(params: &'a mut Params) -> Builder<'a> {
        Builder { params, rng: Rng::new(0), prefix: String::new(), init: false }
    }

    /// Runs `f` with `name.` appended to the prefix.
    pub fn scope<T>(&mut self, name: &str, f: impl FnOnce(&mut Self) -> Result<T>) -> Result<T> {
        let saved = self.prefix.clone();
        self.prefix = format!("{saved}{name}.");
        let r = f(self);
        self.prefix = saved;
        r
    }

    fn key(&self, name: &str) -> String {
        format!("{}{name}", self.prefix)
    }

    /// U(−bound, bound), PyTorch's default for weights (kaiming_uniform with a = √5 gives
    /// 1/√fan_in) and biases.
    pub fn uniform(&mut self, name: &str, shape: &[usize], bound: f32) -> Result<ParamId> {
        if !self.init {
            return self.params.declare(&self.key(name), shape, Kind::Param { trainable: true });
        }
        let n = shape.iter().product();
        let v = self.rng.vec(n, -bound, bound);
        self.params.add(&self.key(name), shape, v, Kind::Param { trainable: true })
    }

    /// Normal(0, std) by Box-Muller (embeddings, CLIP's projections).
    pub fn normal(&mut self, name: &str, shape: &[usize], std: f32) -> Result<ParamId> {
        if !self.init {
            return self.params.declare(&self.key(name), shape, Kind::Param { trainable: true });
        }
        let n: usize = shape.iter().product();
        let v = (0..n)
            .map(|_| {
                let u1 = self.rng.uniform(1e-7, 1.0);
                let u2 = self.rng.uniform(0.0, 1.0);
                std * (-2.0 * u1.ln()).sqrt() * (std::f32::consts::TAU * u2).cos()
            })
            .collect();
        self.params.add(&self.key(name), shape, v, Kind::Param { trainable: true })
    }

    /// A trainable tensor with the given initial values.
    pub fn values(&mut self, name: &str, shape: &[usize], values: Vec<f32>) -> Result<ParamId> {
        if !self.init {
            return self.params.declare(&self.key(name), shape, Kind::Param { trainable: true });
        }
        self.params.add(&self.key(name), shape, values, Kind::Param { trainable: true })
    }

    pub fn constant(&mut self, name: &str, shape: &[usize], value: f32, kind: Kind) -> Result<ParamId> {
        if !self.init {
            return self.params.declare(&self.key(name), shape, kind);
        }
        let n = shape.iter().product();
        self.params.add(&self.key(name), shape, vec![value; n], kind)
    }
}

pub struct Linear {
    pub w: ParamId,
    pub b: Option<ParamId>,
}

impl Linear {
    /// `weight [out, in]`, `bias [out]`.
    pub fn new(bd: &mut Builder, name: &str, d_in: usize, d_out: usize, bias: bool) -> Result<Linear> {
        bd.scope(name, |bd| {
            let bound = 1.0 / (d_in as f32).sqrt();
            let w = bd.uniform("weight", &[d_out, d_in], bound)?;
            let b = if bias { Some(bd.uniform("bias", &[d_out], bound)?) } else { None };
            Ok(Linear { w, b })
        })
    }
    pub fn forward(&self, g: &Graph, p: &Params, x: &Var) -> Result<Var> {
        let b = self.b.map(|b| g.param(p, b));
        g.linear(x, &g.param(p, self.w), b.as_ref())
    }
    /// ReLU(forward(x)), the ReLU fused into the product's epilogue.
    pub fn forward_relu(&self, g: &Graph, p: &Params, x: &Var) -> Result<Var> {
        let b = self.b.map(|b| g.param(p, b));
        g.linear_relu(x, &g.param(p, self.w), b.as_ref())
    }
}

/// Conv2d (odd square kernel, "same" padding) or Conv1d (`k1d`).
pub struct Conv {
    pub w: ParamId,
    pub b: Option<ParamId>,
    one_d: bool,
}

impl Conv {
    pub fn new2d(bd: &mut Builder, name: &str, ci: usize, co: usize, k: usize, bias: bool) -> Result<Conv> {
        Self::build(bd, name, &[co, ci, k, k], bias, false)
    }
    pub fn new1d(bd: &mut Builder, name: &str, ci: usize, co: usize, k: usize) -> Result<Conv> {
        Self::build(bd, name, &[co, ci, k], true, true)
    }
    fn build(bd: &mut Builder, name: &str, shape: &[usize], bias: bool, one_d: bool) -> Result<Conv> {
        let fan_in: usize = shape[1..].iter().product();
        let bound = 1.0 / (fan_in as f32).sqrt();
        let go = |bd: &mut Builder| {
            let w = bd.uniform("weight", shape, bound)?;
            let b = if bias { Some(bd.uniform("bias", &[shape[0]], bound)?) } else { None };
            Ok(Conv { w, b, one_d })
        };
        if name.is_empty() {
            go(bd)
        } else {
            bd.scope(name, go)
        }
    }
    pub fn forward(&self, g: &Graph, p: &Params, x: &Var) -> Result<Var> {
        let b = self.b.map(|b| g.param(p, b));
        let w = g.param(p, self.w);
        if self.one_d {
            g.conv1d(x, &w, b.as_ref())
        } else {
            g.conv2d(x, &w, b.as_ref())
        }
    }
    pub fn forward_cat(&self, g: &Graph, p: &Params, parts: &[&Var]) -> Result<Var> {
        let b = self.b.map(|b| g.param(p, b));
        g.conv2d_cat(parts, &g.param(p, self.w), b.as_ref())
    }
}

/// BatchNorm over dim 1 (eps 1e-5, momentum 0.1): weight, bias, running_mean, running_var and
/// the num_batches_tracked counter.
pub struct BatchNorm {
    ids: [ParamId; 4],
}

impl BatchNorm {
    pub fn new(bd: &mut Builder, name: &str, c: usize) -> Result<BatchNorm> {
        bd.scope(name, |bd| {
            let w = bd.constant("weight", &[c], 1.0, Kind::Param { trainable: true })?;
            let b = bd.constant("bias", &[c], 0.0, Kind::Param { trainable: true })?;
            let rm = bd.constant("running_mean", &[c], 0.0, Kind::Buffer)?;
            let rv = bd.constant("running_var", &[c], 1.0, Kind::Buffer)?;
            let key = bd.key("num_batches_tracked");
            bd.params.add_counter(&key);
            Ok(BatchNorm { ids: [w, b, rm, rv] })
        })
    }
    pub fn forward(&self, g: &Graph, p: &Params, x: &Var, relu: bool) -> Result<Var> {
        g.batch_norm(p, x, self.ids, relu)
    }
    /// On a value the caller gives up (evaluation writes the output over it where it can).
    pub fn forward_owned(&self, g: &Graph, p: &Params, x: Var, relu: bool) -> Result<Var> {
        g.batch_norm_owned(p, x, self.ids, relu)
    }
}

pub struct LayerNorm {
    w: ParamId,
    b: ParamId,
}

impl LayerNorm {
    pub fn new(bd: &mut Builder, name: &str, c: usize) -> Result<LayerNorm> {
        bd.scope(name, |bd| {
            let w = bd.constant("weight", &[c], 1.0, Kind::Param { trainable: true })?;
            let b = bd.constant("bias", &[c], 0.0, Kind::Param { trainable: true })?;
            Ok(LayerNorm { w, b })
        })
    }
    pub fn forward(&self, g: &Graph, p: &Params, x: &Var) -> Result<Var> {
        g.layer_norm(x, &g.param(p, self.w), &g.param(p, self.b))
    }
}

/// torch `nn.MultiheadAttention` parameters: packed `in_proj_weight [3d,d]` (rows q; k; v),
/// `in_proj_bias [3d]`, `out_proj` Linear(d, d). Logits q·k/√(d/heads).
pub struct Mha {
    in_w: ParamId,
    in_b: ParamId,
    out: Linear,
    d: usize,
    pub heads: usize,
}

/// Per-call options of `Mha::forward`.
#[derive(Default)]
pub struct MhaOpts<'a> {
    pub causal: bool,
    /// [B,S] i32 key mask (nonzero = attend).
    pub key_valid: Option<&'a crate::tensor::Tensor>,
    /// Per-key condition weights w [B,S] (official: on the probabilities).
    pub condition: Option<&'a Var>,
    pub condition_on_logits: bool,
}

impl Mha {
    pub fn new(bd: &mut Builder, name: &str, d: usize, heads: usize) -> Result<Mha> {
        bd.scope(name, |bd| {
            // xavier_uniform over [3d, d]; zero biases (torch's _reset_parameters)
            let bound = (6.0 / (4 * d) as f32).sqrt();
            let in_w = bd.uniform("in_proj_weight", &[3 * d, d], bound)?;
            let in_b = bd.constant("in_proj_bias", &[3 * d], 0.0, Kind::Param { trainable: true })?;
            let out = Linear::new(bd, "out_proj", d, d, true)?;
            Ok(Mha { in_w, in_b, out, d, heads })
        })
    }

    /// x [B,Tq,d] attends to mem [B,S,d].
    pub fn forward(&self, g: &Graph, p: &Params, x: &Var, mem: &Var, o: &MhaOpts) -> Result<Var> {
        let d = self.d;
        let (w, b) = (g.param(p, self.in_w), g.param(p, self.in_b));
        // rows [i·d, (i + n)·d) of the packed projection on inp in one product, split after it:
        // narrowing the weight would copy it on every call (the text tower's 12 layers copied
        // 36 MB per note), the outputs are small
        let proj = |i: usize, n: usize, inp: &Var| -> Result<Var> {
            if n == 3 {
                return g.linear(inp, &w, Some(&b));
            }
            g.linear(inp, &g.narrow(&w, 0, i * d, n * d)?, Some(&g.narrow(&b, 0, i * d, n * d)?))
        };
        let last = x.shape().len() - 1;
        // self-attention: q, k, v from one product; cross: q from x, k and v from one on mem
        let (q, kv, k0) = if std::ptr::eq(x, mem) {
            let qkv = proj(0, 3, x)?;
            (g.narrow(&qkv, last, 0, d)?, qkv, d)
        } else {
            (proj(0, 1, x)?, proj(1, 2, mem)?, 0)
        };
        let (k, v) = (g.narrow(&kv, last, k0, d)?, g.narrow(&kv, last, k0 + d, d)?);
        let a = Attention {
            heads: self.heads,
            causal: o.causal,
            key_valid: o.key_valid,
            condition: o.condition,
            condition_on_logits: o.condition_on_logits,
        };
        let h = g.attention(&q, &k, &v, &a)?;
        self.out.forward(g, p, &h)
    }
}
