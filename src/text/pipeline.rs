//! A Hugging Face `tokenizer.json` read and applied without the `tokenizers` crate: the subset the
//! notes' tokenizers use (CLIP's BPE as `transformers` ships it, and the word-level tokenizer
//! `train` makes), reproducing the crate's ids exactly (tests/tokenizer.rs compares both on the
//! fixtures and on random notes). A component outside the subset is refused by name, never
//! approximated.
//!
//! The steps, in the crate's order: split the raw note on the special added tokens (leftmost
//! longest), normalise each other piece, split it on the normalised added tokens, pre-tokenize,
//! run the model on each pre-token, and wrap the ids in the post-processor's template.

use super::classes::{is_letter, is_number, is_space, is_word};
use serde_json::Value;
use std::collections::HashMap;

/// Why a tokenizer.json cannot be used (the caller names the file).
pub type Why = String;

enum Norm {
    Nfc,
    Lowercase,
    Replace { pattern: Pattern, content: String },
}

/// The Replace patterns we read: a literal, `\s+`, or a character class `[...]` (with `+`).
enum Pattern {
    Literal(String),
    Spaces,
    Class { ranges: Vec<(char, char)>, repeat: bool },
}

enum Pre {
    /// CLIP's Split (behavior Removed, invert): the pieces its pattern matches.
    ClipSplit,
    /// `\w+|[^\w\s]+`
    Whitespace,
    WhitespaceSplit,
    /// Bytes mapped to printable characters (GPT-2's table), no regex, no prefix space.
    ByteLevel,
}

enum Model {
    Bpe {
        vocab: HashMap<String, u32>,
        /// (left id, right id) → (rank, merged id)
        merges: HashMap<(u32, u32), (u32, u32)>,
        unk: Option<u32>,
        fuse_unk: bool,
        prefix: String,
        suffix: String,
        ignore_merges: bool,
    },
    WordLevel {
        vocab: HashMap<String, u32>,
        unk: u32,
    },
}

impl Model {
    fn vocab(&self) -> &HashMap<String, u32> {
        match self {
            Model::Bpe { vocab, .. } | Model::WordLevel { vocab, .. } => vocab,
        }
    }
}

enum Piece {
    Ids(Vec<u32>),
    Sequence,
}

pub struct Pipeline {
    /// Added tokens matched on the raw note (normalized: false), and after normalisation.
    raw_added: Vec<(String, u32)>,
    normalized_added: Vec<(String, u32)>,
    norms: Vec<Norm>,
    pres: Vec<Pre>,
    model: Model,
    template: Vec<Piece>,
    /// id → the added tokens' strings (the vocabulary's are looked up when asked: a reversed
    /// copy of CLIP's 49,408 strings was a fifth of building the tokenizer, for a rare call)
    added_names: HashMap<u32, String>,
    vocab_size: usize,
}

/// CLIP's pre-tokenizer pattern, as `transformers` writes it.
const CLIP_PATTERN: &str =
    r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+";

fn field<'a>(v: &'a Value, key: &str, what: &str) -> Result<&'a Value, Why> {
    v.get(key).ok_or_else(|| format!("{what} has no \"{key}\""))
}

fn str_of<'a>(v: &'a Value, key: &str, what: &str) -> Result<&'a str, Why> {
    field(v, key, what)?.as_str().ok_or_else(|| format!("{what}: \"{key}\" is not a string"))
}

fn bool_of(v: &Value, key: &str) -> bool {
    v.get(key).and_then(Value::as_bool).unwrap_or(false)
}

fn id_of(v: &Value, what: &str) -> Result<u32, Why> {
    v.as_u64().and_then(|i| u32::try_from(i).ok()).ok_or_else(|| format!("{what}: {v} is not a token id"))
}

fn kind(v: &Value, what: &str) -> Result<String, Why> {
    Ok(str_of(v, "type", what)?.to_string())
}

/// The model's vocabulary, moved out of the parsed document (its 49,408 strings for CLIP are not
/// copied; the error text is only made for an entry that is wrong).
fn vocab_of(model: &mut Value) -> Result<HashMap<String, u32>, Why> {
    let obj = match model.get_mut("vocab").map(Value::take) {
        Some(Value::Object(o)) => o,
        Some(_) => return Err("the model's vocab is not an object".into()),
        None => return Err("the model has no \"vocab\"".into()),
    };
    let mut vocab = HashMap::with_capacity(obj.len());
    for (k, v) in obj {
        match v.as_u64().and_then(|i| u32::try_from(i).ok()) {
            Some(id) => vocab.insert(k, id),
            None => return Err(format!("vocab entry {k:?}: {v} is not a token id")),
        };
    }
    Ok(vocab)
}

impl Pipeline {
    pub fn from_json(mut root: Value) -> Result<Pipeline, Why> {
        let mut p = Pipeline {
            raw_added: vec![],
            normalized_added: vec![],
            norms: vec![],
            pres: vec![],
            model: Model::WordLevel { vocab: HashMap::new(), unk: 0 },
            template: vec![Piece::Sequence],
            added_names: HashMap::new(),
            vocab_size: 0,
        };
        let mut model = root.get_mut("model").map(Value::take).ok_or("tokenizer.json has no \"model\"")?;
        p.model = parse_model(&mut model)?;
        if let Some(added) = root.get("added_tokens").and_then(Value::as_array) {
            for t in added {
                let content = str_of(t, "content", "an added token")?.to_string();
                let id = id_of(field(t, "id", "an added token")?, "an added token")?;
                if bool_of(t, "single_word") || bool_of(t, "lstrip") || bool_of(t, "rstrip") {
                    return Err(format!("added token {content:?}: single_word / lstrip / rstrip are not supported"));
                }
                if content.is_empty() {
                    return Err("an added token is empty".into());
                }
                p.added_names.insert(id, content.clone());
                if bool_of(t, "normalized") {
                    p.normalized_added.push((content, id));
                } else {
                    p.raw_added.push((content, id));
                }
            }
        }
        // the crate's get_vocab_size(true): the distinct strings of the vocabulary and the added tokens
        let vocab = p.model.vocab();
        let extra = p.raw_added.iter().chain(&p.normalized_added).filter(|(t, _)| !vocab.contains_key(t));
        let mut extra: Vec<&String> = extra.map(|(t, _)| t).collect();
        extra.sort_unstable();
        extra.dedup();
        p.vocab_size = vocab.len() + extra.len();
        match root.get("normalizer") {
            None | Some(Value::Null) => {}
            Some(n) => parse_norm(n, &mut p.norms)?,
        }
        match root.get("pre_tokenizer") {
            None | Some(Value::Null) => {}
            Some(n) => parse_pre(n, &mut p.pres)?,
        }
        match root.get("post_processor") {
            None | Some(Value::Null) => {}
            Some(n) => p.template = parse_post(n)?,
        }
        Ok(p)
    }

    pub fn vocab_size(&self) -> usize {
        self.vocab_size
    }

    /// The token strings of ids (an added token's name first, else the vocabulary's; "" for an
    /// id neither has): one pass over the vocabulary.
    pub fn names(&self, ids: &[u32]) -> Vec<String> {
        let mut found: HashMap<u32, &str> =
            ids.iter().filter_map(|i| self.added_names.get(i).map(|n| (*i, n.as_str()))).collect();
        let wanted: std::collections::HashSet<u32> = ids.iter().copied().filter(|i| !found.contains_key(i)).collect();
        if !wanted.is_empty() {
            for (k, v) in self.model.vocab() {
                if wanted.contains(v) {
                    found.entry(*v).or_insert(k);
                }
            }
        }
        ids.iter().map(|i| found.get(i).map_or_else(String::new, |s| s.to_string())).collect()
    }

    /// The note's ids, before truncation and padding.
    pub fn encode(&self, note: &str) -> Result<Vec<u32>, Why> {
        let mut seq = Vec::new();
        for seg in split_added(note, &self.raw_added) {
            match seg {
                Seg::Token(id) => seq.push(id),
                Seg::Text(t) => {
                    let t = self.normalize(t)?;
                    for seg in split_added(&t, &self.normalized_added) {
                        match seg {
                            Seg::Token(id) => seq.push(id),
                            Seg::Text(t) => {
                                for word in self.pre_tokenize(t.to_string()) {
                                    self.model_ids(&word, &mut seq)?;
                                }
                            }
                        }
                    }
                }
            }
        }
        let mut ids = Vec::with_capacity(seq.len() + 2);
        for piece in &self.template {
            match piece {
                Piece::Ids(v) => ids.extend(v),
                Piece::Sequence => ids.extend(&seq),
            }
        }
        Ok(ids)
    }

    fn normalize(&self, s: &str) -> Result<String, Why> {
        let mut s = s.to_string();
        for n in &self.norms {
            s = match n {
                Norm::Nfc if s.is_ascii() => s,
                Norm::Nfc => nfc(s)?,
                // per character, as the crate does (not str::to_lowercase's final-sigma rule)
                Norm::Lowercase => s.chars().flat_map(char::to_lowercase).collect(),
                Norm::Replace { pattern, content } => replace(&s, pattern, content),
            };
        }
        Ok(s)
    }

    fn pre_tokenize(&self, s: String) -> Vec<String> {
        let mut pieces = vec![s];
        for pre in &self.pres {
            pieces = pieces
                .iter()
                .flat_map(|p| -> Vec<String> {
                    match pre {
                        Pre::ClipSplit => matches(p, clip_match),
                        Pre::Whitespace => matches(p, word_or_punct),
                        Pre::WhitespaceSplit => p.split(is_space).filter(|w| !w.is_empty()).map(String::from).collect(),
                        Pre::ByteLevel => vec![p.bytes().map(byte_char).collect()],
                    }
                })
                .collect();
        }
        pieces
    }

    fn model_ids(&self, word: &str, out: &mut Vec<u32>) -> Result<(), Why> {
        match &self.model {
            Model::WordLevel { vocab, unk } => out.push(vocab.get(word).copied().unwrap_or(*unk)),
            Model::Bpe { vocab, merges, unk, fuse_unk, prefix, suffix, ignore_merges } => {
                if *ignore_merges {
                    if let Some(&id) = vocab.get(word) {
                        out.push(id);
                        return Ok(());
                    }
                }
                let n = word.chars().count();
                let mut syms: Vec<u32> = Vec::with_capacity(n);
                let mut last_unk = false;
                for (i, c) in word.chars().enumerate() {
                    let mut s = String::new();
                    if i > 0 {
                        s.push_str(prefix);
                    }
                    s.push(c);
                    if i + 1 == n {
                        s.push_str(suffix);
                    }
                    match (vocab.get(&s), unk) {
                        (Some(&id), _) => {
                            syms.push(id);
                            last_unk = false;
                        }
                        (None, Some(u)) => {
                            if !(*fuse_unk && last_unk) {
                                syms.push(*u);
                            }
                            last_unk = true;
                        }
                        (None, None) => {
                            return Err(format!("{s:?} is not in the vocabulary and there is no unk_token"))
                        }
                    }
                }
                // the lowest-ranked adjacent pair first, the leftmost among equal ranks (the
                // crate's priority queue orders merges the same way)
                loop {
                    let best = syms
                        .windows(2)
                        .enumerate()
                        .filter_map(|(i, w)| merges.get(&(w[0], w[1])).map(|&(rank, id)| (rank, i, id)))
                        .min();
                    let Some((_, i, id)) = best else { break };
                    syms[i] = id;
                    syms.remove(i + 1);
                }
                out.extend(syms);
            }
        }
        Ok(())
    }
}

/// NFC. The full build composes; a build without the `nfc` feature (reclmis-infer: the
/// composition tables cost 124 KB of its 1.5 MB) accepts text that is already NFC, which the
/// quick check proves for nearly all notes (any ASCII, precomposed accents), and refuses the rest
/// by name rather than tokenize it differently.
fn nfc(s: String) -> Result<String, Why> {
    #[cfg(feature = "nfc")]
    {
        Ok(unicode_normalization::UnicodeNormalization::nfc(s.as_str()).collect())
    }
    #[cfg(not(feature = "nfc"))]
    {
        match unicode_normalization::is_nfc_quick(s.chars()) {
            unicode_normalization::IsNormalized::Yes => Ok(s),
            _ => Err(format!(
                "the note is not in Unicode NFC (a decomposed accent?) and this build leaves out the \
                 NFC tables; normalise it first or use the full build (reclmis infer): {s:?}"
            )),
        }
    }
}

fn parse_model(m: &mut Value) -> Result<Model, Why> {
    match kind(m, "the model")?.as_str() {
        "WordLevel" => {
            let vocab = vocab_of(m)?;
            let unk_name = str_of(m, "unk_token", "the WordLevel model")?;
            let unk =
                *vocab.get(unk_name).ok_or_else(|| format!("the unk_token {unk_name:?} is not in the vocabulary"))?;
            Ok(Model::WordLevel { vocab, unk })
        }
        "BPE" => {
            if m.get("dropout").and_then(Value::as_f64).is_some_and(|d| d > 0.0) {
                return Err("BPE dropout is for training; an inference tokenizer has none".into());
            }
            if bool_of(m, "byte_fallback") {
                return Err("BPE byte_fallback is not supported".into());
            }
            let vocab = vocab_of(m)?;
            let text = |k: &str| m.get(k).and_then(Value::as_str).unwrap_or("").to_string();
            let (prefix, suffix) = (text("continuing_subword_prefix"), text("end_of_word_suffix"));
            let unk = match m.get("unk_token").and_then(Value::as_str) {
                Some(u) => Some(*vocab.get(u).ok_or_else(|| format!("the unk_token {u:?} is not in the vocabulary"))?),
                None => None,
            };
            let list = field(m, "merges", "the BPE model")?.as_array().ok_or("the BPE merges are not a list")?;
            let mut merges = HashMap::with_capacity(list.len());
            let mut merged = String::new();
            for (rank, e) in list.iter().enumerate() {
                let (a, b) = match e {
                    Value::String(s) => s.split_once(' ').ok_or_else(|| format!("merge {s:?} is not \"a b\""))?,
                    Value::Array(v) if v.len() == 2 => match (v[0].as_str(), v[1].as_str()) {
                        (Some(a), Some(b)) => (a, b),
                        _ => return Err(format!("merge {e} is not two strings")),
                    },
                    _ => return Err(format!("merge {e} is not \"a b\" or [a, b]")),
                };
                let id = |t: &str| {
                    vocab.get(t).copied().ok_or_else(|| format!("merge {a:?} {b:?}: {t:?} is not in the vocabulary"))
                };
                merged.clear();
                merged.push_str(a);
                merged.push_str(b.strip_prefix(prefix.as_str()).unwrap_or(b));
                merges.insert((id(a)?, id(b)?), (rank as u32, id(&merged)?));
            }
            Ok(Model::Bpe {
                vocab,
                merges,
                unk,
                fuse_unk: bool_of(m, "fuse_unk"),
                prefix,
                suffix,
                ignore_merges: bool_of(m, "ignore_merges"),
            })
        }
        other => Err(format!("model type {other} is not supported (BPE and WordLevel are)")),
    }
}

fn parse_norm(n: &Value, out: &mut Vec<Norm>) -> Result<(), Why> {
    match kind(n, "the normalizer")?.as_str() {
        "Sequence" => {
            for m in field(n, "normalizers", "a normalizer Sequence")?.as_array().ok_or("normalizers is not a list")? {
                parse_norm(m, out)?;
            }
        }
        "NFC" => out.push(Norm::Nfc),
        "Lowercase" => out.push(Norm::Lowercase),
        "Replace" => {
            let pat = field(n, "pattern", "a Replace normalizer")?;
            let pattern = if let Some(s) = pat.get("String").and_then(Value::as_str) {
                Pattern::Literal(s.to_string())
            } else if let Some(r) = pat.get("Regex").and_then(Value::as_str) {
                parse_pattern(r)?
            } else {
                return Err(format!("Replace pattern {pat} is neither String nor Regex"));
            };
            out.push(Norm::Replace { pattern, content: str_of(n, "content", "a Replace normalizer")?.to_string() });
        }
        other => return Err(format!("normalizer {other} is not supported (NFC, Lowercase, Replace are)")),
    }
    Ok(())
}

/// `\s+`, or `[...]` / `[...]+` of literal characters and ranges.
fn parse_pattern(r: &str) -> Result<Pattern, Why> {
    if r == r"\s+" {
        return Ok(Pattern::Spaces);
    }
    let unsupported = || format!("Replace regex {r:?} is not supported (\\s+ and character classes are)");
    let (body, repeat) = match r.strip_suffix('+') {
        Some(b) => (b, true),
        None => (r, false),
    };
    let body = body.strip_prefix('[').and_then(|b| b.strip_suffix(']')).ok_or_else(unsupported)?;
    let chars: Vec<char> = body.chars().collect();
    if chars.is_empty() || chars[0] == '^' || chars.iter().any(|&c| matches!(c, '\\' | '[' | ']')) {
        return Err(unsupported());
    }
    let mut ranges = vec![];
    let mut i = 0;
    while i < chars.len() {
        if i + 2 < chars.len() && chars[i + 1] == '-' {
            ranges.push((chars[i], chars[i + 2]));
            i += 3;
        } else {
            ranges.push((chars[i], chars[i]));
            i += 1;
        }
    }
    Ok(Pattern::Class { ranges, repeat })
}

fn replace(s: &str, p: &Pattern, content: &str) -> String {
    let in_class = |c: char| match p {
        Pattern::Spaces => is_space(c),
        Pattern::Class { ranges, .. } => ranges.iter().any(|&(a, b)| a <= c && c <= b),
        Pattern::Literal(_) => false,
    };
    match p {
        Pattern::Literal(l) if l.is_empty() => s.to_string(),
        Pattern::Literal(l) => s.replace(l.as_str(), content),
        Pattern::Spaces | Pattern::Class { repeat: true, .. } => {
            let mut out = String::with_capacity(s.len());
            let mut in_run = false;
            for c in s.chars() {
                if in_class(c) {
                    if !in_run {
                        out.push_str(content);
                    }
                    in_run = true;
                } else {
                    out.push(c);
                    in_run = false;
                }
            }
            out
        }
        Pattern::Class { .. } => s.chars().fold(String::with_capacity(s.len()), |mut out, c| {
            if in_class(c) {
                out.push_str(content);
            } else {
                out.push(c);
            }
            out
        }),
    }
}

fn parse_pre(n: &Value, out: &mut Vec<Pre>) -> Result<(), Why> {
    match kind(n, "the pre_tokenizer")?.as_str() {
        "Sequence" => {
            for m in field(n, "pretokenizers", "a pre_tokenizer Sequence")?
                .as_array()
                .ok_or("pretokenizers is not a list")?
            {
                parse_pre(m, out)?;
            }
        }
        "Split" => {
            let pat = field(n, "pattern", "a Split pre_tokenizer")?;
            let regex = pat.get("Regex").and_then(Value::as_str);
            let behavior = str_of(n, "behavior", "a Split pre_tokenizer")?;
            if regex != Some(CLIP_PATTERN) || behavior != "Removed" || !bool_of(n, "invert") {
                return Err(format!(
                    "Split pre_tokenizer {pat} ({behavior}, invert {}) is not supported (CLIP's is)",
                    bool_of(n, "invert")
                ));
            }
            out.push(Pre::ClipSplit);
        }
        "ByteLevel" => {
            if bool_of(n, "add_prefix_space") || n.get("use_regex").and_then(Value::as_bool).unwrap_or(true) {
                return Err(
                    "ByteLevel pre_tokenizer: only add_prefix_space false and use_regex false are supported".into()
                );
            }
            out.push(Pre::ByteLevel);
        }
        "Whitespace" => out.push(Pre::Whitespace),
        "WhitespaceSplit" => out.push(Pre::WhitespaceSplit),
        other => return Err(format!("pre_tokenizer {other} is not supported (Split, ByteLevel, Whitespace are)")),
    }
    Ok(())
}

fn parse_post(n: &Value) -> Result<Vec<Piece>, Why> {
    match kind(n, "the post_processor")?.as_str() {
        "TemplateProcessing" => {
            let specials = field(n, "special_tokens", "TemplateProcessing")?;
            let single =
                field(n, "single", "TemplateProcessing")?.as_array().ok_or("its single template is not a list")?;
            let mut out = vec![];
            for item in single {
                if let Some(s) = item.get("SpecialToken") {
                    let name = str_of(s, "id", "a SpecialToken")?;
                    let ids = field(specials, name, "special_tokens")?
                        .get("ids")
                        .and_then(Value::as_array)
                        .ok_or_else(|| format!("special token {name:?} has no ids"))?;
                    out.push(Piece::Ids(ids.iter().map(|i| id_of(i, name)).collect::<Result<_, _>>()?));
                } else if let Some(s) = item.get("Sequence") {
                    if str_of(s, "id", "a Sequence")? != "A" {
                        return Err("the single template may only hold sequence A".into());
                    }
                    out.push(Piece::Sequence);
                } else {
                    return Err(format!("template item {item} is not supported"));
                }
            }
            Ok(out)
        }
        t @ ("RobertaProcessing" | "BertProcessing") => {
            let tok = |k: &str| -> Result<u32, Why> {
                let v = field(n, k, t)?
                    .as_array()
                    .filter(|a| a.len() == 2)
                    .ok_or_else(|| format!("{t}: {k} is not [token, id]"))?;
                id_of(&v[1], k)
            };
            Ok(vec![Piece::Ids(vec![tok("cls")?]), Piece::Sequence, Piece::Ids(vec![tok("sep")?])])
        }
        other => Err(format!("post_processor {other} is not supported (TemplateProcessing, Roberta, Bert are)")),
    }
}

enum Seg<'a> {
    Text(&'a str),
    Token(u32),
}

/// `s` cut at the added tokens, leftmost first, the longest at a position.
fn split_added<'a>(s: &'a str, added: &[(String, u32)]) -> Vec<Seg<'a>> {
    if added.is_empty() {
        return vec![Seg::Text(s)];
    }
    let mut out = vec![];
    let (mut start, mut i) = (0, 0);
    while i < s.len() {
        let hit = added.iter().filter(|(t, _)| s[i..].starts_with(t.as_str())).max_by_key(|(t, _)| t.len());
        match hit {
            Some((t, id)) => {
                if start < i {
                    out.push(Seg::Text(&s[start..i]));
                }
                out.push(Seg::Token(*id));
                i += t.len();
                start = i;
            }
            None => i += s[i..].chars().next().map_or(1, char::len_utf8),
        }
    }
    if start < s.len() {
        out.push(Seg::Text(&s[start..]));
    }
    out
}

/// The non-overlapping matches of a pattern, scanning left to right (`at` gives the length of the
/// match starting at the beginning of its argument, if any).
fn matches(s: &str, at: fn(&str) -> Option<usize>) -> Vec<String> {
    let mut out = vec![];
    let mut i = 0;
    while i < s.len() {
        match at(&s[i..]) {
            Some(n) if n > 0 => {
                out.push(s[i..i + n].to_string());
                i += n;
            }
            _ => i += s[i..].chars().next().map_or(1, char::len_utf8),
        }
    }
    out
}

/// The words of a note as the word-level tokenizer sees them: lower-cased (per character) and
/// split by `\w+|[^\w\s]+` (its normaliser and pre-tokenizer, for training it).
pub fn words(note: &str) -> Vec<String> {
    let lower: String = note.chars().flat_map(char::to_lowercase).collect();
    matches(&lower, word_or_punct)
}

/// The byte length of the leading run of characters satisfying `f`.
fn run(s: &str, f: impl Fn(char) -> bool) -> usize {
    s.char_indices().find(|&(_, c)| !f(c)).map_or(s.len(), |(i, _)| i)
}

/// CLIP_PATTERN at the start of `s` (alternatives in the pattern's order).
fn clip_match(s: &str) -> Option<usize> {
    const LITERALS: [&str; 9] = ["<|startoftext|>", "<|endoftext|>", "'s", "'t", "'re", "'ve", "'m", "'ll", "'d"];
    if let Some(l) = LITERALS.iter().find(|l| s.starts_with(*l)) {
        return Some(l.len());
    }
    let c = s.chars().next()?;
    if is_letter(c) {
        Some(run(s, is_letter))
    } else if is_number(c) {
        Some(c.len_utf8())
    } else if !is_space(c) {
        Some(run(s, |c| !is_space(c) && !is_letter(c) && !is_number(c)))
    } else {
        None
    }
}

/// `\w+|[^\w\s]+` at the start of `s`.
fn word_or_punct(s: &str) -> Option<usize> {
    let c = s.chars().next()?;
    if is_word(c) {
        Some(run(s, is_word))
    } else if !is_space(c) {
        Some(run(s, |c| !is_word(c) && !is_space(c)))
    } else {
        None
    }
}

/// GPT-2's byte → character table: printable Latin-1 bytes map to themselves, the others to
/// U+0100 onwards in byte order.
fn byte_char(b: u8) -> char {
    let printable = |b: u8| (b'!'..=b'~').contains(&b) || (0xA1..=0xAC).contains(&b) || (0xAE..=0xFF).contains(&b);
    if printable(b) {
        return b as char;
    }
    let k = (0..b).filter(|&x| !printable(x)).count() as u32;
    char::from_u32(256 + k).expect("U+0100..U+0143 are characters")
}

#[cfg(test)]
mod tests {
    use super::nfc;

    /// With the `nfc` feature a decomposed accent is composed; without it (reclmis-infer) it is
    /// refused by name. Text already in NFC passes either way. (CI runs the lib tests both ways.)
    #[test]
    fn nfc_composes_or_refuses() {
        assert_eq!(nfc("é lung, naïve 2".into()).unwrap(), "é lung, naïve 2");
        let decomposed = "e\u{301} lung".to_string();
        #[cfg(feature = "nfc")]
        assert_eq!(nfc(decomposed).unwrap(), "\u{e9} lung");
        #[cfg(not(feature = "nfc"))]
        assert!(nfc(decomposed).unwrap_err().contains("NFC"));
    }
}
