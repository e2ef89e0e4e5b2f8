//! The emulator's building blocks of pipelined kernels (kernels/selftest.cu,
//! `selftest_pipe_fwd_bf16`): cp.async lands at the wait that retires its group (a too-weak wait,
//! a missing wait and a missing barrier after the wait are each caught), zero fill past src-size,
//! the ldmatrix fragment layouts (x1/x2/x4, with and without .trans) against the PTX ISA's
//! definition written out here, and the bank-conflict count. On a GPU the same kernel is checked
//! against the same definition (the hardware's word on the layouts).

mod common;
use common::device;
use half::bf16;
use reclmis::device::{Device, LaunchCfg};
use reclmis::kernels::Kernel;
use reclmis::{Result, Tensor};

reclmis::kernel_params! {
    struct PipeSelftestParams [32] {
        x: u64,
        y: u64,
        mode: u32,
        piece: u32,
        valid_chunks: u32,
        row_bytes: u32,
    }
}

const OK: u32 = 0;
const WEAK_WAIT: u32 = 1;
const NO_WAIT: u32 = 2;
const NO_BARRIER: u32 = 3;

/// The 16 x 16 input: element (r, c) = 16 r + c, exact in bf16 (integers below 256).
fn element(r: usize, c: usize) -> u16 {
    bf16::from_f32((16 * r + c) as f32).to_bits()
}

/// Runs the kernel; returns y as [lane][14] register words.
fn run(dev: &Device, mode: u32, piece: u32, valid_chunks: u32, row_bytes: u32, seed: u64) -> Result<Vec<u32>> {
    let x: Vec<f32> = (0..256).map(|i| bf16::from_bits(element(i / 16, i % 16)).to_f32()).collect();
    let xt = reclmis::ops::cast::cast(&Tensor::from_vec(x, &[256], dev)?, reclmis::DType::BF16)?;
    let y = Tensor::zeros(&[32 * 14], dev)?;
    let p = PipeSelftestParams { x: xt.dev_ptr(), y: y.dev_ptr(), mode, piece, valid_chunks, row_bytes };
    let cfg = LaunchCfg { grid: (1, 1, 1), block: (64, 1, 1), smem_bytes: 16 * row_bytes };
    // SAFETY: x holds 256 bf16, y 448 words, the shared memory 16 rows of row_bytes; the kernel
    // reads and writes nothing else.
    let launch = || unsafe { dev.launch(Kernel::selftest_pipe_fwd_bf16, cfg, &p) };
    match dev {
        #[cfg(feature = "emu")]
        Device::Emu => reclmis::device::emu::with_schedule(seed, launch)?,
        _ => launch()?,
    }
    Ok(y.to_vec()?.iter().map(|v| v.to_bits()).collect())
}

/// The registers each lane must hold, from the PTX ISA's description of ldmatrix: matrix i is the
/// quadrant whose rows lanes 8i..8i+7 address (rows 8 (i % 2).., columns 8 (i / 2)..); without
/// .trans lane l holds its row l/4, columns 2(l%4) and 2(l%4)+1 (low half first); with .trans,
/// rows 2(l%4) and 2(l%4)+1 of column l/4. `m(r, c)` is the matrix as shared memory holds it.
fn expected(m: impl Fn(usize, usize) -> u16) -> Vec<u32> {
    let quad = |i: usize, r: usize, c: usize| m(8 * (i % 2) + r, 8 * (i / 2) + c);
    let plain =
        |i: usize, l: usize| quad(i, l / 4, 2 * (l % 4)) as u32 | (quad(i, l / 4, 2 * (l % 4) + 1) as u32) << 16;
    let trans =
        |i: usize, l: usize| quad(i, 2 * (l % 4), l / 4) as u32 | (quad(i, 2 * (l % 4) + 1, l / 4) as u32) << 16;
    let mut y = Vec::new();
    for l in 0..32 {
        y.extend((0..4).map(|i| plain(i, l)));
        y.extend((0..4).map(|i| trans(i, l)));
        y.extend((0..2).map(|i| plain(i, l)));
        y.extend((0..2).map(|i| trans(i, l)));
        y.push(plain(0, l));
        y.push(trans(0, l));
    }
    y
}

fn check_layouts(dev: &Device) {
    for piece in [4, 8, 16] {
        for row_bytes in [32, 48] {
            for seed in 0..3 {
                let y = run(dev, OK, piece, 32, row_bytes, seed).unwrap();
                assert_eq!(y, expected(element), "{piece}-byte copies, rows of {row_bytes} bytes, seed {seed}");
            }
        }
    }
    // chunks 20.. (row 10, column 8 on) are zero-filled instead of read
    let y = run(dev, OK, 16, 20, 48, 0).unwrap();
    assert_eq!(y, expected(|r, c| if 2 * r + c / 8 >= 20 { 0 } else { element(r, c) }));
}

#[cfg(feature = "emu")]
#[test]
fn ldmatrix_layouts_and_cp_async_on_emu() {
    check_layouts(&device("emu"));
}

#[cfg(feature = "emu")]
#[test]
fn too_weak_wait_reads_data_not_yet_landed() {
    let dev = device("emu");
    for seed in 0..3 {
        let y = run(&dev, WEAK_WAIT, 16, 32, 48, seed).unwrap();
        assert_ne!(y, expected(element), "seed {seed}");
        // rows 0-7 (the retired group) are right, rows 8-15 still the NaN fill: x4's matrix 0 is
        // rows 0-7, matrix 1 rows 8-15
        let want = expected(element);
        assert_eq!(y[0], want[0], "seed {seed}");
        assert_eq!(y[1], 0xffff_ffff, "seed {seed}: matrix 1 must be the unwritten NaN fill");
    }
}

#[cfg(feature = "emu")]
#[test]
fn missing_wait_is_a_launch_error() {
    let e = run(&device("emu"), NO_WAIT, 16, 32, 48, 0).unwrap_err().to_string();
    assert!(e.contains("cp.async") && e.contains("never retired"), "{e}");
}

#[cfg(feature = "emu")]
#[test]
fn missing_barrier_after_the_wait_reads_stale_shared_memory() {
    // forward order: warp 0 runs its ldmatrix before warp 1 has issued (let alone waited for) a copy
    let dev = device("emu");
    let wrong: Vec<u64> =
        (0..6).filter(|&s| run(&dev, NO_BARRIER, 16, 32, 48, s).unwrap() != expected(element)).collect();
    assert!(wrong.contains(&0), "forward order must expose the missing barrier; wrong under {wrong:?}");
}

#[cfg(feature = "emu")]
#[test]
fn bank_conflicts_are_counted() {
    use reclmis::device::emu::last_smem_stats;
    let dev = device("emu");
    // 6 ldmatrix of 4+4+2+2+1+1 = 14 phases of 8 rows x 16 bytes
    run(&dev, OK, 16, 32, 48, 0).unwrap();
    let s = last_smem_stats();
    assert_eq!((s.phases, s.extra_wavefronts), (14, 0), "rows 48 bytes apart cover every bank once");
    // rows 32 bytes apart: a phase spans 256 bytes, each bank is asked for two words
    run(&dev, OK, 16, 32, 32, 0).unwrap();
    let s = last_smem_stats();
    assert_eq!((s.phases, s.extra_wavefronts), (14, 14), "a 2-way conflict costs one extra wavefront per phase");
}

#[cfg(feature = "cuda")]
#[test]
#[ignore = "needs a CUDA GPU"]
fn ldmatrix_layouts_and_cp_async_on_gpu() {
    check_layouts(&device("cuda"));
}
