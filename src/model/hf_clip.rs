//! Pretrained CLIP text weights in the Hugging Face layout (`model.safetensors` of a `CLIPModel`,
//! `CLIPTextModel` or `CLIPTextModelWithProjection`, with its `config.json` beside it), loaded
//! into the text tower under the official names:
//!
//! | Hugging Face | official (OpenAI `clip`) |
//! |---|---|
//! | `text_model.embeddings.token_embedding.weight` | `clip.token_embedding.weight` |
//! | `text_model.embeddings.position_embedding.weight` | `clip.positional_embedding` |
//! | `…layers.{i}.self_attn.{q,k,v}_proj.{weight,bias}` | rows q; k; v of `clip.transformer.resblocks.{i}.attn.in_proj_{weight,bias}` |
//! | `…layers.{i}.self_attn.out_proj` | `…attn.out_proj` |
//! | `…layer_norm1`, `…layer_norm2` | `…ln_1`, `…ln_2` |
//! | `…mlp.fc1`, `…mlp.fc2` | `…mlp.c_fc`, `…mlp.c_proj` |
//! | `text_model.final_layer_norm` | `clip.ln_final` |
//! | `text_projection.weight` [out, in] | `clip.text_projection` [in, out] (transposed) |
//! | `logit_scale` | `clip.logit_scale` |
//!
//! The vision tower (`vision_model.*`, `visual_projection`) is ignored.

use super::RecLmis;
use crate::checkpoint::Values;
use crate::checkpoint::{LoadReport, Offered};
use crate::error::{Error, Result};
use safetensors::{Dtype, SafeTensors};
use std::path::Path;

/// The text tower's shape as `config.json` states it.
#[derive(Debug, Clone, PartialEq)]
pub struct HfTextConfig {
    pub width: usize,
    pub layers: usize,
    pub heads: usize,
    pub vocab: usize,
    pub context: usize,
    pub act: String,
    pub eps: f64,
}

fn err(path: &Path, detail: impl Into<String>) -> Error {
    Error::Checkpoint { path: path.display().to_string(), detail: detail.into() }
}

/// Reads the text part of a CLIP `config.json` (`text_config` of a `CLIPModel`, or the top level
/// of a text-only model).
pub fn read_config(path: &Path) -> Result<HfTextConfig> {
    let bytes = crate::files::read_regular(path, 1 << 20).map_err(|e| err(path, e.to_string()))?;
    let v: serde_json::Value =
        serde_json::from_slice(&bytes).map_err(|e| err(path, format!("not a JSON file: {e}")))?;
    let t = v.get("text_config").unwrap_or(&v);
    let num = |k: &str| -> Result<usize> {
        t.get(k)
            .and_then(|x| x.as_u64())
            .map(|x| x as usize)
            .ok_or_else(|| err(path, format!("lacks the text tower's {k:?} (not a CLIP config?)")))
    };
    Ok(HfTextConfig {
        width: num("hidden_size")?,
        layers: num("num_hidden_layers")?,
        heads: num("num_attention_heads")?,
        vocab: num("vocab_size")?,
        context: num("max_position_embeddings")?,
        // transformers' defaults for CLIPTextConfig when a file leaves them out
        act: t.get("hidden_act").and_then(|x| x.as_str()).unwrap_or("quick_gelu").to_string(),
        eps: t.get("layer_norm_eps").and_then(|x| x.as_f64()).unwrap_or(1e-5),
    })
}

/// Checks the file's text tower against the model's, naming every difference.
fn check_config(c: &HfTextConfig, m: &RecLmis, path: &Path) -> Result<()> {
    let cfg = &m.cfg;
    let mut diffs = vec![];
    for (what, file, model) in [
        ("width", c.width, cfg.clip_width),
        ("layers", c.layers, cfg.clip_layers),
        ("heads", c.heads, cfg.clip_heads),
        ("vocabulary", c.vocab, cfg.vocab_size),
        ("context", c.context, cfg.context_length),
    ] {
        if file != model {
            diffs.push(format!("{what} {file} (preset {}: {model})", cfg.name));
        }
    }
    if c.act != "quick_gelu" {
        diffs.push(format!("activation {:?} (the official text tower uses quick_gelu)", c.act));
    }
    if (c.eps - 1e-5).abs() > 1e-12 {
        diffs.push(format!("LayerNorm eps {} (the text tower uses 1e-5)", c.eps));
    }
    if diffs.is_empty() {
        Ok(())
    } else {
        Err(err(path, format!("does not fit the text tower: {}", diffs.join("; "))))
    }
}

/// A float tensor's values as f32 (F32, F16, BF16, F64).
fn floats(st: &SafeTensors, name: &str) -> std::result::Result<(Vec<usize>, Vec<f32>), String> {
    let v = st.tensor(name).map_err(|e| format!("{name}: {e}"))?;
    let d = v.data();
    let vals: Vec<f32> = match v.dtype() {
        Dtype::F32 => d.chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().expect("4 bytes"))).collect(),
        Dtype::F16 => d.chunks_exact(2).map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32()).collect(),
        Dtype::BF16 => d.chunks_exact(2).map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32()).collect(),
        Dtype::F64 => d.chunks_exact(8).map(|c| f64::from_le_bytes(c.try_into().expect("8 bytes")) as f32).collect(),
        other => return Err(format!("{name}: dtype {other:?} is not a float tensor")),
    };
    Ok((v.shape().to_vec(), vals))
}

/// One file tensor offered under an official name, transposed when asked (2-D).
fn direct_tensor<'a>(st: &'a SafeTensors<'a>, from: &str, to: String, transpose: bool) -> Option<Offered<'a>> {
    let view = st.tensor(from).ok()?;
    let mut shape = view.shape().to_vec();
    if transpose && shape.len() == 2 {
        shape.swap(0, 1);
    }
    let from = from.to_string();
    Some(Offered {
        name: to,
        shape,
        values: Box::new(move || {
            let (s, v) = floats(st, &from)?;
            if !transpose || s.len() != 2 {
                return Ok(Values::F32(v));
            }
            // [r, c] row-major to [c, r]
            let (r, c) = (s[0], s[1]);
            Ok(Values::F32((0..c * r).map(|i| v[(i % r) * c + i / r]).collect()))
        }),
    })
}

/// File tensors of one shape stacked along their first axis under one official name (None when
/// any of them is absent: the tensor is then reported missing).
fn stacked_tensor<'a>(
    st: &'a SafeTensors<'a>,
    from: &[String],
    to: String,
    path: &Path,
) -> Result<Option<Offered<'a>>> {
    let mut shapes = vec![];
    for n in from {
        match st.tensor(n) {
            Ok(v) => shapes.push(v.shape().to_vec()),
            Err(_) => return Ok(None),
        }
    }
    if shapes.iter().any(|s| s != &shapes[0] || s.is_empty()) {
        return Err(err(path, format!("{}: the stacked tensors have shapes {shapes:?}", from.join(", "))));
    }
    let mut shape = shapes[0].clone();
    shape[0] *= from.len();
    let from = from.to_vec();
    Ok(Some(Offered {
        name: to,
        shape,
        values: Box::new(move || {
            let mut out = vec![];
            for n in &from {
                out.extend(floats(st, n)?.1);
            }
            Ok(Values::F32(out))
        }),
    }))
}

/// What loading text weights did, beside the usual report.
#[derive(Debug)]
pub struct TextWeights {
    pub report: LoadReport,
    /// Vision-tower tensors in the file, ignored.
    pub ignored_vision: usize,
    /// Whether the file had `logit_scale` (a text-only model does not: the model keeps its own).
    pub had_logit_scale: bool,
    /// FNV-64 of the weights file (a run records it to refuse other weights on resume).
    pub file_hash: String,
}

/// Loads the text tower of `m` from a Hugging Face CLIP `model.safetensors` (its `config.json`
/// beside it). Every text-tower tensor must come from the file, except `logit_scale` when the
/// file is a text-only model.
pub fn load_text_weights(m: &mut RecLmis, weights: &Path) -> Result<TextWeights> {
    let config = weights.parent().unwrap_or(Path::new(".")).join("config.json");
    let c = read_config(&config)?;
    check_config(&c, m, &config)?;
    let bytes = crate::files::read_regular(weights, u64::MAX).map_err(|e| err(weights, e.to_string()))?;
    let st =
        SafeTensors::deserialize(&bytes).map_err(|e| err(weights, format!("not a valid safetensors file: {e}")))?;
    let names: Vec<String> = st.names().into_iter().map(String::from).collect();
    // CLIPModel and CLIPTextModel both prefix the tower with `text_model.`; accept it absent too
    let prefix = if names.iter().any(|n| n.starts_with("text_model.")) { "text_model." } else { "" };
    let has = |n: &str| names.iter().any(|x| x == n);
    let hf = |s: &str| format!("{prefix}{s}");

    let st = &st;
    // each offered tensor with the file names it came from (what is left over is unexpected)
    let mut parts: Vec<(Vec<String>, Offered)> = vec![];
    let direct = |from: String, to: &str, transpose: bool| {
        direct_tensor(st, &from, to.to_string(), transpose).map(|o| (vec![from], o))
    };
    parts.extend(direct(hf("embeddings.token_embedding.weight"), "clip.token_embedding.weight", false));
    parts.extend(direct(hf("embeddings.position_embedding.weight"), "clip.positional_embedding", false));
    parts.extend(direct(hf("final_layer_norm.weight"), "clip.ln_final.weight", false));
    parts.extend(direct(hf("final_layer_norm.bias"), "clip.ln_final.bias", false));
    parts.extend(direct("text_projection.weight".into(), "clip.text_projection", true));
    parts.extend(direct("logit_scale".into(), "clip.logit_scale", false));
    for i in 0..c.layers {
        let src = |s: &str| hf(&format!("encoder.layers.{i}.{s}"));
        let dst = |s: &str| format!("clip.transformer.resblocks.{i}.{s}");
        for (a, b) in [
            ("self_attn.out_proj.weight", "attn.out_proj.weight"),
            ("self_attn.out_proj.bias", "attn.out_proj.bias"),
            ("layer_norm1.weight", "ln_1.weight"),
            ("layer_norm1.bias", "ln_1.bias"),
            ("layer_norm2.weight", "ln_2.weight"),
            ("layer_norm2.bias", "ln_2.bias"),
            ("mlp.fc1.weight", "mlp.c_fc.weight"),
            ("mlp.fc1.bias", "mlp.c_fc.bias"),
            ("mlp.fc2.weight", "mlp.c_proj.weight"),
            ("mlp.fc2.bias", "mlp.c_proj.bias"),
        ] {
            parts.extend(direct(src(a), &dst(b), false));
        }
        // q, k, v projections stacked into torch MultiheadAttention's packed in_proj
        for part in ["weight", "bias"] {
            let qkv: Vec<String> = ["q", "k", "v"].iter().map(|p| src(&format!("self_attn.{p}_proj.{part}"))).collect();
            if let Some(o) = stacked_tensor(st, &qkv, dst(&format!("attn.in_proj_{part}")), weights)? {
                parts.push((qkv, o));
            }
        }
    }
    let used: Vec<String> = parts.iter().flat_map(|(names, _)| names.iter().cloned()).collect();
    let offered: Vec<Offered> = parts.into_iter().map(|(_, o)| o).collect();
    let mut report = crate::checkpoint::load_offered(&mut m.params, offered, weights)?;
    // the rest of the model is not in this file: only the text tower counts as missing
    report.missing.retain(|k| k.starts_with("clip."));
    let had_logit_scale = has("logit_scale");
    if !had_logit_scale {
        report.missing.retain(|k| k != "clip.logit_scale");
    }
    if !report.missing.is_empty() {
        return Err(err(weights, format!("lacks text-tower tensors: {}", report.missing.join(", "))));
    }
    let is_vision = |n: &str| n.starts_with("vision_model.") || n.starts_with("visual_projection");
    let ignored_vision = names.iter().filter(|n| is_vision(n)).count();
    // position_ids is a buffer of 0..context that some transformers versions save
    report.unexpected =
        names.iter().filter(|n| !is_vision(n) && !used.contains(n) && !n.ends_with("position_ids")).cloned().collect();
    if !report.unexpected.is_empty() {
        return Err(err(weights, format!("has tensors the text tower does not: {}", report.unexpected.join(", "))));
    }
    let file_hash = crate::files::Fnv64::default().update(&bytes).hex();
    Ok(TextWeights { report, ignored_vision, had_logit_scale, file_hash })
}
