//! `reclmis model`: the module tree with parameter counts, and each tensor's role as the official
//! key list classifies it (tests/fixtures/official_tiny/README.md, "Full-size official checkpoint").

use super::RecLmis;
use crate::nn::params::Kind;
use std::collections::BTreeMap;
use std::fmt::Write;

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Role {
    /// Needed for the segmentation mask (the inference path).
    Mask,
    /// Only for the W_poi / W_woi maps (evaluation's extra outputs, and training).
    Weights,
    /// Training only (CVR/CLR, the CCL temperature).
    Train,
    /// Never used (PLAM conv_sig, decoder1's cross-attention): registered so official
    /// checkpoints load with no unexpected keys.
    Unused,
}

/// The official role of a state_dict key.
pub fn role(key: &str) -> Role {
    if key.contains(".conv_sig.") || (key.contains(".decoder1.") && key.contains(".encoder_attn")) {
        Role::Unused
    } else if key.starts_with("rec_") || key == "clip.logit_scale" {
        Role::Train
    } else if key.starts_with("mlp_") || key.starts_with("interact.CTBN.") {
        Role::Weights
    } else {
        Role::Mask
    }
}

/// Element counts by role (parameters, buffers and counters).
pub fn counts_by_role(m: &RecLmis) -> BTreeMap<Role, usize> {
    let mut out = BTreeMap::new();
    for id in m.params.ids() {
        *out.entry(role(m.params.name(id))).or_insert(0) += m.params.value(id).numel();
    }
    for (n, _) in m.params.counters() {
        *out.entry(role(n)).or_insert(0) += 1;
    }
    out
}

fn human(n: usize) -> String {
    match n {
        n if n >= 1_000_000 => format!("{:.2}M", n as f64 / 1e6),
        n if n >= 10_000 => format!("{:.1}k", n as f64 / 1e3),
        n => n.to_string(),
    }
}

/// The tree (two levels of key prefixes) with trainable / frozen / buffer counts, then totals.
pub fn render(m: &RecLmis) -> String {
    let p = &m.params;
    let mut groups: BTreeMap<String, (usize, usize, usize, usize)> = BTreeMap::new();
    let mut order: Vec<String> = vec![];
    for id in p.ids() {
        let name = p.name(id);
        let parts: Vec<&str> = name.split('.').collect();
        let depth = if matches!(parts[0], "clip" | "rec_img_trans1" | "rec_text_trans1" | "interact") { 2 } else { 1 };
        let key = parts[..depth.min(parts.len() - 1).max(1)].join(".");
        if !groups.contains_key(&key) {
            order.push(key.clone());
        }
        let e = groups.entry(key).or_default();
        let n = p.value(id).numel();
        match p.kind(id) {
            Kind::Param { trainable: true } => e.0 += n,
            Kind::Param { trainable: false } => e.1 += n,
            Kind::Buffer => e.2 += n,
        }
        e.3 += 1;
    }
    let mut s = String::new();
    let c = &m.cfg;
    let _ = writeln!(
        s,
        "RecLMIS preset {}: {}x{} images, U-Net {:?}, d_model {}, CLIP {}x{} ({} heads), CVR/CLR {} layers x2, FFN {}",
        c.name,
        c.img_size.0,
        c.img_size.1,
        c.unet_widths,
        c.d_model,
        c.clip_layers,
        c.clip_width,
        c.clip_heads,
        c.rec_layers,
        c.rec_ffn
    );
    let _ = writeln!(s, "{:<34} {:>10} {:>10} {:>10} {:>7}", "module", "trainable", "frozen", "buffers", "tensors");
    for k in &order {
        let (t, f, b, n) = groups[k];
        let _ = writeln!(s, "{:<34} {:>10} {:>10} {:>10} {:>7}", k, human(t), human(f), human(b), n);
    }
    let (t, f, b) = p.counts();
    let _ = writeln!(
        s,
        "total: {t} trainable, {f} frozen, {b} buffer elements ({} tensors + {} counters)",
        p.len(),
        p.counters().len()
    );
    let r = counts_by_role(m);
    let get = |x: Role| r.get(&x).copied().unwrap_or(0);
    let _ = writeln!(
        s,
        "by role: mask (inference) {}, W maps {}, training only {}, unused {}",
        get(Role::Mask),
        get(Role::Weights),
        get(Role::Train),
        get(Role::Unused)
    );
    s
}

/// Multiply-adds and parameters per module of the official key list, counted while the model
/// runs (`crate::autograd::count`): the inference path (the mask only) and one training step
/// (forward and backward) at batch `batch`, the preset's image size and notes of `token_len`
/// tokens. The text tower runs in both, as the official code runs its frozen CLIP every step.
#[cfg(feature = "train")]
pub struct FlopReport {
    pub batch: usize,
    /// (module, parameters, inference, training forward and backward)
    pub rows: Vec<(&'static str, usize, u64, crate::autograd::count::Macs)>,
}

/// A batch of `batch` random images at the preset's size, notes filling `token_len` positions
/// and masks (what one training step of that size reads).
#[cfg(feature = "train")]
pub fn synthetic_batch(m: &RecLmis, batch: usize) -> crate::error::Result<super::Batch> {
    use crate::tensor::Tensor;
    let c = &m.cfg;
    let dev = m.device();
    let (h, w) = c.img_size;
    let l = c.token_len;
    let mut rng = crate::rng::Rng::new(1);
    let images = Tensor::from_vec(rng.vec(batch * 3 * h * w, 0.0, 1.0), &[batch, 3, h, w], dev)?;
    let ids: Vec<i32> = (0..batch * l).map(|i| (i % c.vocab_size.max(1)) as i32).collect();
    let masks = (0..batch * h * w).map(|i| ((i / w) % 7 < 3) as u8 as f32).collect();
    Ok(super::Batch {
        images,
        ids: Tensor::from_vec_i32(ids, &[batch, l], dev)?,
        valid: Tensor::from_vec_i32(vec![1; batch * l], &[batch, l], dev)?,
        masks: Some(Tensor::from_vec(masks, &[batch, h, w], dev)?),
        text_hidden: None,
    })
}

#[cfg(feature = "train")]
pub fn count_flops(m: &RecLmis, batch: usize) -> crate::error::Result<FlopReport> {
    use crate::autograd::count;
    let b = synthetic_batch(m, batch)?;
    let mut rng = crate::rng::Rng::new(1);
    let (probs, infer) = count::measure(|| m.infer(&b));
    probs?;
    let (step, train) = count::measure(|| -> crate::error::Result<()> {
        let g = m.train_graph()?.with_dropout_seed(1);
        let out = m.forward_train(&g, &b, None, &mut rng)?;
        g.backward(&out.total, m.params.len())?;
        Ok(())
    });
    step?;
    let modules = [
        "clip",
        "text_module4",
        "inc",
        "down1",
        "down2",
        "down3",
        "down4",
        "interact",
        "up4",
        "up3",
        "up2",
        "up1",
        "outc",
        "mlp_visual",
        "mlp_woi",
        "rec_img_trans1",
        "rec_text_trans1",
        "ccl",
    ];
    let params = |module: &str| -> usize {
        m.params
            .ids()
            .filter(|&id| m.params.name(id).split('.').next() == Some(module))
            .filter(|&id| matches!(m.params.kind(id), Kind::Param { .. }))
            .map(|id| m.params.value(id).numel())
            .sum()
    };
    let mut rows = vec![];
    for module in modules {
        let inf = infer.get(module).map_or(0, |x| x.forward);
        rows.push((module, params(module), inf, train.get(module).copied().unwrap_or_default()));
    }
    // every counted op belongs to a listed module (a new module must be listed)
    if let Some(k) = infer.keys().chain(train.keys()).find(|k| !modules.contains(k)) {
        return Err(crate::error::Error::Other(format!("multiply-adds counted under an unlisted module {k:?}")));
    }
    Ok(FlopReport { batch, rows })
}

#[cfg(feature = "train")]
impl FlopReport {
    pub fn render(&self, cfg: &super::Config) -> String {
        let g = |x: u64| format!("{:.3}", x as f64 / 1e9);
        let mut s = String::new();
        let (h, w) = cfg.img_size;
        let _ = writeln!(
            s,
            "preset {}: batch {}, {h}x{w} images, notes of {} tokens; GMACs = 1e9 multiply-adds \
             (FLOPs = 2x); parameters are trainable and frozen weights, no buffers",
            cfg.name, self.batch, cfg.token_len
        );
        let _ = writeln!(
            s,
            "{:<16} {:>11} {:>12} {:>12} {:>12}",
            "module", "params", "infer GMACs", "train fwd", "train bwd"
        );
        let (mut tp, mut ti, mut tf, mut tb) = (0usize, 0u64, 0u64, 0u64);
        for (name, p, inf, tr) in &self.rows {
            let _ = writeln!(
                s,
                "{:<16} {:>11} {:>12} {:>12} {:>12}",
                name,
                human(*p),
                g(*inf),
                g(tr.forward),
                g(tr.backward)
            );
            tp += p;
            ti += inf;
            tf += tr.forward;
            tb += tr.backward;
        }
        let _ = writeln!(s, "{:<16} {:>11} {:>12} {:>12} {:>12}", "total", human(tp), g(ti), g(tf), g(tb));
        // what a deployed mask needs: the modules the inference path runs
        let infer_rows = || self.rows.iter().filter(|r| r.2 > 0);
        let (ip, im) = infer_rows().fold((0, 0), |(p, m), r| (p + r.1, m + r.2));
        let (cp, cm) = infer_rows().filter(|r| r.0 == "clip").fold((0, 0), |(p, m), r| (p + r.1, m + r.2));
        let _ = writeln!(s, "{:<16} {:>11} {:>12}", "inference path", human(ip), g(im));
        let _ = writeln!(
            s,
            "{:<16} {:>11} {:>12}   (the segmentation network itself)",
            "  without clip",
            human(ip - cp),
            g(im - cm)
        );
        s
    }
}

/// Tensor bytes of training at one batch size on one device (`reclmis model --memory`).
#[cfg(feature = "train")]
#[derive(Clone, Copy, Debug)]
pub struct MemoryReport {
    /// The model's parameters and buffers, before any step.
    pub weights: u64,
    /// Alive between steps once the optimiser has its moments (weights + Adam's m and v).
    pub between_steps: u64,
    /// Adam's m and v (for the weights that receive a gradient), as the optimiser holds them.
    pub moments: u64,
    /// The most alive at once during the second step (forward, backward, optimiser): what the
    /// device must hold.
    pub peak: u64,
}

/// Builds `cfg`'s model on `dev` and runs two training steps at `batch` (the first creates the
/// optimiser's moments), counting live tensor bytes (`device::memory`). The model's own tensors
/// must be the only ones alive on `dev` when it starts (the CLI's case).
#[cfg(feature = "train")]
pub fn measure_memory(
    cfg: &super::Config,
    batch: usize,
    precision: crate::autograd::Precision,
    dev: &crate::device::Device,
) -> crate::error::Result<MemoryReport> {
    use crate::device::memory;
    let kind = dev.kind();
    let before = memory::live(kind);
    let mut m = RecLmis::new(cfg.clone(), dev, 0)?;
    m.precision = precision;
    let weights = memory::live(kind) - before;
    let b = synthetic_batch(&m, batch)?;
    let input = memory::live(kind) - before - weights;
    let mut tr = super::train::Trainer::new(m, crate::optim::AdamConfig::default());
    let mut rng = crate::rng::Rng::new(1);
    tr.step(&b, None, &mut rng)?;
    let between_steps = memory::live(kind) - before - input;
    let moments = tr.adam.m.iter().chain(&tr.adam.v).flatten().map(|t| t.numel() as u64 * 4).sum();
    memory::reset_peak(kind);
    tr.step(&b, None, &mut rng)?;
    let peak = memory::peak(kind) - before;
    Ok(MemoryReport { weights, between_steps, moments, peak })
}
