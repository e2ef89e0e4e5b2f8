//! The registry of op benchmarks (`bench::registry`): each family's cases are the ones it names,
//! no name is claimed twice, and every case runs and passes its own validation on emu (small
//! shapes) before anything would be timed.

mod common;

use reclmis::bench::{self, registry::GROUPS};
use std::collections::BTreeSet;

#[test]
fn every_name_belongs_to_one_group() {
    let mut seen = BTreeSet::new();
    for g in GROUPS {
        for n in g.names {
            assert!(seen.insert(*n), "{n} is claimed by two groups");
        }
        for s in g.shaped {
            assert!(g.names.contains(&s.op), "--shape {} is not one of its group's names", s.op);
        }
    }
    assert_eq!(bench::names().len(), seen.len());
}

/// On emu: each group makes exactly the cases it names, and each runs once through the harness
/// (its validator included, where it has one).
#[test]
fn every_case_runs_and_validates_on_emu() {
    let dev = common::device("emu");
    for g in GROUPS {
        let mut v = Vec::new();
        (g.cases)(&dev, true, &mut v).unwrap();
        let made: BTreeSet<&str> = v.iter().map(|c| c.op).collect();
        let named: BTreeSet<&str> = g.names.iter().copied().collect();
        assert_eq!(made, named, "group {:?}", g.names);
        for c in &v {
            let t = bench::measure(&dev, c, 0, 1).unwrap_or_else(|e| panic!("{} {}: {e}", c.op, c.shape));
            assert!(t.median > 0.0, "{} {}", c.op, c.shape);
            assert!(c.bytes > 0.0 || c.flops > 0.0, "{} {}: no work counted", c.op, c.shape);
        }
    }
}

/// The whole-U-Net case's FLOPs (its formula in model/bench.rs) are twice the multiply-adds
/// the graph counts over one forward of the model's U-Net modules at the same widths (emu: base 8
/// at 48²); the PLAM gates' channel MLPs, which the counter leaves out, are under 0.1 %.
#[test]
fn unet_case_counts_the_models_unet() {
    let dev = reclmis::Device::Cpu;
    let mut v = Vec::new();
    let g = GROUPS.iter().find(|g| g.names == ["unet"]).unwrap();
    (g.cases)(&dev, true, &mut v).unwrap();
    let (out, counts) = reclmis::autograd::count::measure(|| bench::measure(&dev, &v[0], 0, 0));
    out.unwrap();
    let macs: u64 = counts.values().map(|m| m.forward).sum();
    // one validation run, no warm-up, no timed repetition: exactly one forward was counted
    let rel = (v[0].flops - 2.0 * macs as f64).abs() / v[0].flops;
    assert!(rel < 1e-3, "case {} FLOPs vs counted {}", v[0].flops, 2 * macs);
}
