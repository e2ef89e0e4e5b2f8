//! The LViT / RecLMIS dataset layout: `<root>/{Train,Val,Test}_Folder/{img,labelcol}` and a notes
//! sheet (`Image` | `Description`, xlsx as published or csv) in each folder. QaTa names the mask of
//! `X.png` `mask_X.png` and keys the sheet by the mask's file name; other sets share the stem and
//! key by the image's name; both are accepted. Every problem is an error naming the file.

use crate::error::{Error, Result};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Split {
    Train,
    Val,
    Test,
}

impl Split {
    pub fn folder(self) -> &'static str {
        match self {
            Split::Train => "Train_Folder",
            Split::Val => "Val_Folder",
            Split::Test => "Test_Folder",
        }
    }
    pub fn sheet_stem(self) -> &'static str {
        match self {
            Split::Train => "Train_text",
            Split::Val => "Val_text",
            Split::Test => "Test_text",
        }
    }
}

/// One image of a split (paths and note; decoding is separate so it can run in parallel).
#[derive(Clone, Debug)]
pub struct Entry {
    pub image: PathBuf,
    pub mask: PathBuf,
    pub note: String,
}

fn data_err(path: &Path, detail: impl Into<String>) -> Error {
    Error::Data { path: path.display().to_string(), detail: detail.into() }
}

/// Reads a notes sheet: (key, description) rows after the `Image | Description` header.
pub fn read_sheet(path: &Path) -> Result<HashMap<String, String>> {
    let rows: Vec<Vec<String>> =
        match path.extension().and_then(|e| e.to_str()).map(|e| e.to_ascii_lowercase()).as_deref() {
            Some("csv") => {
                let mut r = csv::ReaderBuilder::new()
                    .has_headers(false)
                    .flexible(true)
                    .from_path(path)
                    .map_err(|e| data_err(path, format!("cannot read: {e}")))?;
                r.records()
                    .map(|rec| {
                        rec.map(|r| r.iter().map(|s| s.to_string()).collect())
                            .map_err(|e| data_err(path, format!("bad csv: {e}")))
                    })
                    .collect::<Result<_>>()?
            }
            Some("xlsx") => {
                use calamine::{open_workbook_auto, Reader};
                let mut wb = open_workbook_auto(path)
                    .map_err(|e| data_err(path, format!("not a readable xlsx workbook: {e}")))?;
                let sheet =
                    wb.sheet_names().first().cloned().ok_or_else(|| data_err(path, "the workbook has no sheet"))?;
                let range = wb
                    .worksheet_range(&sheet)
                    .map_err(|e| data_err(path, format!("cannot read sheet {sheet:?}: {e}")))?;
                range.rows().map(|r| r.iter().map(|c| c.to_string()).collect()).collect()
            }
            _ => return Err(data_err(path, "a notes sheet must be .xlsx or .csv")),
        };
    let header = rows.first().ok_or_else(|| data_err(path, "the sheet is empty"))?;
    let col = |name: &str| header.iter().position(|h| h.trim().eq_ignore_ascii_case(name));
    let (ci, cd) = match (col("Image"), col("Description")) {
        (Some(i), Some(d)) => (i, d),
        _ => {
            return Err(data_err(
                path,
                format!("the header row must have Image and Description columns, got {header:?}"),
            ))
        }
    };
    let mut out = HashMap::new();
    for (n, r) in rows.iter().enumerate().skip(1) {
        let key = r.get(ci).map(|s| s.trim().to_string()).unwrap_or_default();
        if key.is_empty() {
            continue;
        }
        // the official loader splits a cell on newlines; the notes are one sentence in practice
        let desc = r.get(cd).map(|s| s.split('\n').map(str::trim).collect::<Vec<_>>().join(" ")).unwrap_or_default();
        if out.insert(key.clone(), desc).is_some() {
            return Err(data_err(path, format!("row {}: {key} appears twice", n + 1)));
        }
    }
    Ok(out)
}

/// The sheet of a split folder: `<stem>.xlsx`, else `<stem>.csv`, else the only xlsx/csv there
/// (QaTa ships Train_Val_text.xlsx for both train and val).
fn find_sheet(folder: &Path, split: Split) -> Result<PathBuf> {
    for ext in ["xlsx", "csv"] {
        let p = folder.join(format!("{}.{ext}", split.sheet_stem()));
        if p.is_file() {
            return Ok(p);
        }
    }
    let mut found: Vec<PathBuf> = std::fs::read_dir(folder)
        .map_err(|e| data_err(folder, format!("cannot list: {e}")))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| matches!(p.extension().and_then(|e| e.to_str()), Some("xlsx" | "csv")))
        .collect();
    found.sort();
    match found.len() {
        1 => Ok(found.remove(0)),
        0 => Err(data_err(folder, format!("no notes sheet ({}.xlsx or .csv)", split.sheet_stem()))),
        _ => {
            Err(data_err(folder, format!("several sheets and none named {}.xlsx/.csv: {found:?}", split.sheet_stem())))
        }
    }
}

/// Lists a split: every image with its mask and note.
pub fn list(root: &Path, split: Split) -> Result<Vec<Entry>> {
    let folder = root.join(split.folder());
    let (img_dir, mask_dir) = (folder.join("img"), folder.join("labelcol"));
    for d in [&folder, &img_dir, &mask_dir] {
        if !d.is_dir() {
            return Err(data_err(d, "missing folder (expected <root>/{Train,Val,Test}_Folder/{img,labelcol})"));
        }
    }
    let sheet_path = find_sheet(&folder, split)?;
    let sheet = read_sheet(&sheet_path)?;
    let mut images: Vec<PathBuf> = std::fs::read_dir(&img_dir)
        .map_err(|e| data_err(&img_dir, format!("cannot list: {e}")))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_file())
        .collect();
    images.sort();
    if images.is_empty() {
        return Err(data_err(&img_dir, "no images"));
    }
    let mut out = Vec::with_capacity(images.len());
    for image in images {
        let name = image.file_name().and_then(|n| n.to_str()).unwrap_or_default().to_string();
        let qata = mask_dir.join(format!("mask_{name}"));
        let same = mask_dir.join(&name);
        let mask = if qata.is_file() {
            qata
        } else if same.is_file() {
            same
        } else {
            return Err(data_err(&image, format!("no mask (looked for {} and {})", qata.display(), same.display())));
        };
        let mask_name = mask.file_name().and_then(|n| n.to_str()).unwrap_or_default();
        let note = sheet
            .get(mask_name)
            .or_else(|| sheet.get(&name))
            .ok_or_else(|| data_err(&sheet_path, format!("no note for {name} (keyed {mask_name} or {name})")))?;
        if note.trim().is_empty() {
            return Err(data_err(&sheet_path, format!("the note for {name} is empty")));
        }
        out.push(Entry { image, mask, note: note.clone() });
    }
    Ok(out)
}

/// A decoded sample at the model's size: image [3,H,W] in [0,1] (grayscale replicated; colour in
/// the official BGR order), mask [H,W] 0/1.
pub struct Decoded {
    pub image: Vec<f32>,
    pub mask: Vec<f32>,
}

/// Decodes and resizes (bilinear, as the official preprocessing) an entry to h × w.
pub fn decode(e: &Entry, h: usize, w: usize) -> Result<Decoded> {
    use image::imageops::{resize, FilterType};
    let open = |p: &Path| image::open(p).map_err(|err| data_err(p, format!("cannot decode the image: {err}")));
    let img = open(&e.image)?.to_rgb8();
    let mask = open(&e.mask)?.to_luma8();
    if img.dimensions() != mask.dimensions() {
        return Err(data_err(
            &e.mask,
            format!("mask is {:?} but its image {} is {:?}", mask.dimensions(), e.image.display(), img.dimensions()),
        ));
    }
    let bad = mask.pixels().find(|p| !matches!(p.0[0], 0 | 1 | 255));
    if let Some(p) = bad {
        return Err(data_err(&e.mask, format!("not a binary mask: value {} (expected 0 and 255, or 0 and 1)", p.0[0])));
    }
    let mask = resize(&mask, w as u32, h as u32, FilterType::Triangle);
    let mask = mask.pixels().map(|p| (p.0[0] > 0) as i32 as f32).collect();
    Ok(Decoded { image: to_chw(&img, h, w), mask })
}

/// An image resized (bilinear) to h × w as [3,H,W] in [0,1], BGR like the official cv2 reads.
fn to_chw(img: &image::RgbImage, h: usize, w: usize) -> Vec<f32> {
    let img = image::imageops::resize(img, w as u32, h as u32, image::imageops::FilterType::Triangle);
    let mut out = vec![0.0f32; 3 * h * w];
    for (i, p) in img.pixels().enumerate() {
        for c in 0..3 {
            out[c * h * w + i] = p.0[2 - c] as f32 / 255.0;
        }
    }
    out
}

/// One image file for inference: ([3,H,W] at the model's size, the original image).
pub fn decode_image(path: &Path, h: usize, w: usize) -> Result<(Vec<f32>, image::RgbImage)> {
    let img = image::open(path).map_err(|err| data_err(path, format!("cannot decode the image: {err}")))?.to_rgb8();
    Ok((to_chw(&img, h, w), img))
}

/// A ground-truth mask file (0/255 or 0/1) at its own size, as 0/1.
pub fn decode_mask(path: &Path) -> Result<image::GrayImage> {
    let m = image::open(path).map_err(|err| data_err(path, format!("cannot decode the mask: {err}")))?.to_luma8();
    if let Some(p) = m.pixels().find(|p| !matches!(p.0[0], 0 | 1 | 255)) {
        return Err(data_err(path, format!("not a binary mask: value {} (expected 0 and 255, or 0 and 1)", p.0[0])));
    }
    Ok(m)
}
