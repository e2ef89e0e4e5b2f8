//! `reclmis train`: epochs over the training split with a progress bar (loss terms, images/s),
//! validation Dice and IoU after each epoch, best and last checkpoints written atomically with the
//! tokenizer beside them, early stopping, a JSONL log, and `--resume` from the last epoch's state
//! (parameters, Adam moments and step, epoch, best score and the data order's seed).

use super::{evaluate, load, make_batch, Loaded, Notes, Scores};
use crate::checkpoint;
use crate::data::augment::AugOpts;
use crate::data::lvit::Split;
use crate::device::Device;
use crate::error::{Error, Result};
use crate::model::train::Trainer;
use crate::model::{Batch, Config, RecLmis};
use crate::nn::params::{Kind, Params};
use crate::optim::schedule::CosineWarmRestarts;
use crate::optim::AdamConfig;
use crate::testing::Rng;
use crate::text::NoteTokenizer;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::Instant;

#[derive(Clone, Debug)]
pub struct TrainOpts {
    pub data: PathBuf,
    pub preset: String,
    pub epochs: usize,
    pub batch: usize,
    pub lr: f32,
    pub seed: u64,
    pub out: PathBuf,
    /// Stop after this many epochs without a better validation Dice.
    pub patience: usize,
    /// Stop once this much time has passed (checked between epochs); 0 = no limit.
    pub max_minutes: f64,
    /// A tokenizer.json (required unless the preset trains its text tower from scratch).
    pub tokenizer: Option<PathBuf>,
    pub resume: bool,
    /// Stop after this many epochs of this invocation (0 = none), as an interruption would;
    /// `--resume` then continues the same schedule.
    pub stop_after: usize,
    pub augment: bool,
    /// Also the official recipe's rot90 / flips (they contradict left/right/upper/lower notes).
    pub official_flips: bool,
    pub progress: bool,
}

pub struct TrainSummary {
    pub best_dice: f64,
    pub best_epoch: usize,
    pub epochs_run: usize,
    pub images_per_s: f64,
    pub seconds: f64,
    pub first_loss: f32,
    pub last_loss: f32,
}

fn io(path: &Path, e: impl std::fmt::Display) -> Error {
    Error::Data { path: path.display().to_string(), detail: e.to_string() }
}

/// The tokenizer of a run: loaded from the run folder when resuming, else trained on the notes
/// (presets with a trainable text tower) or read from `--tokenizer`.
fn tokenizer(o: &TrainOpts, cfg: &Config, train: &Loaded) -> Result<NoteTokenizer> {
    let saved = o.out.join("tokenizer.json");
    if o.resume && saved.is_file() {
        return NoteTokenizer::from_file(&saved, cfg.token_len);
    }
    match (&o.tokenizer, cfg.text_trainable) {
        (Some(p), _) => NoteTokenizer::from_file(p, cfg.token_len),
        (None, true) => NoteTokenizer::train_word_level(train.entries.iter().map(|e| e.note.clone()), cfg.token_len),
        (None, false) => Err(Error::Config(format!(
            "preset {} uses a frozen pretrained text tower: give its --tokenizer (a tokenizer.json)",
            cfg.name
        ))),
    }
}

/// Adam state as tensors named `m.<param>` / `v.<param>`, the step and epoch in the metadata.
fn save_state(tr: &Trainer, epoch: usize, best: (f64, usize), seed: u64, path: &Path) -> Result<()> {
    let mut st = Params::new(&Device::Cpu);
    for (i, id) in tr.model.params.ids().filter(|&id| tr.model.params.trainable(id)).enumerate() {
        let name = tr.model.params.name(id);
        for (k, t) in [("m", &tr.adam.m[i]), ("v", &tr.adam.v[i])] {
            if let Some(t) = t {
                st.add(&format!("{k}.{name}"), t.shape(), t.to_vec()?, Kind::Buffer)?;
            }
        }
    }
    let meta = vec![
        ("step".to_string(), tr.adam.step.to_string()),
        ("epoch".to_string(), epoch.to_string()),
        ("best_dice".to_string(), best.0.to_string()),
        ("best_epoch".to_string(), best.1.to_string()),
        ("seed".to_string(), seed.to_string()),
    ];
    checkpoint::save_with(&st, &meta, path)
}

/// Restores Adam's moments and step; returns (epochs done, best dice, best epoch).
fn load_state(tr: &mut Trainer, path: &Path) -> Result<(usize, f64, usize)> {
    let meta = checkpoint::read_metadata(path)?;
    let num = |k: &str| {
        meta.get(k).and_then(|v| v.parse::<f64>().ok()).ok_or_else(|| io(path, format!("no {k} in the training state")))
    };
    let bytes = std::fs::read(path).map_err(|e| io(path, e))?;
    let st = safetensors::SafeTensors::deserialize(&bytes).map_err(|e| io(path, e))?;
    let dev = tr.model.params.device().clone();
    let ids: Vec<_> = tr.model.params.ids().filter(|&id| tr.model.params.trainable(id)).collect();
    for (i, id) in ids.into_iter().enumerate() {
        let name = tr.model.params.name(id).to_string();
        let shape = tr.model.params.value(id).shape().to_vec();
        for k in ["m", "v"] {
            if let Ok(view) = st.tensor(&format!("{k}.{name}")) {
                let v = checkpoint::f32_values(&view).map_err(|e| io(path, format!("{k}.{name}: {e}")))?;
                let t = Tensor::from_vec(v, &shape, &dev)?;
                if k == "m" {
                    tr.adam.m[i] = Some(t);
                } else {
                    tr.adam.v[i] = Some(t);
                }
            }
        }
    }
    tr.adam.step = num("step")? as u64;
    Ok((num("epoch")? as usize, num("best_dice")?, num("best_epoch")? as usize))
}

use crate::tensor::Tensor;

pub fn train(o: &TrainOpts, dev: &Device) -> Result<TrainSummary> {
    let start = Instant::now();
    let mut cfg = Config::preset(&o.preset)?;
    let (h, w) = cfg.img_size;
    let train_set = load(&o.data, Split::Train, h, w)?;
    let val_set = load(&o.data, Split::Val, h, w)?;
    let tok = tokenizer(o, &cfg, &train_set)?;
    if cfg.text_trainable {
        cfg.vocab_size = tok.vocab_size();
    }
    std::fs::create_dir_all(&o.out).map_err(|e| io(&o.out, e))?;
    let mut model = RecLmis::new(cfg.clone(), dev, o.seed)?;
    let last = o.out.join("last.safetensors");
    let state = o.out.join("train_state.safetensors");
    if o.resume {
        let rep = checkpoint::load(&mut model.params, &last)?;
        if !rep.missing.is_empty() {
            return Err(io(&last, format!("not this preset's checkpoint: {}", rep.summary())));
        }
    }
    tok.save(&o.out.join("tokenizer.json"))?;
    let mut tr = Trainer::new(model, AdamConfig { lr: o.lr, ..AdamConfig::default() });
    let (mut epoch0, mut best) = (0, (f64::NEG_INFINITY, 0));
    if o.resume {
        let (e, b, be) = load_state(&mut tr, &state)?;
        epoch0 = e;
        best = (b, be);
    }
    // a resumed run continues its log; a new run in the same folder starts a new one
    let mut log = std::fs::OpenOptions::new()
        .create(true)
        .append(o.resume)
        .write(true)
        .truncate(!o.resume)
        .open(o.out.join("log.jsonl"))
        .map_err(|e| io(&o.out, e))?;
    let n = train_set.len();
    let steps_per_epoch = n.div_ceil(o.batch.max(1));
    let (mut first_loss, mut last_loss) = (f32::NAN, f32::NAN);
    let (mut images, mut compute_s) = (0usize, 0.0f64);
    let mut epochs_run = epoch0;
    // (loss, val Dice, val IoU) per epoch for curves.png; a resumed run starts from its log
    let mut curves: (Vec<f64>, Vec<f64>, Vec<f64>) = Default::default();
    if o.resume {
        if let Ok(text) = std::fs::read_to_string(o.out.join("log.jsonl")) {
            for l in text.lines() {
                let field = |k: &str| -> f64 {
                    l.split(&format!("\"{k}\": "))
                        .nth(1)
                        .and_then(|r| r.split([',', '}']).next())
                        .and_then(|v| v.trim().parse().ok())
                        .unwrap_or(f64::NAN)
                };
                curves.0.push(field("total"));
                curves.1.push(field("val_dice"));
                curves.2.push(field("val_iou"));
            }
        }
    }
    // a frozen text tower gives each note the same output all run long: compute it once
    let cache = if cfg.text_trainable {
        None
    } else {
        Some(std::sync::Arc::new(super::text_cache(
            &tr.model,
            &tok,
            train_set.entries.iter().map(|e| e.note.as_str()),
            dev,
        )?))
    };
    let train_set = std::sync::Arc::new(train_set);
    let tok = std::sync::Arc::new(tok);
    for epoch in epoch0..o.epochs {
        // the data order and augmentation of each epoch depend only on (seed, epoch): a resumed
        // run sees the same batches as an uninterrupted one
        let (tx, rx) = mpsc::sync_channel::<Result<Batch>>(2);
        let (ts, tk, dv, tc) = (train_set.clone(), tok.clone(), dev.clone(), cache.clone());
        let (seed, bs, aug, flips) = (o.seed, o.batch.max(1), o.augment, o.official_flips);
        let producer = std::thread::spawn(move || {
            let mut rng = Rng::new(seed ^ (epoch as u64 + 1).wrapping_mul(0x51ED));
            let mut order: Vec<usize> = (0..ts.len()).collect();
            for i in (1..order.len()).rev() {
                order.swap(i, (rng.next_u64() % (i as u64 + 1)) as usize);
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
        let bar = if o.progress {
            let b = indicatif::ProgressBar::new(steps_per_epoch as u64);
            b.set_style(
                indicatif::ProgressStyle::with_template("epoch {prefix} [{bar:25}] {pos}/{len} {msg}")
                    .expect("a valid template")
                    .progress_chars("=> "),
            );
            b.set_prefix(format!("{}/{}", epoch + 1, o.epochs));
            b
        } else {
            indicatif::ProgressBar::hidden()
        };
        // cosine annealing over the run (the official schedule family, one period here) to lr/100
        let sched =
            CosineWarmRestarts { lr0: o.lr as f64, t0: o.epochs.max(1), t_mult: 1, eta_min: o.lr as f64 / 100.0 };
        tr.adam.cfg.lr = sched.lr(epoch) as f32;
        let mut rng = Rng::new(o.seed ^ 0xA5A5 ^ epoch as u64);
        let mut sums = std::collections::BTreeMap::<&str, f64>::new();
        let mut steps = 0;
        for batch in rx {
            let batch = batch?;
            let t = Instant::now();
            let l = tr.step(&batch, None, &mut rng)?;
            compute_s += t.elapsed().as_secs_f64();
            images += batch.images.shape()[0];
            if first_loss.is_nan() {
                first_loss = l["total"];
            }
            last_loss = l["total"];
            for (k, v) in &l {
                *sums.entry(k).or_default() += *v as f64;
            }
            steps += 1;
            bar.set_message(format!(
                "loss {:.3} (seg {:.3} ccl {:.3} rec {:.3}/{:.3}) {:.1} img/s",
                l["total"],
                l["criterion"],
                l["ccl"],
                l["text_rec"],
                l["img_rec"],
                images as f64 / compute_s.max(1e-9)
            ));
            bar.inc(1);
        }
        producer.join().map_err(|_| Error::Other("the batch thread panicked".into()))?;
        bar.finish_and_clear();
        let v: Scores = evaluate(&tr.model, &val_set, &tok, Notes::Correct, o.batch.max(1), dev)?;
        epochs_run = epoch + 1;
        let improved = v.dice > best.0;
        if improved {
            best = (v.dice, epoch + 1);
            checkpoint::save_with(&tr.model.params, &cfg.to_metadata(), &o.out.join("best.safetensors"))?;
        }
        checkpoint::save_with(&tr.model.params, &cfg.to_metadata(), &last)?;
        save_state(&tr, epoch + 1, best, o.seed, &state)?;
        let means: Vec<String> = sums.iter().map(|(k, s)| format!("\"{k}\": {:.6}", s / steps.max(1) as f64)).collect();
        let line = format!(
            "{{\"epoch\": {}, \"lr\": {:.3e}, {}, \"val_dice\": {:.5}, \"val_iou\": {:.5}, \"val_hard_dice\": {:.5}, \"images_per_s\": {:.2}, \"elapsed_s\": {:.1}}}",
            epoch + 1,
            tr.adam.cfg.lr,
            means.join(", "),
            v.dice,
            v.iou,
            v.hard_dice,
            images as f64 / compute_s.max(1e-9),
            start.elapsed().as_secs_f64()
        );
        writeln!(log, "{line}").map_err(|e| io(&o.out, e))?;
        curves.0.push(sums.get("total").copied().unwrap_or(0.0) / steps.max(1) as f64);
        curves.1.push(v.dice);
        curves.2.push(v.iou);
        super::visual::plot_curves(&curves.0, &curves.1, &curves.2, &o.out.join("curves.png"))?;
        if o.progress {
            println!(
                "epoch {}/{}: loss {:.4}, val Dice {:.4}, IoU {:.4}{} ({:.0} s)",
                epoch + 1,
                o.epochs,
                sums.get("total").copied().unwrap_or(0.0) / steps.max(1) as f64,
                v.dice,
                v.iou,
                if improved { " (best)" } else { "" },
                start.elapsed().as_secs_f64()
            );
        }
        if epoch + 1 - best.1 >= o.patience.max(1) {
            if o.progress {
                println!("early stop: no better validation Dice for {} epochs", o.patience);
            }
            break;
        }
        if o.stop_after > 0 && epoch + 1 - epoch0 >= o.stop_after {
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
        best_dice: best.0,
        best_epoch: best.1,
        epochs_run,
        images_per_s: images as f64 / compute_s.max(1e-9),
        seconds: start.elapsed().as_secs_f64(),
        first_loss,
        last_loss,
    })
}
