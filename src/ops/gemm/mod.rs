//! Batched GEMM: C = alpha · op(A) · op(B), f32 in and out, op = identity or transpose.
//!
//! Shapes: A is [..., m, k] ([..., k, m] when transposed), B is [..., k, n] ([..., n, k]); the batch
//! dims of A and B must match, or one operand is 2-D and shared by every batch (a weight). The
//! result is [..., m, n]. Transposes cost nothing: they only swap the strides the kernel reads.
//!
//! On cuda and emu, `GemmAlgo::Tiled` is exact f32 (FMA, shared-memory tiles) and
//! `GemmAlgo::TensorCore` rounds operands to tf32 (10-bit mantissa, like PyTorch's allow_tf32)
//! with f32 accumulation. `Auto` picks Tiled: exactness is the default, speed is asked for.

/// Its `reclmis bench` cases and `selfcheck` (registered in `bench::registry`).
#[cfg(feature = "cli")]
pub mod bench;
pub mod cpu;
pub mod linear;
#[cfg(feature = "refs")]
pub mod reference;

use crate::device::{Device, LaunchCfg};
use crate::error::{Error, Result};
use crate::kernels::Kernel;
use crate::ops::check_u32;
use crate::tensor::{DType, Tensor};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum GemmAlgo {
    #[default]
    Auto,
    Tiled,
    TensorCore,
}

#[derive(Clone, Copy, Debug, PartialEq)]
pub struct GemmOpts {
    pub trans_a: bool,
    pub trans_b: bool,
    pub alpha: f32,
    pub algo: GemmAlgo,
}

impl Default for GemmOpts {
    fn default() -> Self {
        GemmOpts { trans_a: false, trans_b: false, alpha: 1.0, algo: GemmAlgo::Auto }
    }
}

crate::kernel_params! {
    pub(crate) struct GemmParams [128] {
        a: u64,
        b: u64,
        c: u64,
        m: u32,
        n: u32,
        k: u32,
        batch: u32,
        sa_batch: i64,
        sa_row: i64,
        sa_col: i64,
        sb_batch: i64,
        sb_row: i64,
        sb_col: i64,
        sc_batch: i64,
        sc_row: i64,
        alpha: f32,
        beta: f32,
        bias: u64,
        relu: u32,
        pad: u32,
    }
}

/// The activation a product's epilogue applies after alpha, the bias and beta·C (f32, before any
/// bf16 rounding; rounding keeps the sign, so the fused and the unfused ReLU agree bit for bit).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Act {
    #[default]
    None,
    /// max(v, 0) as the elementwise ReLU computes it
    Relu,
}

impl Act {
    /// The activation of a tensor (the products without a GEMM to fuse it into: k = 0).
    pub(crate) fn of(self, y: Tensor) -> Result<Tensor> {
        match self {
            Act::None => Ok(y),
            Act::Relu => crate::ops::elementwise::relu(&y),
        }
    }
    /// Applies the activation to a product's f32 result in place (the cpu's epilogue).
    pub(crate) fn apply(self, c: &mut [f32]) {
        if self == Act::Relu {
            // the cpu ReLU's own formula (elementwise::cpu), in place: a pass of its own here
            // (the `gemm` crate has no epilogue hook), but no second tensor
            c.iter_mut().for_each(|v| *v = v.max(0.0));
        }
    }
}

/// Sizes and element strides of one batched product, shared by every device path.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GemmShape {
    pub batch: usize,
    pub m: usize,
    pub n: usize,
    pub k: usize,
    /// (batch, row, col) strides of A as an m x k matrix (batch stride 0 when shared).
    pub sa: (usize, usize, usize),
    pub sb: (usize, usize, usize),
}

impl GemmShape {
    /// The shape as an autotuning key (sizes and both operands' strides).
    pub fn key(&self) -> String {
        format!("b{} m{} n{} k{} sa{:?} sb{:?}", self.batch, self.m, self.n, self.k, self.sa, self.sb)
    }

    /// Elements an operand with `strides` (batch, row, col) must hold for `rows` × `cols`
    /// matrices over the batch: one past its largest index (None on overflow).
    pub(crate) fn span(&self, (sb, sr, sc): (usize, usize, usize), rows: usize, cols: usize) -> Option<usize> {
        if self.batch == 0 || rows == 0 || cols == 0 {
            return Some(0);
        }
        let last = (self.batch - 1)
            .checked_mul(sb)?
            .checked_add((rows - 1).checked_mul(sr)?)?
            .checked_add((cols - 1).checked_mul(sc)?)?;
        last.checked_add(1)
    }
    pub fn flops(&self) -> f64 {
        2.0 * (self.batch * self.m * self.n * self.k) as f64
    }
}

/// Works out the product's sizes and strides, and the output shape.
pub fn plan(a: &[usize], b: &[usize], trans_a: bool, trans_b: bool) -> Result<(GemmShape, Vec<usize>)> {
    if a.len() < 2 || b.len() < 2 {
        return Err(Error::shape("matmul", format!("operands need 2+ dims, got {a:?} and {b:?}")));
    }
    let (ra, rb) = (a.len(), b.len());
    let (m, ka) = if trans_a { (a[ra - 1], a[ra - 2]) } else { (a[ra - 2], a[ra - 1]) };
    let (kb, n) = if trans_b { (b[rb - 1], b[rb - 2]) } else { (b[rb - 2], b[rb - 1]) };
    if ka != kb {
        return Err(Error::shape(
            "matmul",
            format!(
                "inner dims differ: {a:?}{} x {b:?}{}",
                if trans_a { "ᵀ" } else { "" },
                if trans_b { "ᵀ" } else { "" }
            ),
        ));
    }
    let (ba, bb) = (&a[..ra - 2], &b[..rb - 2]);
    let batch_dims = if ba == bb || bb.is_empty() {
        ba
    } else if ba.is_empty() {
        bb
    } else {
        return Err(Error::shape("matmul", format!("batch dims {ba:?} and {bb:?} differ")));
    };
    let batch: usize = batch_dims.iter().product();
    // A stored [.., rows_a, cols_a] row-major; as an m x k matrix its strides are (cols_a, 1), or
    // (1, cols_a) when transposed.
    let sa = (if ba.is_empty() { 0 } else { m * ka }, if trans_a { 1 } else { ka }, if trans_a { m } else { 1 });
    let sb = (if bb.is_empty() { 0 } else { ka * n }, if trans_b { 1 } else { n }, if trans_b { ka } else { 1 });
    let mut out = batch_dims.to_vec();
    out.extend([m, n]);
    Ok((GemmShape { batch, m, n, k: ka, sa, sb }, out))
}

pub fn matmul(a: &Tensor, b: &Tensor, opts: GemmOpts) -> Result<Tensor> {
    a.same_device("matmul", &[b])?;
    if a.dtype() == DType::BF16 {
        b.expect_dtype("matmul", DType::BF16)?;
        return matmul_bf16(a, b, opts);
    }
    a.expect_dtype("matmul", DType::F32)?;
    b.expect_dtype("matmul", DType::F32)?;
    let (s, out_shape) = plan(a.shape(), b.shape(), opts.trans_a, opts.trans_b)?;
    let dev = a.device();
    if let Device::Cpu = dev {
        let c = cpu::gemm(a.cpu_f32("matmul")?, b.cpu_f32("matmul")?, &s, opts.alpha, None);
        return Tensor::from_vec(c, &out_shape, dev);
    }
    let c = Tensor::empty(&out_shape, DType::F32, dev)?;
    if c.numel() == 0 {
        return Ok(c);
    }
    if s.k == 0 {
        // Nothing to accumulate: C is zero (the kernels would not run their k loop at all, but
        // zero-filling is clearer than relying on that).
        return Tensor::zeros(&out_shape, dev);
    }
    // SAFETY: `plan` derived `s` from a's and b's shapes and strides, and c is a new [batch, m, n] tensor.
    unsafe { launch(dev, [a.dev_ptr(), b.dev_ptr(), c.dev_ptr(), 0], &s, opts.alpha, 0.0, Act::None, opts.algo) }?;
    Ok(c)
}

/// C = alpha · op(A) · op(B) with bf16 A, B and C: the products are exact in f32, the sum is f32
/// and C is rounded to bf16 once (`algo` is ignored: bf16 always runs on the tensor cores).
fn matmul_bf16(a: &Tensor, b: &Tensor, opts: GemmOpts) -> Result<Tensor> {
    bf16_product(a, b, opts, None, Act::None)
}

/// The bf16 product in bf16 (one rounding after alpha, the bias and the activation), with an
/// optional bf16 bias [n] added to every row. On cuda/emu the pipelined kernels
/// where every 16-byte chunk is whole and aligned, the element-loading tensor-core kernels
/// otherwise. The cpu widens A and B into plain buffers (not tensors: the device's memory
/// accounting counts what a GPU would hold, and a GPU widens nothing), runs its f32 GEMM (the same
/// arithmetic up to the order of the sum) and rounds C.
pub(crate) fn bf16_product(a: &Tensor, b: &Tensor, opts: GemmOpts, bias: Option<&Tensor>, act: Act) -> Result<Tensor> {
    let (s, out_shape) = plan(a.shape(), b.shape(), opts.trans_a, opts.trans_b)?;
    if let Some(bias) = bias {
        bias.expect_dtype("matmul", DType::BF16)?;
        if bias.shape() != [s.n] {
            return Err(Error::shape("matmul", format!("the bias must be [{}], got {:?}", s.n, bias.shape())));
        }
    }
    let dev = a.device();
    if let Device::Cpu = dev {
        let bias = bias.map(|b| cpu::widened(b, "matmul")).transpose()?;
        #[cfg(feature = "autocast")]
        if s.k > 0 && crate::tensor::numel(&out_shape) > 0 && reclmis_cpu_loops::bf16dot::available() {
            let c = cpu::gemm_bf16_dot(a, b, &s, opts.alpha, bias.as_deref(), act == Act::Relu)?;
            return Tensor::from_vec_bf16(c, &out_shape, dev);
        }
        let mut c =
            cpu::gemm(&cpu::widened(a, "matmul")?, &cpu::widened(b, "matmul")?, &s, opts.alpha, bias.as_deref());
        act.apply(&mut c);
        return cpu::bf16_tensor(&c, &out_shape, dev);
    }
    #[cfg(not(feature = "autocast"))]
    return Err(Error::Unsupported {
        op: "matmul",
        detail: "bf16 products on a GPU need the `autocast` feature: this build embeds no bf16 kernel".into(),
    });
    #[cfg(feature = "autocast")]
    bf16_launch(a, b, opts, bias, act, &s, &out_shape)
}

/// `bf16_product` on cuda or emu.
#[cfg(feature = "autocast")]
fn bf16_launch(
    a: &Tensor,
    b: &Tensor,
    opts: GemmOpts,
    bias: Option<&Tensor>,
    act: Act,
    s: &GemmShape,
    out_shape: &[usize],
) -> Result<Tensor> {
    let (s, out_shape, dev) = (*s, out_shape.to_vec(), a.device());
    if s.k == 0 || crate::tensor::numel(&out_shape) == 0 {
        let zero = Tensor::zeros(&out_shape, dev)?;
        let y = match bias {
            None => zero,
            Some(bias) => act.of(crate::ops::elementwise::add(&zero, &crate::ops::cast::cast(bias, DType::F32)?)?)?,
        };
        return crate::ops::cast::cast(&y, DType::BF16);
    }
    let c = Tensor::empty(&out_shape, DType::BF16, dev)?;
    if s.batch > 65535 {
        return Err(Error::Unsupported { op: "matmul", detail: format!("batch {} exceeds a grid's z range", s.batch) });
    }
    let p = GemmParams {
        a: a.dev_ptr(),
        b: b.dev_ptr(),
        c: c.dev_ptr(),
        m: check_u32("matmul", s.m)?,
        n: check_u32("matmul", s.n)?,
        k: check_u32("matmul", s.k)?,
        batch: s.batch as u32,
        sa_batch: s.sa.0 as i64,
        sa_row: s.sa.1 as i64,
        sa_col: s.sa.2 as i64,
        sb_batch: s.sb.0 as i64,
        sb_row: s.sb.1 as i64,
        sb_col: s.sb.2 as i64,
        sc_batch: (s.m * s.n) as i64,
        sc_row: s.n as i64,
        alpha: opts.alpha,
        beta: 0.0,
        bias: bias.map_or(0, |b| b.dev_ptr()),
        relu: u32::from(act == Act::Relu),
        pad: 0,
    };
    let chosen = bf16_kernel(&s, [a.dev_ptr(), b.dev_ptr()]);
    let run = |(kernel, tile, smem_bytes): (Kernel, u32, u32)| {
        let grid = ((s.n as u32).div_ceil(tile), (s.m as u32).div_ceil(tile), s.batch as u32);
        // SAFETY: `plan` derived `s` from a's and b's shapes (both bf16, checked by the callers),
        // c is a new bf16 [batch, m, n] tensor, the bias (checked) [n] bf16, and the kernels read
        // and write bf16 through them; the pipelined ones only where `bf16_kernel` found every
        // 16-byte chunk whole and aligned (a tuned choice is one of them only then too).
        unsafe { dev.launch(kernel, LaunchCfg { grid, block: (128, 1, 1), smem_bytes }, &p) }
    };
    match PIPE_KERNELS.iter().position(|k| *k == chosen) {
        // the pipelined kernels apply: their tile tuned per shape and GPU (the fill heuristic
        // first), unless a test fixed it
        Some(heuristic) if PIPE_TILE.with(|t| t.get()).is_none() => crate::ops::tune::pick_on(
            dev,
            || format!("gemm_bf16 {} bias{}", s.key(), bias.is_some()),
            &PIPE_NAMES,
            heuristic,
            |i| run(PIPE_KERNELS[i]),
        )?,
        _ => run(chosen)?,
    }
    Ok(c)
}

/// The pipelined kernels' dynamic shared memory: 3 stages of a BM x 32 and a 32 x BN bf16 tile
/// (pg_smem_bytes in pipe_gemm.cuh).
pub const PIPE128_SMEM: u32 = 3 * (128 * 32 + 32 * 128) * 2;
pub const PIPE64_SMEM: u32 = 3 * (64 * 32 + 32 * 64) * 2;

thread_local! {
    static PIPE_TILE: std::cell::Cell<Option<u32>> = const { std::cell::Cell::new(None) };
}

/// The block tile a test fixed with `with_bf16_tile` (the convolutions' pipelined kernels obey
/// it too), or None.
#[cfg(feature = "autocast")]
pub(crate) fn fixed_bf16_tile() -> Option<u32> {
    PIPE_TILE.with(|t| t.get())
}

/// Runs `f` with the pipelined (bf16 and tf32) GEMMs' block tile fixed at 64 or 128 for the
/// products it launches on this thread (tests reach both tiles' edges with small problems).
pub fn with_bf16_tile<R>(tile: u32, f: impl FnOnce() -> R) -> R {
    let old = PIPE_TILE.with(|t| t.replace(Some(tile)));
    let r = f();
    PIPE_TILE.with(|t| t.set(old));
    r
}

/// GPUs' multiprocessor count the 128 x 128 tile must fill (an H100 SXM has 132) before it is
/// chosen over the 64 x 64 one: fewer, larger tiles leave multiprocessors idle.
#[cfg(feature = "autocast")]
const PIPE_FILL_BLOCKS: usize = 132;

/// The bf16 kernel for a product, with its square block tile and dynamic shared memory: the
/// pipelined kernels (cp.async copies 16-byte chunks) when every chunk of A and B is whole and
/// aligned: each operand's contiguous extent (k or m for A, n or k for B) and its other strides
/// multiples of 8 elements, and its base 16-byte aligned; gemm_tc_fwd_bf16 (element loads) else.
#[cfg(feature = "autocast")]
pub fn bf16_kernel(s: &GemmShape, [a, b]: [u64; 2]) -> (Kernel, u32, u32) {
    if !chunked(s, [a, b], 8) {
        return (Kernel::gemm_tc_fwd_bf16, 64, 0);
    }
    PIPE_KERNELS[usize::from(!big_tile(s))]
}

/// Whether every 16-byte chunk (`per` elements) of A and B is whole and aligned: each operand's
/// contiguous extent (k or m for A, n or k for B) and its other strides multiples of `per`, and
/// its base 16-byte aligned (what the pipelined kernels' cp.async copies need).
#[cfg(feature = "autocast")]
fn chunked(s: &GemmShape, [a, b]: [u64; 2], per: usize) -> bool {
    let ok = |(sb, sr, sc): (usize, usize, usize), rows: usize, cols: usize, base: u64| {
        let (ld, contiguous) = match (sr, sc) {
            (_, 1) => (sr, cols),
            (1, _) => (sc, rows),
            _ => return false,
        };
        base.is_multiple_of(16) && contiguous.is_multiple_of(per) && ld.is_multiple_of(per) && sb.is_multiple_of(per)
    };
    ok(s.sa, s.m, s.k, a) && ok(s.sb, s.k, s.n, b)
}

/// The 128-square block tile (else the 64 one): a test's fixed tile, or enough 128 tiles to fill
/// the GPU.
#[cfg(feature = "autocast")]
fn big_tile(s: &GemmShape) -> bool {
    let tiles128 = s.m.div_ceil(128) * s.n.div_ceil(128) * s.batch;
    PIPE_TILE.with(|t| t.get()).map_or(tiles128 >= PIPE_FILL_BLOCKS, |t| t == 128)
}

/// The pipelined tf32 kernel for an f32 product at tf32 (same block tiles, same dynamic shared
/// memory as the bf16 ones: 16 f32 k per stage are 64-byte rows as 32 bf16 are), where every
/// 16-byte chunk of A and B (4 floats) is whole and aligned; None where not (the element-loading
/// `gemm_tc_fwd_f32` runs then).
#[cfg(feature = "autocast")]
pub fn tf32_pipe_kernel(s: &GemmShape, [a, b]: [u64; 2]) -> Option<(Kernel, u32, u32)> {
    chunked(s, [a, b], 4).then(|| TF32_PIPE_KERNELS[usize::from(!big_tile(s))])
}

/// The pipelined tf32 kernels, 128- and 64-square block tiles (as PIPE_KERNELS).
#[cfg(feature = "autocast")]
const TF32_PIPE_KERNELS: [(Kernel, u32, u32); 2] =
    [(Kernel::gemm_pipe128_fwd_f32, 128, PIPE128_SMEM), (Kernel::gemm_pipe64_fwd_f32, 64, PIPE64_SMEM)];

/// The pipelined bf16 kernels (one params struct): the 128- and the 64-square block tile, with
/// their dynamic shared memory; the same arithmetic (each C element sums its k in the same
/// order), only the tiling differs.
#[cfg(feature = "autocast")]
const PIPE_KERNELS: [(Kernel, u32, u32); 2] =
    [(Kernel::gemm_pipe128_fwd_bf16, 128, PIPE128_SMEM), (Kernel::gemm_pipe64_fwd_bf16, 64, PIPE64_SMEM)];
/// Their candidate names for autotuning.
pub const PIPE_NAMES: [&str; 2] = ["pipe128", "pipe64"];

/// Launches one batched GEMM on cuda or emu; `beta != 0` accumulates into `c`; a nonzero `bias`
/// pointer ([n] floats) is added to every row of C; `act` is applied last.
///
/// # Safety
/// `a`, `b`, `c` (and `bias` when nonzero) must be live f32 buffers on `dev` that hold every element
/// `s` addresses: `s.span(s.sa, m, k)` for A (rows/cols swapped when transposed), the same for B,
/// `batch·m·n` for C and `n` for the bias, and C must not overlap A, B or the bias.
pub(crate) unsafe fn launch(
    dev: &Device,
    [a, b, c, bias]: [u64; 4],
    s: &GemmShape,
    alpha: f32,
    beta: f32,
    act: Act,
    algo: GemmAlgo,
) -> Result<()> {
    if s.batch > 65535 {
        return Err(Error::Unsupported { op: "matmul", detail: format!("batch {} exceeds a grid's z range", s.batch) });
    }
    let p = GemmParams {
        a,
        b,
        c,
        m: check_u32("matmul", s.m)?,
        n: check_u32("matmul", s.n)?,
        k: check_u32("matmul", s.k)?,
        batch: s.batch as u32,
        sa_batch: s.sa.0 as i64,
        sa_row: s.sa.1 as i64,
        sa_col: s.sa.2 as i64,
        sb_batch: s.sb.0 as i64,
        sb_row: s.sb.1 as i64,
        sb_col: s.sb.2 as i64,
        sc_batch: (s.m * s.n) as i64,
        sc_row: s.n as i64,
        alpha,
        beta,
        bias,
        relu: u32::from(act == Act::Relu),
        pad: 0,
    };
    let grid = ((s.n as u32).div_ceil(64), (s.m as u32).div_ceil(64), s.batch as u32);
    let run = |i: usize| {
        let (kernel, threads) = F32_KERNELS[i];
        // SAFETY: the caller guarantees the buffers (this function's contract); GemmParams
        // mirrors the kernels' params struct (the same for both kernels).
        unsafe { dev.launch(kernel, LaunchCfg { grid, block: (threads, 1, 1), smem_bytes: 0 }, &p) }
    };
    #[cfg(feature = "autocast")]
    if algo == GemmAlgo::TensorCore {
        if let Some(pipe) = tf32_pipe_kernel(s, [a, b]) {
            // the pipelined tf32 kernels apply: candidates pipe128, pipe64, then the two above
            let heuristic = TF32_PIPE_KERNELS.iter().position(|k| *k == pipe).unwrap_or(0);
            let run = |i: usize| {
                if i >= 2 {
                    return run(i - 2);
                }
                let (kernel, tile, smem_bytes) = TF32_PIPE_KERNELS[i];
                let grid = ((s.n as u32).div_ceil(tile), (s.m as u32).div_ceil(tile), s.batch as u32);
                // SAFETY: the caller guarantees the buffers (this function's contract), and
                // `tf32_pipe_kernel` found every 16-byte chunk of A and B whole and aligned, which
                // the pipelined kernels' cp.async copies need (the tuned key says so too).
                unsafe { dev.launch(kernel, LaunchCfg { grid, block: (128, 1, 1), smem_bytes }, &p) }
            };
            if beta != 0.0 || PIPE_TILE.with(|t| t.get()).is_some() {
                return run(heuristic);
            }
            let key = || format!("gemm_tf32_pipe {} bias{}", s.key(), bias != 0);
            return crate::ops::tune::pick_on(dev, key, &TF32_PIPE_NAMES, heuristic, run);
        }
    }
    match algo {
        // tf32 allowed: the tf32 tensor cores or the exact FMA kernel (within tf32's bound),
        // tuned per shape and GPU. Not when C accumulates (beta != 0): timing runs it twice.
        GemmAlgo::TensorCore if beta == 0.0 => {
            crate::ops::tune::pick_on(dev, || format!("gemm_f32 {} bias{}", s.key(), bias != 0), &F32_NAMES, 0, run)
        }
        GemmAlgo::TensorCore => run(0),
        GemmAlgo::Tiled | GemmAlgo::Auto => run(1),
    }
}

/// The f32 GEMM kernels (one params struct): the tf32 tensor cores, the exact FMA tiles.
const F32_KERNELS: [(Kernel, u32); 2] = [(Kernel::gemm_tc_fwd_f32, 128), (Kernel::gemm_fwd_f32, 256)];
/// Their candidate names for autotuning (the convolutions' kernels use the same).
pub const F32_NAMES: [&str; 2] = ["tf32_mma", "f32_fma"];
/// The candidates of a tf32 product the pipelined kernels can run: those two, then F32_NAMES.
pub const TF32_PIPE_NAMES: [&str; 4] = ["tf32_pipe128", "tf32_pipe64", "tf32_mma", "f32_fma"];

/// (dA, dB) for C = alpha · op(A) · op(B), as GEMMs on the same device:
/// d op(A) = alpha · dC · op(B)ᵀ and d op(B) = alpha · op(A)ᵀ · dC, transposed back when the
/// operand was stored transposed; a shared (2-D) operand's gradient is summed over the batch.
pub fn matmul_backward(a: &Tensor, b: &Tensor, dc: &Tensor, opts: GemmOpts) -> Result<(Tensor, Tensor)> {
    let (_, out) = plan(a.shape(), b.shape(), opts.trans_a, opts.trans_b)?;
    if dc.shape() != out.as_slice() {
        return Err(Error::shape("matmul_backward", format!("dC {:?} vs C {out:?}", dc.shape())));
    }
    let g = |ta: bool, tb: bool| GemmOpts { trans_a: ta, trans_b: tb, ..opts };
    let da = if opts.trans_a { matmul(b, dc, g(opts.trans_b, true))? } else { matmul(dc, b, g(false, !opts.trans_b))? };
    let db = if opts.trans_b { matmul(dc, a, g(true, opts.trans_a))? } else { matmul(a, dc, g(!opts.trans_a, false))? };
    Ok((summed_to(&da, a.shape())?, summed_to(&db, b.shape())?))
}

/// A shared operand's gradient: the per-batch gradients summed (in f32 for bf16, rounded once).
fn summed_to(g: &Tensor, shape: &[usize]) -> Result<Tensor> {
    use crate::ops::{cast::cast, reduce::sum_to_shape};
    if g.dtype() == DType::BF16 && g.shape() != shape {
        return cast(&sum_to_shape(&cast(g, DType::F32)?, shape)?, DType::BF16);
    }
    sum_to_shape(g, shape)
}
