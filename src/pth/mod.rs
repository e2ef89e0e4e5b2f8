//! Checkpoints written by PyTorch's `torch.save` (the official RecLMIS training writes
//! `{'epoch', 'best_model', 'model', 'state_dict', 'val_loss', 'optimizer'}`): a zip archive with
//! `<name>/data.pkl` (the object graph) and `<name>/data/<key>` (raw little-endian storages).
//! Read without Python and without executing pickled code (see `pickle`); the `state_dict` comes
//! back as named f32 / i64 tensors. Every malformed input is an error naming the file.

pub mod pickle;

pub use crate::checkpoint::Values;
use crate::error::{Error, Result};
use pickle::{Pickle, StorageDtype, TensorRef, Value};
use std::collections::HashMap;
use std::io::Read;
use std::path::Path;

#[derive(Clone, Debug)]
pub struct NamedTensor {
    pub name: String,
    pub shape: Vec<usize>,
    pub values: Values,
}

#[derive(Debug)]
pub struct StateDict {
    pub tensors: Vec<NamedTensor>,
    /// Which top-level entry held them (`state_dict`, ...) or `(root)`.
    pub found_under: String,
    /// The top-level keys beside the state dict (epoch, optimizer, ...), for the report.
    pub other_keys: Vec<String>,
}

fn err(path: &Path, detail: impl Into<String>) -> Error {
    Error::Checkpoint { path: path.display().to_string(), detail: detail.into() }
}

/// Whether the file starts like a zip archive (what `torch.save` writes since PyTorch 1.6).
pub fn looks_like_pth(path: &Path) -> bool {
    let mut magic = [0u8; 4];
    std::fs::File::open(path).and_then(|mut f| f.read_exact(&mut magic)).is_ok() && &magic == b"PK\x03\x04"
}

/// Reads the `state_dict` of a `torch.save` checkpoint.
pub fn read_state_dict(path: &Path) -> Result<StateDict> {
    let (file, _) = crate::files::open_regular(path, u64::MAX).map_err(|e| err(path, e.to_string()))?;
    let mut head = [0u8; 4];
    let mut r = std::io::BufReader::new(file);
    r.read_exact(&mut head).map_err(|_| err(path, "too short to be a torch.save checkpoint"))?;
    if &head != b"PK\x03\x04" {
        let hint = if head[0] == 0x80 {
            " (a legacy torch.save file from PyTorch < 1.6: load and save it again with a recent PyTorch)"
        } else {
            ""
        };
        return Err(err(path, format!("not a torch.save checkpoint (no zip archive){hint}")));
    }
    let file = r.into_inner();
    let mut zip = zip::ZipArchive::new(file).map_err(|e| err(path, format!("not a valid zip archive: {e}")))?;
    // `<archive name>/data.pkl`: torch names the folder after the file it first saved to
    let pkl = zip
        .file_names()
        .filter(|n| n.ends_with("/data.pkl") && n.matches('/').count() == 1)
        .map(str::to_string)
        .next()
        .ok_or_else(|| err(path, "no <name>/data.pkl in the archive: not a torch.save checkpoint"))?;
    let prefix = pkl.trim_end_matches("data.pkl").to_string();
    let data = read_entry(&mut zip, &pkl, path, None)?;
    let p = pickle::read(&data).map_err(|e| err(path, format!("{pkl}: {e}")))?;
    let (dict, found_under, other_keys) = locate_state_dict(&p).map_err(|d| err(path, d))?;
    let mut storages: HashMap<String, Vec<u8>> = HashMap::new();
    let mut tensors = Vec::new();
    let Value::Dict(items) = p.get(dict) else { unreachable!("locate_state_dict returns a dict") };
    for &(k, v) in items {
        let Some(name) = p.str(k) else {
            return Err(err(path, "a state_dict key is not a string"));
        };
        let Value::Tensor(t) = p.get(v) else {
            // torch keeps `_metadata` as an attribute, not an item; anything else is not a weight
            return Err(err(path, format!("state_dict entry {name} is not a tensor")));
        };
        let bytes = t
            .storage_len
            .checked_mul(t.dtype.size())
            .ok_or_else(|| err(path, format!("{name}: storage of {} elements overflows", t.storage_len)))?;
        if !storages.contains_key(&t.key) {
            let entry = format!("{prefix}data/{}", t.key);
            let b = read_entry(&mut zip, &entry, path, Some(bytes))?;
            storages.insert(t.key.clone(), b);
        }
        // a storage shared by several tensors must be described the same way by each of them
        if storages[&t.key].len() != bytes {
            return Err(err(
                path,
                format!(
                    "{name}: storage {} is {} bytes, but this tensor describes it as {} {:?} elements",
                    t.key,
                    storages[&t.key].len(),
                    t.storage_len,
                    t.dtype
                ),
            ));
        }
        let shape = t.size.clone();
        let values = gather(t, &storages[&t.key]).map_err(|d| err(path, format!("{name}: {d}")))?;
        tensors.push(NamedTensor { name: name.to_string(), shape, values });
    }
    Ok(StateDict { tensors, found_under, other_keys })
}

/// One archive entry; `expect` = the byte count the pickle promised for it.
fn read_entry(
    zip: &mut zip::ZipArchive<std::fs::File>,
    name: &str,
    path: &Path,
    expect: Option<usize>,
) -> Result<Vec<u8>> {
    let mut f = zip.by_name(name).map_err(|e| err(path, format!("{name}: {e}")))?;
    if f.compression() != zip::CompressionMethod::Stored {
        // torch.save stores entries uncompressed; a compressed one could inflate without bound
        return Err(err(path, format!("{name} is compressed ({}); torch.save never does that", f.compression())));
    }
    let size = f.size();
    if let Some(n) = expect {
        if size != n as u64 {
            return Err(err(path, format!("{name} holds {size} bytes, its tensor needs {n}")));
        }
    }
    let mut out = Vec::new();
    out.try_reserve_exact(size as usize).map_err(|_| err(path, format!("{name}: cannot allocate {size} bytes")))?;
    f.by_ref().take(size).read_to_end(&mut out).map_err(|e| err(path, format!("{name}: {e}")))?;
    if out.len() as u64 != size {
        return Err(err(path, format!("{name}: truncated ({} of {size} bytes)", out.len())));
    }
    Ok(out)
}

/// The dict of tensors: `state_dict` (the official checkpoints), another usual key, or the root
/// itself when it is a plain state dict.
fn locate_state_dict(p: &Pickle) -> std::result::Result<(usize, String, Vec<String>), String> {
    let Value::Dict(root) = p.get(p.root) else {
        return Err("the pickled object is not a dict".into());
    };
    let is_tensor_dict = |id: usize| match p.get(id) {
        Value::Dict(items) => !items.is_empty() && items.iter().all(|&(_, v)| matches!(p.get(v), Value::Tensor(_))),
        _ => false,
    };
    let keys: Vec<String> = root.iter().map(|&(k, _)| p.str(k).unwrap_or("?").to_string()).collect();
    for want in ["state_dict", "model_state_dict", "model", "net", "state"] {
        if let Some(&(_, v)) = root.iter().find(|&&(k, _)| p.str(k) == Some(want)) {
            if is_tensor_dict(v) {
                let others = keys.iter().filter(|k| *k != want).cloned().collect();
                return Ok((v, want.to_string(), others));
            }
        }
    }
    if is_tensor_dict(p.root) {
        return Ok((p.root, "(root)".into(), vec![]));
    }
    Err(format!("no state_dict of tensors in it (top-level keys: {})", keys.join(", ")))
}

/// The elements of a strided view, row-major, converted for loading.
fn gather(t: &TensorRef, storage: &[u8]) -> std::result::Result<Values, String> {
    let numel = crate::tensor::checked_numel(&t.size).ok_or_else(|| format!("shape {:?} overflows", t.size))?;
    if numel > 0 {
        let mut last = t.offset;
        for (&s, &st) in t.size.iter().zip(&t.stride) {
            last = (s - 1).checked_mul(st).and_then(|x| x.checked_add(last)).ok_or("view overflows")?;
        }
        if last >= t.storage_len {
            return Err(format!(
                "view (offset {}, size {:?}, stride {:?}) reaches element {last} of a {}-element storage",
                t.offset, t.size, t.stride, t.storage_len
            ));
        }
    }
    let es = t.dtype.size();
    // element indices in row-major order of the view
    let mut idx = Vec::new();
    idx.try_reserve_exact(numel).map_err(|_| format!("cannot allocate {numel} elements"))?;
    let mut pos = vec![0usize; t.size.len()];
    for _ in 0..numel {
        idx.push(t.offset + pos.iter().zip(&t.stride).map(|(p, s)| p * s).sum::<usize>());
        for d in (0..pos.len()).rev() {
            pos[d] += 1;
            if pos[d] < t.size[d] {
                break;
            }
            pos[d] = 0;
        }
    }
    let at = |i: usize| &storage[i * es..(i + 1) * es];
    Ok(match t.dtype {
        StorageDtype::F32 => Values::F32(idx.iter().map(|&i| f32::from_le_bytes(at(i).try_into().unwrap())).collect()),
        StorageDtype::F64 => {
            Values::F32(idx.iter().map(|&i| f64::from_le_bytes(at(i).try_into().unwrap()) as f32).collect())
        }
        StorageDtype::F16 => {
            Values::F32(idx.iter().map(|&i| half::f16::from_le_bytes(at(i).try_into().unwrap()).to_f32()).collect())
        }
        StorageDtype::BF16 => {
            Values::F32(idx.iter().map(|&i| half::bf16::from_le_bytes(at(i).try_into().unwrap()).to_f32()).collect())
        }
        StorageDtype::I64 => Values::I64(idx.iter().map(|&i| i64::from_le_bytes(at(i).try_into().unwrap())).collect()),
        other => Values::Other(format!("{other:?}")),
    })
}
