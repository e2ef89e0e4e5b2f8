//! The emu device's own checks: races between barriers, barrier divergence, deadlock, warp
//! collectives after lanes exited, and out-of-bounds writes, each provoked by kernels/selftest.cu.
#![cfg(feature = "emu")]

use reclmis::device::emu::with_schedule;
use reclmis::device::{Device, LaunchCfg};
use reclmis::kernels::Kernel;
use reclmis::{Result, Tensor};

reclmis::kernel_params! {
    struct SelftestParams [24] {
        x: u64,
        y: u64,
        n: u32,
        mode: u32,
    }
}

const THREADS: u32 = 256;

fn run(mode: u32, seed: u64) -> Result<f32> {
    reclmis::device::set_poison(true);
    let dev = Device::emu()?;
    let x: Vec<f32> = (0..THREADS).map(|i| (i % 7) as f32).collect();
    let xt = Tensor::from_vec(x, &[THREADS as usize], &dev)?;
    let y = Tensor::zeros(&[1], &dev)?;
    let p = SelftestParams { x: xt.dev_ptr(), y: y.dev_ptr(), n: THREADS, mode };
    let cfg = LaunchCfg { grid: (1, 1, 1), block: (THREADS, 1, 1), smem_bytes: THREADS * 4 };
    with_schedule(seed, || unsafe { dev.launch(Kernel::selftest_fwd_f32, cfg, &p) })?;
    Ok(y.to_vec()?[0])
}

fn expected() -> f32 {
    (0..THREADS).map(|i| (i % 7) as f32).sum()
}

fn error_of(mode: u32) -> String {
    (0..3).map(|seed| run(mode, seed).expect_err("the emulator must reject this kernel").to_string()).next().unwrap()
}

#[test]
fn correct_kernel_passes_in_every_order() {
    for seed in 0..9 {
        assert_eq!(run(0, seed).unwrap(), expected(), "schedule seed {seed}");
    }
}

#[test]
fn missing_barrier_gives_wrong_results() {
    // Forward order: thread 0 reads s[128] before thread 128 has written it (NaN-poisoned shared
    // memory). Reversed order happens to hide this race; the random orders expose it.
    let wrong: Vec<u64> = (0..9).filter(|&seed| run(1, seed).unwrap() != expected()).collect();
    assert!(wrong.contains(&0), "forward order must expose the race; wrong under seeds {wrong:?}");
    assert!(wrong.len() >= 5, "most schedules must expose the race; wrong under seeds {wrong:?}");
}

#[test]
fn early_exit_before_barrier_is_divergence() {
    let e = error_of(2);
    assert!(e.contains("barrier divergence") && e.contains("exited"), "{e}");
    assert!(e.contains("RECLMIS_EMU_SEED"), "the message says how to reproduce: {e}");
}

#[test]
fn different_barriers_are_divergence() {
    let e = error_of(3);
    assert!(e.contains("barrier divergence") && e.contains("lines"), "{e}");
}

#[test]
fn out_of_bounds_write_is_reported() {
    let e = error_of(4);
    assert!(e.contains("out-of-bounds write") && e.contains("past the end"), "{e}");
}

#[test]
fn warp_collective_after_exit_is_reported() {
    let e = error_of(5);
    assert!(e.contains("already exited"), "{e}");
}

#[test]
fn deadlock_is_reported() {
    let e = error_of(6);
    assert!(e.contains("deadlock"), "{e}");
}

#[test]
fn bad_launch_shapes_are_errors() {
    let dev = Device::emu().unwrap();
    let p = SelftestParams { x: 0, y: 0, n: 0, mode: 0 };
    let e = unsafe {
        dev.launch(Kernel::selftest_fwd_f32, LaunchCfg { grid: (1, 1, 1), block: (2048, 1, 1), smem_bytes: 0 }, &p)
    };
    assert!(e.unwrap_err().to_string().contains("1..1024"));
}

fn run_stack_kernel(dev: &Device) -> Result<f32> {
    let x: Vec<f32> = (0..THREADS).map(|i| (i % 7) as f32).collect();
    let xt = Tensor::from_vec(x, &[THREADS as usize], dev)?;
    let y = Tensor::zeros(&[1], dev)?;
    let p = SelftestParams { x: xt.dev_ptr(), y: y.dev_ptr(), n: THREADS, mode: 0 };
    let cfg = LaunchCfg { grid: (2, 1, 1), block: (64, 1, 1), smem_bytes: 0 };
    unsafe { dev.launch(Kernel::selftest_stack_fwd_f32, cfg, &p) }?;
    Ok(y.to_vec()?[0])
}

#[test]
fn stack_overflow_is_a_launch_error_naming_the_kernel() {
    let dev = Device::emu().unwrap();
    let e = run_stack_kernel(&dev).expect_err("a 64 KiB frame must overflow the 48 KiB fiber stack").to_string();
    assert!(e.contains("stack overflow") && e.contains("selftest_stack_fwd_f32"), "{e}");
    // The thread recovers: the same thread launches again, and a correct kernel still works.
    assert!(run_stack_kernel(&dev).unwrap_err().to_string().contains("stack overflow"));
    assert_eq!(run(0, 0).unwrap(), expected());
}

/// The child half of `other_faults_still_crash`: only with RECLMIS_FAULT_CHILD=1 (set by that test
/// for its child process) does it fault on purpose; otherwise it returns at once, so that
/// `--include-ignored` runs stay alive. After the emu installed its fault handler, a fault outside
/// any fiber stack must still kill the process (the handler chains to the previous one).
#[test]
fn fault_child_helper() {
    if std::env::var_os("RECLMIS_FAULT_CHILD").is_none() {
        return;
    }
    assert_eq!(run(0, 0).unwrap(), expected());
    let bad = std::hint::black_box(16usize) as *const u8;
    // SAFETY: deliberately unsound; this test only runs in a child process and must die here.
    let v = unsafe { std::ptr::read_volatile(bad) };
    println!("survived a read of address 16: {v}");
}

#[test]
fn other_faults_still_crash() {
    use std::os::unix::process::ExitStatusExt;
    let out = std::process::Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "fault_child_helper", "--test-threads=1", "--nocapture"])
        .env("RECLMIS_FAULT_CHILD", "1")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(!stdout.contains("survived"), "{stdout}");
    assert_eq!(out.status.signal(), Some(libc_sigsegv()), "status {:?}; stdout {stdout}", out.status);
}

const fn libc_sigsegv() -> i32 {
    11 // SIGSEGV on Linux
}
