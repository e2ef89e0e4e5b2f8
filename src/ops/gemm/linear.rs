//! The Linear layer as torch.nn.Linear stores it: y = x·wᵀ + b with x [..., K], w [N, K],
//! b [N]; y [..., N]. The bias is added in the GEMM's store (cuda/emu) or as C's starting value
//! (cpu), so it costs no pass of its own; so is a following ReLU on cuda/emu (`linear_act`, the
//! model's feed-forward layers: y = ReLU(x·wᵀ + b) in the GEMM's store; the cpu applies it over C
//! in place, a pass but no second tensor). The backward: dx = dy·w, dw = dyᵀ·x over all rows, db = Σ_rows dy
//! (dy masked by y > 0 first when the ReLU was fused: the autograd op does that).

use super::{cpu, launch, matmul, plan, Act, GemmAlgo, GemmOpts};
use crate::device::Device;
use crate::error::{Error, Result};
use crate::ops::reduce;
use crate::tensor::{DType, Tensor};

const OP: &str = "linear";

/// (rows, K, N) after checking the shapes (f32 operands).
fn dims(x: &Tensor, w: &Tensor, bias: Option<&Tensor>) -> Result<(usize, usize, usize)> {
    dims_of(x, w, bias, DType::F32)
}

/// (rows, K, N) after checking the shapes, every operand of `dtype`.
fn dims_of(x: &Tensor, w: &Tensor, bias: Option<&Tensor>, dtype: DType) -> Result<(usize, usize, usize)> {
    x.expect_dtype(OP, dtype)?;
    w.expect_dtype(OP, dtype)?;
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
        b.expect_dtype(OP, dtype)?;
        if b.shape() != [n] {
            return Err(Error::shape(OP, format!("bias must be [{n}] (w's rows), got {:?}", b.shape())));
        }
    }
    Ok((x.numel() / k.max(1), k, n))
}

pub fn linear(x: &Tensor, w: &Tensor, bias: Option<&Tensor>, algo: GemmAlgo) -> Result<Tensor> {
    linear_act(x, w, bias, Act::None, algo)
}

/// `act(linear(x, w, bias))` with the activation in the GEMM's epilogue.
pub fn linear_act(x: &Tensor, w: &Tensor, bias: Option<&Tensor>, act: Act, algo: GemmAlgo) -> Result<Tensor> {
    let (rows, k, n) = dims(x, w, bias)?;
    let mut out_shape = x.shape().to_vec();
    *out_shape.last_mut().expect("rank >= 1") = n;
    let x2 = x.reshape(&[rows, k])?;
    let (s, _) = plan(&[rows, k], &[n, k], false, true)?;
    let dev = x.device();
    if let Device::Cpu = dev {
        let b = bias.map(|b| b.cpu_f32(OP)).transpose()?;
        let (xv, wv) = (x2.cpu_f32(OP)?, w.cpu_f32(OP)?);
        let mut y = if k == 0 || rows > cpu::TUNED_ROWS {
            cpu::gemm(xv, wv, &s, 1.0, b)
        } else {
            // register-tiled dot products or the packing GEMM: tuned per shape (`--tune`), the
            // row threshold otherwise
            crate::ops::tune::pick(
                || format!("linear rows{rows} k{k} n{n}"),
                &["few_rows", "gemm"],
                if rows <= cpu::FEW_ROWS { 0 } else { 1 },
                |i| if i == 0 { cpu::linear_few_rows(xv, wv, b, rows, k, n) } else { cpu::gemm(xv, wv, &s, 1.0, b) },
            )
        };
        act.apply(&mut y);
        return Tensor::from_vec(y, &out_shape, dev);
    }
    if rows * n == 0 || k == 0 {
        // No products: y is the bias on every row (or zero).
        let zero = Tensor::zeros(&[rows, n], dev)?;
        let y = match bias {
            Some(b) => act.of(crate::ops::elementwise::add(&zero, b)?)?,
            None => zero,
        };
        return y.reshape(&out_shape);
    }
    let y = Tensor::empty(&out_shape, DType::F32, dev)?;
    let ptrs = [x2.dev_ptr(), w.dev_ptr(), y.dev_ptr(), bias.map_or(0, |b| b.dev_ptr())];
    // SAFETY: `dims` checked x [rows, k], w [n, k] and the bias [n]; y is a new [rows, n] tensor.
    unsafe { launch(dev, ptrs, &s, 1.0, 0.0, act, algo) }?;
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

/// The Linear of bf16 x, w and bias (bf16 autocast's operands): y = x·wᵀ + b in bf16, the
/// products exact and summed in f32, the bias added in f32 and y rounded once (the bf16 GEMM's
/// epilogue: the pipelined tensor-core kernels on cuda/emu where the sizes allow).
#[cfg(feature = "autocast")]
pub fn linear_bf16(x: &Tensor, w: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
    linear_bf16_act(x, w, bias, Act::None)
}

/// `act(linear_bf16(x, w, bias))` with the activation applied in f32 before the one rounding
/// (the same bf16 values as ReLU after the Linear: rounding keeps the sign).
#[cfg(feature = "autocast")]
pub fn linear_bf16_act(x: &Tensor, w: &Tensor, bias: Option<&Tensor>, act: Act) -> Result<Tensor> {
    let (rows, k, n) = dims_of(x, w, bias, DType::BF16)?;
    let mut out_shape = x.shape().to_vec();
    *out_shape.last_mut().expect("rank >= 1") = n;
    let opts = GemmOpts { trans_b: true, ..GemmOpts::default() };
    let x2 = x.reshape(&[rows, k])?;
    if let Device::Cpu = x.device() {
        if rows <= cpu::FEW_ROWS && k > 0 && reclmis_cpu_loops::bf16dot::available() {
            // the register-tiled dot products on the bf16 values as stored (AVX512_BF16)
            let b = bias.map(|b| cpu::widened(b, OP)).transpose()?;
            let y = cpu::linear_few_rows_bf16(&x2, w, b.as_deref(), rows, k, n, act == Act::Relu)?;
            return Tensor::from_vec_bf16(y, &out_shape, x.device());
        }
        if rows <= cpu::FEW_ROWS && k > 0 {
            // the register-tiled dot products, as the f32 Linear
            let b = bias.map(|b| cpu::widened(b, OP)).transpose()?;
            let mut y = cpu::linear_few_rows(&cpu::widened(&x2, OP)?, &cpu::widened(w, OP)?, b.as_deref(), rows, k, n);
            act.apply(&mut y);
            return cpu::bf16_tensor(&y, &out_shape, x.device());
        }
    }
    super::bf16_product(&x2, w, opts, bias, act)?.reshape(&out_shape)
}

/// linear_bf16's backward from a bf16 dy: dx = dy·w and dw = dyᵀ·x in bf16 (f32 sums rounded
/// once, as the tape stores the gradient of a bf16 value, which x and the weight's bf16 copy
/// both are) and db = Σ_rows dy in f32.
#[cfg(feature = "autocast")]
pub fn linear_backward_bf16(x: &Tensor, w: &Tensor, dy: &Tensor, with_bias: bool) -> Result<LinearGrads> {
    let (rows, k, n) = dims_of(x, w, None, DType::BF16)?;
    let mut out_shape = x.shape().to_vec();
    *out_shape.last_mut().expect("rank >= 1") = n;
    if dy.shape() != out_shape.as_slice() {
        return Err(Error::shape(OP, format!("backward: dy {:?} must be {out_shape:?}", dy.shape())));
    }
    dy.expect_dtype(OP, DType::BF16)?;
    let dy2 = dy.reshape(&[rows, n])?;
    let go = |ta: bool| GemmOpts { trans_a: ta, ..GemmOpts::default() };
    let dx = super::bf16_product(&dy2, w, go(false), None, Act::None)?.reshape(x.shape())?;
    let dw = super::bf16_product(&dy2, &x.reshape(&[rows, k])?, go(true), None, Act::None)?;
    let db = if with_bias { Some(reduce::sum(&crate::ops::cast::cast(&dy2, DType::F32)?, 0)?) } else { None };
    Ok(LinearGrads { dx, dw, db })
}
