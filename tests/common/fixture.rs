//! Reading the golden fixture: RECLMIS_FIXTURES when set, else the repository's copy under
//! tests/fixtures. Every tensor comes back as f64 with its shape, whatever its stored dtype.

use safetensors::{Dtype, SafeTensors};
use std::path::PathBuf;

pub fn root() -> PathBuf {
    std::env::var_os("RECLMIS_FIXTURES")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures"))
}

pub struct Fixture {
    bytes: Vec<u8>,
}

impl Fixture {
    pub fn open(name: &str) -> Fixture {
        let path = root().join(name).join("fixture.safetensors");
        let bytes = std::fs::read(&path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
        Fixture { bytes }
    }

    /// Any safetensors file of a fixture folder (e.g. hf_clip_tiny/case.safetensors).
    pub fn open_file(path: &std::path::Path) -> Fixture {
        let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
        Fixture { bytes }
    }

    /// The whole safetensors file (to load weights from).
    pub fn bytes(&self) -> &[u8] {
        &self.bytes
    }

    /// How many tensors have names starting with `prefix`.
    pub fn count_prefix(&self, prefix: &str) -> usize {
        let st = SafeTensors::deserialize(&self.bytes).expect("a valid safetensors file");
        st.names().iter().filter(|n| n.starts_with(prefix)).count()
    }

    /// (shape, values as f64)
    pub fn get(&self, key: &str) -> (Vec<usize>, Vec<f64>) {
        let st = SafeTensors::deserialize(&self.bytes).expect("a valid safetensors file");
        let t = st.tensor(key).unwrap_or_else(|e| panic!("fixture has no {key}: {e}"));
        let d = t.data();
        let v: Vec<f64> = match t.dtype() {
            Dtype::F64 => d.chunks_exact(8).map(|c| f64::from_le_bytes(c.try_into().unwrap())).collect(),
            Dtype::F32 => d.chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap()) as f64).collect(),
            Dtype::I64 => d.chunks_exact(8).map(|c| i64::from_le_bytes(c.try_into().unwrap()) as f64).collect(),
            other => panic!("{key}: unexpected dtype {other:?}"),
        };
        (t.shape().to_vec(), v)
    }

    pub fn f32(&self, key: &str) -> (Vec<usize>, Vec<f32>) {
        let (s, v) = self.get(key);
        (s, v.iter().map(|&x| x as f32).collect())
    }

    pub fn scalar(&self, key: &str) -> f64 {
        self.get(key).1[0]
    }
}
