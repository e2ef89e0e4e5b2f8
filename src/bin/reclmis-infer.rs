//! `reclmis-infer`: the deployment binary. Segments one image from its note, or a folder of
//! images from a notes sheet, with a checkpoint (an exported inference checkpoint or a training
//! one), and nothing else: no tape, optimisers, data writers, spreadsheets, progress bars,
//! benchmarks or self-checks. Build: `cargo build --profile release-min --bin reclmis-infer
//! --no-default-features [--features cuda]` (README, "Deployment").

use reclmis::pipeline::visual;
use reclmis::{Device, DeviceChoice, Error, Result};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

const USAGE: &str = "\
usage: reclmis-infer --checkpoint FILE --out DIR [--device auto|cpu|cuda] [--tokenizer FILE]
                     [--overlay] (--image FILE --note TEXT [--mask-gt FILE]
                                 | --images DIR --notes CSV [--masks DIR])

  --checkpoint  a checkpoint from `reclmis export` or `reclmis train` (.safetensors)
  --out         the folder for the masks (created; existing files in it are never overwritten)
  --image/--note      one image and the note that describes what to segment
  --images/--notes    a folder of images and a notes sheet (.csv; .xlsx in the full build) with
                      the columns Image and Description, as the datasets' sheets
  --mask-gt/--masks   ground truth (one file, or a folder with the images' file names):
                      prints the Dice per image
  --overlay     also writes the image with the mask over it (with ground truth: true positives
                green, false negatives red, false positives blue)
  --tokenizer   the tokenizer (default: in the checkpoint, else tokenizer.json beside it)
  --device      cuda when a GPU is usable, else cpu (auto, the default)
  --timings     prints where the time went to stderr (reading, tokenizer, each image's forward
                and mask writing, all from the process start)";

#[derive(Default)]
struct Args {
    checkpoint: Option<PathBuf>,
    out: Option<PathBuf>,
    device: Option<String>,
    tokenizer: Option<PathBuf>,
    overlay: bool,
    timings: bool,
    image: Option<PathBuf>,
    note: Option<String>,
    mask_gt: Option<PathBuf>,
    images: Option<PathBuf>,
    notes: Option<PathBuf>,
    masks: Option<PathBuf>,
}

/// A hand-written parser: clap with derive adds 200 KB to a size-profile binary (an 11-flag stub
/// measured 290 KB without it, 493 KB with it; BENCHMARKS.md), more than an eighth of the budget.
fn parse(mut it: impl Iterator<Item = std::ffi::OsString>) -> std::result::Result<Option<Args>, String> {
    let mut a = Args::default();
    while let Some(flag) = it.next() {
        let flag = flag.into_string().map_err(|f| format!("unknown argument {f:?}"))?;
        if flag == "--help" || flag == "-h" {
            return Ok(None);
        }
        if flag == "--overlay" || flag == "--timings" {
            *(if flag == "--overlay" { &mut a.overlay } else { &mut a.timings }) = true;
            continue;
        }
        let value = it.next().ok_or_else(|| format!("{flag} needs a value"))?;
        let path = || Some(PathBuf::from(&value));
        let text = || value.clone().into_string().map_err(|v| format!("{flag}: {v:?} is not UTF-8"));
        let slot_taken = match flag.as_str() {
            "--checkpoint" => a.checkpoint.replace(path().unwrap()).is_some(),
            "--out" => a.out.replace(path().unwrap()).is_some(),
            "--device" => a.device.replace(text()?).is_some(),
            "--tokenizer" => a.tokenizer.replace(path().unwrap()).is_some(),
            "--image" => a.image.replace(path().unwrap()).is_some(),
            "--note" => a.note.replace(text()?).is_some(),
            "--mask-gt" => a.mask_gt.replace(path().unwrap()).is_some(),
            "--images" => a.images.replace(path().unwrap()).is_some(),
            "--notes" => a.notes.replace(path().unwrap()).is_some(),
            "--masks" => a.masks.replace(path().unwrap()).is_some(),
            _ => return Err(format!("unknown argument {flag}")),
        };
        if slot_taken {
            return Err(format!("{flag} is given twice"));
        }
    }
    Ok(Some(a))
}

/// One image to segment: where it is, its note, its ground truth, and the names of its outputs.
struct Job {
    image: PathBuf,
    note: String,
    gt: Option<PathBuf>,
    mask_out: PathBuf,
    overlay_out: Option<PathBuf>,
}

fn jobs(a: &Args, out: &Path) -> Result<Vec<Job>> {
    let cfg = |m: &str| Error::Config(m.into());
    let overlay = |stem: &str| a.overlay.then(|| out.join(format!("{stem}overlay.png")));
    match (&a.image, &a.images) {
        (Some(image), None) => {
            if a.notes.is_some() || a.masks.is_some() {
                return Err(cfg("--notes and --masks go with --images, not --image"));
            }
            let note = a.note.clone().ok_or_else(|| cfg("--image needs --note"))?;
            Ok(vec![Job {
                image: image.clone(),
                note,
                gt: a.mask_gt.clone(),
                mask_out: out.join("mask.png"),
                overlay_out: overlay(""),
            }])
        }
        (None, Some(dir)) => {
            if a.note.is_some() || a.mask_gt.is_some() {
                return Err(cfg("--note and --mask-gt go with --image, not --images"));
            }
            let sheet = a
                .notes
                .as_ref()
                .ok_or_else(|| cfg("--images needs --notes (a sheet with Image and Description columns)"))?;
            let rows = reclmis::data::lvit::read_sheet_rows(sheet)?;
            let mut seen = std::collections::HashSet::new();
            let mut jobs = Vec::with_capacity(rows.len());
            for (name, note) in rows {
                let stem = Path::new(&name).file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
                if !seen.insert(stem.clone()) {
                    return Err(Error::data(sheet, format!("two rows write the outputs of {stem:?} (image {name:?})")));
                }
                jobs.push(Job {
                    image: dir.join(&name),
                    note,
                    gt: a.masks.as_ref().map(|m| m.join(&name)),
                    mask_out: out.join(format!("{stem}_mask.png")),
                    overlay_out: overlay(&format!("{stem}_")),
                });
            }
            Ok(jobs)
        }
        (Some(_), Some(_)) => Err(cfg("give --image or --images, not both")),
        (None, None) => Err(cfg("nothing to segment: give --image and --note, or --images and --notes")),
    }
}

fn run(a: Args, start: std::time::Instant) -> Result<()> {
    // --timings: one line per phase, seconds since the process started (main's first line)
    let mark = |what: &str| {
        if a.timings {
            eprintln!("{:>8.3} s  {what}", start.elapsed().as_secs_f64());
        }
    };
    let cfg = |m: &str| Error::Config(m.into());
    let checkpoint = a.checkpoint.as_ref().ok_or_else(|| cfg("--checkpoint is required"))?;
    let out = a.out.as_ref().ok_or_else(|| cfg("--out is required"))?;
    let choice: DeviceChoice = a.device.as_deref().unwrap_or("auto").parse()?;
    if choice == DeviceChoice::Emu {
        return Err(cfg("--device emu is the test device; reclmis-infer runs on auto, cpu or cuda"));
    }
    let jobs = jobs(&a, out)?;
    // every output is checked before any work: a file that exists is the user's, never replaced
    for j in &jobs {
        if j.note.trim().is_empty() {
            return Err(Error::data(&j.image, "its note is empty: the model segments what the note describes"));
        }
        for o in std::iter::once(&j.mask_out).chain(&j.overlay_out) {
            if o.symlink_metadata().is_ok() {
                return Err(Error::data(o, "exists; reclmis-infer never overwrites a file (choose another --out)"));
            }
        }
    }
    // one image runs each layer once: caching the Winograd-transformed weights only costs memory
    // (about 60 MB for the official U-Net); a folder reuses them for every image
    reclmis::ops::conv::weight_cache::set_enabled(jobs.len() > 1);
    let dev = Device::from_choice(choice)?;
    mark("arguments checked, device chosen");
    let (m, tok, times) = reclmis::pipeline::load_run_timed(checkpoint, a.tokenizer.as_deref(), &dev)?;
    mark(&format!(
        "loaded: metadata {:.3} s, weights {:.3} s, tokenizer {:.3} s (on its own thread, during the weights)",
        times.metadata, times.weights, times.tokenizer
    ));
    std::fs::create_dir_all(out).map_err(|e| Error::data(out, format!("cannot create the folder: {e}")))?;
    let mut dice = Vec::new();
    for j in &jobs {
        // the ground truth is read (and refused) before the model runs
        let gt = j.gt.as_deref().map(reclmis::data::lvit::decode_mask).transpose()?;
        let (e, orig) = visual::explain(&m, &tok, &j.image, &j.note, &dev, false)?;
        mark(&format!("{}: read, tokenized and segmented", j.image.display()));
        let d = visual::write_mask(&e, &orig, gt.as_ref(), &j.mask_out, j.overlay_out.as_deref())?;
        mark(&format!("{}: written", j.mask_out.display()));
        match d {
            Some(d) => {
                dice.push(d);
                println!("{}\tDice {d:.4}", j.mask_out.display());
            }
            None => println!("{}", j.mask_out.display()),
        }
    }
    if dice.len() > 1 {
        println!("mean Dice {:.4} over {} images", dice.iter().sum::<f64>() / dice.len() as f64, dice.len());
    }
    Ok(())
}

fn main() -> ExitCode {
    let start = std::time::Instant::now();
    let args = match parse(std::env::args_os().skip(1)) {
        Ok(Some(a)) => a,
        Ok(None) => {
            println!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            eprintln!("reclmis-infer: {e}\n\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    match run(args, start) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("reclmis-infer: {e}");
            ExitCode::FAILURE
        }
    }
}
