//! Naive pooling and upsampling in f64. Tests only.

/// (y, argmax in window as dy·2 + dx), windows visited in row-major order, NaN wins, first max
/// wins ties.
pub fn max_pool2(x: &[f64], planes: usize, h: usize, w: usize) -> (Vec<f64>, Vec<i32>) {
    let (oh, ow) = (h / 2, w / 2);
    let (mut y, mut idx) = (Vec::new(), Vec::new());
    for p in 0..planes {
        for r in 0..oh {
            for c in 0..ow {
                let at = |k: usize| x[p * h * w + (2 * r + k / 2) * w + 2 * c + k % 2];
                let mut bi = 0;
                for k in 1..4 {
                    let (v, b) = (at(k), at(bi));
                    if (v.is_nan() && !b.is_nan()) || v > b {
                        bi = k;
                    }
                }
                y.push(at(bi));
                idx.push(bi as i32);
            }
        }
    }
    (y, idx)
}

pub fn max_pool2_backward(dy: &[f64], idx: &[i32], planes: usize, h: usize, w: usize) -> Vec<f64> {
    let (oh, ow) = (h / 2, w / 2);
    let mut dx = vec![0.0; planes * h * w];
    for p in 0..planes {
        for r in 0..oh {
            for c in 0..ow {
                let o = (p * oh + r) * ow + c;
                let k = idx[o] as usize;
                dx[p * h * w + (2 * r + k / 2) * w + 2 * c + k % 2] += dy[o];
            }
        }
    }
    dx
}

pub fn upsample2(x: &[f64], planes: usize, h: usize, w: usize) -> Vec<f64> {
    let mut y = Vec::with_capacity(planes * 4 * h * w);
    for p in 0..planes {
        for r in 0..2 * h {
            for c in 0..2 * w {
                y.push(x[p * h * w + (r / 2) * w + c / 2]);
            }
        }
    }
    y
}

pub fn upsample2_backward(dy: &[f64], planes: usize, h: usize, w: usize) -> Vec<f64> {
    let mut dx = vec![0.0; planes * h * w];
    for p in 0..planes {
        for r in 0..2 * h {
            for c in 0..2 * w {
                dx[p * h * w + (r / 2) * w + c / 2] += dy[(p * 2 * h + r) * 2 * w + c];
            }
        }
    }
    dx
}
