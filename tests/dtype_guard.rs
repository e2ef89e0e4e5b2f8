//! Every op refuses an operand of a float type it has no kernel for (bf16 and f16 until the
//! mixed-precision kernels exist) with an error naming the dtype, on every device: a kernel
//! reading 2-byte elements as 4-byte ones would read past its buffer, so this is what keeps the
//! safe API free of undefined behaviour now that half-precision tensors exist.

mod common;
use common::*;
use reclmis::ops::attention::{self, AttnOpts, Condition};
use reclmis::ops::gemm::{self, linear, GemmAlgo, GemmOpts};
use reclmis::ops::reduce::ReduceOp;
use reclmis::ops::{cast::cast, ccl, conv, elementwise as ew, embedding, layer_norm, loss, norm, plam, pool};
use reclmis::ops::{reduce, softmax, transpose};
use reclmis::{DType, Device, Result, Tensor};

type Op<'a> = Box<dyn Fn(&[Tensor]) -> Result<()> + 'a>;

/// `f` succeeds on `inputs` (f32, plus i32 indices), and fails naming the dtype when any one f32
/// input is bf16 or f16 instead.
fn refuses(dev: &Device, name: &str, inputs: Vec<Tensor>, f: Op) {
    f(&inputs).unwrap_or_else(|e| panic!("{name} on {dev:?}: the f32 inputs must work: {e}"));
    for i in 0..inputs.len() {
        if inputs[i].dtype() != DType::F32 {
            continue;
        }
        for dt in [DType::BF16, DType::F16] {
            let mut ts = inputs.clone();
            ts[i] = cast(&ts[i], dt).unwrap();
            match f(&ts) {
                Ok(()) => panic!("{name} on {dev:?}: input {i} as {dt} was accepted"),
                Err(e) => {
                    let m = e.to_string().to_lowercase();
                    assert!(m.contains("dtype") && m.contains(dt.name()), "{name}, input {i} as {dt}: {e}");
                }
            }
        }
    }
}

fn t(dev: &Device, shape: &[usize], seed: u64) -> Tensor {
    tensor(&values(shape.iter().product(), seed, false), shape, dev)
}

fn pos(dev: &Device, shape: &[usize], seed: u64) -> Tensor {
    let v: Vec<f32> = values(shape.iter().product(), seed, false).iter().map(|x| x.abs() + 0.1).collect();
    tensor(&v, shape, dev)
}

fn check_all(dev: &Device) {
    let a = GemmAlgo::Auto;
    // elementwise, reductions, softmax, layout
    refuses(dev, "unary", vec![t(dev, &[5], 1)], Box::new(|x| ew::relu(&x[0]).map(drop)));
    refuses(
        dev,
        "unary_backward",
        vec![t(dev, &[5], 1), t(dev, &[5], 2), t(dev, &[5], 3)],
        Box::new(|x| ew::unary_backward(ew::UnaryOp::Gelu, &x[0], &x[1], &x[2]).map(drop)),
    );
    refuses(dev, "binary", vec![t(dev, &[2, 3], 1), t(dev, &[3], 2)], Box::new(|x| ew::add(&x[0], &x[1]).map(drop)));
    refuses(
        dev,
        "binary_backward",
        vec![t(dev, &[2, 3], 1), t(dev, &[3], 2), t(dev, &[2, 3], 3)],
        Box::new(|x| ew::binary_backward(ew::BinaryOp::Mul, &x[0], &x[1], &x[2]).map(drop)),
    );
    refuses(dev, "reduce", vec![t(dev, &[3, 4], 1)], Box::new(|x| reduce::max(&x[0], 1).map(drop)));
    let (_, idx) = reduce::max(&t(dev, &[3, 4], 1), 1).unwrap();
    refuses(
        dev,
        "reduce_backward",
        vec![t(dev, &[3], 1), idx],
        Box::new(|x| reduce::reduce_backward(ReduceOp::Max, &x[0], Some(&x[1]), &[3, 4], 1).map(drop)),
    );
    refuses(dev, "sum_to_shape", vec![t(dev, &[3, 4], 1)], Box::new(|x| reduce::sum_to_shape(&x[0], &[4]).map(drop)));
    refuses(dev, "softmax", vec![t(dev, &[3, 4], 1)], Box::new(|x| softmax::softmax(&x[0]).map(drop)));
    refuses(
        dev,
        "softmax_backward",
        vec![t(dev, &[3, 4], 1), t(dev, &[3, 4], 2)],
        Box::new(|x| softmax::softmax_backward(&x[0], &x[1], false).map(drop)),
    );
    refuses(dev, "permute", vec![t(dev, &[2, 3, 4], 1)], Box::new(|x| transpose::permute(&x[0], &[2, 0, 1]).map(drop)));
    refuses(dev, "transpose", vec![t(dev, &[3, 4], 1)], Box::new(|x| transpose::transpose(&x[0], 0, 1).map(drop)));
    refuses(dev, "narrow", vec![t(dev, &[3, 4], 1)], Box::new(|x| transpose::narrow(&x[0], 1, 1, 2).map(drop)));
    refuses(
        dev,
        "narrow_backward",
        vec![t(dev, &[3, 2], 1)],
        Box::new(|x| transpose::narrow_backward(&x[0], &[3, 4], 1, 1).map(drop)),
    );
    // matrix products and convolutions
    refuses(
        dev,
        "matmul",
        vec![t(dev, &[3, 4], 1), t(dev, &[4, 5], 2)],
        Box::new(|x| gemm::matmul(&x[0], &x[1], GemmOpts::default()).map(drop)),
    );
    refuses(
        dev,
        "matmul_backward",
        vec![t(dev, &[3, 4], 1), t(dev, &[4, 5], 2), t(dev, &[3, 5], 3)],
        Box::new(|x| gemm::matmul_backward(&x[0], &x[1], &x[2], GemmOpts::default()).map(drop)),
    );
    refuses(
        dev,
        "linear",
        vec![t(dev, &[3, 4], 1), t(dev, &[5, 4], 2), t(dev, &[5], 3)],
        Box::new(move |x| linear::linear(&x[0], &x[1], Some(&x[2]), a).map(drop)),
    );
    refuses(
        dev,
        "conv2d",
        vec![t(dev, &[1, 2, 6, 6], 1), t(dev, &[3, 2, 3, 3], 2), t(dev, &[3], 3)],
        Box::new(move |x| conv::conv2d(&x[0], &x[1], Some(&x[2]), a).map(drop)),
    );
    refuses(
        dev,
        "conv2d_backward",
        vec![t(dev, &[1, 2, 6, 6], 1), t(dev, &[3, 2, 3, 3], 2), t(dev, &[1, 3, 6, 6], 3)],
        Box::new(move |x| conv::conv2d_backward(&x[0], &x[1], &x[2], true, a).map(drop)),
    );
    refuses(
        dev,
        "conv1d",
        vec![t(dev, &[1, 2, 6], 1), t(dev, &[3, 2, 1], 2)],
        Box::new(move |x| conv::conv1d(&x[0], &x[1], None, a).map(drop)),
    );
    refuses(
        dev,
        "conv1d_backward",
        vec![t(dev, &[1, 2, 6], 1), t(dev, &[3, 2, 1], 2), t(dev, &[1, 3, 6], 3)],
        Box::new(move |x| conv::conv1d_backward(&x[0], &x[1], &x[2], true, a).map(drop)),
    );
    refuses(
        dev,
        "conv2d_cat",
        vec![t(dev, &[1, 2, 6, 6], 1), t(dev, &[1, 1, 6, 6], 2), t(dev, &[3, 3, 3, 3], 3)],
        Box::new(move |x| conv::conv2d_cat(&[&x[0], &x[1]], &x[2], None, a).map(drop)),
    );
    refuses(
        dev,
        "conv2d_cat_backward",
        vec![t(dev, &[1, 2, 6, 6], 1), t(dev, &[1, 1, 6, 6], 2), t(dev, &[3, 3, 3, 3], 3), t(dev, &[1, 3, 6, 6], 4)],
        Box::new(move |x| conv::conv2d_cat_backward(&[&x[0], &x[1]], &x[2], &x[3], true, a).map(drop)),
    );
    // attention
    let (q, k, v) = (t(dev, &[1, 3, 8], 1), t(dev, &[1, 5, 8], 2), t(dev, &[1, 5, 8], 3));
    let w = pos(dev, &[1, 5], 4);
    refuses(
        dev,
        "attention",
        vec![q.clone(), k.clone(), v.clone(), w.clone()],
        Box::new(|x| {
            let o = AttnOpts { condition: Condition::Probs(&x[3]), ..AttnOpts::new(2) };
            attention::attention(&x[0], &x[1], &x[2], &o).map(drop)
        }),
    );
    let o = AttnOpts { condition: Condition::Probs(&w), ..AttnOpts::new(2) };
    let fwd = attention::attention(&q, &k, &v, &o).unwrap();
    refuses(
        dev,
        "attention_backward",
        vec![q.clone(), k.clone(), v.clone(), w.clone(), t(dev, &[1, 3, 8], 5)],
        Box::new(|x| {
            let o = AttnOpts { condition: Condition::Probs(&x[3]), ..AttnOpts::new(2) };
            attention::attention_backward(&x[0], &x[1], &x[2], &fwd, &x[4], &o).map(drop)
        }),
    );
    // norms
    let (x, g, b) = (t(dev, &[3, 8], 1), t(dev, &[8], 2), t(dev, &[8], 3));
    refuses(
        dev,
        "layer_norm",
        vec![x.clone(), g.clone(), b.clone()],
        Box::new(|x| layer_norm::layer_norm(&x[0], Some(&x[1]), Some(&x[2]), 1e-5).map(drop)),
    );
    let lf = layer_norm::layer_norm(&x, Some(&g), Some(&b), 1e-5).unwrap();
    refuses(
        dev,
        "layer_norm_backward",
        vec![x, g, b, t(dev, &[3, 8], 4)],
        Box::new(|x| layer_norm::layer_norm_backward(&x[0], Some(&x[1]), Some(&x[2]), &lf, &x[3]).map(drop)),
    );
    let bo = norm::BnOpts { eps: 1e-5, momentum: 0.1, relu: true, train: true };
    let bn_in = vec![t(dev, &[2, 3, 4, 4], 1), t(dev, &[3], 2), t(dev, &[3], 3), t(dev, &[3], 4), pos(dev, &[3], 5)];
    refuses(
        dev,
        "batch_norm",
        bn_in.clone(),
        Box::new(move |x| norm::batch_norm(&x[0], &x[1], &x[2], &x[3], &x[4], bo).map(drop)),
    );
    let bf = norm::batch_norm(&bn_in[0], &bn_in[1], &bn_in[2], &bn_in[3], &bn_in[4], bo).unwrap();
    refuses(
        dev,
        "batch_norm_backward",
        vec![bn_in[0].clone(), bn_in[1].clone(), t(dev, &[2, 3, 4, 4], 6)],
        Box::new(|x| norm::batch_norm_backward(&x[0], &x[1], &bf, &x[2], bo).map(drop)),
    );
    // pooling, embedding
    refuses(dev, "max_pool2", vec![t(dev, &[1, 2, 4, 4], 1)], Box::new(|x| pool::max_pool2(&x[0]).map(drop)));
    let (_, pidx) = pool::max_pool2(&t(dev, &[1, 2, 4, 4], 1)).unwrap();
    refuses(
        dev,
        "max_pool2_backward",
        vec![t(dev, &[1, 2, 2, 2], 2), pidx],
        Box::new(|x| pool::max_pool2_backward(&x[0], &x[1], &[1, 2, 4, 4]).map(drop)),
    );
    refuses(dev, "upsample2", vec![t(dev, &[1, 2, 3, 3], 1)], Box::new(|x| pool::upsample2(&x[0]).map(drop)));
    refuses(
        dev,
        "upsample2_backward",
        vec![t(dev, &[1, 2, 6, 6], 1)],
        Box::new(|x| pool::upsample2_backward(&x[0]).map(drop)),
    );
    let ids = Tensor::from_vec_i32(vec![0, 3, 1, 2], &[2, 2], dev).unwrap();
    refuses(
        dev,
        "embedding",
        vec![ids.clone(), t(dev, &[4, 8], 1)],
        Box::new(|x| embedding::embedding(&x[0], &x[1]).map(drop)),
    );
    refuses(
        dev,
        "embedding_backward",
        vec![ids, t(dev, &[2, 2, 8], 1)],
        Box::new(|x| embedding::embedding_backward(&x[0], &x[1], 4).map(drop)),
    );
    // PLAM
    let pw = vec![
        t(dev, &[2, 3, 4, 4], 1),
        t(dev, &[3, 3, 1, 1], 2),
        t(dev, &[3, 3, 1, 1], 3),
        t(dev, &[6, 3], 4),
        t(dev, &[6], 5),
        t(dev, &[1, 6], 6),
        t(dev, &[1], 7),
    ];
    let weights = |x: &[Tensor]| -> [Tensor; 6] { [1, 2, 3, 4, 5, 6].map(|i| x[i].clone()) };
    let pl = |w: &[Tensor; 6]| (w[0].clone(), w[1].clone(), w[2].clone(), w[3].clone(), w[4].clone(), w[5].clone());
    refuses(
        dev,
        "plam_gate",
        pw.clone(),
        Box::new(move |x| {
            let (a0, a1, a2, a3, a4, a5) = pl(&weights(x));
            let w = plam::PlamWeights { w_avg: &a0, w_max: &a1, fc1_w: &a2, fc1_b: &a3, fc2_w: &a4, fc2_b: &a5 };
            plam::plam_gate(&x[0], &w, a).map(drop)
        }),
    );
    let (a0, a1, a2, a3, a4, a5) = pl(&weights(&pw));
    let w0 = plam::PlamWeights { w_avg: &a0, w_max: &a1, fc1_w: &a2, fc1_b: &a3, fc2_w: &a4, fc2_b: &a5 };
    let pf = plam::plam_gate(&pw[0], &w0, a).unwrap();
    let mut pb = pw.clone();
    pb.push(t(dev, &[2, 3, 4, 4], 8));
    refuses(
        dev,
        "plam_gate_backward",
        pb,
        Box::new(|x| {
            let (a0, a1, a2, a3, a4, a5) = pl(&weights(x));
            let w = plam::PlamWeights { w_avg: &a0, w_max: &a1, fc1_w: &a2, fc1_b: &a3, fc2_w: &a4, fc2_b: &a5 };
            plam::plam_gate_backward(&x[0], &w, pf.clone(), &x[7], a).map(drop)
        }),
    );
    // losses and metrics
    let target = tensor(&[1.0, 0.0, 1.0, 1.0, 0.0, 0.0, 1.0, 0.0], &[2, 1, 2, 2], dev);
    refuses(
        dev,
        "dice_bce",
        vec![t(dev, &[2, 1, 2, 2], 1), target.clone()],
        Box::new(|x| loss::dice_bce(&x[0], &x[1]).map(drop)),
    );
    let lg = t(dev, &[2, 1, 2, 2], 1);
    let sl = loss::dice_bce(&lg, &target).unwrap();
    refuses(
        dev,
        "dice_bce_backward",
        vec![lg.clone(), target.clone()],
        Box::new(|x| loss::dice_bce_backward(&x[0], &x[1], &sl, 1.0).map(drop)),
    );
    refuses(
        dev,
        "metrics",
        vec![pos(dev, &[2, 1, 2, 2], 1), target],
        Box::new(|x| loss::metrics(&x[0], &x[1]).map(drop)),
    );
    refuses(dev, "mse", vec![t(dev, &[6], 1), t(dev, &[6], 2)], Box::new(|x| loss::mse(&x[0], &x[1]).map(drop)));
    refuses(
        dev,
        "mse_backward",
        vec![t(dev, &[6], 1), t(dev, &[6], 2)],
        Box::new(|x| loss::mse_backward(&x[0], &x[1], 1.0).map(drop)),
    );
    // contrastive
    refuses(dev, "l2_normalize", vec![t(dev, &[3, 8], 1)], Box::new(|x| ccl::l2_normalize(&x[0]).map(drop)));
    let (y, inv) = ccl::l2_normalize(&t(dev, &[3, 8], 1)).unwrap();
    refuses(
        dev,
        "l2_normalize_backward",
        vec![y, inv, t(dev, &[3, 8], 2)],
        Box::new(|x| ccl::l2_normalize_backward(&x[0], &x[1], &x[2]).map(drop)),
    );
    let mask = tensor(&[1.0, 1.0, 0.0, 1.0, 0.0, 0.0], &[2, 3], dev);
    let cin = vec![t(dev, &[2, 3, 8], 1), t(dev, &[2, 4, 8], 2), mask, pos(dev, &[2, 3], 3), pos(dev, &[2, 4], 4)];
    refuses(
        dev,
        "ccl_similarity",
        cin.clone(),
        Box::new(|x| ccl::ccl_similarity(&x[0], &x[1], &x[2], &x[3], &x[4]).map(drop)),
    );
    let cf = ccl::ccl_similarity(&cin[0], &cin[1], &cin[2], &cin[3], &cin[4]).unwrap();
    refuses(
        dev,
        "ccl_similarity_backward",
        vec![cin[2].clone(), cin[3].clone(), cin[4].clone(), t(dev, &[2, 2], 5), t(dev, &[2, 2], 6)],
        Box::new(|x| ccl::ccl_similarity_backward(&cf, &x[0], &x[1], &x[2], &x[3], &x[4]).map(drop)),
    );
    refuses(dev, "info_nce", vec![t(dev, &[3, 3], 1)], Box::new(|x| ccl::info_nce(&x[0], 10.0).map(drop)));
    // the optimiser
    refuses(
        dev,
        "adam",
        vec![t(dev, &[7], 1), t(dev, &[7], 2), t(dev, &[7], 3), pos(dev, &[7], 4)],
        Box::new(|x| {
            reclmis::optim::adam_update(&reclmis::optim::AdamConfig::default(), 1, &x[0], &x[1], &x[2], &x[3]).map(drop)
        }),
    );
}

#[test]
fn every_op_refuses_half_types_on_cpu() {
    check_all(&device("cpu"));
}

#[test]
fn every_op_refuses_half_types_on_emu() {
    check_all(&device("emu"));
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn every_op_refuses_half_types_on_cuda() {
    check_all(&device("cuda"));
}
