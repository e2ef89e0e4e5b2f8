//! Notes to token ids, through a Hugging Face `tokenizer.json` read by our own pipeline
//! (`pipeline.rs`: the `tokenizers` crate's ids, without its size): CLIP's BPE for the official
//! presets (the fixture ships one that reproduces `clip.tokenize(.., 18)`),
//! or, for a preset whose text tower is trained from scratch, a word-level tokenizer trained on
//! the training notes and saved with the checkpoint. Every encoding is truncated / padded to the
//! model's token length; id 0 marks padding (the official text mask is ids ≠ 0).

mod classes;
pub mod pipeline;
pub mod word_level;

use crate::error::{Error, Result};
use pipeline::Pipeline;
use std::path::Path;

pub struct NoteTokenizer {
    /// The tokenizer.json as read or trained (what `save` writes, byte for byte).
    json: String,
    pipeline: Pipeline,
    len: usize,
}

fn tok_err(what: &str, e: impl std::fmt::Display) -> Error {
    Error::Other(format!("tokenizer: {what}: {e}"))
}

impl NoteTokenizer {
    /// Loads a tokenizer.json (a regular file of at most 64 MB; CLIP's is 2 MB); encodings are
    /// forced to `len` ids.
    pub fn from_file(path: &Path, len: usize) -> Result<NoteTokenizer> {
        let bytes = crate::files::read_regular(path, MAX_TOKENIZER_BYTES)?;
        Self::from_bytes(&bytes, len).map_err(|e| match e {
            Error::Other(d) => Error::Data { path: path.display().to_string(), detail: d },
            other => other,
        })
    }

    /// A tokenizer.json's content.
    pub fn from_bytes(bytes: &[u8], len: usize) -> Result<NoteTokenizer> {
        let json = std::str::from_utf8(bytes).map_err(|e| tok_err("not a valid tokenizer.json", e))?;
        let root: serde_json::Value =
            serde_json::from_str(json).map_err(|e| tok_err("not a valid tokenizer.json", e))?;
        let pipeline = Pipeline::from_json(root).map_err(|e| tok_err("unsupported tokenizer.json", e))?;
        if len == 0 {
            return Err(tok_err("token length", "must be at least 1"));
        }
        Ok(NoteTokenizer { json: json.to_string(), pipeline, len })
    }

    /// The tokenizer.json text `save` writes (the bytes it was read from, or trained as).
    pub fn to_json(&self) -> Result<String> {
        Ok(self.json.clone())
    }

    /// (hash of the tokenizer.json bytes, vocabulary size): what a checkpoint records so that a
    /// tokenizer that does not belong to it is refused.
    pub fn identity(json: &[u8], vocab: usize) -> (String, usize) {
        (crate::files::Fnv64::default().update(json).hex(), vocab)
    }

    /// Trains a word-level tokenizer on `notes` (lower-cased, split on words and punctuation;
    /// `[PAD]` = 0, `[UNK]`, `[SOT]` … `[EOT]` around every note).
    pub fn train_word_level<S: AsRef<str>>(notes: impl Iterator<Item = S>, len: usize) -> Result<NoteTokenizer> {
        let json = word_level::train(notes).map_err(|e| tok_err("training", e))?;
        Self::from_bytes(json.as_bytes(), len)
    }

    /// The number of distinct tokens (the vocabulary and the added tokens).
    pub fn vocab_size(&self) -> usize {
        self.pipeline.vocab_size()
    }

    /// Writes tokenizer.json atomically.
    pub fn save(&self, path: &Path) -> Result<()> {
        crate::files::write_atomic(path, self.json.as_bytes())
    }

    /// The ids of a note cut to MAX_NOTE_BYTES, before truncation and padding.
    fn encoding(&self, note: &str) -> Result<Vec<u32>> {
        let note = bounded(note);
        self.pipeline.encode(note).map_err(|e| tok_err(note, e))
    }

    /// The token strings of `encode` (padding as ""), for showing per-word weights.
    pub fn tokens(&self, note: &str) -> Result<Vec<String>> {
        let names = self.pipeline.names(&self.encoding(note)?);
        let t = names.iter().map(|s| s.trim_end_matches("</w>").to_string()).collect();
        Ok(fit(t, self.len, String::new()))
    }

    /// (ids, valid) of one note, both `len` long; valid = id ≠ 0. The tail is cut so that the
    /// end token survives (as clip.tokenize(truncate=True) does).
    pub fn encode(&self, note: &str) -> Result<(Vec<i32>, Vec<i32>)> {
        let ids: Vec<i32> = self
            .encoding(note)?
            .iter()
            .map(|&i| i32::try_from(i).map_err(|_| tok_err(note, format!("id {i} is out of range"))))
            .collect::<Result<_>>()?;
        let ids = fit(ids, self.len, 0);
        let valid = ids.iter().map(|&i| (i != 0) as i32).collect();
        Ok((ids, valid))
    }
}

/// The largest tokenizer.json read.
const MAX_TOKENIZER_BYTES: u64 = 64 << 20;

/// Notes are cut to this many bytes before tokenization: the model reads at most `len` tokens
/// (18 for the official presets), so the rest of a long note only costs time and memory (a
/// 16 MB note cost 2.4 GB to tokenize whole). 4 KiB is hundreds of tokens of any real note.
pub const MAX_NOTE_BYTES: usize = 4096;

/// `note` cut to at most MAX_NOTE_BYTES at a character boundary.
pub fn bounded(note: &str) -> &str {
    if note.len() <= MAX_NOTE_BYTES {
        return note;
    }
    let mut end = MAX_NOTE_BYTES;
    while !note.is_char_boundary(end) {
        end -= 1;
    }
    &note[..end]
}

/// `len` items: longer sequences keep their first len − 1 and their last (the end token),
/// shorter ones are padded with `pad`.
fn fit<T: Clone>(mut v: Vec<T>, len: usize, pad: T) -> Vec<T> {
    if v.len() > len {
        let last = v.last().cloned().expect("non-empty");
        v.truncate(len);
        v[len - 1] = last;
    }
    v.resize(len, pad);
    v
}
