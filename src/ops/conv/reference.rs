//! Naive 2-D convolution (kh x kw, padding (kh/2, kw/2), stride 1, NCHW) and its gradients in
//! f64. Tests only.

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
