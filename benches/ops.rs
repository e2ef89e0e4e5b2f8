//! Criterion benchmarks of the cpu paths (the figures in BENCHMARKS.md come from `reclmis bench`,
//! which also runs the PyTorch peer in the same invocation; these are for tracking changes).

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use reclmis::ops::elementwise::{self, UnaryOp};
use reclmis::ops::gemm::{self, GemmOpts};
use reclmis::ops::{reduce, softmax, transpose};
use reclmis::testing::Rng;
use reclmis::{Device, Tensor};

fn t(shape: &[usize], seed: u64) -> Tensor {
    let n = shape.iter().product();
    Tensor::from_vec(Rng::new(seed).vec(n, -1.0, 1.0), shape, &Device::Cpu).unwrap()
}

fn bench(c: &mut Criterion) {
    let mut g = c.benchmark_group("cpu");
    g.sample_size(10);
    for s in [256usize, 1024] {
        let (a, b) = (t(&[s, s], 1), t(&[s, s], 2));
        g.throughput(Throughput::Elements((2 * s * s * s) as u64));
        g.bench_function(format!("gemm_{s}"), |bch| bch.iter(|| gemm::matmul(&a, &b, GemmOpts::default()).unwrap()));
    }
    let x = t(&[32 * 4 * 196, 196], 3);
    g.throughput(Throughput::Bytes((8 * x.numel()) as u64));
    g.bench_function("softmax_25088x196", |bch| bch.iter(|| softmax::softmax(&x).unwrap()));
    let act = t(&[8, 64, 112, 112], 4);
    let bias = t(&[1, 64, 1, 1], 5);
    g.throughput(Throughput::Bytes((8 * act.numel()) as u64));
    g.bench_function("relu_8x64x112x112", |bch| bch.iter(|| elementwise::unary(&act, UnaryOp::Relu).unwrap()));
    g.bench_function("add_bcast_8x64x112x112", |bch| bch.iter(|| elementwise::add(&act, &bias).unwrap()));
    g.bench_function("sum_axis1_8x64x112x112", |bch| bch.iter(|| reduce::sum(&act, 1).unwrap()));
    let tt = t(&[32, 196, 512], 6);
    g.bench_function("transpose_32x196x512", |bch| bch.iter(|| transpose::transpose(&tt, 1, 2).unwrap()));
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
