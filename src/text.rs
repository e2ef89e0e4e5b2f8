//! Notes to token ids, through a Hugging Face `tokenizer.json` (the `tokenizers` crate): CLIP's
//! BPE for the official presets (the fixture ships one that reproduces `clip.tokenize(.., 18)`),
//! or, for a preset whose text tower is trained from scratch, a word-level tokenizer trained on
//! the training notes and saved with the checkpoint. Every encoding is truncated / padded to the
//! model's token length; id 0 marks padding (the official text mask is ids ≠ 0).

use crate::error::{Error, Result};
use std::path::Path;
use tokenizers::models::wordlevel::{WordLevel, WordLevelTrainer};
use tokenizers::normalizers::utils::Lowercase;
use tokenizers::pre_tokenizers::whitespace::Whitespace;
use tokenizers::processors::template::TemplateProcessing;
use tokenizers::{AddedToken, Tokenizer};

pub struct NoteTokenizer {
    /// As loaded or trained (what `save` writes).
    original: Tokenizer,
    /// The same without its own truncation and padding (`fit` does both, keeping the end token).
    tok: Tokenizer,
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
        // JSON syntax first: a damaged file then gets serde_json's message with its position
        serde_json::from_slice::<serde_json::Value>(bytes).map_err(|e| tok_err("not a valid tokenizer.json", e))?;
        // tokenizers 0.22 panics (`expect("Helper")` in its decoder deserialiser) on some
        // well-formed JSON of the wrong structure, found by tests/fuzz_parsers.rs: contain it
        let parsed = std::panic::catch_unwind(|| Tokenizer::from_bytes(bytes))
            .map_err(|_| tok_err("not a valid tokenizer.json", "its structure is not a tokenizer's"))?;
        let tok = parsed.map_err(|e| tok_err("not a valid tokenizer.json", e))?;
        Self::wrap(tok, len)
    }

    /// The tokenizer.json text `save` writes (compact, deterministic for one tokenizer).
    pub fn to_json(&self) -> Result<String> {
        self.original.to_string(false).map_err(|e| tok_err("serialise", e))
    }

    /// (hash of the tokenizer.json bytes, vocabulary size): what a checkpoint records so that a
    /// tokenizer that does not belong to it is refused.
    pub fn identity(json: &[u8], vocab: usize) -> (String, usize) {
        (crate::files::Fnv64::default().update(json).hex(), vocab)
    }

    fn wrap(original: Tokenizer, len: usize) -> Result<NoteTokenizer> {
        if len == 0 {
            return Err(tok_err("token length", "must be at least 1"));
        }
        let mut tok = original.clone();
        tok.with_truncation(None).map_err(|e| tok_err("truncation", e))?;
        tok.with_padding(None);
        Ok(NoteTokenizer { original, tok, len })
    }

    /// Trains a word-level tokenizer on `notes` (lower-cased, split on words and punctuation;
    /// `[PAD]` = 0, `[UNK]`, `[SOT]` … `[EOT]` around every note).
    pub fn train_word_level<S: AsRef<str> + Send>(
        notes: impl Iterator<Item = S> + Send,
        len: usize,
    ) -> Result<NoteTokenizer> {
        let specials: Vec<AddedToken> =
            ["[PAD]", "[UNK]", "[SOT]", "[EOT]"].iter().map(|s| AddedToken::from(*s, true)).collect();
        let trainer = WordLevelTrainer::builder()
            .special_tokens(specials)
            .show_progress(false)
            .build()
            .map_err(|e| tok_err("trainer", e))?;
        let model = WordLevel::builder().unk_token("[UNK]".into()).build().map_err(|e| tok_err("model", e))?;
        let mut tok = Tokenizer::new(model);
        tok.with_normalizer(Some(Lowercase));
        tok.with_pre_tokenizer(Some(Whitespace {}));
        let mut trainer: tokenizers::models::TrainerWrapper = trainer.into();
        tok.train(&mut trainer, notes).map_err(|e| tok_err("training", e))?;
        let sot = tok.token_to_id("[SOT]").ok_or_else(|| tok_err("training", "no [SOT]"))?;
        let eot = tok.token_to_id("[EOT]").ok_or_else(|| tok_err("training", "no [EOT]"))?;
        let post = TemplateProcessing::builder()
            .try_single("[SOT] $A [EOT]")
            .map_err(|e| tok_err("template", e))?
            .special_tokens(vec![("[SOT]", sot), ("[EOT]", eot)])
            .build()
            .map_err(|e| tok_err("template", e))?;
        tok.with_post_processor(Some(post));
        Self::wrap(tok, len)
    }

    pub fn vocab_size(&self) -> usize {
        self.tok.get_vocab_size(true)
    }

    /// Writes tokenizer.json atomically.
    pub fn save(&self, path: &Path) -> Result<()> {
        crate::files::write_atomic(path, self.to_json()?.as_bytes())
    }

    /// The tokenizer's encoding of a note cut to MAX_NOTE_BYTES. tokenizers 0.22 panics ("no entry
    /// found for key" in its template post-processor) when a loaded tokenizer.json's template
    /// names a token its vocabulary lacks (tests/fuzz_parsers.rs): contained as an error.
    fn encoding(&self, note: &str) -> Result<tokenizers::Encoding> {
        let note = bounded(note);
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.tok.encode(note, true)))
            .map_err(|_| tok_err("encode", "the tokenizer.json is inconsistent (its template names a missing token)"))?
            .map_err(|e| tok_err(note, e))
    }

    /// The token strings of `encode` (padding as ""), for showing per-word weights.
    pub fn tokens(&self, note: &str) -> Result<Vec<String>> {
        let enc = self.encoding(note)?;
        let t = enc.get_tokens().iter().map(|s| s.trim_end_matches("</w>").to_string()).collect();
        Ok(fit(t, self.len, String::new()))
    }

    /// (ids, valid) of one note, both `len` long; valid = id ≠ 0. The tail is cut so that the
    /// end token survives (as clip.tokenize(truncate=True) does).
    pub fn encode(&self, note: &str) -> Result<(Vec<i32>, Vec<i32>)> {
        let enc = self.encoding(note)?;
        let ids = fit(enc.get_ids().iter().map(|&i| i as i32).collect(), self.len, 0);
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
