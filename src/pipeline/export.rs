//! `reclmis export`: an inference checkpoint. Only the tensors the mask needs (and, on request,
//! the scoring MLPs that give W_poi / W_woi), in f32, bf16 or f16, with the model configuration
//! and the tokenizer.json in the safetensors metadata: one self-contained file for
//! `reclmis-infer`.

use super::load_run;
use crate::checkpoint::{self, Data, EMBEDDED_TOKENIZER};
use crate::device::Device;
use crate::error::{Error, Result};
use crate::model::RecLmis;
use crate::text::NoteTokenizer;
use std::path::Path;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExportDtype {
    F32,
    Bf16,
    F16,
}

impl std::str::FromStr for ExportDtype {
    type Err = Error;
    fn from_str(s: &str) -> Result<ExportDtype> {
        match s {
            "f32" => Ok(ExportDtype::F32),
            "bf16" => Ok(ExportDtype::Bf16),
            "f16" => Ok(ExportDtype::F16),
            _ => Err(Error::Config(format!("unknown dtype {s:?} (f32, bf16 or f16)"))),
        }
    }
}

pub struct ExportReport {
    pub tensors: usize,
    pub params: usize,
    pub left_out: usize,
    pub left_out_params: usize,
    pub bytes: u64,
}

impl std::fmt::Display for ExportReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} tensors ({:.1}M values), {} training-only tensors left out ({:.1}M values); {:.1} MB",
            self.tensors,
            self.params as f64 / 1e6,
            self.left_out,
            self.left_out_params as f64 / 1e6,
            self.bytes as f64 / 1e6
        )
    }
}

/// Writes the inference checkpoint of `checkpoint` (a training checkpoint, an imported one, an
/// exported one, or an official .pth with its tokenizer) to `out`, which must not exist.
pub fn export(
    checkpoint: &Path,
    tokenizer: Option<&Path>,
    out: &Path,
    dtype: ExportDtype,
    weights_of_interest: bool,
) -> Result<ExportReport> {
    if out.symlink_metadata().is_ok() {
        return Err(Error::data(out, "exists; export writes a new file and never replaces one"));
    }
    let (m, tok) = load_run(checkpoint, tokenizer, &Device::Cpu)?;
    if weights_of_interest && !m.has_weights_of_interest() {
        return Err(Error::data(checkpoint, "holds no mlp_visual / mlp_woi to export (--weights-of-interest)"));
    }
    let p = &m.params;
    let keep = |name: &str| {
        !RecLmis::TRAINING_ONLY.iter().any(|t| name.starts_with(t))
            && (weights_of_interest || !RecLmis::WEIGHTS_OF_INTEREST.iter().any(|t| name.starts_with(t)))
    };
    // (name, shape, values, half precision allowed)
    let mut kept: Vec<(String, Vec<usize>, Vec<f32>, bool)> = vec![];
    let (mut left_out, mut left_out_params) = (0, 0);
    for id in p.ids() {
        let name = p.name(id);
        if !keep(name) {
            left_out += 1;
            left_out_params += crate::tensor::checked_numel(p.shape(id)).unwrap_or(0);
            continue;
        }
        // batch-norm statistics stay f32: a running mean of 100 ± 0.4 (bf16's step there) over a
        // running std of 0.01 moves every activation by 40 standard deviations
        let halvable = !matches!(p.kind(id), crate::nn::params::Kind::Buffer);
        kept.push((name.to_string(), p.shape(id).to_vec(), p.value(id).to_vec()?, halvable));
    }
    // half precision for the tensors that may be halved: round to nearest even; a value f16
    // cannot hold is refused by name (bf16 has f32's range)
    let halves: Vec<Option<Vec<u16>>> = kept
        .iter()
        .map(|(name, _, v, halvable)| match dtype {
            _ if !halvable => Ok(None),
            ExportDtype::F32 => Ok(None),
            ExportDtype::Bf16 => Ok(Some(v.iter().map(|&x| half::bf16::from_f32(x).to_bits()).collect())),
            ExportDtype::F16 => match v.iter().position(|x| x.abs() > half::f16::MAX.to_f32()) {
                Some(k) => Err(Error::data(
                    checkpoint,
                    format!("{name}[{k}] = {} is outside f16's range; export as bf16", v[k]),
                )),
                None => Ok(Some(v.iter().map(|&x| half::f16::from_f32(x).to_bits()).collect())),
            },
        })
        .collect::<Result<_>>()?;
    let tag = if dtype == ExportDtype::F16 { "F16" } else { "BF16" };
    let mut tensors: Vec<(String, Vec<usize>, Data)> = kept
        .iter()
        .zip(&halves)
        .map(|((n, s, v, _), h)| (n.clone(), s.clone(), h.as_ref().map_or(Data::F32(v), |h| Data::Half(tag, h))))
        .collect();
    tensors.extend(p.counters().iter().map(|(n, c)| (n.clone(), vec![], Data::I64(*c))));
    let json = tok.to_json()?;
    let (hash, vocab) = NoteTokenizer::identity(json.as_bytes(), tok.vocab_size());
    let mut meta = m.cfg.to_metadata();
    meta.extend([
        (EMBEDDED_TOKENIZER.to_string(), json),
        ("tokenizer_hash".to_string(), hash),
        ("tokenizer_vocab".to_string(), vocab.to_string()),
        ("export_dtype".to_string(), format!("{dtype:?}").to_lowercase()),
        ("export_weights_of_interest".to_string(), weights_of_interest.to_string()),
    ]);
    checkpoint::write_tensors(out, &tensors, &meta)?;
    let bytes = std::fs::metadata(out).map(|m| m.len()).unwrap_or(0);
    Ok(ExportReport {
        tensors: kept.len(),
        params: kept.iter().map(|(_, _, v, _)| v.len()).sum(),
        left_out,
        left_out_params,
        bytes,
    })
}
