//! Typed errors. Library code returns these; nothing panics on user data.

use crate::device::DeviceKind;
use crate::tensor::DType;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("no usable CUDA device: {0}")]
    NoCuda(String),
    #[error("the emu device is not built in (enable the `emu` feature)")]
    NoEmu,
    #[error("{op}: shape mismatch: {detail}")]
    Shape { op: &'static str, detail: String },
    #[error("{op}: tensors live on different devices ({a} and {b})")]
    DeviceMismatch { op: &'static str, a: DeviceKind, b: DeviceKind },
    #[error("{op}: expected dtype {expected:?}, got {got:?}")]
    DType { op: &'static str, expected: DType, got: DType },
    #[error("{op}: {detail}")]
    Unsupported { op: &'static str, detail: String },
    #[error("kernel {kernel} failed on the {device} device: {detail}")]
    Launch { kernel: &'static str, device: DeviceKind, detail: String },
    #[error("CUDA driver: {0}")]
    Cuda(String),
    #[error("NVRTC: {0}")]
    Nvrtc(String),
    #[error("configuration: {0}")]
    Config(String),
    #[error("{path}: {detail}")]
    Data { path: String, detail: String },
    #[error("checkpoint {path}: {detail}")]
    Checkpoint { path: String, detail: String },
    #[error("non-finite value: {0}")]
    NonFinite(String),
    #[error("{0}")]
    Other(String),
}

pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    /// An error about a user's file (the path is named in the message).
    pub fn data(path: &std::path::Path, detail: impl std::fmt::Display) -> Self {
        Error::Data { path: path.display().to_string(), detail: detail.to_string() }
    }
    pub(crate) fn shape(op: &'static str, detail: impl Into<String>) -> Self {
        Error::Shape { op, detail: detail.into() }
    }
}
