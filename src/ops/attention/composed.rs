//! The same attention composed from the engine's primitive ops (permute, matmul, mul, add,
//! softmax, sum, div), as an eager framework would run it: the [B,H,Tq,S] scores and
//! probabilities are materialised several times. The fused op is tested against it and
//! benchmarked against it. Unlike the fused op, a row with no key gives NaN here (softmax of
//! only −inf), as in PyTorch.

use super::{shape, AttnOpts, Condition, COND_EPS};
use crate::error::Result;
use crate::ops::elementwise::{self as ew, BinaryOp};
use crate::ops::gemm::{matmul, matmul_backward, GemmOpts};
use crate::ops::reduce;
use crate::ops::softmax;
use crate::ops::transpose::{permute, permute_backward};
use crate::tensor::Tensor;

/// Everything the composed backward needs.
pub struct Composed {
    pub o: Tensor,
    q4: Tensor,
    k4: Tensor,
    v4: Tensor,
    /// scale·q·kᵀ [B,H,Tq,S]
    t: Tensor,
    /// the softmax output
    p: Tensor,
    /// final probabilities (after the condition)
    pf: Tensor,
    /// official condition: p·(w + eps) and its row sums
    r: Option<(Tensor, Tensor)>,
}

/// [B,T,E] -> [B,H,T,Dh]
fn heads(x: &Tensor, h: usize) -> Result<Tensor> {
    let s = x.shape();
    permute(&x.reshape(&[s[0], s[1], h, s[2] / h])?, &[0, 2, 1, 3])
}

/// The additive mask of the options (causal and key validity), built on the host.
fn additive_mask(b: usize, tq: usize, s: usize, o: &AttnOpts, like: &Tensor) -> Result<Option<Tensor>> {
    if !o.causal && o.key_valid.is_none() {
        return Ok(None);
    }
    let valid = o.key_valid.map(|m| m.to_vec_i32()).transpose()?;
    let nb = if valid.is_some() { b } else { 1 };
    let mut m = vec![0.0f32; nb * tq * s];
    for bb in 0..nb {
        for i in 0..tq {
            for j in 0..s {
                let ok = !(o.causal && j > i) && valid.as_ref().is_none_or(|v| v[bb * s + j] != 0);
                if !ok {
                    m[(bb * tq + i) * s + j] = f32::NEG_INFINITY;
                }
            }
        }
    }
    Ok(Some(Tensor::from_vec(m, &[nb, 1, tq, s], like.device())?))
}

pub fn forward(q: &Tensor, k: &Tensor, v: &Tensor, o: &AttnOpts) -> Result<Composed> {
    let sh = shape(q, k, v, o)?;
    let scale = o.scale.unwrap_or(1.0 / (sh.dh.max(1) as f32).sqrt());
    let (q4, k4, v4) = (heads(q, sh.h)?, heads(k, sh.h)?, heads(v, sh.h)?);
    let t = matmul(&q4, &k4, GemmOpts { trans_b: true, alpha: scale, algo: o.algo, ..GemmOpts::default() })?;
    let w4 = |w: &Tensor| w.reshape(&[sh.b, 1, 1, sh.s]);
    let mut z = t.clone();
    if let Condition::Logits(w) = o.condition {
        z = ew::mul(&z, &w4(w)?)?;
    }
    let mask = additive_mask(sh.b, sh.tq, sh.s, o, q)?;
    if let Some(m) = &mask {
        z = ew::add(&z, m)?;
    }
    let p = softmax::softmax(&z)?;
    let (pf, r) = if let Condition::Probs(w) = o.condition {
        let rr = ew::mul(&p, &ew::add_scalar(&w4(w)?, COND_EPS)?)?;
        let sum = reduce::sum(&rr, -1)?.reshape(&[sh.b, sh.h, sh.tq, 1])?;
        (ew::div(&rr, &sum)?, Some((rr, sum)))
    } else {
        (p.clone(), None)
    };
    let o4 = matmul(&pf, &v4, GemmOpts { algo: o.algo, ..GemmOpts::default() })?;
    let out = permute(&o4, &[0, 2, 1, 3])?.reshape(q.shape())?;
    Ok(Composed { o: out, q4, k4, v4, t, p, pf, r })
}

/// (dq, dk, dv, dw) through the primitive ops' backwards.
pub fn backward(c: &Composed, d_out: &Tensor, o: &AttnOpts) -> Result<(Tensor, Tensor, Tensor, Option<Tensor>)> {
    let (b, tq, e) = (d_out.shape()[0], d_out.shape()[1], d_out.shape()[2]);
    let h = o.heads;
    let s = c.k4.shape()[2];
    let scale = o.scale.unwrap_or(1.0 / ((e / h).max(1) as f32).sqrt());
    let do4 = heads(d_out, h)?;
    let go = GemmOpts { algo: o.algo, ..GemmOpts::default() };
    let (dpf, dv4) = matmul_backward(&c.pf, &c.v4, &do4, go)?;
    let w4 = |w: &Tensor| w.reshape(&[b, 1, 1, s]);
    let mut dw = None;
    let dp = if let (Condition::Probs(w), Some((rr, sum))) = (o.condition, &c.r) {
        let (drr, dsum) = ew::binary_backward(BinaryOp::Div, rr, sum, &dpf)?;
        // rr feeds both the numerator and the row sum: the sum's gradient broadcasts back.
        let drr = ew::add(&drr, &dsum)?;
        let we = ew::add_scalar(&w4(w)?, COND_EPS)?;
        let (dp, dwe) = ew::binary_backward(BinaryOp::Mul, &c.p, &we, &drr)?;
        dw = Some(dwe.reshape(&[b, s])?);
        dp
    } else {
        dpf
    };
    let dz = softmax::softmax_backward(&c.p, &dp, false)?;
    let dt = if let Condition::Logits(w) = o.condition {
        let (dt, dwl) = ew::binary_backward(BinaryOp::Mul, &c.t, &w4(w)?, &dz)?;
        dw = Some(dwl.reshape(&[b, s])?);
        dt
    } else {
        dz
    };
    let (dq4, dk4) = matmul_backward(
        &c.q4,
        &c.k4,
        &dt,
        GemmOpts { trans_b: true, alpha: scale, algo: o.algo, ..GemmOpts::default() },
    )?;
    let back = |x4: &Tensor, t: usize| -> Result<Tensor> { permute_backward(x4, &[0, 2, 1, 3])?.reshape(&[b, t, e]) };
    Ok((back(&dq4, tq)?, back(&dk4, s)?, back(&dv4, s)?, dw))
}
