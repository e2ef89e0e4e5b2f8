//! The main job: datasets decoded into memory, batches (augmented on a background thread so the
//! device does not wait), evaluation with the official metrics, and the training loop
//! (`train.rs`).

#[cfg(feature = "train")]
pub mod train;
pub mod visual;

use crate::checkpoint;
use crate::data::augment::{augment, AugOpts};
use crate::data::lvit::{self, Entry, Split};
use crate::device::Device;
use crate::error::{Error, Result};
use crate::model::{Batch, Config, RecLmis};
use crate::ops::loss;
use crate::tensor::Tensor;
use crate::testing::Rng;
use crate::text::NoteTokenizer;
use rayon::prelude::*;
use std::path::Path;

/// A split decoded at the model's size.
pub struct Loaded {
    pub entries: Vec<Entry>,
    /// [N,3,H,W]
    pub images: Vec<f32>,
    /// [N,H,W]
    pub masks: Vec<f32>,
    pub h: usize,
    pub w: usize,
}

impl Loaded {
    pub fn len(&self) -> usize {
        self.entries.len()
    }
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

/// Lists and decodes a split in parallel.
pub fn load(root: &Path, split: Split, h: usize, w: usize) -> Result<Loaded> {
    let entries = lvit::list(root, split)?;
    let decoded: Vec<lvit::Decoded> = entries.par_iter().map(|e| lvit::decode(e, h, w)).collect::<Result<_>>()?;
    let mut images = Vec::with_capacity(entries.len() * 3 * h * w);
    let mut masks = Vec::with_capacity(entries.len() * h * w);
    for d in decoded {
        images.extend_from_slice(&d.image);
        masks.extend_from_slice(&d.mask);
    }
    Ok(Loaded { entries, images, masks, h, w })
}

/// Which notes go with the images (the text-dependence check).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Notes {
    Correct,
    /// Every image gets the note of another image (a fixed derangement).
    Shuffled,
    Empty,
}

/// The note used for image i under `mode`.
fn note_for(d: &Loaded, i: usize, mode: Notes) -> &str {
    match mode {
        Notes::Correct => &d.entries[i].note,
        Notes::Shuffled => &d.entries[(i + d.len() / 2 + 1) % d.len()].note,
        Notes::Empty => "",
    }
}

/// The frozen text tower's output per distinct note ([L·D] each), filled once before training.
pub type TextCache = std::collections::HashMap<String, Vec<f32>>;

/// Runs the (frozen) text tower once per distinct note of `notes`.
pub fn text_cache<'a>(
    m: &RecLmis,
    tok: &NoteTokenizer,
    notes: impl Iterator<Item = &'a str>,
    dev: &Device,
) -> Result<TextCache> {
    let mut uniq: Vec<&str> = notes.collect();
    uniq.sort_unstable();
    uniq.dedup();
    let mut cache = TextCache::new();
    for chunk in uniq.chunks(64) {
        let (mut ids, mut valid) = (vec![], vec![]);
        for n in chunk {
            let (i, v) = tok.encode(n)?;
            ids.extend(i);
            valid.extend(v);
        }
        let l = ids.len() / chunk.len();
        let h = m.text_hidden(
            &Tensor::from_vec_i32(ids, &[chunk.len(), l], dev)?,
            &Tensor::from_vec_i32(valid, &[chunk.len(), l], dev)?,
        )?;
        let v = h.to_vec()?;
        let per = v.len() / chunk.len();
        for (k, n) in chunk.iter().enumerate() {
            cache.insert(n.to_string(), v[k * per..(k + 1) * per].to_vec());
        }
    }
    Ok(cache)
}

/// A batch of the given samples; `aug` (with its rng) augments image and mask.
pub fn make_batch(
    d: &Loaded,
    idx: &[usize],
    tok: &NoteTokenizer,
    mode: Notes,
    aug: Option<(&AugOpts, &mut Rng)>,
    cache: Option<&TextCache>,
    dev: &Device,
) -> Result<Batch> {
    let (h, w, b) = (d.h, d.w, idx.len());
    let mut images = Vec::with_capacity(b * 3 * h * w);
    let mut masks = Vec::with_capacity(b * h * w);
    let (mut ids, mut valid) = (Vec::new(), Vec::new());
    let mut aug = aug;
    for &i in idx {
        let mut img = d.images[i * 3 * h * w..(i + 1) * 3 * h * w].to_vec();
        let mut m = d.masks[i * h * w..(i + 1) * h * w].to_vec();
        if let Some((o, rng)) = aug.as_mut() {
            augment(&mut img, &mut m, h, w, o, rng);
        }
        images.extend(img);
        masks.extend(m);
        let (t, v) = tok.encode(note_for(d, i, mode))?;
        ids.extend(t);
        valid.extend(v);
    }
    let l = ids.len() / b.max(1);
    let text_hidden = match cache {
        Some(c) => {
            let rows: Option<Vec<&Vec<f32>>> = idx.iter().map(|&i| c.get(note_for(d, i, mode))).collect();
            match rows {
                Some(r) => {
                    let dm = r[0].len() / l.max(1);
                    Some(Tensor::from_vec(r.into_iter().flatten().copied().collect(), &[b, l, dm], dev)?)
                }
                None => None, // a note outside the cache: the tower runs
            }
        }
        None => None,
    };
    Ok(Batch {
        images: Tensor::from_vec(images, &[b, 3, h, w], dev)?,
        ids: Tensor::from_vec_i32(ids, &[b, l], dev)?,
        valid: Tensor::from_vec_i32(valid, &[b, l], dev)?,
        masks: Some(Tensor::from_vec(masks, &[b, h, w], dev)?),
        text_hidden,
    })
}

/// Mean per-image Dice and IoU (the official test script's definitions) and the batch-mean hard
/// Dice (what validation selects checkpoints by).
#[derive(Clone, Copy, Debug, Default)]
pub struct Scores {
    pub dice: f64,
    pub iou: f64,
    pub hard_dice: f64,
}

pub fn evaluate(
    m: &RecLmis,
    d: &Loaded,
    tok: &NoteTokenizer,
    mode: Notes,
    batch: usize,
    dev: &Device,
) -> Result<Scores> {
    if d.is_empty() {
        return Err(Error::Other("evaluation on an empty split".into()));
    }
    let idx: Vec<usize> = (0..d.len()).collect();
    let mut s = Scores::default();
    for chunk in idx.chunks(batch.max(1)) {
        let b = make_batch(d, chunk, tok, mode, None, None, dev)?;
        let probs = m.infer(&b)?;
        let target = b.masks.as_ref().expect("made with masks").reshape(probs.shape())?;
        let per = loss::metrics(&probs, &target)?.per_image.to_vec()?;
        for r in per.chunks(4) {
            s.dice += r[0] as f64;
            s.iou += r[1] as f64;
            s.hard_dice += r[2] as f64;
        }
    }
    let n = d.len() as f64;
    Ok(Scores { dice: s.dice / n, iou: s.iou / n, hard_dice: s.hard_dice / n })
}

/// Loads a checkpoint written by `train` (its configuration from the metadata) and the tokenizer
/// saved beside it (or `tokenizer`).
pub fn load_run(checkpoint: &Path, tokenizer: Option<&Path>, dev: &Device) -> Result<(RecLmis, NoteTokenizer)> {
    let meta = checkpoint::read_metadata(checkpoint)?;
    let cfg = Config::from_metadata(&meta).map_err(|e| data_err(checkpoint, e))?;
    let mut m = RecLmis::new(cfg.clone(), dev, 0)?;
    let rep = checkpoint::load(&mut m.params, checkpoint)?;
    if !rep.missing.is_empty() {
        return Err(data_err(checkpoint, format!("incomplete checkpoint: {}", rep.summary())));
    }
    let tok_path = match tokenizer {
        Some(p) => p.to_path_buf(),
        None => checkpoint.parent().unwrap_or(Path::new(".")).join("tokenizer.json"),
    };
    let tok = NoteTokenizer::from_file(&tok_path, cfg.token_len)?;
    Ok((m, tok))
}

fn data_err(path: &Path, e: impl std::fmt::Display) -> Error {
    Error::Data { path: path.display().to_string(), detail: e.to_string() }
}
