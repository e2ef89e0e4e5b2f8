//! `reclmis infer` and `reclmis explain`: the mask and an overlay (true positives green, false
//! negatives red, false positives blue when a ground truth is given, as in the paper's figures),
//! the W_poi heatmap over the image, and W_woi per word as a labelled bar chart.

use crate::data::lvit;
use crate::device::Device;
use crate::error::{Error, Result};
use crate::model::{Batch, RecLmis};
use crate::tensor::Tensor;
use crate::text::NoteTokenizer;
use image::{GrayImage, Luma, Rgb, RgbImage};
use std::path::Path;

pub struct Explained {
    /// [H,W] at the original size, 0/1
    pub mask: GrayImage,
    /// [h·w] bottleneck grid, row-major
    pub w_poi: Vec<f32>,
    /// per token (token string, weight)
    pub w_woi: Vec<(String, f32)>,
    pub grid: (usize, usize),
}

/// Runs the evaluation forward on one image and note; with `weights`, W_poi and W_woi too
/// (else they are empty and only the mask's path of the model runs).
pub fn explain(
    m: &RecLmis,
    tok: &NoteTokenizer,
    image: &Path,
    note: &str,
    dev: &Device,
    weights: bool,
) -> Result<(Explained, RgbImage)> {
    if weights && !m.has_weights_of_interest() {
        return Err(Error::Config(
            "this checkpoint has no mlp_visual / mlp_woi (exported without --weights-of-interest): it gives masks, not W_poi / W_woi".into(),
        ));
    }
    let (h, w) = m.cfg.img_size;
    let (x, orig) = lvit::decode_image(image, h, w)?;
    let (ids, valid) = tok.encode(note)?;
    let l = ids.len();
    let b = Batch {
        images: Tensor::from_vec(x, &[1, 3, h, w], dev)?,
        ids: Tensor::from_vec_i32(ids, &[1, l], dev)?,
        valid: Tensor::from_vec_i32(valid, &[1, l], dev)?,
        masks: None,
        text_hidden: None,
    };
    let rec = if weights { Some(m.forward_eval(&b)?) } else { None };
    let probs = match &rec {
        Some(r) => r["probs"].tensor().to_vec()?,
        None => m.infer(&b)?.to_vec()?,
    };
    // the probability map back to the original size, then thresholded at 0.5
    let small = GrayImage::from_fn(w as u32, h as u32, |x, y| {
        Luma([(probs[y as usize * w + x as usize] * 255.0).round() as u8])
    });
    let big = image::imageops::resize(&small, orig.width(), orig.height(), image::imageops::FilterType::Triangle);
    let mask = GrayImage::from_fn(orig.width(), orig.height(), |x, y| Luma([(big.get_pixel(x, y).0[0] > 127) as u8]));
    let (w_poi, w_woi) = match &rec {
        Some(r) => {
            let words = tok.tokens(note)?;
            let w_woi = r["W_woi"].tensor().to_vec()?;
            (r["W_poi"].tensor().to_vec()?, words.into_iter().zip(w_woi).filter(|(t, _)| !t.is_empty()).collect())
        }
        None => (vec![], vec![]),
    };
    Ok((Explained { mask, w_poi, w_woi, grid: m.cfg.grid() }, orig))
}

fn gray(orig: &RgbImage) -> RgbImage {
    RgbImage::from_fn(orig.width(), orig.height(), |x, y| {
        let p = orig.get_pixel(x, y).0;
        let g = ((p[0] as u32 + p[1] as u32 + p[2] as u32) / 3) as u8;
        Rgb([g, g, g])
    })
}

fn blend(a: Rgb<u8>, b: [u8; 3], t: f32) -> Rgb<u8> {
    Rgb([0, 1, 2].map(|i| (a.0[i] as f32 * (1.0 - t) + b[i] as f32 * t).round() as u8))
}

/// Encodes a PNG in memory and writes it atomically (a kill never leaves half a picture).
pub fn save_png<P, C>(img: &image::ImageBuffer<P, C>, path: &Path) -> Result<()>
where
    P: image::PixelWithColorType,
    [P::Subpixel]: image::EncodableLayout,
    C: std::ops::Deref<Target = [P::Subpixel]>,
{
    let mut bytes = std::io::Cursor::new(Vec::new());
    img.write_to(&mut bytes, image::ImageFormat::Png).map_err(|err| Error::data(path, err))?;
    crate::files::write_atomic(path, &bytes.into_inner())
}

/// mask.png (0/255) and overlay.png in `out`; with a ground truth, the Dice of this image.
pub fn write_infer(e: &Explained, orig: &RgbImage, gt: Option<&GrayImage>, out: &Path) -> Result<Option<f64>> {
    // the ground truth is checked before anything is written
    check_gt(e, gt, out)?;
    std::fs::create_dir_all(out).map_err(|err| Error::data(out, err))?;
    write_mask(e, orig, gt, &out.join("mask.png"), Some(&out.join("overlay.png")))
}

fn check_gt(e: &Explained, gt: Option<&GrayImage>, what: &Path) -> Result<()> {
    match gt {
        Some(g) if g.dimensions() != e.mask.dimensions() => Err(Error::data(
            what,
            format!("the ground truth is {:?}, the image {:?}", g.dimensions(), e.mask.dimensions()),
        )),
        _ => Ok(()),
    }
}

/// The mask (0/255) at `mask_path` and, when asked, the overlay; with a ground truth (which must
/// have the image's size), the Dice of this image (the official test script's smoothing).
pub fn write_mask(
    e: &Explained,
    orig: &RgbImage,
    gt: Option<&GrayImage>,
    mask_path: &Path,
    overlay_path: Option<&Path>,
) -> Result<Option<f64>> {
    check_gt(e, gt, mask_path)?;
    let mask_png =
        GrayImage::from_fn(e.mask.width(), e.mask.height(), |x, y| Luma([e.mask.get_pixel(x, y).0[0] * 255]));
    save_png(&mask_png, mask_path)?;
    let (mut inter, mut sum) = (0u64, 0u64);
    if let Some(g) = gt {
        for (p, t) in e.mask.pixels().zip(g.pixels()) {
            let (pr, t) = (p.0[0] > 0, t.0[0] > 0);
            inter += (pr && t) as u64;
            sum += pr as u64 + t as u64;
        }
    }
    if let Some(path) = overlay_path {
        let base = gray(orig);
        let overlay = RgbImage::from_fn(base.width(), base.height(), |x, y| {
            let pr = e.mask.get_pixel(x, y).0[0] > 0;
            let px = *base.get_pixel(x, y);
            match (pr, gt.map(|g| g.get_pixel(x, y).0[0] > 0)) {
                (true, Some(true)) | (true, None) => blend(px, [0, 220, 0], 0.5),
                (false, Some(true)) => blend(px, [230, 0, 0], 0.5),
                (true, Some(false)) => blend(px, [0, 80, 255], 0.5),
                _ => px,
            }
        });
        save_png(&overlay, path)?;
    }
    Ok(gt.map(|_| 2.0 * inter as f64 / (sum as f64 + 1e-5)))
}

/// A blue → red ramp for t in [0, 1].
fn ramp(t: f32) -> [u8; 3] {
    let t = t.clamp(0.0, 1.0);
    let r = (255.0 * (1.5 * t - 0.25).clamp(0.0, 1.0)) as u8;
    let g = (255.0 * (1.0 - (2.0 * t - 1.0).abs() * 1.2).clamp(0.0, 1.0)) as u8;
    let b = (255.0 * (1.25 - 1.5 * t).clamp(0.0, 1.0)) as u8;
    [r, g, b]
}

/// w_poi.png (the patch weights upsampled over the image) and w_woi.png (a bar per word).
pub fn write_explain(e: &Explained, orig: &RgbImage, out: &Path) -> Result<()> {
    std::fs::create_dir_all(out).map_err(|err| Error::data(out, err))?;
    let (gh, gw) = e.grid;
    let max = e.w_poi.iter().cloned().fold(f32::MIN_POSITIVE, f32::max);
    let base = gray(orig);
    let heat = RgbImage::from_fn(base.width(), base.height(), |x, y| {
        let (gy, gx) = (y as usize * gh / base.height() as usize, x as usize * gw / base.width() as usize);
        blend(*base.get_pixel(x, y), ramp(e.w_poi[gy * gw + gx] / max), 0.45)
    });
    let p = out.join("w_poi.png");
    save_png(&heat, &p)?;
    // bar chart: one row per word, label on the left, bar length ∝ weight
    let (row, label_w, bar_w) = (14u32, 8 * 6 + 8, 240u32);
    let words: Vec<(String, f32)> = e.w_woi.iter().map(|(t, w)| (t.chars().take(8).collect(), *w)).collect();
    let wmax = words.iter().map(|w| w.1).fold(f32::MIN_POSITIVE, f32::max);
    let mut img = RgbImage::from_pixel(label_w + bar_w + 60, row * words.len().max(1) as u32 + 8, Rgb([255, 255, 255]));
    for (i, (t, wgt)) in words.iter().enumerate() {
        let y0 = 4 + row * i as u32;
        font::draw(&mut img, 4, y0 + 3, t, Rgb([0, 0, 0]));
        let len = (bar_w as f32 * wgt / wmax).round() as u32;
        for y in y0 + 2..y0 + row - 2 {
            for x in label_w..label_w + len {
                img.put_pixel(x, y, Rgb(ramp(wgt / wmax)));
            }
        }
        font::draw(&mut img, label_w + len + 4, y0 + 3, &format!("{:.3}", wgt), Rgb([60, 60, 60]));
    }
    let p = out.join("w_woi.png");
    save_png(&img, &p)?;
    Ok(())
}

/// A 5×7 bitmap font for labels: lower-case letters, digits and a little punctuation (upper case
/// is drawn as lower case; anything else as a box).
pub(crate) mod font {
    use image::{Rgb, RgbImage};

    fn glyph(c: char) -> [u8; 7] {
        match c.to_ascii_lowercase() {
            'a' => [0x00, 0x00, 0x0e, 0x01, 0x0f, 0x11, 0x0f],
            'b' => [0x10, 0x10, 0x1e, 0x11, 0x11, 0x11, 0x1e],
            'c' => [0x00, 0x00, 0x0e, 0x10, 0x10, 0x11, 0x0e],
            'd' => [0x01, 0x01, 0x0f, 0x11, 0x11, 0x11, 0x0f],
            'e' => [0x00, 0x00, 0x0e, 0x11, 0x1f, 0x10, 0x0e],
            'f' => [0x06, 0x09, 0x08, 0x1c, 0x08, 0x08, 0x08],
            'g' => [0x00, 0x0f, 0x11, 0x11, 0x0f, 0x01, 0x0e],
            'h' => [0x10, 0x10, 0x16, 0x19, 0x11, 0x11, 0x11],
            'i' => [0x04, 0x00, 0x0c, 0x04, 0x04, 0x04, 0x0e],
            'j' => [0x02, 0x00, 0x06, 0x02, 0x02, 0x12, 0x0c],
            'k' => [0x10, 0x10, 0x12, 0x14, 0x18, 0x14, 0x12],
            'l' => [0x0c, 0x04, 0x04, 0x04, 0x04, 0x04, 0x0e],
            'm' => [0x00, 0x00, 0x1a, 0x15, 0x15, 0x11, 0x11],
            'n' => [0x00, 0x00, 0x16, 0x19, 0x11, 0x11, 0x11],
            'o' => [0x00, 0x00, 0x0e, 0x11, 0x11, 0x11, 0x0e],
            'p' => [0x00, 0x1e, 0x11, 0x11, 0x1e, 0x10, 0x10],
            'q' => [0x00, 0x0f, 0x11, 0x11, 0x0f, 0x01, 0x01],
            'r' => [0x00, 0x00, 0x16, 0x19, 0x10, 0x10, 0x10],
            's' => [0x00, 0x00, 0x0f, 0x10, 0x0e, 0x01, 0x1e],
            't' => [0x08, 0x08, 0x1c, 0x08, 0x08, 0x09, 0x06],
            'u' => [0x00, 0x00, 0x11, 0x11, 0x11, 0x13, 0x0d],
            'v' => [0x00, 0x00, 0x11, 0x11, 0x11, 0x0a, 0x04],
            'w' => [0x00, 0x00, 0x11, 0x11, 0x15, 0x15, 0x0a],
            'x' => [0x00, 0x00, 0x11, 0x0a, 0x04, 0x0a, 0x11],
            'y' => [0x00, 0x11, 0x11, 0x11, 0x0f, 0x01, 0x0e],
            'z' => [0x00, 0x00, 0x1f, 0x02, 0x04, 0x08, 0x1f],
            '0' => [0x0e, 0x11, 0x13, 0x15, 0x19, 0x11, 0x0e],
            '1' => [0x04, 0x0c, 0x04, 0x04, 0x04, 0x04, 0x0e],
            '2' => [0x0e, 0x11, 0x01, 0x02, 0x04, 0x08, 0x1f],
            '3' => [0x1f, 0x02, 0x04, 0x02, 0x01, 0x11, 0x0e],
            '4' => [0x02, 0x06, 0x0a, 0x12, 0x1f, 0x02, 0x02],
            '5' => [0x1f, 0x10, 0x1e, 0x01, 0x01, 0x11, 0x0e],
            '6' => [0x06, 0x08, 0x10, 0x1e, 0x11, 0x11, 0x0e],
            '7' => [0x1f, 0x01, 0x02, 0x04, 0x08, 0x08, 0x08],
            '8' => [0x0e, 0x11, 0x11, 0x0e, 0x11, 0x11, 0x0e],
            '9' => [0x0e, 0x11, 0x11, 0x0f, 0x01, 0x02, 0x0c],
            '.' => [0x00, 0x00, 0x00, 0x00, 0x00, 0x0c, 0x0c],
            ',' => [0x00, 0x00, 0x00, 0x00, 0x0c, 0x04, 0x08],
            '[' => [0x0e, 0x08, 0x08, 0x08, 0x08, 0x08, 0x0e],
            '(' => [0x02, 0x04, 0x08, 0x08, 0x08, 0x04, 0x02],
            ')' => [0x08, 0x04, 0x02, 0x02, 0x02, 0x04, 0x08],
            '-' => [0x00, 0x00, 0x00, 0x1f, 0x00, 0x00, 0x00],
            ':' => [0x00, 0x0c, 0x0c, 0x00, 0x0c, 0x0c, 0x00],
            '/' => [0x01, 0x01, 0x02, 0x04, 0x08, 0x10, 0x10],
            ']' => [0x0e, 0x02, 0x02, 0x02, 0x02, 0x02, 0x0e],
            ' ' => [0; 7],
            _ => [0x1f, 0x11, 0x11, 0x11, 0x11, 0x11, 0x1f],
        }
    }

    pub fn draw(img: &mut RgbImage, x0: u32, y0: u32, text: &str, color: Rgb<u8>) {
        for (k, c) in text.chars().enumerate() {
            let g = glyph(c);
            for (dy, bits) in g.iter().enumerate() {
                for dx in 0..5u32 {
                    let (x, y) = (x0 + 6 * k as u32 + dx, y0 + dy as u32);
                    if bits & (0x10 >> dx) != 0 && x < img.width() && y < img.height() {
                        img.put_pixel(x, y, color);
                    }
                }
            }
        }
    }
}

/// curves.png: the training loss (left panel, its own range) and the validation Dice and IoU
/// (right panel, 0..1) per epoch.
pub fn plot_curves(loss: &[f64], dice: &[f64], iou: &[f64], path: &Path) -> Result<()> {
    let (pw, ph, pad) = (300u32, 200u32, 30u32);
    let mut img = RgbImage::from_pixel(2 * pw + 3 * pad, ph + 2 * pad, Rgb([255, 255, 255]));
    let panel = |img: &mut RgbImage, x0: u32, series: &[(&[f64], [u8; 3])], lo: f64, hi: f64, title: &str| {
        for x in x0..x0 + pw {
            img.put_pixel(x, pad + ph, Rgb([0, 0, 0]));
        }
        for y in pad..=pad + ph {
            img.put_pixel(x0, y, Rgb([0, 0, 0]));
        }
        font::draw(img, x0 + 4, 10, title, Rgb([0, 0, 0]));
        font::draw(img, x0 - 26, pad, &format!("{hi:.2}"), Rgb([90, 90, 90]));
        font::draw(img, x0 - 26, pad + ph - 7, &format!("{lo:.2}"), Rgb([90, 90, 90]));
        for (s, color) in series {
            let n = s.len();
            let at = |i: usize| {
                let x = x0 + if n > 1 { (i as u32 * (pw - 1)) / (n as u32 - 1) } else { 0 };
                let t = ((s[i] - lo) / (hi - lo).max(1e-12)).clamp(0.0, 1.0);
                (x as i64, (pad + ph) as i64 - (t * ph as f64) as i64)
            };
            for i in 0..n {
                let (xa, ya) = at(i);
                let (xb, yb) = at((i + 1).min(n - 1));
                let steps = (xb - xa).abs().max((yb - ya).abs()).max(1);
                for k in 0..=steps {
                    let (x, y) = (xa + (xb - xa) * k / steps, ya + (yb - ya) * k / steps);
                    for (dx, dy) in [(0, 0), (0, 1), (1, 0)] {
                        let (px, py) = ((x + dx) as u32, (y + dy) as u32);
                        if px < img.width() && py < img.height() {
                            img.put_pixel(px, py, Rgb(*color));
                        }
                    }
                }
            }
        }
    };
    let (lo, hi) = loss.iter().fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), &v| (a.min(v), b.max(v)));
    let (lo, hi) = if lo.is_finite() { (lo, hi) } else { (0.0, 1.0) };
    panel(&mut img, pad, &[(loss, [200, 40, 40])], lo, hi, "train loss");
    panel(
        &mut img,
        2 * pad + pw,
        &[(dice, [0, 150, 0]), (iou, [30, 80, 220])],
        0.0,
        1.0,
        "val dice (green), iou (blue)",
    );
    save_png(&img, path)
}
