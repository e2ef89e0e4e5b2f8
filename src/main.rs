//! The `reclmis` command line.

use clap::{Parser, Subcommand};
use reclmis::device::{Device, DeviceChoice};
use reclmis::{bench, kernels, selfcheck};
use std::process::ExitCode;

#[derive(Parser)]
#[command(name = "reclmis", version, about = "GPU compute engine for language-guided medical image segmentation")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run every op on the device and compare it with the f64 reference (the quick health check)
    Selfcheck {
        #[arg(long, value_enum, default_value = "auto")]
        device: DeviceChoice,
    },
    /// Time each kernel: median, GFLOP/s, GB/s, and the ratio to PyTorch with --peer
    Bench {
        #[arg(long, value_enum, default_value = "auto")]
        device: DeviceChoice,
        /// Only these benchmarks, comma-separated (gemm, gemm_tc, softmax, softmax_bwd, relu, relu_bwd, add_bcast, sum, sum_bwd, max, transpose,
        /// permute, ccl, ccl_composed, ccl_fwd_bwd, ccl_composed_fwd_bwd, copy, dice_bce, dice_bce_bwd, metrics, mse,
        /// max_pool2, max_pool2_bwd, upsample2, upsample2_bwd, conv3x3, conv3x3_b8, conv3x3_bwd, conv1x1, conv3x3_cat,
        /// batch_norm_relu, batch_norm_relu_bwd, plam, plam_bwd, attention, attention_composed, attention_fwd_bwd,
        /// attention_composed_fwd_bwd, layer_norm, layer_norm_bwd, gelu, quick_gelu, linear, embedding,
        /// unet)
        #[arg(long)]
        op: Option<String>,
        /// A Python with torch installed: run benches/peer_torch.py in the same invocation
        #[arg(long)]
        peer: Option<String>,
        /// Timed repetitions per case (the median is reported)
        #[arg(long, default_value_t = 10)]
        reps: usize,
    },
    /// Time the official model (224²): inference at batch 1 / 8, a training step at batch 4; one
    /// scenario per process (peak RSS is the scenario's), one JSON line like ../shared/peer/bench_cpu.py
    BenchModel {
        #[arg(long, value_enum, default_value = "auto")]
        device: DeviceChoice,
        /// infer_b1, infer_b8 or train_b4
        #[arg(long)]
        scenario: String,
    },
    /// Print a preset's module tree with parameter counts (official, tiny, small)
    Model {
        #[arg(long, default_value = "official")]
        preset: String,
    },
    /// List the kernels with the registers, shared memory, stack and spills ptxas reported
    Kernels,
    /// Say which devices are usable here, and why not
    Devices,
}

fn run(cli: Cli) -> reclmis::Result<()> {
    match cli.cmd {
        Cmd::Selfcheck { device } => {
            let dev = Device::from_choice(device)?;
            let report = selfcheck::run(&dev)?;
            print!("{}", report.text);
            if !report.ok {
                return Err(reclmis::Error::Other("self-check failed".into()));
            }
        }
        Cmd::Bench { device, op, peer, reps } => {
            let dev = Device::from_choice(device)?;
            let opts = bench::BenchOpts { filter: op.as_deref(), peer: peer.as_deref(), reps: reps.max(1) };
            let ms = bench::run(&dev, &opts)?;
            print!("{}", bench::format_table(&dev, &ms));
        }
        Cmd::Kernels => print!("{}", kernels::report()),
        Cmd::BenchModel { device, scenario } => {
            let dev = Device::from_choice(device)?;
            println!("{}", bench::model::run(&scenario, &dev)?);
        }
        Cmd::Model { preset } => {
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
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("reclmis: {e}");
            ExitCode::FAILURE
        }
    }
}
