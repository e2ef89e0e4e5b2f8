//! Linear → ReLU with the ReLU fused into the GEMM's epilogue (`linear_act`, `linear_bf16_act`,
//! `Graph::linear_relu`: the model's feed-forward layers). The ReLU is applied to the f32 value
//! before any rounding, and rounding keeps the sign, so the fused op must equal the unfused one
//! (the Linear, then the elementwise ReLU) bit for bit on every kernel, at f32, tf32 and bf16, and
//! its gradients must equal the unfused graph's bit for bit; and it stays within the Linear's own
//! bound of the f64 reference (ReLU is 1-Lipschitz: it adds no error).

mod common;
use common::*;
use proptest::prelude::*;
use reclmis::autograd::{Graph, Precision, Var};
use reclmis::nn::params::{Kind, Params};
use reclmis::ops::cast::cast;
use reclmis::ops::elementwise::relu;
use reclmis::ops::gemm::{self, linear, reference, Act, GemmAlgo};
use reclmis::ops::tune::with_candidate;
use reclmis::testing::{mismatch_scaled, EPS32, EPS_TF32};
use reclmis::{DType, Device, Tensor};

/// bf16 unit roundoff (8 significant bits).
const EPS_BF16: f64 = 1.0 / 256.0;

fn bits(t: &Tensor) -> Vec<u32> {
    t.to_vec().unwrap().iter().map(|v| v.to_bits()).collect()
}

/// x [rows, k], w [n, k], b [n] on `dev` (f32), their values, and ReLU(x·wᵀ + b) in f64 with the
/// magnitudes Σ|x||w| + |b| the bounds scale with.
struct Problem {
    x: Tensor,
    w: Tensor,
    b: Tensor,
    want: Vec<f64>,
    mag: Vec<f64>,
}

fn problem(dev: &Device, (rows, k, n): (usize, usize, usize), seed: u64, bf16: bool) -> Problem {
    let make = |len: usize, s: u64, shape: &[usize]| {
        let t = tensor(&values(len, s, false), shape, dev);
        if bf16 {
            cast(&t, DType::BF16).unwrap()
        } else {
            t
        }
    };
    let (x, w, b) = (make(rows * k, seed, &[rows, k]), make(n * k, seed ^ 1, &[n, k]), make(n, seed ^ 2, &[n]));
    // the exact values the tensors hold (bf16-rounded ones when bf16)
    let exact = |t: &Tensor| f64s(&t.to_vec().unwrap());
    let (plan, _) = gemm::plan(&[rows, k], &[n, k], false, true).unwrap();
    let (mut want, mut mag) = reference::gemm(&exact(&x), &exact(&w), &plan, 1.0);
    let bv = exact(&b);
    for (i, (y, m)) in want.iter_mut().zip(mag.iter_mut()).enumerate() {
        *y = (*y + bv[i % n]).max(0.0);
        *m += bv[i % n].abs();
    }
    Problem { x, w, b, want, mag }
}

/// The f32 paths of a Linear on `dev`: the algorithm, and either a forced tuning candidate (the
/// element-loading kernels) or a fixed tile (the pipelined tf32 kernels, where they apply).
fn f32_paths(dev: &Device) -> Vec<(GemmAlgo, Option<&'static str>, Option<u32>)> {
    if !dev.is_gpu_like() {
        return vec![(GemmAlgo::Auto, None, None)];
    }
    vec![
        (GemmAlgo::Tiled, None, None),
        (GemmAlgo::TensorCore, Some("tf32_mma"), None),
        (GemmAlgo::TensorCore, Some("f32_fma"), None),
        (GemmAlgo::TensorCore, None, Some(64)),
        (GemmAlgo::TensorCore, None, Some(128)),
    ]
}

/// Fused against unfused (bit for bit) and against the f64 reference, on every f32 path and
/// both pipelined tiles, and at bf16.
fn check_linear_relu(dev: &Device, shape: (usize, usize, usize), seed: u64) -> Result<(), TestCaseError> {
    let (rows, k, _) = shape;
    let p = problem(dev, shape, seed, false);
    for (algo, cand, tile) in f32_paths(dev) {
        let run = |act: Act| {
            let f = || linear::linear_act(&p.x, &p.w, Some(&p.b), act, algo);
            match (cand, tile) {
                (Some(c), _) => with_candidate(c, f),
                (None, Some(t)) => gemm::with_bf16_tile(t, f),
                (None, None) => f(),
            }
            .unwrap()
        };
        let fused = run(Act::Relu);
        let unfused = relu(&run(Act::None)).unwrap();
        let what = format!("{algo:?} {cand:?} tile {tile:?}");
        prop_assert!(bits(&fused) == bits(&unfused), "{}: the fused ReLU differs from the unfused one", what);
        // the Linear's bound (tests/gemm.rs): k + 1 terms (the bias), tf32 operand rounding
        let tol = (k as f64 + 3.0) * EPS32 + if algo == GemmAlgo::TensorCore { 2.0 * EPS_TF32 } else { 0.0 };
        assert_none(&what, mismatch_scaled(&fused.to_vec().unwrap(), &p.want, &p.mag, tol, 0.0))?;
    }
    let q = problem(dev, shape, seed, true);
    for tile in [64u32, 128] {
        let run =
            |act: Act| gemm::with_bf16_tile(tile, || linear::linear_bf16_act(&q.x, &q.w, Some(&q.b), act)).unwrap();
        let fused = run(Act::Relu);
        prop_assert_eq!(fused.dtype(), DType::BF16);
        // the elementwise ReLU reads f32: the bf16 Linear widened (exact), ReLU, rounded (exact)
        let unfused = cast(&relu(&cast(&run(Act::None), DType::F32).unwrap()).unwrap(), DType::BF16).unwrap();
        prop_assert!(bits(&fused) == bits(&unfused), "bf16 tile {}: the fused ReLU differs from the unfused one", tile);
        // tests/gemm_bf16.rs's bound: the f32 sum of exact products, then one bf16 rounding
        let got = fused.to_vec().unwrap();
        for (i, ((&g, &w), &m)) in got.iter().zip(&q.want).zip(&q.mag).enumerate() {
            let allowed = EPS_BF16 * w.abs() + (k as f64 + 3.0) * EPS32 * m * (1.0 + EPS_BF16);
            prop_assert!((g as f64 - w).abs() <= allowed, "bf16 element {} of {}: {} vs {}", i, rows, g, w);
        }
    }
    Ok(())
}

/// Shapes around the tiles' edges: k and n multiples of 8 half the time (every 16-byte chunk
/// whole: the pipelined kernels), anything otherwise (the element-loading ones).
fn shape() -> impl Strategy<Value = (usize, usize, usize)> {
    let eights = || prop_oneof![1usize..=3, 7usize..=9, 15usize..=17].prop_map(|u| 8 * u);
    prop_oneof![(dim(), eights(), eights()), (dim(), dim(), dim())]
}

per_device!(check_linear_relu, (shape in shape(), seed in any::<u64>()));

/// Every GEMM kernel's epilogue applies the ReLU (each really launched, on emu): the fused Linear
/// equals the unfused one bit for bit on each.
#[cfg(feature = "emu")]
#[test]
fn every_gemm_kernel_fuses_the_relu() {
    use reclmis::kernels::Kernel;
    let dev = device("emu");
    // (rows, k, n): unaligned (element-loading kernels), aligned small (64 tile), aligned with
    // rows past 128 (the 128 tile's edge)
    for shape in [(37, 21, 13), (40, 24, 16), (136, 32, 24)] {
        check_linear_relu(&dev, shape, 5).unwrap();
    }
    let launched = reclmis::device::emu::launched_kernels();
    for k in [
        Kernel::gemm_fwd_f32,
        Kernel::gemm_tc_fwd_f32,
        Kernel::gemm_pipe64_fwd_f32,
        Kernel::gemm_pipe128_fwd_f32,
        Kernel::gemm_tc_fwd_bf16,
        Kernel::gemm_pipe64_fwd_bf16,
        Kernel::gemm_pipe128_fwd_bf16,
    ] {
        assert!(launched.contains(&k), "{k:?} was not launched: {launched:?}");
    }
}

/// One training step's values through `Graph::linear_relu` or `relu(linear)`: y, then the
/// gradients of x, w and b of loss = mean(y · c).
fn step(
    dev: &Device,
    graph: &dyn Fn() -> Graph,
    (m, k, n): (usize, usize, usize),
    seed: u64,
    fused: bool,
) -> Vec<Vec<u32>> {
    let mut p = Params::new(dev);
    let train = Kind::Param { trainable: true };
    let x = p.add("x", &[m, k], values(m * k, seed, false), train).unwrap();
    let w = p.add("w", &[n, k], values(n * k, seed ^ 1, false), train).unwrap();
    let b = p.add("b", &[n], values(n, seed ^ 2, false), train).unwrap();
    let c = Var::constant(tensor(&values(m * n, seed ^ 3, false), &[m, n], dev));
    let g = graph();
    let (xv, wv, bv) = (g.param(&p, x), g.param(&p, w), g.param(&p, b));
    let y = if fused {
        g.linear_relu(&xv, &wv, Some(&bv)).unwrap()
    } else {
        g.relu(&g.linear(&xv, &wv, Some(&bv)).unwrap()).unwrap()
    };
    let loss = g.mean_all(&g.mul(&y, &c).unwrap()).unwrap();
    let grads = g.backward(&loss, p.len()).unwrap();
    let v = |t: &Tensor| t.to_vec().unwrap().iter().map(|v| v.to_bits()).collect::<Vec<u32>>();
    vec![v(y.tensor()), v(grads.get(x).unwrap()), v(grads.get(w).unwrap()), v(grads.get(b).unwrap())]
}

/// The graph's fused op: the same output and gradients as the unfused Linear → ReLU, bit for bit,
/// at every precision on cpu and emu (f32 and tf32: one f32 value masked either way; bf16: the
/// mask of the rounded value, the gradient rounded as the tape stores it either way). In bf16's
/// error model (each rounding a ±u perturbation) the forward is the same too (ReLU(v·(1 ± u)) =
/// ReLU(v)·(1 ± u)), but not the gradients: the unfused graph perturbs the gradient of the ReLU's
/// output (a bf16-marked value) once more, where the real bf16 run rounds nothing (that gradient
/// is a bf16 product already); the fused op models the run more closely.
#[test]
fn graph_linear_relu_equals_the_unfused_layers() {
    for kind in ["cpu", "emu"] {
        let dev = device(kind);
        let mut graphs: Vec<(String, Box<dyn Fn() -> Graph>)> = Precision::ALL
            .iter()
            .map(|&p| {
                (
                    format!("{p:?}"),
                    Box::new(move || Graph::train().with_precision(p).unwrap()) as Box<dyn Fn() -> Graph>,
                )
            })
            .collect();
        graphs.push(("bf16 perturbation".into(), Box::new(|| Graph::train().with_bf16_perturbation(3))));
        for (name, graph) in &graphs {
            for shape in [(5, 37, 6), (24, 32, 16)] {
                let fused = step(&dev, graph.as_ref(), shape, 9, true);
                let unfused = step(&dev, graph.as_ref(), shape, 9, false);
                let compared = if name.contains("perturbation") { 1 } else { 4 };
                for (i, what) in ["y", "dx", "dw", "db"].iter().enumerate().take(compared) {
                    assert!(fused[i] == unfused[i], "{kind} {name} {shape:?}: {what} differs");
                }
                // about half the outputs clipped: the mask matters
                assert!(fused[0].contains(&0), "no ReLU clipped anything");
            }
        }
    }
}
