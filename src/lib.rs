//! reclmis: a from-scratch GPU compute engine for language-guided medical image segmentation.
//!
//! Layers, each knowing only the ones below: `ops` (one folder per op: API, params struct, cpu
//! path, reference, kernel launch), `tensor`, `device` (cpu | cuda | emu), `kernels` (the table
//! generated from kernels/*.cu).

pub mod autograd;
#[cfg(feature = "cli")]
pub mod bench;
pub mod checkpoint;
pub mod data;
pub mod device;
pub mod error;
pub mod files;
pub mod kernels;
pub mod mapped;
pub mod model;
pub mod nn;
pub mod ops;
#[cfg(feature = "train")]
pub mod optim;
pub mod pipeline;
#[cfg(feature = "pth")]
pub mod pth;
pub mod rng;
#[cfg(feature = "cli")]
pub mod selfcheck;
pub mod tensor;
#[cfg(feature = "refs")]
pub mod testing;
pub mod text;

pub use device::{Device, DeviceChoice, DeviceKind};
pub use error::{Error, Result};
pub use tensor::{DType, Tensor};
