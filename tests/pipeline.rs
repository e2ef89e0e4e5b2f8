//! The main job end to end on a tiny synthetic set (cpu): the loss falls, checkpoints reload to the
//! same scores, `--resume` continues exactly; the loader's errors on bad inputs; the CLI's errors
//! on bad arguments.

use reclmis::data::lvit::{self, Split};
use reclmis::data::write::{write, SynthOpts};
use reclmis::pipeline::{self, train::TrainOpts, Notes};
use reclmis::Device;
use std::path::{Path, PathBuf};

fn tmp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("reclmis-test-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn tiny_set(dir: &Path) {
    write(dir, &SynthOpts { train: 24, val: 8, test: 8, size: 32, seed: 3, ..Default::default() }).unwrap();
}

fn opts(data: &Path, out: &Path, epochs: usize) -> TrainOpts {
    TrainOpts {
        text_weights: None,
        model: Default::default(),
        schedule: reclmis::optim::schedule::Schedule::Cosine,
        counterfactual_rate: 0.0,
        data: data.to_path_buf(),
        preset: "small".into(),
        epochs,
        batch: 8,
        accumulate: 1,
        precision: reclmis::autograd::Precision::F32,
        lr: 1e-3,
        clip_grad_norm: None,
        seed: 5,
        out: out.to_path_buf(),
        patience: 100,
        max_minutes: 0.0,
        tokenizer: None,
        resume: false,
        overwrite: false,
        accept_changes: false,
        stop_after: 0,
        augment: true,
        official_flips: false,
        progress: false,
    }
}

/// Epoch-mean losses from the run's log.jsonl.
fn logged(out: &Path, key: &str) -> Vec<f64> {
    std::fs::read_to_string(out.join("log.jsonl"))
        .unwrap()
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            v[key].as_f64().unwrap()
        })
        .collect()
}

#[test]
fn short_training_learns_reloads_and_resumes_exactly() {
    let dir = tmp("train");
    let data = dir.join("data");
    tiny_set(&data);
    let dev = Device::Cpu;
    let a = dir.join("a");
    let s = pipeline::train::train(&opts(&data, &a, 4), &dev).unwrap();
    let loss = logged(&a, "total");
    assert_eq!(loss.len(), 4);
    assert!(loss[3] < loss[0], "the training loss falls: {loss:?}");
    // the best checkpoint reloads to the validation score it was saved with
    let (m, tok) = pipeline::load_run(&a.join("best.safetensors"), None, &dev).unwrap();
    let (h, w) = m.cfg.img_size;
    let val = pipeline::load(&data, Split::Val, h, w).unwrap();
    let sc = pipeline::evaluate(&m, &val, &tok, Notes::Correct, 8).unwrap();
    assert!((sc.dice - s.best_dice).abs() < 1e-9, "reloaded {} vs logged {}", sc.dice, s.best_dice);
    // 2 epochs, then --resume to 4: the same parameters as the uninterrupted run
    let b = dir.join("b");
    pipeline::train::train(&TrainOpts { stop_after: 2, ..opts(&data, &b, 4) }, &dev).unwrap();
    pipeline::train::train(&TrainOpts { resume: true, ..opts(&data, &b, 4) }, &dev).unwrap();
    // every tensor, the training-only reconstruction included (load_run leaves it unread)
    let full = |p: &std::path::Path| {
        let (m, _) = pipeline::load_run(p, None, &dev).unwrap();
        let mut full = reclmis::model::RecLmis::new(m.cfg.clone(), &dev, 1).unwrap();
        let rep = reclmis::checkpoint::load(&mut full.params, p).unwrap();
        assert!(rep.missing.is_empty(), "{}", rep.summary());
        full
    };
    let (ma, mb) = (full(&a.join("last.safetensors")), full(&b.join("last.safetensors")));
    for id in ma.params.ids() {
        assert_eq!(
            ma.params.value(id).to_vec().unwrap(),
            mb.params.value(id).to_vec().unwrap(),
            "{} differs after resuming",
            ma.params.name(id)
        );
    }
    assert_eq!(logged(&b, "total"), loss, "the resumed run logs the same epochs");
    // a new (not resumed) run in the same folder is refused; with --overwrite it starts its own log
    let e = pipeline::train::train(&opts(&data, &b, 1), &dev).err().unwrap().to_string();
    assert!(e.contains("not empty") && e.contains("--overwrite"), "{e}");
    pipeline::train::train(&TrainOpts { overwrite: true, ..opts(&data, &b, 1) }, &dev).unwrap();
    assert_eq!(logged(&b, "total").len(), 1);
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Each bad input names the file and what is wrong.
#[test]
fn loader_reports_bad_inputs() {
    let dir = tmp("bad");
    let data = dir.join("data");
    tiny_set(&data);
    let folder = data.join("Train_Folder");
    let list_err = |root: &Path| lvit::list(root, Split::Train).unwrap_err().to_string();
    let first_img = || {
        let mut v: Vec<PathBuf> = std::fs::read_dir(folder.join("img")).unwrap().map(|e| e.unwrap().path()).collect();
        v.sort();
        v[0].clone()
    };
    let img = first_img();
    let name = img.file_name().unwrap().to_str().unwrap().to_string();
    let mask = folder.join("labelcol").join(format!("mask_{name}"));
    let entry = |i: &Path, m: &Path| lvit::Entry { image: i.to_path_buf(), mask: m.to_path_buf(), note: "x".into() };

    // a missing folder
    let e = lvit::list(&dir.join("nowhere"), Split::Train).unwrap_err().to_string();
    assert!(e.contains("missing folder"), "{e}");
    // a note missing from the sheet (both formats: the xlsx is read first, so rewrite both)
    let csv = std::fs::read_to_string(folder.join("Train_text.csv")).unwrap();
    let without: String = csv.lines().filter(|l| !l.contains(&name)).map(|l| format!("{l}\n")).collect();
    std::fs::remove_file(folder.join("Train_text.xlsx")).unwrap();
    std::fs::write(folder.join("Train_text.csv"), &without).unwrap();
    let e = list_err(&data);
    assert!(e.contains("no note for") && e.contains(&name), "{e}");
    // an empty note
    let emptied: String =
        csv.lines().map(|l| if l.contains(&name) { format!("mask_{name},\n") } else { format!("{l}\n") }).collect();
    std::fs::write(folder.join("Train_text.csv"), emptied).unwrap();
    let e = list_err(&data);
    assert!(e.contains("empty"), "{e}");
    std::fs::write(folder.join("Train_text.csv"), &csv).unwrap();
    // a sheet without the header
    std::fs::write(folder.join("Train_text.csv"), csv.replacen("Image,Description", "a,b", 1)).unwrap();
    let e = list_err(&data);
    assert!(e.contains("Image and Description"), "{e}");
    std::fs::write(folder.join("Train_text.csv"), &csv).unwrap();
    // a missing mask
    let saved = std::fs::read(&mask).unwrap();
    std::fs::remove_file(&mask).unwrap();
    let e = list_err(&data);
    assert!(e.contains("no mask") && e.contains(&name), "{e}");
    std::fs::write(&mask, &saved).unwrap();
    // a truncated image
    let bytes = std::fs::read(&img).unwrap();
    let cut = dir.join("cut.png");
    std::fs::write(&cut, &bytes[..bytes.len() / 2]).unwrap();
    let e = lvit::decode(&entry(&cut, &mask), 32, 32).err().unwrap().to_string();
    assert!(e.contains("cut.png") && e.contains("cannot decode"), "{e}");
    // an image / mask size mismatch
    let small = dir.join("small.png");
    image::save_buffer(&small, &[0u8; 16 * 16], 16, 16, image::ExtendedColorType::L8).unwrap();
    let e = lvit::decode(&entry(&img, &small), 32, 32).err().unwrap().to_string();
    assert!(e.contains("small.png") && e.contains("is (16, 16)"), "{e}");
    // a mask of other values: non-zero is foreground, as the official loader thresholds
    let grey = dir.join("grey.png");
    image::save_buffer(&grey, &[128u8; 32 * 32], 32, 32, image::ExtendedColorType::L8).unwrap();
    let d = lvit::decode(&entry(&img, &grey), 32, 32).unwrap();
    assert!(d.mask.iter().all(|&m| m == 1) && !d.mask_not_two_valued && d.mask_max == 128);
    // an empty image folder
    for f in std::fs::read_dir(folder.join("img")).unwrap() {
        std::fs::remove_file(f.unwrap().path()).unwrap();
    }
    let e = list_err(&data);
    assert!(e.contains("no images"), "{e}");
    std::fs::remove_dir_all(&dir).unwrap();
}

fn cli(args: &[&str]) -> (bool, String) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_reclmis")).args(args).output().unwrap();
    (out.status.success(), String::from_utf8_lossy(&out.stderr).to_string() + &String::from_utf8_lossy(&out.stdout))
}

#[test]
fn cli_rejects_bad_arguments() {
    let (ok, msg) = cli(&["train"]);
    assert!(!ok && msg.contains("--data"), "{msg}");
    let (ok, msg) = cli(&["model", "--preset", "huge"]);
    assert!(!ok && msg.contains("unknown preset"), "{msg}");
    let (ok, msg) = cli(&["synth", "--out", "/tmp/x", "--size", "30"]);
    assert!(!ok && msg.contains("multiple of 16"), "{msg}");
    // synth refuses to write over another dataset
    let dir = tmp("synth-twice");
    tiny_set(&dir);
    let e = write(&dir, &SynthOpts::default()).unwrap_err().to_string();
    assert!(e.contains("already holds images"), "{e}");
    std::fs::remove_dir_all(&dir).unwrap();
    let (ok, msg) = cli(&["eval", "--data", "/nonexistent", "--checkpoint", "/nonexistent/c.safetensors"]);
    assert!(!ok && msg.contains("/nonexistent/c.safetensors"), "{msg}");
    let (ok, msg) = cli(&["train", "--data", "/nonexistent", "--device", "cpu"]);
    assert!(!ok && msg.contains("/nonexistent/Train_Folder") && msg.contains("missing folder"), "{msg}");
    let (ok, msg) = cli(&["train", "--data", "/nonexistent", "--epochs", "many"]);
    assert!(!ok && msg.contains("--epochs"), "{msg}");
    // refused before the data is read
    for bad in ["0", "-1", "NaN", "inf"] {
        let flag = format!("--clip-grad-norm={bad}");
        let (ok, msg) = cli(&["train", "--data", "/nonexistent", "--device", "cpu", &flag]);
        assert!(!ok && msg.contains("--clip-grad-norm") && !msg.contains("Train_Folder"), "{bad}: {msg}");
    }
}

/// `clip_grad_norm`: a bound above every step's norm changes nothing (bit for bit), a bound
/// below them changes the run (the gradients reach Adam scaled); the log has each epoch's mean
/// and largest norm before clipping.
#[test]
fn gradient_clipping_reaches_the_optimiser() {
    let dir = tmp("clip");
    let data = dir.join("data");
    tiny_set(&data);
    let dev = Device::Cpu;
    let run = |name: &str, clip: Option<f32>| {
        let out = dir.join(name);
        pipeline::train::train(&TrainOpts { clip_grad_norm: clip, ..opts(&data, &out, 2) }, &dev).unwrap();
        let (m, _) = pipeline::load_run(&out.join("last.safetensors"), None, &dev).unwrap();
        let w: Vec<Vec<f32>> = m.params.ids().map(|id| m.params.value(id).to_vec().unwrap()).collect();
        let log = std::fs::read_to_string(out.join("log.jsonl")).unwrap();
        let clipped = log.contains("clipped_fraction").then(|| logged(&out, "clipped_fraction"));
        (w, logged(&out, "grad_norm"), logged(&out, "grad_norm_max"), logged(&out, "total"), clipped)
    };
    let (free, norm, norm_max, loss, free_clipped) = run("free", None);
    assert!(norm.iter().zip(&norm_max).all(|(m, x)| *m > 0.0 && x >= m), "mean {norm:?}, max {norm_max:?}");
    assert_eq!(free_clipped, None, "a run without a bound logs no clipped share");
    let (high, high_norm, _, high_loss, high_clipped) = run("high", Some(1e30));
    assert!(high == free && high_norm == norm && high_loss == loss, "a bound no step reaches changed the run");
    assert_eq!(high_clipped, Some(vec![0.0; norm.len()]), "a bound no step reaches clipped steps");
    // a ten-thousandth of the smallest epoch mean, far below every step's norm (a mean is not a
    // bound on the steps': its smallest step could be below a tenth of it): every step is scaled
    let low_bound = norm.iter().cloned().fold(f64::INFINITY, f64::min) as f32 / 1e4;
    let (low, low_norm, _, _, low_clipped) = run("low", Some(low_bound));
    assert!(low != free, "clipping to {low_bound} left every weight as without it");
    assert_eq!(low_clipped, Some(vec![1.0; norm.len()]), "the bound {low_bound} is below every step's norm");
    // the logged norms are the ones before clipping (after it none would exceed the bound)
    assert!(low_norm.iter().all(|&n| n > low_bound as f64), "logged {low_norm:?} with the bound {low_bound}");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A frozen text tower's cached output gives the same training losses as running the tower (the
/// tiny preset with the fixture's CLIP tokenizer).
#[test]
fn cached_text_tower_gives_the_same_losses() {
    use reclmis::autograd::Graph;
    use reclmis::model::{Config, RecLmis};
    let dir = tmp("cache");
    let data = dir.join("data");
    tiny_set(&data);
    let dev = Device::Cpu;
    let m = RecLmis::new(Config::preset("tiny").unwrap(), &dev, 2).unwrap();
    let tok_path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/official_tiny/tokenizer.json");
    let tok = reclmis::text::NoteTokenizer::from_file(&tok_path, 18).unwrap();
    let (h, w) = m.cfg.img_size;
    let d = pipeline::load(&data, Split::Train, h, w).unwrap();
    let cache = pipeline::text_cache(&m, &tok, d.entries.iter().map(|e| e.note.as_str())).unwrap();
    let idx = [0, 3, 5];
    let plain = pipeline::make_batch(&d, &idx, &tok, Notes::Correct, None, None, &dev).unwrap();
    let cached = pipeline::make_batch(&d, &idx, &tok, Notes::Correct, None, Some(&cache), &dev).unwrap();
    assert!(plain.text_hidden.is_none() && cached.text_hidden.is_some());
    let masks = Some(reclmis::model::MaskIndices { img: vec![vec![0, 1]; 3], text: vec![vec![1]; 3] });
    let run = |b: &reclmis::model::Batch| {
        m.forward_train(&Graph::train_no_grad(), b, masks.clone(), &mut reclmis::testing::Rng::new(1)).unwrap().losses
    };
    assert_eq!(run(&plain), run(&cached));
    std::fs::remove_dir_all(&dir).unwrap();
}
