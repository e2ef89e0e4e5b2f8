//! Pretrained CLIP text weights in the Hugging Face layout (fixture `hf_clip_tiny`: a small
//! `CLIPModel` saved by transformers, with the outputs transformers computed): loaded into the
//! text tower, they reproduce `clip_hidden` at every position on cpu and emu, and each wrong
//! mapping (q/k swapped, projection not transposed, a LayerNorm missing) fails. Sizes come from
//! the fixture's config.json.

mod common;
use common::fixture::{self, Fixture};
use reclmis::model::{hf_clip, Config, RecLmis};
use reclmis::{Device, Tensor};
use safetensors::tensor::TensorView;
use safetensors::SafeTensors;
use std::path::{Path, PathBuf};

fn dir() -> PathBuf {
    fixture::root().join("hf_clip_tiny")
}

/// The tiny preset with the text tower (and projection width) the fixture's config.json states.
fn config() -> Config {
    let v: serde_json::Value = serde_json::from_slice(&std::fs::read(dir().join("config.json")).unwrap()).unwrap();
    let t = &v["text_config"];
    let n = |x: &serde_json::Value| x.as_u64().unwrap() as usize;
    let proj = n(&v["projection_dim"]);
    let mut c = Config::preset("tiny").unwrap();
    c.clip_width = n(&t["hidden_size"]);
    c.clip_layers = n(&t["num_hidden_layers"]);
    c.clip_heads = n(&t["num_attention_heads"]);
    c.vocab_size = n(&t["vocab_size"]);
    c.context_length = n(&t["max_position_embeddings"]);
    c.d_model = proj;
    c.unet_widths[4] = proj;
    c
}

/// Loads `weights` into a fresh model on `kind` and returns the largest per-position error of
/// `clip_hidden` against transformers' f64 output, relative to that position's largest value.
fn clip_error(weights: &Path, kind: &str) -> reclmis::Result<f64> {
    let dev = common::device(kind);
    let mut m = RecLmis::new(config(), &dev, 0)?;
    let w = hf_clip::load_text_weights(&mut m, weights)?;
    assert!(w.ignored_vision > 0 && w.had_logit_scale, "{w:?}");
    let case = Fixture::open_file(&dir().join("case.safetensors"));
    let (s, ids) = case.get("ids");
    let (_, mask) = case.get("attention_mask");
    let i32s = |v: &[f64]| v.iter().map(|&x| x as i32).collect::<Vec<_>>();
    let h =
        m.text_hidden(&Tensor::from_vec_i32(i32s(&ids), &s, &dev)?, &Tensor::from_vec_i32(i32s(&mask), &s, &dev)?)?;
    let (ws, want) = case.get("clip_hidden_f64");
    assert_eq!(h.shape(), ws.as_slice());
    let got = h.to_vec()?;
    let width = ws[2];
    let mut worst = 0.0f64;
    for (g, w) in got.chunks(width).zip(want.chunks(width)) {
        let scale = w.iter().fold(1e-12f64, |a, x| a.max(x.abs()));
        let e = g.iter().zip(w).fold(0.0f64, |a, (&g, &w)| a.max((g as f64 - w).abs()));
        worst = worst.max(e / scale);
    }
    eprintln!("{kind} {}: clip_hidden worst per-position relative error {worst:.2e}", weights.display());
    Ok(worst)
}

// f32 against transformers' f64: the fixture README measures f32 and f64 outputs ~2e-6 apart
const TOL: f64 = 1e-5;

#[test]
fn clip_hf_weights_reproduce_transformers_cpu() {
    let e = clip_error(&dir().join("model.safetensors"), "cpu").unwrap();
    assert!(e <= TOL, "clip_hidden: largest per-position relative error {e:.2e}");
}

#[test]
fn clip_hf_weights_reproduce_transformers_emu() {
    let e = clip_error(&dir().join("model.safetensors"), "emu").unwrap();
    assert!(e <= TOL, "clip_hidden: largest per-position relative error {e:.2e}");
}

/// A copy of the fixture's folder whose model.safetensors went through `edit` (name, shape,
/// f32 values) -> replacement tensors.
fn mutated(tag: &str, edit: impl Fn(&str, &[usize], Vec<f32>) -> Vec<(String, Vec<usize>, Vec<f32>)>) -> PathBuf {
    let out = std::env::temp_dir().join(format!("reclmis-clip-{tag}-{}", std::process::id()));
    std::fs::create_dir_all(&out).unwrap();
    std::fs::copy(dir().join("config.json"), out.join("config.json")).unwrap();
    let bytes = std::fs::read(dir().join("model.safetensors")).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let mut tensors = vec![];
    for (name, v) in st.tensors() {
        assert_eq!(v.dtype(), safetensors::Dtype::F32);
        let vals: Vec<f32> = v.data().chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect();
        tensors.extend(edit(&name, v.shape(), vals));
    }
    let data: Vec<(String, Vec<usize>, Vec<u8>)> =
        tensors.into_iter().map(|(n, s, v)| (n, s, v.iter().flat_map(|x| x.to_le_bytes()).collect())).collect();
    let views: Vec<(String, TensorView)> = data
        .iter()
        .map(|(n, s, b)| (n.clone(), TensorView::new(safetensors::Dtype::F32, s.clone(), b).unwrap()))
        .collect();
    safetensors::serialize_to_file(views, None, &out.join("model.safetensors")).unwrap();
    out.join("model.safetensors")
}

#[test]
fn clip_wrong_mappings_fail() {
    let keep = |n: &str, s: &[usize], v: Vec<f32>| vec![(n.to_string(), s.to_vec(), v)];
    // the unchanged round trip passes: the mutations below are what fails
    let same = mutated("same", keep);
    assert!(clip_error(&same, "cpu").unwrap() <= TOL);

    let swap = mutated("qk", |n, s, v| {
        let n = if n.contains("q_proj") {
            n.replace("q_proj", "k_proj")
        } else if n.contains("k_proj") {
            n.replace("k_proj", "q_proj")
        } else {
            n.to_string()
        };
        vec![(n, s.to_vec(), v)]
    });
    let e = clip_error(&swap, "cpu").unwrap();
    assert!(e > 1e-3, "q/k swapped must fail the comparison, error {e:.2e}");

    let untransposed = mutated("proj", |n, s, v| {
        if n != "text_projection.weight" {
            return vec![(n.to_string(), s.to_vec(), v)];
        }
        let (r, c) = (s[0], s[1]);
        vec![(n.to_string(), vec![c, r], (0..r * c).map(|i| v[(i % r) * c + i / r]).collect())]
    });
    let e = clip_error(&untransposed, "cpu").unwrap();
    assert!(e > 1e-3, "a projection that is not transposed must fail, error {e:.2e}");

    // LayerNorm missing from the file: an error naming it (the model's own 1/0 LayerNorm would
    // silently give other numbers, which the fixture's perturbed LayerNorms would show)
    let no_ln = mutated("ln", |n, s, v| if n.contains("final_layer_norm") { vec![] } else { keep(n, s, v) });
    let e = clip_error(&no_ln, "cpu").unwrap_err().to_string();
    assert!(e.contains("clip.ln_final.weight"), "{e}");
    let no_ln1 = mutated("ln1", |n, s, v| if n.contains("layers.1.layer_norm1") { vec![] } else { keep(n, s, v) });
    let e = clip_error(&no_ln1, "cpu").unwrap_err().to_string();
    assert!(e.contains("resblocks.1.ln_1"), "{e}");
}

#[test]
fn clip_config_mismatches_are_named() {
    let mut c = config();
    c.clip_layers -= 1;
    let mut m = RecLmis::new(c, &Device::Cpu, 0).unwrap();
    let e = hf_clip::load_text_weights(&mut m, &dir().join("model.safetensors")).unwrap_err().to_string();
    assert!(e.contains("config.json") && e.contains("layers"), "{e}");
    // a projection width the model does not have: the shape error names the tensor
    let mut c = config();
    c.d_model *= 2;
    c.unet_widths[4] = c.d_model;
    let mut m = RecLmis::new(c, &Device::Cpu, 0).unwrap();
    let e = hf_clip::load_text_weights(&mut m, &dir().join("model.safetensors")).unwrap_err().to_string();
    assert!(e.contains("clip.text_projection"), "{e}");
}

/// `train --preset tiny --text-weights`: the tower starts from the file and stays frozen (the
/// checkpoint holds the file's values), the weights' hash is a run setting, and `--resume` needs
/// no `--text-weights` but refuses other ones.
#[test]
fn clip_text_weights_train_frozen_and_resume() {
    use reclmis::pipeline::train::{train, TrainOpts};
    let root = std::env::temp_dir().join(format!("reclmis-clip-train-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&root);
    let data = root.join("data");
    let so = reclmis::data::write::SynthOpts { train: 8, val: 4, test: 2, size: 32, seed: 2, ..Default::default() };
    reclmis::data::write::write(&data, &so).unwrap();
    let weights = dir().join("model.safetensors");
    let run = root.join("run");
    let o = TrainOpts {
        text_weights: Some(weights.clone()),
        model: Default::default(),
        schedule: reclmis::optim::schedule::Schedule::Cosine,
        counterfactual_rate: 0.0,
        data: data.clone(),
        preset: "tiny".into(),
        epochs: 2,
        batch: 4,
        accumulate: 1,
        precision: reclmis::autograd::Precision::F32,
        lr: 1e-3,
        clip_grad_norm: None,
        seed: 3,
        out: run.clone(),
        patience: 10,
        max_minutes: 0.0,
        tokenizer: Some(fixture::root().join("official_tiny/tokenizer.json")),
        resume: false,
        overwrite: false,
        accept_changes: false,
        stop_after: 1,
        augment: false,
        official_flips: false,
        progress: false,
    };
    train(&o, &Device::Cpu).unwrap();
    let last = std::fs::read(run.join("last.safetensors")).unwrap();
    let ck = SafeTensors::deserialize(&last).unwrap();
    let hf_bytes = std::fs::read(&weights).unwrap();
    let hf = SafeTensors::deserialize(&hf_bytes).unwrap();
    for (ours, theirs) in [
        ("clip.ln_final.weight", "text_model.final_layer_norm.weight"),
        ("clip.token_embedding.weight", "text_model.embeddings.token_embedding.weight"),
        ("clip.transformer.resblocks.1.mlp.c_proj.bias", "text_model.encoder.layers.1.mlp.fc2.bias"),
        ("clip.logit_scale", "logit_scale"),
    ] {
        assert_eq!(ck.tensor(ours).unwrap().data(), hf.tensor(theirs).unwrap().data(), "{ours} after training");
    }
    // resume: without --text-weights (the state has the tower), then with other weights: refused
    let more = TrainOpts { resume: true, text_weights: None, stop_after: 0, ..o.clone() };
    train(&more, &Device::Cpu).unwrap();
    let other = mutated("other", |n, s, mut v| {
        if n == "logit_scale" {
            v[0] += 0.5;
        }
        vec![(n.to_string(), s.to_vec(), v)]
    });
    let again = TrainOpts { resume: true, epochs: 3, text_weights: Some(other), ..o.clone() };
    let e = train(&again, &Device::Cpu).err().expect("other text weights must be refused").to_string();
    assert!(e.contains("text_weights"), "{e}");
    let _ = std::fs::remove_dir_all(&root);
}
