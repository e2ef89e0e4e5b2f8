//! The main job: datasets decoded into memory, batches (augmented on a background thread so the
//! device does not wait), evaluation with the official metrics, and the training loop
//! (`train.rs`).

#[cfg(feature = "train")]
pub mod ablate;
#[cfg(feature = "cli")]
pub mod export;
#[cfg(feature = "train")]
pub mod recipe;
pub mod run_dir;
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
use crate::rng::Rng;
use crate::tensor::Tensor;
use crate::text::NoteTokenizer;
use rayon::prelude::*;
use std::path::Path;

/// A split decoded at the model's size, kept as bytes (a quarter of f32; batches convert).
pub struct Loaded {
    pub entries: Vec<Entry>,
    /// [N,3,H,W], value / 255 is the model's input
    pub images: Vec<u8>,
    /// [N,H,W], 0/1
    pub masks: Vec<u8>,
    pub h: usize,
    pub w: usize,
    /// What the loader noticed and handled (skipped files, masks with more than two values),
    /// for the command to print.
    pub notes: Vec<String>,
}

impl Loaded {
    pub fn len(&self) -> usize {
        self.entries.len()
    }
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
    /// A stable fingerprint of the decoded split (names, notes, pixels): `--resume` refuses
    /// other data unless told to accept it.
    pub fn fingerprint(&self) -> String {
        let mut f = crate::files::Fnv64::default();
        for e in &self.entries {
            let name = |p: &Path| p.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
            f.field(name(&e.image).as_bytes()).field(name(&e.mask).as_bytes()).field(e.note.as_bytes());
        }
        // pixels in 64-bit words: FNV over every byte of a 1 GB split would take seconds
        let mix = |f: &mut crate::files::Fnv64, bytes: &[u8]| {
            let mut acc = 0u64;
            for (i, c) in bytes.chunks(8).enumerate() {
                let mut w = [0u8; 8];
                w[..c.len()].copy_from_slice(c);
                acc = (acc ^ u64::from_le_bytes(w)).wrapping_mul(0x9E37_79B9_7F4A_7C15).rotate_left(29) ^ i as u64;
            }
            f.update(&acc.to_le_bytes());
        };
        mix(&mut f, &self.images);
        mix(&mut f, &self.masks);
        f.hex()
    }
}

/// Lists and decodes a split in parallel, each sample straight into its place in the split's
/// buffers (so the peak is the split's byte size, not decoded copies plus the concatenation).
pub fn load(root: &Path, split: Split, h: usize, w: usize) -> Result<Loaded> {
    load_listed(root, split, lvit::list(root, split)?, h, w)
}

/// The split's counterfactual samples (image, the note naming only its unmentioned opacity,
/// that opacity's mask), when the dataset has them (synth's Val and Test).
pub fn load_counterfactual(root: &Path, split: Split, h: usize, w: usize) -> Result<Option<Loaded>> {
    match lvit::list_counterfactual(root, split)? {
        Some(l) if !l.entries.is_empty() => Ok(Some(load_listed(root, split, l, h, w)?)),
        _ => Ok(None),
    }
}

/// Two loaded sets of the same image size as one (the second's samples after the first's).
pub fn concat(a: Loaded, b: Loaded) -> Result<Loaded> {
    if (a.h, a.w) != (b.h, b.w) {
        return Err(Error::Other(format!("cannot join sets of {}x{} and {}x{} images", a.h, a.w, b.h, b.w)));
    }
    let (mut a, b) = (a, b);
    a.entries.extend(b.entries);
    a.images.extend(b.images);
    a.masks.extend(b.masks);
    a.notes.extend(b.notes);
    Ok(a)
}

fn load_listed(root: &Path, split: Split, listed: lvit::Listed, h: usize, w: usize) -> Result<Loaded> {
    let entries = listed.entries;
    let n = entries.len();
    let (img_n, mask_n) = (3 * h * w, h * w);
    let alloc = |len: Option<usize>, what: &str| -> Result<Vec<u8>> {
        let len = len.ok_or_else(|| Error::Other(format!("{n} {what} of {h}x{w} overflow a buffer size")))?;
        let mut v = Vec::new();
        v.try_reserve_exact(len)
            .map_err(|e| Error::Other(format!("cannot hold {n} {what} of {h}x{w} ({len} bytes): {e}")))?;
        v.resize(len, 0);
        Ok(v)
    };
    let mut images = alloc(n.checked_mul(img_n), "images")?;
    let mut masks = alloc(n.checked_mul(mask_n), "masks")?;
    let stats: Vec<(bool, u16)> = entries
        .par_iter()
        .zip(images.par_chunks_mut(img_n.max(1)))
        .zip(masks.par_chunks_mut(mask_n.max(1)))
        .map(|((e, im), m)| lvit::decode_into(e, h, w, im, m))
        .collect::<Result<_>>()?;
    let mut notes = vec![];
    if !listed.skipped.is_empty() {
        notes.push(format!(
            "{}: skipped {} file(s) that are not images: {}",
            root.join(split.folder()).join("img").display(),
            listed.skipped.len(),
            listed.skipped.iter().take(5).cloned().collect::<Vec<_>>().join(", ")
        ));
    }
    let odd = stats.iter().filter(|s| s.0).count();
    if odd > 0 {
        let max = stats.iter().map(|s| s.1).max().unwrap_or(0);
        notes.push(format!(
            "{}: {odd} of {n} masks hold values other than 0 and their maximum (largest value {max}); every \
             non-zero pixel is foreground, as the official loader reads masks",
            split.folder()
        ));
    }
    Ok(Loaded { entries, images, masks, h, w, notes })
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
pub fn text_cache<'a>(m: &RecLmis, tok: &NoteTokenizer, notes: impl Iterator<Item = &'a str>) -> Result<TextCache> {
    let dev = m.device();
    let mut uniq: Vec<&str> = notes.collect();
    uniq.sort_unstable();
    uniq.dedup();
    let mut cache = TextCache::new();
    // chunks of at most FEW_ROWS token rows: the tower's Linears then run on the cpu's register
    // tiles, as for a training batch of up to that many rows, so a cached note's hidden states
    // are those of an uncached batch bit for bit (the packing GEMM of larger batches rounds its
    // sums in another order)
    let per_chunk = (crate::ops::gemm::cpu::FEW_ROWS / m.cfg.token_len.max(1)).clamp(1, 64);
    for chunk in uniq.chunks(per_chunk) {
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
        let mut img: Vec<f32> =
            d.images[i * 3 * h * w..(i + 1) * 3 * h * w].iter().map(|&b| b as f32 / 255.0).collect();
        let mut m: Vec<f32> = d.masks[i * h * w..(i + 1) * h * w].iter().map(|&b| b as f32).collect();
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

pub fn evaluate(m: &RecLmis, d: &Loaded, tok: &NoteTokenizer, mode: Notes, batch: usize) -> Result<Scores> {
    let dev = m.device();
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

/// Loads a checkpoint for inference (its configuration from the metadata; the training-only
/// reconstruction left unread) and its tokenizer: the one embedded in an exported checkpoint,
/// else `tokenizer` or tokenizer.json beside it, which must be the one the checkpoint records.
pub fn load_run(checkpoint: &Path, tokenizer: Option<&Path>, dev: &Device) -> Result<(RecLmis, NoteTokenizer)> {
    load_run_timed(checkpoint, tokenizer, dev).map(|(m, t, _)| (m, t))
}

/// Wall seconds of `load_run_timed`'s phases (`reclmis-infer --timings`). The tokenizer is built
/// while the weights are read, so those two overlap.
#[derive(Clone, Copy, Debug, Default)]
pub struct LoadTimes {
    pub metadata: f64,
    pub tokenizer: f64,
    pub weights: f64,
}

/// `load_run`, timing its phases.
pub fn load_run_timed(
    checkpoint: &Path,
    tokenizer: Option<&Path>,
    dev: &Device,
) -> Result<(RecLmis, NoteTokenizer, LoadTimes)> {
    #[cfg(feature = "pth")]
    if crate::pth::looks_like_pth(checkpoint) {
        let t = std::time::Instant::now();
        let (m, tok) = load_pth_run(checkpoint, tokenizer, dev)?;
        return Ok((m, tok, LoadTimes { weights: t.elapsed().as_secs_f64(), ..LoadTimes::default() }));
    }
    let t = std::time::Instant::now();
    let meta = checkpoint::read_metadata(checkpoint)?;
    let cfg = Config::from_metadata(&meta).map_err(|e| Error::data(checkpoint, e))?;
    let metadata = t.elapsed().as_secs_f64();
    // the tokenizer (CLIP's: 1.5 MB of JSON, about 50 ms) is built on a thread of its own while
    // this one reads the weights; its error still comes first: with a wrong tokenizer the
    // weights do not matter
    let (tok, weights) = std::thread::scope(|scope| {
        let tok = scope.spawn(|| {
            let t = std::time::Instant::now();
            let r = match (meta.get(checkpoint::EMBEDDED_TOKENIZER), tokenizer) {
                (Some(j), None) => NoteTokenizer::from_bytes(j.as_bytes(), cfg.token_len)
                    .map_err(|e| Error::data(checkpoint, e))
                    .map(|tok| (checkpoint.to_path_buf(), j.as_bytes().to_vec(), tok)),
                _ => read_tokenizer(checkpoint, tokenizer, &cfg),
            };
            (r, t.elapsed().as_secs_f64())
        });
        let t = std::time::Instant::now();
        // declared, then filled: what the file does not hold, and the training-only tensors it
        // may hold, take no memory and no reading time; f32 tensors stay in the file, mapped
        // (inference never writes a parameter)
        let weights = RecLmis::shell(cfg.clone(), dev).and_then(|mut m| {
            checkpoint::load_mapped_skipping(&mut m.params, checkpoint, &RecLmis::TRAINING_ONLY).map(|rep| (m, rep))
        });
        let weights = (weights, t.elapsed().as_secs_f64());
        // a panic in the tokenizer is a bug; the thread's result is its own Result otherwise
        (tok.join().unwrap_or_else(|p| std::panic::resume_unwind(p)), weights)
    });
    let ((tok_path, json, tok), tok_s) = (tok.0?, tok.1);
    check_tokenizer(&meta, checkpoint, &tok_path, &json, tok.vocab_size())?;
    let ((m, rep), weights_s) = (weights.0?, weights.1);
    // an exported inference checkpoint may leave out the scoring MLPs; everything else must be
    // there (the skipped training-only tensors are not counted as missing)
    if rep.missing.iter().any(|k| !RecLmis::WEIGHTS_OF_INTEREST.iter().any(|p| k.starts_with(p))) {
        return Err(Error::data(checkpoint, format!("incomplete checkpoint: {}", rep.summary())));
    }
    Ok((m, tok, LoadTimes { metadata, tokenizer: tok_s, weights: weights_s }))
}

/// A checkpoint of the official PyTorch training (`torch.save`, no configuration recorded): the
/// model is rebuilt from the state dict's shapes, and the tokenizer must be given or lie beside it.
#[cfg(feature = "pth")]
fn load_pth_run(checkpoint: &Path, tokenizer: Option<&Path>, dev: &Device) -> Result<(RecLmis, NoteTokenizer)> {
    let (m, _) = import_pth(checkpoint, None, None, dev)?;
    let (tok_path, _, tok) = read_tokenizer(checkpoint, tokenizer, &m.cfg)?;
    check_vocab_fits(&tok, &m.cfg, &tok_path)?;
    Ok((m, tok))
}

/// The tokenizer given, else `tokenizer.json` beside the checkpoint: (its path, bytes, tokenizer).
fn read_tokenizer(
    checkpoint: &Path,
    given: Option<&Path>,
    cfg: &Config,
) -> Result<(std::path::PathBuf, Vec<u8>, NoteTokenizer)> {
    let path = match given {
        Some(p) => p.to_path_buf(),
        None => checkpoint.parent().unwrap_or(Path::new(".")).join("tokenizer.json"),
    };
    let json = crate::files::read_regular(&path, 64 << 20)?;
    let tok = NoteTokenizer::from_bytes(&json, cfg.token_len).map_err(|e| Error::data(&path, e))?;
    Ok((path, json, tok))
}

/// A tokenizer whose ids the model's text tower can embed (no recorded identity to check).
#[cfg(feature = "pth")]
fn check_vocab_fits(tok: &NoteTokenizer, cfg: &Config, path: &Path) -> Result<()> {
    if tok.vocab_size() > cfg.vocab_size {
        return Err(Error::data(
            path,
            format!("has {} tokens, the checkpoint's text tower {}", tok.vocab_size(), cfg.vocab_size),
        ));
    }
    Ok(())
}

/// Builds the model a `torch.save` checkpoint of the official code holds (preset and image size
/// from its shapes unless given) and loads it; every model tensor must be there.
#[cfg(feature = "pth")]
pub fn import_pth(
    checkpoint: &Path,
    preset: Option<&str>,
    img_size: Option<(usize, usize)>,
    dev: &Device,
) -> Result<(RecLmis, checkpoint::LoadReport)> {
    let sd = crate::pth::read_state_dict(checkpoint)?;
    let shapes = sd.tensors.iter().map(|t| (t.name.clone(), t.shape.clone())).collect();
    let cfg = Config::from_shapes(&shapes, preset, img_size).map_err(|e| Error::data(checkpoint, e))?;
    let mut m = RecLmis::new(cfg, dev, 0)?;
    let rep = checkpoint::load_state_dict(&mut m.params, sd, checkpoint)?;
    if !rep.missing.is_empty() {
        return Err(Error::data(checkpoint, format!("incomplete checkpoint: {}", rep.summary())));
    }
    Ok((m, rep))
}

/// `reclmis import`: a `torch.save` checkpoint of the official code to a reclmis checkpoint
/// (safetensors, with the configuration in its metadata so that eval/infer rebuild the model).
/// `out` must not exist. Returns the load report.
#[cfg(feature = "pth")]
pub fn import_checkpoint(
    from: &Path,
    out: &Path,
    preset: Option<&str>,
    img_size: Option<(usize, usize)>,
    tokenizer: Option<&Path>,
) -> Result<String> {
    if out.symlink_metadata().is_ok() {
        return Err(Error::data(out, "exists; import writes a new file and never replaces one"));
    }
    let (m, rep) = import_pth(from, preset, img_size, &Device::Cpu)?;
    let mut meta = m.cfg.to_metadata();
    meta.push(("imported_from".into(), from.file_name().map_or(String::new(), |n| n.to_string_lossy().into_owned())));
    if let Some(t) = tokenizer {
        let (_, json, tok) = read_tokenizer(from, Some(t), &m.cfg)?;
        check_vocab_fits(&tok, &m.cfg, t)?;
        let (hash, vocab) = NoteTokenizer::identity(&json, tok.vocab_size());
        meta.push(("tokenizer_hash".into(), hash));
        meta.push(("tokenizer_vocab".into(), vocab.to_string()));
    }
    checkpoint::save_with(&m.params, &meta, out)?;
    Ok(format!(
        "{}: preset {}, image {}x{}; {}",
        from.display(),
        m.cfg.name,
        m.cfg.img_size.0,
        m.cfg.img_size.1,
        rep.summary()
    ))
}

/// The tokenizer identity a checkpoint records, checked against a tokenizer file's bytes.
fn check_tokenizer(
    meta: &std::collections::HashMap<String, String>,
    checkpoint: &Path,
    tok_path: &Path,
    json: &[u8],
    vocab: usize,
) -> Result<()> {
    if let Some(h) = meta.get("tokenizer_hash") {
        let (got, _) = NoteTokenizer::identity(json, vocab);
        if &got != h {
            return Err(Error::data(
                tok_path,
                format!(
                    "is not the tokenizer {} was trained with (its hash {got}, the checkpoint records {h})",
                    checkpoint.display()
                ),
            ));
        }
    }
    if let Some(v) = meta.get("tokenizer_vocab") {
        if v != &vocab.to_string() {
            return Err(Error::data(tok_path, format!("has {vocab} tokens, the checkpoint records {v}")));
        }
    }
    Ok(())
}
