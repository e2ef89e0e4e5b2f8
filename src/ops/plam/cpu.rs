//! cpu PLAM gate after the 1×1 convolutions: channel-outer loops over contiguous ranges of
//! pixels (vectorisable), then the 3→6→1 MLP per pixel, each phase split over the threads by
//! pixel ranges or rows (not by image: at batch 1 that left one thread idle). The gate's
//! tensors are f32 or, at bf16 autocast, bf16 (`Val`): read widened (exact), math in f32, each
//! bf16 store rounded once, as kernels/plam.cu's `_bf16` kernels.

use super::PlamWeights;
use crate::error::Result;
use crate::ops::cpu_math::{par_tasks, SendPtr, Unfilled};

/// An element of the gate's tensors: f32, or bf16 at bf16 autocast.
pub(crate) trait Val: Copy + Send + Sync {
    fn get(self) -> f32;
    /// `x` stored (bf16: rounded to nearest even, as the engine's cast)
    fn put(x: f32) -> Self;
}

impl Val for f32 {
    #[inline(always)]
    fn get(self) -> f32 {
        self
    }
    #[inline(always)]
    fn put(x: f32) -> f32 {
        x
    }
}

impl Val for half::bf16 {
    #[inline(always)]
    fn get(self) -> f32 {
        f32::from_bits((self.to_bits() as u32) << 16)
    }
    #[inline(always)]
    fn put(x: f32) -> half::bf16 {
        half::bf16::from_bits(crate::ops::cast::cpu::bf16_bits(x))
    }
}

/// The gate MLP's 31 parameters on the host.
pub struct Fc {
    w1: Vec<f32>,
    b1: Vec<f32>,
    w2: Vec<f32>,
    b2: f32,
}

impl Fc {
    pub fn read(w: &PlamWeights) -> Result<Fc> {
        Ok(Fc { w1: w.fc1_w.to_vec()?, b1: w.fc1_b.to_vec()?, w2: w.fc2_w.to_vec()?, b2: w.fc2_b.to_vec()?[0] })
    }
}

/// Pixels per task: one image's map is cut into ranges so that batch 1 keeps every thread busy
/// (per channel a task reads 16 KB of a row).
const PIX: usize = 4096;

/// How many pixel ranges of `pix` pixels B maps of hw pixels make (the tasks of `range`).
fn ranges(b: usize, hw: usize, pix: usize) -> usize {
    b * hw.div_ceil(pix)
}

/// The pixel ranges of one image's map: (image, first pixel, pixels) of task t.
fn range(t: usize, hw: usize, pix: usize) -> (usize, usize, usize) {
    let per = hw.div_ceil(pix).max(1);
    let (i, p0) = (t / per, (t % per) * pix);
    (i, p0, pix.min(hw - p0.min(hw)))
}

/// (mean_c ReLU(A), max_c ReLU(M), argmax) of every pixel of every image ([B, HW] each), in
/// parallel over ranges of pixels; each pixel visits its channels in order.
fn features<T: Val>(a: &[T], m: &[T], b: usize, c: usize, hw: usize) -> (Vec<f32>, Vec<f32>, Vec<i32>) {
    let n = b * hw;
    assert!(a.len() == n * c && m.len() == n * c, "plam features: a and m must be [B, C, HW]");
    let (mut sa, mut mm, mut arg) = (vec![0.0f32; n], vec![f32::NEG_INFINITY; n], vec![0i32; n]);
    let (sp, mp, ap) = (SendPtr(sa.as_mut_ptr()), SendPtr(mm.as_mut_ptr()), SendPtr(arg.as_mut_ptr()));
    par_tasks(ranges(b, hw, PIX), &|t| {
        let (i, p0, np) = range(t, hw, PIX);
        // SAFETY: task t alone writes pixels [p0, p0 + np) of image i, inside the n elements of
        // each output (np <= hw − p0).
        let (sa, mm, arg) = unsafe {
            (
                std::slice::from_raw_parts_mut(sp.get().add(i * hw + p0), np),
                std::slice::from_raw_parts_mut(mp.get().add(i * hw + p0), np),
                std::slice::from_raw_parts_mut(ap.get().add(i * hw + p0), np),
            )
        };
        for ch in 0..c {
            let off = (i * c + ch) * hw + p0;
            let (ar, mr) = (&a[off..off + np], &m[off..off + np]);
            // selects, not branches or `f32::max`, so that the loop vectorises (ReLU of NaN is 0
            // either way, as the kernels' fmaxf)
            for p in 0..np {
                let (av, mv) = (ar[p].get(), mr[p].get());
                sa[p] += if av > 0.0 { av } else { 0.0 };
                let v = if mv > 0.0 { mv } else { 0.0 };
                let better = v > mm[p];
                mm[p] = if better { v } else { mm[p] };
                arg[p] = if better { ch as i32 } else { arg[p] };
            }
        }
        sa.iter_mut().for_each(|v| *v /= c as f32);
    });
    (sa, mm, arg)
}

/// out[i, ch, p] = f[i, p] · x[i, ch, p] over every row of x [B, C, HW], rows in parallel.
fn scale_rows<T: Val>(f: &[f32], x: &[T], c: usize, hw: usize) -> Vec<T> {
    let rows = x.len() / hw.max(1);
    assert!(rows * hw == x.len() && f.len() * c == x.len(), "plam: f must be [B, HW] for x [B, C, HW]");
    // written whole below (under the tests' poison switch NaN first, as `Unfilled`)
    let mut out: Vec<T> =
        if crate::device::poison_enabled() { vec![T::put(f32::NAN); x.len()] } else { Vec::with_capacity(x.len()) };
    let op = SendPtr(out.as_mut_ptr());
    par_tasks(rows, &|r| {
        let (fi, xr) = (&f[(r / c) * hw..][..hw], &x[r * hw..][..hw]);
        // SAFETY: task r alone writes row r, inside the x.len() elements out has room for
        // (written through the pointer only: they may be uninitialised).
        let o = unsafe { op.get().add(r * hw) };
        for p in 0..hw {
            // SAFETY: element p of row r, inside out's room (above).
            unsafe { o.add(p).write(T::put(fi[p] * xr[p].get())) };
        }
    });
    // SAFETY: the rows cover every element (rows · hw = x.len(), asserted).
    unsafe { out.set_len(x.len()) };
    out
}

/// (out, g, arg)
#[cfg(feature = "train")]
pub(crate) fn forward<T: Val>(
    a: &[T],
    m: &[T],
    s: &[T],
    fc: &Fc,
    b: usize,
    c: usize,
    hw: usize,
) -> (Vec<T>, Vec<f32>, Vec<i32>) {
    let (fa, fm, arg) = features(a, m, b, c, hw);
    let mut g = vec![0.0f32; b * hw];
    let gp = SendPtr(g.as_mut_ptr());
    par_tasks(ranges(b, hw, PIX), &|t| {
        let (i, p0, np) = range(t, hw, PIX);
        for q in i * hw + p0..i * hw + p0 + np {
            // SAFETY: task t alone writes its pixels, inside g's b·hw floats.
            unsafe { *gp.get().add(q) = gate(fc, [fa[q], fm[q], fa[q] + fm[q]]).0 };
        }
    });
    (scale_rows(&g, s, c, hw), g, arg)
}

/// Floats of the two 1×1 products of one pixel block (2·C × pixels): the block stays in L2
/// between the products and the channel reductions that read it.
const BLOCK_FLOATS: usize = 1 << 16;

/// The gate's output g·s without its backward's state (inference): per pixel block of each
/// task's range, the two 1×1 products A, M [C, block] (GEMMs reading the block of s once),
/// then the channel mean / max and the MLP, then g·s, all while the block is in cache. The
/// separate path writes A and M for the whole map and reads them back (2 × 2 · C·HW floats of
/// memory traffic, and at batch 8 the decoder's two largest tensors). The channels are visited
/// in the same order as `features`, so the gate's arithmetic is the same; the products' sums
/// may be blocked differently by the GEMM (within its tested bound).
pub(crate) fn infer(s: &[f32], w_avg: &[f32], w_max: &[f32], fc: &Fc, b: usize, c: usize, hw: usize) -> Vec<f32> {
    assert!(s.len() == b * c * hw && w_avg.len() == c * c && w_max.len() == c * c, "plam: s [B, C, HW], w [C, C]");
    let blk = (BLOCK_FLOATS / (2 * c).max(1)).clamp(16, PIX) / 16 * 16;
    let mut out = Unfilled::new(s.len());
    let op = out.ptr();
    // ranges of whole blocks, at least four per thread (the deep layers' small maps at batch
    // 1 would otherwise be one task)
    let threads = rayon::current_num_threads();
    let pix = (b * hw).div_ceil(4 * threads).div_ceil(blk).max(1) * blk;
    let pix = pix.min(PIX.div_ceil(blk) * blk);
    let n_ranges = ranges(b, hw, pix);
    // a task per scratch slot (A, M, the mean and the max), each taking every `slots`-th range:
    // allocated once, not per range (a fresh scratch per range, freed between the decoder's
    // large tensors, fragmented the heap: infer_b8's peak RSS +165 MB)
    let slots = (4 * threads).min(n_ranges);
    let per = 2 * c * blk + 2 * blk;
    let mut scratch = vec![0.0f32; slots * per];
    let sp = SendPtr(scratch.as_mut_ptr());
    // range t of the map, with buf as its scratch
    let range_block = |t: usize, buf: &mut [f32]| {
        let (i, p0, np) = range(t, hw, pix);
        let (am, rest) = buf.split_at_mut(2 * c * blk);
        let (fa, fm) = rest.split_at_mut(blk);
        let mut q = 0;
        while q < np {
            let n = blk.min(np - q);
            let col0 = i * c * hw + p0 + q;
            for (k, w) in [w_avg, w_max].into_iter().enumerate() {
                // SAFETY: dst: [C, n] row-major in am (2·C·blk floats); lhs: w [C, C] row-major;
                // rhs: s's channels of pixels [col0, col0 + n) of image i, row stride hw, inside s
                // (p0 + q + n <= hw).
                unsafe {
                    gemm::gemm(
                        c,
                        n,
                        c,
                        am[k * c * n..].as_mut_ptr(),
                        1,
                        n as isize,
                        false,
                        w.as_ptr(),
                        1,
                        c as isize,
                        s[col0..].as_ptr(),
                        1,
                        hw as isize,
                        0.0,
                        1.0,
                        false,
                        false,
                        false,
                        gemm::Parallelism::None,
                    )
                }
            }
            let (fa, fm) = (&mut fa[..n], &mut fm[..n]);
            fa.fill(0.0);
            fm.fill(f32::NEG_INFINITY);
            for ch in 0..c {
                let (ar, mr) = (&am[ch * n..][..n], &am[(c + ch) * n..][..n]);
                for p in 0..n {
                    fa[p] += ar[p].max(0.0);
                    fm[p] = fm[p].max(mr[p].max(0.0));
                }
            }
            for p in 0..n {
                let a = fa[p] / c as f32;
                fa[p] = gate(fc, [a, fm[p], a + fm[p]]).0;
            }
            for ch in 0..c {
                let off = col0 + ch * hw;
                // SAFETY: range t (one task's) alone writes pixels [p0, p0 + np) of image i's
                // rows, inside out.
                let o = unsafe { std::slice::from_raw_parts_mut(op.get().add(off), n) };
                for ((o, &g), &x) in o.iter_mut().zip(fa.iter()).zip(&s[off..off + n]) {
                    *o = g * x;
                }
            }
            q += n;
        }
    };
    par_tasks(slots, &|k| {
        // SAFETY: task k alone uses floats [k·per, (k + 1)·per) of scratch.
        let buf = unsafe { std::slice::from_raw_parts_mut(sp.get().add(k * per), per) };
        for t in (k..n_ranges).step_by(slots) {
            range_block(t, buf);
        }
    });
    // SAFETY: the tasks' ranges cover every pixel of every image, each for every channel.
    unsafe { out.filled() }
}

/// (g, the six pre-activations)
fn gate(fc: &Fc, f: [f32; 3]) -> (f32, [f32; 6]) {
    let mut z = [0.0f32; 6];
    let mut g = fc.b2;
    for (j, zj) in z.iter_mut().enumerate() {
        *zj = fc.w1[j * 3] * f[0] + fc.w1[j * 3 + 1] * f[1] + fc.w1[j * 3 + 2] * f[2] + fc.b1[j];
        g += fc.w2[j] * zj.max(0.0);
    }
    (g, z)
}

/// The direct path of the input gradient, g·dout (f32).
pub(crate) fn ds_direct(g: &[f32], dout: &[f32], c: usize, hw: usize) -> Vec<f32> {
    scale_rows(g, dout, c, hw)
}

#[cfg(feature = "autocast")]
/// The bf16 backward's input gradient (kernels/plam.cu's plam_gate_ds_bwd_bf16): (g·dout + dxa) +
/// dxm in f32, rounded once, written over dxa. Rows in parallel.
pub(crate) fn ds_bf16(g: &[f32], dout: &[half::bf16], dxa: &mut [half::bf16], dxm: &[half::bf16], c: usize, hw: usize) {
    let rows = dout.len() / hw.max(1);
    assert!(dxa.len() == dout.len() && dxm.len() == dout.len() && g.len() * c == dout.len(), "plam ds: shapes");
    let dp = SendPtr(dxa.as_mut_ptr());
    par_tasks(rows, &|r| {
        let (gi, dr, mr) = (&g[(r / c) * hw..][..hw], &dout[r * hw..][..hw], &dxm[r * hw..][..hw]);
        // SAFETY: task r alone reads and writes row r of dxa (rows · hw elements).
        let o = unsafe { std::slice::from_raw_parts_mut(dp.get().add(r * hw), hw) };
        for p in 0..hw {
            // two roundings of f32 (no fused multiply-add), as the kernel
            o[p] = Val::put(gi[p] * dr[p].get() + o[p].get() + mr[p].get());
        }
    });
}

/// The 31 gate-parameter gradients; dA and dM are written over `a` and `m` (each element of a
/// and m is read before its own gradient replaces it: the backward's working set at the
/// decoder's full resolution is two tensors smaller). The direct path g·dout is `ds_direct`.
#[allow(clippy::too_many_arguments)]
pub(crate) fn backward<T: Val>(
    a: &mut [T],
    m: &mut [T],
    s: &[T],
    dout: &[T],
    g: &[f32],
    fc: &Fc,
    b: usize,
    c: usize,
    hw: usize,
) -> Vec<f32> {
    let n = b * hw;
    assert!(s.len() == n * c && dout.len() == n * c && g.len() == n, "plam backward: shapes");
    // every phase runs over all the threads at any batch (the gate is per pixel, its products
    // per row): the features before a and m are overwritten
    let (fa, fm, arg) = features(a, m, b, c, hw);
    // per range of pixels: dg = Σ_ch dout·s (channels in order), then the gate's parameter
    // gradients (f64 sums per range, then over ranges) and the gradients reaching mean ReLU(A)
    // and max ReLU(M)
    let tasks = ranges(b, hw, PIX);
    let (mut dav, mut dmv) = (vec![0.0f32; n], vec![0.0f32; n]);
    let mut parts = vec![[0.0f64; 31]; tasks];
    let (dap, dmp, pp) = (SendPtr(dav.as_mut_ptr()), SendPtr(dmv.as_mut_ptr()), SendPtr(parts.as_mut_ptr()));
    par_tasks(tasks, &|t| {
        let (i, p0, np) = range(t, hw, PIX);
        let mut dg = vec![0.0f32; np];
        for ch in 0..c {
            let off = (i * c + ch) * hw + p0;
            let (dr, sr) = (&dout[off..off + np], &s[off..off + np]);
            for p in 0..np {
                dg[p] += dr[p].get() * sr[p].get();
            }
        }
        // SAFETY: task t alone writes its pixels of dav and dmv and its own entry of parts.
        let (dav, dmv, acc) = unsafe {
            (
                std::slice::from_raw_parts_mut(dap.get().add(i * hw + p0), np),
                std::slice::from_raw_parts_mut(dmp.get().add(i * hw + p0), np),
                &mut *pp.get().add(t),
            )
        };
        for p in 0..np {
            let q = i * hw + p0 + p;
            let f = [fa[q], fm[q], fa[q] + fm[q]];
            let (_, z) = gate(fc, f);
            let mut df = [0.0f32; 3];
            for j in 0..6 {
                acc[24 + j] += (dg[p] * z[j].max(0.0)) as f64;
                let dz = if z[j] > 0.0 { dg[p] * fc.w2[j] } else { 0.0 };
                for k in 0..3 {
                    acc[j * 3 + k] += (dz * f[k]) as f64;
                    df[k] += dz * fc.w1[j * 3 + k];
                }
                acc[18 + j] += dz as f64;
            }
            acc[30] += dg[p] as f64;
            dav[p] = (df[0] + df[2]) / c as f32;
            dmv[p] = df[1] + df[2];
        }
    });
    // dA and dM over a and m, rows in parallel
    let (ap, mp) = (SendPtr(a.as_mut_ptr()), SendPtr(m.as_mut_ptr()));
    par_tasks(n * c / hw.max(1), &|r| {
        let (i, ch) = (r / c, r % c);
        // SAFETY: task r alone writes row r of a and m (n·c floats each, checked by features).
        let (ar, mr) = unsafe {
            (
                std::slice::from_raw_parts_mut(ap.get().add(r * hw), hw),
                std::slice::from_raw_parts_mut(mp.get().add(r * hw), hw),
            )
        };
        let (dav, dmv, arg) = (&dav[i * hw..][..hw], &dmv[i * hw..][..hw], &arg[i * hw..][..hw]);
        for p in 0..hw {
            let (a_pos, m_hit) = (ar[p].get() > 0.0, (arg[p] == ch as i32) & (mr[p].get() > 0.0));
            ar[p] = T::put(if a_pos { dav[p] } else { 0.0 });
            mr[p] = T::put(if m_hit { dmv[p] } else { 0.0 });
        }
    });
    (0..31).map(|k| parts.iter().map(|p| p[k]).sum::<f64>() as f32).collect()
}
