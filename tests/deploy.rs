//! Deployment: `reclmis export` writes an inference checkpoint (no training-only tensors, the
//! tokenizer inside) that gives the same masks and probabilities as the training checkpoint it
//! came from, on the golden fixture's weights (cpu and emu); `reclmis-infer` writes the same
//! masks as `reclmis infer`; every refusal names its reason and overwrites nothing.

mod common;
use common::fixture;
use reclmis::model::{Batch, RecLmis};
use reclmis::pipeline::export::{export, ExportDtype};
use reclmis::pipeline::{self, visual};
use reclmis::{Device, Tensor};
use std::path::{Path, PathBuf};
use std::process::Command;

const NOTE: &str = "Bilateral pulmonary infection, two infected areas, all left lung and all right lung.";

fn dir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("reclmis-deploy-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn tokenizer() -> PathBuf {
    fixture::root().join("official_tiny/tokenizer.json")
}

/// The fixture's official weights as a reclmis training checkpoint (through `import`).
fn training_checkpoint(d: &Path) -> PathBuf {
    let out = d.join("train.safetensors");
    pipeline::import_checkpoint(
        &fixture::root().join("official_tiny/checkpoint.pth"),
        &out,
        None,
        None,
        Some(&tokenizer()),
    )
    .unwrap();
    out
}

/// A test image: a smooth pattern with a bright blob, saved as PNG.
fn image(d: &Path, name: &str, seed: u32) -> PathBuf {
    let img = image::RgbImage::from_fn(40, 36, |x, y| {
        let blob = ((x as i32 - 12 - seed as i32).pow(2) + (y as i32 - 20).pow(2) < 60) as u8;
        image::Rgb([(x * 5 + seed * 17) as u8 ^ (y * 3) as u8, blob * 200 + (y * 2) as u8, (x + y) as u8])
    });
    let p = d.join(name);
    img.save(&p).unwrap();
    p
}

fn probs(m: &RecLmis, tok: &reclmis::text::NoteTokenizer, dev: &Device) -> Vec<f32> {
    m.infer(&batch(m, tok, dev)).unwrap().to_vec().unwrap()
}

fn batch(m: &RecLmis, tok: &reclmis::text::NoteTokenizer, dev: &Device) -> Batch {
    let (h, w) = m.cfg.img_size;
    let x: Vec<f32> = (0..3 * h * w).map(|i| ((i * 7919) % 251) as f32 / 250.0).collect();
    let (ids, valid) = tok.encode(NOTE).unwrap();
    let l = ids.len();
    Batch {
        images: Tensor::from_vec(x, &[1, 3, h, w], dev).unwrap(),
        ids: Tensor::from_vec_i32(ids, &[1, l], dev).unwrap(),
        valid: Tensor::from_vec_i32(valid, &[1, l], dev).unwrap(),
        masks: None,
        text_hidden: None,
    }
}

fn bf16_round(x: f32) -> f32 {
    half::bf16::from_f32(x).to_f32()
}

fn f16_round(x: f32) -> f32 {
    half::f16::from_f32(x).to_f32()
}

fn check_export_matches(kind: &str) {
    let d = dir(kind);
    let train = training_checkpoint(&d);
    let out = d.join("model.safetensors");
    let rep = export(&train, Some(&tokenizer()), &out, ExportDtype::F32, false).unwrap();
    assert!(rep.left_out > 0 && rep.left_out_params > 0, "{rep}");
    let dev = common::device(kind);
    let (full, tok_a) = pipeline::load_run(&train, Some(&tokenizer()), &dev).unwrap();
    // the exported file needs no tokenizer beside it: it carries its own
    let (slim, tok_b) = pipeline::load_run(&out, None, &dev).unwrap();
    assert_eq!(tok_a.encode(NOTE).unwrap(), tok_b.encode(NOTE).unwrap());
    // the reconstruction is not in the file and takes no memory once loaded
    for id in slim.params.ids() {
        let name = slim.params.name(id);
        let training_only =
            RecLmis::TRAINING_ONLY.iter().chain(&RecLmis::WEIGHTS_OF_INTEREST).any(|p| name.starts_with(p));
        assert_eq!(slim.params.is_set(id), !training_only, "{name}");
    }
    // loading the training checkpoint for inference leaves its reconstruction unread
    for id in full.params.ids() {
        let name = full.params.name(id);
        let training_only = RecLmis::TRAINING_ONLY.iter().any(|p| name.starts_with(p));
        assert_eq!(full.params.is_set(id), !training_only, "{name}");
    }
    // the same weights through the same ops: the same probabilities, bit for bit
    let (a, b) = (probs(&full, &tok_a, &dev), probs(&slim, &tok_b, &dev));
    assert!(a.iter().zip(&b).all(|(x, y)| x.to_bits() == y.to_bits()), "{kind}: probabilities differ");
    // the mask-only path (activations freed as it goes) computes what the evaluation forward does
    let (full_w, _) = pipeline::load_run(&train, Some(&tokenizer()), &dev).unwrap();
    let rec = full_w.forward_eval(&batch(&full_w, &tok_a, &dev)).unwrap();
    let e = rec["probs"].tensor().to_vec().unwrap();
    assert!(a.iter().zip(&e).all(|(x, y)| x.to_bits() == y.to_bits()), "{kind}: infer and forward_eval differ");
    // and the same mask on an image file, through the path both commands take
    let img = image(&d, "x.png", 0);
    let (ea, _) = visual::explain(&full, &tok_a, &img, NOTE, &dev, false).unwrap();
    let (eb, _) = visual::explain(&slim, &tok_b, &img, NOTE, &dev, false).unwrap();
    assert_eq!(ea.mask, eb.mask);
    // W_poi / W_woi were left out: explain says so instead of failing in an op
    let e = visual::explain(&slim, &tok_b, &img, NOTE, &dev, true).err().unwrap().to_string();
    assert!(e.contains("--weights-of-interest"), "{e}");
    // bf16 and f16: every weight is its f32 value rounded to nearest even, the batch-norm
    // statistics stay exact. (The fixture's random weights, with attention sharpened 5x, are
    // too chaotic to compare probabilities across a rounding: bf16 moves some by 0.6 there.)
    for (dtype, round) in [(ExportDtype::Bf16, bf16_round as fn(f32) -> f32), (ExportDtype::F16, f16_round)] {
        let half = d.join(format!("model-{dtype:?}.safetensors"));
        export(&train, Some(&tokenizer()), &half, dtype, true).unwrap();
        let (mh, _) = pipeline::load_run(&half, None, &dev).unwrap();
        assert!(mh.has_weights_of_interest());
        let mut rounded = 0;
        for id in full.params.ids() {
            let name = full.params.name(id);
            if RecLmis::TRAINING_ONLY.iter().any(|p| name.starts_with(p)) {
                continue;
            }
            let want = full.params.value(id).to_vec().unwrap();
            let got = mh.params.value(mh.params.id(name).unwrap()).to_vec().unwrap();
            let buffer = matches!(full.params.kind(id), reclmis::nn::params::Kind::Buffer);
            for (w, g) in want.iter().zip(&got) {
                let expect = if buffer { *w } else { round(*w) };
                assert_eq!(g.to_bits(), expect.to_bits(), "{kind} {dtype:?} {name}: {w} loaded as {g}");
                rounded += (g != w) as usize;
            }
        }
        assert!(rounded > 0, "{dtype:?} changed nothing");
        assert!(std::fs::metadata(&half).unwrap().len() < std::fs::metadata(&out).unwrap().len());
    }
    let _ = std::fs::remove_dir_all(&d);
}

#[test]
fn exported_checkpoint_gives_the_same_masks_cpu() {
    check_export_matches("cpu");
}

#[test]
fn exported_checkpoint_gives_the_same_masks_emu() {
    check_export_matches("emu");
    // everything that ran on emu in this process (this test's inference) is a kernel the
    // inference build embeds: reclmis-infer --features cuda never meets a missing one
    let launched = reclmis::device::emu::launched_kernels();
    assert!(launched.len() > 5, "{launched:?}");
    let missing: Vec<_> = launched.iter().filter(|k| !k.for_inference()).collect();
    assert!(missing.is_empty(), "the inference path launched training-only kernels {missing:?}");
}

#[test]
fn export_refuses_what_it_must_not_do() {
    let d = dir("refuse");
    let train = training_checkpoint(&d);
    let out = d.join("model.safetensors");
    std::fs::write(&out, b"the user's file").unwrap();
    let e = export(&train, Some(&tokenizer()), &out, ExportDtype::F32, false).err().unwrap().to_string();
    assert!(e.contains("exists"), "{e}");
    assert_eq!(std::fs::read(&out).unwrap(), b"the user's file");
    // an inference checkpoint without the scoring MLPs cannot give them back
    let slim = d.join("slim.safetensors");
    export(&train, Some(&tokenizer()), &slim, ExportDtype::F32, false).unwrap();
    let e = export(&slim, None, &d.join("again.safetensors"), ExportDtype::F32, true).err().unwrap().to_string();
    assert!(e.contains("mlp_visual"), "{e}");
    assert!(!d.join("again.safetensors").exists());
    assert!("f8".parse::<ExportDtype>().is_err());
    let _ = std::fs::remove_dir_all(&d);
}

#[test]
fn a_checkpoint_missing_a_tensor_the_mask_needs_is_refused() {
    let d = dir("missing");
    let train = training_checkpoint(&d);
    let (m, _) = pipeline::load_run(&train, Some(&tokenizer()), &Device::Cpu).unwrap();
    // rewrite it without one decoder weight
    let values = reclmis::checkpoint::host_values(&m.params).unwrap();
    let kept: Vec<_> = values
        .iter()
        .filter(|(n, _, _)| n != "outc.weight")
        .map(|(n, s, v)| (n.clone(), s.clone(), reclmis::checkpoint::Data::F32(v)))
        .collect();
    let meta: Vec<(String, String)> = reclmis::checkpoint::read_metadata(&train).unwrap().into_iter().collect();
    let cut = d.join("cut.safetensors");
    reclmis::checkpoint::write_tensors(&cut, &kept, &meta).unwrap();
    let e = pipeline::load_run(&cut, Some(&tokenizer()), &Device::Cpu).err().unwrap().to_string();
    assert!(e.contains("incomplete") && e.contains("outc"), "{e}");
    let _ = std::fs::remove_dir_all(&d);
}

/// The deployment binary, end to end: one image, then a folder with a notes sheet; the masks are
/// those `reclmis infer` writes, the Dice is printed, and nothing that exists is overwritten.
#[test]
fn reclmis_infer_writes_the_masks_reclmis_infer_writes() {
    let d = dir("bin");
    let train = training_checkpoint(&d);
    let model = d.join("model.safetensors");
    export(&train, Some(&tokenizer()), &model, ExportDtype::F32, false).unwrap();
    let imgs = d.join("imgs");
    std::fs::create_dir_all(&imgs).unwrap();
    let names = ["a.png", "b.png"];
    for (i, n) in names.iter().enumerate() {
        image(&imgs, n, i as u32 * 5);
    }
    let masks = d.join("masks");
    std::fs::create_dir_all(&masks).unwrap();
    for n in names {
        image::GrayImage::from_fn(40, 36, |x, _| image::Luma([(x > 20) as u8 * 255])).save(masks.join(n)).unwrap();
    }
    std::fs::write(d.join("notes.csv"), format!("Image,Description\na.png,\"{NOTE}\"\nb.png,Left lung.\n")).unwrap();
    let bin = env!("CARGO_BIN_EXE_reclmis-infer");
    let run = |args: &[&str]| Command::new(bin).args(args).output().unwrap();
    let s = |p: &Path| p.to_str().unwrap().to_string();
    let out = d.join("out");
    let o = run(&[
        "--checkpoint",
        &s(&model),
        "--images",
        &s(&imgs),
        "--notes",
        &s(&d.join("notes.csv")),
        "--masks",
        &s(&masks),
        "--out",
        &s(&out),
        "--device",
        "cpu",
        "--overlay",
    ]);
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "{stdout}{}", String::from_utf8_lossy(&o.stderr));
    assert!(stdout.contains("Dice") && stdout.contains("mean Dice"), "{stdout}");
    // the library path `reclmis infer` takes, with the training checkpoint
    let (m, tok) = pipeline::load_run(&train, Some(&tokenizer()), &Device::Cpu).unwrap();
    for (n, note) in [("a", NOTE), ("b", "Left lung.")] {
        let (e, orig) = visual::explain(&m, &tok, &imgs.join(format!("{n}.png")), note, &Device::Cpu, false).unwrap();
        let want = d.join(format!("want-{n}"));
        visual::write_infer(&e, &orig, None, &want).unwrap();
        assert_eq!(
            std::fs::read(want.join("mask.png")).unwrap(),
            std::fs::read(out.join(format!("{n}_mask.png"))).unwrap()
        );
        assert!(out.join(format!("{n}_overlay.png")).is_file());
    }
    // one image; the same run again refuses before writing anything
    let one = d.join("one");
    let args = ["--checkpoint", &s(&model), "--image", &s(&imgs.join("a.png")), "--note", NOTE, "--out", &s(&one)];
    assert!(run(&args).status.success());
    assert_eq!(std::fs::read(one.join("mask.png")).unwrap(), std::fs::read(out.join("a_mask.png")).unwrap());
    let o = run(&args);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("never overwrites"));
    let before = std::fs::read(out.join("a_mask.png")).unwrap();
    let o = run(&[
        "--checkpoint",
        &s(&model),
        "--images",
        &s(&imgs),
        "--notes",
        &s(&d.join("notes.csv")),
        "--out",
        &s(&out),
    ]);
    assert!(!o.status.success() && String::from_utf8_lossy(&o.stderr).contains("a_mask.png"));
    assert_eq!(std::fs::read(out.join("a_mask.png")).unwrap(), before);
    // usage errors exit 2 with the usage; a missing note is named
    let o = run(&["--checkpoint"]);
    assert_eq!(o.status.code(), Some(2));
    let o = run(&["--checkpoint", &s(&model), "--image", &s(&imgs.join("a.png")), "--out", &s(&d.join("o2"))]);
    assert!(String::from_utf8_lossy(&o.stderr).contains("--note"));
    let _ = std::fs::remove_dir_all(&d);
}
