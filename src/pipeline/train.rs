//! `reclmis train`: epochs over the training split with a progress bar, validation Dice and IoU
//! after each epoch, checkpoints, early stopping, a typed JSONL log, and `--resume`.
//!
//! What a run can rely on:
//! - the run folder (`RunDir`) is locked, never shared with another run's files, and every file
//!   is written atomically and durably;
//! - `train_state.safetensors` holds everything a resume needs in one file (weights, Adam
//!   moments and step, epoch, best score, the settings, the data's and tokenizer's fingerprints
//!   and the epoch's log line), so `last`, the log and the state can never disagree after a kill:
//!   the state is the point a resume continues from, and the others are repaired to match it;
//! - a non-finite loss or gradient norm stops the run with an error before the update, and no
//!   file with a non-finite weight is ever written.

use super::run_dir::{self, EpochLog, Mode, RunDir};
use super::{evaluate, load, make_batch, Loaded, Notes, Scores};
use crate::checkpoint::{self, Data};
use crate::data::augment::AugOpts;
use crate::data::lvit::Split;
use crate::device::Device;
use crate::error::{Error, Result};
use crate::model::train::Trainer;
use crate::model::{Batch, Config, RecLmis};
use crate::optim::AdamConfig;
use crate::rng::Rng;
use crate::tensor::Tensor;
use crate::text::NoteTokenizer;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{mpsc, Arc};
use std::time::Instant;

#[derive(Clone, Debug)]
pub struct TrainOpts {
    pub data: PathBuf,
    pub preset: String,
    pub epochs: usize,
    /// Micro-batch size: the samples of one forward and backward.
    pub batch: usize,
    /// Micro-batches per optimiser step (gradient accumulation): a step sees `batch × accumulate`
    /// samples while only one micro-batch's activations are alive at a time. 1 = off.
    pub accumulate: usize,
    /// Autocast precision of the training and validation graphs (`autograd::Precision`).
    pub precision: crate::autograd::Precision,
    pub lr: f32,
    /// Scale each step's gradients so that their global L2 norm is at most this (torch's
    /// clip_grad_norm_); None: no clipping (the official recipes).
    pub clip_grad_norm: Option<f32>,
    pub seed: u64,
    pub out: PathBuf,
    /// Stop after this many epochs without a better validation Dice.
    pub patience: usize,
    /// Stop once this much time has passed (checked between epochs); 0 = no limit.
    pub max_minutes: f64,
    /// A tokenizer.json (required unless the preset trains its text tower from scratch).
    pub tokenizer: Option<PathBuf>,
    /// Pretrained CLIP text weights (a Hugging Face model.safetensors with config.json beside).
    pub text_weights: Option<PathBuf>,
    /// Changes to the preset's model settings (K, mask rates, score dropout).
    pub model: super::recipe::ModelOptions,
    pub schedule: crate::optim::schedule::Schedule,
    /// Share of training samples shown with their counterfactual note and mask instead (the
    /// note naming only the opacity the real note leaves out; synth's data has them): teaches
    /// the model to segment what the note names. 0 = off.
    pub counterfactual_rate: f64,
    pub resume: bool,
    /// Replace the run files of an earlier run in `out` (nothing else there is touched).
    pub overwrite: bool,
    /// On `--resume`, accept other data, seed, batch size, learning rate or tokenizer than the
    /// run started with (each difference is printed).
    pub accept_changes: bool,
    /// Stop after this many epochs of this invocation (0 = none), as an interruption would;
    /// `--resume` then continues the same schedule.
    pub stop_after: usize,
    pub augment: bool,
    /// Also the official recipe's rot90 / flips (they contradict left/right/upper/lower notes).
    pub official_flips: bool,
    pub progress: bool,
}

impl TrainOpts {
    /// Argument errors before anything is read or written.
    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(Error::Config(m));
        if !(self.lr.is_finite() && self.lr > 0.0 && self.lr <= 1.0) {
            // Adam moves each weight by about lr per step: above 1 every weight is noise
            return bad(format!("--lr {}: must be a number in (0, 1]", self.lr));
        }
        if let Some(c) = self.clip_grad_norm {
            if !(c.is_finite() && c > 0.0) {
                return bad(format!("--clip-grad-norm {c}: must be a number > 0"));
            }
        }
        if self.batch == 0 {
            return bad("--batch 0: must be at least 1".into());
        }
        if self.accumulate == 0 {
            return bad("--accumulate 0: must be at least 1".into());
        }
        if self.epochs == 0 {
            return bad("--epochs 0: must be at least 1".into());
        }
        if self.patience == 0 {
            return bad("--patience 0: must be at least 1".into());
        }
        if !(0.0..=1.0).contains(&self.counterfactual_rate) {
            return bad(format!("--counterfactual-rate {}: must be in [0, 1]", self.counterfactual_rate));
        }
        if !(self.max_minutes.is_finite() && self.max_minutes >= 0.0) {
            return bad(format!("--max-minutes {}: must be a number ≥ 0", self.max_minutes));
        }
        if self.resume && self.overwrite {
            return bad("--resume and --overwrite exclude each other".into());
        }
        Ok(())
    }

    fn mode(&self) -> Mode {
        match (self.resume, self.overwrite) {
            (true, _) => Mode::Resume,
            (false, true) => Mode::Overwrite,
            _ => Mode::Fresh,
        }
    }
}

pub struct TrainSummary {
    pub best_dice: f64,
    pub best_epoch: usize,
    pub epochs_run: usize,
    pub images_per_s: f64,
    pub seconds: f64,
    pub first_loss: f32,
    pub last_loss: f32,
    /// What the loaders and the resume noticed (printed by the CLI as it happens when
    /// `progress` is on).
    pub notes: Vec<String>,
}

/// The settings a resumed run must share with the run it continues (metadata key, value).
fn settings(
    o: &TrainOpts,
    train: &Loaded,
    val: &Loaded,
    tok_hash: &str,
    text_weights: &str,
    cfg: &Config,
) -> Vec<(&'static str, String)> {
    vec![
        ("text_weights", text_weights.to_string()),
        ("config", serde_json::to_string(cfg).expect("a Config always serialises")),
        ("schedule", o.schedule.name().to_string()),
        ("counterfactual_rate", o.counterfactual_rate.to_string()),
        ("preset", o.preset.clone()),
        ("seed", o.seed.to_string()),
        ("batch", o.batch.to_string()),
        ("accumulate", o.accumulate.to_string()),
        ("precision", o.precision.to_string()),
        ("lr", format!("{:e}", o.lr)),
        ("clip_grad_norm", o.clip_grad_norm.map_or("none".into(), |c| format!("{c:e}"))),
        ("augment", o.augment.to_string()),
        ("official_flips", o.official_flips.to_string()),
        ("train_data", train.fingerprint()),
        ("val_data", val.fingerprint()),
        ("tokenizer_hash", tok_hash.to_string()),
    ]
}

/// The value a setting added after a run started had in that run (what the run did before the
/// setting existed), so resuming it compares equal.
fn unrecorded(key: &str) -> &'static str {
    match key {
        "accumulate" => "1",
        "precision" => "f32",
        "clip_grad_norm" => "none",
        _ => "(not recorded)",
    }
}

/// A setting the resumed run takes from its state rather than from the command line.
const FROM_RUN: &str = "(from the run)";

/// The run's identity: a fingerprint of its settings, so the same run always writes the same
/// bytes and files of two different runs never pass for one.
fn run_id(settings: &[(&str, String)]) -> String {
    let mut f = crate::files::Fnv64::default();
    for (k, v) in settings {
        // a setting at its unrecorded value leaves the identity of the runs from before it
        if *v == unrecorded(k) {
            continue;
        }
        f.field(k.as_bytes()).field(v.as_bytes());
    }
    f.hex()
}

/// Everything the epochs need, set up (and, for `--resume`, restored and checked).
struct Run {
    dir: RunDir,
    cfg: Config,
    tr: Trainer,
    /// The training split, followed by its counterfactual samples when `counterfactual_rate` > 0.
    train: Arc<Loaded>,
    /// How many of `train`'s samples are the split's own (an epoch's length).
    n_train: usize,
    /// For each of the split's samples, the index in `train` of its counterfactual version.
    cf_of: Arc<Vec<Option<usize>>>,
    val: Loaded,
    /// The validation split's counterfactual samples, when the dataset has them.
    val_cf: Option<Loaded>,
    tok: Arc<NoteTokenizer>,
    tok_meta: (String, usize),
    settings: Vec<(&'static str, String)>,
    id: String,
    epoch0: usize,
    best: (f64, usize),
    log: Vec<EpochLog>,
    notes: Vec<String>,
    progress: bool,
    /// The frozen text tower's output per note (None when the tower trains).
    text_cache: Option<Arc<super::TextCache>>,
}

impl Run {
    fn note(&mut self, s: String) {
        if self.progress {
            println!("note: {s}");
        }
        self.notes.push(s);
    }

    fn setup(o: &TrainOpts, dev: &Device) -> Result<Run> {
        o.validate()?;
        let mut cfg = Config::preset(&o.preset)?;
        o.model.apply(&mut cfg);
        cfg.validate()?;
        let (h, w) = cfg.img_size;
        // read the data before the folder is touched: a bad dataset leaves no trace
        let train = load(&o.data, Split::Train, h, w)?;
        let val = load(&o.data, Split::Val, h, w)?;
        let val_cf = super::load_counterfactual(&o.data, Split::Val, h, w)?;
        let n_train = train.len();
        let (train, cf_of) = if o.counterfactual_rate > 0.0 {
            let cf = super::load_counterfactual(&o.data, Split::Train, h, w)?.ok_or_else(|| {
                Error::Config(format!(
                    "--counterfactual-rate needs counterfactual notes in {} (synth writes them)",
                    o.data.join(Split::Train.folder()).display()
                ))
            })?;
            let by_image: std::collections::HashMap<&Path, usize> =
                cf.entries.iter().enumerate().map(|(j, e)| (e.image.as_path(), n_train + j)).collect();
            let cf_of: Vec<Option<usize>> =
                train.entries.iter().map(|e| by_image.get(e.image.as_path()).copied()).collect();
            (super::concat(train, cf)?, cf_of)
        } else {
            (train, vec![None; n_train])
        };
        let dir = RunDir::open(&o.out, o.mode())?;
        // the tokenizer: the run's own copy when resuming (never rewritten), else trained on the
        // notes or read from --tokenizer, and written once
        let tok_path = dir.path(run_dir::TOKENIZER);
        let tok_json: Vec<u8> = if o.resume {
            crate::files::read_regular(&tok_path, 64 << 20)?
        } else {
            let tok = match (&o.tokenizer, cfg.text_trainable) {
                (Some(p), _) => NoteTokenizer::from_file(p, cfg.token_len)?,
                (None, true) => {
                    NoteTokenizer::train_word_level(train.entries.iter().map(|e| e.note.clone()), cfg.token_len)?
                }
                (None, false) => {
                    return Err(Error::Config(format!(
                        "preset {} uses a frozen pretrained text tower: give its --tokenizer (a tokenizer.json)",
                        cfg.name
                    )))
                }
            };
            let json = tok.to_json()?.into_bytes();
            crate::files::write_atomic(&tok_path, &json)?;
            json
        };
        let tok = NoteTokenizer::from_bytes(&tok_json, cfg.token_len).map_err(|e| Error::data(&tok_path, e))?;
        if cfg.text_trainable {
            cfg.vocab_size = tok.vocab_size();
        }
        let tok_meta = NoteTokenizer::identity(&tok_json, tok.vocab_size());
        // pretrained text weights: read (and checked) before the folder holds anything of this run
        // but the tokenizer; their hash is a setting, so a resume with other weights is refused
        let mut model = RecLmis::new(cfg.clone(), dev, o.seed)?;
        model.precision = o.precision;
        let has_state = o.resume && dir.path(run_dir::STATE).is_file();
        let mut text_notes = vec![];
        let text_hash = match &o.text_weights {
            Some(p) => {
                let w = crate::model::hf_clip::load_text_weights(&mut model, p)?;
                text_notes.push(format!(
                    "text tower: {} tensors from {} ({} vision-tower tensors ignored{})",
                    w.report.loaded,
                    p.display(),
                    w.ignored_vision,
                    if w.had_logit_scale { "" } else { "; no logit_scale in the file, the preset's kept" }
                ));
                w.file_hash
            }
            // a resumed run's state holds its text tower: the recorded weights stand
            None if has_state => FROM_RUN.into(),
            None => {
                if !cfg.text_trainable {
                    eprintln!(
                        "WARNING: preset {} freezes its text tower, and no --text-weights were given: the tower \
                         is RANDOM and stays random (the paper uses pretrained CLIP; see the README)",
                        cfg.name
                    );
                }
                "none".into()
            }
        };
        let settings = settings(o, &train, &val, &tok_meta.0, &text_hash, &cfg);
        let mut tr = Trainer::new(model, AdamConfig { lr: o.lr, ..AdamConfig::default() });
        tr.clip = o.clip_grad_norm;
        let mut run = Run {
            id: run_id(&settings),
            dir,
            cfg,
            tr,
            train: Arc::new(train),
            n_train,
            cf_of: Arc::new(cf_of),
            val,
            val_cf,
            tok: Arc::new(tok),
            tok_meta,
            settings,
            epoch0: 0,
            best: (f64::NEG_INFINITY, 0),
            log: vec![],
            notes: vec![],
            progress: o.progress,
            text_cache: None,
        };
        for n in text_notes.into_iter().chain(run.train.notes.clone()).chain(run.val.notes.clone()) {
            run.note(n);
        }
        if run.dir.removed_temporaries > 0 {
            let n = run.dir.removed_temporaries;
            run.note(format!("removed {n} temporary file(s) left by an interrupted write"));
        }
        if o.resume {
            if has_state {
                run.restore(o.accept_changes)?;
            } else {
                // the run was stopped before its first epoch ended: nothing to continue from
                run.note("the run has no completed epoch: starting it from the beginning".into());
            }
        }
        Ok(run)
    }

    /// Metadata of best / last: the model configuration, the run, the epoch and the tokenizer.
    fn checkpoint_meta(&self, epoch: usize, val_dice: f64) -> Vec<(String, String)> {
        let mut m = self.cfg.to_metadata();
        m.extend([
            ("run_id".to_string(), self.id.clone()),
            ("epoch".to_string(), epoch.to_string()),
            ("step".to_string(), self.tr.adam.step.to_string()),
            ("val_dice".to_string(), val_dice.to_string()),
            ("tokenizer_hash".to_string(), self.tok_meta.0.clone()),
            ("tokenizer_vocab".to_string(), self.tok_meta.1.to_string()),
        ]);
        m
    }

    /// train_state: weights, counters, Adam moments (`m.<param>`, `v.<param>`) and the metadata a
    /// resume needs, one atomic file.
    fn save_state(&self, entry: &EpochLog) -> Result<()> {
        let p = &self.tr.model.params;
        let values = checkpoint::host_values(p)?;
        let mut t: Vec<(String, Vec<usize>, Data)> =
            values.iter().map(|(n, s, v)| (n.clone(), s.clone(), Data::F32(v))).collect();
        t.extend(p.counters().iter().map(|(n, c)| (n.clone(), vec![], Data::I64(*c))));
        let trainable: Vec<_> = p.ids().filter(|&id| p.trainable(id)).collect();
        let mut moments = vec![];
        let mut without = vec![];
        for (i, &id) in trainable.iter().enumerate() {
            match (&self.tr.adam.m[i], &self.tr.adam.v[i]) {
                (Some(m), Some(v)) => {
                    moments.push((p.name(id).to_string(), m.shape().to_vec(), m.to_vec()?, v.to_vec()?))
                }
                _ => without.push(p.name(id).to_string()),
            }
        }
        for (name, shape, m, v) in &moments {
            t.push((format!("m.{name}"), shape.clone(), Data::F32(m)));
            t.push((format!("v.{name}"), shape.clone(), Data::F32(v)));
        }
        let mut meta = self.checkpoint_meta(entry.epoch, entry.val_dice);
        meta.extend(self.settings.iter().map(|(k, v)| (format!("setting.{k}"), v.clone())));
        meta.extend([
            ("kind".to_string(), "reclmis-train-state".to_string()),
            ("best_dice".to_string(), self.best.0.to_string()),
            ("best_epoch".to_string(), self.best.1.to_string()),
            ("without_moments".to_string(), without.join(",")),
            ("log".to_string(), serde_json::to_string(entry).map_err(|e| Error::Other(e.to_string()))?),
        ]);
        checkpoint::write_tensors(&self.dir.path(run_dir::STATE), &t, &meta)
    }

    /// Restores the state of `--resume` and repairs `last` and the log to match it.
    fn restore(&mut self, accept_changes: bool) -> Result<()> {
        let path = self.dir.path(run_dir::STATE);
        let meta = checkpoint::read_metadata(&path)?;
        let get = |k: &str| meta.get(k).ok_or_else(|| Error::data(&path, format!("not a training state: no {k:?}")));
        if get("kind")? != "reclmis-train-state" {
            return Err(Error::data(&path, "not a reclmis training state"));
        }
        // settings: other values are refused unless accepted
        let mut changed = vec![];
        for (k, v) in self.settings.iter_mut() {
            // a setting added after the run started compares as its value before it existed
            let was = meta.get(&format!("setting.{k}")).map_or(unrecorded(k), String::as_str);
            if v == FROM_RUN {
                *v = was.to_string();
                continue;
            }
            if was != v {
                changed.push(format!("{k}: the run has {was}, now {v}"));
            }
        }
        if !changed.is_empty() {
            if !accept_changes {
                return Err(Error::data(
                    &path,
                    format!(
                        "--resume with other settings than the run started with ({}); give --accept-changes to continue anyway",
                        changed.join("; ")
                    ),
                ));
            }
            for c in changed {
                self.note(format!("resuming with a change: {c}"));
            }
        }
        let state_run = get("run_id")?.clone();
        // the run keeps its identity: every file written from here on (a repaired `last` too)
        // must carry it, whatever this invocation's settings hash to
        self.id = state_run.clone();
        // weights, counters and moments, from one read of the file
        let bytes = crate::files::read_regular(&path, u64::MAX)?;
        let rep = checkpoint::load_bytes(&mut self.tr.model.params, &bytes, &path)?;
        if !rep.missing.is_empty() {
            return Err(Error::data(&path, format!("not this preset's training state: {}", rep.summary())));
        }
        let st = safetensors::SafeTensors::deserialize(&bytes).map_err(|e| Error::data(&path, e))?;
        let without: std::collections::HashSet<&str> =
            get("without_moments")?.split(',').filter(|s| !s.is_empty()).collect();
        let dev = self.tr.model.device().clone();
        let p = &self.tr.model.params;
        let ids: Vec<_> = p.ids().filter(|&id| p.trainable(id)).collect();
        for (i, id) in ids.into_iter().enumerate() {
            let name = p.name(id).to_string();
            if without.contains(name.as_str()) {
                continue;
            }
            let shape = p.value(id).shape().to_vec();
            let read = |k: &str| -> Result<Tensor> {
                let view = st
                    .tensor(&format!("{k}.{name}"))
                    .map_err(|_| Error::data(&path, format!("the optimiser state lacks {k}.{name}")))?;
                if view.shape() != shape.as_slice() {
                    return Err(Error::data(
                        &path,
                        format!("{k}.{name} has shape {:?}, expected {shape:?}", view.shape()),
                    ));
                }
                let v = checkpoint::f32_values(&view).map_err(|e| Error::data(&path, format!("{k}.{name}: {e}")))?;
                if v.iter().any(|x| !x.is_finite()) {
                    return Err(Error::data(&path, format!("{k}.{name} holds a non-finite value")));
                }
                Tensor::from_vec(v, &shape, &dev)
            };
            let (m, v) = (read("m")?, read("v")?);
            self.tr.adam.m[i] = Some(m);
            self.tr.adam.v[i] = Some(v);
        }
        let num = |k: &str| -> Result<f64> {
            get(k)?.parse::<f64>().map_err(|_| Error::data(&path, format!("{k:?} is not a number")))
        };
        self.tr.adam.step = num("step")? as u64;
        let epoch = num("epoch")? as usize;
        self.epoch0 = epoch;
        self.best = (num("best_dice")?, num("best_epoch")? as usize);
        let entry: EpochLog =
            serde_json::from_str(get("log")?).map_err(|e| Error::data(&path, format!("its log line: {e}")))?;
        // last: rewritten from the state when a kill came between the two
        let last = self.dir.path(run_dir::LAST);
        let last_meta = if last.is_file() { Some(checkpoint::read_metadata(&last)?) } else { None };
        if let Some(lm) = &last_meta {
            if lm.get("run_id") != Some(&state_run) {
                return Err(Error::data(
                    &last,
                    format!("belongs to another run ({:?}) than {} ({state_run})", lm.get("run_id"), run_dir::STATE),
                ));
            }
        }
        if last_meta.as_ref().and_then(|m| m.get("epoch")) != Some(&epoch.to_string()) {
            checkpoint::save_with(&self.tr.model.params, &self.checkpoint_meta(epoch, entry.val_dice), &last)?;
            self.note(format!("{} did not match the training state (epoch {epoch}): rewritten", run_dir::LAST));
        }
        // the log: lines after the state's epoch dropped, its own line added when missing
        let on_disk = self.dir.read_log()?;
        let mut log = on_disk.clone();
        log.retain(|e| e.epoch < epoch);
        log.push(entry);
        for (i, e) in log.iter().enumerate() {
            if e.epoch != i + 1 {
                return Err(Error::data(
                    &self.dir.path(run_dir::LOG),
                    format!(
                        "line {} is epoch {}, expected {}: the log does not belong to this state",
                        i + 1,
                        e.epoch,
                        i + 1
                    ),
                ));
            }
        }
        if on_disk != log {
            self.dir.write_log(&log)?;
            self.note(format!("{} repaired to the training state's {epoch} epochs", run_dir::LOG));
        }
        self.log = log;
        Ok(())
    }
}

/// One epoch's batches, made on a background thread (data order and augmentation depend only
/// on (seed, epoch), so a resumed run sees the same batches as an uninterrupted one).
fn batches(run: &Run, o: &TrainOpts, epoch: usize) -> (mpsc::Receiver<Result<Batch>>, std::thread::JoinHandle<()>) {
    let (tx, rx) = mpsc::sync_channel::<Result<Batch>>(2);
    let (ts, tk, dv, tc) =
        (run.train.clone(), run.tok.clone(), run.tr.model.params.device().clone(), run.text_cache.clone());
    let (seed, bs, aug, flips) = (o.seed, o.batch, o.augment, o.official_flips);
    let (n, cf_of, cf_rate) = (run.n_train, run.cf_of.clone(), o.counterfactual_rate);
    let producer = std::thread::spawn(move || {
        let mut rng = Rng::new(seed ^ (epoch as u64 + 1).wrapping_mul(0x51ED));
        let mut order: Vec<usize> = (0..n).collect();
        for i in (1..order.len()).rev() {
            order.swap(i, (rng.next_u64() % (i as u64 + 1)) as usize);
        }
        // counterfactual swaps from their own generator: runs without them draw as before
        if cf_rate > 0.0 {
            let mut swap = Rng::new(seed ^ (epoch as u64 + 1).wrapping_mul(0xCF0F));
            for i in order.iter_mut() {
                if let Some(j) = cf_of[*i] {
                    if (swap.uniform(0.0, 1.0) as f64) < cf_rate {
                        *i = j;
                    }
                }
            }
        }
        let opts = AugOpts { flips, ..AugOpts::default() };
        for chunk in order.chunks(bs) {
            let a = if aug { Some((&opts, &mut rng)) } else { None };
            let b = make_batch(&ts, chunk, &tk, Notes::Correct, a, tc.as_deref(), &dv);
            if tx.send(b).is_err() {
                break;
            }
        }
    });
    (rx, producer)
}

/// Mean loss terms and speed of one epoch.
struct EpochStats {
    means: BTreeMap<String, f64>,
    images: usize,
    compute_s: f64,
    first: f32,
    last: f32,
}

fn progress_bar(o: &TrainOpts, steps: usize, epoch: usize) -> indicatif::ProgressBar {
    if !o.progress {
        return indicatif::ProgressBar::hidden();
    }
    let b = indicatif::ProgressBar::new(steps as u64);
    if let Ok(style) = indicatif::ProgressStyle::with_template("epoch {prefix} [{bar:25}] {pos}/{len} {msg}") {
        b.set_style(style.progress_chars("=> "));
    }
    b.set_prefix(format!("{}/{}", epoch + 1, o.epochs));
    b
}

/// The samples of an epoch's step `step` (0-based) with `per_step` samples a step: all but the
/// last are full. A micro-batch's gradient weight is its samples over these.
fn step_samples(n_train: usize, per_step: usize, step: usize) -> usize {
    per_step.min(n_train.saturating_sub(step * per_step)).max(1)
}

fn run_epoch(run: &mut Run, o: &TrainOpts, epoch: usize) -> Result<EpochStats> {
    // a step: `accumulate` micro-batches of `batch` samples (the epoch's last step may be short)
    let per_step = o.batch * o.accumulate;
    let steps_per_epoch = run.n_train.div_ceil(per_step);
    let (rx, producer) = batches(run, o, epoch);
    let bar = progress_bar(o, steps_per_epoch, epoch);
    run.tr.adam.cfg.lr = o.schedule.lr(o.lr as f64, epoch, o.epochs) as f32;
    let mut rng = Rng::new(o.seed ^ 0xA5A5 ^ epoch as u64);
    let mut sums = BTreeMap::<String, f64>::new();
    let mut st = EpochStats { means: BTreeMap::new(), images: 0, compute_s: 0.0, first: f32::NAN, last: f32::NAN };
    let mut grad_norm_max = 0.0f64;
    let (mut steps, mut in_step, mut seen) = (0, 0, 0usize);
    let stopped = |e: Error, steps: usize| match e {
        Error::NonFinite(what) => Error::NonFinite(format!(
            "epoch {}, step {} of {steps_per_epoch}: {what}; training stopped, the files of epoch {} are kept",
            epoch + 1,
            steps + 1,
            epoch
        )),
        other => other,
    };
    for batch in rx {
        let batch = batch?;
        let t = Instant::now();
        let b = batch.images.shape()[0];
        let step_samples = step_samples(run.n_train, per_step, steps);
        let weight = if o.accumulate == 1 { 1.0 } else { b as f32 / step_samples as f32 };
        run.tr.accumulate(&batch, None, &mut rng, weight).map_err(|e| stopped(e, steps))?;
        drop(batch);
        in_step += b;
        seen += b;
        st.images += b;
        if in_step < step_samples && seen < run.n_train {
            st.compute_s += t.elapsed().as_secs_f64();
            continue;
        }
        let l = run.tr.apply().map_err(|e| stopped(e, steps))?;
        in_step = 0;
        st.compute_s += t.elapsed().as_secs_f64();
        if st.first.is_nan() {
            st.first = l["total"];
        }
        st.last = l["total"];
        for (k, v) in &l {
            *sums.entry(k.to_string()).or_default() += *v as f64;
        }
        // the global gradient norm before any clipping: its mean and largest value per epoch
        // show a loss spike's cause in the log (grad_norm, grad_norm_max)
        let norm = run.tr.last_grad_norm as f64;
        *sums.entry("grad_norm".into()).or_default() += norm;
        grad_norm_max = grad_norm_max.max(norm);
        if run.tr.clip.is_some() {
            // the share of the epoch's steps that the bound scaled down (clipped_fraction)
            *sums.entry("clipped_fraction".into()).or_default() += run.tr.last_clipped() as u8 as f64;
        }
        steps += 1;
        bar.set_message(format!(
            "loss {:.3} (seg {:.3} ccl {:.3} rec {:.3}/{:.3}) {:.1} img/s",
            l["total"],
            l["criterion"],
            l["ccl"],
            l["text_rec"],
            l["img_rec"],
            st.images as f64 / st.compute_s.max(1e-9)
        ));
        bar.inc(1);
    }
    producer.join().map_err(|_| Error::Other("the batch thread panicked".into()))?;
    // a producer that ended early (an error is returned above) leaves no half step behind
    run.tr.discard();
    bar.finish_and_clear();
    st.means = sums.into_iter().map(|(k, s)| (k, s / steps.max(1) as f64)).collect();
    st.means.insert("grad_norm_max".into(), grad_norm_max);
    Ok(st)
}

/// The kill test's hook: `RECLMIS_CRASH_AT=<point>@<epoch>` ends the process with SIGKILL (as the
/// OOM killer or a power cut would: no destructors, no flush) at a named moment between the
/// files of an epoch, which random kill times would rarely hit.
fn crash_point(point: &str, epoch: usize) {
    if let Ok(v) = std::env::var("RECLMIS_CRASH_AT") {
        if v == format!("{point}@{epoch}") {
            // SAFETY: kill(2) on this process; nothing runs after it.
            unsafe { libc::kill(libc::getpid(), libc::SIGKILL) };
        }
    }
}

/// The files of a finished epoch, in the order that keeps a kill harmless: best (when better),
/// the state (the resume point), last, the log, the curves.
fn record_epoch(run: &mut Run, entry: EpochLog) -> Result<bool> {
    let improved = entry.val_dice > run.best.0;
    let epoch = entry.epoch;
    if improved {
        run.best = (entry.val_dice, entry.epoch);
        let meta = run.checkpoint_meta(entry.epoch, entry.val_dice);
        checkpoint::save_with(&run.tr.model.params, &meta, &run.dir.path(run_dir::BEST))?;
    }
    crash_point("before_state", epoch);
    run.save_state(&entry)?;
    crash_point("before_last", epoch);
    let meta = run.checkpoint_meta(entry.epoch, entry.val_dice);
    checkpoint::save_with(&run.tr.model.params, &meta, &run.dir.path(run_dir::LAST))?;
    crash_point("before_log", epoch);
    run.log.push(entry);
    run.dir.write_log(&run.log)?;
    let curves: (Vec<f64>, Vec<f64>, Vec<f64>) = (
        run.log.iter().map(|e| e.total()).collect(),
        run.log.iter().map(|e| e.val_dice).collect(),
        run.log.iter().map(|e| e.val_iou).collect(),
    );
    super::visual::plot_curves(&curves.0, &curves.1, &curves.2, &run.dir.path(run_dir::CURVES))?;
    Ok(improved)
}

/// Trains a model built on `dev` (every later step reads the device from the model).
pub fn train(o: &TrainOpts, dev: &Device) -> Result<TrainSummary> {
    let start = Instant::now();
    let mut run = Run::setup(o, dev)?;
    // a frozen text tower gives each note the same output all run long: compute it once
    if !run.cfg.text_trainable {
        let c = super::text_cache(&run.tr.model, &run.tok, run.train.entries.iter().map(|e| e.note.as_str()))?;
        run.text_cache = Some(Arc::new(c));
    }
    let (mut first_loss, mut last_loss) = (f32::NAN, f32::NAN);
    let (mut images, mut compute_s) = (0usize, 0.0f64);
    let mut epochs_run = run.epoch0;
    let kind = dev.kind();
    for epoch in run.epoch0..o.epochs {
        crate::device::memory::reset_peak(kind);
        let st = run_epoch(&mut run, o, epoch)?;
        images += st.images;
        compute_s += st.compute_s;
        if first_loss.is_nan() {
            first_loss = st.first;
        }
        last_loss = st.last;
        let v: Scores = evaluate(&run.tr.model, &run.val, &run.tok, Notes::Correct, o.batch)?;
        let entry = EpochLog {
            epoch: epoch + 1,
            step: run.tr.adam.step,
            lr: run.tr.adam.cfg.lr as f64,
            losses: st.means.clone(),
            val_dice: v.dice,
            val_iou: v.iou,
            val_hard_dice: v.hard_dice,
            val_counterfactual_dice: match &run.val_cf {
                Some(cf) => Some(evaluate(&run.tr.model, cf, &run.tok, Notes::Correct, o.batch)?.dice),
                None => None,
            },
            images_per_s: images as f64 / compute_s.max(1e-9),
            elapsed_s: start.elapsed().as_secs_f64(),
            peak_tensor_bytes: crate::device::memory::peak(kind),
        };
        let peak = crate::device::memory::human(entry.peak_tensor_bytes);
        let total = entry.total();
        let cf = entry.val_counterfactual_dice.map_or(String::new(), |d| format!(", counterfactual Dice {d:.4}"));
        let improved = record_epoch(&mut run, entry)?;
        epochs_run = epoch + 1;
        if o.progress {
            println!(
                "epoch {}/{}: loss {total:.4}, val Dice {:.4}, IoU {:.4}{cf}{} ({:.0} s, peak tensors {peak})",
                epoch + 1,
                o.epochs,
                v.dice,
                v.iou,
                if improved { " (best)" } else { "" },
                start.elapsed().as_secs_f64()
            );
        }
        if epoch + 1 - run.best.1 >= o.patience {
            if o.progress {
                println!("early stop: no better validation Dice for {} epochs", o.patience);
            }
            break;
        }
        if o.stop_after > 0 && epoch + 1 - run.epoch0 >= o.stop_after {
            break;
        }
        if o.max_minutes > 0.0 && start.elapsed().as_secs_f64() > 60.0 * o.max_minutes {
            if o.progress {
                println!("time limit of {} minutes reached", o.max_minutes);
            }
            break;
        }
    }
    Ok(TrainSummary {
        best_dice: run.best.0,
        best_epoch: run.best.1,
        epochs_run,
        images_per_s: images as f64 / compute_s.max(1e-9),
        seconds: start.elapsed().as_secs_f64(),
        first_loss,
        last_loss,
        notes: run.notes,
    })
}

#[cfg(test)]
mod tests {
    /// 16 samples in micro-batches of 3, 2 per step: steps of 6, 6 and 4 samples, so the last
    /// step's micro-batches (3 and 1 samples) weigh 3/4 and 1/4, and every step's weights sum to 1.
    #[test]
    fn the_short_last_step_weighs_its_micro_batches_by_samples() {
        let (n, bs, acc) = (16, 3, 2);
        let per_step = bs * acc;
        let micro: Vec<usize> = (0..n).collect::<Vec<_>>().chunks(bs).map(|c| c.len()).collect();
        let mut sums = vec![];
        for (i, chunk) in micro.chunks(acc).enumerate() {
            let total = super::step_samples(n, per_step, i);
            assert_eq!(total, chunk.iter().sum::<usize>(), "step {i}");
            sums.push(chunk.iter().map(|&b| b as f64 / total as f64).sum::<f64>());
        }
        assert_eq!(sums, vec![1.0; 3]);
        assert_eq!(super::step_samples(n, per_step, 2), 4);
    }
}
