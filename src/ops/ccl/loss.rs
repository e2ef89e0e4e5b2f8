//! The official CCL loss assembled from the fused similarity:
//! tw = softmax(W_woi), vw = softmax(W_poi) (a second softmax of weights that are already
//! softmaxed, so padded words get e⁰/Z > 0), the similarity with the text mask, and the symmetric
//! InfoNCE with s = exp(logit_scale). `logit_scale` is frozen in the official training, so it gets
//! no gradient here.

use super::{ccl_similarity, ccl_similarity_backward, info_nce};
use crate::error::Result;
use crate::ops::elementwise;
use crate::ops::softmax;
use crate::tensor::Tensor;

pub struct CclLoss {
    /// [3]: the loss, CE text→image (rows), CE image→text (columns)
    pub loss: Tensor,
    pub t2v: Tensor,
    pub v2t: Tensor,
    pub logits: Tensor,
    pub scale: f32,
}

/// Gradients of loss[0] w.r.t. the text tokens, image tokens, W_woi and W_poi.
pub struct CclLossGrads {
    pub d_text: Tensor,
    pub d_image: Tensor,
    pub d_w_woi: Tensor,
    pub d_w_poi: Tensor,
}

/// Forward and backward at once (the backward needs the forward's softmaxes and argmaxes, and a
/// loss is always differentiated once). `upstream` scales the gradients (1 for the loss alone,
/// 0.2 for its weight in the official total).
pub fn ccl_loss(
    text: &Tensor,
    image: &Tensor,
    text_mask: &Tensor,
    w_woi: &Tensor,
    w_poi: &Tensor,
    logit_scale: f32,
    upstream: f32,
) -> Result<(CclLoss, CclLossGrads)> {
    let tw = softmax::softmax(w_woi)?;
    let vw = softmax::softmax(w_poi)?;
    let fwd = ccl_similarity(text, image, text_mask, &tw, &vw)?;
    let scale = logit_scale.exp();
    let nce = info_nce(&fwd.logits, scale)?;
    // logits = (t2v + v2t) / 2
    let d_half = elementwise::scale(&nce.dlogits, 0.5 * upstream)?;
    let g = ccl_similarity_backward(&fwd, text_mask, &tw, &vw, &d_half, &d_half)?;
    let grads = CclLossGrads {
        d_text: g.dt,
        d_image: g.dv,
        d_w_woi: softmax::softmax_backward(&tw, &g.dtw, false)?,
        d_w_poi: softmax::softmax_backward(&vw, &g.dvw, false)?,
    };
    Ok((CclLoss { loss: nce.loss, t2v: fwd.t2v, v2t: fwd.v2t, logits: fwd.logits, scale }, grads))
}
