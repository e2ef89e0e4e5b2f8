//! The Linear layer as torch.nn.Linear stores it: y = x·wᵀ + b with x [..., K], w [N, K],
//! b [N]; y [..., N]. The bias is added in the GEMM's store (cuda/emu) or as C's starting value
//! (cpu), so it costs no pass of its own. The backward: dx = dy·w, dw = dyᵀ·x over all rows,
//! db = Σ_rows dy.

use super::{cpu, launch, matmul, plan, GemmAlgo, GemmOpts};
use crate::device::Device;
use crate::error::{Error, Result};
use crate::ops::reduce;
use crate::tensor::{DType, Tensor};

const OP: &str = "linear";

/// (rows, K, N) after checking the shapes.
fn dims(x: &Tensor, w: &Tensor, bias: Option<&Tensor>) -> Result<(usize, usize, usize)> {
    x.expect_dtype(OP, DType::F32)?;
    w.expect_dtype(OP, DType::F32)?;
    x.same_device(OP, &[w])?;
    if x.rank() == 0 || w.rank() != 2 || x.shape()[x.rank() - 1] != w.shape()[1] {
        return Err(Error::shape(
            OP,
            format!("x {:?} must be [..., K] and w [N, K], got w {:?}", x.shape(), w.shape()),
        ));
    }
    let (n, k) = (w.shape()[0], w.shape()[1]);
    if let Some(b) = bias {
        x.same_device(OP, &[b])?;
        b.expect_dtype(OP, DType::F32)?;
        if b.shape() != [n] {
            return Err(Error::shape(OP, format!("bias must be [{n}] (w's rows), got {:?}", b.shape())));
        }
    }
    Ok((x.numel() / k.max(1), k, n))
}

pub fn linear(x: &Tensor, w: &Tensor, bias: Option<&Tensor>, algo: GemmAlgo) -> Result<Tensor> {
    let (rows, k, n) = dims(x, w, bias)?;
    let mut out_shape = x.shape().to_vec();
    *out_shape.last_mut().expect("rank >= 1") = n;
    let x2 = x.reshape(&[rows, k])?;
    let (s, _) = plan(&[rows, k], &[n, k], false, true)?;
    let dev = x.device();
    if let Device::Cpu = dev {
        let b = bias.map(|b| b.cpu_f32(OP)).transpose()?;
        let y = if rows <= cpu::FEW_ROWS && k > 0 {
            cpu::linear_few_rows(x2.cpu_f32(OP)?, w.cpu_f32(OP)?, b, rows, k, n)
        } else {
            cpu::gemm(x2.cpu_f32(OP)?, w.cpu_f32(OP)?, &s, 1.0, b)
        };
        return Tensor::from_vec(y, &out_shape, dev);
    }
    if rows * n == 0 || k == 0 {
        // No products: y is the bias on every row (or zero).
        let zero = Tensor::zeros(&[rows, n], dev)?;
        let y = match bias {
            Some(b) => crate::ops::elementwise::add(&zero, b)?,
            None => zero,
        };
        return y.reshape(&out_shape);
    }
    let y = Tensor::empty(&out_shape, DType::F32, dev)?;
    // SAFETY: `dims` checked x [rows, k], w [n, k] and the bias [n]; y is a new [rows, n] tensor.
    unsafe {
        launch(dev, [x2.dev_ptr(), w.dev_ptr(), y.dev_ptr(), bias.map_or(0, |b| b.dev_ptr())], &s, 1.0, 0.0, algo)
    }?;
    Ok(y)
}

pub struct LinearGrads {
    pub dx: Tensor,
    pub dw: Tensor,
    pub db: Option<Tensor>,
}

pub fn linear_backward(x: &Tensor, w: &Tensor, dy: &Tensor, with_bias: bool, algo: GemmAlgo) -> Result<LinearGrads> {
    let (rows, k, n) = dims(x, w, None)?;
    let mut out_shape = x.shape().to_vec();
    *out_shape.last_mut().expect("rank >= 1") = n;
    if dy.shape() != out_shape.as_slice() {
        return Err(Error::shape(OP, format!("backward: dy {:?} must be {out_shape:?}", dy.shape())));
    }
    let dy2 = dy.reshape(&[rows, n])?;
    let go = |ta: bool, tb: bool| GemmOpts { trans_a: ta, trans_b: tb, alpha: 1.0, algo };
    let dx = matmul(&dy2, w, go(false, false))?.reshape(x.shape())?;
    let dw = matmul(&dy2, &x.reshape(&[rows, k])?, go(true, false))?;
    let db = if with_bias { Some(reduce::sum(&dy2, 0)?) } else { None };
    Ok(LinearGrads { dx, dw, db })
}
