//! The autograd tape: a `Graph` runs ops on `Var`s and, when it records, keeps each op's backward
//! closure next to the op (`ops.rs`). `backward` runs the closures in reverse order; each closure is
//! consumed as it runs, so the activations it captured are freed as soon as the backward pass has
//! gone past them. Gradients of a var used twice accumulate with `+=`.
//!
//! An evaluation graph (`Graph::eval`) records nothing: each op is the plain kernel call, no
//! closure is built, no tensor is kept, and no id is handed out. Without the `train` cargo
//! feature the tape itself is not compiled (no node storage, no `backward`): the inference build
//! carries only the forward ops.

pub mod count;
mod ops;
pub mod precision;
mod saved;

#[cfg(feature = "train")]
use crate::error::Error;
use crate::error::Result;
use crate::nn::params::{ParamId, Params};
#[cfg(feature = "train")]
use crate::ops::elementwise;
use crate::tensor::Tensor;
use std::cell::{Cell, RefCell};

#[cfg(feature = "autocast")]
pub use ops::with_backward_chunk_bytes;
pub use ops::Attention;
pub use precision::Precision;

/// What an f32 op reads of a var (`Var::wide`): a `Cow` with autocast (a bf16-stored var widened),
/// a plain reference without (no bf16 value exists there).
#[cfg(feature = "autocast")]
pub(crate) type Wide<'a> = std::borrow::Cow<'a, Tensor>;
#[cfg(not(feature = "autocast"))]
pub(crate) type Wide<'a> = &'a Tensor;

/// A tensor in a graph. `id` is set when the graph records and the value depends on a trainable
/// parameter (so it needs a gradient); everything else is a constant to the tape.
#[derive(Clone, Debug)]
pub struct Var {
    t: Tensor,
    id: Option<usize>,
    /// Its values are bf16 numbers (bf16 autocast stored them): `t` is a bf16 tensor (in the
    /// error model of `with_bf16_perturbation`, f32 values perturbed as a store would). An
    /// autocast op reads it as is, an f32 op widens it, a backward keeps it as it is (`saved.rs`).
    bf16: bool,
    /// The f32 parameter this var is (or, at bf16, was rounded from): alive for the whole step
    /// as the optimiser's master weight, so a backward re-rounds it instead of keeping a copy.
    #[cfg(feature = "autocast")]
    master: Option<Tensor>,
    /// A parameter's bf16 copy kept by its `Params` (`Params::bf16_copy`), read by bf16
    /// autocast instead of rounding the value again (evaluation graphs only).
    #[cfg(feature = "autocast")]
    kept_bf16: Option<Tensor>,
}

impl Var {
    /// A value the tape does not differentiate (inputs, frozen weights, masks).
    fn new(t: Tensor, id: Option<usize>) -> Var {
        Var {
            t,
            id,
            bf16: false,
            #[cfg(feature = "autocast")]
            master: None,
            #[cfg(feature = "autocast")]
            kept_bf16: None,
        }
    }
    pub fn constant(t: Tensor) -> Var {
        Var::new(t, None)
    }
    /// The tensor as the graph stores it: a bf16 tensor for a value bf16 autocast stored
    /// (`to_f32` reads any var in f32).
    pub fn tensor(&self) -> &Tensor {
        &self.t
    }
    /// The values in f32: a bf16-stored var widened (a new tensor), an f32 one as is.
    pub fn to_f32(&self) -> Result<Tensor> {
        saved::widen(&self.t)
    }
    /// What an f32 op reads: the tensor itself, or its f32 widening for a bf16-stored var.
    #[cfg(feature = "autocast")]
    #[inline(always)]
    pub(crate) fn wide(&self) -> Result<Wide<'_>> {
        if self.t.dtype() == crate::tensor::DType::BF16 {
            return Ok(std::borrow::Cow::Owned(saved::widen(&self.t)?));
        }
        Ok(std::borrow::Cow::Borrowed(&self.t))
    }
    /// A build without autocast stores no bf16 value: an op reads the tensor itself (no code in
    /// reclmis-infer).
    #[cfg(not(feature = "autocast"))]
    #[inline(always)]
    pub(crate) fn wide(&self) -> Result<Wide<'_>> {
        Ok(&self.t)
    }
    pub fn into_tensor(self) -> Tensor {
        self.t
    }
    pub fn shape(&self) -> &[usize] {
        self.t.shape()
    }
    pub fn tracked(&self) -> bool {
        self.id.is_some()
    }
}

#[cfg(feature = "train")]
type Backward = Box<dyn FnOnce(&Tensor) -> Result<Vec<Option<Tensor>>>>;

#[cfg(feature = "train")]
struct Node {
    out: usize,
    /// Each input's var id (None: a constant) and whether it holds bf16 values (its gradient
    /// is then stored in bf16 too).
    inputs: Vec<(Option<usize>, bool)>,
    backward: Backward,
}

/// How a graph runs: `train` selects batch statistics in batch norm (and running-statistics
/// updates); `record` keeps the backward closures.
pub struct Graph {
    train: bool,
    record: bool,
    #[cfg(feature = "train")]
    nodes: RefCell<Vec<Node>>,
    next_id: Cell<usize>,
    /// (var id, parameter) of every trainable parameter read while recording.
    leaves: RefCell<Vec<(usize, ParamId)>>,
    /// Batch-norm running statistics computed by a training forward, applied by the caller.
    buffer_updates: RefCell<Vec<(ParamId, Tensor)>>,
    /// Draws dropout masks (training graphs).
    dropout_rng: RefCell<crate::rng::Rng>,
    /// Autocast: which ops round to bf16 and which kernels the GEMM-like ops use.
    precision: Precision,
    /// `with_bf16_perturbation`: the signs' generator (None: autocast rounds).
    #[cfg(feature = "autocast")]
    perturb: RefCell<Option<crate::rng::Rng>>,
}

/// d loss / d parameter, by parameter.
pub struct Grads {
    by_param: Vec<Option<Tensor>>,
}

impl Grads {
    pub fn get(&self, p: ParamId) -> Option<&Tensor> {
        self.by_param.get(p.0).and_then(|g| g.as_ref())
    }
    pub fn into_vec(self) -> Vec<Option<Tensor>> {
        self.by_param
    }
}

impl Graph {
    fn new(train: bool, record: bool) -> Graph {
        Graph {
            train,
            record,
            #[cfg(feature = "train")]
            nodes: RefCell::new(Vec::new()),
            next_id: Cell::new(0),
            leaves: RefCell::new(Vec::new()),
            buffer_updates: RefCell::new(Vec::new()),
            dropout_rng: RefCell::new(crate::rng::Rng::new(0x0D80)),
            precision: Precision::F32,
            #[cfg(feature = "autocast")]
            perturb: RefCell::new(None),
        }
    }

    /// The error model of bf16 autocast, for deriving error bounds: the graph runs at bf16, but
    /// instead of rounding each autocast operand and output to bf16 it multiplies every element
    /// by 1 ± 2⁻⁸ (signs drawn from `seed`), the largest relative change one bf16 rounding makes
    /// (unit roundoff u = 2⁻⁸). A rounding changes an element by δ·x with |δ| ≤ u, typically
    /// much less (E δ² ≈ u²/3 for uniformly spread low bits), so the output error of this
    /// graph is a first-order measure of how much the network amplifies bf16's rounding.
    #[cfg(feature = "autocast")]
    pub fn with_bf16_perturbation(mut self, seed: u64) -> Graph {
        self.precision = Precision::Bf16;
        self.perturb = RefCell::new(Some(crate::rng::Rng::new(seed)));
        self
    }

    /// Runs the graph's ops at `p` (see `precision.rs` for what each precision changes). A build
    /// without the `autocast` feature (reclmis-infer) runs f32 only and refuses the others.
    pub fn with_precision(mut self, p: Precision) -> Result<Graph> {
        if !cfg!(feature = "autocast") && p != Precision::F32 {
            return Err(crate::error::Error::Unsupported {
                op: "autocast",
                detail: "tf32 and bf16: this build has no `autocast` feature (f32 only)".into(),
            });
        }
        self.precision = p;
        Ok(self)
    }
    pub fn precision(&self) -> Precision {
        self.precision
    }

    /// Seeds the dropout masks (a training step passes its own seed).
    pub fn with_dropout_seed(self, seed: u64) -> Graph {
        *self.dropout_rng.borrow_mut() = crate::rng::Rng::new(seed);
        self
    }

    /// Inverted dropout: in a training graph each element is kept with probability 1 − p and
    /// scaled by 1/(1 − p); elsewhere (and for p = 0) the identity.
    pub fn dropout(&self, x: &Var, p: f32) -> Result<Var> {
        if !self.train || p <= 0.0 {
            return Ok(x.clone());
        }
        // recorded, the backward draws the same mask again from the generator's state before
        // the draw instead of keeping it (a full-size f32 tensor per dropout until the backward)
        #[cfg(feature = "train")]
        if self.tracks(&[x]) {
            let state = self.dropout_rng.borrow().clone();
            let m = dropout_mask(&mut self.dropout_rng.borrow_mut(), p, x.shape(), x.t.device())?;
            let y = elementwise::mul(&*x.wide()?, &m)?;
            let (shape, dev) = (x.shape().to_vec(), x.t.device().clone());
            return Ok(self.record(&[x], y, move |dy| {
                let m = dropout_mask(&mut state.clone(), p, &shape, &dev)?;
                Ok(vec![Some(elementwise::mul(dy, &m)?)])
            }));
        }
        let m = dropout_mask(&mut self.dropout_rng.borrow_mut(), p, x.shape(), x.t.device())?;
        self.mul(x, &Var::constant(m))
    }
    /// Evaluation: running statistics, nothing recorded.
    pub fn eval() -> Graph {
        Self::new(false, false)
    }
    /// Training: batch statistics, every op recorded for `backward`.
    #[cfg(feature = "train")]
    pub fn train() -> Graph {
        Self::new(true, true)
    }
    /// Batch statistics without recording (e.g. a validation pass that mimics training).
    pub fn train_no_grad() -> Graph {
        Self::new(true, false)
    }
    pub fn is_train(&self) -> bool {
        self.train
    }

    fn fresh_id(&self) -> usize {
        let id = self.next_id.get();
        self.next_id.set(id + 1);
        id
    }

    /// Reads a parameter: a leaf of the tape when recording and the parameter is trainable.
    pub fn param(&self, params: &Params, p: ParamId) -> Var {
        let t = params.value(p).clone();
        let id = if self.record && params.trainable(p) {
            let id = self.fresh_id();
            self.leaves.borrow_mut().push((id, p));
            Some(id)
        } else {
            None
        };
        #[cfg(feature = "autocast")]
        {
            // an evaluation graph at bf16 reads the params' kept copy; if making it fails, the
            // autocast read rounds the value itself and reports the error there
            let kept = (!self.record && self.precision == Precision::Bf16 && self.perturb.borrow().is_none())
                .then(|| params.bf16_copy(p).ok())
                .flatten();
            if self.record {
                params.drop_bf16_copy(p);
            }
            Var { master: Some(t.clone()), kept_bf16: kept, ..Var::new(t, id) }
        }
        #[cfg(not(feature = "autocast"))]
        Var::new(t, id)
    }

    /// True when the op on these inputs must be recorded.
    fn tracks(&self, inputs: &[&Var]) -> bool {
        cfg!(feature = "train") && self.record && inputs.iter().any(|v| v.id.is_some())
    }

    /// Wraps an op's output; records its backward when any input is tracked. The closure gets
    /// d out and returns one gradient per input (None = no gradient, e.g. a constant).
    fn record(
        &self,
        inputs: &[&Var],
        out: Tensor,
        backward: impl FnOnce(&Tensor) -> Result<Vec<Option<Tensor>>> + 'static,
    ) -> Var {
        #[cfg(feature = "train")]
        if self.tracks(inputs) {
            let id = self.fresh_id();
            self.nodes.borrow_mut().push(Node {
                out: id,
                inputs: inputs.iter().map(|v| (v.id, v.bf16)).collect(),
                backward: Box::new(backward),
            });
            return Var::new(out, Some(id));
        }
        #[cfg(not(feature = "train"))]
        let _ = (inputs, backward);
        Var::constant(out)
    }

    pub(crate) fn push_buffer_update(&self, p: ParamId, t: Tensor) {
        if self.train {
            self.buffer_updates.borrow_mut().push((p, t));
        }
    }

    /// A bf16 var's gradient as the backward keeps it: a bf16 tensor, or in the error model
    /// (`with_bf16_perturbation`) f32 times 1 ± u.
    #[cfg(feature = "train")]
    fn store_grad(&self, g: Tensor) -> Result<Tensor> {
        #[cfg(feature = "autocast")]
        if let Some(f) = self.perturbation(g.shape(), g.device())? {
            return elementwise::mul(&g, &f);
        }
        crate::ops::cast::cast(&g, crate::tensor::DType::BF16)
    }

    /// The running statistics the training forward computed (apply with `Params::set`).
    pub fn take_buffer_updates(&self) -> Vec<(ParamId, Tensor)> {
        std::mem::take(&mut self.buffer_updates.borrow_mut())
    }

    /// Runs the backward pass from a scalar loss (d loss = 1) and returns the parameters'
    /// gradients. Consumes the recorded closures (and with them the saved activations).
    #[cfg(feature = "train")]
    pub fn backward(&self, loss: &Var, n_params: usize) -> Result<Grads> {
        Ok(self.backward_watching(loss, n_params, &[])?.0)
    }

    /// `backward`, also returning d loss / d v for each var in `watch` (None when the loss does
    /// not depend on it): for tests and for explaining a model's decisions.
    #[cfg(feature = "train")]
    pub fn backward_watching(
        &self,
        loss: &Var,
        n_params: usize,
        watch: &[&Var],
    ) -> Result<(Grads, Vec<Option<Tensor>>)> {
        let Some(root) = loss.id else {
            return Err(Error::shape("backward", "the loss does not depend on any trainable parameter"));
        };
        if loss.t.numel() != 1 {
            return Err(Error::shape("backward", format!("the loss must be a scalar, got {:?}", loss.shape())));
        }
        let n = self.next_id.get();
        let mut grads: Vec<Option<Tensor>> = vec![None; n];
        grads[root] = Some(Tensor::from_vec(vec![1.0], loss.shape(), loss.t.device())?);
        let nodes = std::mem::take(&mut *self.nodes.borrow_mut());
        let watched: Vec<Option<usize>> = watch.iter().map(|v| v.id).collect();
        let mut kept: Vec<Option<Tensor>> = vec![None; watch.len()];
        for node in nodes.into_iter().rev() {
            let Some(dy) = grads[node.out].take() else { continue };
            let dy = widened(dy)?;
            for (k, w) in kept.iter_mut().zip(&watched) {
                if *w == Some(node.out) {
                    *k = Some(dy.clone());
                }
            }
            let gs = (node.backward)(&dy)?;
            drop(dy);
            for (&(inp, half), g) in node.inputs.iter().zip(gs) {
                if let (Some(i), Some(g)) = (inp, g) {
                    accumulate(&mut grads[i], g)?;
                    if half {
                        // the gradient of a bf16 value is a bf16 tensor: half the bytes while it
                        // waits for its producer's backward (rounded once per contribution)
                        grads[i] = grads[i].take().map(|g| self.store_grad(g)).transpose()?;
                    }
                }
            }
        }
        let mut by_param: Vec<Option<Tensor>> = vec![None; n_params];
        for (id, p) in self.leaves.borrow_mut().drain(..) {
            if let Some(g) = grads[id].take() {
                accumulate(&mut by_param[p.0], g)?;
            }
        }
        Ok((Grads { by_param }, kept))
    }
}

/// Inverted dropout's mask: 0 with probability p, else 1/(1 − p), one draw per element.
fn dropout_mask(rng: &mut crate::rng::Rng, p: f32, shape: &[usize], dev: &crate::device::Device) -> Result<Tensor> {
    let keep = 1.0 / (1.0 - p);
    let n: usize = shape.iter().product();
    let mask: Vec<f32> = (0..n).map(|_| if rng.uniform(0.0, 1.0) < p { 0.0 } else { keep }).collect();
    Tensor::from_vec(mask, shape, dev)
}

/// A gradient in f32 (a bf16 one widened).
#[cfg(feature = "train")]
fn widened(g: Tensor) -> Result<Tensor> {
    if g.dtype() == crate::tensor::DType::BF16 {
        crate::ops::cast::cast(&g, crate::tensor::DType::F32)
    } else {
        Ok(g)
    }
}

#[cfg(feature = "train")]
fn accumulate(slot: &mut Option<Tensor>, g: Tensor) -> Result<()> {
    *slot = Some(match slot.take() {
        None => g,
        Some(prev) => {
            let (prev, g) = (widened(prev)?, widened(g)?);
            if prev.shape() != g.shape() {
                return Err(Error::shape(
                    "backward",
                    format!("gradients {:?} and {:?} for one var", prev.shape(), g.shape()),
                ));
            }
            elementwise::add(&prev, &g)?
        }
    });
    Ok(())
}
