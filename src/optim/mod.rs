//! Optimisers and learning-rate schedules: Adam and AdamW exactly as torch.optim defines them
//! (one fused update kernel per tensor on cuda/emu, the same arithmetic on cpu), gradient
//! clipping by global norm, cosine annealing with warm restarts and exponential decay.

/// Its `reclmis bench` cases (registered in `bench::registry`).
#[cfg(feature = "cli")]
pub mod bench;
pub mod reference;
pub mod schedule;

use crate::device::{Device, LaunchCfg};
use crate::error::{Error, Result};
use crate::kernels::Kernel;
use crate::ops::elementwise;
use crate::ops::reduce;
use crate::tensor::{DType, Tensor};

crate::kernel_params! {
    struct AdamParams [96] {
        p: u64,
        g: u64,
        m: u64,
        v: u64,
        p_out: u64,
        m_out: u64,
        v_out: u64,
        n: u64,
        lr: f32,
        beta1: f32,
        beta2: f32,
        eps: f32,
        weight_decay: f32,
        bc1: f32,
        bc2_sqrt: f32,
        decoupled: u32,
    }
}

#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AdamConfig {
    pub lr: f32,
    pub beta1: f32,
    pub beta2: f32,
    pub eps: f32,
    pub weight_decay: f32,
    /// AdamW (decay applied to the weights) instead of Adam (decay added to the gradient).
    pub decoupled: bool,
}

impl Default for AdamConfig {
    /// torch.optim.Adam's defaults with the official lr 3e-4.
    fn default() -> Self {
        AdamConfig { lr: 3e-4, beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.0, decoupled: false }
    }
}

/// One tensor's update. Returns (p, m, v) after `step` (1-based) steps.
/// Checks an Adam step's operands and returns its bias corrections (1 − β1^t, √(1 − β2^t)).
fn adam_check(c: &AdamConfig, step: u64, p: &Tensor, g: &Tensor, m: &Tensor, v: &Tensor) -> Result<(f32, f32)> {
    let op = "adam";
    p.same_device(op, &[g, m, v])?;
    p.expect_dtype(op, DType::F32)?;
    for (name, t) in [("grad", g), ("exp_avg", m), ("exp_avg_sq", v)] {
        if t.shape() != p.shape() {
            return Err(Error::shape(op, format!("{name} {:?} vs parameter {:?}", t.shape(), p.shape())));
        }
        t.expect_dtype(op, DType::F32)?;
    }
    if step == 0 {
        return Err(Error::shape(op, "steps count from 1"));
    }
    let bc1 = 1.0 - (c.beta1 as f64).powi(step as i32);
    let bc2_sqrt = (1.0 - (c.beta2 as f64).powi(step as i32)).sqrt();
    Ok((bc1 as f32, bc2_sqrt as f32))
}

/// One Adam step of one tensor: the new parameter, first and second moments.
pub fn adam_update(
    c: &AdamConfig,
    step: u64,
    p: &Tensor,
    g: &Tensor,
    m: &Tensor,
    v: &Tensor,
) -> Result<(Tensor, Tensor, Tensor)> {
    let op = "adam";
    let (bc1, bc2_sqrt) = adam_check(c, step, p, g, m, v)?;
    let dev = p.device();
    if let Device::Cpu = dev {
        let (mut pn, mut mn, mut vn) = (p.cpu_f32(op)?.to_vec(), m.cpu_f32(op)?.to_vec(), v.cpu_f32(op)?.to_vec());
        cpu_update(c, (bc1, bc2_sqrt), &mut pn, g.cpu_f32(op)?, &mut mn, &mut vn);
        return Ok((
            Tensor::from_vec(pn, p.shape(), dev)?,
            Tensor::from_vec(mn, p.shape(), dev)?,
            Tensor::from_vec(vn, p.shape(), dev)?,
        ));
    }
    let out = |_| Tensor::empty(p.shape(), DType::F32, dev);
    let (pn, mn, vn) = (out(0)?, out(1)?, out(2)?);
    launch(c, (bc1, bc2_sqrt), [p, g, m, v], [&pn, &mn, &vn])?;
    Ok((pn, mn, vn))
}

/// The fused kernel over [p, g, m, v] into [p_out, m_out, v_out] (checked by `adam_check`; an
/// output may be its own input's buffer: each element is read before it is written, by the same
/// thread).
fn launch(c: &AdamConfig, (bc1, bc2_sqrt): (f32, f32), [p, g, m, v]: [&Tensor; 4], out: [&Tensor; 3]) -> Result<()> {
    let a = AdamParams {
        p: p.dev_ptr(),
        g: g.dev_ptr(),
        m: m.dev_ptr(),
        v: v.dev_ptr(),
        p_out: out[0].dev_ptr(),
        m_out: out[1].dev_ptr(),
        v_out: out[2].dev_ptr(),
        n: p.numel() as u64,
        lr: c.lr,
        beta1: c.beta1,
        beta2: c.beta2,
        eps: c.eps,
        weight_decay: c.weight_decay,
        bc1,
        bc2_sqrt,
        decoupled: c.decoupled as u32,
    };
    if p.numel() > 0 {
        // SAFETY: the params hold pointers to live buffers of the sizes adam_check checked, for
        // the kernel they were declared for; an output aliasing its input is read, then written,
        // by one thread per element.
        unsafe { p.device().launch(Kernel::adam_fwd_f32, LaunchCfg::elementwise(p.numel()), &a) }?;
    }
    Ok(())
}

/// `adam_update` writing the moments in place where it can (moments no other handle shares: the
/// optimiser's own), so that a step streams p, g, m and v once and allocates only the new
/// parameter, on every device. The same arithmetic, bit for bit. The operands were checked by
/// `adam_check`, which gave the bias corrections.
fn adam_update_owned(
    c: &AdamConfig,
    (step, bc1, bc2_sqrt): (u64, f32, f32),
    p: &Tensor,
    g: &Tensor,
    mut m: Tensor,
    mut v: Tensor,
) -> Result<(Tensor, Tensor, Tensor)> {
    let op = "adam";
    if !(m.is_sole() && v.is_sole()) {
        return adam_update(c, step, p, g, &m, &v);
    }
    if !matches!(p.device(), Device::Cpu) {
        // the kernel writes the moments over themselves: every device holds the same tensors
        // (the memory accounting of the cpu is the GPU's)
        let pn = Tensor::empty(p.shape(), DType::F32, p.device())?;
        launch(c, (bc1, bc2_sqrt), [p, g, &m, &v], [&pn, &m, &v])?;
        return Ok((pn, m, v));
    }
    let mut pn = p.cpu_f32(op)?.to_vec();
    match (m.sole_cpu_f32_mut(), v.sole_cpu_f32_mut()) {
        (Some(ms), Some(vs)) => cpu_update(c, (bc1, bc2_sqrt), &mut pn, g.cpu_f32(op)?, ms, vs),
        // a memory-mapped moment (not writable): the copying path
        _ => return adam_update(c, step, p, g, &m, &v),
    }
    Ok((Tensor::from_vec(pn, p.shape(), p.device())?, m, v))
}

/// The update in place over p, m and v, in chunks over the rayon threads; each element's
/// arithmetic is the kernel's (adam_fwd_f32), in the same order.
fn cpu_update(c: &AdamConfig, (bc1, bc2_sqrt): (f32, f32), p: &mut [f32], g: &[f32], m: &mut [f32], v: &mut [f32]) {
    use rayon::prelude::*;
    // 64 KB of each stream per task: enough to amortise the split, small enough to balance
    const CHUNK: usize = 1 << 14;
    let step = |p: &mut [f32], g: &[f32], m: &mut [f32], v: &mut [f32]| {
        for (((p, &g), m), v) in p.iter_mut().zip(g).zip(m.iter_mut()).zip(v.iter_mut()) {
            let (mut pi, mut gi) = (*p, g);
            if c.decoupled {
                pi *= 1.0 - c.lr * c.weight_decay;
            } else {
                gi += c.weight_decay * pi;
            }
            let mi = c.beta1 * *m + (1.0 - c.beta1) * gi;
            let vi = c.beta2 * *v + (1.0 - c.beta2) * gi * gi;
            let denom = vi.sqrt() / bc2_sqrt + c.eps;
            *p = pi - (c.lr / bc1) * mi / denom;
            *m = mi;
            *v = vi;
        }
    };
    if p.len() <= CHUNK {
        return step(p, g, m, v);
    }
    p.par_chunks_mut(CHUNK)
        .zip(g.par_chunks(CHUNK))
        .zip(m.par_chunks_mut(CHUNK))
        .zip(v.par_chunks_mut(CHUNK))
        .for_each(|(((p, g), m), v)| step(p, g, m, v));
}

/// Adam state over a list of parameters (by index); parameters without a gradient this step are
/// left unchanged, as torch skips them.
pub struct Adam {
    pub cfg: AdamConfig,
    pub step: u64,
    pub m: Vec<Option<Tensor>>,
    pub v: Vec<Option<Tensor>>,
}

impl Adam {
    pub fn new(cfg: AdamConfig, n_params: usize) -> Adam {
        Adam { cfg, step: 0, m: vec![None; n_params], v: vec![None; n_params] }
    }

    /// One step: returns the new value of every parameter that has a gradient.
    pub fn step(&mut self, params: &[&Tensor], grads: &[Option<Tensor>]) -> Result<Vec<Option<Tensor>>> {
        if params.len() != grads.len() || params.len() != self.m.len() {
            return Err(Error::shape(
                "adam",
                format!("{} params, {} grads, state for {}", params.len(), grads.len(), self.m.len()),
            ));
        }
        self.step += 1;
        let mut out = Vec::with_capacity(params.len());
        for (i, (p, g)) in params.iter().zip(grads).enumerate() {
            let Some(g) = g else {
                out.push(None);
                continue;
            };
            let zero = || Tensor::zeros(p.shape(), p.device());
            // taken out of the state, not cloned: the update then writes them in place
            let (m, v) = match (self.m[i].take(), self.v[i].take()) {
                (Some(m), Some(v)) => (m, v),
                _ => (zero()?, zero()?),
            };
            let (bc1, bc2_sqrt) = match adam_check(&self.cfg, self.step, p, g, &m, &v) {
                Ok(bc) => bc,
                Err(e) => {
                    // put back (zeros where there was no state yet: the same first step)
                    (self.m[i], self.v[i]) = (Some(m), Some(v));
                    return Err(e);
                }
            };
            let (pn, mn, vn) = adam_update_owned(&self.cfg, (self.step, bc1, bc2_sqrt), p, g, m, v)?;
            self.m[i] = Some(mn);
            self.v[i] = Some(vn);
            out.push(Some(pn));
        }
        Ok(out)
    }
}

/// The global L2 norm of the gradients (NaN or inf when any gradient is not finite).
pub fn grad_norm(grads: &[Option<Tensor>]) -> Result<f32> {
    let mut sq = 0.0f64;
    for g in grads.iter().flatten() {
        let flat = g.reshape(&[g.numel()])?;
        let s = reduce::sum(&elementwise::mul(&flat, &flat)?, 0)?;
        sq += s.to_vec()?[0] as f64;
    }
    Ok(sq.sqrt() as f32)
}

/// Scales the gradients so that their global L2 norm is at most `max_norm` (torch's
/// clip_grad_norm_: factor max_norm / (norm + 1e-6) when it is below 1). Returns the norm before.
pub fn clip_grad_norm(grads: &mut [Option<Tensor>], max_norm: f32) -> Result<f32> {
    let norm = grad_norm(grads)?;
    clip_to(grads, norm, max_norm)?;
    Ok(norm)
}

/// The factor clipping to `max_norm` scales gradients of global norm `norm` by: max_norm /
/// (norm + 1e-6) when that is below 1, else None (left as they are).
pub fn clip_factor(norm: f32, max_norm: f32) -> Option<f32> {
    Some(max_norm / (norm + 1e-6)).filter(|&f| f < 1.0)
}

/// `clip_grad_norm` for gradients whose global norm is already known (`norm`, from `grad_norm`).
pub fn clip_to(grads: &mut [Option<Tensor>], norm: f32, max_norm: f32) -> Result<()> {
    if let Some(factor) = clip_factor(norm, max_norm) {
        for g in grads.iter_mut().flatten() {
            *g = elementwise::scale(g, factor)?;
        }
    }
    Ok(())
}
