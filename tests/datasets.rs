//! The published dataset layouts (../shared/DATASETS.md), built in miniature and loaded unchanged:
//! QaTa-COV19 (masks `mask_<image>`, one `Train_Val_text.xlsx` in Train_Folder keyed by the mask
//! names for both Train and Val, `Test_text.xlsx`), MosMedData+ (masks sharing the image's name, a
//! sheet per split), and images of another type than their masks (MoNuSeg's `x.tif` with `x.png`).

use reclmis::data::lvit::Split;
use reclmis::pipeline;
use std::path::{Path, PathBuf};

const SIDE: u32 = 32;

fn root(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("reclmis-layout-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}

/// An image whose brightness encodes `k`, and a mask with `k + 1` foreground rows, so that each
/// sample's pairing (image, mask, note) can be checked after loading.
fn sample(img: &Path, mask: &Path, k: u32) {
    std::fs::create_dir_all(img.parent().unwrap()).unwrap();
    std::fs::create_dir_all(mask.parent().unwrap()).unwrap();
    let im = image::GrayImage::from_pixel(SIDE, SIDE, image::Luma([(20 * k + 10) as u8]));
    im.save(img).unwrap();
    let m = image::GrayImage::from_fn(SIDE, SIDE, |_, y| image::Luma([if y <= k { 255 } else { 0 }]));
    m.save(mask).unwrap();
}

fn xlsx(path: &Path, rows: &[(String, String)]) {
    let mut wb = rust_xlsxwriter::Workbook::new();
    let ws = wb.add_worksheet();
    ws.write_string(0, 0, "Image").unwrap();
    ws.write_string(0, 1, "Description").unwrap();
    for (i, (k, v)) in rows.iter().enumerate() {
        ws.write_string(i as u32 + 1, 0, k).unwrap();
        ws.write_string(i as u32 + 1, 1, v).unwrap();
    }
    wb.save(path).unwrap();
}

fn note(k: u32) -> String {
    format!("Unilateral pulmonary infection, one infected area, lower left lung {k}.")
}

/// Loads a split and checks each sample's note and mask against the `k` its image encodes.
fn check(root: &Path, split: Split, want: &[u32]) {
    let d = pipeline::load(root, split, SIDE as usize, SIDE as usize)
        .unwrap_or_else(|e| panic!("{split:?} of {}: {e}", root.display()));
    assert_eq!(d.len(), want.len(), "{split:?}");
    let hw = (SIDE * SIDE) as usize;
    let mut seen = vec![];
    for (i, e) in d.entries.iter().enumerate() {
        let k = (d.images[i * 3 * hw] as u32 - 10) / 20;
        assert_eq!(e.note, note(k), "{split:?}: {} got another image's note", e.image.display());
        let fg: usize = d.masks[i * hw..(i + 1) * hw].iter().map(|&m| m as usize).sum();
        assert_eq!(fg, (k as usize + 1) * SIDE as usize, "{split:?}: {} got another image's mask", e.image.display());
        seen.push(k);
    }
    seen.sort();
    assert_eq!(seen, want);
}

#[test]
fn qata_cov19_layout_with_the_shared_train_val_sheet() {
    let r = root("qata");
    let mut shared = vec![];
    for (split, ks) in [(Split::Train, vec![0, 1, 2]), (Split::Val, vec![3, 4]), (Split::Test, vec![5, 6])] {
        let f = r.join(split.folder());
        let mut rows = vec![];
        for k in ks {
            let name = format!("covid_{k}.png");
            sample(&f.join("img").join(&name), &f.join("labelcol").join(format!("mask_{name}")), k);
            rows.push((format!("mask_{name}"), note(k)));
        }
        match split {
            Split::Test => xlsx(&f.join("Test_text.xlsx"), &rows),
            _ => shared.extend(rows),
        }
    }
    xlsx(&r.join("Train_Folder/Train_Val_text.xlsx"), &shared);
    assert!(!r.join("Val_Folder").read_dir().unwrap().any(|e| e.unwrap().path().extension().is_some()));
    check(&r, Split::Train, &[0, 1, 2]);
    check(&r, Split::Val, &[3, 4]);
    check(&r, Split::Test, &[5, 6]);
    let _ = std::fs::remove_dir_all(&r);
}

#[test]
fn mosmeddata_layout_masks_share_the_image_name() {
    let r = root("mosmed");
    for (split, ks) in [(Split::Train, vec![0, 1]), (Split::Val, vec![2]), (Split::Test, vec![3, 4])] {
        let f = r.join(split.folder());
        let mut rows = vec![];
        for k in ks {
            let name = format!("study_{k:04}_slice.png");
            sample(&f.join("img").join(&name), &f.join("labelcol").join(&name), k);
            rows.push((name, note(k)));
        }
        xlsx(&f.join(format!("{}.xlsx", split.sheet_stem())), &rows);
    }
    check(&r, Split::Train, &[0, 1]);
    check(&r, Split::Val, &[2]);
    check(&r, Split::Test, &[3, 4]);
    let _ = std::fs::remove_dir_all(&r);
}

#[test]
fn masks_with_another_extension_than_their_image() {
    let r = root("tif");
    for (split, ks) in [(Split::Train, vec![0, 1]), (Split::Val, vec![2]), (Split::Test, vec![3])] {
        let f = r.join(split.folder());
        let mut rows = vec![];
        for k in ks {
            let img = f.join("img").join(format!("TCGA-{k}.tif"));
            sample(&img, &f.join("labelcol").join(format!("TCGA-{k}.png")), k);
            // the sheet may name the image file or the mask file
            let key = if k % 2 == 0 { format!("TCGA-{k}.tif") } else { format!("TCGA-{k}.png") };
            rows.push((key, note(k)));
        }
        xlsx(&f.join(format!("{}.xlsx", split.sheet_stem())), &rows);
    }
    check(&r, Split::Train, &[0, 1]);
    check(&r, Split::Val, &[2]);
    check(&r, Split::Test, &[3]);
    // a mask that is missing names every name looked for
    std::fs::remove_file(r.join("Test_Folder/labelcol/TCGA-3.png")).unwrap();
    let e = pipeline::load(&r, Split::Test, 32, 32).err().expect("no mask").to_string();
    assert!(e.contains("mask_TCGA-3.tif") && e.contains("TCGA-3.png"), "{e}");
    let _ = std::fs::remove_dir_all(&r);
}

#[test]
fn val_without_any_sheet_names_what_it_looked_for() {
    let r = root("nosheet");
    for (split, k) in [(Split::Train, 0), (Split::Val, 1)] {
        let f = r.join(split.folder());
        sample(&f.join("img/a.png"), &f.join("labelcol/mask_a.png"), k);
    }
    xlsx(&r.join("Train_Folder/Train_text.xlsx"), &[("mask_a.png".into(), note(0))]);
    let e = pipeline::load(&r, Split::Val, 32, 32).err().expect("no sheet").to_string();
    assert!(e.contains("Val_text.xlsx") && e.contains("Train_Val_text.xlsx"), "{e}");
    let _ = std::fs::remove_dir_all(&r);
}

/// synth writes, for each image, the counterfactual note (naming only the opacity the real note
/// leaves out) and that opacity's mask; the folder stays one that `remove_synthetic` recognises
/// as synth's.
#[test]
fn synth_counterfactual_notes_and_masks() {
    use reclmis::data::write::{remove_synthetic, write, SynthOpts};
    let r = root("cf");
    write(&r, &SynthOpts { train: 3, val: 4, test: 5, size: 32, seed: 9, ..Default::default() }).unwrap();
    for (split, n) in [(Split::Train, 3), (Split::Val, 4), (Split::Test, 5)] {
        let real = pipeline::load(&r, split, 32, 32).unwrap();
        let cf = pipeline::load_counterfactual(&r, split, 32, 32).unwrap().expect("synth writes them");
        assert_eq!(cf.len(), n, "every image has a distractor by default");
        for i in 0..n {
            assert_eq!(cf.entries[i].image, real.entries[i].image);
            assert!(cf.entries[i].note.starts_with("Unilateral pulmonary infection, one infected area, "));
            assert_ne!(cf.entries[i].note, real.entries[i].note);
            let m = &cf.masks[i * 32 * 32..(i + 1) * 32 * 32];
            let g = &real.masks[i * 32 * 32..(i + 1) * 32 * 32];
            let (cf_px, shared) =
                (m.iter().filter(|&&x| x == 1).count(), m.iter().zip(g).filter(|(&a, &b)| a == 1 && b == 1).count());
            assert!(
                cf_px > 0 && 2 * shared < cf_px,
                "{}: the counterfactual opacity is another one",
                cf.entries[i].note
            );
        }
    }
    remove_synthetic(&r).unwrap();
    let _ = std::fs::remove_dir_all(&r);
}
