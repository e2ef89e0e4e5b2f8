//! The word-level tokenizer `train` makes for presets whose text tower is trained from scratch,
//! written as a Hugging Face tokenizer.json (Python's `tokenizers` reads it): lower-cased notes
//! split on words and punctuation, `[PAD]` = 0, `[UNK]`, `[SOT]` … `[EOT]` around every note.
//! The vocabulary is the crate's WordLevelTrainer's: the specials, then the words by count
//! (descending) and spelling, at most 30 000.

use super::pipeline::words;
use serde_json::{json, Map, Value};
use std::collections::HashMap;

const SPECIALS: [&str; 4] = ["[PAD]", "[UNK]", "[SOT]", "[EOT]"];
const MAX_VOCAB: usize = 30_000;

/// The tokenizer.json of a word-level tokenizer trained on `notes`.
pub fn train<S: AsRef<str>>(notes: impl Iterator<Item = S>) -> Result<String, String> {
    let mut counts: HashMap<String, u64> = HashMap::new();
    for n in notes {
        for w in words(super::bounded(n.as_ref())) {
            *counts.entry(w).or_default() += 1;
        }
    }
    let mut ordered: Vec<(String, u64)> = counts.into_iter().collect();
    ordered.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
    let mut vocab = Map::new();
    let words = SPECIALS.iter().map(|s| s.to_string()).chain(ordered.into_iter().map(|(w, _)| w));
    for (i, w) in words.take(MAX_VOCAB).enumerate() {
        vocab.insert(w, json!(i));
    }
    serde_json::to_string(&skeleton(vocab)).map_err(|e| e.to_string())
}

fn skeleton(vocab: Map<String, Value>) -> Value {
    let added: Vec<Value> = SPECIALS
        .iter()
        .enumerate()
        .map(|(i, s)| {
            json!({"id": i, "content": s, "single_word": false, "lstrip": false, "rstrip": false,
                   "normalized": false, "special": true})
        })
        .collect();
    let special = |i: usize| json!({"id": SPECIALS[i], "ids": [i], "tokens": [SPECIALS[i]]});
    json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": {"type": "Lowercase"},
        "pre_tokenizer": {"type": "Whitespace"},
        "post_processor": {
            "type": "TemplateProcessing",
            "single": [{"SpecialToken": {"id": "[SOT]", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                       {"SpecialToken": {"id": "[EOT]", "type_id": 0}}],
            "pair": [{"Sequence": {"id": "A", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}}],
            "special_tokens": {"[SOT]": special(2), "[EOT]": special(3)}
        },
        "decoder": null,
        "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "[UNK]"}
    })
}
