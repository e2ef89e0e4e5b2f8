//! Autocast (autograd/precision.rs): at bf16 an autocast op reads bf16-rounded operands, stores a
//! bf16-rounded output, and the gradients into and out of it are bf16-rounded; at tf32 the
//! GEMM-like kernels run on tensor cores (cuda/emu) and the cpu stays exact f32. Checked bit for
//! bit against the same kernels composed by hand, on cpu and emu.

mod common;
use common::device;
use half::bf16;
use reclmis::autograd::{Graph, Precision, Var};
use reclmis::nn::params::{Kind, Params};
use reclmis::ops::gemm::{linear, GemmAlgo};
use reclmis::testing::Rng;
use reclmis::{DType, Device, Tensor};

fn r(v: &[f32]) -> Vec<f32> {
    v.iter().map(|&x| bf16::from_f32(x).to_f32()).collect()
}

fn t(v: &[f32], shape: &[usize], dev: &Device) -> Tensor {
    Tensor::from_vec(v.to_vec(), shape, dev).unwrap()
}

/// Values with all 24 significand bits in use, so every rounding changes them.
fn values(n: usize, rng: &mut Rng) -> Vec<f32> {
    (0..n).map(|_| rng.uniform(-2.0, 2.0) + 1e-4 * rng.uniform(-1.0, 1.0)).collect()
}

/// x [m, k], w [n, k], b [n] and the loss weights c [m, n] drawn from `seed`.
fn linear_values((m, k, n): (usize, usize, usize), seed: u64) -> [Vec<f32>; 4] {
    let mut rng = Rng::new(seed);
    [m * k, n * k, n, m * n].map(|len| values(len, &mut rng))
}

/// One bf16 training step of a Linear on `dev`, loss = mean(y · c): y, then the gradients of x,
/// w and b.
fn bf16_linear_step(dev: &Device, (m, k, n): (usize, usize, usize), [xv, wv, bv, cv]: &[Vec<f32>; 4]) -> [Vec<f32>; 4] {
    let mut p = Params::new(dev);
    let train = Kind::Param { trainable: true };
    let x = p.add("x", &[m, k], xv.clone(), train).unwrap();
    let w = p.add("w", &[n, k], wv.clone(), train).unwrap();
    let b = p.add("b", &[n], bv.clone(), train).unwrap();
    let g = Graph::train().with_precision(Precision::Bf16).unwrap();
    let y = g.linear(&g.param(&p, x), &g.param(&p, w), Some(&g.param(&p, b))).unwrap();
    let loss = g.mean_all(&g.mul(&y, &Var::constant(t(cv, &[m, n], dev))).unwrap()).unwrap();
    let grads = g.backward(&loss, p.len()).unwrap();
    let grad = |id| grads.get(id).unwrap().to_vec().unwrap();
    [y.tensor().to_vec().unwrap(), grad(x), grad(w), grad(b)]
}

#[test]
fn bf16_linear_rounds_operands_output_and_gradients() {
    let (m, k, n) = (5, 37, 6);
    for kind in ["cpu", "emu"] {
        let dev = device(kind);
        let vals = linear_values((m, k, n), 7);
        let [xv, wv, bv, cv] = &vals;
        let [y, dx, dw, db] = bf16_linear_step(&dev, (m, k, n), &vals);

        // by hand: the bf16 Linear's kernels (bf16 in, f32 sums, bf16 out) on the rounded
        // operands (cpu: AVX512_BF16 dot products where the CPU has them, f32 GEMM otherwise;
        // emu: the tensor-core kernels)
        let h = |v: &[f32], shape: &[usize]| reclmis::ops::cast::cast(&t(&r(v), shape, &dev), DType::BF16).unwrap();
        let (xr, wr, br) = (h(xv, &[m, k]), h(wv, &[n, k]), h(bv, &[n]));
        let want_y = linear::linear_bf16(&xr, &wr, Some(&br)).unwrap().to_vec().unwrap();
        assert_eq!(y, want_y, "{kind}: y = bf16(linear(bf16 operands))");
        // d loss / dy = c / (m n), stored in bf16 as the gradient of a bf16 output
        let dy: Vec<f32> = cv.iter().map(|&v| v / (m * n) as f32).collect();
        let gw = linear::linear_backward_bf16(&xr, &wr, &h(&dy, &[m, n]), true).unwrap();
        // the same backward in f32 (the graph's f32 algorithm on the rounded operands, unrounded)
        let f = |v: &[f32], shape: &[usize]| t(&r(v), shape, &dev);
        let g32 =
            linear::linear_backward(&f(xv, &[m, k]), &f(wv, &[n, k]), &f(&dy, &[m, n]), true, Precision::Bf16.algo())
                .unwrap();
        let grads = [("dx", dx, &gw.dx, &g32.dx), ("dw", dw, &gw.dw, &g32.dw)];
        for (name, got, want, unrounded) in
            grads.into_iter().chain([("db", db, gw.db.as_ref().unwrap(), g32.db.as_ref().unwrap())])
        {
            assert_eq!(got, r(&want.to_vec().unwrap()), "{kind}: {name} = bf16(backward on bf16 dy)");
            assert_ne!(got, unrounded.to_vec().unwrap(), "{kind}: {name}: the rounding shows in these values");
        }
    }
}

/// A Linear whose sizes are multiples of 8 runs on the pipelined bf16 GEMM on emu (forward, dx
/// and dw: three layouts), and computes what the cpu does up to the order of the f32 sums: each
/// value within one bf16 rounding step of the cpu's (a different sum order can tip a rounding).
#[test]
fn bf16_linear_takes_the_pipelined_gemm() {
    let dims = (40, 48, 24);
    let vals = linear_values(dims, 11);
    let (cpu, emu) = (bf16_linear_step(&device("cpu"), dims, &vals), bf16_linear_step(&device("emu"), dims, &vals));
    let launched = reclmis::device::emu::launched_kernels();
    assert!(launched.contains(&reclmis::kernels::Kernel::gemm_pipe64_fwd_bf16), "{launched:?}");
    for (name, (c, e)) in ["y", "dx", "dw", "db"].iter().zip(cpu.iter().zip(&emu)) {
        let scale = c.iter().fold(0f32, |a, v| a.max(v.abs()));
        for (i, (a, b)) in c.iter().zip(e).enumerate() {
            // one bf16 step (2^-8 relative) of either value, plus f32 sums' k roundings of the scale
            let allowed = a.abs().max(b.abs()) / 128.0 + 64.0 * f32::EPSILON * scale;
            assert!((a - b).abs() <= allowed, "{name}[{i}]: cpu {a} vs emu {b}");
        }
    }
}

/// Without autocast the values differ: the test above sees the rounding, not a coincidence.
#[test]
fn f32_linear_is_not_rounded() {
    let dev = Device::Cpu;
    let mut rng = Rng::new(8);
    let (xv, wv) = (values(3 * 9, &mut rng), values(4 * 9, &mut rng));
    let (x, w) = (Var::constant(t(&xv, &[3, 9], &dev)), Var::constant(t(&wv, &[4, 9], &dev)));
    let f = Graph::eval().linear(&x, &w, None).unwrap().tensor().to_vec().unwrap();
    let h = Graph::eval().with_precision(Precision::Bf16).unwrap().linear(&x, &w, None).unwrap();
    let h = h.tensor().to_vec().unwrap();
    assert_ne!(f, h);
    assert_eq!(h, r(&h), "bf16 outputs are bf16 values");
    assert_eq!(f, linear::linear(x.tensor(), w.tensor(), None, GemmAlgo::Auto).unwrap().to_vec().unwrap());
}

/// tf32: the tensor-core kernels on emu (operands rounded to tf32), exact f32 on the cpu.
#[test]
fn tf32_selects_the_tensor_core_kernels() {
    for kind in ["cpu", "emu"] {
        let dev = device(kind);
        let mut rng = Rng::new(9);
        let (xv, wv) = (values(8 * 40, &mut rng), values(16 * 40, &mut rng));
        let (x, w) = (Var::constant(t(&xv, &[8, 40], &dev)), Var::constant(t(&wv, &[16, 40], &dev)));
        let g = Graph::eval().with_precision(Precision::Tf32).unwrap();
        let got = g.linear(&x, &w, None).unwrap().tensor().to_vec().unwrap();
        let tc = linear::linear(x.tensor(), w.tensor(), None, GemmAlgo::TensorCore).unwrap().to_vec().unwrap();
        let exact = linear::linear(x.tensor(), w.tensor(), None, GemmAlgo::Auto).unwrap().to_vec().unwrap();
        assert_eq!(got, tc, "{kind}");
        if kind == "emu" {
            assert_ne!(tc, exact, "emu: tf32 rounds these operands");
        } else {
            assert_eq!(tc, exact, "cpu: no tf32, exact f32");
        }
    }
}

#[test]
fn precision_names_parse_and_bad_ones_are_refused() {
    for p in Precision::ALL {
        assert_eq!(Precision::parse(p.name()).unwrap(), p);
    }
    let e = Precision::parse("fp8").unwrap_err().to_string();
    assert!(e.contains("fp8") && e.contains("bf16"), "{e}");
}

/// A bf16 step of conv2d (3×3, bias) then the PLAM gate over a batch of 4, loss = mean(y · c),
/// with the chunked backwards' chunk size at `chunk` bytes (None: the default, far above these
/// tensors: the whole batch at once): the gradients of x, the convolution's w and b, and the six
/// PLAM weights.
fn bf16_conv_plam_grads(dev: &Device, chunk: Option<usize>) -> Vec<Vec<f32>> {
    let (b, ci, c, hw) = (4usize, 3usize, 8usize, 6usize);
    let mut rng = Rng::new(21);
    let mut p = Params::new(dev);
    let train = Kind::Param { trainable: true };
    let shapes: [&[usize]; 10] = [
        &[b, ci, hw, hw],
        &[c, ci, 3, 3],
        &[c],
        &[c, c, 1, 1],
        &[c, c, 1, 1],
        &[6, 3],
        &[6],
        &[1, 6],
        &[1],
        &[b, c, hw, hw],
    ];
    let ids: Vec<_> = shapes[..9]
        .iter()
        .enumerate()
        .map(|(i, s)| p.add(&format!("p{i}"), s, values(s.iter().product(), &mut rng), train).unwrap())
        .collect();
    let cv = values(shapes[9].iter().product(), &mut rng);
    let g = Graph::train().with_precision(Precision::Bf16).unwrap();
    let v: Vec<Var> = ids.iter().map(|&id| g.param(&p, id)).collect();
    let h = g.conv2d(&v[0], &v[1], Some(&v[2])).unwrap();
    let y = g.plam(&h, [&v[3], &v[4], &v[5], &v[6], &v[7], &v[8]]).unwrap();
    let loss = g.mean_all(&g.mul(&y, &Var::constant(t(&cv, shapes[9], dev))).unwrap()).unwrap();
    let grads = match chunk {
        Some(bytes) => reclmis::autograd::with_backward_chunk_bytes(bytes, || g.backward(&loss, p.len())),
        None => g.backward(&loss, p.len()),
    }
    .unwrap();
    ids.iter().map(|&id| grads.get(id).unwrap().to_vec().unwrap()).collect()
}

/// At bf16 a backward on widened operands whose saved input is bf16 works through a large batch
/// in chunks of images (the 3-channel convolution's; the PLAM gate after it is bf16 throughout
/// and takes the batch whole at any chunk size): the gradients are the whole batch's. With
/// 8·6² floats as the chunk size the convolution (3·6² floats per image) runs two images at a
/// time.
#[test]
fn bf16_chunked_backward_matches_the_whole_batch() {
    for kind in ["cpu", "emu"] {
        let dev = device(kind);
        let whole = bf16_conv_plam_grads(&dev, None);
        let chunked = bf16_conv_plam_grads(&dev, Some(4 * 8 * 36));
        for (i, (a, b)) in chunked.iter().zip(&whole).enumerate() {
            // the same terms: each image's gradients by the same arithmetic, the weights'
            // gradients summed over the chunks in another order (f32 roundings of sums of at most
            // 4·36·8 terms of magnitude <= max|g|·O(1): far below 1e-5 of the largest), and a
            // bf16-stored gradient that lands on the other side of a rounding boundary differs
            // by one bf16 unit (2^-8 relative)
            let big = b.iter().fold(0f32, |m, x| m.max(x.abs()));
            for (x, y) in a.iter().zip(b) {
                assert!((x - y).abs() <= y.abs() / 128.0 + 1e-5 * big, "{kind}: parameter {i}: {x} vs {y}");
            }
        }
    }
}

/// One bf16 training step of a 3×3 convolution on `dev`, loss = mean(y · c): y, then the
/// gradients of x, w and b.
fn bf16_conv_step(dev: &Device, (b, ci, co, h, w): (usize, usize, usize, usize, usize), seed: u64) -> [Vec<f32>; 4] {
    let mut rng = Rng::new(seed);
    let mut p = Params::new(dev);
    let train = Kind::Param { trainable: true };
    let x = p.add("x", &[b, ci, h, w], values(b * ci * h * w, &mut rng), train).unwrap();
    let wt = p.add("w", &[co, ci, 3, 3], values(co * ci * 9, &mut rng), train).unwrap();
    let bias = p.add("b", &[co], values(co, &mut rng), train).unwrap();
    let c = t(&values(b * co * h * w, &mut rng), &[b, co, h, w], dev);
    let g = Graph::train().with_precision(Precision::Bf16).unwrap();
    let y = g.conv2d(&g.param(&p, x), &g.param(&p, wt), Some(&g.param(&p, bias))).unwrap();
    let loss = g.mean_all(&g.mul(&y, &Var::constant(c)).unwrap()).unwrap();
    let grads = g.backward(&loss, p.len()).unwrap();
    let grad = |id| grads.get(id).unwrap().to_vec().unwrap();
    [y.tensor().to_vec().unwrap(), grad(x), grad(wt), grad(bias)]
}

/// One bf16 training step of conv → 2×2 max pool → ×2 upsampling on `dev`, loss = mean(y · c):
/// y (and its dtype), then the gradients of x and w.
fn bf16_pool_step(dev: &Device, seed: u64) -> (reclmis::DType, [Vec<f32>; 3]) {
    let (b, ci, co, h, w) = (2, 8, 8, 9, 6);
    let mut rng = Rng::new(seed);
    let mut p = Params::new(dev);
    let train = Kind::Param { trainable: true };
    let x = p.add("x", &[b, ci, h, w], values(b * ci * h * w, &mut rng), train).unwrap();
    let wt = p.add("w", &[co, ci, 3, 3], values(co * ci * 9, &mut rng), train).unwrap();
    let c = t(&values(b * co * (h / 2) * 2 * w, &mut rng), &[b, co, h / 2 * 2, w], dev);
    let g = Graph::train().with_precision(Precision::Bf16).unwrap();
    let y = g.conv2d(&g.param(&p, x), &g.param(&p, wt), None).unwrap();
    let y = g.upsample2(&g.max_pool2(&y).unwrap()).unwrap();
    let loss = g.mean_all(&g.mul(&y, &Var::constant(c)).unwrap()).unwrap();
    let grads = g.backward(&loss, p.len()).unwrap();
    let grad = |id| grads.get(id).unwrap().to_vec().unwrap();
    (y.tensor().dtype(), [y.tensor().to_vec().unwrap(), grad(x), grad(wt)])
}

/// bf16 autocast pools and upsamples a bf16 value in bf16 (the bf16 kernels on emu, the pool's
/// backward from the bf16 input) and computes what the cpu does: the pool and the copies are
/// exact, so the devices differ only by the convolution's f32 sum order (one bf16 step, as in
/// `bf16_conv_takes_the_pipelined_kernels`).
#[test]
fn bf16_pooling_stays_bf16() {
    let ((tc, cpu), (te, emu)) = (bf16_pool_step(&device("cpu"), 14), bf16_pool_step(&device("emu"), 14));
    assert_eq!((tc, te), (reclmis::DType::BF16, reclmis::DType::BF16));
    let launched = reclmis::device::emu::launched_kernels();
    use reclmis::kernels::Kernel;
    for k in [Kernel::maxpool2_fwd_bf16, Kernel::upsample2_fwd_bf16, Kernel::maxpool2_input_bwd_bf16] {
        assert!(launched.contains(&k), "{k:?} not in {launched:?}");
    }
    for (name, (c, e)) in ["y", "dx", "dw"].iter().zip(cpu.iter().zip(&emu)) {
        let scale = c.iter().fold(0f32, |a, v| a.max(v.abs()));
        for (i, (a, b)) in c.iter().zip(e).enumerate() {
            let allowed = a.abs().max(b.abs()) / 128.0 + 256.0 * f32::EPSILON * scale;
            assert!((a - b).abs() <= allowed, "{name}[{i}]: cpu {a} vs emu {b}");
        }
    }
}

/// A convolution whose channel counts are multiples of 8 runs on the pipelined bf16 kernels on
/// emu (the forward, the input gradient through the same kernel, the split-K weight gradient)
/// and computes what the cpu does up to the order of the f32 sums (each value within one bf16
/// rounding step of the cpu's, plus the sums' roundings); the cpu's own values are the f32
/// convolution of the rounded operands rounded once (tests/conv_bf16.rs).
#[test]
fn bf16_conv_takes_the_pipelined_kernels() {
    let dims = (2, 16, 24, 9, 7);
    let (cpu, emu) = (bf16_conv_step(&device("cpu"), dims, 12), bf16_conv_step(&device("emu"), dims, 12));
    let launched = reclmis::device::emu::launched_kernels();
    use reclmis::kernels::Kernel;
    for k in [Kernel::conv2d_pipe64_fwd_bf16, Kernel::conv2d_pipe64_wgrad_bwd_bf16] {
        assert!(launched.contains(&k), "{k:?} not in {launched:?}");
    }
    for (name, (c, e)) in ["y", "dx", "dw", "db"].iter().zip(cpu.iter().zip(&emu)) {
        let scale = c.iter().fold(0f32, |a, v| a.max(v.abs()));
        for (i, (a, b)) in c.iter().zip(e).enumerate() {
            // one bf16 step (2^-8 relative) of either value, plus f32 sums' k roundings of the
            // scale (k up to 2·9·7 = 126 pixels for dw; Winograd's transforms on the cpu within that)
            let allowed = a.abs().max(b.abs()) / 128.0 + 256.0 * f32::EPSILON * scale;
            assert!((a - b).abs() <= allowed, "{name}[{i}]: cpu {a} vs emu {b}");
        }
    }
}

/// One bf16 training step of the fused attention (4 heads of 16, the tiny preset's) on `dev`,
/// loss = mean(o · c): o, then the gradients of q, k and v.
fn bf16_attention_step(dev: &Device, seed: u64) -> [Vec<f32>; 4] {
    let (b, tq, s, e) = (2, 21, 18, 64);
    let mut rng = Rng::new(seed);
    let mut p = Params::new(dev);
    let train = Kind::Param { trainable: true };
    let q = p.add("q", &[b, tq, e], values(b * tq * e, &mut rng), train).unwrap();
    let k = p.add("k", &[b, s, e], values(b * s * e, &mut rng), train).unwrap();
    let v = p.add("v", &[b, s, e], values(b * s * e, &mut rng), train).unwrap();
    let c = t(&values(b * tq * e, &mut rng), &[b, tq, e], dev);
    let g = Graph::train().with_precision(Precision::Bf16).unwrap();
    let a = reclmis::autograd::Attention {
        heads: 4,
        causal: false,
        key_valid: None,
        condition: None,
        condition_on_logits: false,
    };
    let o = g.attention(&g.param(&p, q), &g.param(&p, k), &g.param(&p, v), &a).unwrap();
    let loss = g.mean_all(&g.mul(&o, &Var::constant(c)).unwrap()).unwrap();
    let grads = g.backward(&loss, p.len()).unwrap();
    let grad = |id| grads.get(id).unwrap().to_vec().unwrap();
    [o.tensor().to_vec().unwrap(), grad(q), grad(k), grad(v)]
}

/// bf16 autocast's attention runs the pipelined bf16 forward and backward on emu and computes what
/// the cpu does up to P's and dS's bf16 roundings inside the kernels and the order of the f32
/// sums: each value
/// within two bf16 steps of the cpu's plus the sums' roundings of the scale.
#[test]
fn bf16_attention_takes_the_pipelined_kernel() {
    let (cpu, emu) = (bf16_attention_step(&device("cpu"), 13), bf16_attention_step(&device("emu"), 13));
    let launched = reclmis::device::emu::launched_kernels();
    use reclmis::kernels::Kernel;
    for k in [Kernel::attention_pipe_fwd_bf16, Kernel::attention_pipe_dq_bwd_bf16, Kernel::attention_pipe_dkdv_bwd_bf16]
    {
        assert!(launched.contains(&k), "{k:?} not in {launched:?}");
    }
    for (name, (c, e)) in ["o", "dq", "dk", "dv"].iter().zip(cpu.iter().zip(&emu)) {
        let scale = c.iter().fold(0f32, |a, v| a.max(v.abs()));
        for (i, (a, b)) in c.iter().zip(e).enumerate() {
            let allowed = a.abs().max(b.abs()) / 64.0 + scale / 128.0;
            assert!((a - b).abs() <= allowed, "{name}[{i}]: cpu {a} vs emu {b}");
        }
    }
}

/// An evaluation graph at bf16 reads its parameters' bf16 copies kept by `Params` (made once):
/// the same values as a training graph's rounding of the f32 value, and a replaced value
/// (`Params::set`, as the optimiser and checkpoint loading do) is rounded anew, never served
/// from a stale copy.
#[test]
fn bf16_eval_reads_kept_weight_copies_and_refreshes_them() {
    let (m, k, n) = (6, 40, 5);
    for kind in ["cpu", "emu"] {
        let dev = device(kind);
        let [xv, wv, bv, _] = linear_values((m, k, n), 21);
        let mut p = Params::new(&dev);
        let train = Kind::Param { trainable: true };
        let x = p.add("x", &[m, k], xv, Kind::Buffer).unwrap();
        let w = p.add("w", &[n, k], wv.clone(), train).unwrap();
        let b = p.add("b", &[n], bv, train).unwrap();
        let run = |g: Graph, p: &Params| {
            let g = g.with_precision(Precision::Bf16).unwrap();
            g.linear(&g.param(p, x), &g.param(p, w), Some(&g.param(p, b))).unwrap().tensor().to_vec().unwrap()
        };
        let first = run(Graph::eval(), &p);
        assert_eq!(first, run(Graph::eval(), &p), "{kind}: the kept copies give the same output again");
        assert_eq!(first, run(Graph::train(), &p), "{kind}: kept copies = rounding on every read");
        let kept = p.bf16_copy(w).unwrap().to_vec().unwrap();
        assert_eq!(kept, r(&wv), "{kind}: the copy is the value rounded");

        // a new value: the next evaluation rounds it, not the old copy
        let wv2: Vec<f32> = wv.iter().map(|v| -0.5 * v).collect();
        p.set(w, t(&wv2, &[n, k], &dev)).unwrap();
        let second = run(Graph::eval(), &p);
        assert_eq!(p.bf16_copy(w).unwrap().to_vec().unwrap(), r(&wv2), "{kind}: the copy follows set");
        assert_eq!(second, run(Graph::train(), &p), "{kind}: after set");
        assert_ne!(second, first, "{kind}: the output changed with the weights");
    }
}
