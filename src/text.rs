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
    tok: Tokenizer,
    len: usize,
}

fn tok_err(what: &str, e: impl std::fmt::Display) -> Error {
    Error::Other(format!("tokenizer: {what}: {e}"))
}

impl NoteTokenizer {
    /// Loads a tokenizer.json; encodings are forced to `len` ids.
    pub fn from_file(path: &Path, len: usize) -> Result<NoteTokenizer> {
        let tok = Tokenizer::from_file(path).map_err(|e| tok_err(&path.display().to_string(), e))?;
        Ok(NoteTokenizer { tok, len })
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
        Ok(NoteTokenizer { tok, len })
    }

    pub fn vocab_size(&self) -> usize {
        self.tok.get_vocab_size(true)
    }

    pub fn save(&self, path: &Path) -> Result<()> {
        self.tok.save(path, false).map_err(|e| tok_err(&path.display().to_string(), e))
    }

    /// The token strings of `encode` (padding as ""), for showing per-word weights.
    pub fn tokens(&self, note: &str) -> Result<Vec<String>> {
        let mut tok = self.tok.clone();
        tok.with_truncation(None).map_err(|e| tok_err("truncation", e))?;
        tok.with_padding(None);
        let enc = tok.encode(note, true).map_err(|e| tok_err(note, e))?;
        let mut t: Vec<String> = enc.get_tokens().iter().map(|s| s.trim_end_matches("</w>").to_string()).collect();
        if t.len() > self.len {
            let last = t.last().cloned().unwrap_or_default();
            t.truncate(self.len);
            t[self.len - 1] = last;
        }
        t.resize(self.len, String::new());
        Ok(t)
    }

    /// (ids, valid) of one note, both `len` long; valid = id ≠ 0. The tail is cut so that the
    /// end token survives (as clip.tokenize(truncate=True) does).
    pub fn encode(&self, note: &str) -> Result<(Vec<i32>, Vec<i32>)> {
        let mut tok = self.tok.clone();
        tok.with_truncation(None).map_err(|e| tok_err("truncation", e))?;
        tok.with_padding(None);
        let enc = tok.encode(note, true).map_err(|e| tok_err(note, e))?;
        let mut ids: Vec<i32> = enc.get_ids().iter().map(|&i| i as i32).collect();
        if ids.len() > self.len {
            let last = *ids.last().expect("non-empty");
            ids.truncate(self.len);
            ids[self.len - 1] = last;
        }
        ids.resize(self.len, 0);
        let valid = ids.iter().map(|&i| (i != 0) as i32).collect();
        Ok((ids, valid))
    }
}
