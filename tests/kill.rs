//! Kill test: a short training is killed with SIGKILL at the moments between an epoch's files
//! (through the `RECLMIS_CRASH_AT` hook) and at random times, resumed each time, and its final
//! files equal an uninterrupted run's byte for byte.

use reclmis::data::write::{write, SynthOpts};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

fn tmp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("reclmis-kill-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

const EPOCHS: &str = "5";

fn train_cmd(data: &Path, out: &Path, resume: bool) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_reclmis"));
    c.args(["train", "--data"]).arg(data).arg("--out").arg(out);
    c.args(["--epochs", EPOCHS, "--batch", "8", "--seed", "7", "--device", "cpu", "--patience", "100"]);
    if resume {
        c.arg("--resume");
    }
    c.stdout(Stdio::null()).stderr(Stdio::piped());
    c
}

/// Runs to the end; panics with stderr on failure.
fn run_ok(mut c: Command) {
    let out = c.output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}

/// Runs with the crash hook set; the process must die by SIGKILL.
fn run_crash(mut c: Command, at: &str) {
    use std::os::unix::process::ExitStatusExt;
    let out = c.env("RECLMIS_CRASH_AT", at).output().unwrap();
    assert_eq!(
        out.status.signal(),
        Some(9),
        "{at}: expected SIGKILL, got {:?}: {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Starts the command and kills it with SIGKILL after `ms`; returns true if it was still running.
fn kill_after(mut c: Command, ms: u64) -> bool {
    let mut child = c.spawn().unwrap();
    std::thread::sleep(Duration::from_millis(ms));
    let running = child.try_wait().unwrap().is_none();
    child.kill().ok(); // SIGKILL
    child.wait().unwrap();
    running
}

fn log_losses(out: &Path) -> Vec<(u64, String)> {
    std::fs::read_to_string(out.join("log.jsonl"))
        .unwrap()
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            (v["epoch"].as_u64().unwrap(), format!("{} {} {}", v["total"], v["val_dice"], v["step"]))
        })
        .collect()
}

#[test]
fn killed_and_resumed_training_equals_an_uninterrupted_one() {
    let dir = tmp("run");
    let data = dir.join("data");
    write(&data, &SynthOpts { train: 24, val: 8, test: 4, size: 32, seed: 11, ..Default::default() }).unwrap();
    let (a, b) = (dir.join("a"), dir.join("b"));
    run_ok(train_cmd(&data, &a, false));

    // killed during epoch 1's files, before any state exists: resume starts from the beginning
    run_crash(train_cmd(&data, &b, false), "before_state@1");
    assert!(!b.join("train_state.safetensors").exists());
    // between the state and last, then between last and the log, then after the state of 3
    run_crash(train_cmd(&data, &b, true), "before_last@1");
    run_crash(train_cmd(&data, &b, true), "before_log@2");
    run_crash(train_cmd(&data, &b, true), "before_state@3");
    // random moments of the remaining epochs (seeded, so a failure replays)
    let mut rng = reclmis::rng::Rng::new(0x9E37_79B9);
    let mut killed_running = 0;
    for _ in 0..4 {
        // within 150..600 ms: later, the resumed run (a few tiny epochs) may already be done
        if kill_after(train_cmd(&data, &b, true), 150 + rng.next_u64() % 450) {
            killed_running += 1;
        }
    }
    run_ok(train_cmd(&data, &b, true));
    assert!(killed_running > 0, "no random kill hit a running training");

    for f in ["last.safetensors", "best.safetensors", "tokenizer.json"] {
        let (x, y) = (std::fs::read(a.join(f)).unwrap(), std::fs::read(b.join(f)).unwrap());
        assert!(x == y, "{f} differs between the uninterrupted and the killed-and-resumed run");
    }
    assert_eq!(log_losses(&a), log_losses(&b), "the logs agree epoch by epoch");
    assert_eq!(log_losses(&b).len(), EPOCHS.parse::<usize>().unwrap());
    // no temporaries left behind
    let leftovers: Vec<_> = std::fs::read_dir(&b)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains(".tmp-"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
    std::fs::remove_dir_all(&dir).unwrap();
}
