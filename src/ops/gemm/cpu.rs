//! cpu GEMM through the `gemm` crate (AVX-512/AVX2/FMA microkernels, rayon), which takes
//! arbitrary row and column strides, so transposed operands need no copy.

use super::GemmShape;
use gemm::Parallelism;
use rayon::prelude::*;

/// Below this many multiply-adds per matrix, parallelise across the batch instead of inside one
/// product (threading a small product costs more than it saves).
const PAR_INSIDE: usize = 1 << 18;

/// C = alpha·A·B (+ bias [n] on every row: C starts as the bias rows and the product is
/// accumulated onto them, so the epilogue costs no extra pass).
pub fn gemm(a: &[f32], b: &[f32], s: &GemmShape, alpha: f32, bias: Option<&[f32]>) -> Vec<f32> {
    let (m, n, k) = (s.m, s.n, s.k);
    crate::ops::assert_len("gemm", "A", a.len(), s.span(s.sa, m, k));
    crate::ops::assert_len("gemm", "B", b.len(), s.span(s.sb, k, n));
    if let Some(bias) = bias {
        crate::ops::assert_len("gemm", "bias", bias.len(), Some(n));
    }
    let mut c = vec![0.0f32; crate::ops::product(&[s.batch, m, n]).expect("the output's size overflows")];
    if c.is_empty() {
        return c;
    }
    if let Some(bias) = bias {
        c.par_chunks_mut(n).for_each(|row| row.copy_from_slice(bias));
    }
    let read_dst = bias.is_some();
    let one = |z: usize, cz: &mut [f32], par: Parallelism| {
        let (pa, pb) = (&a[z * s.sa.0..], &b[z * s.sb.0..]);
        // SAFETY: the plan's strides address only elements inside `a` and `b` for every (i, kk, j)
        // below m, k, n (checked by the shapes in `plan`); cz holds exactly m x n.
        unsafe {
            gemm::gemm(
                m,
                n,
                k,
                cz.as_mut_ptr(),
                1,
                n as isize,
                read_dst,
                pa.as_ptr(),
                s.sa.2 as isize,
                s.sa.1 as isize,
                pb.as_ptr(),
                s.sb.2 as isize,
                s.sb.1 as isize,
                1.0,   // gemm's alpha scales the old C (read only when it holds the bias)
                alpha, // gemm's beta scales A·B
                false,
                false,
                false,
                par,
            )
        }
    };
    if m * n * k >= PAR_INSIDE || s.batch == 1 {
        let par = if m * n * k >= PAR_INSIDE { Parallelism::Rayon(0) } else { Parallelism::None };
        for (z, cz) in c.chunks_mut(m * n).enumerate() {
            one(z, cz, par);
        }
    } else {
        c.par_chunks_mut(m * n).enumerate().for_each(|(z, cz)| one(z, cz, Parallelism::None));
    }
    c
}

/// Up to this many rows a Linear skips the GEMM library: packing the weights costs as much as
/// the product (the text tower's 18-token rows read 151 MB of weights per note at the official
/// size). AMD EPYC dev VM, `bench --op linear --shape`, min of 20, tiles / GEMM: 36x512->2048
/// 0.26 / 0.68 ms, 72x512->2048 0.46 / 0.83, 72x2048->512 0.47 / 2.19, 144x512->2048 0.90 /
/// 1.19, 160x512->2048 0.99 / 1.22, 160x512->512 0.51 / 0.45; `--tune exhaustive` chose the
/// tiles for every text-tower shape at 72, 144 and 200 rows. 160 keeps a batch of eight notes
/// (144 rows) on the tiles; autotuning decides up to `TUNED_ROWS`.
pub const FEW_ROWS: usize = 160;

/// Linears of at most this many rows are autotuned between the tiles and the GEMM.
pub const TUNED_ROWS: usize = 256;

/// y [rows, n] = x [rows, k] · wᵀ (+ bias), w [n, k], for few rows: each weight row is read once
/// and dotted with every input row (which stay in cache); features are spread over the threads.
pub fn linear_few_rows(x: &[f32], w: &[f32], bias: Option<&[f32]>, rows: usize, k: usize, n: usize) -> Vec<f32> {
    assert!(x.len() == rows * k && w.len() == n * k, "few-rows Linear: x [rows, k], w [n, k]");
    assert!(bias.is_none_or(|b| b.len() == n), "few-rows Linear: bias [n]");
    let mut y = vec![0.0f32; rows * n];
    let yp = crate::ops::cpu_math::SendPtr(y.as_mut_ptr());
    feature_blocks(n, &|j0, nb| {
        // SAFETY: this block alone writes columns [j0, j0 + nb) of y's `rows` rows of n floats.
        unsafe {
            reclmis_cpu_loops::gemm::few_rows_block(
                x,
                &w[j0 * k..(j0 + nb) * k],
                bias.map(|b| &b[j0..j0 + nb]),
                yp.get().add(j0),
                n,
                k,
                rows,
            )
        };
    });
    y
}

/// `block(j0, nb)` for each block of at most 64 output features [j0, j0 + nb) of n, spread over
/// the threads (the few-rows Linears' tasks).
fn feature_blocks(n: usize, block: &(dyn Fn(usize, usize) + Sync)) {
    const BLOCK: usize = 64;
    crate::ops::cpu_math::par_tasks(n.div_ceil(BLOCK), &|blk| block(blk * BLOCK, BLOCK.min(n - blk * BLOCK)));
}

/// `linear_few_rows` on bf16 x [rows, k] and w [n, k] as stored, on AVX512_BF16
/// (`bf16dot::few_rows_block`): y = act(x·wᵀ + bias) rounded once to bf16. Callers check
/// `bf16dot::available()`.
#[cfg(feature = "autocast")]
pub(crate) fn linear_few_rows_bf16(
    x: &crate::tensor::Tensor,
    w: &crate::tensor::Tensor,
    bias: Option<&[f32]>,
    rows: usize,
    k: usize,
    n: usize,
    relu: bool,
) -> crate::error::Result<Vec<half::bf16>> {
    let (xv, wv): (&[u16], &[u16]) =
        (bytemuck::cast_slice(x.cpu_bf16("linear")?), bytemuck::cast_slice(w.cpu_bf16("linear")?));
    assert!(xv.len() == rows * k && wv.len() == n * k, "few-rows Linear: x [rows, k], w [n, k]");
    assert!(bias.is_none_or(|b| b.len() == n), "few-rows Linear: bias [n]");
    let mut y = vec![0u16; rows * n];
    let yp = crate::ops::cpu_math::SendPtr(y.as_mut_ptr());
    feature_blocks(n, &|j0, nb| {
        // SAFETY: the caller checked the CPU's features; this block alone writes columns
        // [j0, j0 + nb) of y's `rows` rows of n values.
        unsafe {
            reclmis_cpu_loops::bf16dot::few_rows_block(
                xv,
                &wv[j0 * k..(j0 + nb) * k],
                bias.map(|b| &b[j0..j0 + nb]),
                yp.get().add(j0),
                n,
                k,
                rows,
                relu,
            )
        };
    });
    Ok(bytemuck::cast_vec(y))
}

/// A bf16 tensor's values widened into a plain buffer (not a tensor: the device's memory
/// accounting counts what a GPU would hold, and a GPU widens nothing).
/// In parallel pieces (`half`'s slice conversion): the activations widened here are megabytes,
/// and one thread element by element made the bf16 attention 2-4x slower than its f32 kernel.
pub(crate) fn widened(t: &crate::tensor::Tensor, op: &'static str) -> crate::error::Result<Vec<f32>> {
    use half::slice::HalfFloatSliceExt;
    const PIECE: usize = 1 << 16;
    let src = t.cpu_bf16(op)?;
    let mut out = vec![0f32; src.len()];
    out.par_chunks_mut(PIECE).zip(src.par_chunks(PIECE)).for_each(|(o, x)| x.convert_to_f32_slice(o));
    Ok(out)
}

/// f32 results rounded once to a bf16 tensor (in parallel pieces, as `cast` rounds).
pub(crate) fn bf16_tensor(
    v: &[f32],
    shape: &[usize],
    dev: &crate::device::Device,
) -> crate::error::Result<crate::tensor::Tensor> {
    let mut out = vec![half::bf16::ZERO; v.len()];
    crate::ops::cast::cpu::round_into(&mut out, v);
    crate::tensor::Tensor::from_vec_bf16(out, shape, dev)
}

/// Rows per task of the bf16 dot GEMM: each task packs its rows of A once per k block and
/// passes them over its B panels (8 register tiles of rows per B panel held in L1).
#[cfg(feature = "autocast")]
const DOT_ROWS: usize = 8 * reclmis_cpu_loops::bf16dot::MR;
/// Row tasks from which each task takes every column (A packed once per k block).
#[cfg(feature = "autocast")]
const DOT_ROW_TASKS: usize = 16;
/// B panels (of 32 columns) per task when there are fewer row tasks.
#[cfg(feature = "autocast")]
const DOT_PANELS: usize = 8;

/// C = act(alpha·A·B (+ bias)) in bf16 from bf16 A and B on AVX512_BF16
/// (`reclmis_cpu_loops::bf16dot`: the products exact, f32 sums, the bias and the ReLU in f32,
/// one rounding), without widening either operand or passing over an f32 C; B packed once per
/// matrix of the batch (once in all when the batch shares it), tasks of rows × columns spread
/// over the threads. Callers check `bf16dot::available()` and that the product is not empty
/// (k > 0 and some output).
#[cfg(feature = "autocast")]
pub(crate) fn gemm_bf16_dot(
    a: &crate::tensor::Tensor,
    b: &crate::tensor::Tensor,
    s: &GemmShape,
    alpha: f32,
    bias: Option<&[f32]>,
    relu: bool,
) -> crate::error::Result<Vec<half::bf16>> {
    let len = crate::ops::product(&[s.batch, s.m, s.n]).expect("the output's size overflows");
    // every element is written by exactly one task (k > 0): no zeroing pass (NaN under the
    // tests' poison switch, so a missed element shows)
    let mut c: Vec<u16> =
        if crate::device::poison_enabled() { vec![half::bf16::NAN.to_bits(); len] } else { Vec::with_capacity(len) };
    let cp = crate::ops::cpu_math::SendPtr(c.as_mut_ptr());
    let mn = s.m * s.n;
    dot_batch(a, b, s, alpha, bias, &|z| reclmis_cpu_loops::bf16dot::Dst::Bf16 {
        ptr: cp.get().wrapping_add(z * mn),
        ld: s.n,
        relu,
    })?;
    // SAFETY: the tasks wrote every row of every matrix, all n columns (k > 0: `block` stores
    // each tile whole), within the capacity of len values.
    unsafe { c.set_len(len) };
    Ok(bytemuck::cast_vec(c))
}

/// `gemm_bf16_dot` (alpha 1, no bias) with its f32 sums stored unrounded: [batch, m, n] f32,
/// for a caller that adds the batch's products before its one rounding.
#[cfg(feature = "autocast")]
pub(crate) fn gemm_bf16_dot_f32(
    a: &crate::tensor::Tensor,
    b: &crate::tensor::Tensor,
    s: &GemmShape,
) -> crate::error::Result<Vec<f32>> {
    let len = crate::ops::product(&[s.batch, s.m, s.n]).expect("the output's size overflows");
    let mut c = crate::ops::cpu_math::Unfilled::new(len);
    let cp = c.ptr();
    let mn = s.m * s.n;
    dot_batch(a, b, s, 1.0, None, &|z| reclmis_cpu_loops::bf16dot::Dst::F32 {
        ptr: cp.get().wrapping_add(z * mn),
        ld: s.n,
    })?;
    // SAFETY: as gemm_bf16_dot's: every element of every matrix written once.
    Ok(unsafe { c.filled() })
}

/// The batch of products of `gemm_bf16_dot`, matrix z stored through `dst(z)` (which must
/// address an [m, n] row-major matrix, ld n, of its own).
#[cfg(feature = "autocast")]
fn dot_batch(
    a: &crate::tensor::Tensor,
    b: &crate::tensor::Tensor,
    s: &GemmShape,
    alpha: f32,
    bias: Option<&[f32]>,
    dst: &(dyn Fn(usize) -> reclmis_cpu_loops::bf16dot::Dst + Sync),
) -> crate::error::Result<()> {
    use reclmis_cpu_loops::bf16dot::{self, PackedB, Strided};
    let (m, n, k) = (s.m, s.n, s.k);
    let (av, bv): (&[u16], &[u16]) =
        (bytemuck::cast_slice(a.cpu_bf16("matmul")?), bytemuck::cast_slice(b.cpu_bf16("matmul")?));
    crate::ops::assert_len("gemm", "A", av.len(), s.span(s.sa, m, k));
    crate::ops::assert_len("gemm", "B", bv.len(), s.span(s.sb, k, n));
    let len = crate::ops::product(&[s.batch, m, n]).expect("the output's size overflows");
    // with k = 0 no tile would be stored and C would stay unwritten: the callers take that case
    // (and empty products) elsewhere
    assert!(k > 0 && len > 0, "bf16 dot GEMM: an empty product ({m}×{n}, k {k}, batch {})", s.batch);
    let pack = |z: usize| {
        let b = Strided { data: &bv[z * s.sb.0..], rs: s.sb.1, cs: s.sb.2 };
        PackedB::new_in(b, k, n, &|groups, pack| crate::ops::cpu_math::par_tasks(groups, pack))
    };
    // a B shared by the batch (batch stride 0) is packed once
    let shared = (s.sb.0 == 0).then(|| pack(0));
    for z in 0..s.batch {
        let a = Strided { data: &av[z * s.sa.0..], rs: s.sa.1, cs: s.sa.2 };
        let own;
        let packed = match &shared {
            Some(p) => p,
            None => {
                own = pack(z);
                &own
            }
        };
        // enough row tasks: each takes every column (A packed once); otherwise columns split too
        let row_tasks = m.div_ceil(DOT_ROWS);
        let per_task = if row_tasks >= DOT_ROW_TASKS { packed.panels() } else { DOT_PANELS };
        let col_tasks = packed.panels().div_ceil(per_task);
        crate::ops::cpu_math::par_tasks(row_tasks * col_tasks, &|t| {
            let (r0, q0) = (t / col_tasks * DOT_ROWS, t % col_tasks * per_task);
            let (rows, panels) = (r0..m.min(r0 + DOT_ROWS), q0..packed.panels().min(q0 + per_task));
            // SAFETY: the caller checked the CPU's features; task t alone writes its rows × the
            // columns of its panels of matrix z, which `dst(z)` addresses as [m, n] (ld n) of
            // its own.
            unsafe { bf16dot::block(a, packed, rows, panels, dst(z), alpha, bias) };
        });
    }
    Ok(())
}
