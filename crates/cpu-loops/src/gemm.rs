//! The few-rows Linear (`reclmis::ops::gemm::cpu::linear_few_rows`): the GEMM library packs the
//! weights, which costs as much as the product when only a few rows multiply them.

use crate::simd::{dispatch, Kernel, Simd};

/// y[r][j] = ⟨x_r, w_j⟩ (+ bias_j) for a block of output features j < w.len() / k, written at
/// `y + r·ldy + j`; x [rows, k], w [nf, k] with rows contiguous. Register tiles of F features × R
/// rows with fixed bounds (a partial tile repeats its last row or feature), so that the tile is
/// unrolled into registers, and raw-pointer loads in the inner loop (bounds checked once per
/// tile: with slice indexing the loop was half index arithmetic and spills). Measured on the
/// 2-core AMD EPYC dev VM at the CLIP tower's shapes (18 rows; k, n of 512/1536, 512/512,
/// 512/2048, 2048/512), per layer: 4 × 2 with variable bounds (the earlier kernel) 1.14 ms,
/// 4 × 2 fixed 1.08, 4 × 3 0.97, 3 × 6 1.07, 4 × 4 1.14, 2 × 6 1.11, 6 × 3 0.92 (kept: 18
/// accumulators, 9 loads per 18 products). Each product is fused into its lane's sum (FMA; the
/// scalar path's `f32::mul_add` rounds the same) and each output's lanes, horizontal sum and
/// tail are formed in the same order whatever the tile, so every CPU and tile gives the same
/// bits.
///
/// # Safety
/// k > 0 (with k = 0 nothing is written); `y` must be valid for writes at `r·ldy + j` for every
/// r < rows and j < w.len() / k, and no other thread may access those floats during the call.
pub unsafe fn few_rows_block(
    x: &[f32],
    w: &[f32],
    bias: Option<&[f32]>,
    y: *mut f32,
    ldy: usize,
    k: usize,
    rows: usize,
) {
    dispatch(FewRows { x, w, bias, y, ldy, k, rows })
}

/// The register tile: F output features × R rows (F·R accumulators, F + R loads per F·R
/// products of 16 lanes).
const F: usize = 6;
const R: usize = 3;

struct FewRows<'a> {
    x: &'a [f32],
    w: &'a [f32],
    bias: Option<&'a [f32]>,
    y: *mut f32,
    ldy: usize,
    k: usize,
    rows: usize,
}

impl Kernel for FewRows<'_> {
    type Out = ();
    #[inline(always)]
    fn run<S: Simd>(self, s: S) {
        let FewRows { x, w, bias, y, ldy, k, rows } = self;
        const L: usize = 16;
        if k == 0 || rows == 0 {
            return;
        }
        let nf = w.len() / k;
        assert!(x.len() >= rows * k && bias.is_none_or(|b| b.len() >= nf), "few-rows Linear: x [rows, k], bias [n]");
        let kv = k / L * L;
        if S::SCALAR {
            // one output at a time with the tile's arithmetic (16 lane sums, fused, in k order;
            // the halving sum, the tail, the bias): the same bits as the tiles, and 4 KB less
            // code in reclmis-infer than the scalar tile unrolled
            for r in 0..rows {
                let xr = &x[r * k..][..k];
                for jj in 0..nf {
                    let wr = &w[jj * k..][..k];
                    let mut acc = [0.0f32; L];
                    for c in (0..kv).step_by(L) {
                        for l in 0..L {
                            acc[l] = xr[c + l].mul_add(wr[c + l], acc[l]);
                        }
                    }
                    let tail: f32 = (kv..k).map(|cc| xr[cc] * wr[cc]).sum();
                    let v = crate::math::hsum(acc) + tail + bias.map_or(0.0, |b| b[jj]);
                    // SAFETY: r < rows and jj < nf: the caller's contract.
                    unsafe { *y.add(r * ldy + jj) = v };
                }
            }
            return;
        }
        let mut j = 0;
        while j < nf {
            let jn = (nf - j).min(F);
            // each a whole row of k floats (sliced here: the bounds checks of the tile)
            let wr: [&[f32]; F] = std::array::from_fn(|jj| &w[(j + jj.min(jn - 1)) * k..][..k]);
            let mut r = 0;
            while r < rows {
                let rn = (rows - r).min(R);
                // fixed tile bounds (fully unrolled, all in registers): a missing row or feature
                // repeats the last one; its sums are computed and dropped
                let xr: [&[f32]; R] = std::array::from_fn(|ri| &x[(r + ri.min(rn - 1)) * k..][..k]);
                let mut acc = [s.zero(); F * R];
                let mut c = 0;
                while c < kv {
                    // SAFETY: every row holds k >= kv >= c + 16 floats.
                    let xs: [S::V; R] = std::array::from_fn(|ri| unsafe { s.load_ptr(xr[ri].as_ptr().add(c)) });
                    for jj in 0..F {
                        let wv = unsafe { s.load_ptr(wr[jj].as_ptr().add(c)) };
                        for ri in 0..R {
                            acc[jj * R + ri] = s.mul_add(xs[ri], wv, acc[jj * R + ri]);
                        }
                    }
                    c += L;
                }
                for jj in 0..jn {
                    let b = bias.map_or(0.0, |b| b[j + jj]);
                    for ri in 0..rn {
                        let tail: f32 = (kv..k).map(|cc| xr[ri][cc] * wr[jj][cc]).sum();
                        let v = crate::math::hsum(s.to_array(acc[jj * R + ri])) + tail + b;
                        // SAFETY: r + ri < rows and j + jj < nf: the caller's contract.
                        unsafe { *y.add((r + ri) * ldy + j + jj) = v };
                    }
                }
                r += rn;
            }
            j += jn;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::FewRows;

    /// Every path gives the same bits (no FMA, the same order of sums), within f32 rounding of
    /// the f64 product.
    #[test]
    fn every_path_matches_f64_and_the_others_bit_for_bit() {
        for (rows, k, nf) in [(1usize, 7usize, 3usize), (2, 16, 4), (3, 40, 5), (5, 512, 9), (18, 100, 64)] {
            let x: Vec<f32> = (0..rows * k).map(|i| ((i * 37 % 101) as f32 - 50.0) / 17.0).collect();
            let w: Vec<f32> = (0..nf * k).map(|i| ((i * 53 % 89) as f32 - 44.0) / 23.0).collect();
            let bias: Vec<f32> = (0..nf).map(|j| j as f32 * 0.25 - 1.0).collect();
            let outs = crate::simd::each_path(Probe { rows, k, nf, x: &x, w: &w, bias: &bias });
            for (name, yt) in &outs {
                assert_eq!(yt, &outs[0].1, "{name} differs from scalar at rows {rows}, k {k}");
                for j in 0..nf {
                    for r in 0..rows {
                        let want: f64 =
                            bias[j] as f64 + (0..k).map(|c| x[r * k + c] as f64 * w[j * k + c] as f64).sum::<f64>();
                        let mag: f64 = (0..k).map(|c| (x[r * k + c] as f64 * w[j * k + c] as f64).abs()).sum::<f64>();
                        let got = yt[r * nf + j] as f64;
                        assert!((got - want).abs() <= 1e-6 * (mag + 1.0), "{name}: y[{r}][{j}] = {got}, want {want}");
                    }
                }
            }
        }
    }

    /// FewRows owns a mutable output; the probe makes a fresh one per path.
    #[derive(Clone)]
    struct Probe<'a> {
        rows: usize,
        k: usize,
        nf: usize,
        x: &'a [f32],
        w: &'a [f32],
        bias: &'a [f32],
    }

    impl crate::simd::Kernel for Probe<'_> {
        type Out = Vec<f32>;
        #[inline(always)]
        fn run<S: crate::simd::Simd>(self, s: S) -> Vec<f32> {
            let mut y = vec![f32::NAN; self.nf * self.rows];
            let (x, w, bias, k, rows) = (self.x, self.w, Some(self.bias), self.k, self.rows);
            FewRows { x, w, bias, y: y.as_mut_ptr(), ldy: self.nf, k, rows }.run(s);
            y
        }
    }
}
