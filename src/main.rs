//! The `reclmis` command line.

use clap::{CommandFactory, FromArgMatches, Parser, Subcommand};
use reclmis::autograd::Precision;
use reclmis::data::lvit::Split;
use reclmis::device::{Device, DeviceChoice};
use reclmis::pipeline::{self, Notes};
use reclmis::{bench, kernels, selfcheck};
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Parser)]
#[command(name = "reclmis", version, about = "GPU compute engine for language-guided medical image segmentation")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
    /// Refuse images larger than this many megapixels (checked from the file's header)
    #[arg(long, global = true, default_value_t = 100.0)]
    max_megapixels: f64,
    /// Autotuning: off (the fixed heuristics), on (the first call of each convolution or
    /// few-rows Linear shape times its algorithms, the faster of two timings each; the choice is
    /// cached per machine and build) or exhaustive (three timings each) [default: RECLMIS_TUNE,
    /// else off]
    #[arg(long, global = true)]
    tune: Option<String>,
}

/// One image and its note through a trained checkpoint (infer, explain).
#[derive(clap::Args)]
struct OneImage {
    #[arg(long)]
    checkpoint: PathBuf,
    #[arg(long)]
    image: PathBuf,
    #[arg(long)]
    note: String,
    #[arg(long)]
    out: PathBuf,
    #[arg(long, value_enum, default_value = "auto")]
    device: DeviceChoice,
    /// The tokenizer (default: tokenizer.json beside the checkpoint)
    #[arg(long)]
    tokenizer: Option<PathBuf>,
    #[arg(long, help = PRECISION_HELP)]
    precision: Option<String>,
}

/// `--precision`'s help (train, eval, infer, explain, bench-model, model --memory).
const PRECISION_HELP: &str = "f32 (exact), tf32 (tensor-core GEMMs and convolutions; f32 on the cpu) or bf16 \
     (autocast: see the README's table) [default: bf16 on cuda, f32 elsewhere: on the cpu bf16 only adds \
     rounding passes to f32 kernels, so it is slower]";

/// `--precision` or the device's default (bf16 where tensor cores run it, f32 elsewhere).
fn precision(choice: Option<&str>, dev: &Device) -> reclmis::Result<Precision> {
    match choice {
        Some(p) => Precision::parse(p),
        None if dev.kind() == reclmis::device::DeviceKind::Cuda => Ok(Precision::Bf16),
        None => Ok(Precision::F32),
    }
}

impl OneImage {
    fn run(&self, weights: bool) -> reclmis::Result<(pipeline::visual::Explained, image::RgbImage)> {
        if self.note.trim().is_empty() {
            return Err(reclmis::Error::Config("--note is empty: the model segments what the note describes".into()));
        }
        let dev = Device::from_choice(self.device)?;
        let p = precision(self.precision.as_deref(), &dev)?;
        let (mut m, tok) = pipeline::load_run(&self.checkpoint, self.tokenizer.as_deref(), &dev)?;
        m.precision = p;
        pipeline::visual::explain(&m, &tok, &self.image, &self.note, &dev, weights)
    }
}

/// The quickstart's share of counterfactual training samples (see `train --counterfactual-rate`).
#[cfg(feature = "train")]
const QUICKSTART_COUNTERFACTUAL_RATE: f64 = 0.7;

/// The quickstart's gradient clipping (see `train --clip-grad-norm`; also `ablate`'s default):
/// above the epoch means of the norm on its data (1.2 to 4), so it cuts the outliers, spikes of
/// 40 to 160 among them. Without it one such step (epoch 18 of seed 1, norm 72) undid what the
/// model had learnt of the notes for the rest of the run (BENCHMARKS.md).
#[cfg(feature = "train")]
const QUICKSTART_CLIP_GRAD_NORM: f32 = 5.0;

/// The quickstart's synthetic dataset (also `ablate`'s default).
#[cfg(feature = "train")]
fn quickstart_data() -> reclmis::data::write::SynthOpts {
    reclmis::data::write::SynthOpts { train: 1000, val: 100, test: 100, ..Default::default() }
}

// parsed once per process: the size of the train variant costs nothing
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand)]
enum Cmd {
    /// Run every op on the device and compare it with the f64 reference (the quick health check)
    Selfcheck {
        #[arg(long, value_enum, default_value = "auto")]
        device: DeviceChoice,
    },
    /// Time each kernel: min / median / p90, GFLOP/s, GB/s, % of this machine's measured
    /// roofline, and the ratio to PyTorch with --peer
    Bench {
        #[arg(long, value_enum, default_value = "auto")]
        device: DeviceChoice,
        /// Only these benchmarks, comma-separated (the names: `reclmis bench --help`, from each
        /// op's own cases in bench::registry)
        #[arg(long)]
        op: Option<String>,
        /// A Python with torch installed: run benches/peer_torch.py in the same invocation
        #[arg(long)]
        peer: Option<String>,
        /// Timed repetitions per case (min, median and 90th percentile are reported)
        #[arg(long, default_value_t = 10)]
        reps: usize,
        /// One shape for the one --op given instead of its built-in cases (the forms:
        /// `reclmis bench --help`)
        #[arg(long)]
        shape: Option<String>,
        /// table (for people), json (for scripts and --baseline) or csv; every record names the
        /// CPU, cores, device, precision and commit
        #[arg(long, default_value = "table")]
        format: String,
        /// An earlier `--format json` run: each case's change, marked SLOWER / faster only when
        /// the two runs' [min, p90] ranges do not overlap
        #[arg(long)]
        baseline: Option<PathBuf>,
    },
    /// Time the official model (224²): inference at batch 1 / 8, a training step at batch 4; one
    /// scenario per process (peak RSS is the scenario's), one JSON line like ../shared/peer/bench_cpu.py
    ///
    /// Without --scenario: runs the scenarios, each in its own process, interleaved with the
    /// PyTorch peer's (--peer PYTHON runs ../shared/peer/bench_cpu.py --only S and S_compile),
    /// and prints every JSON line and a table of medians, peak RSS and ratios.
    BenchModel {
        #[arg(long, value_enum, default_value = "auto")]
        device: DeviceChoice,
        /// One scenario in this process: infer_b1, infer_b8 or train_b4
        #[arg(long)]
        scenario: Option<String>,
        /// The scenarios to compare (without --scenario)
        #[arg(long, default_value = "infer_b1,infer_b8,train_b4", value_delimiter = ',')]
        scenarios: Vec<String>,
        /// A python with torch: runs the peer's same scenarios between ours
        #[arg(long)]
        peer: Option<PathBuf>,
        /// The peer's script
        #[arg(long, default_value = "../shared/peer/bench_cpu.py")]
        peer_script: PathBuf,
        /// Leave out the peer's torch.compile runs (each compiles for minutes)
        #[arg(long)]
        no_compile: bool,
        /// Times through all scenarios (ranges show the machine's noise)
        #[arg(long, default_value_t = 1)]
        rounds: usize,
        #[arg(long, help = PRECISION_HELP)]
        precision: Option<String>,
        /// With --scenario: add the mean wall time per model module (`profile_ms`; the device
        /// is synchronised at each module's start, so a GPU's times are its own too)
        #[arg(long)]
        profile: bool,
    },
    /// Write a synthetic QaTa-style dataset in the LViT layout (images, masks, notes as xlsx and csv)
    Synth {
        #[arg(long)]
        out: PathBuf,
        #[arg(long, default_value_t = 400)]
        train: usize,
        #[arg(long, default_value_t = 80)]
        val: usize,
        #[arg(long, default_value_t = 80)]
        test: usize,
        /// Image side in pixels (a multiple of 16)
        #[arg(long, default_value_t = 96)]
        size: usize,
        #[arg(long, default_value_t = 1)]
        seed: u64,
    },
    /// Train on a dataset in the LViT layout
    #[cfg(feature = "train")]
    Train {
        #[arg(long)]
        data: PathBuf,
        /// The paper's recipe for a dataset (qata: QaTa-COV19, mosmed: MosMedData+): preset,
        /// batch, epochs, patience, learning rate and schedule, seed, K, mask rates and score
        /// dropout as the official configuration files set them; the flags below override it
        #[arg(long)]
        recipe: Option<String>,
        /// official, tiny or small [default: small, or the recipe's]
        #[arg(long)]
        preset: Option<String>,
        #[arg(long, value_enum, default_value = "auto")]
        device: DeviceChoice,
        /// [default: 30, or the recipe's]
        #[arg(long)]
        epochs: Option<usize>,
        /// Samples per forward and backward (the micro-batch with --accumulate) [default: 8, or
        /// the recipe's]
        #[arg(long)]
        batch: Option<usize>,
        /// Gradient accumulation: micro-batches of --batch samples per optimiser step, so a step
        /// sees batch × N samples with one micro-batch's activations in memory (batch norm
        /// normalises each micro-batch alone, as PyTorch does)
        #[arg(long, default_value_t = 1)]
        accumulate: usize,
        #[arg(long, help = PRECISION_HELP)]
        precision: Option<String>,
        /// Learning rate [default: the recipe's, else the preset's: 3e-4 as the official code for
        /// official and tiny, 1e-3 for small]
        #[arg(long)]
        lr: Option<f32>,
        /// Scale each step's gradients so that their global L2 norm is at most this (PyTorch's
        /// clip_grad_norm_; the mean and largest norm per epoch are in log.jsonl as grad_norm and
        /// grad_norm_max) [default: none, as the official recipes]
        #[arg(long)]
        clip_grad_norm: Option<f32>,
        /// Learning-rate schedule, stepped per epoch: cosine (one period over the run, to lr/100),
        /// restarts (official QaTa: cosine restarts every 10 epochs down to 1e-4), exp (official
        /// MosMedData+: 0.99^epoch, at least 0.1) [default: cosine, or the recipe's]
        #[arg(long)]
        schedule: Option<String>,
        /// [default: 1, or the recipe's]
        #[arg(long)]
        seed: Option<u64>,
        /// K, the layers per reconstruction stack [default: the preset's, or the recipe's]
        #[arg(long)]
        rec_layers: Option<usize>,
        /// Share of image tokens masked for reconstruction [default: 0.5, or the recipe's]
        #[arg(long)]
        img_mask_rate: Option<f64>,
        /// Share of text tokens masked for reconstruction [default: 0.3, or the recipe's]
        #[arg(long)]
        text_mask_rate: Option<f64>,
        /// Dropout on the W_poi / W_woi scoring MLPs' inputs [default: 0, or the recipe's]
        #[arg(long)]
        score_dropout: Option<f32>,
        /// Loss weights: criterion, CCL, text reconstruction, image reconstruction (a 0 removes
        /// the term: the ablations without CCL, CLR or CVR) [default: 5,0.2,1,1]
        #[arg(long, value_delimiter = ',')]
        loss_weights: Option<Vec<f32>>,
        /// Ablation: reconstruction masks drawn uniformly instead of in proportion to W
        #[arg(long)]
        random_masking: bool,
        /// Ablation: the condition on the attention logits (the paper's reading) instead of on
        /// the probabilities (the official code's)
        #[arg(long)]
        condition_on_logits: bool,
        /// Ablation: bidirectional instead of causal reconstruction self-attention
        #[arg(long)]
        bidirectional_reconstruction: bool,
        /// The paper's W-weighted reconstruction losses: each token's error weighted by its
        /// W_woi / W_poi instead of the official plain mean
        #[arg(long)]
        weighted_reconstruction: bool,
        /// Ablation without the conditioned interaction: uniform W_poi / W_woi (random masks,
        /// unconditioned reconstruction attention, evenly pooled CCL)
        #[arg(long)]
        no_condition: bool,
        /// Share of training samples shown with their counterfactual note and mask (the note
        /// naming only the opacity the real note leaves out; synth's data has them)
        #[arg(long, default_value_t = 0.0)]
        counterfactual_rate: f64,
        /// Run folder: best/last checkpoints, tokenizer.json, train_state, log.jsonl, curves.png
        /// (default: a new runs/train-<n>). A non-empty folder is refused unless --resume or
        /// --overwrite.
        #[arg(long)]
        out: Option<PathBuf>,
        /// Continue the run in --out from its last completed epoch
        #[arg(long)]
        resume: bool,
        /// Replace the run files of an earlier run in --out (other files there are never touched)
        #[arg(long)]
        overwrite: bool,
        /// With --resume: continue even if the data, seed, batch size, learning rate or
        /// tokenizer differ from the run's (each difference is printed)
        #[arg(long)]
        accept_changes: bool,
        /// Early stopping: epochs without a better validation Dice [default: 8, or the recipe's]
        #[arg(long)]
        patience: Option<usize>,
        /// Stop after this many minutes (checked between epochs; 0 = none)
        #[arg(long, default_value_t = 0.0)]
        max_minutes: f64,
        /// tokenizer.json for presets with a frozen pretrained text tower (official, tiny)
        #[arg(long)]
        tokenizer: Option<PathBuf>,
        /// Pretrained CLIP text weights: a Hugging Face model.safetensors (CLIPModel or
        /// CLIPTextModel) with its config.json beside it
        #[arg(long)]
        text_weights: Option<PathBuf>,
        /// Turn augmentation off
        #[arg(long)]
        no_augment: bool,
        /// Add the official recipe's random 90° turns and flips (they contradict the notes'
        /// left / right / upper / lower, so they are off by default)
        #[arg(long)]
        official_flips: bool,
    },
    /// Dice and IoU on a split, with the correct notes, shuffled notes and empty notes
    Eval {
        #[arg(long)]
        data: PathBuf,
        #[arg(long)]
        checkpoint: PathBuf,
        #[arg(long, value_enum, default_value = "auto")]
        device: DeviceChoice,
        #[arg(long, default_value = "test")]
        split: String,
        #[arg(long, default_value_t = 16)]
        batch: usize,
        /// The tokenizer (default: tokenizer.json beside the checkpoint)
        #[arg(long)]
        tokenizer: Option<PathBuf>,
        #[arg(long, help = PRECISION_HELP)]
        precision: Option<String>,
    },
    /// Segment one image from its note: mask.png and overlay.png (with --mask-gt: true positives
    /// green, false negatives red, false positives blue)
    Infer {
        #[command(flatten)]
        one: OneImage,
        /// A ground-truth mask: colours the overlay by TP / FN / FP and prints the Dice
        #[arg(long)]
        mask_gt: Option<PathBuf>,
    },
    /// The model's weights for one image and note: w_poi.png (patch weights over the image) and
    /// w_woi.png (the weight of each word)
    Explain {
        #[command(flatten)]
        one: OneImage,
    },
    /// The README's main job: a synthetic dataset, the small preset trained on it, and Dice with
    /// correct vs shuffled notes on its test split
    #[cfg(feature = "train")]
    Quickstart {
        #[arg(long, default_value = "runs/quickstart")]
        out: PathBuf,
        #[arg(long, value_enum, default_value = "auto")]
        device: DeviceChoice,
        #[arg(long, default_value_t = 40)]
        epochs: usize,
        #[arg(long, default_value_t = 9.0)]
        max_minutes: f64,
        #[arg(long, help = PRECISION_HELP)]
        precision: Option<String>,
    },
    /// The paper's component ablation (Table 3: CI, CLR, CVR): each variant trained with the
    /// same data, seed and time budget, then test Dice / IoU with correct, shuffled and
    /// counterfactual notes (ablation.csv, ablation.png)
    #[cfg(feature = "train")]
    Ablate {
        /// A dataset in the LViT layout [default: a synthetic one written to OUT/data, the
        /// quickstart's: 1000/100/100 images of 96²]
        #[arg(long)]
        data: Option<PathBuf>,
        /// [default: runs/ablate-N, the first free]
        #[arg(long)]
        out: Option<PathBuf>,
        /// The whole table's time budget, shared equally by the variants (0 = none; the
        /// default gives each the quickstart's 9 minutes)
        #[arg(long, default_value_t = 54.0)]
        budget_minutes: f64,
        /// Comma-separated subset of full, no-ci, no-clr, no-cvr, no-rec, base [default: all]
        #[arg(long)]
        variants: Option<String>,
        #[arg(long, default_value = "small")]
        preset: String,
        #[arg(long, value_enum, default_value = "auto")]
        device: DeviceChoice,
        #[arg(long, default_value_t = 40)]
        epochs: usize,
        #[arg(long, default_value_t = 8)]
        batch: usize,
        /// [default: the preset's]
        #[arg(long)]
        lr: Option<f32>,
        /// As `train --clip-grad-norm`, for every variant [default: the quickstart's 5]
        #[arg(long, default_value_t = QUICKSTART_CLIP_GRAD_NORM)]
        clip_grad_norm: f32,
        #[arg(long, default_value_t = 1)]
        seed: u64,
        #[arg(long, default_value_t = 15)]
        patience: usize,
        /// As `train --counterfactual-rate` [default: the quickstart's 0.5 on data that has
        /// counterfactual notes, else 0]
        #[arg(long)]
        counterfactual_rate: Option<f64>,
    },
    /// Convert a checkpoint of the official PyTorch code (torch.save .pth) into a reclmis
    /// checkpoint; eval, infer and explain also take the .pth directly
    Import {
        /// The .pth file (read without Python; pickled code is never executed)
        #[arg(long)]
        from: PathBuf,
        /// The safetensors file to write (refused if it exists)
        #[arg(long)]
        out: PathBuf,
        /// The preset (default: the one whose widths match the checkpoint)
        #[arg(long)]
        preset: Option<String>,
        /// Image height and width (default: from the Interactor's token count, square)
        #[arg(long, num_args = 2, value_names = ["H", "W"])]
        img_size: Option<Vec<usize>>,
        /// The tokenizer the model was trained with: its identity is recorded in the checkpoint
        #[arg(long)]
        tokenizer: Option<PathBuf>,
    },
    /// Write an inference checkpoint for reclmis-infer: only the tensors the mask needs, the
    /// configuration and the tokenizer in one safetensors file
    Export {
        /// A checkpoint from train or import (or an official .pth with --tokenizer)
        #[arg(long)]
        checkpoint: PathBuf,
        /// The inference checkpoint to write (refused if it exists)
        #[arg(long)]
        out: PathBuf,
        /// f32, bf16 or f16 (computation stays f32; half precision halves the file)
        #[arg(long, default_value = "f32")]
        dtype: String,
        /// Keep mlp_visual and mlp_woi (W_poi / W_woi for explain); the mask does not need them
        #[arg(long)]
        weights_of_interest: bool,
        /// The tokenizer (default: the checkpoint's own, else tokenizer.json beside it)
        #[arg(long)]
        tokenizer: Option<PathBuf>,
    },
    /// Print a preset's module tree with parameter counts (official, tiny, small)
    Model {
        #[arg(long, default_value = "official")]
        preset: String,
        /// Multiply-adds per module of the inference path and of one training step (forward and
        /// backward), counted as the model runs on the cpu, with each module's parameters
        #[cfg(feature = "train")]
        #[arg(long)]
        flops: bool,
        /// The tensor bytes of a training step: the weights, what stays between steps (with
        /// Adam's moments) and the peak of one step, measured by running two steps at --batch
        #[cfg(feature = "train")]
        #[arg(long)]
        memory: bool,
        /// The batch size for --flops and --memory
        #[cfg(feature = "train")]
        #[arg(long, default_value_t = 1)]
        batch: usize,
        /// The device --memory runs on
        #[cfg(feature = "train")]
        #[arg(long, value_enum, default_value = "cpu")]
        device: DeviceChoice,
        /// The precision --memory trains at [default: bf16 on cuda, f32 elsewhere]
        #[cfg(feature = "train")]
        #[arg(long)]
        precision: Option<String>,
    },
    /// List the kernels with the registers, shared memory, stack and spills ptxas reported, and
    /// their SASS instruction counts (when the build found cuobjdump)
    Kernels {
        /// Fail unless every tensor-core kernel has HMMA, every pipelined kernel LDGSTS.128 and
        /// LDSM, and no kernel uses local memory without a listed reason (CI runs this)
        #[arg(long)]
        check: bool,
    },
    /// Say which devices are usable here, and why not
    Devices,
}

fn run(cli: Cli) -> reclmis::Result<()> {
    if !(cli.max_megapixels.is_finite() && cli.max_megapixels > 0.0) {
        return Err(reclmis::Error::Config(format!(
            "--max-megapixels {}: must be a positive number",
            cli.max_megapixels
        )));
    }
    reclmis::data::lvit::set_max_pixels((cli.max_megapixels * 1e6) as u64);
    if let Some(t) = &cli.tune {
        reclmis::ops::tune::set_mode(reclmis::ops::tune::Mode::parse(t).map_err(reclmis::Error::Config)?);
    }
    match cli.cmd {
        Cmd::Selfcheck { device } => {
            let dev = Device::from_choice(device)?;
            let report = selfcheck::run(&dev)?;
            print!("{}", report.text);
            if !report.ok {
                return Err(reclmis::Error::Other("self-check failed".into()));
            }
        }
        Cmd::Bench { device, op, peer, reps, shape, format, baseline } => {
            use bench::report;
            if !["table", "json", "csv"].contains(&format.as_str()) {
                return Err(reclmis::Error::Config(format!("--format {format:?}: table, json or csv")));
            }
            // the baseline is read (and refused) before minutes of timing
            let before = baseline.as_deref().map(report::read_run).transpose()?;
            let dev = Device::from_choice(device)?;
            // the roofline: this machine's own ceilings, measured now (about a second; cpu only)
            let ceilings = matches!(dev, Device::Cpu).then(bench::ceilings::measure);
            let opts = bench::BenchOpts {
                filter: op.as_deref(),
                shape: shape.as_deref(),
                peer: peer.as_deref(),
                reps: reps.max(1),
                ceilings,
            };
            let run = report::Run { results: bench::run(&dev, &opts)?, machine: report::Machine::of(&dev, ceilings) };
            let compared = before.as_ref().map(|b| report::compare(&run, b));
            if let Some(why) = before.as_ref().and_then(|b| report::mismatch(&run, b)) {
                eprintln!("warning: {why}");
            }
            match format.as_str() {
                "json" => println!("{}", report::to_json(&run)),
                "csv" => print!("{}", report::to_csv(&run, compared.as_deref())?),
                _ => {
                    if let Some(c) = ceilings {
                        let bf16 = c.bf16_gflops.map_or(String::new(), |g| format!(", {g:.1} GFLOP/s bf16 dot"));
                        println!(
                            "ceilings measured here: {:.1} GFLOP/s f32 FMA{bf16}, {:.1} GB/s copy ({} threads)",
                            c.peak_gflops,
                            c.copy_gbs,
                            rayon::current_num_threads()
                        );
                    }
                    print!("{}", bench::format_table(&dev, &run.results));
                    if let (Some(c), Some(b)) = (&compared, &before) {
                        print!("{}", report::format_comparison(c, b));
                    }
                }
            }
            // a script sees the comparison on stderr whatever the format
            if let (Some(c), Some(b), false) = (&compared, &before, format == "table") {
                eprint!("{}", report::format_comparison(c, b));
            }
        }
        Cmd::Kernels { check } => {
            print!("{}", kernels::report());
            if check {
                let bad = kernels::sass_violations();
                if !bad.is_empty() {
                    return Err(reclmis::Error::Other(format!("SASS check failed:\n  {}", bad.join("\n  "))));
                }
                println!("SASS check: ok");
            }
        }
        Cmd::BenchModel { device, scenario: Some(scenario), precision: p, profile, .. } => {
            let dev = Device::from_choice(device)?;
            let p = precision(p.as_deref(), &dev)?;
            println!("{}", bench::model::run(&scenario, &dev, p, profile)?);
        }
        Cmd::BenchModel { profile: true, scenario: None, .. } => {
            return Err(reclmis::Error::Other("--profile times one scenario: give --scenario".into()));
        }
        Cmd::BenchModel {
            device,
            scenario: None,
            scenarios,
            peer,
            peer_script,
            no_compile,
            rounds,
            precision: p,
            ..
        } => {
            if let Some(p) = &p {
                Precision::parse(p)?;
            }
            let exe =
                std::env::current_exe().map_err(|e| reclmis::Error::Other(format!("cannot find this program: {e}")))?;
            let device = format!("{device:?}").to_lowercase();
            let c = bench::model::Compare {
                exe,
                device,
                precision: p,
                scenarios,
                peer: peer.map(|p| (p, peer_script)),
                compile: !no_compile,
                rounds: rounds.max(1),
            };
            let table = bench::model::compare(&c, &mut |line| {
                use std::io::Write;
                println!("{line}");
                let _ = std::io::stdout().flush();
            })?;
            print!("{table}");
        }
        Cmd::Synth { out, train, val, test, size, seed } => {
            let o = reclmis::data::write::SynthOpts { train, val, test, size, seed, ..Default::default() };
            reclmis::data::write::write(&out, &o)?;
            println!("wrote {train}/{val}/{test} train/val/test samples ({size}x{size}) to {}", out.display());
        }
        #[cfg(feature = "train")]
        Cmd::Train {
            data,
            recipe,
            preset,
            device,
            epochs,
            batch,
            accumulate,
            precision: p,
            lr,
            clip_grad_norm,
            schedule,
            seed,
            rec_layers,
            img_mask_rate,
            text_mask_rate,
            score_dropout,
            loss_weights,
            random_masking,
            condition_on_logits,
            bidirectional_reconstruction,
            weighted_reconstruction,
            no_condition,
            counterfactual_rate,
            out,
            resume,
            overwrite,
            accept_changes,
            patience,
            max_minutes,
            tokenizer,
            text_weights,
            no_augment,
            official_flips,
        } => {
            let out = match out {
                Some(o) => o,
                None if resume => {
                    return Err(reclmis::Error::Config("--resume needs the --out of the run to continue".into()))
                }
                None => pipeline::run_dir::RunDir::next_free(std::path::Path::new("runs")),
            };
            let dev = Device::from_choice(device)?;
            // the recipe's values, then the flags given; then reclmis' defaults
            let r = recipe.as_deref().map(pipeline::recipe::Recipe::get).transpose()?;
            let preset = preset.or(r.as_ref().map(|r| r.preset.to_string())).unwrap_or_else(|| "small".into());
            let lr = match lr.or(r.as_ref().map(|r| r.lr)) {
                Some(lr) => lr,
                None => reclmis::model::Config::preset(&preset)?.default_lr(),
            };
            let schedule = match schedule {
                Some(s) => reclmis::optim::schedule::Schedule::parse(&s)?,
                None => r.as_ref().map_or(reclmis::optim::schedule::Schedule::Cosine, |r| r.schedule),
            };
            let loss_weights = match loss_weights.as_deref() {
                None => None,
                Some(&[a, b, c, d]) => Some([a, b, c, d]),
                Some(other) => {
                    return Err(reclmis::Error::Config(format!(
                        "--loss-weights takes 4 numbers (criterion,ccl,text_rec,img_rec), got {}",
                        other.len()
                    )))
                }
            };
            let flags = pipeline::recipe::ModelOptions {
                rec_layers,
                img_mask_rate,
                text_mask_rate,
                score_dropout,
                loss_weights,
                random_masking: random_masking.then_some(true),
                condition_on_logits: condition_on_logits.then_some(true),
                bidirectional_reconstruction: bidirectional_reconstruction.then_some(true),
                weighted_reconstruction: weighted_reconstruction.then_some(true),
                no_condition: no_condition.then_some(true),
            };
            let model = r.as_ref().map(|r| r.model.clone()).unwrap_or_default().overridden_by(&flags);
            let o = pipeline::train::TrainOpts {
                data,
                preset,
                epochs: epochs.or(r.as_ref().map(|r| r.epochs)).unwrap_or(30),
                batch: batch.or(r.as_ref().map(|r| r.batch)).unwrap_or(8),
                accumulate,
                precision: precision(p.as_deref(), &dev)?,
                lr,
                clip_grad_norm,
                seed: seed.or(r.as_ref().map(|r| r.seed)).unwrap_or(1),
                model,
                schedule,
                counterfactual_rate,
                out,
                patience: patience.or(r.as_ref().map(|r| r.patience)).unwrap_or(8),
                max_minutes,
                tokenizer,
                text_weights,
                resume,
                overwrite,
                accept_changes,
                stop_after: 0,
                augment: !no_augment,
                official_flips,
                progress: true,
            };
            o.validate()?;
            println!("run folder: {}", o.out.display());
            let s = pipeline::train::train(&o, &dev)?;
            println!(
                "best validation Dice {:.4} at epoch {} ({} epochs, {:.0} s, {:.1} images/s); checkpoints in {}",
                s.best_dice,
                s.best_epoch,
                s.epochs_run,
                s.seconds,
                s.images_per_s,
                o.out.display()
            );
        }
        Cmd::Eval { data, checkpoint, device, split, batch, tokenizer, precision: p } => {
            let dev = Device::from_choice(device)?;
            let p = precision(p.as_deref(), &dev)?;
            let split = match split.as_str() {
                "train" => Split::Train,
                "val" => Split::Val,
                "test" => Split::Test,
                other => return Err(reclmis::Error::Config(format!("--split {other:?}: train, val or test"))),
            };
            let (mut m, tok) = pipeline::load_run(&checkpoint, tokenizer.as_deref(), &dev)?;
            m.precision = p;
            let (h, w) = m.cfg.img_size;
            let d = pipeline::load(&data, split, h, w)?;
            for n in &d.notes {
                println!("note: {n}");
            }
            for (name, mode) in
                [("correct notes", Notes::Correct), ("shuffled notes", Notes::Shuffled), ("empty notes", Notes::Empty)]
            {
                let s = pipeline::evaluate(&m, &d, &tok, mode, batch)?;
                println!("{:<15} Dice {:.4}  IoU {:.4}  ({} images)", name, s.dice, s.iou, d.len());
            }
            if let Some(cf) = pipeline::load_counterfactual(&data, split, h, w)? {
                let s = pipeline::evaluate(&m, &cf, &tok, Notes::Correct, batch)?;
                println!(
                    "{:<15} Dice {:.4}  IoU {:.4}  ({} images: each note names only the opacity the \
                     real note leaves out, scored against that opacity's mask)",
                    "counterfactual",
                    s.dice,
                    s.iou,
                    cf.len()
                );
            }
        }
        #[cfg(feature = "train")]
        Cmd::Quickstart { out, device, epochs, max_minutes, precision: p } => {
            let dev = Device::from_choice(device)?;
            let p = precision(p.as_deref(), &dev)?;
            let t0 = std::time::Instant::now();
            let data = out.join("data");
            // an earlier quickstart's dataset (synth's marker, synth's files only) is written again;
            // any other folder there is refused, untouched
            if data.exists() && std::fs::read_dir(&data).map(|mut d| d.next().is_some()).unwrap_or(true) {
                reclmis::data::write::remove_synthetic(&data)?;
            }
            reclmis::data::write::write(&data, &quickstart_data())?;
            println!("synthetic dataset written to {} ({:.0} s)", data.display(), t0.elapsed().as_secs_f64());
            let o = pipeline::train::TrainOpts {
                data: data.clone(),
                preset: "small".into(),
                epochs,
                batch: 8,
                accumulate: 1,
                precision: p,
                lr: 1e-3,
                clip_grad_norm: Some(QUICKSTART_CLIP_GRAD_NORM),
                seed: 1,
                out: out.join("run"),
                patience: 15,
                max_minutes,
                tokenizer: None,
                text_weights: None,
                model: Default::default(),
                schedule: reclmis::optim::schedule::Schedule::Cosine,
                counterfactual_rate: QUICKSTART_COUNTERFACTUAL_RATE,
                resume: false,
                // the quickstart's own run folder: its run files are replaced, nothing else
                overwrite: true,
                accept_changes: false,
                stop_after: 0,
                augment: true,
                official_flips: false,
                progress: true,
            };
            // training stopped by a NaN or infinity keeps the files of the epochs before it: the
            // best checkpoint so far is still evaluated, and the error is returned after that
            let stopped = match pipeline::train::train(&o, &dev) {
                Ok(s) => {
                    println!(
                        "best validation Dice {:.4} at epoch {} ({:.1} images/s)",
                        s.best_dice, s.best_epoch, s.images_per_s
                    );
                    None
                }
                Err(e @ reclmis::Error::NonFinite(_)) if o.out.join("best.safetensors").exists() => {
                    eprintln!("reclmis: {e}\nevaluating the best checkpoint written before it");
                    Some(e)
                }
                Err(e) => return Err(e),
            };
            let (mut m, tok) = pipeline::load_run(&o.out.join("best.safetensors"), None, &dev)?;
            m.precision = p;
            let (h, w) = m.cfg.img_size;
            let test = pipeline::load(&data, Split::Test, h, w)?;
            let good = pipeline::evaluate(&m, &test, &tok, Notes::Correct, 16)?;
            let shuffled = pipeline::evaluate(&m, &test, &tok, Notes::Shuffled, 16)?;
            println!(
                "test Dice with the correct notes {:.4}, with shuffled notes {:.4} (IoU {:.4} vs {:.4})",
                good.dice, shuffled.dice, good.iou, shuffled.iou
            );
            if let Some(cf) = pipeline::load_counterfactual(&data, Split::Test, h, w)? {
                let c = pipeline::evaluate(&m, &cf, &tok, Notes::Correct, 16)?;
                println!(
                    "test Dice with counterfactual notes {:.4} (IoU {:.4}): each note names only the opacity \
                     the real note leaves out; a model that follows the note segments that one",
                    c.dice, c.iou
                );
            }
            println!("total {:.0} s", t0.elapsed().as_secs_f64());
            if let Some(e) = stopped {
                return Err(e);
            }
        }
        #[cfg(feature = "train")]
        Cmd::Ablate {
            data,
            out,
            budget_minutes,
            variants,
            preset,
            device,
            epochs,
            batch,
            lr,
            clip_grad_norm,
            seed,
            patience,
            counterfactual_rate,
        } => {
            use pipeline::ablate;
            let variants = ablate::select(variants.as_deref())?;
            let dev = Device::from_choice(device)?;
            let out = out.unwrap_or_else(|| ablate::next_free(std::path::Path::new("runs")));
            // a new folder: ablate writes only what it creates
            if out.exists() && std::fs::read_dir(&out).map(|mut d| d.next().is_some()).unwrap_or(true) {
                return Err(reclmis::Error::Config(format!(
                    "{}: ablate writes into a new or empty folder; this one holds files",
                    out.display()
                )));
            }
            let data = match data {
                Some(d) => d,
                None => {
                    let d = out.join("data");
                    reclmis::data::write::write(&d, &quickstart_data())?;
                    println!("synthetic dataset written to {}", d.display());
                    d
                }
            };
            let has_cf =
                reclmis::data::lvit::list_counterfactual(&data, Split::Train)?.is_some_and(|l| !l.entries.is_empty());
            let counterfactual_rate =
                counterfactual_rate.unwrap_or(if has_cf { QUICKSTART_COUNTERFACTUAL_RATE } else { 0.0 });
            let o = ablate::AblateOpts {
                data,
                out: out.clone(),
                preset,
                budget_minutes,
                epochs,
                batch,
                lr,
                clip_grad_norm: Some(clip_grad_norm),
                seed,
                patience,
                counterfactual_rate,
                variants,
                progress: true,
            };
            let rows = ablate::ablate(&o, &dev)?;
            print!("{}", ablate::table(&rows));
            println!("written: {} and ablation.png", out.join("ablation.csv").display());
        }
        Cmd::Infer { one, mask_gt } => {
            // the ground truth is read (and refused) before the model runs or anything is written
            let gt = mask_gt.as_deref().map(reclmis::data::lvit::decode_mask).transpose()?;
            let (e, orig) = one.run(false)?;
            match pipeline::visual::write_infer(&e, &orig, gt.as_ref(), &one.out)? {
                Some(d) => println!(
                    "wrote mask.png and overlay.png to {} (Dice against the ground truth {d:.4})",
                    one.out.display()
                ),
                None => println!("wrote mask.png and overlay.png to {}", one.out.display()),
            }
        }
        Cmd::Explain { one } => {
            let (e, orig) = one.run(true)?;
            pipeline::visual::write_explain(&e, &orig, &one.out)?;
            for (t, w) in &e.w_woi {
                println!("{t:>12} {w:.4}");
            }
            println!("wrote w_poi.png and w_woi.png to {}", one.out.display());
        }
        Cmd::Import { from, out, preset, img_size, tokenizer } => {
            let img = img_size.map(|v| (v[0], v[1]));
            let rep = pipeline::import_checkpoint(&from, &out, preset.as_deref(), img, tokenizer.as_deref())?;
            println!("{rep}");
            println!("wrote {}", out.display());
        }
        Cmd::Export { checkpoint, out, dtype, weights_of_interest, tokenizer } => {
            let rep =
                pipeline::export::export(&checkpoint, tokenizer.as_deref(), &out, dtype.parse()?, weights_of_interest)?;
            println!("{rep}");
            println!("wrote {}", out.display());
        }
        #[cfg(feature = "train")]
        Cmd::Model { preset, flops, memory, batch, device, precision: p } if flops || memory => {
            if batch == 0 {
                return Err(reclmis::Error::Config("--batch 0: must be at least 1".into()));
            }
            let cfg = reclmis::model::Config::preset(&preset)?;
            if flops {
                let m = reclmis::model::RecLmis::new(cfg.clone(), &Device::Cpu, 0)?;
                print!("{}", reclmis::model::summary::count_flops(&m, batch)?.render(&m.cfg));
            }
            if memory {
                use reclmis::device::memory::human;
                let dev = Device::from_choice(device)?;
                let p = precision(p.as_deref(), &dev)?;
                let r = reclmis::model::summary::measure_memory(&cfg, batch, p, &dev)?;
                println!(
                    "preset {preset}, batch {batch}, {} ({p}, live tensor bytes): weights {}; between steps \
                     (weights, Adam moments) {}; peak of a training step {}",
                    dev.kind(),
                    human(r.weights),
                    human(r.between_steps),
                    human(r.peak)
                );
            }
        }
        Cmd::Model { preset, .. } => {
            let cfg = reclmis::model::Config::preset(&preset)?;
            let m = reclmis::model::RecLmis::new(cfg, &Device::Cpu, 0)?;
            print!("{}", reclmis::model::summary::render(&m));
        }
        Cmd::Devices => {
            println!("cpu: usable ({} threads)", rayon::current_num_threads());
            match Device::cuda(0) {
                Ok(d) => println!("cuda: usable: {}", d.describe()),
                Err(e) => println!("cuda: not usable: {e}"),
            }
            match Device::emu() {
                Ok(_) => println!("emu: usable (test device: CUDA source on the CPU)"),
                Err(e) => println!("emu: {e}"),
            }
        }
    }
    Ok(())
}

fn main() -> ExitCode {
    reclmis::device::tune_host_allocator();
    // `bench --op` and `--shape` list what the registry of op benchmarks holds
    let cmd = Cli::command().mut_subcommand("bench", |b| {
        b.mut_arg("op", |a| a.help(format!("Only these benchmarks, comma-separated: {}", bench::names().join(", "))))
            .mut_arg("shape", |a| {
                a.help(format!(
                    "One shape for the one --op given instead of its built-in cases: {}",
                    bench::shaped_forms()
                ))
            })
    });
    let cli = match cmd.try_get_matches().and_then(|m| Cli::from_arg_matches(&m)) {
        Ok(cli) => cli,
        Err(e) => e.exit(),
    };
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("reclmis: {e}");
            ExitCode::FAILURE
        }
    }
}
