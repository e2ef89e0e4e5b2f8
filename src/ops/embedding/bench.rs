//! Embedding benchmark case: the CLIP token embedding lookup (49408 x 512 table).

use crate::bench::{check_with, host, rand_tensor, Case, Group};
use crate::device::Device;
use crate::error::Result;
use crate::ops::embedding;
use crate::tensor::Tensor;

pub const GROUP: Group = Group { names: &["embedding"], cases, shaped: &[], check: None };

/// 32 notes of 77 tokens looked up in the CLIP vocabulary.
fn cases(dev: &Device, small: bool, v: &mut Vec<Case>) -> Result<()> {
    let (vocab, d, toks) = if small { (1000, 64, 36) } else { (49408, 512, 32 * 77) };
    let table = rand_tensor(&[vocab, d], 38, dev)?;
    let ids: Vec<i32> = (0..toks).map(|i| ((i * 7919) % vocab) as i32).collect();
    let ids = Tensor::from_vec_i32(ids, &[toks], dev)?;
    v.push(Case {
        op: "embedding",
        shape: format!("{toks} ids of {vocab}x{d}"),
        flops: 0.0,
        bytes: 8.0 * (toks * d) as f64,
        peer: Some(format!("embedding {toks} {vocab} {d}")),
        validate: {
            let (ids, table) = (ids.clone(), table.clone());
            check_with("embedding", (0.0, 0.0), move || {
                Ok(embedding::reference::forward(&ids.to_vec_i32()?, &host(&table)?, d))
            })
        },
        run: Box::new(move || embedding::embedding(&ids, &table)),
    });
    Ok(())
}
