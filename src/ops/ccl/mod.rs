//! The conditioned contrastive loss (CCL): the fused max-over-alignment similarity, its backward,
//! row L2 normalisation, and the symmetric InfoNCE on top; `ccl_loss` assembles them the way the
//! official code does (see `loss`).
//!
//! Similarity, for text tokens t [B,L,D], image tokens v [B,N,D], text mask [B,L], word weights
//! tw [B,L] and patch weights vw [B,N], with t̂, v̂ L2-normalised along D and
//! S[a,b,t,v] = <t̂_at, v̂_bv> · mask[a,t]:
//!   t2v[a,b] = Σ_t tw[a,t] · max_v S,   v2t[a,b] = Σ_v vw[b,v] · max_t S,   logits = (t2v + v2t) / 2.
//! Padded text rows have S = 0 (not −inf) and take part in the max over t, as officially.
//!
//! Argmax rule (forward and backward): the max is taken over the f32 values as computed; NaN wins;
//! among equal values the lowest index wins, and the whole gradient of that max goes to it.
//! Zero vectors have no direction. The official code divides by the plain norm, so a zero token
//! (a bottleneck position whose every channel the ReLU zeroed) makes the loss NaN: a bf16
//! quickstart-recipe run stopped on it at epoch 36 (BENCHMARKS.md, 2026-12-07). Here a row whose
//! squared norm is 0 (or underflows to 0) normalises to 0, so its similarities are 0 (the forward
//! of PyTorch's `F.normalize`), and it receives no gradient (its output is constant there).
//! Every other row is divided by its plain norm as officially; a NaN row still gives NaN.
//!
//! Memory: the normalised inputs (B(L+N)D), the argmaxes and maxima ([B,B,L] and [B,B,N], which is
//! below B(L+N)D whenever B <= D) and the [B,B] outputs; never the B×B×L×N alignment tensor.

/// Its `reclmis bench` cases and `selfcheck` (registered in `bench::registry`).
#[cfg(feature = "cli")]
pub mod bench;
pub mod composed;
pub mod cpu;
pub mod loss;
#[cfg(feature = "refs")]
pub mod reference;

use crate::device::{Device, LaunchCfg};
use crate::error::{Error, Result};
use crate::kernels::Kernel;
use crate::ops::check_u32;
use crate::tensor::{DType, Tensor};

crate::kernel_params! {
    struct L2NormParams [32] {
        x: u64,
        y: u64,
        inv: u64,
        rows: u32,
        d: u32,
    }
}

crate::kernel_params! {
    struct L2NormBwdParams [40] {
        y: u64,
        inv: u64,
        dy: u64,
        dx: u64,
        rows: u32,
        d: u32,
    }
}

crate::kernel_params! {
    struct CclParams [112] {
        t: u64,
        v: u64,
        mask: u64,
        tw: u64,
        vw: u64,
        t2v: u64,
        v2t: u64,
        logits: u64,
        max_v: u64,
        arg_v: u64,
        max_t: u64,
        arg_t: u64,
        b: u32,
        l: u32,
        n: u32,
        d: u32,
    }
}

crate::kernel_params! {
    struct CclBwdParams [136] {
        t: u64,
        v: u64,
        mask: u64,
        tw: u64,
        vw: u64,
        d_t2v: u64,
        d_v2t: u64,
        max_v: u64,
        arg_v: u64,
        max_t: u64,
        arg_t: u64,
        dt: u64,
        dv: u64,
        dtw: u64,
        dvw: u64,
        b: u32,
        l: u32,
        n: u32,
        d: u32,
    }
}

crate::kernel_params! {
    struct InfoNceParams [32] {
        logits: u64,
        loss: u64,
        dlogits: u64,
        scale: f32,
        b: u32,
    }
}

/// Sizes of one CCL problem.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CclSizes {
    pub b: usize,
    pub l: usize,
    pub n: usize,
    pub d: usize,
}

/// What the forward pass keeps for the backward.
pub struct CclSaved {
    pub t_hat: Tensor,
    pub inv_t: Tensor,
    pub v_hat: Tensor,
    pub inv_v: Tensor,
    /// [B,B,L]: max over v, and which v
    pub max_v: Tensor,
    pub arg_v: Tensor,
    /// [B,B,N]: max over t, and which t
    pub max_t: Tensor,
    pub arg_t: Tensor,
}

pub struct CclForward {
    pub t2v: Tensor,
    pub v2t: Tensor,
    pub logits: Tensor,
    pub saved: CclSaved,
    pub sizes: CclSizes,
}

/// Gradients w.r.t. the raw (unnormalised) tokens and the weights. The mask gets none (data).
pub struct CclGrads {
    pub dt: Tensor,
    pub dv: Tensor,
    pub dtw: Tensor,
    pub dvw: Tensor,
}

fn expect(op: &'static str, what: &str, t: &Tensor, shape: &[usize]) -> Result<()> {
    t.expect_dtype(op, DType::F32)?;
    if t.shape() != shape {
        return Err(Error::shape(op, format!("{what} is {:?}, expected {shape:?}", t.shape())));
    }
    Ok(())
}

/// Checks the five inputs and returns the sizes.
pub fn sizes(t: &Tensor, v: &Tensor, mask: &Tensor, tw: &Tensor, vw: &Tensor) -> Result<CclSizes> {
    let op = "ccl";
    if t.rank() != 3 || v.rank() != 3 {
        return Err(Error::shape(
            op,
            format!("text {:?} and image {:?} must be [B,L,D] and [B,N,D]", t.shape(), v.shape()),
        ));
    }
    let (b, l, d, n) = (t.shape()[0], t.shape()[1], t.shape()[2], v.shape()[1]);
    if b == 0 || l == 0 || n == 0 || d == 0 {
        return Err(Error::shape(op, format!("empty input: B={b}, L={l}, N={n}, D={d}")));
    }
    expect(op, "image tokens", v, &[b, n, d])?;
    expect(op, "text mask", mask, &[b, l])?;
    expect(op, "word weights", tw, &[b, l])?;
    expect(op, "patch weights", vw, &[b, n])?;
    t.same_device(op, &[v, mask, tw, vw])?;
    Ok(CclSizes { b, l, n, d })
}

/// L2-normalises the rows of the last axis: (x / ‖x‖, 1 / ‖x‖); a row of norm 0 gives (0, 0).
pub fn l2_normalize(x: &Tensor) -> Result<(Tensor, Tensor)> {
    let op = "l2_normalize";
    x.expect_dtype(op, DType::F32)?;
    let d = *x.shape().last().ok_or_else(|| Error::shape(op, "needs at least one dim"))?;
    let rows = x.numel() / d.max(1);
    let inv_shape = &x.shape()[..x.rank() - 1];
    let dev = x.device();
    if let Device::Cpu = dev {
        let (y, inv) = cpu::l2_normalize(x.cpu_f32(op)?, d);
        return Ok((Tensor::from_vec(y, x.shape(), dev)?, Tensor::from_vec(inv, inv_shape, dev)?));
    }
    let y = Tensor::empty(x.shape(), DType::F32, dev)?;
    let inv = Tensor::empty(inv_shape, DType::F32, dev)?;
    if rows > 0 {
        let p = L2NormParams {
            x: x.dev_ptr(),
            y: y.dev_ptr(),
            inv: inv.dev_ptr(),
            rows: check_u32(op, rows)?,
            d: check_u32(op, d)?,
        };
        // SAFETY: the params hold pointers to live buffers of the sizes this op checked above, for the kernel they were declared for.
        unsafe { dev.launch(Kernel::l2norm_fwd_f32, rows_cfg(rows), &p) }?;
    }
    Ok((y, inv))
}

/// A warp per row, 8 rows per block.
fn rows_cfg(rows: usize) -> LaunchCfg {
    LaunchCfg { grid: ((rows as u32).div_ceil(8), 1, 1), block: (32, 8, 1), smem_bytes: 0 }
}

/// dx from the forward output y, its inverse norms and dy: dx = inv · (dy − y <y, dy>).
pub fn l2_normalize_backward(y: &Tensor, inv: &Tensor, dy: &Tensor) -> Result<Tensor> {
    let op = "l2_normalize_backward";
    y.same_device(op, &[inv, dy])?;
    Tensor::expect_f32(op, &[y, inv, dy])?;
    if y.shape() != dy.shape() || inv.numel() * y.shape().last().copied().unwrap_or(1) != y.numel() {
        return Err(Error::shape(op, format!("y {:?}, inv {:?}, dy {:?}", y.shape(), inv.shape(), dy.shape())));
    }
    let d = *y.shape().last().unwrap_or(&1);
    let rows = inv.numel();
    let dev = y.device();
    if let Device::Cpu = dev {
        let dx = cpu::l2_normalize_backward(y.cpu_f32(op)?, inv.cpu_f32(op)?, dy.cpu_f32(op)?, d);
        return Tensor::from_vec(dx, y.shape(), dev);
    }
    let dx = Tensor::empty(y.shape(), DType::F32, dev)?;
    if rows > 0 {
        let p = L2NormBwdParams {
            y: y.dev_ptr(),
            inv: inv.dev_ptr(),
            dy: dy.dev_ptr(),
            dx: dx.dev_ptr(),
            rows: check_u32(op, rows)?,
            d: check_u32(op, d)?,
        };
        // SAFETY: the params hold pointers to live buffers of the sizes this op checked above, for the kernel they were declared for.
        unsafe { dev.launch(Kernel::l2norm_bwd_f32, rows_cfg(rows), &p) }?;
    }
    Ok(dx)
}

/// The fused similarity: normalises t and v, then one pass over every (text, image) pair.
pub fn ccl_similarity(t: &Tensor, v: &Tensor, mask: &Tensor, tw: &Tensor, vw: &Tensor) -> Result<CclForward> {
    let s = sizes(t, v, mask, tw, vw)?;
    let (t_hat, inv_t) = l2_normalize(t)?;
    let (v_hat, inv_v) = l2_normalize(v)?;
    let dev = t.device();
    let (b, l, n) = (s.b, s.l, s.n);
    if let Device::Cpu = dev {
        let op = "ccl";
        // 1/‖x‖ finite and > 0 for every row => every normalised element is finite (a NaN row
        // gives NaN, an infinite one 0; a zero or underflowing one 0 too, with finite zeros: the
        // general path, slower but the same values)
        let ok = |inv: &[f32]| inv.iter().all(|&x| x.is_finite() && x > 0.0);
        let finite = ok(inv_t.cpu_f32(op)?) && ok(inv_v.cpu_f32(op)?);
        let f = cpu::forward(
            t_hat.cpu_f32(op)?,
            v_hat.cpu_f32(op)?,
            mask.cpu_f32(op)?,
            tw.cpu_f32(op)?,
            vw.cpu_f32(op)?,
            s,
            finite,
        );
        let saved = CclSaved {
            t_hat,
            inv_t,
            v_hat,
            inv_v,
            max_v: Tensor::from_vec(f.max_v, &[b, b, l], dev)?,
            arg_v: Tensor::from_vec_i32(f.arg_v, &[b, b, l], dev)?,
            max_t: Tensor::from_vec(f.max_t, &[b, b, n], dev)?,
            arg_t: Tensor::from_vec_i32(f.arg_t, &[b, b, n], dev)?,
        };
        return Ok(CclForward {
            t2v: Tensor::from_vec(f.t2v, &[b, b], dev)?,
            v2t: Tensor::from_vec(f.v2t, &[b, b], dev)?,
            logits: Tensor::from_vec(f.logits, &[b, b], dev)?,
            saved,
            sizes: s,
        });
    }
    let smem = (l + n) * 8;
    if smem > 48 * 1024 || b > 65535 {
        return Err(Error::Unsupported {
            op: "ccl",
            detail: format!("L + N = {} or B = {b} too large for one block", l + n),
        });
    }
    let out = |shape: &[usize], dt| Tensor::empty(shape, dt, dev);
    let (t2v, v2t, logits) = (out(&[b, b], DType::F32)?, out(&[b, b], DType::F32)?, out(&[b, b], DType::F32)?);
    let (max_v, arg_v) = (out(&[b, b, l], DType::F32)?, out(&[b, b, l], DType::I32)?);
    let (max_t, arg_t) = (out(&[b, b, n], DType::F32)?, out(&[b, b, n], DType::I32)?);
    let p = CclParams {
        t: t_hat.dev_ptr(),
        v: v_hat.dev_ptr(),
        mask: mask.dev_ptr(),
        tw: tw.dev_ptr(),
        vw: vw.dev_ptr(),
        t2v: t2v.dev_ptr(),
        v2t: v2t.dev_ptr(),
        logits: logits.dev_ptr(),
        max_v: max_v.dev_ptr(),
        arg_v: arg_v.dev_ptr(),
        max_t: max_t.dev_ptr(),
        arg_t: arg_t.dev_ptr(),
        b: b as u32,
        l: check_u32("ccl", l)?,
        n: check_u32("ccl", n)?,
        d: check_u32("ccl", s.d)?,
    };
    let cfg = LaunchCfg { grid: (b as u32, b as u32, 1), block: (256, 1, 1), smem_bytes: smem as u32 };
    // SAFETY: the params hold pointers to live buffers of the sizes this op checked above, for the kernel they were declared for.
    unsafe { dev.launch(Kernel::ccl_fwd_f32, cfg, &p) }?;
    let saved = CclSaved { t_hat, inv_t, v_hat, inv_v, max_v, arg_v, max_t, arg_t };
    Ok(CclForward { t2v, v2t, logits, saved, sizes: s })
}

/// Gradients of Σ d_t2v · t2v + Σ d_v2t · v2t (both [B,B]) w.r.t. t, v, tw and vw.
pub fn ccl_similarity_backward(
    fwd: &CclForward,
    mask: &Tensor,
    tw: &Tensor,
    vw: &Tensor,
    d_t2v: &Tensor,
    d_v2t: &Tensor,
) -> Result<CclGrads> {
    let op = "ccl_backward";
    let CclSizes { b, l, n, d } = fwd.sizes;
    expect(op, "d_t2v", d_t2v, &[b, b])?;
    expect(op, "d_v2t", d_v2t, &[b, b])?;
    let sv = &fwd.saved;
    sv.t_hat.same_device(op, &[mask, tw, vw, d_t2v, d_v2t])?;
    // the forward's fields are public: every buffer the kernels read must match the sizes
    for (what, t, shape) in [
        ("text mask", mask, &[b, l][..]),
        ("word weights", tw, &[b, l]),
        ("patch weights", vw, &[b, n]),
        ("saved t_hat", &sv.t_hat, &[b, l, d]),
        ("saved v_hat", &sv.v_hat, &[b, n, d]),
        ("saved inv_t", &sv.inv_t, &[b, l]),
        ("saved inv_v", &sv.inv_v, &[b, n]),
        ("saved max_v", &sv.max_v, &[b, b, l]),
        ("saved max_t", &sv.max_t, &[b, b, n]),
    ] {
        expect(op, what, t, shape)?;
    }
    for (what, t, shape) in [("saved arg_v", &sv.arg_v, [b, b, l]), ("saved arg_t", &sv.arg_t, [b, b, n])] {
        t.expect_dtype(op, DType::I32)?;
        if t.shape() != shape {
            return Err(Error::shape(op, format!("{what} is {:?}, expected {shape:?}", t.shape())));
        }
    }
    sv.t_hat.same_device(op, &[&sv.v_hat, &sv.inv_t, &sv.inv_v, &sv.max_v, &sv.arg_v, &sv.max_t, &sv.arg_t])?;
    let dev = sv.t_hat.device();
    let (dth, dvh, dtw, dvw) = if let Device::Cpu = dev {
        let g = cpu::backward(
            sv.t_hat.cpu_f32(op)?,
            sv.v_hat.cpu_f32(op)?,
            mask.cpu_f32(op)?,
            tw.cpu_f32(op)?,
            vw.cpu_f32(op)?,
            d_t2v.cpu_f32(op)?,
            d_v2t.cpu_f32(op)?,
            (sv.max_v.cpu_f32(op)?, sv.arg_v.cpu_i32(op)?),
            (sv.max_t.cpu_f32(op)?, sv.arg_t.cpu_i32(op)?),
            fwd.sizes,
        );
        (
            Tensor::from_vec(g.0, &[b, l, d], dev)?,
            Tensor::from_vec(g.1, &[b, n, d], dev)?,
            Tensor::from_vec(g.2, &[b, l], dev)?,
            Tensor::from_vec(g.3, &[b, n], dev)?,
        )
    } else {
        if l * 64 * 4 > 48 * 1024 {
            return Err(Error::Unsupported { op, detail: format!("L = {l} too large for one block") });
        }
        let out = |shape: &[usize]| Tensor::empty(shape, DType::F32, dev);
        let (dth, dvh, dtw, dvw) = (out(&[b, l, d])?, out(&[b, n, d])?, out(&[b, l])?, out(&[b, n])?);
        let p = CclBwdParams {
            t: sv.t_hat.dev_ptr(),
            v: sv.v_hat.dev_ptr(),
            mask: mask.dev_ptr(),
            tw: tw.dev_ptr(),
            vw: vw.dev_ptr(),
            d_t2v: d_t2v.dev_ptr(),
            d_v2t: d_v2t.dev_ptr(),
            max_v: sv.max_v.dev_ptr(),
            arg_v: sv.arg_v.dev_ptr(),
            max_t: sv.max_t.dev_ptr(),
            arg_t: sv.arg_t.dev_ptr(),
            dt: dth.dev_ptr(),
            dv: dvh.dev_ptr(),
            dtw: dtw.dev_ptr(),
            dvw: dvw.dev_ptr(),
            b: b as u32,
            l: l as u32,
            n: n as u32,
            d: d as u32,
        };
        let dcols = (d as u32).div_ceil(64);
        let text = LaunchCfg { grid: (dcols, b as u32, 1), block: (64, 1, 1), smem_bytes: (l * 64 * 4) as u32 };
        // SAFETY: the params hold pointers to live buffers of the sizes this op checked above, for the kernel they were declared for.
        unsafe { dev.launch(Kernel::ccl_text_bwd_f32, text, &p) }?;
        let image =
            LaunchCfg { grid: (dcols, (n as u32).div_ceil(64), b as u32), block: (64, 1, 1), smem_bytes: 64 * 64 * 4 };
        // SAFETY: the params hold pointers to live buffers of the sizes this op checked above, for the kernel they were declared for.
        unsafe { dev.launch(Kernel::ccl_image_bwd_f32, image, &p) }?;
        (dth, dvh, dtw, dvw)
    };
    Ok(CclGrads {
        dt: l2_normalize_backward(&sv.t_hat, &sv.inv_t, &dth)?,
        dv: l2_normalize_backward(&sv.v_hat, &sv.inv_v, &dvh)?,
        dtw,
        dvw,
    })
}

/// Symmetric InfoNCE with diagonal targets and its gradient, at once (B×B is tiny).
pub struct InfoNce {
    /// [3]: ½(CE_rows + CE_cols), CE_rows (text→image), CE_cols (image→text)
    pub loss: Tensor,
    /// [B,B]: d loss[0] / d logits
    pub dlogits: Tensor,
}

/// loss = ½ [CE(s·logits) + CE(s·logitsᵀ)], CE(M) = mean_i −log_softmax_row(M)[i,i].
/// B = 1 is defined: both CE terms are 0 and so is the gradient (one sample has nothing to be
/// contrasted with).
pub fn info_nce(logits: &Tensor, scale: f32) -> Result<InfoNce> {
    let op = "info_nce";
    logits.expect_dtype(op, DType::F32)?;
    if logits.rank() != 2 || logits.shape()[0] != logits.shape()[1] || logits.shape()[0] == 0 {
        return Err(Error::shape(op, format!("logits {:?} must be square [B,B], B >= 1", logits.shape())));
    }
    let b = logits.shape()[0];
    let dev = logits.device();
    if let Device::Cpu = dev {
        let (loss, dl) = cpu::info_nce(logits.cpu_f32(op)?, b, scale);
        return Ok(InfoNce {
            loss: Tensor::from_vec(loss.to_vec(), &[3], dev)?,
            dlogits: Tensor::from_vec(dl, &[b, b], dev)?,
        });
    }
    let loss = Tensor::empty(&[3], DType::F32, dev)?;
    let dlogits = Tensor::empty(&[b, b], DType::F32, dev)?;
    let p = InfoNceParams {
        logits: logits.dev_ptr(),
        loss: loss.dev_ptr(),
        dlogits: dlogits.dev_ptr(),
        scale,
        b: check_u32(op, b)?,
    };
    // SAFETY: the params hold pointers to live buffers of the sizes this op checked above, for the kernel they were declared for.
    unsafe {
        dev.launch(Kernel::infonce_fwd_f32, LaunchCfg { grid: (1, 1, 1), block: (256, 1, 1), smem_bytes: 0 }, &p)
    }?;
    Ok(InfoNce { loss, dlogits })
}
