//! `reclmis model --flops`: the counted multiply-adds of modules whose cost is known in closed
//! form equal it, the backward of Linear and the convolutions is twice their forward, a frozen
//! text tower has no backward, and the parameter column is the module's weights.

use reclmis::model::{summary, Config, RecLmis};
use reclmis::Device;

#[test]
fn counted_macs_match_closed_forms() {
    let cfg = Config::preset("tiny").unwrap();
    let m = RecLmis::new(cfg.clone(), &Device::Cpu, 0).unwrap();
    let b = 2u64;
    let r = summary::count_flops(&m, b as usize).unwrap();
    let row = |name: &str| *r.rows.iter().find(|x| x.0 == name).unwrap();
    let (h, w) = (cfg.img_size.0 as u64, cfg.img_size.1 as u64);
    let (d, l) = (cfg.d_model as u64, cfg.token_len as u64);
    let n = (h / 16) * (w / 16);
    // outc: a 1x1 convolution from the first width to one class at every pixel
    let outc = row("outc");
    assert_eq!(outc.2, b * h * w * cfg.unet_widths[0] as u64);
    assert_eq!(outc.1, cfg.unet_widths[0] + 1, "weights and bias");
    assert_eq!((outc.3.forward, outc.3.backward), (outc.2, 2 * outc.2));
    // up1: its PLAM gate's two 1x1 convolutions over the skip (c0 -> c0), then 3x3 over
    // concat[gated skip, upsampled] (2·c0 -> c0) and 3x3 c0 -> c0
    let c0 = cfg.unet_widths[0] as u64;
    assert_eq!(row("up1").2, b * h * w * c0 * c0 * (2 + 2 * 9 + 9));
    assert_eq!(row("up1").3.backward, 2 * row("up1").3.forward);
    // the Interactor: a 1x1 patch conv over N tokens; text queries image (q on L rows, k and v on
    // N, out on L, attention 2·L·N·d) and image queries text (q on N, k and v on L, out on N)
    let patch = b * n * d * d;
    let attn_text = b * (l * d * d + 2 * n * d * d + l * d * d + 2 * l * n * d);
    let attn_img = b * (n * d * d + 2 * l * d * d + n * d * d + 2 * n * l * d);
    assert_eq!(row("interact").2, patch + attn_text + attn_img);
    // CTBN's conv1d (k 3 over L) runs in training only
    assert_eq!(row("interact").3.forward, patch + attn_text + attn_img + b * l * d * d * 3);
    // the tiny preset's text tower is frozen: it runs, and nothing flows back through it
    let clip = row("clip");
    assert!(clip.2 > 0 && clip.3.forward == clip.2 && clip.3.backward == 0);
    // the training-only modules have no inference cost
    for name in ["mlp_visual", "mlp_woi", "rec_img_trans1", "rec_text_trans1", "ccl"] {
        let x = row(name);
        assert!(x.2 == 0 && x.3.forward > 0 && x.3.backward > 0, "{name}: {x:?}");
    }
    // the CCL similarity: every note of the batch against every image's N tokens
    assert_eq!(row("ccl").3.forward, b * b * l * n * d);
    let total_params: usize = r.rows.iter().map(|x| x.1).sum();
    let all: usize =
        m.params.ids().filter(|&id| !m.params.name(id).contains("running_")).map(|id| m.params.value(id).numel()).sum();
    assert_eq!(total_params, all, "every weight belongs to a listed module");
}

#[test]
fn cli_prints_the_table() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_reclmis"))
        .args(["model", "--preset", "tiny", "--flops", "--batch", "1"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let s = String::from_utf8_lossy(&out.stdout);
    assert!(s.contains("infer GMACs") && s.contains("down4") && s.contains("total"), "{s}");
}

/// `bench-model --profile`: every module of the inference gets its wall time, the modules'
/// times add up to the whole call's (nothing is lost between labels), and the timer leaves no
/// state behind.
#[test]
fn profile_times_every_module() {
    use reclmis::autograd::count::timer;
    let m = RecLmis::new(Config::preset("tiny").unwrap(), &Device::Cpu, 0).unwrap();
    let b = summary::synthetic_batch(&m, 2).unwrap();
    let t = std::time::Instant::now();
    let (p, seconds) = timer::timed(&Device::Cpu, || m.infer(&b));
    let whole = t.elapsed().as_secs_f64();
    p.unwrap();
    for name in ["clip", "inc", "down1", "down4", "interact", "up4", "up1", "outc"] {
        assert!(seconds.get(name).is_some_and(|&s| s > 0.0), "{name}: {seconds:?}");
    }
    let sum: f64 = seconds.values().sum();
    assert!(sum <= whole && sum > 0.9 * whole, "modules {sum} s of {whole} s: {seconds:?}");
    let (_, again) = timer::timed(&Device::Cpu, || ());
    assert!(again.values().sum::<f64>() < 0.01 * whole, "a fresh timer starts empty: {again:?}");
}
