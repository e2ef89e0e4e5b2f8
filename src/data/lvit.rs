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

#[cfg(feature = "cli")]
fn read_xlsx(path: &Path) -> Result<Vec<Vec<String>>> {
    use calamine::{open_workbook_auto, Reader};
    let mut wb = open_workbook_auto(path).map_err(|e| data_err(path, format!("not a readable xlsx workbook: {e}")))?;
    let sheet = wb.sheet_names().first().cloned().ok_or_else(|| data_err(path, "the workbook has no sheet"))?;
    let range = wb.worksheet_range(&sheet).map_err(|e| data_err(path, format!("cannot read sheet {sheet:?}: {e}")))?;
    Ok(range.rows().map(|r| r.iter().map(|c| c.to_string()).collect()).collect())
}

/// Reads a notes sheet: (key, description) rows after the `Image | Description` header.
pub fn read_sheet(path: &Path) -> Result<HashMap<String, String>> {
    Ok(read_sheet_rows(path)?.into_iter().collect())
}

/// [`read_sheet`]'s rows in the sheet's order (a key that appears twice is refused).
pub fn read_sheet_rows(path: &Path) -> Result<Vec<(String, String)>> {
    // a FIFO or device named as a sheet would block or never end
    crate::files::open_regular(path, 1 << 30)?;
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
            #[cfg(not(feature = "cli"))]
            Some("xlsx") => {
                return Err(data_err(path, "xlsx sheets are read by the full build (reclmis); save the sheet as csv"))
            }
            #[cfg(feature = "cli")]
            Some("xlsx") => {
                // calamine 0.31 panics on some damaged workbooks (an index out of bounds in its
                // cell reader, found by tests/fuzz_parsers.rs): contain it as an error
                std::panic::catch_unwind(|| read_xlsx(path))
                    .map_err(|_| data_err(path, "not a readable xlsx workbook (its cells are damaged)"))??
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
    let mut out = Vec::new();
    let mut seen = std::collections::HashSet::new();
    for (n, r) in rows.iter().enumerate().skip(1) {
        let key = r.get(ci).map(|s| s.trim().to_string()).unwrap_or_default();
        if key.is_empty() {
            continue;
        }
        // the official loader splits a cell on newlines; the notes are one sentence in practice
        let desc = r.get(cd).map(|s| s.split('\n').map(str::trim).collect::<Vec<_>>().join(" ")).unwrap_or_default();
        if !seen.insert(key.clone()) {
            return Err(data_err(path, format!("row {}: {key} appears twice", n + 1)));
        }
        out.push((key, desc));
    }
    Ok(out)
}

/// Every split folder's counterfactual notes (`<split folder>/COUNTERFACTUAL_SHEET`,
/// keyed by the mask's file name) and masks (`<split folder>/COUNTERFACTUAL_DIR/mask_<image>`):
/// for each image with a distractor, the note naming only the distractor's zone and the
/// distractor's mask.
pub const COUNTERFACTUAL_DIR: &str = "counterfactual";
pub const COUNTERFACTUAL_SHEET: &str = "counterfactual_text.csv";

/// The sheet QaTa-COV19 publishes in `Train_Folder` for both the training and validation images.
pub const QATA_SHARED_SHEET: &str = "Train_Val_text";

/// The sheet of a split folder: `<stem>.xlsx`, else `<stem>.csv`, else the only xlsx/csv there;
/// for the validation split without a sheet of its own, QaTa-COV19's `Train_Val_text.xlsx` (or
/// .csv) in the sibling `Train_Folder`, which holds the notes of both splits.
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
        .filter(|p| !p.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with('.')))
        .collect();
    found.sort();
    if found.is_empty() && split == Split::Val {
        let train = folder.parent().unwrap_or(Path::new(".")).join(Split::Train.folder());
        for ext in ["xlsx", "csv"] {
            let p = train.join(format!("{QATA_SHARED_SHEET}.{ext}"));
            if p.is_file() {
                return Ok(p);
            }
        }
    }
    match found.len() {
        1 => Ok(found.remove(0)),
        0 => Err(data_err(
            folder,
            format!(
                "no notes sheet ({}.xlsx or .csv{})",
                split.sheet_stem(),
                if split == Split::Val { ", nor Train_Folder/Train_Val_text.xlsx as QaTa-COV19 ships" } else { "" }
            ),
        )),
        _ => {
            Err(data_err(folder, format!("several sheets and none named {}.xlsx/.csv: {found:?}", split.sheet_stem())))
        }
    }
}

/// The image files a split folder may hold.
const IMAGE_EXTENSIONS: [&str; 6] = ["png", "jpg", "jpeg", "tif", "tiff", "bmp"];

fn is_image_name(name: &str) -> bool {
    Path::new(name)
        .extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| IMAGE_EXTENSIONS.iter().any(|x| x.eq_ignore_ascii_case(e)))
}

/// A split's samples and the files of `img/` skipped as not images (hidden files, other types).
#[derive(Debug)]
pub struct Listed {
    pub entries: Vec<Entry>,
    pub skipped: Vec<String>,
}

/// Lists a split: every image with its mask and note.
pub fn list(root: &Path, split: Split) -> Result<Listed> {
    let folder = root.join(split.folder());
    let (img_dir, mask_dir) = (folder.join("img"), folder.join("labelcol"));
    for d in [&folder, &img_dir, &mask_dir] {
        if !d.is_dir() {
            return Err(data_err(d, "missing folder (expected <root>/{Train,Val,Test}_Folder/{img,labelcol})"));
        }
    }
    let sheet_path = find_sheet(&folder, split)?;
    let sheet = read_sheet(&sheet_path)?;
    let mut images: Vec<PathBuf> = Vec::new();
    let mut skipped: Vec<String> = Vec::new();
    for e in std::fs::read_dir(&img_dir).map_err(|e| data_err(&img_dir, format!("cannot list: {e}")))? {
        let p = e.map_err(|e| data_err(&img_dir, format!("cannot list: {e}")))?.path();
        let name = p.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        // .DS_Store, Thumbs.db, desktop.ini, editors' backups: not samples
        if name.starts_with('.') || !is_image_name(&name) || !p.is_file() {
            skipped.push(name);
        } else {
            images.push(p);
        }
    }
    images.sort();
    skipped.sort();
    if images.is_empty() {
        return Err(data_err(&img_dir, "no images (.png, .jpg, .jpeg, .tif, .tiff, .bmp)"));
    }
    let mut out = Listed { entries: Vec::with_capacity(images.len()), skipped };
    for image in images {
        let name = image.file_name().and_then(|n| n.to_str()).unwrap_or_default().to_string();
        let stem = image.file_stem().and_then(|n| n.to_str()).unwrap_or_default().to_string();
        // QaTa's mask_<image>, a mask sharing the image's name (MosMedData+), and the published
        // loaders' <stem>.png for images of another type (MoNuSeg's x.tif has the mask x.png)
        let candidates = [format!("mask_{name}"), name.clone(), format!("{stem}.png"), format!("mask_{stem}.png")];
        let Some(mask) = candidates.iter().map(|c| mask_dir.join(c)).find(|p| p.is_file()) else {
            return Err(data_err(
                &image,
                format!("no mask (looked in {} for {})", mask_dir.display(), candidates.join(", ")),
            ));
        };
        let mask_name = mask.file_name().and_then(|n| n.to_str()).unwrap_or_default();
        let keys = [mask_name, name.as_str(), &format!("{stem}.png"), stem.as_str()];
        let note = keys
            .iter()
            .find_map(|k| sheet.get(*k))
            .ok_or_else(|| data_err(&sheet_path, format!("no note for {name} (keyed {})", keys.join(", "))))?;
        if note.trim().is_empty() {
            return Err(data_err(&sheet_path, format!("the note for {name} is empty")));
        }
        out.entries.push(Entry { image, mask, note: crate::text::bounded(note).to_string() });
    }
    Ok(out)
}

/// A split's counterfactual samples, when the folder has them (synth writes them for Val and
/// Test; see [`COUNTERFACTUAL_SHEET`]): each image of `img/` named in the sheet, with
/// the counterfactual mask and note.
pub fn list_counterfactual(root: &Path, split: Split) -> Result<Option<Listed>> {
    let folder = root.join(split.folder());
    let sheet_path = folder.join(COUNTERFACTUAL_SHEET);
    if !sheet_path.is_file() {
        return Ok(None);
    }
    let sheet = read_sheet(&sheet_path)?;
    let mut keys: Vec<&String> = sheet.keys().collect();
    keys.sort();
    let mut entries = vec![];
    for key in keys {
        let image_name = key.strip_prefix("mask_").unwrap_or(key);
        let image = folder.join("img").join(image_name);
        let mask = folder.join(COUNTERFACTUAL_DIR).join(key);
        for p in [&image, &mask] {
            if !p.is_file() {
                return Err(data_err(&sheet_path, format!("names {key}, but {} is missing", p.display())));
            }
        }
        entries.push(Entry { image, mask, note: crate::text::bounded(&sheet[key]).to_string() });
    }
    Ok(Some(Listed { entries, skipped: vec![] }))
}

/// Decoded images larger than this many pixels are refused from their header, before decoding
/// (a 140 KB PNG can claim 12000² pixels). 100 megapixels is far above real radiographs and CT
/// slices; `set_max_pixels` (the CLI's `--max-megapixels`) changes it.
static MAX_PIXELS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(100_000_000);

pub fn set_max_pixels(n: u64) {
    MAX_PIXELS.store(n, std::sync::atomic::Ordering::Relaxed);
}

pub fn max_pixels() -> u64 {
    MAX_PIXELS.load(std::sync::atomic::Ordering::Relaxed)
}

/// Opens an image file within the pixel limit: a regular file, its size read from the header
/// first, then decoded with the `image` crate's allocation limit as a second fence.
fn open_image(path: &Path, what: &str) -> Result<image::DynamicImage> {
    use image::ImageReader;
    let (f, _) = crate::files::open_regular(path, u64::MAX)?;
    let bad = |e: &dyn std::fmt::Display| data_err(path, format!("cannot decode the {what}: {e}"));
    let reader = ImageReader::new(std::io::BufReader::new(f)).with_guessed_format().map_err(|e| bad(&e))?;
    let (w, h) = reader.into_dimensions().map_err(|e| bad(&e))?;
    let pixels = w as u64 * h as u64;
    if pixels > max_pixels() {
        return Err(data_err(
            path,
            format!("{w}x{h} is {pixels} pixels, more than the limit of {} (--max-megapixels)", max_pixels()),
        ));
    }
    let (f, _) = crate::files::open_regular(path, u64::MAX)?;
    let mut reader = ImageReader::new(std::io::BufReader::new(f)).with_guessed_format().map_err(|e| bad(&e))?;
    let mut limits = image::Limits::default();
    // the largest decoded buffer: 4 channels of 32-bit floats per pixel, plus slack
    limits.max_alloc = Some(pixels.saturating_mul(16).saturating_add(1 << 20));
    reader.limits(limits);
    reader.decode().map_err(|e| bad(&e))
}

/// A decoded sample at the model's size, as the loader keeps it: image [3,H,W] as bytes (the
/// model reads byte / 255), mask [H,W] 0/1.
pub struct Decoded {
    pub image: Vec<u8>,
    pub mask: Vec<u8>,
    /// The mask holds values other than 0 and its maximum (anti-aliased edges, labels).
    pub mask_not_two_valued: bool,
    /// The largest mask value at the file's own bit depth.
    pub mask_max: u16,
}

/// Decodes and resizes (bilinear, as the official preprocessing) an entry to h × w into `image`
/// ([3,H,W]) and `mask` ([H,W]).
pub fn decode_into(e: &Entry, h: usize, w: usize, image: &mut [u8], mask: &mut [u8]) -> Result<(bool, u16)> {
    use image::imageops::{resize, FilterType};
    let img = open_image(&e.image, "image")?.to_rgb8();
    let m = read_mask(&e.mask)?;
    if img.dimensions() != m.dims {
        return Err(data_err(
            &e.mask,
            format!("mask is {:?} but its image {} is {:?}", m.dims, e.image.display(), img.dimensions()),
        ));
    }
    let small = resize(&m.binary, w as u32, h as u32, FilterType::Triangle);
    for (o, p) in mask.iter_mut().zip(small.pixels()) {
        *o = (p.0[0] > 0) as u8;
    }
    to_chw_into(&img, h, w, image);
    Ok((m.not_two_valued, m.max))
}

/// Decodes an entry into new buffers (see `decode_into`).
pub fn decode(e: &Entry, h: usize, w: usize) -> Result<Decoded> {
    let (mut image, mut mask) = (vec![0u8; 3 * h * w], vec![0u8; h * w]);
    let (mask_not_two_valued, mask_max) = decode_into(e, h, w, &mut image, &mut mask)?;
    Ok(Decoded { image, mask, mask_not_two_valued, mask_max })
}

/// A mask file read as the official loader thresholds it: a pixel is foreground when its grey
/// value is non-zero, at the file's own bit depth (a 16-bit mask of 0/1 is not scaled to 0), with
/// palettes expanded and alpha ignored.
struct Mask {
    /// 0 / 255, at the file's size.
    binary: image::GrayImage,
    dims: (u32, u32),
    not_two_valued: bool,
    max: u16,
}

fn read_mask(path: &Path) -> Result<Mask> {
    let img = open_image(path, "mask")?;
    let native_16 = matches!(
        img,
        image::DynamicImage::ImageLuma16(_)
            | image::DynamicImage::ImageLumaA16(_)
            | image::DynamicImage::ImageRgb16(_)
            | image::DynamicImage::ImageRgba16(_)
    );
    let grey = img.to_luma16();
    let max16 = grey.pixels().map(|p| p.0[0]).max().unwrap_or(0);
    let not_two_valued = grey.pixels().any(|p| p.0[0] != 0 && p.0[0] != max16);
    // 8-bit values were widened to 16 bits by ×257: report them at the file's depth
    let max = if native_16 { max16 } else { max16 / 257 };
    let dims = grey.dimensions();
    let binary = image::GrayImage::from_fn(dims.0, dims.1, |x, y| {
        image::Luma([if grey.get_pixel(x, y).0[0] > 0 { 255 } else { 0 }])
    });
    Ok(Mask { binary, dims, not_two_valued, max })
}

/// An image resized (bilinear) to h × w as [3,H,W] bytes, BGR like the official cv2 reads.
fn to_chw_into(img: &image::RgbImage, h: usize, w: usize, out: &mut [u8]) {
    let img = image::imageops::resize(img, w as u32, h as u32, image::imageops::FilterType::Triangle);
    for (i, p) in img.pixels().enumerate() {
        for c in 0..3 {
            out[c * h * w + i] = p.0[2 - c];
        }
    }
}

/// One image file for inference: ([3,H,W] in [0, 1] at the model's size, the original image).
pub fn decode_image(path: &Path, h: usize, w: usize) -> Result<(Vec<f32>, image::RgbImage)> {
    let img = open_image(path, "image")?.to_rgb8();
    let mut bytes = vec![0u8; 3 * h * w];
    to_chw_into(&img, h, w, &mut bytes);
    Ok((bytes.iter().map(|&b| b as f32 / 255.0).collect(), img))
}

/// A ground-truth mask file at its own size, as 0/1 (non-zero = foreground, as `decode`).
pub fn decode_mask(path: &Path) -> Result<image::GrayImage> {
    let m = read_mask(path)?;
    Ok(image::GrayImage::from_fn(m.dims.0, m.dims.1, |x, y| image::Luma([(m.binary.get_pixel(x, y).0[0] > 0) as u8])))
}
