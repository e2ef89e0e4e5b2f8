//! `reclmis ablate`: the paper's component ablation (its Table 3: conditioned interaction CI,
//! conditioned language and vision reconstruction CLR / CVR) trained on one dataset with the
//! same seed, data, schedule and time budget per variant, then scored on the test split with the
//! correct, shuffled and (synth's data) counterfactual notes.

use super::recipe::ModelOptions;
use super::train::{train, TrainOpts};
use super::{evaluate, load, load_counterfactual, load_run, Notes, Scores};
use crate::data::lvit::Split;
use crate::device::Device;
use crate::error::{Error, Result};
use std::path::{Path, PathBuf};

/// One row of the table: a name and what it changes from the full model.
#[derive(Clone, Debug)]
pub struct Variant {
    pub name: &'static str,
    pub what: &'static str,
    pub options: ModelOptions,
}

/// The variants in the paper's order: the full model, each component removed alone, the two
/// reconstructions together, and all three (the U-Net with the plain Interactor).
pub fn variants() -> Vec<Variant> {
    let w = |ccl: f32, text: f32, img: f32| Some([5.0, ccl, text, img]);
    let v = |name, what, no_ci: bool, loss_weights| Variant {
        name,
        what,
        options: ModelOptions { no_condition: no_ci.then_some(true), loss_weights, ..Default::default() },
    };
    vec![
        v("full", "RecLMIS: CI + CLR + CVR", false, None),
        v("no-ci", "without the conditioned interaction (uniform W)", true, None),
        v("no-clr", "without conditioned language reconstruction", false, w(0.2, 0.0, 1.0)),
        v("no-cvr", "without conditioned vision reconstruction", false, w(0.2, 1.0, 0.0)),
        v("no-rec", "without CLR and CVR", false, w(0.2, 0.0, 0.0)),
        v("base", "without CI, CLR and CVR", true, w(0.2, 0.0, 0.0)),
    ]
}

/// The variants named in `list` (comma-separated), in the table's order; every name must exist.
pub fn select(list: Option<&str>) -> Result<Vec<Variant>> {
    let all = variants();
    let Some(list) = list else { return Ok(all) };
    let names: Vec<&str> = list.split(',').map(str::trim).filter(|s| !s.is_empty()).collect();
    if let Some(bad) = names.iter().find(|n| !all.iter().any(|v| v.name == **n)) {
        let known: Vec<&str> = all.iter().map(|v| v.name).collect();
        return Err(Error::Config(format!("--variants: unknown variant {bad:?} (known: {})", known.join(", "))));
    }
    if names.is_empty() {
        return Err(Error::Config("--variants: no variant named".into()));
    }
    Ok(all.into_iter().filter(|v| names.contains(&v.name)).collect())
}

#[derive(Clone, Debug)]
pub struct AblateOpts {
    pub data: PathBuf,
    /// Each variant's run goes to `out/<name>`; the table to `out/ablation.csv` and `.png`.
    pub out: PathBuf,
    pub preset: String,
    /// The whole table's time budget, shared equally by the variants (0 = no limit).
    pub budget_minutes: f64,
    pub epochs: usize,
    pub batch: usize,
    pub lr: Option<f32>,
    /// As `train --clip-grad-norm` (None: no clipping).
    pub clip_grad_norm: Option<f32>,
    pub seed: u64,
    pub patience: usize,
    pub counterfactual_rate: f64,
    pub variants: Vec<Variant>,
    pub progress: bool,
}

#[derive(Clone, Debug)]
pub struct Row {
    pub name: &'static str,
    pub what: &'static str,
    pub epochs: usize,
    pub best_epoch: usize,
    pub minutes: f64,
    pub correct: Scores,
    pub shuffled: Scores,
    pub counterfactual: Option<Scores>,
}

/// Trains and scores every variant; writes the table as `ablation.csv` and `ablation.png`
/// (rewritten after each variant, so an interrupted table keeps its finished rows).
pub fn ablate(o: &AblateOpts, dev: &Device) -> Result<Vec<Row>> {
    if o.variants.is_empty() {
        return Err(Error::Config("ablate: no variant to train".into()));
    }
    if !(o.budget_minutes.is_finite() && o.budget_minutes >= 0.0) {
        return Err(Error::Config(format!("--budget-minutes {}: must be a number ≥ 0", o.budget_minutes)));
    }
    let per_variant = o.budget_minutes / o.variants.len() as f64;
    let lr = match o.lr {
        Some(lr) => lr,
        None => crate::model::Config::preset(&o.preset)?.default_lr(),
    };
    let mut rows = vec![];
    for v in &o.variants {
        if o.progress {
            let limit =
                if per_variant > 0.0 { format!("{per_variant:.1} minutes") } else { "no time limit".to_string() };
            println!("== {} ({}): up to {} epochs, {limit}", v.name, v.what, o.epochs);
        }
        let run = o.out.join(v.name);
        let t = TrainOpts {
            data: o.data.clone(),
            preset: o.preset.clone(),
            epochs: o.epochs,
            batch: o.batch,
            accumulate: 1,
            precision: crate::autograd::Precision::F32,
            lr,
            clip_grad_norm: o.clip_grad_norm,
            seed: o.seed,
            out: run.clone(),
            patience: o.patience,
            max_minutes: per_variant,
            tokenizer: None,
            text_weights: None,
            model: v.options.clone(),
            schedule: crate::optim::schedule::Schedule::Cosine,
            counterfactual_rate: o.counterfactual_rate,
            resume: false,
            overwrite: false,
            accept_changes: false,
            stop_after: 0,
            augment: true,
            official_flips: false,
            progress: o.progress,
        };
        let s = train(&t, dev)?;
        let (m, tok) = load_run(&run.join("best.safetensors"), None, dev)?;
        let (h, w) = m.cfg.img_size;
        let test = load(&o.data, Split::Test, h, w)?;
        let row = Row {
            name: v.name,
            what: v.what,
            epochs: s.epochs_run,
            best_epoch: s.best_epoch,
            minutes: s.seconds / 60.0,
            correct: evaluate(&m, &test, &tok, Notes::Correct, 16)?,
            shuffled: evaluate(&m, &test, &tok, Notes::Shuffled, 16)?,
            counterfactual: match load_counterfactual(&o.data, Split::Test, h, w)? {
                Some(cf) => Some(evaluate(&m, &cf, &tok, Notes::Correct, 16)?),
                None => None,
            },
        };
        rows.push(row);
        crate::files::write_atomic(&o.out.join("ablation.csv"), csv(&rows).as_bytes())?;
        plot(&rows, &o.out.join("ablation.png"))?;
    }
    Ok(rows)
}

/// The table as CSV: one row per variant.
pub fn csv(rows: &[Row]) -> String {
    let mut s = String::from(
        "variant,description,epochs,best_epoch,minutes,dice,iou,shuffled_dice,shuffled_iou,\
         counterfactual_dice,counterfactual_iou\n",
    );
    for r in rows {
        let (cd, ci) = r
            .counterfactual
            .as_ref()
            .map_or((String::new(), String::new()), |c| (format!("{:.4}", c.dice), format!("{:.4}", c.iou)));
        s += &format!(
            "{},\"{}\",{},{},{:.2},{:.4},{:.4},{:.4},{:.4},{cd},{ci}\n",
            r.name,
            r.what,
            r.epochs,
            r.best_epoch,
            r.minutes,
            r.correct.dice,
            r.correct.iou,
            r.shuffled.dice,
            r.shuffled.iou
        );
    }
    s
}

/// The table as the CLI prints it.
pub fn table(rows: &[Row]) -> String {
    let mut s = format!(
        "{:<8} {:>6} {:>13} {:>13} {:>15}  {}\n",
        "variant", "epochs", "Dice / IoU", "shuffled", "counterfactual", "what"
    );
    for r in rows {
        let cf = r.counterfactual.as_ref().map_or("-".to_string(), |c| format!("{:.3} / {:.3}", c.dice, c.iou));
        s += &format!(
            "{:<8} {:>6} {:>13} {:>13} {:>15}  {}\n",
            r.name,
            r.epochs,
            format!("{:.3} / {:.3}", r.correct.dice, r.correct.iou),
            format!("{:.3} / {:.3}", r.shuffled.dice, r.shuffled.iou),
            cf,
            r.what
        );
    }
    s
}

/// `runs/ablate-N`, the first that does not exist.
pub fn next_free(base: &Path) -> PathBuf {
    (1..).map(|n| base.join(format!("ablate-{n}"))).find(|p| !p.exists()).expect("an unbounded range")
}

/// ablation.png: per variant, bars of the test Dice with the correct (green), shuffled (gray) and
/// counterfactual (blue) notes on a 0..1 axis, the variant's name below.
pub fn plot(rows: &[Row], path: &Path) -> Result<()> {
    use super::visual::font;
    use image::{Rgb, RgbImage};
    let (bar, gap, ph, pad) = (14u32, 18u32, 200u32, 30u32);
    let group = 3 * bar + gap;
    // wide enough for the title (45 glyphs of 6 px) with a single variant
    let width = (2 * pad + group * rows.len() as u32).max(2 * pad + 280);
    let mut img = RgbImage::from_pixel(width, ph + 3 * pad, Rgb([255, 255, 255]));
    for y in pad..=pad + ph {
        img.put_pixel(pad - 2, y, Rgb([0, 0, 0]));
    }
    for x in pad - 2..width - pad {
        img.put_pixel(x, pad + ph, Rgb([0, 0, 0]));
    }
    font::draw(&mut img, 4, pad - 3, "1.0", Rgb([90, 90, 90]));
    font::draw(&mut img, 4, pad + ph - 7, "0.0", Rgb([90, 90, 90]));
    font::draw(&mut img, pad, 8, "test dice: correct, shuffled, counterfactual", Rgb([0, 0, 0]));
    for (i, r) in rows.iter().enumerate() {
        let x0 = pad + gap / 2 + i as u32 * group;
        let bars = [
            (Some(r.correct.dice), [0, 150, 0]),
            (Some(r.shuffled.dice), [150, 150, 150]),
            (r.counterfactual.map(|c| c.dice), [30, 80, 220]),
        ];
        for (k, (v, color)) in bars.into_iter().enumerate() {
            let Some(v) = v else { continue };
            let h = (v.clamp(0.0, 1.0) * ph as f64).round() as u32;
            for x in x0 + k as u32 * bar..x0 + (k as u32 + 1) * bar - 2 {
                for y in pad + ph - h..pad + ph {
                    img.put_pixel(x, y, Rgb(color));
                }
            }
        }
        font::draw(&mut img, x0, pad + ph + 6, r.name, Rgb([0, 0, 0]));
    }
    super::visual::save_png(&img, path)
}
