//! Fuzz tests of every parser of untrusted files: proptest mutates valid files (byte flips,
//! overwritten runs, truncation, insertions, duplicated spans) and each parser must answer with
//! a value or an error: no panic, no abort, bounded memory (images go through the pixel limit,
//! lowered here so that a mutated header cannot ask for more than a few MB).
//!
//! Cases per parser: `RECLMIS_FUZZ_CASES` (CI uses the default, 64; the long local run is
//! reported in the note).

mod common;
use common::torch_save;
use proptest::prelude::*;
use reclmis::data::lvit;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

fn cases() -> u32 {
    std::env::var("RECLMIS_FUZZ_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(64)
}

fn config() -> ProptestConfig {
    ProptestConfig { cases: cases(), failure_persistence: None, ..ProptestConfig::default() }
}

/// Valid files to start from, made once.
struct Seeds {
    dir: PathBuf,
    checkpoint: Vec<u8>,
    png: Vec<u8>,
    png16: Vec<u8>,
    tiff: Vec<u8>,
    bmp: Vec<u8>,
    csv: Vec<u8>,
    xlsx: Vec<u8>,
    tokenizer: Vec<u8>,
    /// A torch.save checkpoint (several dtypes, a strided view, a shared storage): its storages
    /// and its pickle, and the whole archive.
    pth_storages: Vec<torch_save::Storage>,
    pth_pickle: Vec<u8>,
    pth: Vec<u8>,
}

fn pth_seed() -> (Vec<torch_save::Storage>, Vec<u8>) {
    use torch_save::{entry, f32_storage, Entry, Storage};
    let storages = vec![
        f32_storage(&(0..16).map(|i| i as f32 * 0.5).collect::<Vec<_>>()),
        Storage { class: "HalfStorage", bytes: vec![0x00, 0x3c, 0x00, 0xc0], numel: 2 },
        Storage { class: "LongStorage", bytes: 1i64.to_le_bytes().to_vec(), numel: 1 },
    ];
    let entries = vec![
        entry("w", 0, &[4, 4]),
        Entry { name: "w_t".into(), storage: 0, offset: 1, size: vec![3, 2], stride: vec![1, 4] },
        entry("h", 1, &[2]),
        Entry { name: "n".into(), storage: 2, offset: 0, size: vec![], stride: vec![] },
    ];
    let pk = torch_save::pickle(&storages, &entries);
    (storages, pk)
}

fn seeds() -> &'static Seeds {
    static S: OnceLock<Seeds> = OnceLock::new();
    S.get_or_init(|| {
        lvit::set_max_pixels(1 << 18);
        let dir = std::env::temp_dir().join(format!("reclmis-fuzz-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let data = dir.join("data");
        reclmis::data::write::write(
            &data,
            &reclmis::data::write::SynthOpts { train: 4, val: 2, test: 2, size: 16, seed: 1, ..Default::default() },
        )
        .unwrap();
        let folder = data.join("Train_Folder");
        let img = std::fs::read_dir(folder.join("img")).unwrap().next().unwrap().unwrap().path();
        let png = std::fs::read(&img).unwrap();
        let dynimg = image::load_from_memory(&png).unwrap();
        let enc = |f: image::ImageFormat, im: &image::DynamicImage| {
            let mut c = std::io::Cursor::new(Vec::new());
            im.write_to(&mut c, f).unwrap();
            c.into_inner()
        };
        let png16 = enc(image::ImageFormat::Png, &image::DynamicImage::ImageLuma16(dynimg.to_luma16()));
        let tiff = enc(image::ImageFormat::Tiff, &dynimg);
        let bmp = enc(image::ImageFormat::Bmp, &image::DynamicImage::ImageRgb8(dynimg.to_rgb8()));
        // a small model's checkpoint with metadata, and a tokenizer
        let tok = reclmis::text::NoteTokenizer::train_word_level(["left lung", "right lung"].iter(), 18).unwrap();
        let mut cfg = reclmis::model::Config::preset("small").unwrap();
        cfg.img_size = (16, 16);
        cfg.vocab_size = tok.vocab_size();
        let m = reclmis::model::RecLmis::new(cfg.clone(), &reclmis::Device::Cpu, 1).unwrap();
        let ck = dir.join("ck.safetensors");
        reclmis::checkpoint::save_with(&m.params, &cfg.to_metadata(), &ck).unwrap();
        let (pth_storages, pth_pickle) = pth_seed();
        let pth = torch_save::archive(&pth_pickle, &pth_storages);
        Seeds {
            pth_storages,
            pth_pickle,
            pth,
            checkpoint: std::fs::read(&ck).unwrap(),
            png,
            png16,
            tiff,
            bmp,
            csv: std::fs::read(folder.join("Train_text.csv")).unwrap(),
            xlsx: std::fs::read(folder.join("Train_text.xlsx")).unwrap(),
            tokenizer: tok.to_json().unwrap().into_bytes(),
            dir,
        }
    })
}

#[derive(Clone, Debug)]
enum Edit {
    Flip(usize, u8),
    Overwrite(usize, Vec<u8>),
    Truncate(usize),
    Insert(usize, Vec<u8>),
    Duplicate(usize, usize),
}

fn edit() -> impl Strategy<Value = Edit> {
    prop_oneof![
        4 => (any::<usize>(), 1u8..=255).prop_map(|(i, b)| Edit::Flip(i, b)),
        2 => (any::<usize>(), prop::collection::vec(prop_oneof![Just(0u8), Just(0xff), Just(b'9'), any::<u8>()], 1..9))
            .prop_map(|(i, v)| Edit::Overwrite(i, v)),
        1 => any::<usize>().prop_map(Edit::Truncate),
        1 => (any::<usize>(), prop::collection::vec(any::<u8>(), 1..17)).prop_map(|(i, v)| Edit::Insert(i, v)),
        1 => (any::<usize>(), 1usize..64).prop_map(|(i, n)| Edit::Duplicate(i, n)),
    ]
}

fn mutate(seed: &[u8], edits: &[Edit]) -> Vec<u8> {
    let mut v = seed.to_vec();
    for e in edits {
        if v.is_empty() {
            break;
        }
        let n = v.len();
        match e {
            Edit::Flip(i, b) => v[i % n] ^= b,
            Edit::Overwrite(i, bytes) => {
                for (k, b) in bytes.iter().enumerate() {
                    let j = (i % n + k) % n;
                    v[j] = *b;
                }
            }
            Edit::Truncate(i) => v.truncate(i % n),
            Edit::Insert(i, bytes) => {
                let at = i % (n + 1);
                v.splice(at..at, bytes.iter().copied());
            }
            Edit::Duplicate(i, len) => {
                let at = i % n;
                let span: Vec<u8> = v[at..(at + len).min(n)].to_vec();
                v.splice(at..at, span);
            }
        }
    }
    v
}

/// Writes the mutated file under a per-thread name.
fn file(name: &str, bytes: &[u8]) -> PathBuf {
    let p = seeds().dir.join(format!("{:?}-{name}", std::thread::current().id()).replace(['(', ')'], ""));
    std::fs::write(&p, bytes).unwrap();
    p
}

fn edits() -> impl Strategy<Value = Vec<Edit>> {
    prop::collection::vec(edit(), 1..6)
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn checkpoint_with_metadata(e in edits()) {
        let s = seeds();
        let p = file("ck.safetensors", &mutate(&s.checkpoint, &e));
        // the metadata may parse into a config (or not); loading must answer either way
        if let Ok(meta) = reclmis::checkpoint::read_metadata(&p) {
            if let Ok(cfg) = reclmis::model::Config::from_metadata(&meta) {
                if cfg.img_size.0 * cfg.img_size.1 <= 64 * 64 && cfg.vocab_size < 1 << 12 {
                    let mut m = reclmis::model::RecLmis::new(cfg, &reclmis::Device::Cpu, 0).unwrap();
                    let _ = reclmis::checkpoint::load(&mut m.params, &p);
                }
            }
        }
        let mut cfg = reclmis::model::Config::preset("small").unwrap();
        cfg.img_size = (16, 16);
        cfg.vocab_size = 8;
        let mut m = reclmis::model::RecLmis::new(cfg.clone(), &reclmis::Device::Cpu, 0).unwrap();
        let _ = reclmis::checkpoint::load(&mut m.params, &p);
        // the same file loaded in place (memory-mapped), and the values used
        let mut m = reclmis::model::RecLmis::new(cfg, &reclmis::Device::Cpu, 0).unwrap();
        if reclmis::checkpoint::load_mapped_skipping(&mut m.params, &p, &[]).is_ok() {
            for id in m.params.ids() {
                let _ = m.params.value(id).to_vec();
            }
        }
    }

    #[test]
    fn pth_archive(e in edits()) {
        let s = seeds();
        let _ = reclmis::pth::read_state_dict(&file("ck.pth", &mutate(&s.pth, &e)));
    }

    /// The pickle mutated inside a valid archive (a mutated archive mostly fails its CRC check
    /// before the pickle is read), then loaded into a model as `--checkpoint` would.
    #[test]
    fn pth_pickle(e in edits()) {
        let s = seeds();
        let p = file("pk.pth", &torch_save::archive(&mutate(&s.pth_pickle, &e), &s.pth_storages));
        let _ = reclmis::pth::read_state_dict(&p);
        let mut cfg = reclmis::model::Config::preset("small").unwrap();
        cfg.img_size = (16, 16);
        cfg.vocab_size = 8;
        let mut m = reclmis::model::RecLmis::new(cfg, &reclmis::Device::Cpu, 0).unwrap();
        let _ = reclmis::checkpoint::load_pth(&mut m.params, &p);
    }

    #[test]
    fn png_tiff_bmp_images_and_masks(e in edits(), which in 0usize..4) {
        let s = seeds();
        let (seed, ext) = [(&s.png, "png"), (&s.png16, "png"), (&s.tiff, "tif"), (&s.bmp, "bmp")][which];
        let p = file(&format!("img.{ext}"), &mutate(seed, &e));
        let _ = lvit::decode_image(&p, 16, 16);
        let _ = lvit::decode_mask(&p);
    }

    #[test]
    fn csv_and_xlsx_notes_sheets(e in edits(), xlsx in any::<bool>()) {
        let s = seeds();
        let (seed, ext) = if xlsx { (&s.xlsx, "xlsx") } else { (&s.csv, "csv") };
        let p = file(&format!("sheet.{ext}"), &mutate(seed, &e));
        let _ = lvit::read_sheet(&p);
    }

    #[test]
    fn tokenizer_json(e in edits()) {
        let s = seeds();
        let bytes = mutate(&s.tokenizer, &e);
        if let Ok(t) = reclmis::text::NoteTokenizer::from_bytes(&bytes, 18) {
            let _ = t.encode("Bilateral pulmonary infection, lower left lung.");
        }
        let _ = reclmis::text::NoteTokenizer::from_file(&file("tokenizer.json", &bytes), 18);
    }

    /// The CLIP structure (NFC, Replace, the CLIP split, ByteLevel, BPE merges, a template) with a
    /// vocabulary small enough for many cases.
    #[test]
    fn tokenizer_json_bpe(e in edits()) {
        let bytes = mutate(small_bpe(), &e);
        if let Ok(t) = reclmis::text::NoteTokenizer::from_bytes(&bytes, 18) {
            let _ = t.encode("Bilateral pulmonary infection, lower left lung.");
            let _ = t.encode("e\u{301}l'll <|endoftext|> 12 ½ ");
        }
    }
}

/// The fixture's CLIP tokenizer.json with a vocabulary cut to the bytes of a-z plus a few merges.
fn small_bpe() -> &'static [u8] {
    static B: std::sync::OnceLock<Vec<u8>> = std::sync::OnceLock::new();
    B.get_or_init(|| {
        let p = common::fixture::root().join("official_tiny/tokenizer.json");
        let mut v: serde_json::Value = serde_json::from_slice(&std::fs::read(p).unwrap()).unwrap();
        let mut vocab = serde_json::Map::new();
        let mut id = 0u32;
        for c in 'a'..='z' {
            for t in [c.to_string(), format!("{c}</w>")] {
                vocab.insert(t, id.into());
                id += 1;
            }
        }
        for t in ["lu", "lung</w>", "ng</w>", "<|endoftext|>", "<|startoftext|>"] {
            vocab.insert(t.into(), id.into());
            id += 1;
        }
        v["model"]["vocab"] = vocab.into();
        v["model"]["merges"] = serde_json::json!(["l u", "n g</w>", "lu ng</w>"]);
        serde_json::to_vec(&v).unwrap()
    })
}

#[test]
fn seeds_are_valid_files() {
    // the fuzz starts from files each parser accepts, so the mutations test the parsers' depths
    let s = seeds();
    assert!(lvit::decode_image(&file("ok.png", &s.png), 16, 16).is_ok());
    assert!(lvit::decode_image(&file("ok.tif", &s.tiff), 16, 16).is_ok());
    assert!(lvit::decode_image(&file("ok.bmp", &s.bmp), 16, 16).is_ok());
    assert!(lvit::read_sheet(&file("ok.xlsx", &s.xlsx)).is_ok());
    assert!(lvit::read_sheet(&file("ok.csv", &s.csv)).is_ok());
    assert!(reclmis::text::NoteTokenizer::from_bytes(&s.tokenizer, 18).is_ok());
    let bpe = reclmis::text::NoteTokenizer::from_bytes(small_bpe(), 18).unwrap();
    assert_eq!(bpe.encode("lung").unwrap().0[..3], [49406, 53, 49407]);
    assert!(reclmis::checkpoint::read_metadata(&file("ok.safetensors", &s.checkpoint)).is_ok());
    assert_eq!(reclmis::pth::read_state_dict(&file("ok.pth", &s.pth)).unwrap().tensors.len(), 4);
    let _ = Path::new("");
}
