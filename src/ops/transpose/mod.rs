//! Permutations of dims, materialised (tensors are always contiguous). Dims that stay adjacent
//! are merged first; a swap of the last two merged dims uses the tiled transpose kernel, anything
//! else the gather kernel. The backward of `permute(x, p)` is `permute(dy, inverse(p))`.

/// Its `reclmis bench` cases and `selfcheck` (registered in `bench::registry`).
#[cfg(feature = "cli")]
pub mod bench;
pub mod cpu;
#[cfg(feature = "refs")]
pub mod reference;

use crate::device::{Device, LaunchCfg};
use crate::error::{Error, Result};
use crate::kernels::Kernel;
use crate::ops::{check_u32, contiguous_strides, MAX_RANK};
use crate::tensor::{DType, Tensor};

crate::kernel_params! {
    struct TransposeParams [32] {
        x: u64,
        y: u64,
        batch: u32,
        rows: u32,
        cols: u32,
        pad: u32,
    }
}

crate::kernel_params! {
    struct PermuteParams [80] {
        x: u64,
        y: u64,
        n: u64,
        rank: u32,
        pad: u32,
        out_shape: [u32; MAX_RANK],
        in_strides: [u32; MAX_RANK],
    }
}

/// Merges input dims that stay adjacent and in order under `perm` (size-1 dims dropped).
/// Returns (merged input shape, merged permutation).
pub fn simplify(shape: &[usize], perm: &[usize]) -> (Vec<usize>, Vec<usize>) {
    // Output-order list of input dims, without size-1 dims, renumbered among the kept dims so
    // that dims separated only by a size-1 dim count as adjacent.
    let rank_of = |d: usize| (0..d).filter(|&e| shape[e] != 1).count();
    let kept_dims: Vec<usize> = (0..shape.len()).filter(|&d| shape[d] != 1).collect();
    let compact: Vec<usize> = kept_dims.iter().map(|&d| shape[d]).collect();
    let kept: Vec<usize> = perm.iter().copied().filter(|&d| kept_dims.contains(&d)).map(rank_of).collect();
    // Group runs d, d+1, ... that appear consecutively in the output.
    let mut groups: Vec<Vec<usize>> = Vec::new();
    for &d in &kept {
        match groups.last_mut() {
            Some(g) if *g.last().unwrap() + 1 == d => g.push(d),
            _ => groups.push(vec![d]),
        }
    }
    // Order groups by their first input dim to get the merged input shape.
    let mut by_input: Vec<usize> = (0..groups.len()).collect();
    by_input.sort_by_key(|&g| groups[g][0]);
    let in_shape: Vec<usize> = by_input.iter().map(|&g| groups[g].iter().map(|&d| compact[d]).product()).collect();
    let mut new_perm = vec![0; groups.len()];
    for (pos_out, g) in (0..groups.len()).enumerate() {
        new_perm[pos_out] = by_input.iter().position(|&x| x == g).unwrap();
    }
    (in_shape, new_perm)
}

pub fn inverse(perm: &[usize]) -> Vec<usize> {
    let mut inv = vec![0; perm.len()];
    for (i, &p) in perm.iter().enumerate() {
        inv[p] = i;
    }
    inv
}

fn check_perm(perm: &[usize], rank: usize) -> Result<()> {
    let mut seen = vec![false; rank];
    if perm.len() != rank || perm.iter().any(|&p| p >= rank || std::mem::replace(&mut seen[p], true)) {
        return Err(Error::shape("permute", format!("{perm:?} is not a permutation of {rank} dims")));
    }
    Ok(())
}

pub fn permute(x: &Tensor, perm: &[usize]) -> Result<Tensor> {
    x.expect_dtype("permute", DType::F32)?;
    check_perm(perm, x.rank())?;
    let out_shape: Vec<usize> = perm.iter().map(|&p| x.shape()[p]).collect();
    let (ms, mp) = simplify(x.shape(), perm);
    if mp.iter().enumerate().all(|(i, &p)| i == p) {
        return x.reshape(&out_shape); // the data order does not change
    }
    let dev = x.device();
    if let Device::Cpu = dev {
        return Tensor::from_vec(cpu::permute(x.cpu_f32("permute")?, &ms, &mp), &out_shape, dev);
    }
    let y = Tensor::empty(&out_shape, DType::F32, dev)?;
    let r = mp.len();
    if mp[..r - 2].iter().enumerate().all(|(i, &p)| i == p) && mp[r - 2] == r - 1 && mp[r - 1] == r - 2 {
        let (rows, cols) = (ms[r - 2], ms[r - 1]);
        let batch: usize = ms[..r - 2].iter().product();
        if batch > 65535 {
            return Err(Error::Unsupported {
                op: "permute",
                detail: format!("batch {batch} exceeds a grid's z range"),
            });
        }
        let p = TransposeParams {
            x: x.dev_ptr(),
            y: y.dev_ptr(),
            batch: batch as u32,
            rows: check_u32("permute", rows)?,
            cols: check_u32("permute", cols)?,
            pad: 0,
        };
        let cfg = LaunchCfg {
            grid: ((cols as u32).div_ceil(32), (rows as u32).div_ceil(32), batch as u32),
            block: (32, 8, 1),
            smem_bytes: 0,
        };
        // SAFETY: the params hold pointers to live buffers of the sizes this op checked above, for the kernel they were declared for.
        unsafe { dev.launch(Kernel::transpose_fwd_f32, cfg, &p) }?;
        return Ok(y);
    }
    if r > MAX_RANK {
        return Err(Error::Unsupported { op: "permute", detail: format!("{r} dims after merging (max {MAX_RANK})") });
    }
    let st = contiguous_strides(&ms);
    let mut p = PermuteParams {
        x: x.dev_ptr(),
        y: y.dev_ptr(),
        n: x.numel() as u64,
        rank: r as u32,
        pad: 0,
        out_shape: [1; MAX_RANK],
        in_strides: [0; MAX_RANK],
    };
    for i in 0..r {
        p.out_shape[i] = check_u32("permute", ms[mp[i]])?;
        p.in_strides[i] = check_u32("permute", st[mp[i]])?;
    }
    // SAFETY: the params hold pointers to live buffers of the sizes this op checked above, for the kernel they were declared for.
    unsafe { dev.launch(Kernel::permute_fwd_f32, LaunchCfg::elementwise(x.numel()), &p) }?;
    Ok(y)
}

/// Swaps two dims.
pub fn transpose(x: &Tensor, d0: usize, d1: usize) -> Result<Tensor> {
    let mut perm: Vec<usize> = (0..x.rank()).collect();
    if d0 >= x.rank() || d1 >= x.rank() {
        return Err(Error::shape("transpose", format!("dims {d0}, {d1} for rank {}", x.rank())));
    }
    perm.swap(d0, d1);
    permute(x, &perm)
}

pub fn permute_backward(dy: &Tensor, perm: &[usize]) -> Result<Tensor> {
    permute(dy, &inverse(perm))
}

crate::kernel_params! {
    struct NarrowParams [48] {
        x: u64,
        y: u64,
        n: u64,
        n_in: u32,
        n_out: u32,
        inner: u32,
        start: u32,
        pad: u32,
        reserved: u32,
    }
}

/// (outer, dim, inner) of a shape split at `axis`.
fn split(shape: &[usize], axis: usize) -> (usize, usize, usize) {
    (shape[..axis].iter().product(), shape[axis], shape[axis + 1..].iter().product())
}

fn launch_narrow(
    x: &Tensor,
    y: &Tensor,
    (n_in, n_out, inner, start): (usize, usize, usize, usize),
    pad: bool,
) -> Result<()> {
    let op = "narrow";
    let p = NarrowParams {
        x: x.dev_ptr(),
        y: y.dev_ptr(),
        n: y.numel() as u64,
        n_in: check_u32(op, n_in)?,
        n_out: check_u32(op, n_out)?,
        inner: check_u32(op, inner)?,
        start: check_u32(op, start)?,
        pad: pad as u32,
        reserved: 0,
    };
    if y.numel() > 0 {
        // SAFETY: the params hold pointers to live buffers of the sizes this op checked above, for the kernel they were declared for.
        unsafe { x.device().launch(Kernel::narrow_fwd_f32, LaunchCfg::elementwise(y.numel()), &p) }?;
    }
    Ok(())
}

/// Elements start..start+len of dim `axis` (a copy; tensors are contiguous).
pub fn narrow(x: &Tensor, axis: usize, start: usize, len: usize) -> Result<Tensor> {
    let op = "narrow";
    x.expect_dtype(op, DType::F32)?;
    if axis >= x.rank() || start + len > x.shape()[axis] {
        return Err(Error::shape(op, format!("{start}..{} of dim {axis} of {:?}", start + len, x.shape())));
    }
    let (outer, n, inner) = split(x.shape(), axis);
    let mut out_shape = x.shape().to_vec();
    out_shape[axis] = len;
    let dev = x.device();
    if let Device::Cpu = dev {
        return Tensor::from_vec(cpu::narrow(x.cpu_f32(op)?, (outer, n, inner), start, len), &out_shape, dev);
    }
    let y = Tensor::empty(&out_shape, DType::F32, dev)?;
    launch_narrow(x, &y, (n, len, inner, start), false)?;
    Ok(y)
}

/// The gradient of `narrow`: dy placed at start.. of dim `axis` of a zero tensor of `in_shape`.
pub fn narrow_backward(dy: &Tensor, in_shape: &[usize], axis: usize, start: usize) -> Result<Tensor> {
    let op = "narrow_backward";
    dy.expect_dtype(op, DType::F32)?;
    let ok = axis < in_shape.len()
        && dy.rank() == in_shape.len()
        && (0..in_shape.len()).all(|d| d == axis || dy.shape()[d] == in_shape[d])
        && start + dy.shape()[axis] <= in_shape[axis];
    if !ok {
        return Err(Error::shape(
            op,
            format!("dy {:?} at {start} of dim {axis} does not fit {in_shape:?}", dy.shape()),
        ));
    }
    let (outer, n, inner) = split(in_shape, axis);
    let len = dy.shape()[axis];
    let dev = dy.device();
    if let Device::Cpu = dev {
        return Tensor::from_vec(cpu::narrow_backward(dy.cpu_f32(op)?, (outer, n, inner), start, len), in_shape, dev);
    }
    let dx = Tensor::empty(in_shape, DType::F32, dev)?;
    launch_narrow(dy, &dx, (len, n, inner, start), true)?;
    Ok(dx)
}
