//! Elementwise ops: unary (relu, sigmoid, exp, log, scale, add-scalar) and binary with numpy
//! broadcasting (add, sub, mul), each with its backward.

/// Its `reclmis bench` cases and `selfcheck` (registered in `bench::registry`).
#[cfg(feature = "cli")]
pub mod bench;
pub mod cpu;
#[cfg(feature = "refs")]
pub mod reference;

use crate::device::{Device, LaunchCfg};
use crate::error::{Error, Result};
use crate::kernels::Kernel;
use crate::ops::{check_u32, contiguous_strides, reduce, MAX_RANK};
use crate::tensor::{DType, Tensor};

#[derive(Clone, Copy, Debug, PartialEq)]
pub enum UnaryOp {
    Relu,
    Sigmoid,
    Exp,
    Log,
    /// y = s · x
    Scale(f32),
    /// y = x + s
    AddScalar(f32),
    /// y = x·Φ(x), Φ the standard normal CDF (PyTorch's default, exact erf form)
    Gelu,
    /// y = x·σ(1.702·x) (CLIP's QuickGELU)
    QuickGelu,
}

impl UnaryOp {
    /// Op code shared with kernels/elementwise.cu (UNARY_*).
    fn code(self) -> u32 {
        match self {
            UnaryOp::Relu => 0,
            UnaryOp::Sigmoid => 1,
            UnaryOp::Exp => 2,
            UnaryOp::Log => 3,
            UnaryOp::Scale(_) => 4,
            UnaryOp::AddScalar(_) => 5,
            UnaryOp::Gelu => 6,
            UnaryOp::QuickGelu => 7,
        }
    }
    fn alpha(self) -> f32 {
        match self {
            UnaryOp::Scale(a) | UnaryOp::AddScalar(a) => a,
            _ => 0.0,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BinaryOp {
    Add,
    Sub,
    Mul,
    /// a / b (IEEE: x/0 is ±inf or NaN, as in PyTorch)
    Div,
}

impl BinaryOp {
    fn code(self) -> u32 {
        self as u32
    }
}

crate::kernel_params! {
    struct UnaryParams [32] {
        x: u64,
        y: u64,
        n: u64,
        alpha: f32,
        op: u32,
    }
}

crate::kernel_params! {
    struct UnaryBwdParams [48] {
        x: u64,
        y: u64,
        dy: u64,
        dx: u64,
        n: u64,
        alpha: f32,
        op: u32,
    }
}

crate::kernel_params! {
    struct BinaryParams [112] {
        a: u64,
        b: u64,
        y: u64,
        n: u64,
        rank: u32,
        op: u32,
        shape: [u32; MAX_RANK],
        sa: [u32; MAX_RANK],
        sb: [u32; MAX_RANK],
    }
}

pub fn unary(x: &Tensor, op: UnaryOp) -> Result<Tensor> {
    x.expect_dtype("unary", DType::F32)?;
    let dev = x.device();
    if let Device::Cpu = dev {
        let y = cpu::unary(x.cpu_f32("unary")?, op);
        return Tensor::from_vec(y, x.shape(), dev);
    }
    let y = Tensor::empty(x.shape(), DType::F32, dev)?;
    let p = UnaryParams { x: x.dev_ptr(), y: y.dev_ptr(), n: x.numel() as u64, alpha: op.alpha(), op: op.code() };
    if x.numel() > 0 {
        // SAFETY: the params hold pointers to live buffers of the sizes this op checked above, for the kernel they were declared for.
        unsafe { dev.launch(Kernel::unary_fwd_f32, LaunchCfg::elementwise(x.numel()), &p) }?;
    }
    Ok(y)
}

pub fn relu(x: &Tensor) -> Result<Tensor> {
    unary(x, UnaryOp::Relu)
}
pub fn sigmoid(x: &Tensor) -> Result<Tensor> {
    unary(x, UnaryOp::Sigmoid)
}
pub fn exp(x: &Tensor) -> Result<Tensor> {
    unary(x, UnaryOp::Exp)
}
pub fn log(x: &Tensor) -> Result<Tensor> {
    unary(x, UnaryOp::Log)
}
pub fn scale(x: &Tensor, s: f32) -> Result<Tensor> {
    unary(x, UnaryOp::Scale(s))
}
pub fn add_scalar(x: &Tensor, s: f32) -> Result<Tensor> {
    unary(x, UnaryOp::AddScalar(s))
}
pub fn gelu(x: &Tensor) -> Result<Tensor> {
    unary(x, UnaryOp::Gelu)
}
pub fn quick_gelu(x: &Tensor) -> Result<Tensor> {
    unary(x, UnaryOp::QuickGelu)
}

/// dx from the forward input `x`, the forward output `y` and the incoming gradient `dy`.
pub fn unary_backward(op: UnaryOp, x: &Tensor, y: &Tensor, dy: &Tensor) -> Result<Tensor> {
    x.same_device("unary_backward", &[y, dy])?;
    Tensor::expect_f32("unary_backward", &[x, y, dy])?;
    for t in [y, dy] {
        if t.shape() != x.shape() {
            return Err(Error::shape("unary_backward", format!("{:?} vs {:?}", t.shape(), x.shape())));
        }
    }
    let dev = x.device();
    if let Device::Cpu = dev {
        let dx = cpu::unary_backward(
            op,
            x.cpu_f32("unary_backward")?,
            y.cpu_f32("unary_backward")?,
            dy.cpu_f32("unary_backward")?,
        );
        return Tensor::from_vec(dx, x.shape(), dev);
    }
    let dx = Tensor::empty(x.shape(), DType::F32, dev)?;
    let p = UnaryBwdParams {
        x: x.dev_ptr(),
        y: y.dev_ptr(),
        dy: dy.dev_ptr(),
        dx: dx.dev_ptr(),
        n: x.numel() as u64,
        alpha: op.alpha(),
        op: op.code(),
    };
    if x.numel() > 0 {
        // SAFETY: the params hold pointers to live buffers of the sizes this op checked above, for the kernel they were declared for.
        unsafe { dev.launch(Kernel::unary_bwd_f32, LaunchCfg::elementwise(x.numel()), &p) }?;
    }
    Ok(dx)
}

/// The numpy broadcast of two shapes.
pub fn broadcast_shape(a: &[usize], b: &[usize]) -> Result<Vec<usize>> {
    let r = a.len().max(b.len());
    let mut out = vec![0; r];
    for i in 0..r {
        let da = if i + a.len() >= r { a[i + a.len() - r] } else { 1 };
        let db = if i + b.len() >= r { b[i + b.len() - r] } else { 1 };
        out[i] = match (da, db) {
            (x, y) if x == y => x,
            (1, y) => y,
            (x, 1) => x,
            _ => return Err(Error::shape("broadcast", format!("{a:?} and {b:?} do not broadcast"))),
        };
    }
    Ok(out)
}

/// How a binary op walks its operands: the output shape with runs of alike dims merged, and each
/// operand's element strides over it (0 where broadcast). The last merged dim has strides 0 or 1.
#[derive(Clone, Debug, PartialEq)]
pub struct BroadcastPlan {
    pub out_shape: Vec<usize>,
    pub dims: Vec<usize>,
    pub sa: Vec<usize>,
    pub sb: Vec<usize>,
}

fn operand_strides(shape: &[usize], out: &[usize]) -> Vec<usize> {
    let cs = contiguous_strides(shape);
    let off = out.len() - shape.len();
    (0..out.len()).map(|i| if i < off || shape[i - off] == 1 { 0 } else { cs[i - off] }).collect()
}

pub fn broadcast_plan(a: &[usize], b: &[usize]) -> Result<BroadcastPlan> {
    let out_shape = broadcast_shape(a, b)?;
    let (sa, sb) = (operand_strides(a, &out_shape), operand_strides(b, &out_shape));
    let (mut dims, mut ra, mut rb): (Vec<usize>, Vec<usize>, Vec<usize>) = (vec![], vec![], vec![]);
    for i in 0..out_shape.len() {
        if out_shape[i] == 1 {
            continue; // size-1 dims address nothing
        }
        if let (Some(&d), Some(&pa), Some(&pb)) = (dims.last(), ra.last(), rb.last()) {
            // merge with the previous dim when both operands continue contiguously across it
            if pa == sa[i] * out_shape[i] && pb == sb[i] * out_shape[i] {
                let n = dims.len();
                dims[n - 1] = d * out_shape[i];
                ra[n - 1] = sa[i];
                rb[n - 1] = sb[i];
                continue;
            }
        }
        dims.push(out_shape[i]);
        ra.push(sa[i]);
        rb.push(sb[i]);
    }
    if dims.is_empty() {
        dims.push(1);
        ra.push(0);
        rb.push(0);
    }
    Ok(BroadcastPlan { out_shape, dims, sa: ra, sb: rb })
}

pub fn binary(a: &Tensor, b: &Tensor, op: BinaryOp) -> Result<Tensor> {
    a.same_device("binary", &[b])?;
    a.expect_dtype("binary", DType::F32)?;
    b.expect_dtype("binary", DType::F32)?;
    let plan = broadcast_plan(a.shape(), b.shape())?;
    let dev = a.device();
    if let Device::Cpu = dev {
        let y = cpu::binary(a.cpu_f32("binary")?, b.cpu_f32("binary")?, &plan, op);
        return Tensor::from_vec(y, &plan.out_shape, dev);
    }
    if plan.dims.len() > MAX_RANK {
        return Err(Error::Unsupported {
            op: "binary",
            detail: format!("broadcast pattern needs {} dims after merging (max {MAX_RANK})", plan.dims.len()),
        });
    }
    let y = Tensor::empty(&plan.out_shape, DType::F32, dev)?;
    let mut p = BinaryParams {
        a: a.dev_ptr(),
        b: b.dev_ptr(),
        y: y.dev_ptr(),
        n: y.numel() as u64,
        rank: plan.dims.len() as u32,
        op: op.code(),
        shape: [1; MAX_RANK],
        sa: [0; MAX_RANK],
        sb: [0; MAX_RANK],
    };
    for i in 0..plan.dims.len() {
        p.shape[i] = check_u32("binary", plan.dims[i])?;
        p.sa[i] = check_u32("binary", plan.sa[i])?;
        p.sb[i] = check_u32("binary", plan.sb[i])?;
    }
    if y.numel() > 0 {
        // SAFETY: the params hold pointers to live buffers of the sizes this op checked above, for the kernel they were declared for.
        unsafe { dev.launch(Kernel::binary_fwd_f32, LaunchCfg::elementwise(y.numel()), &p) }?;
    }
    Ok(y)
}

pub fn add(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    binary(a, b, BinaryOp::Add)
}
pub fn sub(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    binary(a, b, BinaryOp::Sub)
}
pub fn mul(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    binary(a, b, BinaryOp::Mul)
}
pub fn div(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    binary(a, b, BinaryOp::Div)
}

/// (da, db) for y = a op b: the gradient of each operand, summed over the dims it was broadcast
/// along so that it has the operand's shape.
pub fn binary_backward(op: BinaryOp, a: &Tensor, b: &Tensor, dy: &Tensor) -> Result<(Tensor, Tensor)> {
    let out = broadcast_shape(a.shape(), b.shape())?;
    if dy.shape() != out.as_slice() {
        return Err(Error::shape("binary_backward", format!("dy {:?} vs output {out:?}", dy.shape())));
    }
    let (ga, gb) = match op {
        BinaryOp::Add => (dy.clone(), dy.clone()),
        BinaryOp::Sub => (dy.clone(), scale(dy, -1.0)?),
        BinaryOp::Mul => (mul(dy, b)?, mul(dy, a)?),
        // d(a/b)/db = -(a/b)/b
        BinaryOp::Div => (div(dy, b)?, mul(dy, &scale(&div(&div(a, b)?, b)?, -1.0)?)?),
    };
    Ok((reduce::sum_to_shape(&ga, a.shape())?, reduce::sum_to_shape(&gb, b.shape())?))
}
