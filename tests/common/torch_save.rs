//! Writes small checkpoints in the format of PyTorch's `torch.save` (zip archive, protocol-2
//! pickle with `_rebuild_tensor_v2` and persistent storage ids, raw little-endian storages), so
//! that the `.pth` reader is tested on dtypes, strides and shared storages the official fixture
//! does not have, and fuzzed from a small seed.

use std::io::Write;

pub struct Storage {
    /// `FloatStorage`, `HalfStorage`, `LongStorage`, ...
    pub class: &'static str,
    pub bytes: Vec<u8>,
    pub numel: usize,
}

pub struct Entry {
    pub name: String,
    /// index into the storages
    pub storage: usize,
    pub offset: usize,
    pub size: Vec<usize>,
    pub stride: Vec<usize>,
}

fn s(out: &mut Vec<u8>, v: &str) {
    out.push(b'X');
    out.extend((v.len() as u32).to_le_bytes());
    out.extend(v.as_bytes());
}

fn int(out: &mut Vec<u8>, v: usize) {
    out.push(b'J');
    out.extend((v as i32).to_le_bytes());
}

fn global(out: &mut Vec<u8>, module: &str, name: &str) {
    out.push(b'c');
    out.extend(format!("{module}\n{name}\n").as_bytes());
}

fn tuple(out: &mut Vec<u8>, v: &[usize]) {
    out.push(b'(');
    for &x in v {
        int(out, x);
    }
    out.push(b't');
}

/// The pickle of `{'epoch': 3, 'state_dict': OrderedDict(entries)}`, as torch.save writes it
/// (without memo opcodes, which the reader treats as optional).
pub fn pickle(storages: &[Storage], entries: &[Entry]) -> Vec<u8> {
    let mut p = vec![0x80, 2, b'}', b'('];
    s(&mut p, "epoch");
    int(&mut p, 3);
    s(&mut p, "state_dict");
    global(&mut p, "collections", "OrderedDict");
    p.extend([b')', b'R', b'(']);
    for e in entries {
        s(&mut p, &e.name);
        global(&mut p, "torch._utils", "_rebuild_tensor_v2");
        p.extend([b'(', b'(']);
        s(&mut p, "storage");
        global(&mut p, "torch", storages[e.storage].class);
        s(&mut p, &e.storage.to_string());
        s(&mut p, "cpu");
        int(&mut p, storages[e.storage].numel);
        p.extend([b't', b'Q']);
        int(&mut p, e.offset);
        tuple(&mut p, &e.size);
        tuple(&mut p, &e.stride);
        p.push(0x89);
        global(&mut p, "collections", "OrderedDict");
        p.extend([b')', b'R', b't', b'R']);
    }
    p.extend([b'u', b'u', b'.']);
    p
}

/// A zip archive `archive/{data.pkl, data/<i>, version, byteorder}` with the given pickle.
pub fn archive(pickle: &[u8], storages: &[Storage]) -> Vec<u8> {
    let mut z = zip::ZipWriter::new(std::io::Cursor::new(Vec::new()));
    let opts = zip::write::SimpleFileOptions::default().compression_method(zip::CompressionMethod::Stored);
    z.start_file("archive/data.pkl", opts).unwrap();
    z.write_all(pickle).unwrap();
    z.start_file("archive/byteorder", opts).unwrap();
    z.write_all(b"little").unwrap();
    for (i, st) in storages.iter().enumerate() {
        z.start_file(format!("archive/data/{i}"), opts).unwrap();
        z.write_all(&st.bytes).unwrap();
    }
    z.start_file("archive/version", opts).unwrap();
    z.write_all(b"3\n").unwrap();
    z.finish().unwrap().into_inner()
}

pub fn f32_storage(v: &[f32]) -> Storage {
    Storage { class: "FloatStorage", bytes: v.iter().flat_map(|x| x.to_le_bytes()).collect(), numel: v.len() }
}

/// A contiguous tensor over a whole storage.
pub fn entry(name: &str, storage: usize, size: &[usize]) -> Entry {
    let mut stride = vec![1; size.len()];
    for d in (0..size.len().saturating_sub(1)).rev() {
        stride[d] = stride[d + 1] * size[d + 1];
    }
    Entry { name: name.into(), storage, offset: 0, size: size.to_vec(), stride }
}
