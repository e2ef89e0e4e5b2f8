//! safetensors checkpoints under the official `state_dict` key names: parameters and batch-norm
//! running statistics as F32, `num_batches_tracked` as I64. Loading reports the keys the file
//! lacks and the keys the model does not have; a key with the wrong shape or dtype is an error.

use crate::error::{Error, Result};
use crate::nn::params::Params;
use crate::tensor::Tensor;
use safetensors::tensor::TensorView;
use safetensors::{Dtype, SafeTensors};
use std::collections::BTreeSet;
use std::path::Path;

#[derive(Debug, Default)]
pub struct LoadReport {
    pub loaded: usize,
    /// Model keys the file does not have (they keep their current values).
    pub missing: Vec<String>,
    /// File keys the model does not have (ignored).
    pub unexpected: Vec<String>,
    /// True when every file key carried a `module.` prefix (saved from nn.DataParallel), removed.
    pub stripped_module_prefix: bool,
}

impl LoadReport {
    pub fn summary(&self) -> String {
        let list = |v: &[String]| {
            let mut s = v.iter().take(8).cloned().collect::<Vec<_>>().join(", ");
            if v.len() > 8 {
                s += &format!(", ... ({} more)", v.len() - 8);
            }
            s
        };
        format!(
            "{} tensors loaded; {} missing [{}]; {} unexpected [{}]{}",
            self.loaded,
            self.missing.len(),
            list(&self.missing),
            self.unexpected.len(),
            list(&self.unexpected),
            if self.stripped_module_prefix { "; `module.` prefix removed" } else { "" }
        )
    }
}

fn err(path: &Path, detail: impl Into<String>) -> Error {
    Error::Checkpoint { path: path.display().to_string(), detail: detail.into() }
}

/// Loads the tensors of a safetensors file into `params` by name.
pub fn load(params: &mut Params, path: &Path) -> Result<LoadReport> {
    let bytes = std::fs::read(path).map_err(|e| err(path, format!("cannot read: {e}")))?;
    load_bytes(params, &bytes, path)
}

pub fn load_bytes(params: &mut Params, bytes: &[u8], path: &Path) -> Result<LoadReport> {
    let st = SafeTensors::deserialize(bytes).map_err(|e| err(path, format!("not a valid safetensors file: {e}")))?;
    let names: Vec<String> = st.names().into_iter().map(|s| s.to_string()).collect();
    let strip = !names.is_empty() && names.iter().all(|n| n.starts_with("module."));
    let mut report = LoadReport { stripped_module_prefix: strip, ..LoadReport::default() };
    let mut seen = BTreeSet::new();
    for name in &names {
        let key = if strip { &name["module.".len()..] } else { name.as_str() };
        let view = st.tensor(name).map_err(|e| err(path, format!("{name}: {e}")))?;
        if let Some(id) = params.id(key) {
            let want = params.value(id).shape().to_vec();
            if view.shape() != want.as_slice() {
                return Err(err(path, format!("{key} has shape {:?}, the model expects {want:?}", view.shape())));
            }
            let values = f32_values(&view).map_err(|d| err(path, format!("{key}: {d}")))?;
            let t = Tensor::from_vec(values, &want, params.device())?;
            params.set(id, t)?;
            seen.insert(key.to_string());
            report.loaded += 1;
        } else if params.counters().iter().any(|(n, _)| n == key) {
            if view.dtype() != Dtype::I64 || view.data().len() != 8 {
                return Err(err(path, format!("{key} must be one int64, got {:?} {:?}", view.dtype(), view.shape())));
            }
            let v = i64::from_le_bytes(view.data().try_into().expect("8 bytes"));
            params.set_counter(key, v);
            seen.insert(key.to_string());
            report.loaded += 1;
        } else {
            report.unexpected.push(key.to_string());
        }
    }
    for id in params.ids() {
        if !seen.contains(params.name(id)) {
            report.missing.push(params.name(id).to_string());
        }
    }
    for (n, _) in params.counters() {
        if !seen.contains(n) {
            report.missing.push(n.clone());
        }
    }
    Ok(report)
}

/// F32 as is; F64 rounded (references and float64 exports); anything else is refused.
pub(crate) fn f32_values(view: &TensorView) -> std::result::Result<Vec<f32>, String> {
    let d = view.data();
    match view.dtype() {
        Dtype::F32 => Ok(d.chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().expect("4 bytes"))).collect()),
        Dtype::F64 => {
            Ok(d.chunks_exact(8).map(|c| f64::from_le_bytes(c.try_into().expect("8 bytes")) as f32).collect())
        }
        other => Err(format!("dtype {other:?} is not a float tensor")),
    }
}

/// Writes every parameter, buffer and counter (official names). Written to `path.tmp` and
/// renamed, so a crash never leaves a truncated checkpoint under the final name.
pub fn save(params: &Params, path: &Path) -> Result<()> {
    save_with(params, &[], path)
}

/// `save` with string metadata (the model configuration) in the safetensors header.
pub fn save_with(params: &Params, metadata: &[(String, String)], path: &Path) -> Result<()> {
    let mut data: Vec<(String, Vec<usize>, Vec<u8>, Dtype)> = Vec::new();
    for id in params.ids() {
        let t = params.value(id);
        let v = t.to_vec()?;
        data.push((params.name(id).to_string(), t.shape().to_vec(), bytemuck::cast_slice(&v).to_vec(), Dtype::F32));
    }
    for (n, c) in params.counters() {
        data.push((n.clone(), vec![], c.to_le_bytes().to_vec(), Dtype::I64));
    }
    let views: Vec<(String, TensorView)> = data
        .iter()
        .map(|(n, s, b, dt)| Ok((n.clone(), TensorView::new(*dt, s.clone(), b).map_err(|e| err(path, e.to_string()))?)))
        .collect::<Result<_>>()?;
    let meta: Option<std::collections::HashMap<String, String>> =
        if metadata.is_empty() { None } else { Some(metadata.iter().cloned().collect()) };
    let bytes = safetensors::tensor::serialize(views, meta).map_err(|e| err(path, e.to_string()))?;
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, bytes).map_err(|e| err(path, format!("cannot write: {e}")))?;
    std::fs::rename(&tmp, path).map_err(|e| err(path, format!("cannot rename into place: {e}")))?;
    Ok(())
}

/// The metadata a checkpoint was saved with (empty when none).
pub fn read_metadata(path: &Path) -> Result<std::collections::HashMap<String, String>> {
    let bytes = std::fs::read(path).map_err(|e| err(path, format!("cannot read: {e}")))?;
    let (_, meta) =
        SafeTensors::read_metadata(&bytes).map_err(|e| err(path, format!("not a valid safetensors file: {e}")))?;
    Ok(meta.metadata().clone().unwrap_or_default())
}
