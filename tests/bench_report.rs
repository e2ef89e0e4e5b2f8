//! `reclmis bench` for scripts: JSON and CSV output with the machine in every record, and
//! `--baseline` reading an earlier JSON run (the comparison rule tested on fixed numbers: no
//! test depends on timings).

use reclmis::bench::report::{self, compare, Machine, Run, Verdict};
use reclmis::bench::{Measurement, Timing};
use std::process::Command;

fn m(op: &str, min: f64, median: f64, p90: f64) -> Measurement {
    Measurement {
        op: op.into(),
        shape: "8×64, axis 1".into(),
        reps: 10,
        min_s: min,
        median_s: median,
        p90_s: p90,
        gflops: 1.0,
        gbs: 2.0,
        peer_median_s: None,
        roofline_pct: Some(50.0),
        h100_min_s: Some(1e-6),
    }
}

fn run(results: Vec<Measurement>, cpu: &str) -> Run {
    let machine = Machine {
        cpu: cpu.into(),
        cores: 2,
        device: "cpu".into(),
        precision: "f32".into(),
        commit: "abc".into(),
        unix_time: 0,
        peak_gflops: Some(100.0),
        copy_gbs: Some(20.0),
        bf16_gflops: None,
    };
    Run { machine, results }
}

#[test]
fn percentiles_are_nearest_rank() {
    let t = Timing::of((1..=10).rev().map(|x| x as f64).collect());
    assert_eq!((t.min, t.median, t.p90, t.reps), (1.0, 6.0, 9.0, 10));
    let one = Timing::of(vec![3.0]);
    assert_eq!((one.min, one.median, one.p90), (3.0, 3.0, 3.0));
}

#[test]
fn only_non_overlapping_ranges_count_as_changes() {
    let before =
        run(vec![m("a", 1.0, 1.1, 1.2), m("b", 1.0, 1.1, 1.2), m("c", 1.0, 1.1, 1.2), m("gone", 1.0, 1.0, 1.0)], "X");
    let now =
        run(vec![m("a", 1.3, 1.4, 1.5), m("b", 0.7, 0.8, 0.9), m("c", 1.15, 1.3, 1.6), m("new", 1.0, 1.0, 1.0)], "X");
    let c = compare(&now, &before);
    let v: Vec<(&str, Verdict)> = c.iter().map(|c| (c.op.as_str(), c.verdict)).collect();
    // c's median moved by 18 % but its range overlaps the baseline's: noise, not a regression
    assert_eq!(v, vec![("a", Verdict::Slower), ("b", Verdict::Faster), ("c", Verdict::Same)]);
    assert!((c[0].speedup - 1.1 / 1.4).abs() < 1e-12);
    assert!(report::mismatch(&now, &before).is_none());
    assert!(report::mismatch(&now, &run(vec![], "Y")).unwrap().contains("not comparable"));
    // CSV: the machine in every row, a shape with a comma quoted, the verdicts
    let csv = report::to_csv(&now, Some(&c)).unwrap();
    let lines: Vec<&str> = csv.lines().collect();
    assert!(lines[0].ends_with("baseline_median_s,speedup,verdict"), "{}", lines[0]);
    assert!(
        lines[1].starts_with("X,2,cpu,f32,abc,100.0,20.0,a,\"8×64, axis 1\",10,") && lines[1].ends_with("SLOWER"),
        "{}",
        lines[1]
    );
    assert!(lines[4].ends_with(",new"), "{}", lines[4]);
}

#[test]
fn roofline_is_the_slower_of_compute_and_memory() {
    use reclmis::bench::ceilings::{roofline_pct, Ceilings};
    let c = Ceilings { peak_gflops: 100.0, copy_gbs: 10.0, bf16_gflops: Some(400.0) };
    // 1 GFLOP needs 10 ms at peak; 10 MB needs 1 ms: compute-bound, 20 ms taken = 50 %
    assert!((roofline_pct(&c, 1e9, 1e7, 0.02, false).unwrap() - 50.0).abs() < 1e-9);
    // a bf16 case against the bf16 dot products' ceiling: 2.5 ms at peak, 20 ms taken = 12.5 %
    assert!((roofline_pct(&c, 1e9, 1e7, 0.02, true).unwrap() - 12.5).abs() < 1e-9);
    // without bf16 dot products a bf16 case is held to the f32 ceiling
    let no_dot = Ceilings { bf16_gflops: None, ..c };
    assert!((roofline_pct(&no_dot, 1e9, 1e7, 0.02, true).unwrap() - 50.0).abs() < 1e-9);
    // 1 MFLOP over 100 MB: memory-bound (10 ms), 40 ms taken = 25 %
    assert!((roofline_pct(&c, 1e6, 1e8, 0.04, false).unwrap() - 25.0).abs() < 1e-9);
    assert_eq!(roofline_pct(&c, 0.0, 0.0, 1.0, false), None);
}

#[test]
fn json_round_trips_and_a_bad_baseline_is_named() {
    let r = run(vec![m("a", 1.0, 1.1, 1.2)], "X");
    let dir = std::env::temp_dir().join(format!("reclmis-bench-report-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let p = dir.join("run.json");
    std::fs::write(&p, report::to_json(&r)).unwrap();
    assert_eq!(report::read_run(&p).unwrap(), r);
    std::fs::write(&p, b"{\"results\": 3}").unwrap();
    let e = report::read_run(&p).unwrap_err().to_string();
    assert!(e.contains("run.json") && e.contains("bench --format json"), "{e}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// The command end to end: a JSON run, then the same case against it as a baseline in CSV.
#[test]
fn bench_json_is_consumed_by_baseline() {
    let dir = std::env::temp_dir().join(format!("reclmis-bench-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let bin = env!("CARGO_BIN_EXE_reclmis");
    let args = ["bench", "--device", "cpu", "--op", "copy", "--reps", "3"];
    let o = Command::new(bin).args(args).args(["--format", "json"]).output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let p = dir.join("before.json");
    std::fs::write(&p, &o.stdout).unwrap();
    let before = report::read_run(&p).unwrap();
    assert!(!before.results.is_empty() && !before.machine.cpu.is_empty() && before.machine.cores >= 1);
    let (peak, bw) = (before.machine.peak_gflops.unwrap(), before.machine.copy_gbs.unwrap());
    assert!(peak > 0.5 && bw > 0.1, "ceilings {peak} GFLOP/s, {bw} GB/s");
    for r in &before.results {
        assert!(r.op == "copy" && r.reps == 3 && r.min_s <= r.median_s && r.median_s <= r.p90_s, "{r:?}");
        // a copy (no FLOPs) is against the copy bandwidth: % roof = its GB/s over the ceiling's.
        // Checked from the record's own fields, not against a timing bound: a 12.8 MB copy can
        // run from the last-level cache at over 3x the ceiling's DRAM bandwidth (CI saw 333 %)
        let pct = r.roofline_pct.unwrap();
        assert!(pct > 0.0 && (pct - 100.0 * r.gbs / bw).abs() <= 1e-9 * pct, "{r:?}");
        // the H100 time of a copy is its bytes at HBM3's 3.35 TB/s
        let bytes = r.gbs * 1e9 * r.median_s;
        assert!((r.h100_min_s.unwrap() - bytes / 3.35e12).abs() <= 1e-9 * r.h100_min_s.unwrap(), "{r:?}");
    }
    let o = Command::new(bin).args(args).args(["--format", "csv", "--baseline"]).arg(&p).output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let csv = String::from_utf8_lossy(&o.stdout);
    assert!(csv.lines().next().unwrap().ends_with("verdict"), "{csv}");
    assert_eq!(csv.lines().count(), 1 + before.results.len(), "{csv}");
    assert!(String::from_utf8_lossy(&o.stderr).contains("against the baseline"));
    // a baseline that is not a run is refused before any timing
    let o = Command::new(bin).args(args).arg("--baseline").arg(dir.join("missing.json")).output().unwrap();
    assert!(!o.status.success() && String::from_utf8_lossy(&o.stderr).contains("missing.json"));
    let _ = std::fs::remove_dir_all(&dir);
}

/// `--shape`: any shape of the shaped ops, validated like the built-in cases (a gemm's sampled
/// elements against f64), and clear refusals.
#[test]
fn shaped_cases_run_and_bad_shapes_are_refused() {
    use reclmis::bench::{run, BenchOpts};
    let dev = reclmis::Device::Cpu;
    let opts = |op: &'static str, shape: &'static str| BenchOpts {
        filter: Some(op),
        shape: Some(shape),
        peer: None,
        reps: 1,
        ceilings: None,
    };
    for (op, shape, want) in [
        ("gemm", "37x19x23", "37x19x23"),
        ("conv3x3", "2x5x7x9", "b2 5->7 9x9 k3"),
        ("conv1x1", "1x8x3x5", "b1 8->3 5x5 k1"),
        ("softmax", "7x13", "7x13"),
        ("relu", "2x3x4", "2x3x4"),
    ] {
        let m = run(&dev, &opts(op, shape)).unwrap();
        assert_eq!((m.len(), m[0].op.as_str(), m[0].shape.as_str()), (1, op, want));
        assert!(m[0].median_s > 0.0 && m[0].gflops > 0.0);
    }
    for (op, shape, why) in [
        ("gemm", "3x4", "wrong number of dimensions"),
        ("gemm", "3x0x4", "positive integers"),
        ("gemm", "65536x65536x65536", "too large"),
        ("attention", "1x2", "no --shape"),
        ("gemm,relu", "2x2x2", "exactly one --op"),
    ] {
        let e = run(&dev, &opts(op, shape)).err().unwrap().to_string();
        assert!(e.contains(why), "{op} {shape}: {e}");
    }
}

/// `bench-model`'s driver with stand-ins for both engines (shell scripts that print the JSON
/// lines a run prints): ratios against the faster peer, a failed peer run shown as "-", and an
/// unknown scenario refused before anything runs.
#[test]
fn bench_model_compares_with_the_peer() {
    use reclmis::bench::model::{compare, Compare};
    let dir = std::env::temp_dir().join(format!("reclmis-bench-model-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let ours = dir.join("ours.sh");
    // called as: ours.sh bench-model --device cpu --scenario S
    std::fs::write(
        &ours,
        "#!/bin/sh\necho '{\"scenario\": \"'$5'\", \"median_s\": 0.2, \"min_s\": 0.19, \"peak_rss_mb\": 500}'\n",
    )
    .unwrap();
    let peer = dir.join("peer.sh");
    // called as: sh peer.sh --only S: eager 0.3 s / 1000 MB, compiled 0.25 s / 1200 MB, train fails
    std::fs::write(
        &peer,
        "case $2 in\n  *train*) echo boom >&2; exit 3;;\n  *_compile) echo '{\"median_s\": 0.25, \"peak_rss_mb\": 1200}';;\n  *) echo '{\"median_s\": 0.3, \"peak_rss_mb\": 1000}';;\nesac\n",
    )
    .unwrap();
    std::process::Command::new("chmod").arg("+x").arg(&ours).status().unwrap();
    let c = |scenarios: &[&str]| Compare {
        exe: ours.clone(),
        device: "cpu".into(),
        precision: None,
        scenarios: scenarios.iter().map(|s| s.to_string()).collect(),
        peer: Some(("sh".into(), peer.clone())),
        compile: true,
        rounds: 2,
    };
    let mut lines = String::new();
    let table = compare(&c(&["infer_b1", "train_b4"]), &mut |l| {
        lines.push_str(l);
        lines.push('\n');
    })
    .unwrap();
    // ours + eager + compiled for infer_b1, ours alone for train_b4, in each of 2 rounds
    assert_eq!(lines.lines().count(), 2 * (3 + 1), "{lines}");
    let rows: Vec<&str> = table.lines().filter(|l| l.starts_with(['1', '2'])).collect();
    assert_eq!(rows.len(), 4, "{table}");
    // infer_b1: the faster peer (compiled, 0.25 s) over ours (0.2 s) = 1.25x; memory 500 / 1000
    assert!(rows[0].contains("infer_b1") && rows[0].contains("1.25x") && rows[0].contains("0.50x"), "{table}");
    assert!(rows[1].contains("train_b4") && rows[1].trim_end().ends_with('-'), "{table}");
    let e = compare(&c(&["infer_b2"]), &mut |_| ()).unwrap_err().to_string();
    assert!(e.contains("unknown scenario \"infer_b2\""), "{e}");
    let mut missing = c(&["infer_b1"]);
    missing.peer = Some(("sh".into(), dir.join("no_such_bench_cpu.py")));
    let e = compare(&missing, &mut |_| ()).unwrap_err().to_string();
    assert!(e.contains("no_such_bench_cpu.py") && e.contains("--peer-script"), "{e}");
    std::fs::remove_dir_all(&dir).unwrap();
}
