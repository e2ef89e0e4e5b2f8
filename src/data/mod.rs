//! Data: the LViT layout loader, the synthetic dataset writer, the QaTa note grammar.

pub mod augment;
pub mod lvit;
pub mod notes;
pub mod synth;
#[cfg(feature = "cli")]
pub mod write;
