//! Read-only memory maps of checkpoint files, so that inference can use f32 weights where the
//! file holds them (zero-copy loading): no buffer to zero and no copy out of the page cache, which
//! were most of the official preset's 0.2 s of reading (BENCHMARKS.md, "reclmis-infer").
//!
//! The one assumption a map makes: the file is not changed in place while it is mapped. reclmis
//! itself never does that (it writes a new file and renames it over the old one, which leaves a
//! map of the old one intact); another program truncating the file would make the process stop
//! with SIGBUS when it touches a missing page, and one overwriting it in place would change the
//! weights under the model. Pages are mapped read-only, so a write through a mapped tensor would
//! fault rather than reach the file.

use std::sync::Arc;

/// A whole file mapped read-only (unmapped on drop).
pub struct Mapping {
    ptr: *const u8,
    len: usize,
}

// SAFETY: the mapping is read-only and lives until drop; sharing immutable bytes across threads
// is sound.
unsafe impl Send for Mapping {}
unsafe impl Sync for Mapping {}

impl Mapping {
    /// Maps all of `file` (its size now: a longer map would reach past the end). An empty file
    /// maps to nothing (mmap refuses length 0).
    pub(crate) fn new(file: &std::fs::File) -> std::io::Result<Mapping> {
        use std::os::unix::io::AsRawFd;
        let len = usize::try_from(file.metadata()?.len())
            .map_err(|_| std::io::Error::other("the file is larger than the address space"))?;
        if len == 0 {
            return Ok(Mapping { ptr: std::ptr::NonNull::<u8>::dangling().as_ptr(), len: 0 });
        }
        // SAFETY: a fresh private read-only mapping of an open file descriptor; the kernel chooses
        // the address. The module's doc states the one assumption (no in-place change).
        let p =
            unsafe { libc::mmap(std::ptr::null_mut(), len, libc::PROT_READ, libc::MAP_PRIVATE, file.as_raw_fd(), 0) };
        if p == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error());
        }
        Ok(Mapping { ptr: p as *const u8, len })
    }

    pub fn bytes(&self) -> &[u8] {
        // SAFETY: ptr..ptr + len is mapped read-only until drop (or len is 0).
        unsafe { std::slice::from_raw_parts(self.ptr, self.len) }
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        if self.len > 0 {
            // SAFETY: exactly the range mmap returned; nothing borrows it past the Mapping's life.
            unsafe { libc::munmap(self.ptr as *mut libc::c_void, self.len) };
        }
    }
}

/// `len` little-endian f32 at byte `offset` of a mapping: a tensor's storage without a copy.
#[derive(Clone)]
pub struct MappedF32 {
    map: Arc<Mapping>,
    offset: usize,
    len: usize,
}

impl std::fmt::Debug for MappedF32 {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "MappedF32({} values at byte {})", self.len, self.offset)
    }
}

impl PartialEq for MappedF32 {
    fn eq(&self, other: &Self) -> bool {
        self.as_slice() == other.as_slice()
    }
}

impl MappedF32 {
    /// None unless the range lies inside the mapping, starts 4-byte aligned (f32's alignment;
    /// the map itself is page aligned) and the machine is little-endian (the file's order).
    pub(crate) fn new(map: &Arc<Mapping>, offset: usize, len: usize) -> Option<MappedF32> {
        let end = len.checked_mul(4).and_then(|b| b.checked_add(offset))?;
        let ok = cfg!(target_endian = "little") && end <= map.len && offset.is_multiple_of(4);
        ok.then(|| MappedF32 { map: map.clone(), offset, len })
    }

    pub fn as_slice(&self) -> &[f32] {
        // `new` checked the range and the alignment; every bit pattern is an f32.
        bytemuck::cast_slice(&self.map.bytes()[self.offset..self.offset + 4 * self.len])
    }
}
