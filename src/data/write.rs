//! `reclmis synth`: writes a synthetic dataset in the LViT layout (QaTa naming: `mask_<image>`,
//! the sheet keyed by the mask's file name), with the notes sheet as xlsx and csv.

use super::lvit::Split;
use super::synth;
use crate::error::{Error, Result};
use crate::testing::Rng;
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
    let mut rng = Rng::new(o.seed);
    for (split, n) in [(Split::Train, o.train), (Split::Val, o.val), (Split::Test, o.test)] {
        let folder = out.join(split.folder());
        let (img_dir, mask_dir) = (folder.join("img"), folder.join("labelcol"));
        for d in [&img_dir, &mask_dir] {
            std::fs::create_dir_all(d).map_err(|e| io_err(d, e))?;
        }
        let mut rows: Vec<(String, String)> = Vec::with_capacity(n);
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
