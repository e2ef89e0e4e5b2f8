//! A training run's folder as one type: where each file lives, the lock that keeps a second
//! training out, the rule that a run only ever replaces its own files, atomic writes, and the
//! typed epoch log.
//!
//! What a run writes (and the only names `--overwrite` removes): `best.safetensors`,
//! `last.safetensors`, `train_state.safetensors`, `tokenizer.json`, `log.jsonl`, `curves.png`,
//! and `.lock` while it runs. Anything else in the folder is never touched.

use crate::error::{Error, Result};
use crate::files;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::io::Write;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

pub const BEST: &str = "best.safetensors";
pub const LAST: &str = "last.safetensors";
pub const STATE: &str = "train_state.safetensors";
pub const TOKENIZER: &str = "tokenizer.json";
pub const LOG: &str = "log.jsonl";
pub const CURVES: &str = "curves.png";
const LOCK: &str = ".lock";
/// Every file a run creates (the lock aside).
pub const RUN_FILES: [&str; 6] = [BEST, LAST, STATE, TOKENIZER, LOG, CURVES];

/// How a training opens its folder.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// The folder must be new or empty.
    Fresh,
    /// Continue the run whose `train_state.safetensors` is there.
    Resume,
    /// Replace the run files of an earlier run (only those names; nothing else is removed).
    Overwrite,
}

/// One line of `log.jsonl`: an epoch's mean loss terms, validation scores and speed.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct EpochLog {
    pub epoch: usize,
    /// Optimiser steps done at the end of this epoch.
    pub step: u64,
    pub lr: f64,
    /// Mean of each loss term over the epoch's steps (`total`, `criterion`, `ccl`, ...), and of
    /// the global gradient norm before clipping (`grad_norm`; its largest: `grad_norm_max`).
    #[serde(flatten)]
    pub losses: BTreeMap<String, f64>,
    pub val_dice: f64,
    pub val_iou: f64,
    pub val_hard_dice: f64,
    /// Validation Dice with the counterfactual notes, when the dataset has them (synth's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub val_counterfactual_dice: Option<f64>,
    pub images_per_s: f64,
    pub elapsed_s: f64,
    /// The most tensor bytes alive at once on the run's device during the epoch (training and
    /// validation; `device::memory`). 0 in logs written before it was recorded.
    #[serde(default)]
    pub peak_tensor_bytes: u64,
}

impl EpochLog {
    pub fn total(&self) -> f64 {
        self.losses.get("total").copied().unwrap_or(f64::NAN)
    }
}

/// An open run folder; holds the lock until dropped.
pub struct RunDir {
    root: PathBuf,
    _lock: Lock,
    /// Temporaries of a crashed writer removed when the folder was opened.
    pub removed_temporaries: usize,
}

fn err(path: &Path, detail: impl Into<String>) -> Error {
    Error::Data { path: path.display().to_string(), detail: detail.into() }
}

impl RunDir {
    /// The first `<base>/train-<n>` (n = 1, 2, ...) that does not exist: where a training without
    /// `--out` writes, so that no run ever lands on another.
    pub fn next_free(base: &Path) -> PathBuf {
        (1..).map(|n| base.join(format!("train-{n}"))).find(|p| !p.exists()).expect("an unbounded range")
    }

    pub fn open(root: &Path, mode: Mode) -> Result<RunDir> {
        std::fs::create_dir_all(root).map_err(|e| err(root, format!("cannot create the run folder: {e}")))?;
        let lock = Lock::acquire(&root.join(LOCK))?;
        let others: Vec<String> = list(root)?.into_iter().filter(|n| n != LOCK).collect();
        match mode {
            Mode::Fresh if !others.is_empty() => {
                return Err(err(
                    root,
                    format!(
                        "the run folder is not empty ({}): give --resume to continue its run, --overwrite to replace \
                         its run files, or another --out",
                        preview(&others)
                    ),
                ))
            }
            // a run killed before its first epoch ended has its tokenizer and no state yet
            Mode::Resume if !root.join(STATE).is_file() && !root.join(TOKENIZER).is_file() => {
                return Err(err(root, format!("nothing to resume: no {STATE} or {TOKENIZER} in the run folder")));
            }
            Mode::Overwrite => {
                for f in RUN_FILES {
                    let p = root.join(f);
                    if p.is_file() {
                        std::fs::remove_file(&p).map_err(|e| err(&p, format!("cannot remove: {e}")))?;
                    }
                }
            }
            _ => {}
        }
        let removed_temporaries = files::remove_orphaned_temporaries(root)?;
        Ok(RunDir { root: root.to_path_buf(), _lock: lock, removed_temporaries })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn path(&self, file: &str) -> PathBuf {
        self.root.join(file)
    }

    /// The log's entries; a line that does not parse is an error naming it.
    pub fn read_log(&self) -> Result<Vec<EpochLog>> {
        let p = self.path(LOG);
        if !p.exists() {
            return Ok(vec![]);
        }
        let bytes = files::read_regular(&p, 256 << 20)?;
        let text = String::from_utf8(bytes).map_err(|_| err(&p, "not UTF-8"))?;
        text.lines()
            .enumerate()
            .filter(|(_, l)| !l.trim().is_empty())
            .map(|(i, l)| serde_json::from_str(l).map_err(|e| err(&p, format!("line {}: {e}", i + 1))))
            .collect()
    }

    /// Rewrites the whole log atomically (it is small: one line per epoch), so that a kill never
    /// leaves half a line.
    pub fn write_log(&self, entries: &[EpochLog]) -> Result<()> {
        let mut text = Vec::new();
        for e in entries {
            serde_json::to_writer(&mut text, e).map_err(|x| err(&self.path(LOG), x.to_string()))?;
            text.push(b'\n');
        }
        files::write_atomic(&self.path(LOG), &text)
    }
}

fn list(root: &Path) -> Result<Vec<String>> {
    let mut v: Vec<String> = std::fs::read_dir(root)
        .map_err(|e| err(root, format!("cannot list: {e}")))?
        .filter_map(|e| e.ok().map(|e| e.file_name().to_string_lossy().into_owned()))
        .collect();
    v.sort();
    Ok(v)
}

fn preview(names: &[String]) -> String {
    let mut s = names.iter().take(4).cloned().collect::<Vec<_>>().join(", ");
    if names.len() > 4 {
        s += &format!(", ... {} entries", names.len());
    }
    s
}

/// An exclusive `flock` on `<run>/.lock`, released by the kernel when the process ends (even by
/// SIGKILL), so a crashed run never leaves a stale lock. The holder's pid is written into the
/// file for the message a second training gets. The file stays (removing it would let a
/// process that opened it before the removal lock a file that no longer has the name).
struct Lock {
    _file: std::fs::File,
}

impl Lock {
    fn acquire(path: &Path) -> Result<Lock> {
        let mut file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)
            .map_err(|e| err(path, format!("cannot open the run's lock file: {e}")))?;
        // SAFETY: flock on a file descriptor this function owns.
        let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
        if rc != 0 {
            let holder = std::fs::read_to_string(path).unwrap_or_default();
            let holder = holder.trim();
            return Err(err(
                path.parent().unwrap_or(path),
                format!(
                    "another training is using this run folder ({}); wait for it or choose another --out",
                    if holder.is_empty() { "a process".to_string() } else { format!("process {holder}") }
                ),
            ));
        }
        file.set_len(0).map_err(|e| err(path, e.to_string()))?;
        write!(file, "{}", std::process::id()).map_err(|e| err(path, e.to_string()))?;
        Ok(Lock { _file: file })
    }
}
