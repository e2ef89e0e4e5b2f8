//! The graph's ops: each calls the kernel op and, when recording, keeps its backward closure right
//! here beside it. Closures capture only what their backward reads (cheap `Tensor` clones of
//! shared storage) and free it when they run. An op reads a var as `&*v.wide()?`: a bf16-stored
//! var widened to f32 (a `Cow`) with autocast, the tensor itself (a plain reference) without.
// the same `&*v.wide()?` and `.as_deref()` in both builds: without autocast they are no-ops
#![cfg_attr(not(feature = "autocast"), allow(clippy::borrow_deref_ref, clippy::needless_option_as_deref))]

use super::saved::Saved;
use super::{count, Graph, Var, Wide};
use crate::error::{Error, Result};
use crate::nn::params::{ParamId, Params};
use crate::ops::attention::{self, AttnOpts, Condition};
use crate::ops::ccl;
use crate::ops::conv;
use crate::ops::elementwise::{self as ew, BinaryOp, UnaryOp};
use crate::ops::embedding;
use crate::ops::gemm::{linear, Act, GemmAlgo};
use crate::ops::layer_norm;
use crate::ops::loss;
use crate::ops::norm::{self, BnOpts};
use crate::ops::plam::{self, PlamWeights};
use crate::ops::pool;
use crate::ops::reduce;
use crate::ops::softmax;
use crate::ops::transpose;
use crate::tensor::Tensor;

/// Attention options whose tensors live in the graph (the condition weights get a gradient).
pub struct Attention<'a> {
    pub heads: usize,
    pub causal: bool,
    /// [B,S] i32, nonzero = the key takes part.
    pub key_valid: Option<&'a Tensor>,
    /// Official condition: P ← P·(w + 1e-10), renormalised. w [B,S].
    pub condition: Option<&'a Var>,
    /// The paper's reading instead: logits multiplied by w before the softmax.
    pub condition_on_logits: bool,
}

/// A value an op stores in bf16 (autocast at bf16): rounded, or in the error model multiplied by
/// 1 ± u. (Its gradient is stored in bf16 by the tape: the output var is marked `bf16`.) A build
/// without autocast has no such value: the type is empty there.
enum Store {
    #[cfg(feature = "autocast")]
    Round,
    #[cfg(feature = "autocast")]
    Perturb(Tensor),
}

impl Store {
    /// The value as stored: a bf16 tensor (in the error model, f32 times 1 ± u).
    #[cfg(feature = "autocast")]
    fn stored(&self, t: &Tensor) -> Result<Tensor> {
        match self {
            Store::Round => crate::ops::cast::cast(t, crate::tensor::DType::BF16),
            Store::Perturb(f) => ew::mul(t, f),
        }
    }
    /// The stored value as f32 math reads it back (f32 storage of the rounded values).
    #[cfg(feature = "autocast")]
    fn value(&self, t: &Tensor) -> Result<Tensor> {
        match self {
            Store::Round => round_to_bf16(t),
            Store::Perturb(f) => ew::mul(t, f),
        }
    }
    #[cfg(not(feature = "autocast"))]
    fn stored(&self, _: &Tensor) -> Result<Tensor> {
        match *self {}
    }
    #[cfg(not(feature = "autocast"))]
    fn value(&self, _: &Tensor) -> Result<Tensor> {
        match *self {}
    }
}

/// f32 → bf16 → f32 (round to nearest even, as `ops::cast`), off the tape: one pass on the cpu,
/// the two cast kernels elsewhere.
#[cfg(feature = "autocast")]
fn round_to_bf16(t: &Tensor) -> Result<Tensor> {
    use crate::tensor::DType;
    if let (crate::device::Device::Cpu, Ok(v)) = (t.device(), t.cpu_f32("round_to_bf16")) {
        use rayon::prelude::*;
        let r: Vec<f32> = v.par_iter().map(|&x| half::bf16::from_f32(x).to_f32()).collect();
        return Tensor::from_vec(r, t.shape(), t.device());
    }
    crate::ops::cast::cast(&crate::ops::cast::cast(t, DType::BF16)?, DType::F32)
}

/// (x, w, dy, with_bias, algo) -> (dx, dw, db)
type WeightedBackward = fn(&Tensor, &Tensor, &Tensor, bool, GemmAlgo) -> Result<(Tensor, Tensor, Option<Tensor>)>;
/// The bf16 form: (x, w, dy, with_bias) -> (dx, dw, db).
#[cfg(feature = "autocast")]
type BackwardBf16 = fn(&Tensor, &Tensor, &Tensor, bool) -> Result<(Tensor, Tensor, Option<Tensor>)>;

/// What the backward of an op with a fused activation keeps to mask dy by: its output (ReLU:
/// y > 0 iff its input was), as the unfused ReLU keeps it.
fn activation_mask(act: Act, y: &Tensor) -> Option<Saved> {
    (act == Act::Relu).then(|| Saved::new(y.clone()))
}

/// dy masked by the kept output (None: no activation, dy as is), by the unfused ReLU's backward.
fn masked_by(mask: Option<Saved>, dy: &Tensor) -> Result<Option<Tensor>> {
    mask.map(|m| {
        let y = m.get()?;
        ew::unary_backward(UnaryOp::Relu, &y, &y, dy)
    })
    .transpose()
}

/// Multiply-adds of Linear and the convolutions: each output element is a dot product over
/// one output channel's weights (w [Co, ...]).
fn weighted_macs(y: &Tensor, w: &Tensor) -> u64 {
    let per_out = w.numel() / w.shape().first().copied().unwrap_or(1).max(1);
    (y.numel() * per_out) as u64
}

/// A bf16-autocast backward on widened operands whose saved input is bf16 works through the
/// batch in chunks of at most this many bytes of f32 input (widened) when the whole batch is
/// larger: its f32 temporaries (the widened input, the op's f32 gradient) then exist for one
/// chunk, not the batch. (At the official size a batch-8 step's bf16 peak was once the
/// decoder's last PLAM backward on widened copies, five full-resolution f32 tensors above the
/// saved state; that backward is bf16 throughout now, `ops::plam::bf16`.)
#[cfg(feature = "autocast")]
const CHUNK_BYTES: usize = 32 << 20;

#[cfg(feature = "autocast")]
thread_local! {
    static CHUNK_OVERRIDE: std::cell::Cell<Option<usize>> = const { std::cell::Cell::new(None) };
}

/// Runs `f` with the chunked backwards' chunk size at `bytes` on this thread (tests reach the
/// chunked path with small tensors).
#[cfg(feature = "autocast")]
pub fn with_backward_chunk_bytes<R>(bytes: usize, f: impl FnOnce() -> R) -> R {
    let old = CHUNK_OVERRIDE.with(|c| c.replace(Some(bytes)));
    let r = f();
    CHUNK_OVERRIDE.with(|c| c.set(old));
    r
}

/// Images per chunk for a chunked backward over `x` [B, ...] (B: no chunks).
#[cfg(feature = "autocast")]
fn chunk_images(x: &Tensor) -> usize {
    let b = x.shape().first().copied().unwrap_or(1).max(1);
    let per_image = 4 * x.numel() / b;
    let budget = CHUNK_OVERRIDE.with(|c| c.get()).unwrap_or(CHUNK_BYTES);
    if per_image * b <= budget {
        b
    } else {
        (budget / per_image.max(1)).clamp(1, b)
    }
}

/// A backward over bf16 `x` [B, ...] (and f32 `dy` of the same batch) by chunks of `nb` images:
/// `step` gets each chunk's x widened to f32 and its dy, and returns the chunk's input gradient
/// and its other gradients; the input gradient is assembled in bf16 (as the tape keeps a bf16
/// value's gradient), the others are summed over the chunks in f32. Returns [dx, others...].
#[cfg(feature = "autocast")]
fn by_chunks(
    x: &Tensor,
    dy: &Tensor,
    nb: usize,
    mut step: impl FnMut(&Tensor, &Tensor) -> Result<(Tensor, Vec<Option<Tensor>>)>,
) -> Result<Vec<Option<Tensor>>> {
    use crate::ops::cast::{cast_batch, cast_batch_into};
    use crate::tensor::DType::{BF16, F32};
    let b = x.shape()[0];
    let mut dx = Tensor::empty(x.shape(), BF16, x.device())?;
    let mut sums: Vec<Option<Tensor>> = Vec::new();
    for b0 in (0..b).step_by(nb) {
        let n = nb.min(b - b0);
        let xc = cast_batch(x, b0, n, F32)?;
        let (dxc, others) = step(&xc, &cast_batch(dy, b0, n, F32)?)?;
        drop(xc);
        cast_batch_into(&dxc, &mut dx, b0)?;
        sums.resize(others.len(), None);
        for (acc, g) in sums.iter_mut().zip(others) {
            *acc = match (acc.take(), g) {
                (Some(a), Some(g)) => Some(ew::add(&a, &g)?),
                (a, g) => a.or(g),
            };
        }
    }
    Ok(std::iter::once(Some(dx)).chain(sums).collect())
}

/// dy · s for a scalar dy (device-resident, no host round trip).
fn times_scalar(g: &Tensor, dy: &Tensor) -> Result<Tensor> {
    ew::mul(g, &dy.reshape(&[])?)
}

/// An optional operand (a bias) in f32.
fn f32_of(b: Option<&Var>) -> Result<Option<Wide<'_>>> {
    b.map(Var::wide).transpose()
}

impl Graph {
    // ---- autocast (precision.rs) ----------------------------------------------------------------

    /// The kernels' algorithm at this graph's precision.
    pub(crate) fn algo(&self) -> GemmAlgo {
        #[cfg(feature = "autocast")]
        return self.precision.algo();
        // `with_precision` accepts only f32 in this build: the algorithm is a constant
        #[cfg(not(feature = "autocast"))]
        GemmAlgo::Auto
    }

    /// Runs the autocast op `op` on `ins` as this graph's precision reads and stores them: at
    /// bf16 each operand is rounded to bf16 and so is the output (bf16 tensors, marked `bf16`, so
    /// the tape stores their gradients in bf16 too); the op reads them widened to f32, so every
    /// device runs its f32 kernels on exactly the bf16 operands. Otherwise `op(ins)`.
    fn autocast(&self, ins: &[&Var], op: impl FnOnce(&[&Var]) -> Result<Var>) -> Result<Var> {
        #[cfg(feature = "autocast")]
        if self.precision == super::Precision::Bf16 {
            // a value already stored in bf16 (a batch norm's output, pooled from one) is read as is
            let rounded = ins.iter().map(|v| self.autocast_read(v)).collect::<Result<Vec<Var>>>()?;
            let y = op(&rounded.iter().collect::<Vec<&Var>>())?;
            return self.round_bf16_owned(y);
        }
        op(ins)
    }

    /// An autocast operand as bf16 autocast reads it: as is when it already holds bf16 values.
    #[cfg(feature = "autocast")]
    fn autocast_read(&self, x: &Var) -> Result<Var> {
        if x.bf16 {
            Ok(x.clone())
        } else if let Some(kept) = &x.kept_bf16 {
            // a parameter's copy kept by its Params (evaluation graphs: nothing to record)
            Ok(Var { t: kept.clone(), bf16: true, kept_bf16: None, ..x.clone() })
        } else {
            let mut y = self.round_bf16(x)?;
            // a weight's copy: a backward rounds the master again instead of keeping it
            y.master = x.master.clone();
            Ok(y)
        }
    }

    /// `x` stored in bf16 and read back, on the tape (the output is marked `bf16`: the tape
    /// rounds its gradient as it stores it); in the error model (`with_bf16_perturbation`)
    /// multiplied by 1 ± u instead.
    #[cfg(feature = "autocast")]
    fn round_bf16(&self, x: &Var) -> Result<Var> {
        let mut y = match self.perturbation(x.shape(), x.t.device())? {
            Some(f) => self.mul(x, &Var::constant(f))?,
            None => {
                // a copy: x itself may be read elsewhere
                let y = crate::ops::cast::cast(&x.t, crate::tensor::DType::BF16)?;
                // the gradient of the (marked) output is rounded by the tape as it is stored
                self.record(&[x], y, |dy| Ok(vec![Some(dy.clone())]))
            }
        };
        y.bf16 = true;
        Ok(y)
    }

    /// `round_bf16` of a value nothing else holds (an autocast op's fresh output): the var
    /// itself becomes bf16, no second tape node.
    #[cfg(feature = "autocast")]
    fn round_bf16_owned(&self, mut x: Var) -> Result<Var> {
        if self.perturb.borrow().is_none() {
            x.t = crate::ops::cast::cast(&x.t, crate::tensor::DType::BF16)?;
            // same var, same tape node: its gradient is rounded by the tape (marked bf16)
            x.bf16 = true;
            return Ok(x);
        }
        self.round_bf16(&x)
    }

    /// An f32 result whose values are bf16 numbers (ReLU, pooling, upsampling of a bf16 value)
    /// stored as its input was: a bf16 tensor (exact), or in the error model f32 as is.
    #[cfg(feature = "autocast")]
    fn keep_bf16(&self, y: Tensor) -> Result<Tensor> {
        if self.perturb.borrow().is_none() && y.dtype() == crate::tensor::DType::F32 {
            return crate::ops::cast::cast(&y, crate::tensor::DType::BF16);
        }
        Ok(y)
    }

    /// The error model's factors 1 ± 2⁻⁸ for one stored tensor (None: the graph rounds).
    #[cfg(feature = "autocast")]
    pub(super) fn perturbation(&self, shape: &[usize], dev: &crate::device::Device) -> Result<Option<Tensor>> {
        let mut p = self.perturb.borrow_mut();
        let Some(rng) = p.as_mut() else { return Ok(None) };
        const U: f32 = 1.0 / 256.0;
        let n: usize = shape.iter().product();
        let f: Vec<f32> = (0..n).map(|_| if rng.next_u64() & 1 == 0 { 1.0 - U } else { 1.0 + U }).collect();
        Ok(Some(Tensor::from_vec(f, shape, dev)?))
    }

    /// How an op that stores its output in bf16 makes it. `None` at f32 and tf32.
    fn bf16_store(&self, shape: &[usize], dev: &crate::device::Device) -> Result<Option<Store>> {
        #[cfg(feature = "autocast")]
        if self.precision == super::Precision::Bf16 {
            return Ok(Some(match self.perturbation(shape, dev)? {
                Some(f) => Store::Perturb(f),
                None => Store::Round,
            }));
        }
        let _ = (shape, dev);
        Ok(None)
    }

    /// An op's output as the graph stores it: at bf16 a bf16 tensor (in the error model f32
    /// times 1 ± u) and true (mark the var `bf16`), else as is and false.
    fn stored(&self, y: Tensor) -> Result<(Tensor, bool)> {
        match self.bf16_store(y.shape(), y.device())? {
            Some(s) => Ok((s.stored(&y)?, true)),
            None => Ok((y, false)),
        }
    }

    /// What a backward closure keeps of `v`: the tensor as the graph stores it (a bf16 value
    /// stays bf16, no copy); a weight's bf16 copy nothing (its f32 master, rounded again when
    /// read); bf16 values held in f32 (PLAM's a and m) packed to bf16 (half the bytes, exact).
    fn save(&self, v: &Var) -> Result<Saved> {
        #[cfg(feature = "autocast")]
        if v.bf16 && self.perturb.borrow().is_none() {
            if let Some(m) = &v.master {
                return Ok(Saved::Rounded(m.clone()));
            }
            if v.t.dtype() == crate::tensor::DType::F32 {
                return Ok(Saved::new(crate::ops::cast::cast(&v.t, crate::tensor::DType::BF16)?));
            }
        }
        Ok(Saved::new(v.t.clone()))
    }

    // ---- elementwise ------------------------------------------------------------------------

    fn unary(&self, x: &Var, op: UnaryOp) -> Result<Var> {
        let y = ew::unary(&*x.wide()?, op)?;
        // max(x, 0) of a bf16 value is a bf16 value
        let exact = x.bf16 && op == UnaryOp::Relu;
        #[cfg(feature = "autocast")]
        let y = if exact { self.keep_bf16(y)? } else { y };
        if !self.tracks(&[x]) {
            let mut v = Var::constant(y);
            v.bf16 = exact;
            return Ok(v);
        }
        // the backward keeps the one operand its derivative reads (ReLU: y > 0 iff x > 0)
        let kept = match op {
            UnaryOp::Relu | UnaryOp::Sigmoid | UnaryOp::Exp => Some(Saved::new(y.clone())),
            UnaryOp::Log | UnaryOp::Gelu | UnaryOp::QuickGelu => Some(self.save(x)?),
            UnaryOp::Scale(_) | UnaryOp::AddScalar(_) => None,
        };
        let mut out = self.record(&[x], y, move |dy| {
            // the unused operand's slot gets the kept one (or dy): only its shape is read
            let k = kept.as_ref().map(Saved::get).transpose()?.unwrap_or_else(|| dy.clone());
            Ok(vec![Some(ew::unary_backward(op, &k, &k, dy)?)])
        });
        out.bf16 = exact;
        Ok(out)
    }
    pub fn relu(&self, x: &Var) -> Result<Var> {
        self.unary(x, UnaryOp::Relu)
    }
    pub fn sigmoid(&self, x: &Var) -> Result<Var> {
        self.unary(x, UnaryOp::Sigmoid)
    }
    pub fn quick_gelu(&self, x: &Var) -> Result<Var> {
        self.unary(x, UnaryOp::QuickGelu)
    }
    pub fn scale(&self, x: &Var, s: f32) -> Result<Var> {
        self.unary(x, UnaryOp::Scale(s))
    }

    fn binary(&self, a: &Var, b: &Var, op: BinaryOp) -> Result<Var> {
        // f32, bf16 operands or not: a residual stream stays f32, as in PyTorch's autocast (stored
        // in bf16, the quickstart's two seeds averaged 0.015 lower test Dice and a 0.05 smaller
        // note gap than this; BENCHMARKS.md)
        let y = ew::binary(&*a.wide()?, &*b.wide()?, op)?;
        if !self.tracks(&[a, b]) {
            return Ok(Var::constant(y));
        }
        if let BinaryOp::Add | BinaryOp::Sub = op {
            // the gradients need only the shapes: keeping the operands would hold them (a
            // residual stream's activations) until the backward
            let (sa, sb) = (a.shape().to_vec(), b.shape().to_vec());
            return Ok(self.record(&[a, b], y, move |dy| {
                let db = if op == BinaryOp::Sub { ew::scale(dy, -1.0)? } else { dy.clone() };
                Ok(vec![Some(reduce::sum_to_shape(dy, &sa)?), Some(reduce::sum_to_shape(&db, &sb)?)])
            }));
        }
        if op == BinaryOp::Mul {
            // d/da = dy·b, d/db = dy·a: an operand is kept only for the other's gradient (a
            // dropout mask or a constant weight needs no gradient, so its partner is not kept)
            let (sa, sb) = (a.shape().to_vec(), b.shape().to_vec());
            let keep_a = if b.tracked() { Some(self.save(a)?) } else { None };
            let keep_b = if a.tracked() { Some(self.save(b)?) } else { None };
            return Ok(self.record(&[a, b], y, move |dy| {
                let ga = match &keep_b {
                    Some(b) => Some(reduce::sum_to_shape(&ew::mul(dy, &b.get()?)?, &sa)?),
                    None => None,
                };
                let gb = match &keep_a {
                    Some(a) => Some(reduce::sum_to_shape(&ew::mul(dy, &a.get()?)?, &sb)?),
                    None => None,
                };
                Ok(vec![ga, gb])
            }));
        }
        let (at, bt) = (self.save(a)?, self.save(b)?);
        Ok(self.record(&[a, b], y, move |dy| {
            let (da, db) = ew::binary_backward(op, &at.get()?, &bt.get()?, dy)?;
            Ok(vec![Some(da), Some(db)])
        }))
    }
    /// Broadcasting a + b.
    pub fn add(&self, a: &Var, b: &Var) -> Result<Var> {
        self.binary(a, b, BinaryOp::Add)
    }
    pub fn sub(&self, a: &Var, b: &Var) -> Result<Var> {
        self.binary(a, b, BinaryOp::Sub)
    }
    /// Broadcasting a · b.
    pub fn mul(&self, a: &Var, b: &Var) -> Result<Var> {
        self.binary(a, b, BinaryOp::Mul)
    }

    // ---- shapes -----------------------------------------------------------------------------

    /// `x` as another float type (`ops::cast`); the gradient goes back in `x`'s type.
    pub fn cast(&self, x: &Var, to: crate::tensor::DType) -> Result<Var> {
        let y = crate::ops::cast::cast(&x.t, to)?;
        let from = x.t.dtype();
        Ok(self.record(&[x], y, move |dy| Ok(vec![Some(crate::ops::cast::cast_backward(dy, from)?)])))
    }

    pub fn reshape(&self, x: &Var, shape: &[usize]) -> Result<Var> {
        let y = x.t.reshape(shape)?;
        let in_shape = x.shape().to_vec();
        let mut y = self.record(&[x], y, move |dy| Ok(vec![Some(dy.reshape(&in_shape)?)]));
        // the same values (and storage)
        y.bf16 = x.bf16;
        Ok(y)
    }

    pub fn permute(&self, x: &Var, perm: &[usize]) -> Result<Var> {
        let y = transpose::permute(&*x.wide()?, perm)?;
        let perm = perm.to_vec();
        Ok(self.record(&[x], y, move |dy| Ok(vec![Some(transpose::permute_backward(dy, &perm)?)])))
    }

    /// Swaps the last two dims.
    pub fn transpose_last(&self, x: &Var) -> Result<Var> {
        let r = x.t.rank();
        if r < 2 {
            return Err(Error::shape("transpose_last", format!("{:?} has fewer than two dims", x.shape())));
        }
        let mut perm: Vec<usize> = (0..r).collect();
        perm.swap(r - 2, r - 1);
        self.permute(x, &perm)
    }

    pub fn narrow(&self, x: &Var, axis: usize, start: usize, len: usize) -> Result<Var> {
        let y = transpose::narrow(&*x.wide()?, axis, start, len)?;
        let in_shape = x.shape().to_vec();
        Ok(self.record(&[x], y, move |dy| Ok(vec![Some(transpose::narrow_backward(dy, &in_shape, axis, start)?)])))
    }

    /// Softmax over the last dim.
    pub fn softmax(&self, x: &Var) -> Result<Var> {
        let y = softmax::softmax(&*x.wide()?)?;
        if !self.tracks(&[x]) {
            return Ok(Var::constant(y));
        }
        let yt = y.clone();
        Ok(self.record(&[x], y, move |dy| Ok(vec![Some(softmax::softmax_backward(&yt, dy, false)?)])))
    }

    /// Mean of every element, as a scalar [].
    pub fn mean_all(&self, x: &Var) -> Result<Var> {
        let flat = x.wide()?.reshape(&[x.t.numel()])?;
        let y = reduce::mean(&flat, 0)?.reshape(&[])?;
        let in_shape = x.shape().to_vec();
        let n = x.t.numel();
        Ok(self.record(&[x], y, move |dy| {
            let d = reduce::reduce_backward(reduce::ReduceOp::Mean, &dy.reshape(&[1])?, None, &[n], 0)?;
            Ok(vec![Some(d.reshape(&in_shape)?)])
        }))
    }

    // ---- layers -----------------------------------------------------------------------------

    /// Records y = f(x, w, b) whose backward gives (dx, dw, db): Linear and the convolutions.
    /// `act` is the activation the forward fused (its output y is then what the backward masks
    /// dy by, as the unfused ReLU's backward would).
    fn weighted(
        &self,
        x: &Var,
        w: &Var,
        b: Option<&Var>,
        y: Tensor,
        act: Act,
        backward: WeightedBackward,
    ) -> Result<Var> {
        let macs = weighted_macs(&y, &w.t);
        count::forward(macs);
        let mut ins = vec![x, w];
        ins.extend(b);
        if !self.tracks(&ins) {
            return Ok(Var::constant(y));
        }
        let (xs, ws, has_b, algo) = (self.save(x)?, self.save(w)?, b.is_some(), self.algo());
        let mask = activation_mask(act, &y);
        let module = count::label();
        #[cfg(feature = "autocast")]
        let chunked = self.perturb.borrow().is_none();
        Ok(self.record(&ins, y, move |dy| {
            // dx and dw: each as many multiply-adds as the forward
            count::backward(module, 2 * macs);
            let masked = masked_by(mask, dy)?;
            let dy = masked.as_ref().unwrap_or(dy);
            #[cfg(feature = "autocast")]
            if chunked {
                // a bf16 input: by chunks of images (the op is separable over the batch)
                let x = xs.stored()?;
                let nb = chunk_images(&x);
                if x.dtype() == crate::tensor::DType::BF16 && nb < x.shape()[0] {
                    let w = ws.get()?;
                    return by_chunks(&x, dy, nb, |xc, dyc| {
                        let (dxc, dwc, dbc) = backward(xc, &w, dyc, has_b, algo)?;
                        Ok((dxc, vec![Some(dwc), dbc]))
                    });
                }
            }
            let (dx, dw, db) = backward(&xs.get()?, &ws.get()?, dy, has_b, algo)?;
            Ok(vec![Some(dx), Some(dw), db])
        }))
    }

    /// x [.., K] · wᵀ + b, w [N, K] (PyTorch's layout).
    pub fn linear(&self, x: &Var, w: &Var, b: Option<&Var>) -> Result<Var> {
        self.linear_act(x, w, b, Act::None)
    }

    /// ReLU(x · wᵀ + b): `relu(linear(..))` with the ReLU in the GEMM's epilogue (no pass and no
    /// tensor of its own), the same values and gradients bit for bit (tests/linear_relu.rs).
    pub fn linear_relu(&self, x: &Var, w: &Var, b: Option<&Var>) -> Result<Var> {
        self.linear_act(x, w, b, Act::Relu)
    }

    fn linear_act(&self, x: &Var, w: &Var, b: Option<&Var>, act: Act) -> Result<Var> {
        let ins: Vec<&Var> = [x, w].into_iter().chain(b).collect();
        self.autocast(&ins, |v| {
            let (x, w, b) = (v[0], v[1], v.get(2).copied());
            #[cfg(feature = "autocast")]
            if let Some(y) = self.linear_bf16(x, w, b, act)? {
                return Ok(y);
            }
            let y = linear::linear_act(&*x.wide()?, &*w.wide()?, f32_of(b)?.as_deref(), act, self.algo())?;
            self.weighted(x, w, b, y, act, |x, w, dy, hb, algo| {
                let g = linear::linear_backward(x, w, dy, hb, algo)?;
                Ok((g.dx, g.dw, g.db))
            })
        })
    }

    /// Linear on bf16 operands as they are stored (bf16 tensors: autocast rounded them), through
    /// the bf16 GEMM (the pipelined tensor-core kernels on cuda/emu) instead of widened copies;
    /// the backward reads x and the weight as kept and dy rounded back to bf16 (exact: the tape
    /// stored it in bf16). None when an operand is not a bf16 tensor (the error model of
    /// `with_bf16_perturbation` holds perturbed f32 values).
    #[cfg(feature = "autocast")]
    fn linear_bf16(&self, x: &Var, w: &Var, b: Option<&Var>, act: Act) -> Result<Option<Var>> {
        type Forward = fn(&Tensor, &Tensor, Option<&Tensor>) -> Result<Tensor>;
        let forward: Forward = match act {
            Act::None => linear::linear_bf16,
            Act::Relu => |x, w, b| linear::linear_bf16_act(x, w, b, Act::Relu),
        };
        self.weighted_bf16(x, w, b, forward, act, |x, w, dy, hb| {
            let g = linear::linear_backward_bf16(x, w, dy, hb)?;
            Ok((g.dx, g.dw, g.db))
        })
    }

    /// A weighted op (Linear, the convolutions) on bf16 operands as stored: `forward` of the bf16
    /// tensors, recorded with `backward` of the kept x and weight and dy rounded back to bf16
    /// (exact: the tape stored it in bf16). None when an operand is not a bf16 tensor (the error
    /// model of `with_bf16_perturbation` holds perturbed f32 values).
    #[cfg(feature = "autocast")]
    fn weighted_bf16(
        &self,
        x: &Var,
        w: &Var,
        b: Option<&Var>,
        forward: fn(&Tensor, &Tensor, Option<&Tensor>) -> Result<Tensor>,
        act: Act,
        backward: BackwardBf16,
    ) -> Result<Option<Var>> {
        use crate::tensor::DType::BF16;
        if !(x.t.dtype() == BF16 && w.t.dtype() == BF16 && b.is_none_or(|b| b.t.dtype() == BF16)) {
            return Ok(None);
        }
        let y = forward(&x.t, &w.t, b.map(|b| &b.t))?;
        let macs = weighted_macs(&y, &w.t);
        count::forward(macs);
        let mut ins = vec![x, w];
        ins.extend(b);
        if !self.tracks(&ins) {
            return Ok(Some(Var::constant(y)));
        }
        let (xs, ws, has_b) = (self.save(x)?, self.save(w)?, b.is_some());
        let mask = activation_mask(act, &y);
        let module = count::label();
        Ok(Some(self.record(&ins, y, move |dy| {
            count::backward(module, 2 * macs);
            let masked = masked_by(mask, dy)?;
            let dy = crate::ops::cast::cast(masked.as_ref().unwrap_or(dy), BF16)?;
            let (dx, dw, db) = backward(&xs.stored()?, &ws.stored()?, &dy, has_b)?;
            Ok(vec![Some(dx), Some(dw), db])
        })))
    }

    /// Convolution with odd kernels and "same" zero padding (3×3 pad 1, 1×1).
    pub fn conv2d(&self, x: &Var, w: &Var, b: Option<&Var>) -> Result<Var> {
        let ins: Vec<&Var> = [x, w].into_iter().chain(b).collect();
        self.autocast(&ins, |v| {
            let (x, w, b) = (v[0], v[1], v.get(2).copied());
            #[cfg(feature = "autocast")]
            if let Some(y) = self.conv_bf16(x, w, b, false)? {
                return Ok(y);
            }
            let y = conv::conv2d(&*x.wide()?, &*w.wide()?, f32_of(b)?.as_deref(), self.algo())?;
            self.weighted(x, w, b, y, Act::None, |x, w, dy, hb, algo| {
                let g = conv::conv2d_backward(x, w, dy, hb, algo)?;
                Ok((g.dx, g.dw, g.db))
            })
        })
    }

    /// conv2d (or conv1d, `one_d`: its [B, C, L] operands) on bf16 operands as stored, through
    /// `conv::bf16` (the pipelined tensor-core kernels on cuda/emu) instead of widened copies.
    #[cfg(feature = "autocast")]
    fn conv_bf16(&self, x: &Var, w: &Var, b: Option<&Var>, one_d: bool) -> Result<Option<Var>> {
        use crate::ops::conv::bf16 as cb;
        type Forward = fn(&Tensor, &Tensor, Option<&Tensor>) -> Result<Tensor>;
        let (forward, backward): (Forward, BackwardBf16) = if one_d {
            (cb::conv1d_bf16, |x, w, dy, hb| {
                let g = cb::conv1d_backward_bf16(x, w, dy, hb)?;
                Ok((g.dx, g.dw, g.db))
            })
        } else {
            (cb::conv2d_bf16, |x, w, dy, hb| {
                let g = cb::conv2d_backward_bf16(x, w, dy, hb)?;
                Ok((g.dx, g.dw, g.db))
            })
        };
        self.weighted_bf16(x, w, b, forward, Act::None, backward)
    }

    /// conv2d of the channel concatenation of `parts` without materialising it.
    pub fn conv2d_cat(&self, parts: &[&Var], w: &Var, b: Option<&Var>) -> Result<Var> {
        let n = parts.len();
        let ins: Vec<&Var> = parts.iter().copied().chain([w]).chain(b).collect();
        self.autocast(&ins, |v| self.conv2d_cat_exact(&v[..n], v[n], v.get(n + 1).copied()))
    }

    /// conv2d_cat on bf16 slices, weights and bias as stored, through `conv::bf16` (on cuda/emu
    /// one pipelined convolution over the slices packed side by side); the backward as
    /// `conv2d_bf16`'s. None when an operand is not a bf16 tensor.
    #[cfg(feature = "autocast")]
    fn conv2d_cat_bf16(&self, parts: &[&Var], w: &Var, b: Option<&Var>) -> Result<Option<Var>> {
        use crate::tensor::DType::BF16;
        let half = |v: &Var| v.t.dtype() == BF16;
        if !(parts.iter().all(|p| half(p)) && half(w) && b.is_none_or(half)) {
            return Ok(None);
        }
        let pts: Vec<&Tensor> = parts.iter().map(|p| &p.t).collect();
        let y = conv::bf16::conv2d_cat_bf16(&pts, &w.t, b.map(|b| &b.t))?;
        let macs = weighted_macs(&y, &w.t);
        count::forward(macs);
        let mut ins: Vec<&Var> = parts.to_vec();
        ins.push(w);
        ins.extend(b);
        if !self.tracks(&ins) {
            return Ok(Some(Var::constant(y)));
        }
        let xs = parts.iter().map(|p| self.save(p)).collect::<Result<Vec<Saved>>>()?;
        let (ws, has_b) = (self.save(w)?, b.is_some());
        let module = count::label();
        Ok(Some(self.record(&ins, y, move |dy| {
            count::backward(module, 2 * macs);
            let dy = crate::ops::cast::cast(dy, BF16)?;
            let xs = xs.iter().map(Saved::stored).collect::<Result<Vec<Tensor>>>()?;
            let refs: Vec<&Tensor> = xs.iter().collect();
            let g = conv::bf16::conv2d_cat_backward_bf16(&refs, &ws.stored()?, &dy, has_b)?;
            let mut out: Vec<Option<Tensor>> = g.dxs.into_iter().map(Some).collect();
            out.push(Some(g.dw));
            out.push(g.db);
            Ok(out)
        })))
    }

    /// conv2d_cat at the graph's algorithm on operands already in their autocast type.
    fn conv2d_cat_exact(&self, parts: &[&Var], w: &Var, b: Option<&Var>) -> Result<Var> {
        #[cfg(feature = "autocast")]
        if let Some(y) = self.conv2d_cat_bf16(parts, w, b)? {
            return Ok(y);
        }
        let algo = self.algo();
        let wide = parts.iter().map(|p| p.wide()).collect::<Result<Vec<_>>>()?;
        let pts: Vec<&Tensor> = wide.iter().map(|t| &**t).collect();
        let y = conv::conv2d_cat(&pts, &*w.wide()?, f32_of(b)?.as_deref(), algo)?;
        drop(wide);
        let macs = weighted_macs(&y, &w.t);
        count::forward(macs);
        let mut ins: Vec<&Var> = parts.to_vec();
        ins.push(w);
        ins.extend(b);
        if !self.tracks(&ins) {
            return Ok(Var::constant(y));
        }
        let xs = parts.iter().map(|p| self.save(p)).collect::<Result<Vec<Saved>>>()?;
        let (ws, has_b) = (self.save(w)?, b.is_some());
        let module = count::label();
        // bf16 autocast: one part at a time (widened, its gradient stored in bf16 as the tape
        // would) instead of every part's f32 input and gradient at once
        #[cfg(feature = "autocast")]
        if self.precision == super::Precision::Bf16 && self.perturb.borrow().is_none() {
            let half: Vec<bool> = parts.iter().map(|p| p.bf16).collect();
            return Ok(self.record(&ins, y, move |dy| {
                count::backward(module, 2 * macs);
                let w = ws.get()?;
                let (mut out, mut dw, mut db, mut c_off) = (Vec::new(), None, None, 0);
                for (k, x) in xs.iter().enumerate() {
                    let x = x.get()?;
                    let ci = x.shape()[1];
                    // the part's input channels of w [Co, ΣCi, kh, kw]
                    let g =
                        conv::conv2d_backward(&x, &transpose::narrow(&w, 1, c_off, ci)?, dy, has_b && k == 0, algo)?;
                    drop(x);
                    let dx = if half[k] { crate::ops::cast::cast(&g.dx, crate::tensor::DType::BF16)? } else { g.dx };
                    out.push(Some(dx));
                    // its columns of dw (the other parts' are zero here: exact sums)
                    let dwk = transpose::narrow_backward(&g.dw, w.shape(), 1, c_off)?;
                    dw = Some(match dw {
                        None => dwk,
                        Some(d) => ew::add(&d, &dwk)?,
                    });
                    db = db.or(g.db);
                    c_off += ci;
                }
                out.push(dw);
                out.push(db);
                Ok(out)
            }));
        }
        Ok(self.record(&ins, y, move |dy| {
            count::backward(module, 2 * macs);
            let xs = xs.iter().map(Saved::get).collect::<Result<Vec<Tensor>>>()?;
            let refs: Vec<&Tensor> = xs.iter().collect();
            let g = conv::conv2d_cat_backward(&refs, &ws.get()?, dy, has_b, algo)?;
            let mut out: Vec<Option<Tensor>> = g.dxs.into_iter().map(Some).collect();
            out.push(Some(g.dw));
            out.push(g.db);
            Ok(out)
        }))
    }

    /// x [B,C,L], w [Co,C,k] (odd k, zero padding k/2).
    pub fn conv1d(&self, x: &Var, w: &Var, b: Option<&Var>) -> Result<Var> {
        let ins: Vec<&Var> = [x, w].into_iter().chain(b).collect();
        self.autocast(&ins, |v| {
            let (x, w, b) = (v[0], v[1], v.get(2).copied());
            #[cfg(feature = "autocast")]
            if let Some(y) = self.conv_bf16(x, w, b, true)? {
                return Ok(y);
            }
            let y = conv::conv1d(&*x.wide()?, &*w.wide()?, f32_of(b)?.as_deref(), self.algo())?;
            self.weighted(x, w, b, y, Act::None, |x, w, dy, hb, algo| {
                let g = conv::conv1d_backward(x, w, dy, hb, algo)?;
                Ok((g.dx, g.dw, g.db))
            })
        })
    }

    /// Batch norm over dim 1 of x [B,C,...] (+ ReLU when `relu`): batch statistics and a
    /// running-statistics update in a training graph, the running statistics otherwise.
    pub fn batch_norm(&self, params: &Params, x: &Var, ids: [ParamId; 4], relu: bool) -> Result<Var> {
        let [gp, bp, rm, rv] = ids;
        let (gamma, beta) = (self.param(params, gp), self.param(params, bp));
        let o = BnOpts { relu, train: self.train, ..BnOpts::default() };
        let f = norm::batch_norm(&*x.wide()?, &gamma.t, &beta.t, params.value(rm), params.value(rv), o)?;
        if self.train {
            self.push_buffer_update(rm, f.running_mean.clone());
            self.push_buffer_update(rv, f.running_var.clone());
        }
        // bf16 autocast: batch norm reads and stores bf16 (its statistics and math are f32)
        let (y, half) = self.stored(f.y)?;
        if !self.tracks(&[x, &gamma, &beta]) {
            let mut v = Var::constant(y);
            v.bf16 = half;
            return Ok(v);
        }
        // the output, as stored, is saved for the ReLU's mask (its sign, which bf16 keeps)
        let (xs, ys, gt) = (self.save(x)?, Saved::new(y.clone()), gamma.t.clone());
        let (mean, var) = (f.mean, f.var);
        let mut out = self.record(&[x, &gamma, &beta], y, move |dy| {
            // x and y as kept (bf16 at bf16 autocast): the backward kernel widens them as it
            // reads them, no f32 copies of two full-size tensors
            let (x, y) = (xs.stored()?, ys.stored()?);
            let (x, y) = if x.dtype() == y.dtype() { (x, y) } else { (xs.get()?, ys.get()?) };
            let f = norm::BnForward { y, mean: mean.clone(), var: var.clone(), running_mean: mean, running_var: var };
            let g = norm::batch_norm_backward(&x, &gt, &f, dy, o)?;
            Ok(vec![Some(g.dx), Some(g.dgamma), Some(g.dbeta)])
        });
        out.bf16 = half;
        Ok(out)
    }

    /// `batch_norm` of a value the caller gives up: in an evaluation graph that records nothing,
    /// the output is written over x where no other handle shares it
    /// (`norm::batch_norm_eval_owned`), so the input and output of each of the U-Net's batch norms
    /// are never both alive.
    pub fn batch_norm_owned(&self, params: &Params, x: Var, ids: [ParamId; 4], relu: bool) -> Result<Var> {
        let [gp, bp, rm, rv] = ids;
        let (gamma, beta) = (self.param(params, gp), self.param(params, bp));
        if self.train || x.bf16 || self.tracks(&[&x, &gamma, &beta]) {
            return self.batch_norm(params, &x, ids, relu);
        }
        let o = BnOpts { relu, train: false, ..BnOpts::default() };
        let y = norm::batch_norm_eval_owned(x.t, &gamma.t, &beta.t, params.value(rm), params.value(rv), o)?;
        // bf16 autocast: stored in bf16 as `batch_norm` stores it
        let (y, half) = self.stored(y)?;
        let mut v = Var::constant(y);
        v.bf16 = half;
        Ok(v)
    }

    /// LayerNorm over the last dim (eps 1e-5).
    pub fn layer_norm(&self, x: &Var, gamma: &Var, beta: &Var) -> Result<Var> {
        // f32 in and out, as PyTorch's autocast (its output is a post-LN transformer's residual
        // stream: see `binary`)
        let f = layer_norm::layer_norm(&*x.wide()?, Some(&gamma.t), Some(&beta.t), 1e-5)?;
        let y = f.y;
        if !self.tracks(&[x, gamma, beta]) {
            return Ok(Var::constant(y));
        }
        let (xs, gt, bt) = (self.save(x)?, gamma.t.clone(), beta.t.clone());
        // the backward reads the statistics, not y (the next op's input: kept, it would stay
        // alive until the backward); an empty y of the same device stands in
        let f = layer_norm::LnForward { y: Tensor::from_vec(vec![], &[0], y.device())?, mean: f.mean, rstd: f.rstd };
        Ok(self.record(&[x, gamma, beta], y, move |dy| {
            let g = layer_norm::layer_norm_backward(&xs.get()?, Some(&gt), Some(&bt), &f, dy)?;
            Ok(vec![Some(g.dx), g.dgamma, g.dbeta])
        }))
    }

    pub fn max_pool2(&self, x: &Var) -> Result<Var> {
        // a bf16 value as stored: the bf16 kernel (no widened copy, no indices)
        #[cfg(feature = "autocast")]
        let y = if x.bf16 && x.t.dtype() == crate::tensor::DType::BF16 {
            pool::max_pool2_bf16(&x.t)?
        } else {
            let y = pool::max_pool2(&*x.wide()?)?.0;
            if x.bf16 {
                self.keep_bf16(y)?
            } else {
                y
            }
        };
        #[cfg(not(feature = "autocast"))]
        let y = pool::max_pool2(&*x.wide()?)?.0;
        if !self.tracks(&[x]) {
            let mut v = Var::constant(y);
            v.bf16 = x.bf16;
            return Ok(v);
        }
        // The backward finds the window maxima again from x instead of keeping their indices
        // (i32, as many as y's elements: in the U-Net, x is the previous block's batch-norm
        // output, which that backward keeps anyway, so keeping x costs nothing, while the
        // indices cost 4 bytes per pooled element, twice a bf16 y: 0.19 GB of a batch-32
        // official step). The forward's window rule again: the same indices.
        let xs = self.save(x)?;
        let mut y =
            self.record(&[x], y, move |dy| Ok(vec![Some(pool::max_pool2_backward_from_input(dy, &xs.stored()?)?)]));
        // the largest of bf16 values is one of them
        y.bf16 = x.bf16;
        Ok(y)
    }

    pub fn upsample2(&self, x: &Var) -> Result<Var> {
        // a bf16 value as stored: copied in bf16
        #[cfg(feature = "autocast")]
        let y = if x.bf16 && x.t.dtype() == crate::tensor::DType::BF16 {
            pool::upsample2_bf16(&x.t)?
        } else {
            let y = pool::upsample2(&*x.wide()?)?;
            if x.bf16 {
                self.keep_bf16(y)?
            } else {
                y
            }
        };
        #[cfg(not(feature = "autocast"))]
        let y = pool::upsample2(&*x.wide()?)?;
        let mut y = self.record(&[x], y, move |dy| Ok(vec![Some(pool::upsample2_backward(dy)?)]));
        // copies of bf16 values (the backward sums gradients in f32)
        y.bf16 = x.bf16;
        Ok(y)
    }

    /// PLAM skip gate g·s; w = conv_avg, conv_max, bottleneck.0 (w, b), bottleneck.2 (w, b).
    pub fn plam(&self, s: &Var, w: [&Var; 6]) -> Result<Var> {
        #[cfg(feature = "autocast")]
        if self.precision == super::Precision::Bf16 {
            // bf16 autocast: the two 1×1 convolutions read bf16 operands and store bf16 outputs
            // (a, m); the gate reads them, computes in f32 and stores its output in bf16
            // (ops::plam::bf16)
            let (s, w0, w1) = (self.autocast_read(s)?, self.autocast_read(w[0])?, self.autocast_read(w[1])?);
            let shape = [s.shape()[0], w0.shape()[0], s.shape()[2], s.shape()[3]];
            let stores = [self.bf16_store(&shape, s.t.device())?, self.bf16_store(&shape, s.t.device())?];
            return self.plam_stored(&s, [&w0, &w1, w[2], w[3], w[4], w[5]], stores);
        }
        self.plam_stored(s, w, [None, None])
    }

    /// plam with the 1×1 convolutions' outputs stored by `stores` (a, then m).
    fn plam_stored(&self, s: &Var, w: [&Var; 6], stores: [Option<Store>; 2]) -> Result<Var> {
        fn pw(w: [&Tensor; 6]) -> PlamWeights<'_> {
            PlamWeights { w_avg: w[0], w_max: w[1], fc1_w: w[2], fc1_b: w[3], fc2_w: w[4], fc2_b: w[5] }
        }
        let algo = self.algo();
        #[cfg(feature = "autocast")]
        let wide = [w[0].wide()?, w[1].wide()?, w[2].wide()?, w[3].wide()?, w[4].wide()?, w[5].wide()?];
        #[cfg(feature = "autocast")]
        let wt = std::array::from_fn(|i| &*wide[i]);
        // (no bf16 value without autocast: the weights as they are)
        #[cfg(not(feature = "autocast"))]
        let wt = w.map(|v| &v.t);
        let ins = [s, w[0], w[1], w[2], w[3], w[4], w[5]];
        // the gate's two 1×1 convolutions, [B, C, H, W] by [C, C] each (its per-pixel MLP is
        // not counted)
        let macs = 2 * (s.t.numel() as u64) * s.shape()[1] as u64;
        if stores[0].is_none() && !self.tracks(&ins) {
            count::forward(macs);
            return Ok(Var::constant(plam::plam_gate_infer(&*s.wide()?, &pw(wt), algo)?));
        }
        #[cfg(feature = "autocast")]
        let half_w = |t: &Tensor| crate::ops::cast::cast(t, crate::tensor::DType::BF16);
        let f = match &stores {
            #[cfg(feature = "autocast")]
            [Some(Store::Round), Some(Store::Round)] => {
                // s and the two weights as stored (autocast read them: bf16 tensors, cast to
                // themselves), the MLP's parameters f32
                let (sh, w0, w1) = (half_w(&s.t)?, half_w(&w[0].t)?, half_w(&w[1].t)?);
                plam::bf16::plam_gate_bf16(&sh, &pw([&w0, &w1, wt[2], wt[3], wt[4], wt[5]]))?
            }
            [Some(sa), Some(sm)] => {
                // a first, then m
                let second = std::cell::Cell::new(false);
                let store = |t: Tensor| if second.replace(true) { sm.value(&t) } else { sa.value(&t) };
                plam::plam_gate_stored(&*s.wide()?, &pw(wt), algo, store)?
            }
            _ => plam::plam_gate(&*s.wide()?, &pw(wt), algo)?,
        };
        #[cfg(feature = "autocast")]
        drop(wide);
        count::forward(macs);
        if !self.tracks(&ins) {
            let (y, half) = self.stored(f.out)?;
            let mut v = Var::constant(y);
            v.bf16 = half;
            return Ok(v);
        }
        let (y, mut f) = f.split_output()?;
        // bf16 autocast: the gate's output is stored in bf16 (its math is f32)
        let (y, half) = self.stored(y)?;
        let ss = self.save(s)?;
        // The two 1×1 convolutions' outputs a and m (2·C·H·W floats per image: at the official
        // size 193 MB of a batch-4 step's saved state) are computed again in the backward from
        // the saved s and weights (the same call on the same values: the same bits), at f32,
        // tf32 and bf16 (at bf16 by `plam::bf16`'s forward again); only the bf16 error model
        // (`with_bf16_perturbation`), whose perturbation would have to be kept instead, keeps
        // them.
        #[cfg(feature = "autocast")]
        let (recompute, round) = match &stores[0] {
            None => (true, false),
            Some(Store::Round) => (true, true),
            Some(_) => (false, false),
        };
        #[cfg(not(feature = "autocast"))]
        let recompute = true;
        let keep = |t: &Tensor| {
            let mut v = Var::constant(t.clone());
            v.bf16 = stores[0].is_some();
            self.save(&v)
        };
        let kept = if recompute { None } else { Some((keep(&f.a)?, keep(&f.m)?)) };
        // the error model: the bf16 backward's roundings (dA, dM, the convolutions' input
        // gradients) as perturbations, drawn now (the backward has no graph)
        #[cfg(feature = "autocast")]
        let perturb_bwd = match &stores[0] {
            Some(Store::Perturb(_)) => {
                let draw = || -> Result<Tensor> {
                    self.perturbation(s.shape(), s.t.device())?
                        .ok_or_else(|| crate::error::Error::Other("plam: the error model has no perturbation".into()))
                };
                Some([draw()?, draw()?, draw()?, draw()?])
            }
            _ => None,
        };
        let empty = Tensor::from_vec(vec![], &[0], s.t.device())?;
        (f.a, f.m) = (empty.clone(), empty);
        let saved_w = w.iter().map(|v| self.save(v)).collect::<Result<Vec<Saved>>>()?;
        let module = count::label();
        let mut v = self.record(&ins, y, move |dy| {
            // input and weight gradients of both convolutions
            count::backward(module, 2 * macs);
            // the MLP's parameters (f32); the 1×1 weights below as each path reads them
            let mlp = saved_w[2..].iter().map(Saved::get).collect::<Result<Vec<Tensor>>>()?;
            #[cfg(feature = "autocast")]
            if recompute && round {
                // bf16 autocast: the forward again from the bf16 s (the same call: the same a,
                // m, gate and argmax), then the bf16 backward, whole batch at once (its
                // temporaries are bf16, as the bf16 convolutions')
                use crate::ops::cast::cast;
                use crate::tensor::DType::BF16;
                let s = ss.stored()?;
                // the weights' bf16 copies (rounded again from the masters)
                let (w0, w1) = (cast(&saved_w[0].stored()?, BF16)?, cast(&saved_w[1].stored()?, BF16)?);
                let wr = pw([&w0, &w1, &mlp[0], &mlp[1], &mlp[2], &mlp[3]]);
                let run = |sc: &Tensor, dyc: &Tensor| -> Result<plam::PlamGrads> {
                    let (_, fc) = plam::bf16::plam_gate_bf16(sc, &wr)?.split_output()?;
                    plam::bf16::plam_gate_backward_bf16(sc, &wr, fc, &cast(dyc, BF16)?)
                };
                let g = run(&cast(&s, BF16)?, dy)?;
                return Ok([g.ds, g.dw_avg, g.dw_max, g.dfc1_w, g.dfc1_b, g.dfc2_w, g.dfc2_b]
                    .into_iter()
                    .map(Some)
                    .collect());
            }
            let mut f = f;
            // taken, not copied (or made here): the backward writes dA and dM over them
            let s = ss.get()?;
            let (w0, w1) = (saved_w[0].get()?, saved_w[1].get()?);
            (f.a, f.m) = match kept {
                Some((sa, sm)) => (sa.take()?, sm.take()?),
                // the forward's call on the same values (the same bits)
                None => (conv::conv2d(&s, &w0, None, algo)?, conv::conv2d(&s, &w1, None, algo)?),
            };
            let wr = pw([&w0, &w1, &mlp[0], &mlp[1], &mlp[2], &mlp[3]]);
            #[cfg(feature = "autocast")]
            if let Some(p) = &perturb_bwd {
                let round = |k: usize, t: Tensor| ew::mul(&t, &p[k]);
                let g = plam::plam_gate_backward_rounded(&s, &wr, f, dy, algo, &round)?;
                return Ok([g.ds, g.dw_avg, g.dw_max, g.dfc1_w, g.dfc1_b, g.dfc2_w, g.dfc2_b]
                    .into_iter()
                    .map(Some)
                    .collect());
            }
            let g = plam::plam_gate_backward(&s, &wr, f, dy, algo)?;
            Ok(vec![
                Some(g.ds),
                Some(g.dw_avg),
                Some(g.dw_max),
                Some(g.dfc1_w),
                Some(g.dfc1_b),
                Some(g.dfc2_w),
                Some(g.dfc2_b),
            ])
        });
        v.bf16 = half;
        Ok(v)
    }

    /// Rows of `table` [V,D] for `ids` (i32).
    pub fn embedding(&self, ids: &Tensor, table: &Var) -> Result<Var> {
        let y = embedding::embedding(ids, &table.t)?;
        let (it, v) = (ids.clone(), table.shape()[0]);
        Ok(self.record(&[table], y, move |dy| Ok(vec![Some(embedding::embedding_backward(&it, dy, v)?)])))
    }

    /// Fused multi-head attention; q [B,Tq,E], k and v [B,S,E].
    pub fn attention(&self, q: &Var, k: &Var, v: &Var, a: &Attention) -> Result<Var> {
        #[cfg(feature = "autocast")]
        if self.precision == super::Precision::Bf16 {
            // bf16 Q, K, V and O: the backward reads O as stored (FlashAttention's D = rowsum(dO∘O))
            let (q, k, v) = (self.autocast_read(q)?, self.autocast_read(k)?, self.autocast_read(v)?);
            let o_shape = [q.shape()[0], q.shape()[1], v.shape()[2]];
            let store = self.bf16_store(&o_shape, q.t.device())?;
            let mut y = self.attention_stored(&q, &k, &v, a, store)?;
            y.bf16 = true;
            return Ok(y);
        }
        self.attention_stored(q, k, v, a, None)
    }

    /// The fused attention at the graph's algorithm, its output stored by `store` (None: f32);
    /// the condition weights stay f32.
    fn attention_stored(&self, q: &Var, k: &Var, v: &Var, a: &Attention, store: Option<Store>) -> Result<Var> {
        let algo = self.algo();
        // (owned: the backward keeps it; the softmax weights are f32, so no copy)
        let w = a.condition.map(Var::to_f32).transpose()?;
        let cond = match (&w, a.condition_on_logits) {
            (None, _) => Condition::None,
            (Some(w), false) => Condition::Probs(w),
            (Some(w), true) => Condition::Logits(w),
        };
        let o = AttnOpts { causal: a.causal, key_valid: a.key_valid, condition: cond, algo, ..AttnOpts::new(a.heads) };
        // bf16 operands as stored, rounded output: the bf16 forward (the pipelined kernel on
        // cuda/emu) writes the bf16 output itself
        #[cfg(feature = "autocast")]
        let native =
            matches!(store, Some(Store::Round)) && [q, k, v].iter().all(|x| x.t.dtype() == crate::tensor::DType::BF16);
        #[cfg(not(feature = "autocast"))]
        let native = false;
        #[cfg(feature = "autocast")]
        let f = if native {
            attention::bf16::attention_bf16(&q.t, &k.t, &v.t, &o)?
        } else {
            attention::attention(&*q.wide()?, &*k.wide()?, &*v.wide()?, &o)?
        };
        #[cfg(not(feature = "autocast"))]
        let f = attention::attention(&*q.wide()?, &*k.wide()?, &*v.wide()?, &o)?;
        // one Q·Kᵀ-sized product: B·Tq·S·E over all heads
        let unit = (q.t.numel() * k.shape()[1]) as u64;
        count::forward(2 * unit); // Q·Kᵀ, P·V
        let mut ins = vec![q, k, v];
        ins.extend(a.condition);
        let y = match &store {
            Some(s) if !native => s.stored(&f.o)?,
            _ => f.o.clone(),
        };
        if !self.tracks(&ins) {
            return Ok(Var::constant(y));
        }
        // the backward's O is the output as stored (kept with it, not beside it)
        let mut f = f;
        f.o = Tensor::from_vec(vec![], &[0], q.t.device())?;
        let os = Saved::new(y.clone());
        let module = count::label();
        let (qs, ks, vs) = (self.save(q)?, self.save(k)?, self.save(v)?);
        let valid = a.key_valid.cloned();
        let (heads, causal, on_logits) = (a.heads, a.causal, a.condition_on_logits);
        Ok(self.record(&ins, y, move |dy| {
            // Q·Kᵀ recomputed from the saved log-sum-exp, then dP, dV, dQ, dK
            count::backward(module, 5 * unit);
            let cond = match (&w, on_logits) {
                (None, _) => Condition::None,
                (Some(w), false) => Condition::Probs(w),
                (Some(w), true) => Condition::Logits(w),
            };
            let o = AttnOpts { causal, key_valid: valid.as_ref(), condition: cond, algo, ..AttnOpts::new(heads) };
            let mut f = f;
            // after the bf16 forward, the bf16 backward (the pipelined kernels on cuda/emu): the
            // operands and O as stored, dy rounded as the gradient of a bf16 value; bf16 grads
            #[cfg(feature = "autocast")]
            let g = if native {
                f.o = os.stored()?;
                let dy = crate::ops::cast::cast(dy, crate::tensor::DType::BF16)?;
                let (q, k, v) = (qs.stored()?, ks.stored()?, vs.stored()?);
                attention::bf16::attention_backward_bf16(&q, &k, &v, &f, &dy, &o)?
            } else {
                f.o = os.get()?;
                attention::attention_backward(&qs.get()?, &ks.get()?, &vs.get()?, &f, dy, &o)?
            };
            #[cfg(not(feature = "autocast"))]
            let g = {
                f.o = os.get()?;
                attention::attention_backward(&qs.get()?, &ks.get()?, &vs.get()?, &f, dy, &o)?
            };
            let mut out = vec![Some(g.dq), Some(g.dk), Some(g.dv)];
            if w.is_some() {
                out.push(g.dw);
            }
            Ok(out)
        }))
    }

    // ---- losses (scalar outputs []) -----------------------------------------------------------

    /// mean((x − y)²) over every element.
    pub fn mse(&self, x: &Var, y: &Var) -> Result<Var> {
        let l = loss::mse(&*x.wide()?, &*y.wide()?)?;
        if !self.tracks(&[x, y]) {
            return Ok(Var::constant(l));
        }
        let (xs, ys) = (self.save(x)?, self.save(y)?);
        Ok(self.record(&[x, y], l, move |dy| {
            let (dx, dyy) = loss::mse_backward(&xs.get()?, &ys.get()?, 1.0)?;
            Ok(vec![Some(times_scalar(&dx, dy)?), Some(times_scalar(&dyy, dy)?)])
        }))
    }

    /// ½·Dice + ½·BCE from logits (sigmoid fused). Returns (criterion [], [dice, bce, criterion]).
    pub fn dice_bce(&self, logits: &Var, target: &Tensor) -> Result<(Var, Tensor)> {
        let f = loss::dice_bce(&*logits.wide()?, target)?;
        let parts = f.loss.clone();
        let crit = transpose::narrow(&f.loss, 0, 2, 1)?.reshape(&[])?;
        if !self.tracks(&[logits]) {
            return Ok((Var::constant(crit), parts));
        }
        let (ls, tt) = (self.save(logits)?, target.clone());
        let v = self.record(&[logits], crit, move |dy| {
            let dx = loss::dice_bce_backward(&ls.get()?, &tt, &f, 1.0)?;
            Ok(vec![Some(times_scalar(&dx, dy)?)])
        });
        Ok((v, parts))
    }

    /// The fused max-over-alignment similarity: logits [B,B] = (t2v + v2t)/2 (tracked), and t2v,
    /// v2t as plain tensors. text [B,L,D], image [B,N,D], mask [B,L] (f32), tw [B,L], vw [B,N].
    pub fn ccl_logits(
        &self,
        text: &Var,
        image: &Var,
        mask: &Tensor,
        tw: &Var,
        vw: &Var,
    ) -> Result<(Var, Tensor, Tensor)> {
        // (owned: the backward keeps them)
        let (twt, vwt) = (tw.to_f32()?, vw.to_f32()?);
        let f = ccl::ccl_similarity(&*text.wide()?, &*image.wide()?, mask, &twt, &vwt)?;
        // every text row of a against every image token of b: B·B·L·N·D
        let macs = (text.t.numel() * image.t.numel() / image.shape()[2].max(1)) as u64;
        count::forward(macs);
        let (t2v, v2t) = (f.t2v.clone(), f.v2t.clone());
        let y = f.logits.clone();
        let ins = [text, image, tw, vw];
        if !self.tracks(&ins) {
            return Ok((Var::constant(y), t2v, v2t));
        }
        let mt = mask.clone();
        let module = count::label();
        let v = self.record(&ins, y, move |dy| {
            count::backward(module, 2 * macs);
            let half = ew::scale(dy, 0.5)?;
            let g = ccl::ccl_similarity_backward(&f, &mt, &twt, &vwt, &half, &half)?;
            Ok(vec![Some(g.dt), Some(g.dv), Some(g.dtw), Some(g.dvw)])
        });
        Ok((v, t2v, v2t))
    }

    /// Symmetric InfoNCE of s·logits. Returns (loss [], [loss, CE rows, CE columns]).
    pub fn info_nce(&self, logits: &Var, scale: f32) -> Result<(Var, Tensor)> {
        let f = ccl::info_nce(&*logits.wide()?, scale)?;
        let parts = f.loss.clone();
        let l = transpose::narrow(&f.loss, 0, 0, 1)?.reshape(&[])?;
        if !self.tracks(&[logits]) {
            return Ok((Var::constant(l), parts));
        }
        let v = self.record(&[logits], l, move |dy| Ok(vec![Some(times_scalar(&f.dlogits, dy)?)]));
        Ok((v, parts))
    }
}
