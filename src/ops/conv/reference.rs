//! Naive 2-D convolution (kh x kw, padding (kh/2, kw/2), stride 1, NCHW) and its gradients in
//! f64. Tests only.

use super::winograd::Tiles;
use super::ConvShape;

fn at(x: &[f64], s: &ConvShape, c: usize, b: usize, ch: usize, y: isize, xx: isize) -> f64 {
    if y < 0 || xx < 0 || y >= s.h as isize || xx >= s.w as isize {
        return 0.0;
    }
    x[((b * c + ch) * s.h + y as usize) * s.w + xx as usize]
}

pub fn conv2d(x: &[f64], w: &[f64], bias: Option<&[f64]>, s: &ConvShape) -> Vec<f64> {
    let (ph, pw) = ((s.kh / 2) as isize, (s.kw / 2) as isize);
    let mut y = vec![0.0; s.b * s.co * s.h * s.w];
    for b in 0..s.b {
        for co in 0..s.co {
            for r in 0..s.h {
                for c in 0..s.w {
                    let mut acc = bias.map_or(0.0, |v| v[co]);
                    for ci in 0..s.ci {
                        for kh in 0..s.kh {
                            for kw in 0..s.kw {
                                let (iy, ix) = (r as isize + kh as isize - ph, c as isize + kw as isize - pw);
                                let v = at(x, s, s.ci, b, ci, iy, ix);
                                acc += w[((co * s.ci + ci) * s.kh + kh) * s.kw + kw] * v;
                            }
                        }
                    }
                    y[((b * s.co + co) * s.h + r) * s.w + c] = acc;
                }
            }
        }
    }
    y
}

/// (dx, dw, db) of Σ dy · conv2d(x, w, b), each written as the sum over the terms that use it.
pub fn conv2d_backward(x: &[f64], w: &[f64], dy: &[f64], s: &ConvShape) -> (Vec<f64>, Vec<f64>, Vec<f64>) {
    let (ph, pw) = ((s.kh / 2) as isize, (s.kw / 2) as isize);
    let (mut dx, mut dw, mut db) = (vec![0.0; x.len()], vec![0.0; w.len()], vec![0.0; s.co]);
    for b in 0..s.b {
        for co in 0..s.co {
            for r in 0..s.h {
                for c in 0..s.w {
                    let g = dy[((b * s.co + co) * s.h + r) * s.w + c];
                    db[co] += g;
                    for ci in 0..s.ci {
                        for kh in 0..s.kh {
                            for kw in 0..s.kw {
                                let (iy, ix) = (r as isize + kh as isize - ph, c as isize + kw as isize - pw);
                                if iy < 0 || ix < 0 || iy >= s.h as isize || ix >= s.w as isize {
                                    continue;
                                }
                                let xi = ((b * s.ci + ci) * s.h + iy as usize) * s.w + ix as usize;
                                let wi = ((co * s.ci + ci) * s.kh + kh) * s.kw + kw;
                                dx[xi] += g * w[wi];
                                dw[wi] += g * x[xi];
                            }
                        }
                    }
                }
            }
        }
    }
    (dx, dw, db)
}

/// Per output pixel, the magnitude through which Winograd F(2×2, 3×3) rounds: the transforms
/// of the module doc applied to |g| and |d| with every coefficient taken absolute, i.e.
/// |Aᵀ| [Σ_ci (|G| |g| |G|ᵀ) ⊙ (|B|ᵀ |d| |B|)] |A|, plus |bias|.
pub fn winograd_magnitude(x: &[f64], w: &[f64], bias: Option<&[f64]>, s: &ConvShape) -> Vec<f64> {
    winograd_magnitude_tiles(Tiles::F2, x, w, bias, s)
}

/// A matrix as its rows.
type Rows = Vec<Vec<f64>>;

/// |G|, |Bᵀ| and |Aᵀ| of a transform (rows of α, α and m values; α = m + 2).
fn abs_matrices(tiles: Tiles) -> (Vec<[f64; 3]>, Rows, Rows) {
    let rows = |r: &[&[f64]]| r.iter().map(|x| x.iter().map(|v| v.abs()).collect()).collect();
    match tiles {
        Tiles::F2 => (
            vec![[1.0, 0.0, 0.0], [0.5, 0.5, 0.5], [0.5, 0.5, 0.5], [0.0, 0.0, 1.0]],
            rows(&[&[1.0, 0.0, -1.0, 0.0], &[0.0, 1.0, 1.0, 0.0], &[0.0, -1.0, 1.0, 0.0], &[0.0, 1.0, 0.0, -1.0]]),
            rows(&[&[1.0, 1.0, 1.0, 0.0], &[0.0, 1.0, -1.0, -1.0]]),
        ),
        Tiles::F4 => (
            vec![
                [0.25, 0.0, 0.0],
                [1.0 / 6.0, 1.0 / 6.0, 1.0 / 6.0],
                [1.0 / 6.0, 1.0 / 6.0, 1.0 / 6.0],
                [1.0 / 24.0, 1.0 / 12.0, 1.0 / 6.0],
                [1.0 / 24.0, 1.0 / 12.0, 1.0 / 6.0],
                [0.0, 0.0, 1.0],
            ],
            rows(&[
                &[4.0, 0.0, -5.0, 0.0, 1.0, 0.0],
                &[0.0, -4.0, -4.0, 1.0, 1.0, 0.0],
                &[0.0, 4.0, -4.0, -1.0, 1.0, 0.0],
                &[0.0, -2.0, -1.0, 2.0, 1.0, 0.0],
                &[0.0, 2.0, -1.0, -2.0, 1.0, 0.0],
                &[0.0, 4.0, 0.0, -5.0, 0.0, 1.0],
            ]),
            rows(&[
                &[1.0, 1.0, 1.0, 1.0, 1.0, 0.0],
                &[0.0, 1.0, -1.0, 2.0, -2.0, 0.0],
                &[0.0, 1.0, 1.0, 4.0, 4.0, 0.0],
                &[0.0, 1.0, -1.0, 8.0, -8.0, 1.0],
            ]),
        ),
    }
}

/// `winograd_magnitude` for either transform (F(4×4, 3×3): 6×6 patches at (4ty − 1, 4tx − 1),
/// coefficients up to 8 in Aᵀ and 5 in Bᵀ, so a larger magnitude than F(2×2)'s for the same data).
pub fn winograd_magnitude_tiles(tiles: Tiles, x: &[f64], w: &[f64], bias: Option<&[f64]>, s: &ConvShape) -> Vec<f64> {
    let (g_abs, bt_abs, at_abs) = abs_matrices(tiles);
    let (m, al) = (tiles.m(), tiles.m() + 2);
    let (h, wd) = (s.h as isize, s.w as isize);
    let mut out = vec![0.0f64; s.b * s.co * s.h * s.w];
    // |G| |g| |G|ᵀ per filter
    let u: Vec<Vec<f64>> = (0..s.co * s.ci)
        .map(|f| {
            let g = &w[f * 9..][..9];
            let mut u = vec![0.0; al * al];
            for r in 0..al {
                for c in 0..al {
                    for k in 0..3 {
                        for l in 0..3 {
                            u[r * al + c] += g_abs[r][k] * g[k * 3 + l].abs() * g_abs[c][l];
                        }
                    }
                }
            }
            u
        })
        .collect();
    for b in 0..s.b {
        for ty in 0..s.h.div_ceil(m) {
            for tx in 0..s.w.div_ceil(m) {
                // |B|ᵀ |d| |B| per input channel
                let v: Vec<Vec<f64>> = (0..s.ci)
                    .map(|ci| {
                        let at = |r: isize, c: isize| {
                            if r >= 0 && r < h && c >= 0 && c < wd {
                                x[((b * s.ci + ci) * s.h + r as usize) * s.w + c as usize].abs()
                            } else {
                                0.0
                            }
                        };
                        let mut v = vec![0.0; al * al];
                        for r in 0..al {
                            for c in 0..al {
                                for k in 0..al {
                                    for l in 0..al {
                                        let d = at((m * ty + k) as isize - 1, (m * tx + l) as isize - 1);
                                        v[r * al + c] += bt_abs[r][k] * d * bt_abs[c][l];
                                    }
                                }
                            }
                        }
                        v
                    })
                    .collect();
                for co in 0..s.co {
                    let mut mm = vec![0.0f64; al * al];
                    for (ci, vc) in v.iter().enumerate() {
                        for (k, (mv, vv)) in mm.iter_mut().zip(vc).enumerate() {
                            *mv += u[co * s.ci + ci][k] * vv;
                        }
                    }
                    for i in 0..m {
                        for j in 0..m {
                            let (yy, xx) = (m * ty + i, m * tx + j);
                            if yy < s.h && xx < s.w {
                                let mut y = bias.map_or(0.0, |bv| bv[co].abs());
                                for r in 0..al {
                                    for c in 0..al {
                                        y += at_abs[i][r] * mm[r * al + c] * at_abs[j][c];
                                    }
                                }
                                out[((b * s.co + co) * s.h + yy) * s.w + xx] = y;
                            }
                        }
                    }
                }
            }
        }
    }
    out
}

/// The weight transform rounds up to 4 times and the input transform twice (relative to the
/// magnitudes above), each of the 16 GEMMs sums Ci products, the output transform rounds up to
/// 4 times and the bias once: (Ci + 12)·eps, with a factor 2 of slack.
pub fn winograd_tol(ci: usize) -> f64 {
    winograd_tol_tiles(Tiles::F2, ci)
}

/// `winograd_tol` for either transform. F(4×4, 3×3) rounds more often per value: the weight
/// transform up to 4 times per pass (two passes) and once more through 1/6's representation, the
/// input transform 3 times per pass, the output transform 4 per pass and the bias once: (Ci + 24)
/// ·eps, with the same factor 2 of slack.
pub fn winograd_tol_tiles(tiles: Tiles, ci: usize) -> f64 {
    let extra = match tiles {
        Tiles::F2 => 12,
        Tiles::F4 => 24,
    };
    2.0 * (ci + extra) as f64 * crate::testing::EPS32
}

/// The magnitude through which the Winograd weight gradient rounds, per weight: the transforms
/// of `winograd::conv2d_wgrad` with every coefficient and value taken absolute,
/// |G|ᵀ [Σ_images Σ_tiles (|A| |dY| |A|ᵀ) ⊙ (|B|ᵀ |d| |B|)] |G|.
pub fn winograd_wgrad_magnitude(x: &[f64], dy: &[f64], s: &ConvShape) -> Vec<f64> {
    let (g_abs, bt_abs, at_abs) = abs_matrices(Tiles::F2);
    let (h, w) = (s.h as isize, s.w as isize);
    let mut du = vec![[[0.0f64; 4]; 4]; s.co * s.ci];
    for b in 0..s.b {
        for ty in 0..s.h.div_ceil(2) {
            for tx in 0..s.w.div_ceil(2) {
                let xin = |ci: usize, r: isize, c: isize| {
                    if r >= 0 && r < h && c >= 0 && c < w {
                        x[((b * s.ci + ci) * s.h + r as usize) * s.w + c as usize].abs()
                    } else {
                        0.0
                    }
                };
                let v: Vec<[[f64; 4]; 4]> = (0..s.ci)
                    .map(|ci| {
                        let mut v = [[0.0; 4]; 4];
                        for (r, vr) in v.iter_mut().enumerate() {
                            for (c, vv) in vr.iter_mut().enumerate() {
                                for k in 0..4 {
                                    for l in 0..4 {
                                        let d =
                                            xin(ci, 2 * ty as isize - 1 + k as isize, 2 * tx as isize - 1 + l as isize);
                                        *vv += bt_abs[r][k] * d * bt_abs[c][l];
                                    }
                                }
                            }
                        }
                        v
                    })
                    .collect();
                for co in 0..s.co {
                    let mut m = [[0.0f64; 4]; 4];
                    for (r, mr) in m.iter_mut().enumerate() {
                        for (c, mv) in mr.iter_mut().enumerate() {
                            for i in 0..2 {
                                for j in 0..2 {
                                    let (yy, xx) = (2 * ty + i, 2 * tx + j);
                                    if yy < s.h && xx < s.w {
                                        *mv += at_abs[i][r]
                                            * dy[((b * s.co + co) * s.h + yy) * s.w + xx].abs()
                                            * at_abs[j][c];
                                    }
                                }
                            }
                        }
                    }
                    for (ci, vc) in v.iter().enumerate() {
                        for r in 0..4 {
                            for c in 0..4 {
                                du[co * s.ci + ci][r][c] += m[r][c] * vc[r][c];
                            }
                        }
                    }
                }
            }
        }
    }
    let mut out = vec![0.0f64; s.co * s.ci * 9];
    for (f, u) in du.iter().enumerate() {
        for k in 0..3 {
            for l in 0..3 {
                let mut acc = 0.0;
                for r in 0..4 {
                    for c in 0..4 {
                        acc += g_abs[r][k] * u[r][c] * g_abs[c][l];
                    }
                }
                out[f * 9 + 3 * k + l] = acc;
            }
        }
    }
    out
}

/// The Winograd weight gradient's relative error bound: the input and output-gradient
/// transforms round twice each, the 16 GEMMs sum B·tiles products, the inverse transform rounds
/// up to 4 times: (B·tiles + 12)·eps, with a factor 2 of slack.
pub fn winograd_wgrad_tol(s: &ConvShape) -> f64 {
    2.0 * (s.b * s.h.div_ceil(2) * s.w.div_ceil(2) + 12) as f64 * crate::testing::EPS32
}
