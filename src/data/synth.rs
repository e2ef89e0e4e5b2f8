//! A synthetic QaTa-style dataset: chest-radiograph-like grayscale images (body, two dark lung
//! fields, spine, ribs, texture, noise), infection opacities in lung zones with their note and
//! mask, and — so that the text matters — on some images an extra opacity that the note does not
//! mention and the mask does not include.

use super::notes::{self, Zones};
use crate::rng::Rng;

pub struct SynthSample {
    /// [S*S] in [0, 1]
    pub image: Vec<f32>,
    /// [S*S] 0/1
    pub mask: Vec<u8>,
    pub note: String,
    pub zones: Zones,
    /// With a distractor: the note naming only the distractor's zone, and the distractor's mask
    /// (what a model that follows the note must segment when given that note instead).
    pub counterfactual: Option<(String, Vec<u8>)>,
}

struct Lung {
    cx: f32,
    cy: f32,
    rx: f32,
    ry: f32,
}

impl Lung {
    fn inside(&self, u: f32, v: f32) -> bool {
        let (a, b) = ((u - self.cx) / self.rx, (v - self.cy) / self.ry);
        a * a + b * b <= 1.0
    }
    /// Vertical third z (0 upper, 1 middle, 2 lower): (v0, v1).
    fn third(&self, z: usize) -> (f32, f32) {
        let top = self.cy - self.ry;
        let h = 2.0 * self.ry / 3.0;
        (top + h * z as f32, top + h * (z + 1) as f32)
    }
}

fn normal(rng: &mut Rng) -> f32 {
    let u1 = rng.uniform(1e-7, 1.0);
    let u2 = rng.uniform(0.0, 1.0);
    (-2.0 * u1.ln()).sqrt() * (std::f32::consts::TAU * u2).cos()
}

/// (center u, center v, radius u, radius v)
type Ellipse = (f32, f32, f32, f32);

/// An opacity blob in zone z of `lung`.
fn blob(lung: &Lung, z: usize, rng: &mut Rng) -> Ellipse {
    let (v0, v1) = lung.third(z);
    let cv = rng.uniform(v0 + 0.25 * (v1 - v0), v1 - 0.25 * (v1 - v0));
    let cu = lung.cx + rng.uniform(-0.35, 0.35) * lung.rx;
    (cu, cv, rng.uniform(0.5, 0.8) * lung.rx, rng.uniform(0.3, 0.45) * (v1 - v0) * 1.5)
}

/// One sample of size `s` × `s`.
pub fn sample(s: usize, rng: &mut Rng, note_noise: f64, distractor_rate: f64) -> SynthSample {
    let j = |rng: &mut Rng, a: f32| rng.uniform(-a, a);
    let lungs = [
        Lung { cx: 0.30 + j(rng, 0.02), cy: 0.48 + j(rng, 0.02), rx: 0.14 + j(rng, 0.01), ry: 0.29 + j(rng, 0.02) },
        Lung { cx: 0.70 + j(rng, 0.02), cy: 0.48 + j(rng, 0.02), rx: 0.14 + j(rng, 0.01), ry: 0.29 + j(rng, 0.02) },
    ];
    // infected zones: one side (1/3) or both (2/3), 1-3 zones per side
    let mut zones: Zones = [[false; 3]; 2];
    let both = rng.uniform(0.0, 1.0) < 0.66;
    let first = (rng.next_u64() % 2) as usize;
    for (side, zs) in zones.iter_mut().enumerate() {
        if !both && side != first {
            continue;
        }
        let pattern = 1 + (rng.next_u64() % 7) as usize; // a non-empty subset of the 3 zones
        for (z, on) in zs.iter_mut().enumerate() {
            *on = pattern & (1 << z) != 0;
        }
    }
    // (side, ellipse, in the note and mask)
    let mut blobs: Vec<(usize, Ellipse, bool)> = vec![];
    for (side, zs) in zones.iter().enumerate() {
        for (z, &on) in zs.iter().enumerate() {
            if on {
                blobs.push((side, blob(&lungs[side], z, rng), true));
            }
        }
    }
    // a distractor in a clean zone: same look, not in the note, not in the mask
    let mut cf_zones = None;
    if rng.uniform(0.0, 1.0) < distractor_rate as f32 {
        let clean: Vec<(usize, usize)> =
            (0..2).flat_map(|s| (0..3).map(move |z| (s, z))).filter(|&(s, z)| !zones[s][z]).collect();
        if !clean.is_empty() {
            let (side, z) = clean[(rng.next_u64() % clean.len() as u64) as usize];
            blobs.push((side, blob(&lungs[side], z, rng), false));
            let mut only: Zones = [[false; 3]; 2];
            only[side][z] = true;
            cf_zones = Some(only);
        }
    }
    // smooth texture: a few random plane waves
    let waves: Vec<(f32, f32, f32, f32)> = (0..6)
        .map(|_| {
            (
                rng.uniform(2.0, 9.0),
                rng.uniform(0.0, std::f32::consts::TAU),
                rng.uniform(0.0, std::f32::consts::TAU),
                rng.uniform(0.01, 0.025),
            )
        })
        .collect();
    let brightness = 1.0 + j(rng, 0.1);
    let (mut image, mut mask) = (vec![0.0f32; s * s], vec![0u8; s * s]);
    let mut cf_mask = vec![0u8; if cf_zones.is_some() { s * s } else { 0 }];
    for y in 0..s {
        for x in 0..s {
            let (u, v) = ((x as f32 + 0.5) / s as f32, (y as f32 + 0.5) / s as f32);
            let (bu, bv) = ((u - 0.5) / 0.46, (v - 0.55) / 0.52);
            let body = bu * bu + bv * bv <= 1.0;
            let mut val = if body { 0.55 } else { 0.08 };
            if body && (u - 0.5).abs() < 0.035 {
                val = 0.72; // spine
            }
            let lung = lungs.iter().position(|l| l.inside(u, v));
            if let Some(li) = lung {
                val = 0.2;
                // ribs: curved bright bands across the lung fields
                let r = (std::f32::consts::TAU * (v * 7.0 + 0.8 * (u - lungs[li].cx).powi(2) * 10.0)).sin().max(0.0);
                val += 0.1 * r.powi(4);
                for &(side, (cu, cv, ru, rv), real) in &blobs {
                    if side != li {
                        continue;
                    }
                    let (a, b) = ((u - cu) / ru, (v - cv) / rv);
                    let d = a * a + b * b;
                    if d < 1.0 {
                        val += 0.32 * (1.0 - d).sqrt();
                        if real && d < 0.85 {
                            mask[y * s + x] = 1;
                        }
                        if !real && d < 0.85 {
                            cf_mask[y * s + x] = 1;
                        }
                    }
                }
            }
            for &(k, ph, dir, amp) in &waves {
                val += amp * (k * std::f32::consts::TAU * (u * dir.cos() + v * dir.sin()) + ph).sin();
            }
            val = val * brightness + 0.02 * normal(rng);
            image[y * s + x] = val.clamp(0.0, 1.0);
        }
    }
    let note = notes::add_noise(&notes::note(&zones), note_noise, rng);
    let counterfactual = cf_zones.map(|z| (notes::note(&z), cf_mask));
    SynthSample { image, mask, note, zones, counterfactual }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn masks_lie_in_the_noted_zones() {
        let mut rng = Rng::new(5);
        for _ in 0..20 {
            let s = sample(64, &mut rng, 0.0, 1.0);
            assert!(s.mask.contains(&1), "every sample has an infection");
            // no mask pixel on a side the note does not name
            for side in 0..2 {
                if s.zones[side].iter().all(|&z| !z) {
                    let (x0, x1) = if side == 0 { (0, 32) } else { (32, 64) };
                    assert!((0..64).all(|y| (x0..x1).all(|x| s.mask[y * 64 + x] == 0)), "{}", s.note);
                }
            }
            assert!(s.image.iter().all(|v| (0.0..=1.0).contains(v)));
            // the distractor is the counterfactual: its own zone, outside the real mask
            let (note, cf) = s.counterfactual.expect("distractor rate 1");
            assert!(note.starts_with("Unilateral pulmonary infection, one infected area, "), "{note}");
            assert!(cf.contains(&1), "{note}");
            // blobs may reach into a neighbouring third, so the masks can touch, but the
            // counterfactual opacity lies mostly outside the real one
            let shared = cf.iter().zip(&s.mask).filter(|(&c, &m)| c == 1 && m == 1).count();
            let total = cf.iter().filter(|&&c| c == 1).count();
            assert!(2 * shared < total, "{note}: {shared} of {total} pixels inside the note's mask");
        }
    }
}
