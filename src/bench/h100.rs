//! A model of GPU time without a GPU: the least time an H100 SXM5 needs for a case's FLOPs (on the
//! unit its precision runs on) or its bytes (HBM3 bandwidth), whichever is longer. Printed beside
//! every case, so the first GPU run gives roofline fractions at once.
//!
//! Dense datasheet peaks (NVIDIA H100 SXM5): bf16/f16 tensor cores 989.4 TFLOP/s, tf32 tensor
//! cores 494.7 TFLOP/s, f32 on the CUDA cores 66.9 TFLOP/s; HBM3 3.35 TB/s. Real kernels reach
//! perhaps 70-80 % of the tensor peak and 90 % of the bandwidth: the figure is a floor, not a goal.

/// The unit a case's arithmetic runs on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Unit {
    TensorBf16,
    TensorTf32,
    CudaCoresF32,
}

impl Unit {
    /// Peak FLOP/s of the unit.
    pub fn peak_flops(self) -> f64 {
        match self {
            Unit::TensorBf16 => 989.4e12,
            Unit::TensorTf32 => 494.7e12,
            Unit::CudaCoresF32 => 66.9e12,
        }
    }
}

/// HBM3 bandwidth, bytes per second.
pub const HBM_BYTES_PER_S: f64 = 3.35e12;

/// The unit a benchmark case runs on, from its name: `bf16` cases on the bf16 tensor cores, the
/// `_tc` cases (tf32 mma) on the tf32 tensor cores, everything else exact f32 on the CUDA cores.
pub fn unit_of(op: &str) -> Unit {
    if op.contains("bf16") {
        Unit::TensorBf16
    } else if op.contains("_tc") {
        Unit::TensorTf32
    } else {
        Unit::CudaCoresF32
    }
}

/// The least time an H100 needs for `flops` on `op`'s unit and `bytes` through HBM, or None for a
/// case that does neither.
pub fn min_seconds(op: &str, flops: f64, bytes: f64) -> Option<f64> {
    let t = (flops / unit_of(op).peak_flops()).max(bytes / HBM_BYTES_PER_S);
    (t > 0.0).then_some(t)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_longer_of_compute_and_memory() {
        // 2048³ bf16 GEMM: 17.2 GFLOP at 989.4 TFLOP/s = 17.4 µs; its 25 MB take 7.5 µs
        let f = 2.0 * 2048f64.powi(3);
        let t = min_seconds("gemm_bf16", f, 3.0 * 2048.0 * 2048.0 * 2.0).unwrap();
        assert!((t - f / 989.4e12).abs() < 1e-12);
        // the same FLOPs in exact f32: 15x longer
        assert!((min_seconds("gemm", f, 0.0).unwrap() / t - 989.4 / 66.9).abs() < 1e-9);
        assert_eq!(unit_of("gemm_tc"), Unit::TensorTf32);
        // a copy is bandwidth: 1 GB in 0.3 ms
        assert!((min_seconds("copy", 0.0, 1e9).unwrap() - 1e9 / 3.35e12).abs() < 1e-15);
        assert_eq!(min_seconds("copy", 0.0, 0.0), None);
    }
}
