//! safetensors checkpoints under the official `state_dict` key names: parameters and batch-norm
//! running statistics as F32, `num_batches_tracked` as I64. Loading reports the keys the file
//! lacks and the keys the model does not have; a key with the wrong shape or dtype, or a weight that
//! is not finite, is an error naming the tensor. Files are written atomically with sorted headers,
//! so the same weights and metadata always give the same bytes.

use crate::error::{Error, Result};
use crate::nn::params::Params;
use crate::tensor::{CpuStorage, Tensor};
use safetensors::SafeTensors;
use std::collections::BTreeSet;
use std::io::Read;
use std::path::Path;

/// A tensor's values as loading needs them (from safetensors, a .pth or a Hugging Face file).
#[derive(Clone, Debug, PartialEq)]
pub enum Values {
    F32(Vec<f32>),
    /// f32 in place in a memory-mapped file (`load_mapped`).
    Mapped(crate::mapped::MappedF32),
    I64(Vec<i64>),
    /// A dtype that is neither float nor int64 (bool, int8, ...), kept only to name it in errors.
    Other(String),
}

#[derive(Debug, Default)]
pub struct LoadReport {
    pub loaded: usize,
    /// Model keys the file does not have (they keep their current values).
    pub missing: Vec<String>,
    /// File keys the model does not have (ignored).
    pub unexpected: Vec<String>,
    /// File keys dropped on purpose (`DROPPED_PREFIXES`: the official CLIP image tower; the
    /// training-only tensors when loading for inference).
    pub dropped: Vec<String>,
    /// True when every file key carried a `module.` prefix (saved from nn.DataParallel), removed.
    pub stripped_module_prefix: bool,
}

impl LoadReport {
    pub fn summary(&self) -> String {
        let mut s = format!(
            "{} tensors loaded; {} missing{}; {} unexpected{}",
            self.loaded,
            self.missing.len(),
            by_role(&self.missing),
            self.unexpected.len(),
            by_role(&self.unexpected)
        );
        if !self.dropped.is_empty() {
            s += &format!(
                "; {} dropped (the official CLIP image tower, never used){}",
                self.dropped.len(),
                by_role(&self.dropped)
            );
        }
        if self.stripped_module_prefix {
            s += "; `module.` prefix removed";
        }
        s
    }
}

/// The part of the model a key belongs to: its first component, two for the text tower
/// (`clip.transformer`, `clip.visual`), and batch-norm statistics as their own role.
pub fn role(key: &str) -> String {
    let last = key.rsplit('.').next().unwrap_or(key);
    if ["running_mean", "running_var", "num_batches_tracked"].contains(&last) {
        return "batch-norm statistics".into();
    }
    let mut parts = key.split('.');
    let first = parts.next().unwrap_or(key);
    match (first, parts.next()) {
        ("clip", Some(second)) if key.matches('.').count() > 1 => format!("clip.{second}"),
        _ => first.to_string(),
    }
}

/// ` [role: count, ...; e.g. first, second]` (empty when there are no keys).
fn by_role(keys: &[String]) -> String {
    if keys.is_empty() {
        return String::new();
    }
    let mut counts: std::collections::BTreeMap<String, usize> = Default::default();
    for k in keys {
        *counts.entry(role(k)).or_default() += 1;
    }
    let roles: Vec<String> = counts.iter().map(|(r, n)| format!("{r}: {n}")).collect();
    let examples: Vec<&str> = keys.iter().take(3).map(String::as_str).collect();
    format!(" [{}; e.g. {}]", roles.join(", "), examples.join(", "))
}

fn err(path: &Path, detail: impl Into<String>) -> Error {
    Error::Checkpoint { path: path.display().to_string(), detail: detail.into() }
}

/// Loads the tensors of a safetensors file into `params` by name. Only the tensors the model has
/// are read, each straight from the file into its own buffer: loading a training checkpoint for
/// inference skips the reconstruction unread, and the peak memory is the weights loaded plus one
/// tensor (reading the file whole first would double it).
pub fn load(params: &mut Params, path: &Path) -> Result<LoadReport> {
    load_skipping(params, path, &[])
}

/// `load`, leaving the tensors under `skip` (key prefixes) unread and unset: they are reported
/// as dropped, not missing. Inference skips the training-only reconstruction this way.
pub fn load_skipping(params: &mut Params, path: &Path, skip: &[&str]) -> Result<LoadReport> {
    load_file(params, path, skip, false)
}

/// `load_skipping` for inference: f32 tensors stay in the file, memory-mapped (read-only, no copy
/// and no buffer of their own; `crate::mapped` says what that assumes); others are read and
/// converted. The parameters must not be written afterwards (a write would fault).
pub fn load_mapped_skipping(params: &mut Params, path: &Path, skip: &[&str]) -> Result<LoadReport> {
    load_file(params, path, skip, true)
}

fn load_file(params: &mut Params, path: &Path, skip: &[&str], map: bool) -> Result<LoadReport> {
    let (file, len) = crate::files::open_regular(path, u64::MAX).map_err(|e| err(path, e.to_string()))?;
    let mapping = if map {
        let m = crate::mapped::Mapping::new(&file).map_err(|e| err(path, format!("cannot map the file: {e}")))?;
        Some(std::sync::Arc::new(m))
    } else {
        None
    };
    let (n, header) = read_header(&file, len, path)?;
    let data_start = 8 + n;
    let data_len = len - data_start;
    let mut offered = Vec::new();
    let tensors =
        header.as_object().ok_or_else(|| err(path, "not a valid safetensors file: header is not an object"))?;
    for (name, info) in tensors.iter().filter(|(k, _)| k.as_str() != "__metadata__") {
        let bad = |d: &str| err(path, format!("not a valid safetensors file: {name}: {d}"));
        let dtype = info.get("dtype").and_then(|d| d.as_str()).ok_or_else(|| bad("no dtype"))?.to_string();
        let shape: Vec<usize> = info
            .get("shape")
            .and_then(|s| s.as_array())
            .ok_or_else(|| bad("no shape"))?
            .iter()
            .map(|d| d.as_u64().and_then(|d| usize::try_from(d).ok()).ok_or_else(|| bad("a dimension is not a count")))
            .collect::<Result<_>>()?;
        let offsets = info
            .get("data_offsets")
            .and_then(|o| o.as_array())
            .filter(|o| o.len() == 2)
            .ok_or_else(|| bad("no data_offsets"))?;
        let (start, end) = match (offsets[0].as_u64(), offsets[1].as_u64()) {
            (Some(a), Some(b)) if a <= b && b <= data_len => (a, b),
            _ => {
                return Err(bad(&format!(
                    "data_offsets {:?} outside the {data_len} bytes of data",
                    info["data_offsets"]
                )))
            }
        };
        let size = dtype_size(&dtype).ok_or_else(|| bad(&format!("dtype {dtype} is not supported")))?;
        let bytes = crate::tensor::checked_numel(&shape).and_then(|n| n.checked_mul(size));
        if bytes != Some((end - start) as usize) {
            return Err(bad(&format!("shape {shape:?} of {dtype} does not fill its {} bytes", end - start)));
        }
        let file = &file;
        let at = data_start + start;
        let in_place = match (&mapping, dtype.as_str()) {
            (Some(m), "F32") => usize::try_from(at).ok().and_then(|a| crate::mapped::MappedF32::new(m, a, bytes? / 4)),
            _ => None,
        };
        offered.push(Offered {
            name: name.clone(),
            shape,
            values: match in_place {
                Some(m) => Box::new(move || Ok(Values::Mapped(m))),
                None => Box::new(move || read_values(file, at, (end - start) as usize, &dtype)),
            },
        });
    }
    load_offered_skipping(params, offered, path, skip)
}

fn dtype_size(dtype: &str) -> Option<usize> {
    Some(match dtype {
        "F64" | "I64" => 8,
        "F32" => 4,
        "BF16" | "F16" => 2,
        _ => return None,
    })
}

/// One tensor's values read from `file` at `offset` (`bytes` long), as loading needs them.
fn read_values(file: &std::fs::File, offset: u64, bytes: usize, dtype: &str) -> std::result::Result<Values, String> {
    if dtype == "F32" {
        // straight into the f32 buffer the tensor keeps (no second copy)
        let mut v = vec![0f32; bytes / 4];
        read_par(file, offset, bytemuck::cast_slice_mut(&mut v))?;
        #[cfg(target_endian = "big")]
        v.iter_mut().for_each(|x| *x = f32::from_bits(u32::from_le(x.to_bits())));
        return Ok(Values::F32(v));
    }
    let mut raw = vec![0u8; bytes];
    read_par(file, offset, &mut raw)?;
    Ok(decode(dtype, &raw))
}

/// Fills `buf` from `file` at `offset` in 4 MiB pieces spread over the threads: reading from the
/// page cache is a copy plus a page fault per 4 KiB of the new buffer, CPU work that one thread
/// did at about 1.2 GB/s (the official preset's 329 MB took 0.27 s).
fn read_par(file: &std::fs::File, offset: u64, buf: &mut [u8]) -> std::result::Result<(), String> {
    use rayon::prelude::*;
    use std::os::unix::fs::FileExt;
    const PIECE: usize = 4 << 20;
    buf.par_chunks_mut(PIECE)
        .enumerate()
        .try_for_each(|(i, c)| file.read_exact_at(c, offset + (i * PIECE) as u64))
        .map_err(|e| format!("cannot read: {e}"))
}

/// Little-endian tensor bytes of a safetensors dtype (its name, as `Dtype`'s Debug spells it):
/// floats widened or narrowed to f32, int64 kept, anything else named.
fn decode(dtype: &str, raw: &[u8]) -> Values {
    let f32s = |n: usize, f: fn(&[u8]) -> f32| Values::F32(raw.chunks_exact(n).map(f).collect());
    match dtype {
        "F32" => f32s(4, |c| f32::from_le_bytes(c.try_into().expect("4 bytes"))),
        "F64" => f32s(8, |c| f64::from_le_bytes(c.try_into().expect("8 bytes")) as f32),
        "BF16" => f32s(2, |c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32()),
        "F16" => f32s(2, |c| half::f16::from_le_bytes([c[0], c[1]]).to_f32()),
        "I64" => Values::I64(raw.chunks_exact(8).map(|c| i64::from_le_bytes(c.try_into().expect("8 bytes"))).collect()),
        other => Values::Other(other.to_string()),
    }
}

pub fn load_bytes(params: &mut Params, bytes: &[u8], path: &Path) -> Result<LoadReport> {
    let st = SafeTensors::deserialize(bytes).map_err(|e| err(path, format!("not a valid safetensors file: {e}")))?;
    let mut offered = Vec::new();
    for name in st.names() {
        let view = st.tensor(name).map_err(|e| err(path, format!("{name}: {e}")))?;
        let shape = view.shape().to_vec();
        offered.push(Offered {
            name: name.to_string(),
            shape,
            values: Box::new(move || Ok(decode(&format!("{:?}", view.dtype()), view.data()))),
        });
    }
    load_offered(params, offered, path)
}

/// Loads the `state_dict` of a `torch.save` checkpoint (the official training's `.pth`), read
/// without executing pickled code. The official model's never-used CLIP image tower
/// (`clip.visual.*`) is dropped and reported as such.
#[cfg(feature = "pth")]
pub fn load_pth(params: &mut Params, path: &Path) -> Result<LoadReport> {
    load_state_dict(params, crate::pth::read_state_dict(path)?, path)
}

/// Loads a state dict already read from `path` (see `load_pth`).
#[cfg(feature = "pth")]
pub fn load_state_dict(params: &mut Params, sd: crate::pth::StateDict, path: &Path) -> Result<LoadReport> {
    let offered = sd
        .tensors
        .into_iter()
        .map(|t| Offered { name: t.name, shape: t.shape, values: Box::new(move || Ok(t.values)) })
        .collect();
    load_offered(params, offered, path)
}

/// A tensor a file offers: its name and shape, and its values, converted only when the model
/// has the key.
pub(crate) struct Offered<'a> {
    pub name: String,
    pub shape: Vec<usize>,
    pub values: Box<dyn FnOnce() -> std::result::Result<Values, String> + Send + 'a>,
}

/// Keys that exist in official checkpoints but never in a reclmis model, dropped on purpose: the
/// CLIP image tower the official code builds and never runs.
pub const DROPPED_PREFIXES: [&str; 1] = ["clip.visual."];

/// Assigns offered tensors to `params` by name (a `module.` prefix on every key is removed).
pub(crate) fn load_offered(params: &mut Params, offered: Vec<Offered>, path: &Path) -> Result<LoadReport> {
    load_offered_skipping(params, offered, path, &[])
}

fn load_offered_skipping(params: &mut Params, offered: Vec<Offered>, path: &Path, skip: &[&str]) -> Result<LoadReport> {
    use rayon::prelude::*;
    let strip = !offered.is_empty() && offered.iter().all(|o| o.name.starts_with("module."));
    let mut report = LoadReport { stripped_module_prefix: strip, ..LoadReport::default() };
    let mut seen = BTreeSet::new();
    // names and shapes first (a wrong one fails before anything is read), then the values of
    // every tensor the model takes, read in parallel, then assigned in file order
    let mut reads = Vec::new();
    for o in offered {
        let key = if strip { o.name["module.".len()..].to_string() } else { o.name.clone() };
        if skip.iter().any(|p| key.starts_with(p)) {
            report.dropped.push(key);
            continue;
        }
        if let Some(id) = params.id(&key) {
            let want = params.shape(id).to_vec();
            if o.shape != want {
                return Err(err(path, format!("{key} has shape {:?}, the model expects {want:?}", o.shape)));
            }
            seen.insert(key.clone());
            reads.push((key, id, want, o.values));
        } else if params.counters().iter().any(|(n, _)| *n == key) {
            let v = match (o.values)().map_err(|d| err(path, format!("{key}: {d}")))? {
                Values::I64(v) if v.len() == 1 => v[0],
                _ => return Err(err(path, format!("{key} must be one int64, got shape {:?}", o.shape))),
            };
            params.set_counter(&key, v);
            seen.insert(key);
            report.loaded += 1;
        } else if DROPPED_PREFIXES.iter().any(|p| key.starts_with(p)) {
            report.dropped.push(key);
        } else {
            report.unexpected.push(key);
        }
    }
    let read: Vec<_> = reads
        .into_par_iter()
        .map(|(key, id, want, values)| {
            let values = match values().map_err(|d| err(path, format!("{key}: {d}")))? {
                Values::F32(v) => CpuStorage::F32(v),
                Values::Mapped(m) => CpuStorage::MappedF32(m),
                Values::I64(_) => return Err(err(path, format!("{key}: dtype int64 is not a float tensor"))),
                Values::Other(d) => return Err(err(path, format!("{key}: dtype {d} is not a float tensor"))),
            };
            let vals = values.as_f32().expect("an f32 storage");
            if let Some(k) = first_non_finite_par(vals) {
                return Err(err(path, format!("{key} holds a non-finite value ({} at index {k})", vals[k])));
            }
            Ok((id, want, values))
        })
        .collect();
    // assigned in file order; the first error in that order is the one a sequential load reports
    for r in read {
        let (id, want, values) = r?;
        params.set(id, Tensor::from_cpu(values, &want, params.device())?)?;
        report.loaded += 1;
    }
    for id in params.ids() {
        let name = params.name(id);
        if !seen.contains(name) && !skip.iter().any(|p| name.starts_with(p)) {
            report.missing.push(name.to_string());
        }
    }
    for (n, _) in params.counters() {
        if !seen.contains(n) {
            report.missing.push(n.clone());
        }
    }
    Ok(report)
}

/// The index of the first NaN or infinity in x, its 1 MiB pieces checked in parallel.
fn first_non_finite_par(x: &[f32]) -> Option<usize> {
    use rayon::prelude::*;
    const PIECE: usize = 1 << 18;
    x.par_chunks(PIECE)
        .enumerate()
        .find_map_first(|(i, c)| reclmis_cpu_loops::scan::first_non_finite(c).map(|k| i * PIECE + k))
}

/// F32 as is; F64, BF16 and F16 converted; anything else is refused.
#[cfg(feature = "train")]
pub(crate) fn f32_values(view: &safetensors::tensor::TensorView) -> std::result::Result<Vec<f32>, String> {
    let dtype = format!("{:?}", view.dtype());
    match decode(&dtype, view.data()) {
        Values::F32(v) => Ok(v),
        _ => Err(format!("dtype {dtype} is not a float tensor")),
    }
}

/// A tensor to write: f32 values (refused when not finite) or one int64 counter.
pub enum Data<'a> {
    F32(&'a [f32]),
    /// bf16 or f16 bits (`"BF16"` / `"F16"`), converted from finite f32 by the caller.
    Half(&'static str, &'a [u16]),
    I64(i64),
}

/// Writes a safetensors file atomically and durably (see `files::write_atomic_with`). The header
/// is written here rather than by `safetensors::serialize`, whose metadata map is a `HashMap`
/// with random order: the same tensors and metadata must give the same bytes (tensors and
/// metadata keys sorted). A non-finite value is an error naming its tensor, and nothing is
/// written: a NaN checkpoint would load and infer empty masks.
pub fn write_tensors(path: &Path, tensors: &[(String, Vec<usize>, Data)], metadata: &[(String, String)]) -> Result<()> {
    let mut order: Vec<usize> = (0..tensors.len()).collect();
    order.sort_by(|&a, &b| tensors[a].0.cmp(&tensors[b].0));
    let mut header = serde_json::Map::new();
    if !metadata.is_empty() {
        let m: std::collections::BTreeMap<&str, &str> =
            metadata.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        header.insert("__metadata__".into(), serde_json::json!(m));
    }
    let mut offset = 0usize;
    for &i in &order {
        let (name, shape, data) = &tensors[i];
        let (dtype, bytes) = match data {
            Data::F32(v) => {
                let n = crate::tensor::checked_numel(shape)
                    .filter(|&n| n == v.len())
                    .ok_or_else(|| err(path, format!("{name}: {} values for shape {shape:?}", v.len())))?;
                if let Some(k) = first_non_finite_par(v) {
                    return Err(err(
                        path,
                        format!("not written: {name} holds a non-finite value ({} at index {k})", v[k]),
                    ));
                }
                ("F32", 4 * n)
            }
            Data::Half(dtype, v) => {
                let n = crate::tensor::checked_numel(shape)
                    .filter(|&n| n == v.len())
                    .ok_or_else(|| err(path, format!("{name}: {} values for shape {shape:?}", v.len())))?;
                (*dtype, 2 * n)
            }
            Data::I64(_) => ("I64", 8),
        };
        header.insert(
            name.clone(),
            serde_json::json!({"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + bytes]}),
        );
        offset += bytes;
    }
    // serde_json's Map is a BTreeMap here (no preserve_order feature): keys come out sorted
    let mut json = serde_json::to_vec(&serde_json::Value::Object(header)).map_err(|e| err(path, e.to_string()))?;
    json.resize(json.len().next_multiple_of(8), b' ');
    crate::files::write_atomic_with(path, |w| {
        w.write_all(&(json.len() as u64).to_le_bytes())?;
        w.write_all(&json)?;
        for &i in &order {
            match &tensors[i].2 {
                Data::F32(v) => w.write_all(bytemuck::cast_slice(v))?,
                Data::Half(_, v) => w.write_all(bytemuck::cast_slice(v))?,
                Data::I64(c) => w.write_all(&c.to_le_bytes())?,
            }
        }
        Ok(())
    })
    .map_err(|e| err(path, e.to_string()))
}

/// (name, shape, values) of one tensor copied to the host.
pub type HostTensor = (String, Vec<usize>, Vec<f32>);

/// Every parameter, buffer and counter of `params` under its official name, as `write_tensors`
/// takes them (the values copied to the host).
pub fn host_values(params: &Params) -> Result<Vec<HostTensor>> {
    params
        .ids()
        .map(|id| Ok((params.name(id).to_string(), params.value(id).shape().to_vec(), params.value(id).to_vec()?)))
        .collect()
}

/// Writes every parameter, buffer and counter (official names), atomically.
pub fn save(params: &Params, path: &Path) -> Result<()> {
    save_with(params, &[], path)
}

/// `save` with string metadata (the model configuration) in the safetensors header.
pub fn save_with(params: &Params, metadata: &[(String, String)], path: &Path) -> Result<()> {
    let values = host_values(params)?;
    let mut t: Vec<(String, Vec<usize>, Data)> =
        values.iter().map(|(n, s, v)| (n.clone(), s.clone(), Data::F32(v))).collect();
    t.extend(params.counters().iter().map(|(n, c)| (n.clone(), vec![], Data::I64(*c))));
    write_tensors(path, &t, metadata)
}

/// The metadata key of the tokenizer.json an exported inference checkpoint carries.
pub const EMBEDDED_TOKENIZER: &str = "tokenizer.json";

/// The largest safetensors header read (the safetensors crate's own limit).
const MAX_HEADER: u64 = 100 << 20;

/// (header length, header JSON) of a safetensors file whose length is `len`.
fn read_header(f: &std::fs::File, len: u64, path: &Path) -> Result<(u64, serde_json::Value)> {
    let mut f = std::io::BufReader::new(f);
    let mut n = [0u8; 8];
    f.read_exact(&mut n).map_err(|_| err(path, "not a valid safetensors file: shorter than its 8-byte header size"))?;
    let n = u64::from_le_bytes(n);
    if n > MAX_HEADER || n > len.saturating_sub(8) {
        return Err(err(path, format!("not a valid safetensors file: header of {n} bytes in a {len}-byte file")));
    }
    let mut header = vec![0u8; n as usize];
    f.read_exact(&mut header).map_err(|e| err(path, format!("cannot read: {e}")))?;
    let v = serde_json::from_slice(&header)
        .map_err(|e| err(path, format!("not a valid safetensors file: header is not JSON: {e}")))?;
    Ok((n, v))
}

/// The metadata a checkpoint was saved with (empty when none). Reads the header only.
pub fn read_metadata(path: &Path) -> Result<std::collections::HashMap<String, String>> {
    let (f, len) = crate::files::open_regular(path, u64::MAX).map_err(|e| err(path, e.to_string()))?;
    let (_, v) = read_header(&f, len, path)?;
    let mut out = std::collections::HashMap::new();
    if let Some(m) = v.get("__metadata__") {
        let m = m.as_object().ok_or_else(|| err(path, "__metadata__ is not an object"))?;
        for (k, v) in m {
            let v = v.as_str().ok_or_else(|| err(path, format!("metadata {k:?} is not a string")))?;
            out.insert(k.clone(), v.to_string());
        }
    }
    Ok(out)
}
