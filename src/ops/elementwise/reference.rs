//! Naive references in f64, written to be obviously right. Tests only.

use super::{broadcast_shape, BinaryOp, UnaryOp};
use crate::ops::contiguous_strides;

fn normal_cdf(x: f64) -> f64 {
    0.5 * libm::erfc(-x / std::f64::consts::SQRT_2)
}

pub fn unary(x: &[f64], op: UnaryOp) -> Vec<f64> {
    x.iter()
        .map(|&v| match op {
            UnaryOp::Relu => {
                if v > 0.0 {
                    v
                } else {
                    0.0
                }
            }
            UnaryOp::Sigmoid => 1.0 / (1.0 + (-v).exp()),
            UnaryOp::Exp => v.exp(),
            UnaryOp::Log => v.ln(),
            UnaryOp::Scale(s) => s as f64 * v,
            UnaryOp::AddScalar(s) => v + s as f64,
            UnaryOp::Gelu => v * normal_cdf(v),
            UnaryOp::QuickGelu => v / (1.0 + (-1.702 * v).exp()),
        })
        .collect()
}

/// dx = dy · f'(x), with the derivative written from x (not from y as the fast paths do).
pub fn unary_backward(op: UnaryOp, x: &[f64], dy: &[f64]) -> Vec<f64> {
    x.iter()
        .zip(dy)
        .map(|(&v, &g)| {
            let (v, g) = (v, g);
            g * match op {
                UnaryOp::Relu => {
                    if v > 0.0 {
                        1.0
                    } else {
                        0.0
                    }
                }
                UnaryOp::Sigmoid => {
                    let s = 1.0 / (1.0 + (-v).exp());
                    s * (1.0 - s)
                }
                UnaryOp::Exp => v.exp(),
                UnaryOp::Log => 1.0 / v,
                UnaryOp::Scale(s) => s as f64,
                UnaryOp::AddScalar(_) => 1.0,
                UnaryOp::Gelu => normal_cdf(v) + v * (-0.5 * v * v).exp() / (2.0 * std::f64::consts::PI).sqrt(),
                UnaryOp::QuickGelu => {
                    let s = 1.0 / (1.0 + (-1.702 * v).exp());
                    s + 1.702 * v * s * (1.0 - s)
                }
            }
        })
        .collect()
}

/// Index of output coordinate `c` in an operand of `shape` broadcast to `out`.
fn source_index(c: &[usize], shape: &[usize], out: &[usize]) -> usize {
    let off = out.len() - shape.len();
    let st = contiguous_strides(shape);
    (0..shape.len()).map(|i| if shape[i] == 1 { 0 } else { c[i + off] * st[i] }).sum()
}

pub fn binary(a: &[f64], sa: &[usize], b: &[f64], sb: &[usize], op: BinaryOp) -> Vec<f64> {
    let out = broadcast_shape(sa, sb).unwrap();
    let n: usize = out.iter().product();
    let st = contiguous_strides(&out);
    (0..n)
        .map(|i| {
            let c: Vec<usize> = (0..out.len()).map(|d| (i / st[d]) % out[d]).collect();
            let x = a[source_index(&c, sa, &out)];
            let z = b[source_index(&c, sb, &out)];
            match op {
                BinaryOp::Add => x + z,
                BinaryOp::Sub => x - z,
                BinaryOp::Mul => x * z,
                BinaryOp::Div => x / z,
            }
        })
        .collect()
}

/// (da, db): dy times the local derivative, accumulated into each operand's elements.
pub fn binary_backward(
    a: &[f64],
    sa: &[usize],
    b: &[f64],
    sb: &[usize],
    dy: &[f64],
    op: BinaryOp,
) -> (Vec<f64>, Vec<f64>) {
    let out = broadcast_shape(sa, sb).unwrap();
    let st = contiguous_strides(&out);
    let (mut da, mut db) = (vec![0.0; a.len()], vec![0.0; b.len()]);
    for (i, &g) in dy.iter().enumerate() {
        let c: Vec<usize> = (0..out.len()).map(|d| (i / st[d]) % out[d]).collect();
        let (ia, ib) = (source_index(&c, sa, &out), source_index(&c, sb, &out));
        let (ga, gb) = match op {
            BinaryOp::Add => (g, g),
            BinaryOp::Sub => (g, -g),
            BinaryOp::Mul => (g * b[ib], g * a[ia]),
            BinaryOp::Div => (g / b[ib], -g * a[ia] / (b[ib] * b[ib])),
        };
        da[ia] += ga;
        db[ib] += gb;
    }
    (da, db)
}
