//! Fast cpu reductions: rayon over the outer dim; the inner loops accumulate several lanes at once
//! so that they vectorise (a single running sum would serialise on the add latency).

use super::ReduceOp;
use crate::ops::cpu_math;
use rayon::prelude::*;

const LANES: usize = 16;

fn row_sum(x: &[f32]) -> f32 {
    let mut acc = [0.0f32; LANES];
    let chunks = x.chunks_exact(LANES);
    let tail: f32 = chunks.remainder().iter().sum();
    for c in chunks {
        for (a, &v) in acc.iter_mut().zip(c) {
            *a += v;
        }
    }
    acc.iter().sum::<f32>() + tail
}

pub fn reduce(x: &[f32], outer: usize, n: usize, inner: usize, op: ReduceOp) -> (Vec<f32>, Option<Vec<i32>>) {
    let mut y = vec![0.0f32; outer * inner];
    let mut idx = if op == ReduceOp::Max { vec![0i32; outer * inner] } else { Vec::new() };
    if outer * inner == 0 {
        return (y, (op == ReduceOp::Max).then_some(idx));
    }
    let scale = if op == ReduceOp::Mean { 1.0 / n as f32 } else { 1.0 };
    let work = |b: usize, yb: &mut [f32], ib: &mut [i32]| {
        let xb = &x[b * n * inner..(b + 1) * n * inner];
        match op {
            ReduceOp::Max => {
                let mut bi = vec![usize::MAX; inner];
                yb.fill(f32::NEG_INFINITY);
                for j in 0..n {
                    for c in 0..inner {
                        let v = xb[j * inner + c];
                        if cpu_math::max_better(v, j, yb[c], bi[c]) {
                            yb[c] = v;
                            bi[c] = j;
                        }
                    }
                }
                for (o, &i) in ib.iter_mut().zip(&bi) {
                    *o = i as i32;
                }
            }
            _ if inner == 1 => yb[0] = row_sum(xb) * scale,
            _ => {
                yb.fill(0.0);
                for j in 0..n {
                    for (o, &v) in yb.iter_mut().zip(&xb[j * inner..(j + 1) * inner]) {
                        *o += v;
                    }
                }
                yb.iter_mut().for_each(|o| *o *= scale);
            }
        }
    };
    if op == ReduceOp::Max {
        y.par_chunks_mut(inner).zip(idx.par_chunks_mut(inner)).enumerate().for_each(|(b, (yb, ib))| work(b, yb, ib));
    } else {
        y.par_chunks_mut(inner).enumerate().for_each(|(b, yb)| work(b, yb, &mut []));
    }
    (y, (op == ReduceOp::Max).then_some(idx))
}

pub fn reduce_backward(
    dy: &[f32],
    idx: Option<&[i32]>,
    outer: usize,
    n: usize,
    inner: usize,
    op: ReduceOp,
) -> Vec<f32> {
    let mut dx = vec![0.0f32; outer * n * inner];
    if dx.is_empty() {
        return dx;
    }
    let scale = if op == ReduceOp::Mean { 1.0 / n as f32 } else { 1.0 };
    dx.par_chunks_mut(n * inner).enumerate().for_each(|(b, xb)| {
        let g = &dy[b * inner..(b + 1) * inner];
        match (op, idx) {
            (ReduceOp::Max, Some(ix)) => {
                for c in 0..inner {
                    let j = ix[b * inner + c] as usize;
                    if j < n {
                        xb[j * inner + c] = g[c];
                    }
                }
            }
            _ => {
                for row in xb.chunks_mut(inner) {
                    for (o, &v) in row.iter_mut().zip(g) {
                        *o = v * scale;
                    }
                }
            }
        }
    });
    dx
}
