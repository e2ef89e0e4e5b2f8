//! The table of bad inputs and interruptions (issue "nothing lost, nothing silently wrong"):
//! every case asserts its exact outcome, a clear error naming the thing or the correct result,
//! and that nothing the command did not create was touched. Interruptions by SIGKILL are in
//! tests/kill.rs, malformed files in tests/fuzz_parsers.rs.

use reclmis::data::lvit::{self, Split};
use reclmis::data::write::{write, SynthOpts};
use reclmis::pipeline::{self, run_dir, train::TrainOpts};
use reclmis::{Device, Tensor};
use std::path::{Path, PathBuf};

/// One row of the table (about 70 rows in all, with the loops).
fn case(name: &str, ok: bool, detail: impl std::fmt::Display) {
    assert!(ok, "case {name:?}: {detail}");
}

fn tmp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("reclmis-bad-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn tiny_set(dir: &Path) {
    write(dir, &SynthOpts { train: 16, val: 8, test: 8, size: 32, seed: 3, ..Default::default() }).unwrap();
}

fn opts(data: &Path, out: &Path) -> TrainOpts {
    TrainOpts {
        text_weights: None,
        model: Default::default(),
        schedule: reclmis::optim::schedule::Schedule::Cosine,
        counterfactual_rate: 0.0,
        data: data.to_path_buf(),
        preset: "small".into(),
        epochs: 2,
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
        augment: false,
        official_flips: false,
        progress: false,
    }
}

fn cli(args: &[&str]) -> (bool, String) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_reclmis")).args(args).output().unwrap();
    (out.status.success(), String::from_utf8_lossy(&out.stderr).to_string() + &String::from_utf8_lossy(&out.stdout))
}

fn err_of<T>(r: reclmis::Result<T>) -> String {
    match r {
        Ok(_) => "succeeded".into(),
        Err(e) => e.to_string(),
    }
}

fn first_test_image(data: &Path) -> (PathBuf, PathBuf) {
    let mut v: Vec<PathBuf> =
        std::fs::read_dir(data.join("Test_Folder/img")).unwrap().map(|e| e.unwrap().path()).collect();
    v.sort();
    let name = v[0].file_name().unwrap().to_string_lossy().into_owned();
    (v[0].clone(), data.join("Test_Folder/labelcol").join(format!("mask_{name}")))
}

#[test]
fn argument_errors() {
    let dir = tmp("args");
    let data = dir.join("data");
    tiny_set(&data);
    let d = data.to_str().unwrap();
    let out = dir.join("out");
    let o = out.to_str().unwrap();
    for (name, args, want) in [
        ("lr nan", vec!["--lr", "nan"], "--lr NaN"),
        ("lr negative", vec!["--lr=-0.1"], "--lr -0.1"),
        ("lr absurd", vec!["--lr", "1e9"], "--lr 1000000000"),
        ("batch 0", vec!["--batch", "0"], "--batch 0"),
        ("epochs 0", vec!["--epochs", "0"], "--epochs 0"),
        ("patience 0", vec!["--patience", "0"], "--patience 0"),
        ("max-minutes nan", vec!["--max-minutes", "nan"], "--max-minutes"),
        ("resume and overwrite", vec!["--resume", "--overwrite"], "exclude each other"),
    ] {
        let mut a = vec!["train", "--data", d, "--out", o, "--device", "cpu"];
        a.extend(args);
        let (ok, msg) = cli(&a);
        case(name, !ok && msg.contains(want), &msg);
        case(&format!("{name}: nothing written"), !out.exists(), "the run folder was created");
    }
    let (ok, msg) = cli(&["train", "--data", d, "--resume", "--device", "cpu"]);
    case("resume without --out", !ok && msg.contains("--resume needs the --out"), &msg);
    let (ok, msg) = cli(&["--max-megapixels", "0", "devices"]);
    case("max-megapixels 0", !ok && msg.contains("--max-megapixels"), &msg);
    let (ok, msg) = cli(&["train", "--data", d, "--out", o, "--resume", "--device", "cpu"]);
    case("resume of nothing", !ok && msg.contains("nothing to resume"), &msg);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn run_folders_are_never_clobbered() {
    let dir = tmp("folders");
    let data = dir.join("data");
    tiny_set(&data);
    let dev = Device::Cpu;
    // a folder of the user's
    let mine = dir.join("mine");
    std::fs::create_dir_all(&mine).unwrap();
    std::fs::write(mine.join("notes.txt"), "precious").unwrap();
    let e = err_of(pipeline::train::train(&opts(&data, &mine), &dev));
    case("fresh run into a non-empty folder", e.contains("not empty") && e.contains("notes.txt"), &e);
    let names: Vec<String> =
        std::fs::read_dir(&mine).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    case(
        "refused run wrote nothing but its lock",
        names.iter().all(|n| n == "notes.txt" || n == ".lock"),
        format!("{names:?}"),
    );
    // --overwrite replaces run files only
    std::fs::write(mine.join("best.safetensors"), "an old best").unwrap();
    pipeline::train::train(&TrainOpts { overwrite: true, epochs: 1, ..opts(&data, &mine) }, &dev).unwrap();
    case("overwrite keeps other files", std::fs::read_to_string(mine.join("notes.txt")).unwrap() == "precious", "");
    case(
        "overwrite replaced the old best",
        std::fs::read(mine.join("best.safetensors")).unwrap() != b"an old best",
        "",
    );
    // a second training in a locked folder
    let held = run_dir::RunDir::open(&dir.join("locked"), run_dir::Mode::Fresh).unwrap();
    let e = err_of(pipeline::train::train(&TrainOpts { overwrite: true, ..opts(&data, &dir.join("locked")) }, &dev));
    case(
        "two trainings in one folder",
        e.contains("another training") && e.contains(&std::process::id().to_string()),
        &e,
    );
    drop(held);
    // default folders never collide
    let base = dir.join("runs");
    std::fs::create_dir_all(base.join("train-1")).unwrap();
    case("next free run folder", run_dir::RunDir::next_free(&base) == base.join("train-2"), "");
    // quickstart refuses a dataset it did not write, and leaves it whole
    let qs = dir.join("qs");
    std::fs::create_dir_all(qs.join("data/Train_Folder/img")).unwrap();
    std::fs::write(qs.join("data/Train_Folder/img/patient1.png"), "real data").unwrap();
    let (ok, msg) = cli(&["quickstart", "--out", qs.to_str().unwrap(), "--device", "cpu"]);
    case("quickstart over a real dataset", !ok && msg.contains("not written by reclmis synth"), &msg);
    case("the real dataset is intact", qs.join("data/Train_Folder/img/patient1.png").is_file(), "");
    // a synthetic set with a foreign file inside: refused, nothing removed
    std::fs::write(data.join("Train_Folder/img/mine.png"), "mine").unwrap();
    let e = err_of(reclmis::data::write::remove_synthetic(&data));
    case("synthetic set holding a user file", e.contains("mine.png"), &e);
    case("nothing removed", data.join("Train_Folder/img/mine.png").is_file() && data.join("Val_Folder").is_dir(), "");
    std::fs::remove_file(data.join("Train_Folder/img/mine.png")).unwrap();
    reclmis::data::write::remove_synthetic(&data).unwrap();
    case("synthetic set regenerated", !data.join("Train_Folder").exists(), "");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn resume_is_consistent_or_refuses() {
    let dir = tmp("resume");
    let data = dir.join("data");
    tiny_set(&data);
    let dev = Device::Cpu;
    let run = dir.join("run");
    pipeline::train::train(&TrainOpts { stop_after: 1, ..opts(&data, &run) }, &dev).unwrap();
    for (name, o, want) in [
        ("other seed", TrainOpts { seed: 6, ..opts(&data, &run) }, "seed: the run has 5, now 6"),
        ("other batch", TrainOpts { batch: 4, ..opts(&data, &run) }, "batch: the run has 8, now 4"),
        ("other lr", TrainOpts { lr: 2e-3, ..opts(&data, &run) }, "lr: the run has 1e-3, now 2e-3"),
        ("augmentation switched", TrainOpts { augment: true, ..opts(&data, &run) }, "augment"),
        ("accumulation switched", TrainOpts { accumulate: 2, ..opts(&data, &run) }, "accumulate: the run has 1, now 2"),
        (
            "clipping switched",
            TrainOpts { clip_grad_norm: Some(1.0), ..opts(&data, &run) },
            "clip_grad_norm: the run has none, now 1e0",
        ),
        (
            "precision switched",
            TrainOpts { precision: reclmis::autograd::Precision::Bf16, ..opts(&data, &run) },
            "precision: the run has f32, now bf16",
        ),
    ] {
        let e = err_of(pipeline::train::train(&TrainOpts { resume: true, ..o }, &dev));
        case(name, e.contains(want) && e.contains("--accept-changes"), &e);
    }
    // other data: one note changed
    let csv = data.join("Train_Folder/Train_text.csv");
    let text = std::fs::read_to_string(&csv).unwrap();
    std::fs::remove_file(data.join("Train_Folder/Train_text.xlsx")).unwrap();
    std::fs::write(&csv, text.replacen("lung", "lungs", 1)).unwrap();
    let e = err_of(pipeline::train::train(&TrainOpts { resume: true, ..opts(&data, &run) }, &dev));
    case("other data", e.contains("train_data"), &e);
    let s = pipeline::train::train(&TrainOpts { resume: true, accept_changes: true, ..opts(&data, &run) }, &dev);
    case(
        "other data accepted when asked",
        s.as_ref().is_ok_and(|s| s.notes.iter().any(|n| n.contains("train_data"))),
        err_of(s.map(|_| ())),
    );
    std::fs::write(&csv, &text).unwrap();
    // a last.safetensors of another run
    let other = dir.join("other");
    pipeline::train::train(&TrainOpts { seed: 9, stop_after: 1, ..opts(&data, &other) }, &dev).unwrap();
    let run2 = dir.join("run2");
    pipeline::train::train(&TrainOpts { stop_after: 1, ..opts(&data, &run2) }, &dev).unwrap();
    std::fs::copy(other.join("last.safetensors"), run2.join("last.safetensors")).unwrap();
    let e = err_of(pipeline::train::train(&TrainOpts { resume: true, ..opts(&data, &run2) }, &dev));
    case("last of another run", e.contains("belongs to another run"), &e);
    // missing optimiser moments
    let run3 = dir.join("run3");
    pipeline::train::train(&TrainOpts { stop_after: 1, ..opts(&data, &run3) }, &dev).unwrap();
    let state = run3.join("train_state.safetensors");
    let bytes = std::fs::read(&state).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let meta = safetensors::SafeTensors::read_metadata(&bytes).unwrap().1.metadata().clone();
    let kept: Vec<(String, safetensors::tensor::TensorView)> =
        st.tensors().into_iter().filter(|(n, _)| !n.starts_with("m.inc.")).collect();
    std::fs::write(&state, safetensors::tensor::serialize(kept, meta).unwrap()).unwrap();
    let e = err_of(pipeline::train::train(&TrainOpts { resume: true, ..opts(&data, &run3) }, &dev));
    case("missing Adam moments", e.contains("lacks m.inc."), &e);
    // a log that does not belong to the state
    let run4 = dir.join("run4");
    pipeline::train::train(&TrainOpts { stop_after: 1, ..opts(&data, &run4) }, &dev).unwrap();
    std::fs::write(run4.join("log.jsonl"), "{\"epoch\": 7}\n").unwrap();
    let e = err_of(pipeline::train::train(&TrainOpts { resume: true, ..opts(&data, &run4) }, &dev));
    case("foreign log", e.contains("log.jsonl"), &e);
    // orphaned temporaries of a crashed writer are removed on resume
    let run5 = dir.join("run5");
    pipeline::train::train(&TrainOpts { stop_after: 1, ..opts(&data, &run5) }, &dev).unwrap();
    std::fs::write(run5.join(".last.safetensors.tmp-123-4"), "half").unwrap();
    std::fs::write(run5.join("mine.tmp-1-2"), "not ours").unwrap();
    let s = pipeline::train::train(&TrainOpts { resume: true, ..opts(&data, &run5) }, &dev).unwrap();
    case(
        "orphaned temporaries cleaned",
        !run5.join(".last.safetensors.tmp-123-4").exists() && run5.join("mine.tmp-1-2").exists(),
        format!("{:?}", s.notes),
    );
    // tokenizer.json is never rewritten on resume
    let tok_before = std::fs::metadata(run5.join("tokenizer.json")).unwrap().modified().unwrap();
    pipeline::train::train(&TrainOpts { resume: true, epochs: 3, ..opts(&data, &run5) }, &dev).ok();
    let tok_after = std::fs::metadata(run5.join("tokenizer.json")).unwrap().modified().unwrap();
    case("tokenizer untouched by resume", tok_before == tok_after, "");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn non_finite_values_are_caught() {
    use reclmis::nn::params::Kind;
    let dir = tmp("nan");
    let dev = Device::Cpu;
    // a checkpoint with a NaN is never written
    let mut p = reclmis::nn::params::Params::new(&dev);
    p.add("w", &[2], vec![1.0, f32::NAN], Kind::Buffer).unwrap();
    let path = dir.join("nan.safetensors");
    let e = err_of(reclmis::checkpoint::save(&p, &path));
    case("saving a NaN weight", e.contains("w holds a non-finite value") && !path.exists(), &e);
    // loading one is an error naming the tensor
    let data = [1.0f32, f32::INFINITY];
    let view =
        safetensors::tensor::TensorView::new(safetensors::Dtype::F32, vec![2], bytemuck::cast_slice(&data)).unwrap();
    std::fs::write(&path, safetensors::tensor::serialize([("w", view)], None).unwrap()).unwrap();
    let mut q = reclmis::nn::params::Params::new(&dev);
    q.add("w", &[2], vec![0.0; 2], Kind::Buffer).unwrap();
    let e = err_of(reclmis::checkpoint::load(&mut q, &path));
    case("loading an inf weight", e.contains("w holds a non-finite value"), &e);
    let e = err_of(reclmis::checkpoint::load_mapped_skipping(&mut q, &path, &[]));
    case("loading an inf weight in place (mapped)", e.contains("w holds a non-finite value"), &e);
    // a training step on a NaN input stops before the update
    let set = dir.join("data");
    tiny_set(&set);
    let m = reclmis::model::RecLmis::new(reclmis::model::Config::preset("small").unwrap(), &dev, 1).unwrap();
    let tok = reclmis::text::NoteTokenizer::train_word_level(["a lung"].iter(), m.cfg.token_len).unwrap();
    let mut cfg = m.cfg.clone();
    cfg.img_size = (32, 32);
    cfg.vocab_size = tok.vocab_size();
    let m = reclmis::model::RecLmis::new(cfg, &dev, 1).unwrap();
    let d = pipeline::load(&set, Split::Train, 32, 32).unwrap();
    let mut b = pipeline::make_batch(&d, &[0, 1], &tok, pipeline::Notes::Correct, None, None, &dev).unwrap();
    let mut px = b.images.to_vec().unwrap();
    px[5] = f32::NAN;
    b.images = Tensor::from_vec(px, b.images.shape(), &dev).unwrap();
    let mut tr = reclmis::model::train::Trainer::new(m, reclmis::optim::AdamConfig::default());
    let before: Vec<Vec<f32>> = tr.model.params.ids().map(|id| tr.model.params.value(id).to_vec().unwrap()).collect();
    let e = err_of(tr.step(&b, None, &mut reclmis::testing::Rng::new(1)));
    case("a NaN loss stops the step", e.contains("non-finite") && e.contains("loss term"), &e);
    let after: Vec<Vec<f32>> = tr.model.params.ids().map(|id| tr.model.params.value(id).to_vec().unwrap()).collect();
    case("the weights are not updated", before == after, "");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn images_masks_notes_and_files() {
    let dir = tmp("files");
    let data = dir.join("data");
    tiny_set(&data);
    let dev = Device::Cpu;
    let run = dir.join("run");
    pipeline::train::train(&TrainOpts { epochs: 1, ..opts(&data, &run) }, &dev).unwrap();
    let ck = run.join("best.safetensors");
    let ck_s = ck.to_str().unwrap();
    let (img, mask) = first_test_image(&data);
    let img_s = img.to_str().unwrap();
    let note = "Bilateral pulmonary infection, two infected areas, all left lung and all right lung.";
    let out = dir.join("infer");
    let out_s = out.to_str().unwrap();

    // a 16-bit mask of 0/1 is foreground where 1 (not scaled to 0)
    let m16 = dir.join("m16.png");
    let mut px = vec![0u16; 32 * 32];
    px[..100].fill(1);
    image::ImageBuffer::<image::Luma<u16>, _>::from_raw(32, 32, px).unwrap().save(&m16).unwrap();
    let g = lvit::decode_mask(&m16).unwrap();
    case("16-bit 0/1 mask", g.pixels().filter(|p| p.0[0] == 1).count() == 100, "");
    let e = lvit::Entry { image: img.clone(), mask: m16.clone(), note: "x".into() };
    let dec = lvit::decode(&e, 32, 32).unwrap();
    case("16-bit mask in the loader", dec.mask.iter().filter(|&&m| m == 1).count() == 100 && dec.mask_max == 1, "");
    // an RGBA mask: colour decides, alpha is ignored (as cv2's grey read)
    let rgba = dir.join("rgba.png");
    let mut px = vec![0u8; 32 * 32 * 4];
    for p in px.chunks_mut(4).take(50) {
        p.copy_from_slice(&[255, 255, 255, 0]);
    }
    image::RgbaImage::from_raw(32, 32, px).unwrap().save(&rgba).unwrap();
    let g = lvit::decode_mask(&rgba).unwrap();
    case("RGBA mask", g.pixels().filter(|p| p.0[0] == 1).count() == 50, "");
    // an anti-aliased mask loads, and the loader says so
    let aa_set = dir.join("aa");
    tiny_set(&aa_set);
    let first_mask = std::fs::read_dir(aa_set.join("Train_Folder/labelcol")).unwrap().next().unwrap().unwrap().path();
    let mut m = image::open(&first_mask).unwrap().to_luma8();
    m.put_pixel(0, 0, image::Luma([128]));
    m.put_pixel(1, 0, image::Luma([255]));
    m.save(&first_mask).unwrap();
    std::fs::write(aa_set.join("Train_Folder/img/.DS_Store"), "x").unwrap();
    std::fs::write(aa_set.join("Train_Folder/img/Thumbs.db"), "x").unwrap();
    let l = pipeline::load(&aa_set, Split::Train, 32, 32).unwrap();
    case(
        "masks with other values reported",
        l.notes.iter().any(|n| n.contains("1 of 16 masks") && n.contains("255")),
        format!("{:?}", l.notes),
    );
    case(
        "hidden and non-image files skipped",
        l.len() == 16 && l.notes.iter().any(|n| n.contains(".DS_Store") && n.contains("Thumbs.db")),
        format!("{:?}", l.notes),
    );
    // a long note is cut before tokenization
    let long = "lung ".repeat(400_000);
    let csv = aa_set.join("Train_Folder/Train_text.csv");
    let text = std::fs::read_to_string(&csv).unwrap();
    let mut lines: Vec<String> = text.lines().map(str::to_string).collect();
    let key = lines[1].split(',').next().unwrap().to_string();
    lines[1] = format!("{key},{long}");
    std::fs::remove_file(aa_set.join("Train_Folder/Train_text.xlsx")).unwrap();
    std::fs::write(&csv, lines.join("\n")).unwrap();
    let l = lvit::list(&aa_set, Split::Train).unwrap();
    case("a 2 MB note is cut", l.entries.iter().all(|e| e.note.len() <= reclmis::text::MAX_NOTE_BYTES), "");

    // infer: bad inputs, each before anything is written
    let (ok, msg) =
        cli(&["infer", "--checkpoint", ck_s, "--image", img_s, "--note", "  ", "--out", out_s, "--device", "cpu"]);
    case("empty note", !ok && msg.contains("--note is empty") && !out.exists(), &msg);
    let small = dir.join("small.png");
    image::save_buffer(&small, &[0u8; 16 * 16], 16, 16, image::ExtendedColorType::L8).unwrap();
    let (ok, msg) = cli(&[
        "infer",
        "--checkpoint",
        ck_s,
        "--image",
        img_s,
        "--note",
        note,
        "--mask-gt",
        small.to_str().unwrap(),
        "--out",
        out_s,
        "--device",
        "cpu",
    ]);
    case("mask-gt of another size", !ok && msg.contains("ground truth") && !out.exists(), &msg);
    let (ok, msg) = cli(&[
        "infer",
        "--checkpoint",
        ck_s,
        "--image",
        img_s,
        "--note",
        note,
        "--mask-gt",
        "/nonexistent/g.png",
        "--out",
        out_s,
        "--device",
        "cpu",
    ]);
    case("mask-gt missing", !ok && msg.contains("/nonexistent/g.png") && !out.exists(), &msg);
    let (ok, msg) = cli(&[
        "--max-megapixels",
        "0.0005",
        "infer",
        "--checkpoint",
        ck_s,
        "--image",
        img_s,
        "--note",
        note,
        "--out",
        out_s,
        "--device",
        "cpu",
    ]);
    case("image over the pixel limit", !ok && msg.contains("--max-megapixels") && msg.contains("1024 pixels"), &msg);
    let fifo = dir.join("fifo.png");
    let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
    // SAFETY: mkfifo with a valid C string.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
    let (ok, msg) = cli(&[
        "infer",
        "--checkpoint",
        ck_s,
        "--image",
        fifo.to_str().unwrap(),
        "--note",
        note,
        "--out",
        out_s,
        "--device",
        "cpu",
    ]);
    case("a FIFO as the image", !ok && msg.contains("not a regular file"), &msg);
    let (ok, msg) = cli(&[
        "infer",
        "--checkpoint",
        "/dev/zero",
        "--image",
        img_s,
        "--note",
        note,
        "--out",
        out_s,
        "--device",
        "cpu",
    ]);
    case("/dev/zero as the checkpoint", !ok && msg.contains("/dev/zero") && msg.contains("not a regular file"), &msg);
    // a permuted tokenizer beside the checkpoint
    let moved = dir.join("moved");
    std::fs::create_dir_all(&moved).unwrap();
    std::fs::copy(&ck, moved.join("best.safetensors")).unwrap();
    let tok = std::fs::read_to_string(run.join("tokenizer.json")).unwrap();
    std::fs::write(moved.join("tokenizer.json"), tok.replacen("\"lung\":", "\"lungX\":", 1)).unwrap();
    let (ok, msg) = cli(&[
        "infer",
        "--checkpoint",
        moved.join("best.safetensors").to_str().unwrap(),
        "--image",
        img_s,
        "--note",
        note,
        "--out",
        out_s,
        "--device",
        "cpu",
    ]);
    case("tokenizer of another run", !ok && msg.contains("is not the tokenizer"), &msg);
    // checkpoint metadata asking for a huge model: refused before any allocation
    let mut meta = reclmis::checkpoint::read_metadata(&ck).unwrap();
    meta.insert("img_h".into(), "128000".into());
    let mut cfg: serde_json::Value = serde_json::from_str(&meta["config"]).unwrap();
    cfg["img_size"][0] = 128000.into();
    meta.insert("config".into(), cfg.to_string());
    let huge = moved.join("huge.safetensors");
    let meta_v: Vec<(String, String)> = meta.into_iter().collect();
    reclmis::checkpoint::write_tensors(&huge, &[], &meta_v).unwrap();
    std::fs::copy(run.join("tokenizer.json"), moved.join("tokenizer.json")).unwrap();
    let (ok, msg) = cli(&[
        "infer",
        "--checkpoint",
        huge.to_str().unwrap(),
        "--image",
        img_s,
        "--note",
        note,
        "--out",
        out_s,
        "--device",
        "cpu",
    ]);
    case("img_h = 128000 in the metadata", !ok && msg.contains("at most 4096"), &msg);
    // a truncated checkpoint
    let bytes = std::fs::read(&ck).unwrap();
    let cut = moved.join("cut.safetensors");
    std::fs::write(&cut, &bytes[..bytes.len() / 2]).unwrap();
    let (ok, msg) = cli(&[
        "infer",
        "--checkpoint",
        cut.to_str().unwrap(),
        "--image",
        img_s,
        "--note",
        note,
        "--out",
        out_s,
        "--device",
        "cpu",
    ]);
    case("truncated checkpoint", !ok && msg.contains("cut.safetensors"), &msg);
    // and the good case works, with the Dice printed
    let (ok, msg) = cli(&[
        "infer",
        "--checkpoint",
        ck_s,
        "--image",
        img_s,
        "--note",
        note,
        "--mask-gt",
        mask.to_str().unwrap(),
        "--out",
        out_s,
        "--device",
        "cpu",
    ]);
    case("good infer", ok && msg.contains("Dice against the ground truth") && out.join("overlay.png").is_file(), &msg);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn unsound_inputs_to_public_apis_fail_safely() {
    let dev = Device::Cpu;
    let e = err_of(Tensor::zeros(&[1 << 62, 64], &dev));
    case("numel overflow", e.contains("too many elements"), &e);
    let e = err_of(Tensor::zeros(&[usize::MAX / 4], &Device::Emu));
    case("emu buffer size overflow", e.contains("too many elements"), &e);
    let e = err_of(Tensor::from_vec(vec![], &[0, 1 << 62, 1 << 62], &dev));
    case("zero-element shape that overflows", e.contains("too many elements"), &e);
    // raw-slice cpu kernels panic on short slices instead of reading past them
    let s = reclmis::ops::gemm::GemmShape { batch: 1, m: 4, n: 4, k: 4, sa: (16, 4, 1), sb: (16, 4, 1) };
    let r = std::panic::catch_unwind(|| reclmis::ops::gemm::cpu::gemm(&[0.0; 15], &[0.0; 16], &s, 1.0, None));
    case("cpu gemm with a short A", r.is_err(), "did not panic");
    let cs = reclmis::ops::conv::ConvShape { b: 1, ci: 2, co: 2, h: 4, w: 4, kh: 3, kw: 3 };
    let r = std::panic::catch_unwind(|| reclmis::ops::conv::cpu::conv2d(&[0.0; 31], &[0.0; 36], None, &cs));
    case("cpu conv with a short x", r.is_err(), "did not panic");
    let r = std::panic::catch_unwind(|| reclmis::ops::conv::cpu::conv2d_wgrad(&[0.0; 32], &[0.0; 5], &cs));
    case("cpu conv wgrad with a short dy", r.is_err(), "did not panic");
}

/// Loading in place (memory-mapped) gives the values reading gives: f32 tensors straight from the
/// file, a misaligned f32 tensor and half-precision ones read and converted, skipped keys unread.
#[test]
fn mapped_loading_matches_reading() {
    use reclmis::nn::params::{Kind, Params};
    let dir = tmp("mapped");
    let path = dir.join("mixed.safetensors");
    let a: Vec<f32> = (0..1000).map(|i| i as f32 * 0.37 - 11.0).collect();
    let c: Vec<f32> = (0..7).map(|i| -(i as f32) / 3.0).collect();
    let h: Vec<u8> = (0..3).flat_map(|i| half::bf16::from_f32(i as f32 + 0.5).to_le_bytes()).collect();
    // written by hand: the safetensors crate would put the f32 tensors first; here "b" (3 bf16 =
    // 6 bytes) puts "c" 2 bytes off f32 alignment
    let mut data: Vec<u8> = bytemuck::cast_slice(&a).to_vec();
    data.extend(&h);
    data.extend(bytemuck::cast_slice::<f32, u8>(&c));
    data.extend(bytemuck::cast_slice::<f32, u8>(&c));
    let header = concat!(
        r#"{"a":{"dtype":"F32","shape":[1000],"data_offsets":[0,4000]},"#,
        r#""b":{"dtype":"BF16","shape":[3],"data_offsets":[4000,4006]},"#,
        r#""c":{"dtype":"F32","shape":[7],"data_offsets":[4006,4034]},"#,
        r#""skip.me":{"dtype":"F32","shape":[7],"data_offsets":[4034,4062]}}"#
    );
    let header = format!("{header:<width$}", width = header.len().next_multiple_of(8));
    let mut file = (header.len() as u64).to_le_bytes().to_vec();
    file.extend(header.as_bytes());
    file.extend(&data);
    std::fs::write(&path, file).unwrap();
    let fresh = || {
        let mut p = Params::new(&Device::Cpu);
        p.add("a", &[1000], vec![0.0; 1000], Kind::Buffer).unwrap();
        p.add("b", &[3], vec![0.0; 3], Kind::Buffer).unwrap();
        p.add("c", &[7], vec![0.0; 7], Kind::Buffer).unwrap();
        p
    };
    let (mut read, mut mapped) = (fresh(), fresh());
    reclmis::checkpoint::load_skipping(&mut read, &path, &["skip."]).unwrap();
    let rep = reclmis::checkpoint::load_mapped_skipping(&mut mapped, &path, &["skip."]).unwrap();
    case(
        "mapped load report",
        rep.loaded == 3 && rep.missing.is_empty() && rep.dropped == ["skip.me"],
        format!("{rep:?}"),
    );
    for id in read.ids() {
        let (x, y) = (read.value(id).to_vec().unwrap(), mapped.value(id).to_vec().unwrap());
        case("mapped values equal read values", x == y, read.name(id));
    }
    use reclmis::tensor::{CpuStorage, Storage};
    let in_place =
        |n: &str| matches!(mapped.value(mapped.id(n).unwrap()).storage(), Storage::Cpu(CpuStorage::MappedF32(_)));
    case("aligned f32 stays in the file", in_place("a"), "a");
    case("misaligned f32 and bf16 are read", !in_place("b") && !in_place("c"), "b, c");
    // the tensors outlive the file's name: the map keeps the old file's pages
    std::fs::remove_file(&path).unwrap();
    case("mapped values after the file is removed", mapped.value(mapped.id("c").unwrap()).to_vec().unwrap() == c, "c");
    std::fs::remove_dir_all(&dir).unwrap();
}
