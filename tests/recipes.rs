//! `train --recipe qata|mosmed`: the official configuration's values reach the run (model
//! settings, batch, learning rate, schedule, seed), explicit flags override them, the checkpoint
//! records the whole configuration, and eval/infer rebuild the model from it.

use reclmis::data::write::{write, SynthOpts};
use reclmis::optim::schedule::Schedule;
use reclmis::pipeline::recipe::{ModelOptions, Recipe};
use reclmis::Device;
use std::path::{Path, PathBuf};
use std::process::Command;

fn tmp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("reclmis-recipe-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn meta(path: &Path) -> std::collections::HashMap<String, String> {
    reclmis::checkpoint::read_metadata(path).unwrap()
}

#[test]
fn recipes_hold_the_official_configuration() {
    let q = Recipe::get("qata").unwrap();
    assert_eq!((q.batch, q.epochs, q.patience, q.seed, q.schedule), (32, 2000, 100, 3407, Schedule::Restarts));
    assert_eq!(q.model.rec_layers, Some(4));
    let m = Recipe::get("mosmed").unwrap();
    assert_eq!((m.batch, m.epochs, m.patience, m.schedule), (20, 400, 30, Schedule::Exp));
    assert_eq!((m.model.rec_layers, m.model.img_mask_rate, m.model.score_dropout), (Some(3), Some(0.3), Some(0.5)));
    assert!(Recipe::get("kvasir").unwrap_err().to_string().contains("qata"));
    // flags override the recipe value by value
    let over = ModelOptions { rec_layers: Some(2), ..Default::default() };
    let both = m.model.overridden_by(&over);
    assert_eq!((both.rec_layers, both.score_dropout), (Some(2), Some(0.5)));
}

/// The CLI with `--recipe mosmed` and a few overriding flags, on the small preset so that it
/// trains in seconds: the run's state records the recipe's values where no flag was given.
#[test]
fn recipe_reaches_the_run_and_flags_override_it() {
    let root = tmp("cli");
    let data = root.join("data");
    write(&data, &SynthOpts { train: 8, val: 4, test: 4, size: 32, seed: 3, ..Default::default() }).unwrap();
    let run = root.join("run");
    let out = Command::new(env!("CARGO_BIN_EXE_reclmis"))
        .args(["train", "--recipe", "mosmed", "--preset", "small", "--epochs", "1", "--batch", "4"])
        .args(["--device", "cpu", "--data"])
        .arg(&data)
        .arg("--out")
        .arg(&run)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let m = meta(&run.join("train_state.safetensors"));
    let cfg: reclmis::model::Config = serde_json::from_str(&m["setting.config"]).unwrap();
    assert_eq!(cfg.name, "small", "--preset overrides the recipe's official preset");
    assert_eq!((cfg.rec_layers, cfg.img_mask_rate, cfg.text_mask_rate, cfg.score_dropout), (3, 0.3, 0.3, 0.5));
    assert_eq!(m["setting.schedule"], "exp");
    assert_eq!(m["setting.batch"], "4", "--batch overrides the recipe's 20");
    assert_eq!(m["setting.seed"], "3407");
    assert_eq!(m["setting.lr"], format!("{:e}", 3e-4f32));
    // eval/infer rebuild the model from the checkpoint: K = 3 reconstruction layers, not small's 1
    let (model, _) = reclmis::pipeline::load_run(&run.join("best.safetensors"), None, &Device::Cpu).unwrap();
    assert_eq!(model.cfg, cfg);
    let layers = |stack: &str| {
        (0..)
            .take_while(|i| model.params.ids().any(|id| model.params.name(id).starts_with(&format!("{stack}.{i}."))))
            .count()
    };
    assert_eq!(layers("rec_img_trans1.decoder1.decoder_layers"), 3);
    assert_eq!(layers("rec_text_trans1.decoder2.decoder_layers"), 3);
    let _ = std::fs::remove_dir_all(&root);
}

/// A configuration in a checkpoint's metadata is user data: out-of-range values are errors.
#[test]
fn recorded_configuration_is_validated() {
    let mut c = reclmis::model::Config::preset("small").unwrap();
    let mut m = std::collections::HashMap::new();
    for (k, v) in c.to_metadata() {
        m.insert(k, v);
    }
    assert_eq!(reclmis::model::Config::from_metadata(&m).unwrap(), c);
    c.score_dropout = 1.0;
    m.insert("config".into(), serde_json::to_string(&c).unwrap());
    assert!(reclmis::model::Config::from_metadata(&m).unwrap_err().to_string().contains("score dropout"));
    c.score_dropout = 0.0;
    c.unet_widths[0] = 1 << 30;
    m.insert("config".into(), serde_json::to_string(&c).unwrap());
    assert!(reclmis::model::Config::from_metadata(&m).unwrap_err().to_string().contains("widths"));
    m.insert("config".into(), "{\"name\": 3}".into());
    assert!(reclmis::model::Config::from_metadata(&m).unwrap_err().to_string().contains("not a configuration"));
}

/// The official fixture's weights in a model of configuration `tweak(fixture's)`, module
/// dropout off.
fn fixture_model(tweak: impl Fn(&mut reclmis::model::Config)) -> reclmis::model::RecLmis {
    let pth = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/official_tiny/checkpoint.pth");
    let pth = std::env::var_os("RECLMIS_FIXTURES")
        .map(|r| PathBuf::from(r).join("official_tiny/checkpoint.pth"))
        .unwrap_or(pth);
    let (base, _) = reclmis::pipeline::import_pth(&pth, None, None, &Device::Cpu).unwrap();
    let mut cfg = reclmis::model::Config { dropout: 0.0, ..base.cfg.clone() };
    tweak(&mut cfg);
    let mut m = reclmis::model::RecLmis::new(cfg, &Device::Cpu, 0).unwrap();
    for id in base.params.ids() {
        let src = base.params.value(id);
        let dst = m.params.id(base.params.name(id)).unwrap();
        m.params.set(dst, src.clone()).unwrap();
    }
    m
}

/// Two images with their masks and notes of 4 and 3 valid tokens (padding to 6).
fn two_images((h, w): (usize, usize)) -> reclmis::model::Batch {
    reclmis::model::Batch {
        images: reclmis::Tensor::from_vec(
            (0..2 * 3 * h * w).map(|i| (i % 17) as f32 / 17.0).collect(),
            &[2, 3, h, w],
            &Device::Cpu,
        )
        .unwrap(),
        ids: reclmis::Tensor::from_vec_i32(
            vec![49406, 320, 1125, 49407, 0, 0, 49406, 530, 49407, 0, 0, 0],
            &[2, 6],
            &Device::Cpu,
        )
        .unwrap(),
        valid: reclmis::Tensor::from_vec_i32(vec![1, 1, 1, 1, 0, 0, 1, 1, 1, 0, 0, 0], &[2, 6], &Device::Cpu).unwrap(),
        masks: Some(
            reclmis::Tensor::from_vec(
                (0..2 * h * w).map(|i| (i % 3 == 0) as u8 as f32).collect(),
                &[2, h, w],
                &Device::Cpu,
            )
            .unwrap(),
        ),
        text_hidden: None,
    }
}

fn train_forward(m: &reclmis::model::RecLmis, b: &reclmis::model::Batch) -> reclmis::model::TrainOut {
    let g = reclmis::autograd::Graph::train().with_dropout_seed(9);
    m.forward_train(&g, b, None, &mut reclmis::testing::Rng::new(1)).unwrap()
}

/// The score dropout acts in training only, and only on the scoring MLPs' inputs: with the
/// fixture's weights, the training forward's W_poi changes while the evaluation is unchanged.
#[test]
fn score_dropout_acts_in_training_only() {
    let with = |p: f32| fixture_model(|c| c.score_dropout = p);
    let (off, on) = (with(0.0), with(0.5));
    let b = two_images(off.cfg.img_size);
    let w_poi = |m: &reclmis::model::RecLmis| train_forward(m, &b).record["W_poi"].tensor().to_vec().unwrap();
    assert_ne!(w_poi(&off), w_poi(&on), "score dropout must change the training forward's W_poi");
    // random masking: the same draws of the rng give other positions than W-guided masking
    let masks = |m: &reclmis::model::RecLmis| train_forward(m, &b).masks.img;
    let random = fixture_model(|c| c.random_masking = true);
    assert_ne!(masks(&off), masks(&random), "random masking must not follow W");
    let probs = |m: &reclmis::model::RecLmis| m.forward_eval(&b).unwrap()["probs"].tensor().to_vec().unwrap();
    assert_eq!(probs(&off), probs(&on), "and leave evaluation alone");
}

/// `--weighted-reconstruction`: each reconstruction loss is Σ_b Σ_t W_bt · mean_d (x − y)² / B,
/// recomputed here in f64 from the recorded outputs, targets and weights (W_woi for the text,
/// W_poi for the image tokens); and it is not the plain mean.
#[test]
fn weighted_reconstruction_weights_each_token_by_w() {
    let plain = fixture_model(|_| {});
    let weighted = fixture_model(|c| c.weighted_reconstruction = true);
    let b = two_images(plain.cfg.img_size);
    let out = train_forward(&weighted, &b);
    let r = &out.record;
    let v = |k: &str| r[k].tensor().to_vec().unwrap();
    let expect = |x: &[f32], y: &[f32], w: &[f32], d: usize| -> f64 {
        let bsz = 2;
        let mut s = 0.0f64;
        for (t, wt) in w.iter().enumerate() {
            let e: f64 = (0..d).map(|k| (x[t * d + k] as f64 - y[t * d + k] as f64).powi(2)).sum::<f64>() / d as f64;
            s += *wt as f64 * e;
        }
        s / bsz as f64
    };
    let dt = r["clip_hidden"].shape()[2];
    let want_text = expect(&v("clr_out"), &v("clip_hidden"), &v("W_woi"), dt);
    let di = r["interact_img"].shape()[2];
    let want_img = expect(&v("cvr_out"), &v("interact_img"), &v("W_poi"), di);
    // f32 sums over ≤ 2·36·64 terms of one sign: a relative 1e-5 is ~100 roundings of 2^-24 each
    for (k, want) in [("text_rec", want_text), ("img_rec", want_img)] {
        let got = out.losses[k] as f64;
        assert!((got - want).abs() <= 1e-5 * want.abs(), "{k}: {got} vs {want}");
    }
    let plain_out = train_forward(&plain, &b);
    assert!((plain_out.losses["text_rec"] - out.losses["text_rec"]).abs() > 1e-6, "weighting must act");
}

/// `--no-condition` (w/o CI): W_poi and W_woi are uniform over the valid tokens, so the masks are
/// drawn at random and the losses differ from the conditioned model's; evaluation's mask is the
/// same computation.
#[test]
fn no_condition_makes_w_uniform() {
    let cond = fixture_model(|_| {});
    let none = fixture_model(|c| c.no_condition = true);
    let b = two_images(cond.cfg.img_size);
    let out = train_forward(&none, &b);
    let poi = out.record["W_poi"].tensor().to_vec().unwrap();
    let n = poi.len() / 2;
    assert!(poi.iter().all(|&w| (w - 1.0 / n as f32).abs() < 1e-7), "W_poi uniform");
    let woi = out.record["W_woi"].tensor().to_vec().unwrap();
    assert_eq!(woi[..6], [0.25, 0.25, 0.25, 0.25, 0.0, 0.0]);
    assert!((woi[6] - 1.0 / 3.0).abs() < 1e-7 && woi[9..] == [0.0; 3]);
    assert!((train_forward(&cond, &b).losses["ccl"] - out.losses["ccl"]).abs() > 1e-6, "the CCL pools evenly");
    let probs = |m: &reclmis::model::RecLmis| m.forward_eval(&b).unwrap()["probs"].tensor().to_vec().unwrap();
    assert_eq!(probs(&cond), probs(&none), "the inference path has no W");
}

#[test]
fn metadata_fields_must_agree_with_the_configuration() {
    let c = reclmis::model::Config::preset("small").unwrap();
    let mut m: std::collections::HashMap<String, String> = c.to_metadata().into_iter().collect();
    m.insert("img_h".into(), "128".into());
    let e = reclmis::model::Config::from_metadata(&m).unwrap_err().to_string();
    assert!(e.contains("img_h") && e.contains("128"), "{e}");
}

/// The ablation flags reach the recorded configuration.
#[test]
fn ablation_flags_are_recorded_and_act() {
    let root = tmp("ablate");
    let data = root.join("data");
    write(&data, &SynthOpts { train: 4, val: 2, test: 2, size: 32, seed: 4, ..Default::default() }).unwrap();
    let run = root.join("run");
    let out = Command::new(env!("CARGO_BIN_EXE_reclmis"))
        .args(["train", "--epochs", "1", "--batch", "4", "--device", "cpu", "--random-masking"])
        .args(["--condition-on-logits", "--bidirectional-reconstruction", "--loss-weights", "5,0,1,0"])
        .args(["--weighted-reconstruction", "--no-condition", "--data"])
        .arg(&data)
        .arg("--out")
        .arg(&run)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let m = meta(&run.join("best.safetensors"));
    let cfg: reclmis::model::Config = serde_json::from_str(&m["config"]).unwrap();
    assert!(cfg.random_masking && cfg.condition_on_logits && cfg.bidirectional_reconstruction);
    assert!(cfg.weighted_reconstruction && cfg.no_condition);
    assert_eq!(cfg.loss_weights, [5.0, 0.0, 1.0, 0.0]);
    let _ = std::fs::remove_dir_all(&root);
}

/// `--counterfactual-rate`: recorded as a run setting; refused with a clear error on data
/// without counterfactual notes.
#[test]
fn counterfactual_rate_needs_counterfactual_notes() {
    let root = tmp("cfrate");
    let data = root.join("data");
    write(&data, &SynthOpts { train: 4, val: 2, test: 2, size: 32, seed: 5, ..Default::default() }).unwrap();
    let train = |out: &str| {
        Command::new(env!("CARGO_BIN_EXE_reclmis"))
            .args(["train", "--epochs", "1", "--batch", "2", "--device", "cpu", "--counterfactual-rate", "0.5"])
            .arg("--data")
            .arg(&data)
            .arg("--out")
            .arg(root.join(out))
            .output()
            .unwrap()
    };
    let out = train("a");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(meta(&root.join("a/train_state.safetensors"))["setting.counterfactual_rate"], "0.5");
    std::fs::remove_file(data.join("Train_Folder/counterfactual_text.csv")).unwrap();
    let out = train("b");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("--counterfactual-rate needs counterfactual notes"), "{err}");
    let _ = std::fs::remove_dir_all(&root);
}

/// `reclmis ablate`: each chosen variant trained into its own run folder with its options
/// recorded, the table printed and written (CSV row per variant, PNG), an unknown variant and a
/// folder holding files refused.
#[test]
fn ablate_trains_each_variant_and_writes_the_table() {
    let root = tmp("ablate-table");
    let data = root.join("data");
    write(&data, &SynthOpts { train: 4, val: 2, test: 2, size: 32, seed: 6, ..Default::default() }).unwrap();
    let out = root.join("table");
    let run = |extra: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_reclmis"))
            .args(["ablate", "--epochs", "1", "--batch", "2", "--device", "cpu", "--budget-minutes", "0"])
            .args(extra)
            .arg("--data")
            .arg(&data)
            .arg("--out")
            .arg(&out)
            .output()
            .unwrap()
    };
    let o = run(&["--variants", "base,full"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let csv = std::fs::read_to_string(out.join("ablation.csv")).unwrap();
    let lines: Vec<&str> = csv.lines().collect();
    assert_eq!(lines.len(), 3, "{csv}");
    assert!(lines[1].starts_with("full,") && lines[2].starts_with("base,"), "the table's order: {csv}");
    // synth's data has counterfactual notes: every row has its Dice
    assert!(lines[1..].iter().all(|l| !l.ends_with(",,")), "{csv}");
    assert!(image::open(out.join("ablation.png")).is_ok());
    let cfg = |v: &str| -> reclmis::model::Config {
        serde_json::from_str(&meta(&out.join(v).join("best.safetensors"))["config"]).unwrap()
    };
    let (full, base) = (cfg("full"), cfg("base"));
    assert!(!full.no_condition && full.loss_weights == [5.0, 0.2, 1.0, 1.0]);
    assert!(base.no_condition && base.loss_weights == [5.0, 0.2, 0.0, 0.0]);
    // every variant with the quickstart's gradient clipping
    for v in ["full", "base"] {
        assert_eq!(meta(&out.join(v).join("train_state.safetensors"))["setting.clip_grad_norm"], "5e0", "{v}");
    }
    assert!(String::from_utf8_lossy(&o.stdout).contains("counterfactual"));
    // the folder now holds the table: a second run is refused and leaves it as it was
    let again = run(&["--variants", "full"]);
    assert!(!again.status.success() && String::from_utf8_lossy(&again.stderr).contains("holds files"));
    assert_eq!(std::fs::read_to_string(out.join("ablation.csv")).unwrap(), csv);
    let _ = std::fs::remove_dir_all(&out);
    let bad = run(&["--variants", "full,nope"]);
    assert!(String::from_utf8_lossy(&bad.stderr).contains("unknown variant \"nope\""));
    let _ = std::fs::remove_dir_all(&root);
}
