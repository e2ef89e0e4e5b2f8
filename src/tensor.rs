//! Tensors: a shape, a dtype, a device and shared storage. Always contiguous (row-major); views that
//! would need strides (permute) are materialised by their op, so kernels see plain buffers.

use crate::device::Device;
use crate::error::{Error, Result};
use std::sync::Arc;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DType {
    F32,
    /// Indices (argmax).
    I32,
    /// bfloat16 (`half::bf16`): f32's exponent range with 8 significant bits (unit roundoff
    /// 2⁻⁸): the storage type of mixed-precision training.
    BF16,
    /// IEEE half (`half::f16`): 11 significant bits, range ±65504.
    F16,
}

impl DType {
    pub fn size(self) -> usize {
        match self {
            DType::F32 | DType::I32 => 4,
            DType::BF16 | DType::F16 => 2,
        }
    }
    /// A floating-point type (every one but I32).
    pub fn is_float(self) -> bool {
        self != DType::I32
    }
    /// The name the command line and safetensors use (`f32`, `bf16`, ...).
    pub fn name(self) -> &'static str {
        match self {
            DType::F32 => "f32",
            DType::I32 => "i32",
            DType::BF16 => "bf16",
            DType::F16 => "f16",
        }
    }
    /// A float dtype by its command-line name.
    pub fn parse_float(s: &str) -> Option<DType> {
        match s.to_ascii_lowercase().as_str() {
            "f32" | "float32" => Some(DType::F32),
            "bf16" | "bfloat16" => Some(DType::BF16),
            "f16" | "float16" | "half" => Some(DType::F16),
            _ => None,
        }
    }
}

impl std::fmt::Display for DType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Host-side data.
#[derive(Clone, Debug)]
pub enum CpuStorage {
    F32(Vec<f32>),
    I32(Vec<i32>),
    BF16(Vec<half::bf16>),
    F16(Vec<half::f16>),
    /// f32 read in place from a memory-mapped checkpoint (read-only: weights for inference).
    MappedF32(crate::mapped::MappedF32),
}

impl CpuStorage {
    pub fn dtype(&self) -> DType {
        match self {
            CpuStorage::F32(_) | CpuStorage::MappedF32(_) => DType::F32,
            CpuStorage::I32(_) => DType::I32,
            CpuStorage::BF16(_) => DType::BF16,
            CpuStorage::F16(_) => DType::F16,
        }
    }
    /// The values of an f32 storage (owned or mapped).
    pub fn as_f32(&self) -> Option<&[f32]> {
        match self {
            CpuStorage::F32(v) => Some(v),
            CpuStorage::MappedF32(m) => Some(m.as_slice()),
            _ => None,
        }
    }

    pub fn as_bytes(&self) -> &[u8] {
        match self {
            CpuStorage::F32(v) => bytemuck::cast_slice(v),
            CpuStorage::I32(v) => bytemuck::cast_slice(v),
            CpuStorage::BF16(v) => bytemuck::cast_slice(v),
            CpuStorage::F16(v) => bytemuck::cast_slice(v),
            CpuStorage::MappedF32(m) => bytemuck::cast_slice(m.as_slice()),
        }
    }
    #[cfg_attr(not(any(feature = "cuda", feature = "emu")), allow(dead_code))]
    fn from_bytes(dtype: DType, bytes: &[u8]) -> CpuStorage {
        // pod_collect_to_vec copies, so the source needs no alignment.
        match dtype {
            DType::F32 => CpuStorage::F32(bytemuck::pod_collect_to_vec(bytes)),
            DType::I32 => CpuStorage::I32(bytemuck::pod_collect_to_vec(bytes)),
            DType::BF16 => CpuStorage::BF16(bytemuck::pod_collect_to_vec(bytes)),
            DType::F16 => CpuStorage::F16(bytemuck::pod_collect_to_vec(bytes)),
        }
    }
}

pub enum Storage {
    Cpu(CpuStorage),
    #[cfg(feature = "cuda")]
    Cuda(cudarc::driver::CudaSlice<u8>),
    #[cfg(feature = "emu")]
    Emu(crate::device::emu::EmuBuffer),
}

impl Storage {
    /// The bytes `device::memory` counts for this buffer (mapped weights are file pages: 0).
    pub(crate) fn counted_bytes(&self) -> u64 {
        match self {
            Storage::Cpu(CpuStorage::MappedF32(_)) => 0,
            Storage::Cpu(c) => c.as_bytes().len() as u64,
            #[cfg(feature = "cuda")]
            Storage::Cuda(s) => s.len() as u64,
            #[cfg(feature = "emu")]
            Storage::Emu(b) => b.bytes().len() as u64,
        }
    }

    fn kind(&self) -> crate::device::DeviceKind {
        use crate::device::DeviceKind;
        match self {
            Storage::Cpu(_) => DeviceKind::Cpu,
            #[cfg(feature = "cuda")]
            Storage::Cuda(_) => DeviceKind::Cuda,
            #[cfg(feature = "emu")]
            Storage::Emu(_) => DeviceKind::Emu,
        }
    }
}

/// Every storage was counted by the device that made it (`Device::alloc` / `upload`).
impl Drop for Storage {
    fn drop(&mut self) {
        crate::device::memory::freed(self.kind(), self.counted_bytes());
    }
}

#[derive(Clone)]
pub struct Tensor {
    shape: Vec<usize>,
    dtype: DType,
    device: Device,
    storage: Arc<Storage>,
}

impl std::fmt::Debug for Tensor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Tensor({:?}, {:?}, {:?})", self.shape, self.dtype, self.device)
    }
}

pub(crate) fn numel(shape: &[usize]) -> usize {
    shape.iter().product()
}

/// The element count of `shape`, or None when it overflows or could not be allocated (more than
/// isize::MAX bytes at 8 bytes an element): shapes like [2⁶², 64] must never be built.
pub fn checked_numel(shape: &[usize]) -> Option<usize> {
    // the nonzero dims too: strides of [0, 2⁶², 2⁶²] overflow although it holds no element
    shape.iter().try_fold(1usize, |n, &d| n.checked_mul(d.max(1))).filter(|&n| n <= isize::MAX as usize / 8)?;
    Some(shape.iter().product())
}

fn numel_checked(op: &'static str, shape: &[usize]) -> Result<usize> {
    checked_numel(shape).ok_or_else(|| Error::shape(op, format!("shape {shape:?} has too many elements")))
}

impl Tensor {
    pub(crate) fn from_storage(storage: Storage, shape: &[usize], dtype: DType, device: &Device) -> Tensor {
        Tensor { shape: shape.to_vec(), dtype, device: device.clone(), storage: Arc::new(storage) }
    }

    pub fn from_vec(data: Vec<f32>, shape: &[usize], device: &Device) -> Result<Tensor> {
        Self::from_cpu(CpuStorage::F32(data), shape, device)
    }

    pub fn from_vec_i32(data: Vec<i32>, shape: &[usize], device: &Device) -> Result<Tensor> {
        Self::from_cpu(CpuStorage::I32(data), shape, device)
    }

    pub fn from_vec_bf16(data: Vec<half::bf16>, shape: &[usize], device: &Device) -> Result<Tensor> {
        Self::from_cpu(CpuStorage::BF16(data), shape, device)
    }

    pub fn from_vec_f16(data: Vec<half::f16>, shape: &[usize], device: &Device) -> Result<Tensor> {
        Self::from_cpu(CpuStorage::F16(data), shape, device)
    }

    /// Host data (owned, or in place in a mapped file) as a tensor on `device` (uploaded, i.e.
    /// copied, on a GPU).
    pub(crate) fn from_cpu(data: CpuStorage, shape: &[usize], device: &Device) -> Result<Tensor> {
        let n = data.as_bytes().len() / data.dtype().size();
        if numel_checked("from_vec", shape)? != n {
            return Err(Error::shape("from_vec", format!("{n} values do not fill shape {shape:?}")));
        }
        let dtype = data.dtype();
        Ok(Self::from_storage(device.upload(data)?, shape, dtype, device))
    }

    pub fn zeros(shape: &[usize], device: &Device) -> Result<Tensor> {
        Self::from_vec(vec![0.0; numel_checked("zeros", shape)?], shape, device)
    }

    /// An output buffer for a kernel (NaN-poisoned under test).
    pub(crate) fn empty(shape: &[usize], dtype: DType, device: &Device) -> Result<Tensor> {
        Ok(Self::from_storage(device.alloc(dtype, numel_checked("empty", shape)?)?, shape, dtype, device))
    }

    pub fn shape(&self) -> &[usize] {
        &self.shape
    }
    pub fn rank(&self) -> usize {
        self.shape.len()
    }
    pub fn numel(&self) -> usize {
        numel(&self.shape)
    }
    pub fn dtype(&self) -> DType {
        self.dtype
    }
    pub fn device(&self) -> &Device {
        &self.device
    }
    /// The shared storage itself (its identity keys caches of derived data, e.g. transformed
    /// convolution weights).
    pub(crate) fn storage_arc(&self) -> &Arc<Storage> {
        &self.storage
    }

    pub fn storage(&self) -> &Storage {
        &self.storage
    }

    /// The same data with another shape of equal size (no copy).
    pub fn reshape(&self, shape: &[usize]) -> Result<Tensor> {
        if checked_numel(shape) != Some(self.numel()) {
            return Err(Error::shape("reshape", format!("{:?} -> {shape:?} changes the size", self.shape)));
        }
        Ok(Tensor { shape: shape.to_vec(), ..self.clone() })
    }

    /// Copies the data to the host.
    pub fn to_cpu_storage(&self) -> Result<CpuStorage> {
        match &*self.storage {
            Storage::Cpu(c) => Ok(c.clone()),
            #[cfg(feature = "cuda")]
            Storage::Cuda(s) => match &self.device {
                // The allocation may be larger than the data (empty tensors get one byte).
                Device::Cuda(d) => {
                    Ok(CpuStorage::from_bytes(self.dtype, &d.download(s)?[..self.numel() * self.dtype.size()]))
                }
                _ => unreachable!("cuda storage always belongs to a cuda device"),
            },
            #[cfg(feature = "emu")]
            Storage::Emu(b) => Ok(CpuStorage::from_bytes(self.dtype, b.bytes())),
        }
    }

    /// The values as f32 (bf16 and f16 widen exactly; i32 is refused).
    pub fn to_vec(&self) -> Result<Vec<f32>> {
        match self.to_cpu_storage()? {
            CpuStorage::F32(v) => Ok(v),
            CpuStorage::MappedF32(m) => Ok(m.as_slice().to_vec()),
            CpuStorage::BF16(v) => Ok(v.iter().map(|x| x.to_f32()).collect()),
            CpuStorage::F16(v) => Ok(v.iter().map(|x| x.to_f32()).collect()),
            CpuStorage::I32(_) => Err(Error::DType { op: "to_vec", expected: DType::F32, got: DType::I32 }),
        }
    }

    pub fn to_vec_i32(&self) -> Result<Vec<i32>> {
        match self.to_cpu_storage()? {
            CpuStorage::I32(v) => Ok(v),
            other => Err(Error::DType { op: "to_vec_i32", expected: DType::I32, got: other.dtype() }),
        }
    }

    pub fn to_vec_bf16(&self) -> Result<Vec<half::bf16>> {
        match self.to_cpu_storage()? {
            CpuStorage::BF16(v) => Ok(v),
            other => Err(Error::DType { op: "to_vec_bf16", expected: DType::BF16, got: other.dtype() }),
        }
    }

    pub fn to_vec_f16(&self) -> Result<Vec<half::f16>> {
        match self.to_cpu_storage()? {
            CpuStorage::F16(v) => Ok(v),
            other => Err(Error::DType { op: "to_vec_f16", expected: DType::F16, got: other.dtype() }),
        }
    }

    pub fn to_device(&self, device: &Device) -> Result<Tensor> {
        if *device == self.device {
            return Ok(self.clone());
        }
        let host = self.to_cpu_storage()?;
        Ok(Self::from_storage(device.upload(host)?, &self.shape, self.dtype, device))
    }

    /// True when no other handle (clone, view or weak reference) shares this tensor's storage:
    /// an op may then write it in place.
    pub(crate) fn is_sole(&self) -> bool {
        Arc::strong_count(&self.storage) == 1 && Arc::weak_count(&self.storage) == 0
    }

    /// The f32 elements of a cpu tensor no other handle shares, to write in place; None
    /// otherwise.
    pub(crate) fn sole_cpu_f32_mut(&mut self) -> Option<&mut [f32]> {
        match Arc::get_mut(&mut self.storage)? {
            Storage::Cpu(CpuStorage::F32(v)) => Some(v.as_mut_slice()),
            #[allow(unreachable_patterns)]
            _ => None,
        }
    }

    /// The bf16 elements of a cpu tensor no other handle shares, to write in place; None
    /// otherwise.
    pub(crate) fn sole_cpu_bf16_mut(&mut self) -> Option<&mut [half::bf16]> {
        match Arc::get_mut(&mut self.storage)? {
            Storage::Cpu(CpuStorage::BF16(v)) => Some(v.as_mut_slice()),
            #[allow(unreachable_patterns)]
            _ => None,
        }
    }

    /// Host f32 slice of a cpu tensor.
    pub(crate) fn cpu_f32(&self, op: &'static str) -> Result<&[f32]> {
        match &*self.storage {
            Storage::Cpu(c) => c.as_f32().ok_or(Error::DType { op, expected: DType::F32, got: c.dtype() }),
            #[allow(unreachable_patterns)]
            _ => Err(Error::Unsupported { op, detail: "expected a cpu tensor".into() }),
        }
    }

    pub(crate) fn cpu_bf16(&self, op: &'static str) -> Result<&[half::bf16]> {
        match &*self.storage {
            Storage::Cpu(CpuStorage::BF16(v)) => Ok(v),
            Storage::Cpu(c) => Err(Error::DType { op, expected: DType::BF16, got: c.dtype() }),
            #[allow(unreachable_patterns)]
            _ => Err(Error::Unsupported { op, detail: "expected a cpu tensor".into() }),
        }
    }

    pub(crate) fn cpu_i32(&self, op: &'static str) -> Result<&[i32]> {
        match &*self.storage {
            Storage::Cpu(CpuStorage::I32(v)) => Ok(v),
            Storage::Cpu(c) => Err(Error::DType { op, expected: DType::I32, got: c.dtype() }),
            #[allow(unreachable_patterns)]
            _ => Err(Error::Unsupported { op, detail: "expected a cpu tensor".into() }),
        }
    }

    /// The device address of the data, for a kernel's params struct (cuda and emu).
    pub fn dev_ptr(&self) -> u64 {
        match &*self.storage {
            Storage::Cpu(c) => c.as_bytes().as_ptr() as u64,
            #[cfg(feature = "cuda")]
            Storage::Cuda(s) => match &self.device {
                Device::Cuda(d) => d.ptr(s),
                _ => unreachable!("cuda storage always belongs to a cuda device"),
            },
            #[cfg(feature = "emu")]
            Storage::Emu(b) => b.ptr(),
        }
    }

    /// Errors unless every tensor is on this one's device.
    pub(crate) fn same_device(&self, op: &'static str, others: &[&Tensor]) -> Result<()> {
        for o in others {
            if o.device != self.device {
                return Err(Error::DeviceMismatch { op, a: self.device.kind(), b: o.device.kind() });
            }
        }
        Ok(())
    }

    /// Errors unless every tensor is f32: what each f32 kernel must check of every operand it
    /// reads or writes (a 2-byte type read as f32 would run past its buffer).
    pub(crate) fn expect_f32(op: &'static str, ts: &[&Tensor]) -> Result<()> {
        ts.iter().try_for_each(|t| t.expect_dtype(op, DType::F32))
    }

    pub(crate) fn expect_dtype(&self, op: &'static str, dtype: DType) -> Result<()> {
        if self.dtype != dtype {
            return Err(Error::DType { op, expected: dtype, got: self.dtype });
        }
        Ok(())
    }
}
