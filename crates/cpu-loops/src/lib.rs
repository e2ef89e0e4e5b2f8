//! The hot inner loops of reclmis's cpu kernels: leaf functions over slices, with no knowledge of
//! tensors or devices. They live apart from the engine only so that the size profile can build
//! them at opt-level 3 (see Cargo.toml); the engine's ops call them and the engine's tests check
//! them (against f64 references, through the ops).

pub mod bf16dot;
pub mod gemm;
pub mod math;
pub mod scan;
mod simd;
pub mod winograd;
pub mod winograd4;
