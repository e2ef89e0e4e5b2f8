//! `reclmis synth`: writes a synthetic dataset in the LViT layout (QaTa naming: `mask_<image>`,
//! the sheet keyed by the mask's file name), with the notes sheet as xlsx and csv.

use super::lvit::Split;
use super::synth;
use crate::error::{Error, Result};
use crate::rng::Rng;
use std::path::Path;

pub struct SynthOpts {
    pub train: usize,
    pub val: usize,
    pub test: usize,
    pub size: usize,
    pub seed: u64,
    /// Share of notes given one of the real notes' noise patterns.
    pub note_noise: f64,
    /// Share of images with an opacity that the note does not mention.
    pub distractors: f64,
}

impl Default for SynthOpts {
    fn default() -> Self {
        SynthOpts { train: 400, val: 80, test: 80, size: 96, seed: 1, note_noise: 0.03, distractors: 1.0 }
    }
}

fn io_err(path: &Path, e: impl std::fmt::Display) -> Error {
    Error::Data { path: path.display().to_string(), detail: e.to_string() }
}

/// The file synth writes at a dataset's root: the proof that reclmis made the folder.
pub const MARKER: &str = ".reclmis-synth";

pub use super::lvit::{COUNTERFACTUAL_DIR, COUNTERFACTUAL_SHEET};

/// Whether a file name inside a split folder is one synth writes.
fn synth_made(name: &str) -> bool {
    let png = |n: &str| n.starts_with("synth_") && n.ends_with(".png");
    png(name)
        || name.strip_prefix("mask_").is_some_and(png)
        || matches!(name, "img" | "labelcol" | COUNTERFACTUAL_DIR | COUNTERFACTUAL_SHEET)
        || [Split::Train, Split::Val, Split::Test]
            .iter()
            .any(|s| name == format!("{}.csv", s.sheet_stem()) || name == format!("{}.xlsx", s.sheet_stem()))
}

/// Removes a dataset that synth wrote, to write it again: only with the marker, and only when
/// every file in its split folders is one synth makes (anything else is refused, untouched).
/// Files beside the split folders are left alone.
pub fn remove_synthetic(root: &Path) -> Result<()> {
    if !root.join(MARKER).is_file() {
        return Err(io_err(root, format!("was not written by reclmis synth (no {MARKER}): refusing to replace it")));
    }
    let folders: Vec<std::path::PathBuf> =
        [Split::Train, Split::Val, Split::Test].iter().map(|s| root.join(s.folder())).filter(|p| p.exists()).collect();
    // check everything before removing anything
    for f in &folders {
        let mut stack = vec![f.clone()];
        while let Some(d) = stack.pop() {
            for e in std::fs::read_dir(&d).map_err(|e| io_err(&d, e))? {
                let e = e.map_err(|err| io_err(&d, err))?;
                let name = e.file_name().to_string_lossy().into_owned();
                let ty = e.file_type().map_err(|err| io_err(&e.path(), err))?;
                if !synth_made(&name) || ty.is_symlink() {
                    return Err(io_err(&e.path(), "was not written by reclmis synth: refusing to replace the dataset"));
                }
                if ty.is_dir() {
                    stack.push(e.path());
                }
            }
        }
    }
    for f in &folders {
        std::fs::remove_dir_all(f).map_err(|e| io_err(f, e))?;
    }
    Ok(())
}

pub fn write(out: &Path, o: &SynthOpts) -> Result<()> {
    if o.size < 16 || !o.size.is_multiple_of(16) {
        return Err(Error::Config(format!("--size {} must be a multiple of 16 (at least 16)", o.size)));
    }
    // files left from another dataset would be listed without notes: refuse to mix
    for split in [Split::Train, Split::Val, Split::Test] {
        let img = out.join(split.folder()).join("img");
        if std::fs::read_dir(&img).map(|mut d| d.next().is_some()).unwrap_or(false) {
            return Err(io_err(&img, "already holds images: choose another --out or remove it"));
        }
    }
    std::fs::create_dir_all(out).map_err(|e| io_err(out, e))?;
    // the marker first: a folder with it was made by synth (and only then may quickstart
    // regenerate it), even when this run is interrupted
    crate::files::write_atomic(&out.join(MARKER), b"written by reclmis synth\n")?;
    let mut rng = Rng::new(o.seed);
    for (split, n) in [(Split::Train, o.train), (Split::Val, o.val), (Split::Test, o.test)] {
        let folder = out.join(split.folder());
        let (img_dir, mask_dir) = (folder.join("img"), folder.join("labelcol"));
        for d in [&img_dir, &mask_dir] {
            std::fs::create_dir_all(d).map_err(|e| io_err(d, e))?;
        }
        let mut rows: Vec<(String, String)> = Vec::with_capacity(n);
        let mut cf_rows: Vec<(String, String)> = vec![];
        let cf_dir = folder.join(COUNTERFACTUAL_DIR);
        std::fs::create_dir_all(&cf_dir).map_err(|e| io_err(&cf_dir, e))?;
        for i in 0..n {
            let s = synth::sample(o.size, &mut rng, o.note_noise, o.distractors);
            let name = format!("synth_{}_{i:05}.png", split.sheet_stem().trim_end_matches("_text").to_lowercase());
            let img: Vec<u8> = s.image.iter().map(|&v| (v * 255.0).round() as u8).collect();
            let mask: Vec<u8> = s.mask.iter().map(|&m| m * 255).collect();
            let (ip, mp) = (img_dir.join(&name), mask_dir.join(format!("mask_{name}")));
            let side = o.size as u32;
            image::save_buffer(&ip, &img, side, side, image::ExtendedColorType::L8).map_err(|e| io_err(&ip, e))?;
            image::save_buffer(&mp, &mask, side, side, image::ExtendedColorType::L8).map_err(|e| io_err(&mp, e))?;
            rows.push((format!("mask_{name}"), s.note));
            if let Some((note, m)) = s.counterfactual {
                let cp = cf_dir.join(format!("mask_{name}"));
                let m: Vec<u8> = m.iter().map(|&v| v * 255).collect();
                image::save_buffer(&cp, &m, side, side, image::ExtendedColorType::L8).map_err(|e| io_err(&cp, e))?;
                cf_rows.push((format!("mask_{name}"), note));
            }
        }
        {
            let p = folder.join(COUNTERFACTUAL_SHEET);
            let mut w = csv::Writer::from_path(&p).map_err(|e| io_err(&p, e))?;
            w.write_record(["Image", "Description"]).map_err(|e| io_err(&p, e))?;
            for (k, d) in &cf_rows {
                w.write_record([k, d]).map_err(|e| io_err(&p, e))?;
            }
            w.flush().map_err(|e| io_err(&p, e))?;
        }
        let csv_path = folder.join(format!("{}.csv", split.sheet_stem()));
        let mut w = csv::Writer::from_path(&csv_path).map_err(|e| io_err(&csv_path, e))?;
        w.write_record(["Image", "Description"]).map_err(|e| io_err(&csv_path, e))?;
        for (k, d) in &rows {
            w.write_record([k, d]).map_err(|e| io_err(&csv_path, e))?;
        }
        w.flush().map_err(|e| io_err(&csv_path, e))?;
        let xlsx_path = folder.join(format!("{}.xlsx", split.sheet_stem()));
        let mut wb = rust_xlsxwriter::Workbook::new();
        let ws = wb.add_worksheet();
        let cell = |e: rust_xlsxwriter::XlsxError| io_err(&xlsx_path, e);
        ws.write_string(0, 0, "Image").map_err(cell)?;
        ws.write_string(0, 1, "Description").map_err(cell)?;
        for (r, (k, d)) in rows.iter().enumerate() {
            ws.write_string(r as u32 + 1, 0, k).map_err(cell)?;
            ws.write_string(r as u32 + 1, 1, d).map_err(cell)?;
        }
        wb.save(&xlsx_path).map_err(cell)?;
    }
    Ok(())
}
