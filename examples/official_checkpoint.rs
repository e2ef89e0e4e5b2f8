//! A checkpoint of the official preset with PyTorch-default random weights, for measuring
//! deployment (BENCHMARKS.md, "reclmis-infer"): `cargo run --release --example official_checkpoint
//! -- OUT_DIR TOKENIZER_JSON` writes OUT_DIR/train.safetensors and OUT_DIR/tokenizer.json, as
//! `reclmis train` lays them out; `reclmis export` then makes the inference checkpoint.

fn main() -> reclmis::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let (out, tok) = match (args.get(1), args.get(2)) {
        (Some(o), Some(t)) => (std::path::PathBuf::from(o), std::path::PathBuf::from(t)),
        _ => return Err(reclmis::Error::Config("usage: official_checkpoint OUT_DIR TOKENIZER_JSON".into())),
    };
    std::fs::create_dir_all(&out).map_err(|e| reclmis::Error::data(&out, e))?;
    let json = std::fs::read(&tok).map_err(|e| reclmis::Error::data(&tok, e))?;
    let cfg = reclmis::model::Config::preset("official")?;
    let t = reclmis::text::NoteTokenizer::from_bytes(&json, cfg.token_len)?;
    let m = reclmis::model::RecLmis::new(cfg, &reclmis::Device::Cpu, 0)?;
    let (hash, vocab) = reclmis::text::NoteTokenizer::identity(&json, t.vocab_size());
    let mut meta = m.cfg.to_metadata();
    meta.push(("tokenizer_hash".into(), hash));
    meta.push(("tokenizer_vocab".into(), vocab.to_string()));
    reclmis::checkpoint::save_with(&m.params, &meta, &out.join("train.safetensors"))?;
    reclmis::files::write_atomic(&out.join("tokenizer.json"), &json)?;
    println!("wrote {}", out.join("train.safetensors").display());
    Ok(())
}
