//! Embedding lookup (the text tower's token embedding): y[..., :] = table[ids[...], :], and its
//! backward, a scatter-add of dy into a dense [V, D] gradient (rows no token uses are zero).
//!
//! An id outside [0, V) is an error naming the token position and the id. The backward is
//! deterministic on every device: each id's row is summed in token order by one owner (no
//! atomics).

/// Its `reclmis bench` cases and `selfcheck` (registered in `bench::registry`).
#[cfg(feature = "cli")]
pub mod bench;
#[cfg(feature = "refs")]
pub mod reference;

use crate::device::{Device, LaunchCfg};
use crate::error::{Error, Result};
use crate::kernels::Kernel;
use crate::ops::check_u32;
use crate::tensor::{DType, Tensor};

crate::kernel_params! {
    struct EmbeddingParams [64] {
        ids: u64,
        table: u64,
        y: u64,
        dy: u64,
        dtable: u64,
        bad: u64,
        n: u32,
        v: u32,
        d: u32,
        pad: u32,
    }
}

const OP: &str = "embedding";

fn bad_id(ids: &[i32], v: usize) -> Option<(usize, i32)> {
    ids.iter().enumerate().find(|(_, &id)| id < 0 || id as usize >= v).map(|(i, &id)| (i, id))
}

fn id_error(pos: usize, id: i32, v: usize) -> Error {
    Error::shape(OP, format!("token {pos} has id {id}, outside the table's {v} rows"))
}

/// ids [...] (i32), table [V, D] -> [..., D]
pub fn embedding(ids: &Tensor, table: &Tensor) -> Result<Tensor> {
    ids.same_device(OP, &[table])?;
    ids.expect_dtype(OP, DType::I32)?;
    table.expect_dtype(OP, DType::F32)?;
    if table.rank() != 2 {
        return Err(Error::shape(OP, format!("table must be [V, D], got {:?}", table.shape())));
    }
    let (v, d) = (table.shape()[0], table.shape()[1]);
    let mut out_shape = ids.shape().to_vec();
    out_shape.push(d);
    let n = ids.numel();
    let dev = ids.device();
    if let Device::Cpu = dev {
        let idv = ids.cpu_i32(OP)?;
        if let Some((pos, id)) = bad_id(idv, v) {
            return Err(id_error(pos, id, v));
        }
        let t = table.cpu_f32(OP)?;
        // rows gathered in parallel, 64 tokens per task, straight into the new output
        const ROWS: usize = 64;
        let y = crate::ops::cpu_math::par_new(n * d, ROWS * d.max(1), |task, out| {
            for (row, &id) in out.chunks_exact_mut(d.max(1)).zip(&idv[task * ROWS..]) {
                for (o, &x) in row.iter_mut().zip(&t[id as usize * d..(id as usize + 1) * d]) {
                    o.write(x);
                }
            }
        });
        return Tensor::from_vec(y, &out_shape, dev);
    }
    let y = Tensor::empty(&out_shape, DType::F32, dev)?;
    let bad = Tensor::from_vec_i32(vec![check_u32(OP, n)? as i32], &[1], dev)?;
    let p = EmbeddingParams {
        ids: ids.dev_ptr(),
        table: table.dev_ptr(),
        y: y.dev_ptr(),
        dy: 0,
        dtable: 0,
        bad: bad.dev_ptr(),
        n: check_u32(OP, n)?,
        v: check_u32(OP, v)?,
        d: check_u32(OP, d)?,
        pad: 0,
    };
    if n * d > 0 {
        // SAFETY: the params hold pointers to live buffers of the sizes this op checked above, for the kernel they were declared for.
        unsafe { dev.launch(Kernel::embedding_fwd_f32, LaunchCfg::elementwise(n * d), &p) }?;
        let first_bad = bad.to_vec_i32()?[0] as usize;
        if first_bad < n {
            let id = ids.to_vec_i32()?[first_bad];
            return Err(id_error(first_bad, id, v));
        }
    }
    Ok(y)
}

/// d table [V, D] from dy [..., D].
pub fn embedding_backward(ids: &Tensor, dy: &Tensor, vocab: usize) -> Result<Tensor> {
    ids.same_device(OP, &[dy])?;
    ids.expect_dtype(OP, DType::I32)?;
    dy.expect_dtype(OP, DType::F32)?;
    let n = ids.numel();
    let d = dy.shape().last().copied().unwrap_or(0);
    if dy.rank() != ids.rank() + 1 || dy.shape()[..ids.rank()] != *ids.shape() {
        return Err(Error::shape(
            OP,
            format!("backward: dy {:?} must be ids' shape {:?} + [D]", dy.shape(), ids.shape()),
        ));
    }
    let dev = ids.device();
    if let Device::Cpu = dev {
        let idv = ids.cpu_i32(OP)?;
        if let Some((pos, id)) = bad_id(idv, vocab) {
            return Err(id_error(pos, id, vocab));
        }
        let g = dy.cpu_f32(OP)?;
        let mut dt = vec![0.0f32; vocab * d];
        // token order, as the kernel sums
        for (tok, &id) in idv.iter().enumerate() {
            for (a, b) in dt[id as usize * d..(id as usize + 1) * d].iter_mut().zip(&g[tok * d..(tok + 1) * d]) {
                *a += b;
            }
        }
        return Tensor::from_vec(dt, &[vocab, d], dev);
    }
    let dt = Tensor::zeros(&[vocab, d], dev)?;
    let p = EmbeddingParams {
        ids: ids.dev_ptr(),
        table: 0,
        y: 0,
        dy: dy.dev_ptr(),
        dtable: dt.dev_ptr(),
        bad: 0,
        n: check_u32(OP, n)?,
        v: check_u32(OP, vocab)?,
        d: check_u32(OP, d)?,
        pad: 0,
    };
    if n > 0 && d > 0 {
        let cfg = LaunchCfg { grid: (check_u32(OP, n)?, 1, 1), block: (128, 1, 1), smem_bytes: 0 };
        // SAFETY: the params hold pointers to live buffers of the sizes this op checked above, for the kernel they were declared for.
        unsafe { dev.launch(Kernel::embedding_bwd_f32, cfg, &p) }?;
    }
    Ok(dt)
}
