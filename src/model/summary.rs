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
