//! Peak memory of loading a dataset split (BENCHMARKS.md, "loader memory"):
//! `cargo run --release --example load_rss -- DATA [SIZE]` decodes the training split at
//! SIZE² (default 224) and prints its decoded byte size and the process's peak RSS (VmHWM).

fn vm_hwm_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| s.lines().find(|l| l.starts_with("VmHWM:")).map(|l| l.to_string()))
        .and_then(|l| l.split_whitespace().nth(1).and_then(|v| v.parse().ok()))
        .unwrap_or(0)
}

fn main() -> reclmis::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let root = std::path::PathBuf::from(args.get(1).map(String::as_str).unwrap_or("runs/rss/data"));
    let size: usize = args.get(2).and_then(|s| s.parse().ok()).unwrap_or(224);
    let before = vm_hwm_kib();
    let t = std::time::Instant::now();
    let d = reclmis::pipeline::load(&root, reclmis::data::lvit::Split::Train, size, size)?;
    let bytes = d.images.len() + d.masks.len();
    let peak = vm_hwm_kib();
    println!(
        "{} images at {size}x{size}: decoded u8 {:.1} MB, peak RSS {:.1} MB (before loading {:.1} MB), ratio {:.3}, {:.1} s",
        d.len(),
        bytes as f64 / 1e6,
        peak as f64 * 1024.0 / 1e6,
        before as f64 * 1024.0 / 1e6,
        peak as f64 * 1024.0 / bytes as f64,
        t.elapsed().as_secs_f64()
    );
    Ok(())
}
