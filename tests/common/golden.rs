//! The official fixture and the comparisons the golden model tests share (f32 and bf16).

use super::fixture::Fixture;
use reclmis::model::{Batch, Config, MaskIndices, RecLmis};
use reclmis::{Device, Tensor};

pub const FIXTURE: &str = "official_tiny";

/// The evaluation outputs and intermediates the fixture stores (`eval.<key>`).
pub const EVAL_KEYS: [&str; 21] = [
    "clip_hidden",
    "text_feat",
    "down3",
    "img_feat4",
    "interact_img_tokens",
    "interact_text_attn",
    "interact_text",
    "interact_img",
    "decoder_input",
    "plam_up4",
    "plam_up3",
    "up4",
    "up3",
    "up2",
    "up1",
    "mlp_visual_score",
    "mlp_woi_score",
    "logits",
    "probs",
    "W_poi",
    "W_woi",
];

/// The training forward's outputs and intermediates the fixture stores (`train.<key>`).
pub const TRAIN_KEYS: [&str; 19] = [
    "probs",
    "W_poi",
    "W_woi",
    "cvr_enc",
    "cvr_out",
    "clr_enc",
    "clr_out",
    "masked_img_feat",
    "masked_text_feat",
    "ccl_t2v",
    "ccl_v2t",
    "ccl_logits",
    "img_feat4",
    "interact_img",
    "interact_text",
    "decoder_input",
    "up4",
    "mlp_visual_score",
    "mlp_woi_score",
];

/// The tiny preset at the fixture's image size, with the fixture's weights.
pub fn model(f: &Fixture, dev: &Device) -> RecLmis {
    let (is, _) = f.get("input.images");
    // the fixture ran with every dropout at p = 0
    let cfg = Config { img_size: (is[2], is[3]), dropout: 0.0, ..Config::preset("tiny").unwrap() };
    let mut m = RecLmis::new(cfg, dev, 0).unwrap();
    let rep =
        reclmis::checkpoint::load_bytes(&mut m.params, f.bytes(), std::path::Path::new("fixture.safetensors")).unwrap();
    assert!(rep.missing.is_empty(), "the fixture lacks model keys: {}", rep.summary());
    let foreign: Vec<&String> = rep
        .unexpected
        .iter()
        .filter(|k| {
            !["input.", "eval.", "train.", "grad.", "after_adam.", "bn_after."].iter().any(|p| k.starts_with(p))
        })
        .collect();
    assert!(foreign.is_empty(), "model lacks fixture weights: {foreign:?}");
    m
}

pub fn batch(f: &Fixture, dev: &Device) -> Batch {
    let (is, img) = f.f32("input.images");
    let (ts, ids) = f.get("input.text_token");
    let (_, valid) = f.get("input.text_mask");
    let (ms, masks) = f.f32("input.masks");
    let i32s = |v: &[f64]| v.iter().map(|&x| x as i32).collect::<Vec<_>>();
    Batch {
        images: Tensor::from_vec(img, &is, dev).unwrap(),
        ids: Tensor::from_vec_i32(i32s(&ids), &ts, dev).unwrap(),
        valid: Tensor::from_vec_i32(i32s(&valid), &ts, dev).unwrap(),
        masks: Some(Tensor::from_vec(masks, &ms, dev).unwrap()),
        text_hidden: None,
    }
}

/// max |got − want| / max(|want|_∞, floor): the error relative to the tensor's own scale.
pub fn scaled_error(got: &[f32], want: &[f64]) -> f64 {
    assert_eq!(got.len(), want.len());
    let scale = want.iter().fold(0.0f64, |a, w| a.max(w.abs())).max(1e-6);
    got.iter()
        .zip(want)
        .fold(0.0f64, |a, (&g, &w)| if (g as f64).is_nan() { f64::INFINITY } else { a.max((g as f64 - w).abs()) })
        / scale
}

/// ‖got − want‖₂ / ‖want‖₂ (for gradients: one element at a ReLU boundary that rounds the
/// other way moves it far less than the max-based error).
pub fn rel_l2(got: &[f32], want: &[f64]) -> f64 {
    let num: f64 = got.iter().zip(want).map(|(&g, &w)| (g as f64 - w).powi(2)).sum();
    let den: f64 = want.iter().map(|w| w * w).sum();
    (num / den.max(1e-300)).sqrt()
}

pub fn fixture_masks(f: &Fixture) -> MaskIndices {
    let rows = |key: &str| -> Vec<Vec<usize>> {
        let (s, v) = f.get(key);
        v.chunks(s[1]).map(|r| r.iter().filter(|&&x| x >= 0.0).map(|&x| x as usize).collect()).collect()
    };
    MaskIndices { img: rows("train.mask_idx_img"), text: rows("train.mask_idx_text") }
}

/// Parameters whose exact gradient is zero (fixture.json `structurally_zero_grads`): the name
/// and the element range (`"all"` or `[lo, hi]`).
pub fn structural_zeros() -> Vec<(String, std::ops::Range<usize>)> {
    let json = std::fs::read_to_string(super::fixture::root().join(FIXTURE).join("fixture.json")).unwrap();
    let start = json.find("\"structurally_zero_grads\"").expect("fixture.json lists structural zeros");
    let end = json[start..].find("\"float32_run_of_same_code\"").map_or(json.len(), |e| start + e);
    json[start..end]
        .split("\"param\": \"")
        .skip(1)
        .map(|s| {
            let name = s[..s.find('"').unwrap()].to_string();
            let el = &s[s.find("\"elements\":").expect("an elements field") + 11..];
            let el = el.trim_start();
            let range = if el.starts_with("\"all\"") {
                0..usize::MAX
            } else {
                let inner = &el[1..el.find(']').unwrap()];
                let v: Vec<usize> = inner.split(',').map(|x| x.trim().parse().unwrap()).collect();
                v[0]..v[1]
            };
            (name, range)
        })
        .collect()
}
