//! Checkpoints of the official PyTorch code (`torch.save` .pth): the fixture's `checkpoint.pth`
//! imports to exactly the fixture's weights and reproduces the golden evaluation; the reader
//! handles the dtypes, strides and shared storages torch writes; malformed, truncated and foreign
//! files are errors naming the problem; pickled code is never run.

mod common;
use common::fixture::{self, Fixture};
use common::torch_save::{archive, entry, f32_storage, pickle, Entry, Storage};
use reclmis::model::Batch;
use reclmis::pth::{self, Values};
use reclmis::{Device, Tensor};
use std::path::{Path, PathBuf};

fn pth_path() -> PathBuf {
    fixture::root().join("official_tiny/checkpoint.pth")
}

fn tmp(name: &str, bytes: &[u8]) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("reclmis-pth-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let p = dir.join(name);
    std::fs::write(&p, bytes).unwrap();
    p
}

fn err_of(p: &Path) -> String {
    pth::read_state_dict(p).map(|_| ()).expect_err("must be refused").to_string()
}

#[test]
fn pth_imports_to_exactly_the_fixture_weights() {
    let f = Fixture::open("official_tiny");
    let (m, rep) = reclmis::pipeline::import_pth(&pth_path(), None, None, &Device::Cpu).unwrap();
    assert!(rep.stripped_module_prefix && rep.missing.is_empty() && rep.unexpected.is_empty(), "{}", rep.summary());
    let (is, _) = f.get("input.images");
    assert_eq!(m.cfg.img_size, (is[2], is[3]), "image size inferred from the Interactor's tokens");
    assert_eq!(m.cfg.name, "tiny");
    let mut n = 0;
    for id in m.params.ids() {
        let name = m.params.name(id);
        let (_, want) = f.f32(name);
        assert_eq!(m.params.value(id).to_vec().unwrap(), want, "{name}");
        n += 1;
    }
    for (name, c) in m.params.counters() {
        assert_eq!(*c as f64, f.scalar(name), "{name}");
    }
    assert_eq!(n + m.params.counters().len(), rep.loaded);
}

fn check_eval(kind: &str) {
    let dev = common::device(kind);
    let f = Fixture::open("official_tiny");
    let (m, _) = reclmis::pipeline::import_pth(&pth_path(), None, None, &dev).unwrap();
    let (is, img) = f.f32("input.images");
    let (ts, ids) = f.get("input.text_token");
    let (_, valid) = f.get("input.text_mask");
    let i32s = |v: &[f64]| v.iter().map(|&x| x as i32).collect::<Vec<_>>();
    let b = Batch {
        images: Tensor::from_vec(img, &is, &dev).unwrap(),
        ids: Tensor::from_vec_i32(i32s(&ids), &ts, &dev).unwrap(),
        valid: Tensor::from_vec_i32(i32s(&valid), &ts, &dev).unwrap(),
        masks: None,
        text_hidden: None,
    };
    let rec = m.forward_eval(&b).unwrap();
    for key in ["clip_hidden", "interact_img", "probs", "W_poi", "W_woi"] {
        let (_, want) = f.get(&format!("eval.{key}"));
        let got = rec[key].tensor().to_vec().unwrap();
        let scale = want.iter().fold(1e-6f64, |a, w| a.max(w.abs()));
        let e = got.iter().zip(&want).fold(0.0f64, |a, (&g, &w)| a.max((g as f64 - w).abs())) / scale;
        // the golden tests' forward bound (tests/golden_model.rs, FWD_TOL): f32 against f64
        assert!(e <= 1e-4, "{kind}: eval.{key} scaled error {e:.2e}");
    }
}

#[test]
fn pth_import_reproduces_the_golden_eval_cpu() {
    check_eval("cpu");
}

#[test]
fn pth_import_reproduces_the_golden_eval_emu() {
    check_eval("emu");
}

#[test]
fn import_command_writes_a_checkpoint_that_loads_and_never_overwrites() {
    let dir = std::env::temp_dir().join(format!("reclmis-pth-import-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let out = dir.join("model.safetensors");
    let tok = fixture::root().join("official_tiny/tokenizer.json");
    let rep = reclmis::pipeline::import_checkpoint(&pth_path(), &out, None, None, Some(&tok)).unwrap();
    assert!(rep.contains("355 tensors loaded"), "{rep}");
    let (m, _) = reclmis::pipeline::load_run(&out, Some(&tok), &Device::Cpu).unwrap();
    let (m2, _) = reclmis::pipeline::load_run(&pth_path(), Some(&tok), &Device::Cpu).unwrap();
    // load_run leaves the training-only reconstruction of a safetensors checkpoint unread
    for id in m.params.ids() {
        let training_only = reclmis::model::RecLmis::TRAINING_ONLY.iter().any(|p| m.params.name(id).starts_with(p));
        assert_eq!(m.params.is_set(id), !training_only, "{}", m.params.name(id));
        if m.params.is_set(id) {
            assert_eq!(m.params.value(id).to_vec().unwrap(), m2.params.value(id).to_vec().unwrap());
        }
    }
    let before = std::fs::read(&out).unwrap();
    let e = reclmis::pipeline::import_checkpoint(&pth_path(), &out, None, None, None).unwrap_err().to_string();
    assert!(e.contains("exists"), "{e}");
    assert_eq!(std::fs::read(&out).unwrap(), before);
    // a preset whose widths are not the checkpoint's
    let e = reclmis::pipeline::import_checkpoint(&pth_path(), &dir.join("x.safetensors"), Some("official"), None, None)
        .unwrap_err()
        .to_string();
    assert!(e.contains("no preset has the checkpoint's widths"), "{e}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// f16, bf16, f64 and int64 storages; a transposed (non-contiguous) view; two tensors sharing a
/// storage at different offsets.
#[test]
fn dtypes_strides_and_shared_storages() {
    let h: Vec<f32> = vec![0.5, -2.0, 3.25, 384.0]; // exact in f16 and bf16
    let storages = vec![
        Storage {
            class: "HalfStorage",
            bytes: h.iter().flat_map(|&x| half::f16::from_f32(x).to_le_bytes()).collect(),
            numel: 4,
        },
        Storage {
            class: "BFloat16Storage",
            bytes: h.iter().flat_map(|&x| half::bf16::from_f32(x).to_le_bytes()).collect(),
            numel: 4,
        },
        Storage {
            class: "DoubleStorage",
            bytes: [1.5f64, -0.25].iter().flat_map(|x| x.to_le_bytes()).collect(),
            numel: 2,
        },
        Storage { class: "LongStorage", bytes: 7i64.to_le_bytes().to_vec(), numel: 1 },
        f32_storage(&[1., 2., 3., 4., 5., 6.]),
    ];
    let entries = vec![
        entry("half", 0, &[4]),
        entry("bf16", 1, &[2, 2]),
        entry("f64", 2, &[2]),
        Entry { name: "count".into(), storage: 3, offset: 0, size: vec![], stride: vec![] },
        // [2,3] storage read transposed as [3,2]
        Entry { name: "transposed".into(), storage: 4, offset: 0, size: vec![3, 2], stride: vec![1, 3] },
        Entry { name: "tail".into(), storage: 4, offset: 4, size: vec![2], stride: vec![1] },
    ];
    let p = tmp("kinds.pth", &archive(&pickle(&storages, &entries), &storages));
    let sd = pth::read_state_dict(&p).unwrap();
    assert_eq!(sd.found_under, "state_dict");
    assert_eq!(sd.other_keys, vec!["epoch".to_string()]);
    let get = |n: &str| sd.tensors.iter().find(|t| t.name == n).unwrap().clone();
    assert_eq!(get("half").values, Values::F32(h.clone()));
    assert_eq!(get("bf16").values, Values::F32(h.clone()));
    assert_eq!(get("bf16").shape, vec![2, 2]);
    assert_eq!(get("f64").values, Values::F32(vec![1.5, -0.25]));
    assert_eq!(get("count").values, Values::I64(vec![7]));
    assert_eq!(get("transposed").values, Values::F32(vec![1., 4., 2., 5., 3., 6.]));
    assert_eq!(get("tail").values, Values::F32(vec![5., 6.]));
}

fn one_tensor(e: Entry, st: Storage) -> PathBuf {
    let storages = vec![st];
    tmp(&format!("{}.pth", e.name), &archive(&pickle(&storages, &[e]), &storages))
}

#[test]
fn malformed_and_foreign_files_are_clear_errors() {
    let good = std::fs::read(pth_path()).unwrap();
    // truncated: the central directory (at the end) is gone
    let e = err_of(&tmp("trunc.pth", &good[..good.len() / 2]));
    assert!(e.contains("not a valid zip archive"), "{e}");
    // not a zip at all; a legacy (pre-1.6) pickle stream
    assert!(err_of(&tmp("text.pth", b"hello world")).contains("not a torch.save checkpoint"));
    assert!(err_of(&tmp("legacy.pth", &[0x80, 2, 0x8a, 0x0a])).contains("legacy torch.save"));
    // a zip without data.pkl
    let mut z = zip::ZipWriter::new(std::io::Cursor::new(Vec::new()));
    z.start_file("readme.txt", zip::write::SimpleFileOptions::default()).unwrap();
    let zip_bytes = z.finish().unwrap().into_inner();
    assert!(err_of(&tmp("foreign.pth", &zip_bytes)).contains("no <name>/data.pkl"));
    // a view that reaches past its storage
    let e = err_of(&one_tensor(
        Entry { name: "past".into(), storage: 0, offset: 2, size: vec![4], stride: vec![1] },
        f32_storage(&[1., 2., 3., 4.]),
    ));
    assert!(e.contains("past") && e.contains("reaches element 5 of a 4-element storage"), "{e}");
    // a storage file shorter than the pickle says
    let st = Storage { class: "FloatStorage", bytes: vec![0; 12], numel: 4 };
    let e = err_of(&one_tensor(entry("short", 0, &[4]), st));
    assert!(e.contains("holds 12 bytes, its tensor needs 16"), "{e}");
    // a truncated pickle
    let storages = vec![f32_storage(&[1.0])];
    let mut pk = pickle(&storages, &[entry("w", 0, &[1])]);
    pk.truncate(pk.len() - 5);
    let e = err_of(&tmp("trpk.pth", &archive(&pk, &storages)));
    assert!(e.contains("data.pkl") && e.contains("pickle byte"), "{e}");
}

/// A pickle that names `os.system` (what a malicious checkpoint does) is interpreted, never
/// called: the reader returns an error because the result is no state dict, and nothing ran.
#[test]
fn pickled_code_is_never_executed() {
    let marker = std::env::temp_dir().join(format!("reclmis-pwned-{}", std::process::id()));
    let _ = std::fs::remove_file(&marker);
    let mut p = vec![0x80, 2];
    p.extend(b"cos\nsystem\n(X");
    let cmd = format!("touch {}", marker.display());
    p.extend((cmd.len() as u32).to_le_bytes());
    p.extend(cmd.as_bytes());
    p.extend(b"tR.");
    let e = err_of(&tmp("evil.pth", &archive(&p, &[])));
    assert!(e.contains("not a dict"), "{e}");
    // the same call as a state_dict value
    let mut p = vec![0x80, 2, b'}', b'('];
    p.extend(b"X\x0a\x00\x00\x00state_dictcos\nsystem\n(X");
    p.extend((cmd.len() as u32).to_le_bytes());
    p.extend(cmd.as_bytes());
    p.extend(b"tRu.");
    let e = err_of(&tmp("evil2.pth", &archive(&p, &[])));
    assert!(e.contains("no state_dict of tensors"), "{e}");
    assert!(!marker.exists(), "pickled code ran");
}

/// Deep nesting and memo sharing cost no recursion and no copies: 200,000 nested tuples and a
/// list doubled through the memo 40 times (2^40 elements if copied) read in bounded time/memory.
#[test]
fn nesting_and_memo_sharing_are_bounded() {
    let mut p = vec![0x80, 2, b'N'];
    p.extend(std::iter::repeat_n(0x85u8, 200_000)); // TUPLE1
    p.push(b'.');
    assert!(pth::pickle::read(&p).is_ok());
    let mut p = vec![0x80, 2, b']', b'q', 0];
    for _ in 0..40 {
        p.extend([b'h', 0, b'h', 0, 0x86, b'q', 0]); // (m, m) -> m
    }
    p.push(b'.');
    assert!(pth::pickle::read(&p).is_ok());
}

/// Opcodes that grow the stack without making values (MARK, memo gets) hit the same cap as values.
#[test]
fn stack_growth_is_bounded() {
    let mut p = vec![0x80, 2];
    p.extend(std::iter::repeat_n(b'(', 5_000_000));
    p.push(b'.');
    let e = pth::pickle::read(&p).err().expect("refused").to_string();
    assert!(e.contains("limit"), "{e}");
}

/// Found by the long fuzz run: two tensors describing one storage with different sizes or dtypes
/// (the second would have read past the storage) are an error naming the tensor.
#[test]
fn one_storage_described_two_ways_is_refused() {
    let storages = vec![f32_storage(&[1., 2., 3., 4.])];
    let mut pk = pickle(&storages, &[entry("a", 0, &[4]), entry("b", 0, &[2])]);
    // the second tensor's storage claims 8 elements: patch its numel (the second `J 4` after "b")
    let at = pk.windows(2).rposition(|w| w == [b'J', 4]).unwrap();
    pk[at + 1] = 8;
    let e = err_of(&tmp("shared.pth", &archive(&pk, &storages)));
    assert!(e.contains("b: storage 0 is 16 bytes"), "{e}");
}
