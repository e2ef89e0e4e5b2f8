//! Our tokenizer.json pipeline (src/text/pipeline.rs) against the `tokenizers` crate it replaces:
//! the official fixture's CLIP tokenizer on every text of its verification record, and random
//! notes (words, digits, punctuation, quotes, apostrophes, accents, other scripts, special
//! tokens, odd whitespace) on CLIP and on word-level tokenizers, ids and vocabulary sizes equal.

mod common;

use proptest::prelude::*;
use reclmis::text::pipeline::Pipeline;
use reclmis::text::NoteTokenizer;
use std::sync::OnceLock;

fn clip_json() -> &'static str {
    static J: OnceLock<String> = OnceLock::new();
    J.get_or_init(|| std::fs::read_to_string(common::fixture::root().join("official_tiny/tokenizer.json")).unwrap())
}

fn ours(json: &str) -> Pipeline {
    Pipeline::from_json(serde_json::from_str(json).unwrap()).unwrap()
}

/// The crate's tokenizer with the file's truncation and padding off (ours leaves both to `fit`).
fn theirs(json: &str) -> tokenizers::Tokenizer {
    let mut t = tokenizers::Tokenizer::from_bytes(json.as_bytes()).unwrap();
    t.with_truncation(None).unwrap();
    t.with_padding(None);
    t
}

struct Clip {
    ours: Pipeline,
    theirs: tokenizers::Tokenizer,
}

fn clip() -> &'static Clip {
    static C: OnceLock<Clip> = OnceLock::new();
    C.get_or_init(|| Clip { ours: ours(clip_json()), theirs: theirs(clip_json()) })
}

fn same(ours: &Pipeline, theirs: &tokenizers::Tokenizer, note: &str) -> Result<(), TestCaseError> {
    let ids = ours.encode(note).unwrap();
    let enc = theirs.encode(note, true).unwrap();
    prop_assert_eq!(&ids, &enc.get_ids().to_vec(), "note {:?}", note);
    // the token strings too (what `NoteTokenizer::tokens` shows beside per-word weights)
    prop_assert_eq!(ours.names(&ids), enc.get_tokens().to_vec(), "note {:?}", note);
    Ok(())
}

#[test]
fn clip_ids_match_the_verification_record() {
    let check: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(common::fixture::root().join("official_tiny/tokenizer_check.json")).unwrap(),
    )
    .unwrap();
    let tok = NoteTokenizer::from_bytes(clip_json().as_bytes(), 18).unwrap();
    let rows = check["rows"].as_array().unwrap();
    assert!(rows.len() >= 10, "the record has {} rows", rows.len());
    for r in rows {
        let text = r["text"].as_str().unwrap();
        // a row whose official ids differ from tokenizer.json's (HTML entities, ligatures: ftfy)
        // is listed under mismatches with the ids tokenizer.json gives
        let want = match check["mismatches"].as_array().unwrap().iter().find(|m| m["text"] == r["text"]) {
            Some(m) => &m["hf"],
            None => &r["ids"],
        };
        let want: Vec<i32> = want.as_array().unwrap().iter().map(|v| v.as_i64().unwrap() as i32).collect();
        let (ids, valid) = tok.encode(text).unwrap();
        assert_eq!(ids, want, "{text:?}");
        assert_eq!(valid, ids.iter().map(|&i| (i != 0) as i32).collect::<Vec<_>>());
    }
}

#[test]
fn vocabulary_sizes_match() {
    assert_eq!(clip().ours.vocab_size(), clip().theirs.get_vocab_size(true));
    let json = reclmis::text::word_level::train(["Left lung, 2 opacities.", "right LUNG"].iter()).unwrap();
    assert_eq!(ours(&json).vocab_size(), theirs(&json).get_vocab_size(true));
}

/// Notes built from pieces that exercise every branch of both pre-tokenizers and normalisers.
fn note() -> impl Strategy<Value = String> {
    let piece = prop::sample::select(vec![
        "lung",
        "Left",
        "UPPER",
        "opacity",
        "bilateral",
        "x",
        "a",
        "of",
        "the",
        "2",
        "17",
        "3.5",
        "%",
        ",",
        ".",
        "...",
        ";",
        "(",
        ")",
        "-",
        "--",
        "/",
        "'s",
        "'t",
        "'re",
        "'ll",
        "'d",
        "'m",
        "'ve",
        "'",
        "\"",
        "’",
        "‘",
        "“",
        "”",
        "ʼ",
        "é",
        "É",
        "ü",
        "naïve",
        "Ω",
        "σ",
        "Σ",
        "ς",
        "лёгкое",
        "肺",
        "病变",
        "١٢",
        "½",
        "²",
        "ⅷ",
        "e\u{301}",
        "a\u{308}",
        "ﬁ",
        "🫁",
        "😷",
        "<|startoftext|>",
        "<|endoftext|>",
        "<|endof",
        "[PAD]",
        "[UNK]",
        "[SOT]",
        "[EOT]",
        "[pad]",
        "_",
        "__init__",
        "\u{200d}",
        "\u{a0}",
        "\u{2003}",
        "\t",
        "\n",
        " ",
        "  ",
        "İ",
        "ß",
        "ǅ",
        "ﬀ",
        "Å",
        "ñ",
        "\u{2028}",
        "&amp;",
        "<b>",
        "☺",
        "०१२",
        "क्ष",
    ]);
    prop::collection::vec((piece, prop::sample::select(vec!["", " ", "", "\n"])), 0..14)
        .prop_map(|v| v.into_iter().map(|(p, s)| format!("{p}{s}")).collect())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 400, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn clip_ids_match_the_tokenizers_crate(n in note()) {
        same(&clip().ours, &clip().theirs, &n)?;
    }

    /// A word-level tokenizer trained by us (read by the crate from our JSON, so the file is
    /// one Python's tokenizers can load) and one trained by the crate on the same notes: the
    /// same vocabulary and the same ids.
    #[test]
    fn word_level_matches_the_tokenizers_crate(train in prop::collection::vec(note(), 1..6), n in note()) {
        let json = reclmis::text::word_level::train(train.iter()).unwrap();
        let o = ours(&json);
        same(&o, &theirs(&json), &n)?;
        // the crate's own trainer on the same notes gives the same vocabulary
        use tokenizers::models::wordlevel::{WordLevel, WordLevelTrainer};
        use tokenizers::AddedToken;
        let specials: Vec<AddedToken> =
            ["[PAD]", "[UNK]", "[SOT]", "[EOT]"].iter().map(|s| AddedToken::from(*s, true)).collect();
        let mut trainer: tokenizers::models::TrainerWrapper =
            WordLevelTrainer::builder().special_tokens(specials).show_progress(false).build().unwrap().into();
        let mut t = tokenizers::Tokenizer::new(WordLevel::builder().unk_token("[UNK]".into()).build().unwrap());
        t.with_normalizer(Some(tokenizers::normalizers::utils::Lowercase));
        t.with_pre_tokenizer(Some(tokenizers::pre_tokenizers::whitespace::Whitespace {}));
        t.train(&mut trainer, train.iter()).unwrap();
        // a tokenizer.json the crate wrote (what runs trained before our reader existed hold):
        // our reader gives the crate's ids for it too
        let mut t2 = t.clone();
        t2.with_post_processor(Some(
            tokenizers::processors::template::TemplateProcessing::builder()
                .try_single("[SOT] $A [EOT]")
                .unwrap()
                .special_tokens(vec![("[SOT]", 2), ("[EOT]", 3)])
                .build()
                .unwrap(),
        ));
        let written = t2.to_string(false).unwrap();
        same(&ours(&written), &theirs(&written), &n)?;
        let mut want: Vec<(String, u32)> = t.get_vocab(false).into_iter().collect();
        want.sort_by_key(|w| w.1);
        let model: serde_json::Value = serde_json::from_str(&json).unwrap();
        let mut got: Vec<(String, u32)> = model["model"]["vocab"].as_object().unwrap().iter()
            .map(|(k, v)| (k.clone(), v.as_u64().unwrap() as u32)).collect();
        got.sort_by_key(|w| w.1);
        prop_assert_eq!(got, want);
    }
}

#[test]
fn unsupported_components_are_refused_by_name() {
    let mut v: serde_json::Value = serde_json::from_str(clip_json()).unwrap();
    v["normalizer"] = serde_json::json!({"type": "NFKD"});
    let e = NoteTokenizer::from_bytes(v.to_string().as_bytes(), 18).err().unwrap().to_string();
    assert!(e.contains("NFKD"), "{e}");
    let mut v: serde_json::Value = serde_json::from_str(clip_json()).unwrap();
    v["pre_tokenizer"]["pretokenizers"][0]["pattern"]["Regex"] = "\\w+".into();
    let e = NoteTokenizer::from_bytes(v.to_string().as_bytes(), 18).err().unwrap().to_string();
    assert!(e.contains("Split"), "{e}");
    let mut v: serde_json::Value = serde_json::from_str(clip_json()).unwrap();
    v["model"]["type"] = "Unigram".into();
    let e = NoteTokenizer::from_bytes(v.to_string().as_bytes(), 18).err().unwrap().to_string();
    assert!(e.contains("Unigram"), "{e}");
}
