//! The CCL similarity composed from primitive ops (GEMM, permute, mul, max, sum), as the official
//! code writes it with einsum/amax: it materialises the B×B×L×N alignment tensor. It serves as the
//! unfused baseline of `reclmis bench` and as an independent cross-check of the fused kernels.

use super::{l2_normalize, l2_normalize_backward, sizes};
use crate::error::Result;
use crate::ops::elementwise::{self, BinaryOp};
use crate::ops::gemm::{self, GemmOpts};
use crate::ops::reduce::{self, ReduceOp};
use crate::ops::transpose;
use crate::tensor::Tensor;

pub struct Composed {
    pub t2v: Tensor,
    pub v2t: Tensor,
    pub logits: Tensor,
    // kept for the backward
    t_hat: Tensor,
    inv_t: Tensor,
    v_hat: Tensor,
    inv_v: Tensor,
    /// [B,B,L,N] before and after the mask
    s_raw: Tensor,
    s: Tensor,
    max_v: (Tensor, Tensor),
    max_t: (Tensor, Tensor),
}

fn trans_b() -> GemmOpts {
    GemmOpts { trans_b: true, ..Default::default() }
}

pub fn forward(t: &Tensor, v: &Tensor, mask: &Tensor, tw: &Tensor, vw: &Tensor) -> Result<Composed> {
    let sz = sizes(t, v, mask, tw, vw)?;
    let (b, l, n, d) = (sz.b, sz.l, sz.n, sz.d);
    let (t_hat, inv_t) = l2_normalize(t)?;
    let (v_hat, inv_v) = l2_normalize(v)?;
    // [B·L, B·N] -> [B, L, B, N] -> [B, B, L, N]
    let s = gemm::matmul(&t_hat.reshape(&[b * l, d])?, &v_hat.reshape(&[b * n, d])?, trans_b())?;
    let s_raw = transpose::permute(&s.reshape(&[b, l, b, n])?, &[0, 2, 1, 3])?;
    let s = elementwise::mul(&s_raw, &mask.reshape(&[b, 1, l, 1])?)?;
    let max_v = reduce::max(&s, 3)?; // [B,B,L]
    let max_t = reduce::max(&s, 2)?; // [B,B,N]
    let t2v = reduce::sum(&elementwise::mul(&max_v.0, &tw.reshape(&[b, 1, l])?)?, 2)?;
    let v2t = reduce::sum(&elementwise::mul(&max_t.0, &vw.reshape(&[1, b, n])?)?, 2)?;
    let logits = elementwise::scale(&elementwise::add(&t2v, &v2t)?, 0.5)?;
    Ok(Composed { t2v, v2t, logits, t_hat, inv_t, v_hat, inv_v, s_raw, s, max_v, max_t })
}

impl Composed {
    /// The materialised alignment tensor S [B,B,L,N] (mask applied).
    pub fn alignment(&self) -> &Tensor {
        &self.s
    }
}

/// (dt, dv, dtw, dvw) through each primitive's backward.
pub fn backward(
    c: &Composed,
    mask: &Tensor,
    tw: &Tensor,
    vw: &Tensor,
    d_t2v: &Tensor,
    d_v2t: &Tensor,
) -> Result<(Tensor, Tensor, Tensor, Tensor)> {
    let s4 = c.s.shape().to_vec();
    let (b, l, n) = (s4[0], s4[2], s4[3]);
    let d = c.t_hat.shape()[2];
    let tw_r = tw.reshape(&[b, 1, l])?;
    let vw_r = vw.reshape(&[1, b, n])?;
    // t2v = sum_t (max_v · tw)
    let g = reduce::reduce_backward(ReduceOp::Sum, d_t2v, None, &[b, b, l], 2)?;
    let (g_max_v, dtw) = elementwise::binary_backward(BinaryOp::Mul, &c.max_v.0, &tw_r, &g)?;
    let ds1 = reduce::reduce_backward(ReduceOp::Max, &g_max_v, Some(&c.max_v.1), &s4, 3)?;
    let g = reduce::reduce_backward(ReduceOp::Sum, d_v2t, None, &[b, b, n], 2)?;
    let (g_max_t, dvw) = elementwise::binary_backward(BinaryOp::Mul, &c.max_t.0, &vw_r, &g)?;
    let ds2 = reduce::reduce_backward(ReduceOp::Max, &g_max_t, Some(&c.max_t.1), &s4, 2)?;
    let ds = elementwise::add(&ds1, &ds2)?;
    let (ds_raw, _) = elementwise::binary_backward(BinaryOp::Mul, &c.s_raw, &mask.reshape(&[b, 1, l, 1])?, &ds)?;
    let ds_flat = transpose::permute_backward(&ds_raw, &[0, 2, 1, 3])?.reshape(&[b * l, b * n])?;
    let (dth, dvh) =
        gemm::matmul_backward(&c.t_hat.reshape(&[b * l, d])?, &c.v_hat.reshape(&[b * n, d])?, &ds_flat, trans_b())?;
    Ok((
        l2_normalize_backward(&c.t_hat, &c.inv_t, &dth.reshape(&[b, l, d])?)?,
        l2_normalize_backward(&c.v_hat, &c.inv_v, &dvh.reshape(&[b, n, d])?)?,
        dtw.reshape(&[b, l])?,
        dvw.reshape(&[b, n])?,
    ))
}
