//! Fast cpu paths: rayon over large chunks, inner loops simple enough to auto-vectorise.

use super::{BinaryOp, BroadcastPlan, UnaryOp};
use crate::ops::cpu_math;
use std::mem::MaybeUninit;

/// Elements per rayon task: large enough that scheduling costs nothing, small enough to split a
/// 224x224x64 activation across both cores.
const CHUNK: usize = 1 << 15;

const QUICK_GELU_A: f32 = 1.702;
/// 1/√(2π)
const FRAC_1_SQRT_2PI: f32 = 0.398_942_3;

#[inline(always)]
fn quick_sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + cpu_math::exp(-QUICK_GELU_A * x))
}

// The transcendental activations get AVX-512/AVX2 builds of their loops (the crate's baseline
// target has no FMA or wide vectors, and these are compute-bound, unlike relu).
cpu_math::multiversion! {
    fn gelu_fwd(x: &[f32], y: &mut [MaybeUninit<f32>]) {
        for (o, &v) in y.iter_mut().zip(x) {
            o.write(v * cpu_math::normal_cdf(v));
        }
    }
}
cpu_math::multiversion! {
    fn quick_gelu_fwd(x: &[f32], y: &mut [MaybeUninit<f32>]) {
        for (o, &v) in y.iter_mut().zip(x) {
            o.write(v * quick_sigmoid(v));
        }
    }
}
cpu_math::multiversion! {
    /// d/dx x·Φ(x) = Φ(x) + x·φ(x)
    fn gelu_bwd(x: &[f32], g: &[f32], d: &mut [MaybeUninit<f32>]) {
        for ((o, &v), &gv) in d.iter_mut().zip(x).zip(g) {
            o.write(gv * (cpu_math::normal_cdf(v) + v * FRAC_1_SQRT_2PI * cpu_math::exp(-0.5 * v * v)));
        }
    }
}
cpu_math::multiversion! {
    /// d/dx x·σ(ax) = σ + a·x·σ·(1 − σ), σ from x (y / x fails at 0)
    fn quick_gelu_bwd(x: &[f32], g: &[f32], d: &mut [MaybeUninit<f32>]) {
        for ((o, &v), &gv) in d.iter_mut().zip(x).zip(g) {
            let s = quick_sigmoid(v);
            o.write(gv * (s + QUICK_GELU_A * v * s * (1.0 - s)));
        }
    }
}

// Outputs are written chunk by chunk in parallel without being zeroed first (`par_new`).

fn map_chunks(x: &[f32], f: fn(&[f32], &mut [MaybeUninit<f32>])) -> Vec<f32> {
    cpu_math::par_new(x.len(), CHUNK, |i, yc| f(&x[i * CHUNK..][..yc.len()], yc))
}

fn map_chunks2(x: &[f32], g: &[f32], f: fn(&[f32], &[f32], &mut [MaybeUninit<f32>])) -> Vec<f32> {
    cpu_math::par_new(x.len(), CHUNK, |i, yc| f(&x[i * CHUNK..][..yc.len()], &g[i * CHUNK..][..yc.len()], yc))
}

fn map1(x: &[f32], f: impl Fn(f32) -> f32 + Sync + Send) -> Vec<f32> {
    cpu_math::par_new(x.len(), CHUNK, |i, yc| {
        for (o, &v) in yc.iter_mut().zip(&x[i * CHUNK..]) {
            o.write(f(v));
        }
    })
}

fn map3(a: &[f32], b: &[f32], c: &[f32], f: impl Fn(f32, f32, f32) -> f32 + Sync + Send) -> Vec<f32> {
    cpu_math::par_new(a.len(), CHUNK, |i, yc| {
        let s = i * CHUNK;
        let n = yc.len();
        for (((o, &x), &y), &z) in yc.iter_mut().zip(&a[s..s + n]).zip(&b[s..s + n]).zip(&c[s..s + n]) {
            o.write(f(x, y, z));
        }
    })
}

pub fn unary(x: &[f32], op: UnaryOp) -> Vec<f32> {
    match op {
        UnaryOp::Relu => map1(x, |v| v.max(0.0)),
        UnaryOp::Sigmoid => map1(x, |v| 1.0 / (1.0 + cpu_math::exp(-v))),
        UnaryOp::Exp => map1(x, cpu_math::exp),
        UnaryOp::Log => map1(x, f32::ln),
        UnaryOp::Scale(s) => map1(x, |v| s * v),
        UnaryOp::AddScalar(s) => map1(x, |v| v + s),
        UnaryOp::Gelu => map_chunks(x, gelu_fwd),
        UnaryOp::QuickGelu => map_chunks(x, quick_gelu_fwd),
    }
}

pub fn unary_backward(op: UnaryOp, x: &[f32], y: &[f32], dy: &[f32]) -> Vec<f32> {
    match op {
        UnaryOp::Relu => map3(x, y, dy, |x, _, g| if x > 0.0 { g } else { 0.0 }),
        UnaryOp::Sigmoid => map3(x, y, dy, |_, y, g| g * y * (1.0 - y)),
        UnaryOp::Exp => map3(x, y, dy, |_, y, g| g * y),
        UnaryOp::Log => map3(x, y, dy, |x, _, g| g / x),
        UnaryOp::Scale(s) => map1(dy, |g| g * s),
        UnaryOp::AddScalar(_) => dy.to_vec(),
        UnaryOp::Gelu => map_chunks2(x, dy, gelu_bwd),
        UnaryOp::QuickGelu => map_chunks2(x, dy, quick_gelu_bwd),
    }
}

fn apply(op: BinaryOp) -> impl Fn(f32, f32) -> f32 + Sync + Copy {
    move |a, b| match op {
        BinaryOp::Add => a + b,
        BinaryOp::Sub => a - b,
        BinaryOp::Mul => a * b,
        BinaryOp::Div => a / b,
    }
}

/// Walks the plan's outer dims by index and runs the last (merged) dim as a flat loop with
/// strides 0 or 1, one of four shapes the compiler vectorises separately.
pub fn binary(a: &[f32], b: &[f32], plan: &BroadcastPlan, op: BinaryOp) -> Vec<f32> {
    let n: usize = plan.out_shape.iter().product();
    let r = plan.dims.len();
    let inner = plan.dims[r - 1];
    let (ia, ib) = (plan.sa[r - 1], plan.sb[r - 1]);
    let f = apply(op);
    if n == 0 {
        return Vec::new();
    }
    cpu_math::par_new(n, inner, |row, yr| {
        // offsets of this row in a and b
        let (mut oa, mut ob, mut rem) = (0usize, 0usize, row);
        for d in (0..r - 1).rev() {
            let c = rem % plan.dims[d];
            rem /= plan.dims[d];
            oa += c * plan.sa[d];
            ob += c * plan.sb[d];
        }
        match (ia, ib) {
            (1, 1) => yr.iter_mut().zip(&a[oa..oa + inner]).zip(&b[ob..ob + inner]).for_each(|((o, &x), &z)| {
                o.write(f(x, z));
            }),
            (1, _) => {
                let z = b[ob];
                yr.iter_mut().zip(&a[oa..oa + inner]).for_each(|(o, &x)| {
                    o.write(f(x, z));
                })
            }
            (_, 1) => {
                let x = a[oa];
                yr.iter_mut().zip(&b[ob..ob + inner]).for_each(|(o, &z)| {
                    o.write(f(x, z));
                })
            }
            _ => yr.fill(MaybeUninit::new(f(a[oa], b[ob]))),
        }
    })
}
