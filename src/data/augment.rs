//! Training augmentation, deterministic per seed: photometric jitter (brightness, contrast), a
//! Gaussian blur over both image axes (the official one blurs image rows by mistake), and a
//! rotation within ±20° (bilinear for the image, nearest for the mask). Flips and 90° turns,
//! which the official recipe also draws, are off by default: they swap left / right and upper /
//! lower, which contradicts the note of a language-guided sample.

use crate::rng::Rng;

#[derive(Clone, Copy, Debug)]
pub struct AugOpts {
    pub jitter: f32,
    pub blur_p: f32,
    pub max_rotation_deg: f32,
    /// The official recipe's random 90° turns and flips (off by default: see the module doc).
    pub flips: bool,
}

impl Default for AugOpts {
    fn default() -> Self {
        AugOpts { jitter: 0.1, blur_p: 0.3, max_rotation_deg: 20.0, flips: false }
    }
}

/// In place: image [C,H,W], mask [H,W].
pub fn augment(image: &mut [f32], mask: &mut [f32], h: usize, w: usize, o: &AugOpts, rng: &mut Rng) {
    let c = image.len() / (h * w);
    // photometric jitter, the same for every channel
    if o.jitter > 0.0 {
        let (b, k) = (rng.uniform(-o.jitter, o.jitter), 1.0 + rng.uniform(-o.jitter, o.jitter));
        for v in image.iter_mut() {
            *v = ((*v - 0.5) * k + 0.5 + b).clamp(0.0, 1.0);
        }
    }
    if rng.uniform(0.0, 1.0) < o.blur_p {
        let sigma = rng.uniform(0.3, 1.0);
        for ch in 0..c {
            blur(&mut image[ch * h * w..(ch + 1) * h * w], h, w, sigma);
        }
    }
    if o.flips && h == w {
        // LViT's RandomGenerator: rot90 k ∈ {0..3}, then a horizontal flip half of the time
        let k = rng.next_u64() % 4;
        let flip = rng.next_u64().is_multiple_of(2);
        for ch in 0..c {
            turn(&mut image[ch * h * w..(ch + 1) * h * w], w, k, flip);
        }
        turn(mask, w, k, flip);
    }
    if o.max_rotation_deg > 0.0 {
        let a = rng.uniform(-o.max_rotation_deg, o.max_rotation_deg).to_radians();
        rotate(image, mask, c, h, w, a);
    }
}

/// A square plane turned k·90° counter-clockwise, then mirrored left-right when `flip`.
fn turn(p: &mut [f32], n: usize, k: u64, flip: bool) {
    let src = p.to_vec();
    for y in 0..n {
        for x in 0..n {
            let (mut sy, mut sx) = (y, x);
            if flip {
                sx = n - 1 - sx;
            }
            for _ in 0..k {
                // the source of (y, x) under one counter-clockwise turn is (x, n-1-y)
                let t = sy;
                sy = sx;
                sx = n - 1 - t;
            }
            p[y * n + x] = src[sy * n + sx];
        }
    }
}

/// Separable Gaussian blur (radius 3σ, edges clamped), rows then columns.
fn blur(p: &mut [f32], h: usize, w: usize, sigma: f32) {
    let r = (3.0 * sigma).ceil() as isize;
    let kern: Vec<f32> = (-r..=r).map(|i| (-(i * i) as f32 / (2.0 * sigma * sigma)).exp()).collect();
    let sum: f32 = kern.iter().sum();
    let kern: Vec<f32> = kern.iter().map(|k| k / sum).collect();
    let mut tmp = vec![0.0f32; h * w];
    for y in 0..h {
        for x in 0..w {
            tmp[y * w + x] = (-r..=r)
                .map(|i| kern[(i + r) as usize] * p[y * w + (x as isize + i).clamp(0, w as isize - 1) as usize])
                .sum();
        }
    }
    for y in 0..h {
        for x in 0..w {
            p[y * w + x] = (-r..=r)
                .map(|i| kern[(i + r) as usize] * tmp[(y as isize + i).clamp(0, h as isize - 1) as usize * w + x])
                .sum();
        }
    }
}

/// Rotation by `a` radians about the centre; outside the source is 0.
fn rotate(image: &mut [f32], mask: &mut [f32], c: usize, h: usize, w: usize, a: f32) {
    let (sa, ca) = a.sin_cos();
    let (cy, cx) = ((h as f32 - 1.0) / 2.0, (w as f32 - 1.0) / 2.0);
    let src_img = image.to_vec();
    let src_mask = mask.to_vec();
    for y in 0..h {
        for x in 0..w {
            let (dx, dy) = (x as f32 - cx, y as f32 - cy);
            let (sx, sy) = (ca * dx + sa * dy + cx, -sa * dx + ca * dy + cy);
            let (x0, y0) = (sx.floor(), sy.floor());
            let (fx, fy) = (sx - x0, sy - y0);
            let at = |p: &[f32], yy: f32, xx: f32| {
                if yy < 0.0 || xx < 0.0 || yy >= h as f32 || xx >= w as f32 {
                    0.0
                } else {
                    p[yy as usize * w + xx as usize]
                }
            };
            for ch in 0..c {
                let p = &src_img[ch * h * w..(ch + 1) * h * w];
                image[ch * h * w + y * w + x] = (1.0 - fy) * ((1.0 - fx) * at(p, y0, x0) + fx * at(p, y0, x0 + 1.0))
                    + fy * ((1.0 - fx) * at(p, y0 + 1.0, x0) + fx * at(p, y0 + 1.0, x0 + 1.0));
            }
            mask[y * w + x] = at(&src_mask, sy.round(), sx.round());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_rotation_keeps_the_mask_and_blur_keeps_the_mean() {
        let (h, w) = (16, 16);
        let mut rng = Rng::new(1);
        let mut img: Vec<f32> = (0..h * w).map(|i| (i % 7) as f32 / 7.0).collect();
        let mut mask: Vec<f32> = (0..h * w).map(|i| (i % 3 == 0) as i32 as f32).collect();
        let m0 = mask.clone();
        rotate(&mut img, &mut mask, 1, h, w, 0.0);
        assert_eq!(mask, m0);
        let mean = img.iter().sum::<f32>() / img.len() as f32;
        let mut b = vec![0.5f32; h * w];
        blur(&mut b, h, w, 1.0);
        assert!(b.iter().all(|v| (v - 0.5).abs() < 1e-5), "a constant image stays constant");
        let mut o = img.clone();
        augment(
            &mut o,
            &mut mask,
            h,
            w,
            &AugOpts { jitter: 0.0, blur_p: 0.0, max_rotation_deg: 0.0, flips: false },
            &mut rng,
        );
        assert_eq!(o, img, "no-op options leave the image as it is ({mean})");
        // four turns are the identity; a flip twice too; image and mask move together
        let mut t = img.clone();
        for _ in 0..4 {
            turn(&mut t, w, 1, false);
        }
        assert_eq!(t, img);
        turn(&mut t, w, 0, true);
        assert_ne!(t, img);
        turn(&mut t, w, 0, true);
        assert_eq!(t, img);
    }
}
