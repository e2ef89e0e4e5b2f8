//! The machine's own ceilings, measured by the bench itself so that every case can say how close
//! it is to its roofline: peak f32 FMA throughput of the cpu threads the ops use (the widest
//! vectors the CPU has, independent accumulators, no memory traffic) and copy bandwidth (large
//! buffers, read + write counted). Best of a few trials: a shared machine only ever makes a trial
//! slower.

use rayon::prelude::*;
use std::time::Instant;

/// Accumulators per thread: enough independent FMA chains to cover the FMA latency on two ports.
const CHAINS: usize = 12;

#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Ceilings {
    /// f32 GFLOP/s, every rayon thread at once (an FMA counts 2)
    pub peak_gflops: f64,
    /// GB/s of a large parallel copy (bytes read + bytes written)
    pub copy_gbs: f64,
    /// bf16 GFLOP/s of AVX512_BF16 dot products (`vdpbf16ps`: 32 multiply-adds per 512-bit
    /// instruction), every rayon thread at once; None on a CPU without them. The ceiling of the
    /// cases that compute on bf16 operands (their names say `bf16`).
    pub bf16_gflops: Option<f64>,
}

/// Lanes of the widest f32 FMA this CPU has, and `iters` rounds of CHAINS of them: returns a value
/// that depends on every FMA (so nothing is optimised away).
fn fma_rounds(iters: usize) -> (usize, f32) {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::x86_64::*;
        #[target_feature(enable = "avx512f")]
        unsafe fn v512(iters: usize) -> f32 {
            let (a, b) = (_mm512_set1_ps(0.999_999), _mm512_set1_ps(1e-7));
            let mut acc = [_mm512_set1_ps(1.0); CHAINS];
            for _ in 0..iters {
                for x in acc.iter_mut() {
                    *x = _mm512_fmadd_ps(*x, a, b);
                }
            }
            let s = acc.iter().fold(_mm512_setzero_ps(), |s, x| _mm512_add_ps(s, *x));
            _mm512_reduce_add_ps(s)
        }
        #[target_feature(enable = "avx2,fma")]
        unsafe fn v256(iters: usize) -> f32 {
            let (a, b) = (_mm256_set1_ps(0.999_999), _mm256_set1_ps(1e-7));
            let mut acc = [_mm256_set1_ps(1.0); CHAINS];
            for _ in 0..iters {
                for x in acc.iter_mut() {
                    *x = _mm256_fmadd_ps(*x, a, b);
                }
            }
            let mut out = [0f32; 8];
            let s = acc.iter().fold(_mm256_setzero_ps(), |s, x| _mm256_add_ps(s, *x));
            _mm256_storeu_ps(out.as_mut_ptr(), s);
            out.iter().sum()
        }
        if std::arch::is_x86_feature_detected!("avx512f") {
            // SAFETY: the CPU has AVX-512F, which v512 was compiled for.
            return (16, unsafe { v512(iters) });
        }
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
            // SAFETY: the CPU has AVX2 and FMA.
            return (8, unsafe { v256(iters) });
        }
    }
    let mut acc = [1.0f32; CHAINS];
    for _ in 0..iters {
        for x in acc.iter_mut() {
            *x = std::hint::black_box(*x).mul_add(0.999_999, 1e-7);
        }
    }
    (1, acc.iter().sum())
}

fn peak_gflops() -> f64 {
    let threads = rayon::current_num_threads();
    // ~30 ms a trial; the first also brings the cores to their sustained clock (a cold start
    // measured 307 against 411-474 GFLOP/s warm on the dev VM)
    let iters = 8_000_000;
    let mut best = 0f64;
    for _ in 0..8 {
        let t0 = Instant::now();
        let r: Vec<(usize, f32)> = (0..threads).into_par_iter().map(|_| fma_rounds(iters)).collect();
        let dt = t0.elapsed().as_secs_f64();
        let lanes = r[0].0;
        std::hint::black_box(r.iter().map(|x| x.1).sum::<f32>());
        best = best.max((threads * iters * CHAINS * lanes * 2) as f64 / dt / 1e9);
    }
    best
}

fn copy_gbs() -> f64 {
    let n = 32 << 20; // 128 MB of f32 each way: far beyond any cache
    let src = vec![1.0f32; n];
    let mut dst = vec![0.0f32; n];
    let chunk = n / rayon::current_num_threads().max(1) / 4;
    let mut best = 0f64;
    for _ in 0..4 {
        let t0 = Instant::now();
        dst.par_chunks_mut(chunk.max(1)).zip(src.par_chunks(chunk.max(1))).for_each(|(d, s)| d.copy_from_slice(s));
        let dt = t0.elapsed().as_secs_f64();
        std::hint::black_box(&dst);
        best = best.max((2 * 4 * n) as f64 / dt / 1e9);
    }
    best
}

/// `iters` rounds of CHAINS bf16 dot products (16 lanes × 2 pairs each) where the CPU has
/// AVX512_BF16: a value that depends on every one.
fn dot_rounds(iters: usize) -> Option<f32> {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::x86_64::*;
        #[target_feature(enable = "avx512f,avx512bf16")]
        unsafe fn v512(iters: usize) -> f32 {
            // pairs of tiny products: the sums stay finite and far from overflow
            let a: __m512bh = unsafe { std::mem::transmute(_mm512_set1_epi32(0x3000_3000)) };
            let mut acc = [_mm512_set1_ps(1.0); CHAINS];
            for _ in 0..iters {
                for x in acc.iter_mut() {
                    *x = _mm512_dpbf16_ps(*x, a, a);
                }
            }
            let s = acc.iter().fold(_mm512_setzero_ps(), |s, x| _mm512_add_ps(s, *x));
            _mm512_reduce_add_ps(s)
        }
        if std::arch::is_x86_feature_detected!("avx512f") && std::arch::is_x86_feature_detected!("avx512bf16") {
            // SAFETY: the CPU has AVX-512F and AVX512_BF16, which v512 was compiled for.
            return Some(unsafe { v512(iters) });
        }
    }
    let _ = iters;
    None
}

fn bf16_gflops() -> Option<f64> {
    let threads = rayon::current_num_threads();
    dot_rounds(1)?;
    let iters = 4_000_000;
    let mut best = 0f64;
    for _ in 0..6 {
        let t0 = Instant::now();
        let r: Vec<Option<f32>> = (0..threads).into_par_iter().map(|_| dot_rounds(iters)).collect();
        let dt = t0.elapsed().as_secs_f64();
        std::hint::black_box(r.iter().flatten().sum::<f32>());
        // 16 lanes × 2 products × 2 FLOPs per instruction
        best = best.max((threads * iters * CHAINS * 64) as f64 / dt / 1e9);
    }
    Some(best)
}

/// Measures them (under a second).
pub fn measure() -> Ceilings {
    Ceilings { peak_gflops: peak_gflops(), copy_gbs: copy_gbs(), bf16_gflops: bf16_gflops() }
}

/// The share of the roofline a case reaches: the time its FLOPs need at peak (the bf16 dot
/// products' for a `bf16` case where the CPU has them, else f32 FMA's) or its bytes need at
/// copy bandwidth, whichever is longer, over the time it took (100 = at the ceiling).
pub fn roofline_pct(c: &Ceilings, flops: f64, bytes: f64, seconds: f64, bf16: bool) -> Option<f64> {
    let peak = if bf16 { c.bf16_gflops.unwrap_or(c.peak_gflops) } else { c.peak_gflops };
    let bound = (flops / (peak * 1e9)).max(bytes / (c.copy_gbs * 1e9));
    (bound > 0.0 && seconds > 0.0).then(|| 100.0 * bound / seconds)
}
