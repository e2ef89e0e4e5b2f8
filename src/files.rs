//! Files as users' data deserve: atomic and durable writes (a unique temporary beside the target,
//! fsync, rename, fsync of the folder, so a kill or a full disk leaves either the old file or the
//! new one, never a truncated one), bounded reads that refuse FIFOs and devices (which would
//! hang or read forever), and a stable content hash (FNV-1a, the same on every machine and Rust
//! version, unlike `std`'s SipHash with random keys).

use crate::error::{Error, Result};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

fn io_err(path: &Path, what: &str, e: impl std::fmt::Display) -> Error {
    Error::Data { path: path.display().to_string(), detail: format!("{what}: {e}") }
}

/// Temporaries are named `.<file>.tmp-<pid>-<n>` so that two writers never share one and a
/// crashed run's leftovers are recognisable ([`remove_orphaned_temporaries`]).
const TMP_TAG: &str = ".tmp-";

fn temporary_for(path: &Path) -> PathBuf {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    path.with_file_name(format!(".{name}{TMP_TAG}{}-{n}", std::process::id()))
}

/// Writes `path` atomically and durably with what `fill` writes into the file.
pub fn write_atomic_with(path: &Path, fill: impl FnOnce(&mut dyn Write) -> std::io::Result<()>) -> Result<()> {
    let tmp = temporary_for(path);
    let result = (|| -> Result<()> {
        let f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&tmp)
            .map_err(|e| io_err(path, "cannot create a temporary beside it", e))?;
        let mut w = std::io::BufWriter::with_capacity(1 << 20, f);
        fill(&mut w).map_err(|e| io_err(path, "cannot write", e))?;
        let f = w.into_inner().map_err(|e| io_err(path, "cannot write", e.error()))?;
        f.sync_all().map_err(|e| io_err(path, "cannot flush to disk", e))?;
        drop(f);
        std::fs::rename(&tmp, path).map_err(|e| io_err(path, "cannot rename into place", e))?;
        sync_folder(path)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// `write_atomic_with` for bytes already in memory.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    write_atomic_with(path, |w| w.write_all(bytes))
}

/// fsync of the folder holding `path`, so that a rename into it survives a power loss.
fn sync_folder(path: &Path) -> Result<()> {
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let d = std::fs::File::open(dir).map_err(|e| io_err(dir, "cannot open the folder to sync it", e))?;
    d.sync_all().map_err(|e| io_err(dir, "cannot sync the folder", e))
}

/// Removes the temporaries a killed writer left in `dir` (only names [`write_atomic`] makes:
/// `.<name>.tmp-<pid>-<n>`). Returns how many were removed.
pub fn remove_orphaned_temporaries(dir: &Path) -> Result<usize> {
    let mut n = 0;
    let entries = std::fs::read_dir(dir).map_err(|e| io_err(dir, "cannot list", e))?;
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if is_temporary_name(&name) && e.file_type().map(|t| t.is_file()).unwrap_or(false) {
            std::fs::remove_file(e.path()).map_err(|err| io_err(&e.path(), "cannot remove a stale temporary", err))?;
            n += 1;
        }
    }
    Ok(n)
}

fn is_temporary_name(name: &str) -> bool {
    let Some(rest) = name.strip_prefix('.') else { return false };
    let Some(pos) = rest.rfind(TMP_TAG) else { return false };
    let tail = &rest[pos + TMP_TAG.len()..];
    let mut parts = tail.split('-');
    matches!((parts.next(), parts.next(), parts.next()), (Some(a), Some(b), None)
        if !a.is_empty() && !b.is_empty() && a.bytes().all(|c| c.is_ascii_digit()) && b.bytes().all(|c| c.is_ascii_digit()))
}

/// Opens a file for reading after checking that it is a regular file (a FIFO would block and a
/// device such as /dev/zero would never end) of at most `max_bytes`.
pub fn open_regular(path: &Path, max_bytes: u64) -> Result<(std::fs::File, u64)> {
    let meta = std::fs::metadata(path).map_err(|e| io_err(path, "cannot read", e))?;
    if !meta.is_file() {
        return Err(Error::Data {
            path: path.display().to_string(),
            detail: "not a regular file (a folder, FIFO or device cannot be read as data)".into(),
        });
    }
    if meta.len() > max_bytes {
        return Err(Error::Data {
            path: path.display().to_string(),
            detail: format!("is {} bytes, more than the limit of {max_bytes}", meta.len()),
        });
    }
    let f = std::fs::File::open(path).map_err(|e| io_err(path, "cannot open", e))?;
    Ok((f, meta.len()))
}

/// Reads a regular file of at most `max_bytes` (see [`open_regular`]).
pub fn read_regular(path: &Path, max_bytes: u64) -> Result<Vec<u8>> {
    let (f, len) = open_regular(path, max_bytes)?;
    let mut out = Vec::with_capacity(len as usize);
    // `take` bounds the read even if the file grows while it is read
    f.take(max_bytes.saturating_add(1)).read_to_end(&mut out).map_err(|e| io_err(path, "cannot read", e))?;
    if out.len() as u64 > max_bytes {
        return Err(Error::Data {
            path: path.display().to_string(),
            detail: "grew past the size limit while read".into(),
        });
    }
    Ok(out)
}

/// 64-bit FNV-1a: a stable fingerprint (not a cryptographic hash) of files and data.
#[derive(Clone, Copy, Debug)]
pub struct Fnv64(u64);

impl Default for Fnv64 {
    fn default() -> Self {
        Fnv64(0xcbf2_9ce4_8422_2325)
    }
}

impl Fnv64 {
    pub fn update(&mut self, bytes: &[u8]) -> &mut Self {
        for &b in bytes {
            self.0 ^= b as u64;
            self.0 = self.0.wrapping_mul(0x0100_0000_01b3);
        }
        self
    }
    /// Hashes a length first, so that ("ab", "c") and ("a", "bc") differ.
    pub fn field(&mut self, bytes: &[u8]) -> &mut Self {
        self.update(&(bytes.len() as u64).to_le_bytes()).update(bytes)
    }
    pub fn finish(&self) -> u64 {
        self.0
    }
    pub fn hex(&self) -> String {
        format!("{:016x}", self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn temporaries_are_recognised_and_nothing_else() {
        let t = temporary_for(Path::new("/x/last.safetensors"));
        assert!(is_temporary_name(&t.file_name().unwrap().to_string_lossy()));
        for other in ["last.safetensors", ".hidden", ".a.tmp-", ".a.tmp-1", ".a.tmp-x-1", "a.tmp-1-2", ".a.tmp-1-2-3"] {
            assert!(!is_temporary_name(other), "{other}");
        }
    }

    #[test]
    fn fnv_is_the_published_function() {
        // FNV-1a 64 test vectors (Fowler, Noll, Vo)
        assert_eq!(Fnv64::default().update(b"").finish(), 0xcbf29ce484222325);
        assert_eq!(Fnv64::default().update(b"a").finish(), 0xaf63dc4c8601ec8c);
        assert_eq!(Fnv64::default().update(b"foobar").finish(), 0x85944171f73967e8);
    }
}
