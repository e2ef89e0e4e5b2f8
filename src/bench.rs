//! `reclmis bench`: per kernel and shape, the median time, GFLOP/s and GB/s (minimum bytes moved).
//!
//! cpu: wall clock around the op. cuda: device events around the op after warm-up runs, with the L2
//! cache flushed (a 256 MiB memset) before every repetition so that each run starts cold. emu: wall
//! clock on small shapes; it measures the emulator, not a GPU.
//!
//! With a peer (`--peer PYTHON`), the same cases run in PyTorch in the same invocation (the script
//! benches/peer_torch.py, 2 threads on cpu) and each line gets the ratio of our throughput to the
//! peer's.

use crate::device::Device;
use crate::error::{Error, Result};
use crate::ops::attention::{self as attn, AttnOpts, Condition};
use crate::ops::elementwise::{self, UnaryOp};
use crate::ops::gemm::{self, GemmAlgo, GemmOpts};
use crate::ops::{ccl, conv, embedding, layer_norm, loss, norm, plam, pool, reduce, softmax, transpose};
use crate::tensor::{DType, Tensor};
use std::time::Instant;

pub mod ceilings;
pub mod h100;
pub mod model;
pub mod report;
mod unet;

type Validator = Box<dyn Fn(&Tensor) -> Result<()>>;

/// One benchmark case: what it computes and how to call it.
pub struct Case {
    /// Group name used by `--op` (gemm, gemm_tc, softmax, ...).
    pub op: &'static str,
    pub shape: String,
    pub flops: f64,
    pub bytes: f64,
    /// The equivalent PyTorch expression for the peer script, if any.
    pub peer: Option<String>,
    run: Box<dyn Fn() -> Result<Tensor>>,
    /// Checks one output before anything is timed (a fast wrong kernel is worth nothing).
    validate: Option<Validator>,
}

#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Measurement {
    pub op: String,
    pub shape: String,
    /// Timed repetitions (after the untimed warm-up runs).
    pub reps: usize,
    pub min_s: f64,
    pub median_s: f64,
    /// The 90th percentile (nearest rank) of the repetitions.
    pub p90_s: f64,
    pub gflops: f64,
    pub gbs: f64,
    pub peer_median_s: Option<f64>,
    /// % of the roofline the median reaches (cpu: the machine's measured ceilings)
    #[serde(default)]
    pub roofline_pct: Option<f64>,
    /// The least time an H100 needs for the case (bench::h100): its roofline before any GPU run
    #[serde(default)]
    pub h100_min_s: Option<f64>,
}

/// min, median and 90th percentile (nearest rank) of repeated timings.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Timing {
    pub min: f64,
    pub median: f64,
    pub p90: f64,
    pub reps: usize,
}

impl Timing {
    pub fn of(mut v: Vec<f64>) -> Timing {
        v.sort_by(|a, b| a.total_cmp(b));
        let n = v.len().max(1);
        let at = |q: f64| v.get(((q * n as f64).ceil() as usize).clamp(1, n) - 1).copied().unwrap_or(f64::NAN);
        Timing {
            min: v.first().copied().unwrap_or(f64::NAN),
            median: v.get(v.len() / 2).copied().unwrap_or(f64::NAN),
            p90: at(0.9),
            reps: v.len(),
        }
    }
}

fn rand_tensor(shape: &[usize], seed: u64, dev: &Device) -> Result<Tensor> {
    let n: usize = shape.iter().product();
    let mut s = seed.wrapping_mul(0x9E3779B97F4A7C15) | 1;
    let v = (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            (s >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0
        })
        .collect();
    Tensor::from_vec(v, shape, dev)
}

/// The cases for a device. emu gets small shapes: it runs every CUDA thread as a fiber.
type Group = fn(&Device, bool, &mut Vec<Case>) -> Result<()>;

/// Every benchmark group with the case names it defines.
const GROUPS: [(&[&str], Group); 15] = [
    (&["gemm", "gemm_tc", "gemm_bf16"], gemm_cases),
    (&["softmax", "softmax_bwd"], softmax_cases),
    (&["relu", "relu_bwd", "add_bcast", "sum", "max", "sum_bwd"], activation_cases),
    (&["transpose", "permute", "narrow"], layout_cases),
    (&["cast_bf16", "cast_f16"], cast_cases),
    (&["adam"], optim_cases),
    (&["ccl", "ccl_composed", "ccl_fwd_bwd", "ccl_composed_fwd_bwd"], ccl_cases),
    (&["copy", "dice_bce", "dice_bce_bwd", "metrics", "mse"], seg_cases),
    (&["max_pool2", "max_pool2_bwd", "upsample2", "upsample2_bwd"], pool_cases),
    (&["conv3x3", "conv3x3_b8", "conv3x3_bwd", "conv1x1", "conv3x3_cat"], conv_cases),
    (&["batch_norm_relu", "batch_norm_relu_bwd", "batch_norm_relu_bwd_bf16"], bn_cases),
    (&["plam", "plam_bwd"], plam_cases),
    (&["attention", "attention_composed", "attention_fwd_bwd", "attention_composed_fwd_bwd"], attention_cases),
    (&["layer_norm", "layer_norm_bwd", "gelu", "quick_gelu", "linear", "embedding"], transformer_cases),
    (&["unet"], unet_cases),
];

/// The cases for a device, only the groups `filter` names (a comma-separated list of case names) (so that a run allocates only what it
/// times). emu gets small shapes: it runs every CUDA thread as a fiber.
pub fn cases(dev: &Device, filter: Option<&str>) -> Result<Vec<Case>> {
    let small = matches!(dev, Device::Emu);
    let want = |ops: &[&str]| filter.is_none_or(|f| f.split(',').any(|f| ops.contains(&f)));
    let mut v = Vec::new();
    for (ops, group) in GROUPS {
        if want(ops) {
            group(dev, small, &mut v)?;
        }
    }
    Ok(v)
}

/// Square GEMMs (exact f32 and, on cuda/emu, the tf32 tensor-core kernel).
fn gemm_cases(dev: &Device, small: bool, v: &mut Vec<Case>) -> Result<()> {
    let gemm_sizes: &[usize] = if small {
        &[64, 128]
    } else if dev.is_gpu_like() {
        &[1024, 2048, 4096]
    } else {
        &[256, 1024, 2048]
    };
    for &s in gemm_sizes {
        let algos: &[(&str, GemmAlgo)] = if dev.is_gpu_like() {
            &[("gemm", GemmAlgo::Tiled), ("gemm_tc", GemmAlgo::TensorCore)]
        } else {
            &[("gemm", GemmAlgo::Auto)]
        };
        for &(name, algo) in algos {
            v.push(gemm_case(dev, name, algo, (s, s, s))?);
        }
        v.push(gemm_bf16_case(dev, (s, s, s))?);
    }
    Ok(())
}

/// C = A · B in bf16 (f32 accumulation), validated on sampled elements against the f64 product
/// of the bf16 operands: one bf16 rounding of C (2^-8) plus the f32 sum's k roundings.
fn gemm_bf16_case(dev: &Device, (m, n, k): (usize, usize, usize)) -> Result<Case> {
    use crate::ops::cast::cast;
    let a = cast(&rand_tensor(&[m, k], 1, dev)?, DType::BF16)?;
    let b = cast(&rand_tensor(&[k, n], 2, dev)?, DType::BF16)?;
    let (ha, hb) = (a.to_vec()?, b.to_vec()?);
    let tol = 1.0 / 256.0 + (k + 2) as f64 * f32::EPSILON as f64;
    Ok(Case {
        op: "gemm_bf16",
        shape: format!("{m}x{n}x{k} bf16"),
        flops: 2.0 * (m * n * k) as f64,
        bytes: 2.0 * (m * k + k * n + m * n) as f64,
        peer: Some(format!("mm_bf16 {m} {n} {k}")),
        run: Box::new(move || gemm::matmul(&a, &b, GemmOpts::default())),
        validate: Some(Box::new(move |c| check_gemm_mnk(&ha, &hb, &c.to_vec()?, (m, n, k), tol))),
    })
}

/// Attention-like softmax rows.
fn softmax_cases(dev: &Device, small: bool, v: &mut Vec<Case>) -> Result<()> {
    // Attention-like shapes of the model: 32 images x 4 heads, 196 image tokens.
    let (rows, cols) = if small { (96, 196) } else { (32 * 4 * 196, 196) };
    let x = rand_tensor(&[rows, cols], 3, dev)?;
    v.push(softmax_case(x.clone()));
    let y = softmax::softmax(&x)?;
    let dy = rand_tensor(&[rows, cols], 4, dev)?;
    v.push(Case {
        op: "softmax_bwd",
        shape: format!("{rows}x{cols}"),
        flops: 4.0 * (rows * cols) as f64,
        bytes: 12.0 * (rows * cols) as f64,
        peer: None,
        run: Box::new(move || softmax::softmax_backward(&y, &dy, false)),
        validate: None,
    });
    Ok(())
}

/// Elementwise ops and reductions on a U-Net activation.
fn activation_cases(dev: &Device, small: bool, v: &mut Vec<Case>) -> Result<()> {
    // A U-Net activation: batch 8 (2 on emu), 64 channels, 224x224 (28x28 on emu).
    let (bt, c, hw) = if small { (2, 8, 28) } else { (8, 64, 224) };
    let act = rand_tensor(&[bt, c, hw, hw], 5, dev)?;
    let bias = rand_tensor(&[1, c, 1, 1], 6, dev)?;
    let n = (bt * c * hw * hw) as f64;
    v.push(relu_case(act.clone()));
    let (a5, g5) = (act.clone(), rand_tensor(&[bt, c, hw, hw], 8, dev)?);
    let y5 = elementwise::unary(&a5, UnaryOp::Relu)?;
    v.push(Case {
        op: "relu_bwd",
        shape: format!("{bt}x{c}x{hw}x{hw}"),
        flops: n,
        bytes: 12.0 * n,
        peer: None,
        run: Box::new(move || elementwise::unary_backward(UnaryOp::Relu, &a5, &y5, &g5)),
        validate: None,
    });
    let a2 = act.clone();
    v.push(Case {
        op: "add_bcast",
        shape: format!("{bt}x{c}x{hw}x{hw}+1x{c}x1x1"),
        flops: n,
        bytes: 8.0 * n,
        peer: Some(format!("add_bcast {bt} {c} {hw} {hw}")),
        run: Box::new(move || elementwise::add(&a2, &bias)),
        validate: None,
    });
    let a3 = act.clone();
    v.push(Case {
        op: "sum",
        shape: format!("{bt}x{c}x{hw}x{hw} axis 1"),
        flops: n,
        bytes: 4.0 * n + 4.0 * n / c as f64,
        peer: Some(format!("sum1 {bt} {c} {hw} {hw}")),
        run: Box::new(move || reduce::sum(&a3, 1)),
        validate: None,
    });
    let a4 = act.clone();
    v.push(Case {
        op: "max",
        shape: format!("{bt}x{c}x{} axis -1", hw * hw),
        flops: n,
        bytes: 4.0 * n + 8.0 * n / (hw * hw) as f64,
        peer: None,
        run: Box::new(move || Ok(reduce::max(&a4.reshape(&[bt, c, hw * hw])?, -1)?.0)),
        validate: None,
    });
    let g6 = rand_tensor(&[bt, hw, hw], 9, dev)?;
    let shape6 = [bt, c, hw, hw];
    v.push(Case {
        op: "sum_bwd",
        shape: format!("{bt}x{hw}x{hw} -> {bt}x{c}x{hw}x{hw}"),
        flops: 0.0,
        bytes: 4.0 * n + 4.0 * n / c as f64,
        peer: None,
        run: Box::new(move || reduce::reduce_backward(reduce::ReduceOp::Sum, &g6, None, &shape6, 1)),
        validate: None,
    });
    Ok(())
}

/// f32 -> bf16 and f32 -> f16 over a U-Net activation (the conversions autocast adds around
/// each bf16 op): 6 bytes moved per element. Each is checked against the half crate's rounding.
fn cast_cases(dev: &Device, small: bool, v: &mut Vec<Case>) -> Result<()> {
    let (b, c, hw) = if small { (1, 8, 32) } else { (4, 64, 224) };
    let x = rand_tensor(&[b, c, hw, hw], 21, dev)?;
    let host = x.to_vec()?;
    for (op, to) in [("cast_bf16", DType::BF16), ("cast_f16", DType::F16)] {
        let (x, host) = (x.clone(), host.clone());
        v.push(Case {
            op,
            shape: format!("{b}x{c}x{hw}x{hw} f32 -> {to}"),
            flops: 0.0,
            bytes: 6.0 * x.numel() as f64,
            peer: Some(format!("cast_{to} {b} {c} {hw}")),
            run: Box::new(move || crate::ops::cast::cast(&x, to)),
            validate: Some(Box::new(move |y| {
                let want: Vec<f32> = match to {
                    DType::BF16 => host.iter().map(|&v| half::bf16::from_f32(v).to_f32()).collect(),
                    _ => host.iter().map(|&v| half::f16::from_f32(v).to_f32()).collect(),
                };
                match y.to_vec()? == want {
                    true => Ok(()),
                    false => Err(Error::Other(format!("{op}: not the round-to-nearest-even values"))),
                }
            })),
        });
    }
    Ok(())
}

/// Transpose and the attention head split.
fn layout_cases(dev: &Device, small: bool, v: &mut Vec<Case>) -> Result<()> {
    let (tb, tr, tc) = if small { (2, 36, 40) } else { (32, 196, 512) };
    let t = rand_tensor(&[tb, tr, tc], 7, dev)?;
    v.push(Case {
        op: "transpose",
        shape: format!("{tb}x{tr}x{tc} -> {tb}x{tc}x{tr}"),
        flops: 0.0,
        bytes: 8.0 * (tb * tr * tc) as f64,
        peer: Some(format!("transpose {tb} {tr} {tc}")),
        run: Box::new(move || transpose::transpose(&t, 1, 2)),
        validate: None,
    });
    // The attention head split: [B, T, H, D] -> [B, H, T, D] (a general permutation).
    let (pb, pt, ph, pd) = if small { (2, 17, 4, 16) } else { (32, 196, 4, 128) };
    let q = rand_tensor(&[pb, pt, ph, pd], 10, dev)?;
    v.push(Case {
        op: "permute",
        shape: format!("{pb}x{pt}x{ph}x{pd} [0,2,1,3]"),
        flops: 0.0,
        bytes: 8.0 * (pb * pt * ph * pd) as f64,
        peer: Some(format!("permute0213 {pb} {pt} {ph} {pd}")),
        run: Box::new(move || transpose::permute(&q, &[0, 2, 1, 3])),
        validate: None,
    });
    // The model's packed attention weights: the k rows of in_proj [3d, d].
    let d = if small { 64 } else { 512 };
    let w = rand_tensor(&[3 * d, d], 16, dev)?;
    v.push(Case {
        op: "narrow",
        shape: format!("{}x{d} rows {d}..{}", 3 * d, 2 * d),
        flops: 0.0,
        bytes: 8.0 * (d * d) as f64,
        peer: Some(format!("narrow {} {d} {d} {d}", 3 * d)),
        run: Box::new(move || transpose::narrow(&w, 0, d, d)),
        validate: None,
    });
    Ok(())
}

/// One Adam step over a parameter tensor the size of the official CVR/CLR FFN weight (512·1024),
/// reading p, g, m, v and writing the three results.
#[cfg(feature = "train")]
fn optim_cases(dev: &Device, small: bool, v: &mut Vec<Case>) -> Result<()> {
    let n = if small { 4096 } else { 1 << 19 };
    let (p, g) = (rand_tensor(&[n], 17, dev)?, rand_tensor(&[n], 18, dev)?);
    let (m, s) = (Tensor::zeros(&[n], dev)?, Tensor::zeros(&[n], dev)?);
    v.push(Case {
        op: "adam",
        shape: format!("{n}"),
        flops: 0.0,
        bytes: 28.0 * n as f64,
        peer: Some(format!("adam {n}")),
        run: Box::new(
            move || Ok(crate::optim::adam_update(&crate::optim::AdamConfig::default(), 1, &p, &g, &m, &s)?.0),
        ),
        validate: None,
    });
    Ok(())
}

#[cfg(not(feature = "train"))]
fn optim_cases(_: &Device, _: bool, _: &mut Vec<Case>) -> Result<()> {
    Ok(())
}

/// CCL at the official size (B = 32 texts and images, L = 18 words, N = 196 patches, D = 512),
/// fused and composed, forward and forward + backward.
fn ccl_cases(dev: &Device, small: bool, v: &mut Vec<Case>) -> Result<()> {
    let (b, l, n, d) = if small { (4, 18, 16, 64) } else { (32, 18, 196, 512) };
    let t = rand_tensor(&[b, l, d], 11, dev)?;
    let im = rand_tensor(&[b, n, d], 12, dev)?;
    let mut mv = vec![1.0f32; b * l];
    for a in 0..b {
        mv[a * l + 12 + a % 6..(a + 1) * l].fill(0.0); // 12..17 valid words, as in QaTa notes
    }
    let mask = Tensor::from_vec(mv, &[b, l], dev)?;
    let tw = softmax::softmax(&rand_tensor(&[b, l], 13, dev)?)?;
    let vw = softmax::softmax(&rand_tensor(&[b, n], 14, dev)?)?;
    let g = rand_tensor(&[b, b], 15, dev)?;
    let flops = 2.0 * (b * b * l * n * d) as f64;
    let bytes = 4.0 * (b * (l + n) * d) as f64;
    let shape = format!("B{b} L{l} N{n} D{d}");
    let inputs = std::rc::Rc::new((t, im, mask, tw, vw, g));
    let spec = Some(format!("ccl {b} {l} {n} {d}"));
    let x = inputs.clone();
    v.push(Case {
        op: "ccl",
        shape: shape.clone(),
        flops,
        bytes,
        peer: spec.clone(),
        validate: None,
        run: Box::new(move || Ok(ccl::ccl_similarity(&x.0, &x.1, &x.2, &x.3, &x.4)?.logits)),
    });
    let x = inputs.clone();
    v.push(Case {
        op: "ccl_composed",
        shape: shape.clone(),
        flops,
        bytes,
        peer: spec,
        validate: None,
        run: Box::new(move || Ok(ccl::composed::forward(&x.0, &x.1, &x.2, &x.3, &x.4)?.logits)),
    });
    let x = inputs.clone();
    let spec_fb = Some(format!("ccl_fb {b} {l} {n} {d}"));
    v.push(Case {
        op: "ccl_fwd_bwd",
        shape: shape.clone(),
        flops,
        bytes: 2.0 * bytes,
        peer: spec_fb.clone(),
        validate: None,
        run: Box::new(move || {
            let f = ccl::ccl_similarity(&x.0, &x.1, &x.2, &x.3, &x.4)?;
            Ok(ccl::ccl_similarity_backward(&f, &x.2, &x.3, &x.4, &x.5, &x.5)?.dv)
        }),
    });
    let x = inputs;
    v.push(Case {
        op: "ccl_composed_fwd_bwd",
        shape,
        flops: 3.0 * flops,
        bytes: 2.0 * bytes,
        peer: spec_fb,
        validate: None,
        run: Box::new(move || {
            let f = ccl::composed::forward(&x.0, &x.1, &x.2, &x.3, &x.4)?;
            Ok(ccl::composed::backward(&f, &x.2, &x.3, &x.4, &x.5, &x.5)?.1)
        }),
    });

    Ok(())
}

/// Attention at the model's shapes: the reconstruction transformers' conditioned cross-attention
/// both ways (18 text tokens and 196 image tokens of a 224² input, 4 heads of 128, official
/// condition), their causal conditioned self-attention over the 196 image tokens, and the CLIP
/// tower's causal, key-masked self-attention (8 heads of 64 over 18 tokens); batch 1 and 32.
/// Each fused next to the composition of primitive ops on the same device.
type AttnInputs = (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor);

#[derive(Clone, Copy)]
struct AttnCfg {
    h: usize,
    causal: bool,
    cond: bool,
    masked: bool,
}

fn attn_opts(x: &AttnInputs, c: AttnCfg) -> AttnOpts<'_> {
    AttnOpts {
        causal: c.causal,
        key_valid: if c.masked { Some(&x.5) } else { None },
        condition: if c.cond { Condition::Probs(&x.4) } else { Condition::None },
        algo: GemmAlgo::TensorCore,
        ..AttnOpts::new(c.h)
    }
}

fn attention_cases(dev: &Device, small: bool, v: &mut Vec<Case>) -> Result<()> {
    // (heads, dh, tq, s, causal, conditioned, key mask)
    let shapes: &[(usize, usize, usize, usize, bool, bool, bool)] = &[
        (4, 128, 18, 196, false, true, false),
        (4, 128, 196, 18, false, true, false),
        (4, 128, 196, 196, true, true, false),
        (8, 64, 18, 18, true, false, true),
    ];
    let batches: &[usize] = if small { &[1] } else { &[1, 32] };
    for &b in batches {
        for &(h, dh, tq0, s0, causal, cond, masked) in shapes {
            let (tq, s) = if small { (tq0.min(36), s0.min(36)) } else { (tq0, s0) };
            let e = h * dh;
            let q = rand_tensor(&[b, tq, e], 21, dev)?;
            let k = rand_tensor(&[b, s, e], 22, dev)?;
            let val = rand_tensor(&[b, s, e], 23, dev)?;
            let dout = rand_tensor(&[b, tq, e], 24, dev)?;
            let w = softmax::softmax(&rand_tensor(&[b, s], 25, dev)?)?;
            // 12..17 valid tokens per note, as in QaTa
            let valid: Vec<i32> = (0..b * s).map(|x| (x % s < 12 + (x / s) % 6) as i32).collect();
            let valid = Tensor::from_vec_i32(valid, &[b, s], dev)?;
            let inputs = std::rc::Rc::new((q, k, val, dout, w, valid));
            let shape = format!(
                "B{b} H{h}x{dh} Tq{tq} S{s}{}{}{}",
                if causal { " causal" } else { "" },
                if cond { " cond" } else { "" },
                if masked { " keymask" } else { "" }
            );
            let sh = attn::AttnShape { b, h, tq, s, dh };
            let flops = sh.flops();
            let bytes = 4.0 * (2 * b * tq * e + 2 * b * s * e) as f64;
            let spec = |kind: &str| {
                Some(format!("{kind} {b} {h} {tq} {s} {dh} {} {} {}", causal as u8, cond as u8, masked as u8))
            };
            let cfg = AttnCfg { h, causal, cond, masked };
            let x = inputs.clone();
            v.push(Case {
                op: "attention",
                shape: shape.clone(),
                flops,
                bytes,
                peer: spec("attn"),
                validate: None,
                run: Box::new(move || Ok(attn::attention(&x.0, &x.1, &x.2, &attn_opts(&x, cfg))?.o)),
            });
            let x = inputs.clone();
            v.push(Case {
                op: "attention_composed",
                shape: shape.clone(),
                flops,
                bytes,
                peer: spec("attn"),
                validate: None,
                run: Box::new(move || Ok(attn::composed::forward(&x.0, &x.1, &x.2, &attn_opts(&x, cfg))?.o)),
            });
            let x = inputs.clone();
            v.push(Case {
                op: "attention_fwd_bwd",
                shape: shape.clone(),
                flops: 3.5 * flops,
                bytes: 2.0 * bytes,
                peer: spec("attn_fb"),
                validate: None,
                run: Box::new(move || {
                    let o = attn_opts(&x, cfg);
                    let f = attn::attention(&x.0, &x.1, &x.2, &o)?;
                    Ok(attn::attention_backward(&x.0, &x.1, &x.2, &f, &x.3, &o)?.dq)
                }),
            });
            let x = inputs;
            v.push(Case {
                op: "attention_composed_fwd_bwd",
                shape,
                flops: 3.5 * flops,
                bytes: 2.0 * bytes,
                peer: spec("attn_fb"),
                validate: None,
                run: Box::new(move || {
                    let o = attn_opts(&x, cfg);
                    let f = attn::composed::forward(&x.0, &x.1, &x.2, &o)?;
                    Ok(attn::composed::backward(&f, &x.3, &o)?.0)
                }),
            });
        }
    }
    Ok(())
}

/// The pieces around attention at the reconstruction transformers' sizes: 32 images x 196 tokens
/// x 512 channels (LayerNorm, GELU, the 512->512 projection with its bias), the CLIP tower's
/// QuickGELU on its 2048-wide MLP over 32 x 18 tokens, and the token embedding lookup
/// (49408 x 512 table).
fn transformer_cases(dev: &Device, small: bool, v: &mut Vec<Case>) -> Result<()> {
    let (rows, c) = if small { (64, 64) } else { (32 * 196, 512) };
    let x = rand_tensor(&[rows, c], 31, dev)?;
    let gamma = rand_tensor(&[c], 32, dev)?;
    let beta = rand_tensor(&[c], 33, dev)?;
    let dy = rand_tensor(&[rows, c], 34, dev)?;
    let n = (rows * c) as f64;
    let ln_in = std::rc::Rc::new((x.clone(), gamma, beta, dy));
    let a = ln_in.clone();
    v.push(Case {
        op: "layer_norm",
        shape: format!("{rows}x{c}"),
        flops: 8.0 * n,
        bytes: 8.0 * n,
        peer: Some(format!("layer_norm {rows} {c}")),
        validate: None,
        run: Box::new(move || Ok(layer_norm::layer_norm(&a.0, Some(&a.1), Some(&a.2), 1e-5)?.y)),
    });
    let a = ln_in;
    let f = layer_norm::layer_norm(&a.0, Some(&a.1), Some(&a.2), 1e-5)?;
    v.push(Case {
        op: "layer_norm_bwd",
        shape: format!("{rows}x{c}"),
        flops: 10.0 * n,
        bytes: 12.0 * n,
        peer: Some(format!("layer_norm_bwd {rows} {c}")),
        validate: None,
        run: Box::new(move || Ok(layer_norm::layer_norm_backward(&a.0, Some(&a.1), Some(&a.2), &f, &a.3)?.dx)),
    });
    let xg = x.clone();
    v.push(Case {
        op: "gelu",
        shape: format!("{rows}x{c}"),
        flops: 20.0 * n,
        bytes: 8.0 * n,
        peer: Some(format!("gelu {rows} {c}")),
        validate: None,
        run: Box::new(move || elementwise::unary(&xg, UnaryOp::Gelu)),
    });
    let (qr, qc) = if small { (36, 64) } else { (32 * 18, 2048) };
    let xq = rand_tensor(&[qr, qc], 35, dev)?;
    let nq = (qr * qc) as f64;
    v.push(Case {
        op: "quick_gelu",
        shape: format!("{qr}x{qc}"),
        flops: 20.0 * nq,
        bytes: 8.0 * nq,
        peer: Some(format!("quick_gelu {qr} {qc}")),
        validate: None,
        run: Box::new(move || elementwise::unary(&xq, UnaryOp::QuickGelu)),
    });
    let w = rand_tensor(&[c, c], 36, dev)?;
    let bias = rand_tensor(&[c], 37, dev)?;
    v.push(Case {
        op: "linear",
        shape: format!("{rows}x{c} -> {c} +bias"),
        flops: 2.0 * n * c as f64,
        bytes: 4.0 * (2.0 * n + (c * c) as f64),
        peer: Some(format!("linear {rows} {c} {c}")),
        validate: None,
        run: Box::new(move || gemm::linear::linear(&x, &w, Some(&bias), GemmAlgo::TensorCore)),
    });
    let (vocab, d, toks) = if small { (1000, 64, 36) } else { (49408, 512, 32 * 77) };
    let table = rand_tensor(&[vocab, d], 38, dev)?;
    let ids: Vec<i32> = (0..toks).map(|i| ((i * 7919) % vocab) as i32).collect();
    let ids = Tensor::from_vec_i32(ids, &[toks], dev)?;
    v.push(Case {
        op: "embedding",
        shape: format!("{toks} ids of {vocab}x{d}"),
        flops: 0.0,
        bytes: 8.0 * (toks * d) as f64,
        peer: Some(format!("embedding {toks} {vocab} {d}")),
        validate: None,
        run: Box::new(move || embedding::embedding(&ids, &table)),
    });
    Ok(())
}

/// The whole U-Net (encoder + decoder with PLAM gates, evaluation mode) at 224², batch 1
/// (48 x 48 on emu, base width 8).
fn unet_cases(dev: &Device, small: bool, v: &mut Vec<Case>) -> Result<()> {
    let (c, hw) = if small { (8, 48) } else { (64, 224) };
    let net = unet::UNet::new(c, dev)?;
    let x = rand_tensor(&[1, 3, hw, hw], 7, dev)?;
    let algo = if dev.is_gpu_like() { GemmAlgo::TensorCore } else { GemmAlgo::Auto };
    let flops = net.flops_per_image * (hw * hw) as f64 / (224.0 * 224.0);
    v.push(Case {
        op: "unet",
        shape: format!("b1 3x{hw}x{hw} base {c}"),
        flops,
        bytes: 4.0 * (3 * hw * hw) as f64,
        peer: Some(format!("unet 1 {c} {hw}")),
        // random weights: at least check that the activations stayed finite through 23 layers
        validate: Some(Box::new(|y| {
            if y.to_vec()?.iter().all(|v| v.is_finite()) {
                Ok(())
            } else {
                Err(Error::Other("unet: non-finite logits".into()))
            }
        })),
        run: Box::new(move || net.forward(&x, algo)),
    });
    Ok(())
}

/// Dice + BCE, metrics and MSE on 32 masks of 224², next to a plain copy of the same bytes.
fn seg_cases(dev: &Device, small: bool, v: &mut Vec<Case>) -> Result<()> {
    let (mb, hw) = if small { (2, 28) } else { (32, 224) };
    let px = mb * hw * hw;
    let z = rand_tensor(&[mb, hw * hw], 16, dev)?;
    let tgt = unary_step(&rand_tensor(&[mb, hw * hw], 17, dev)?)?;
    let seg = std::rc::Rc::new((z, tgt));
    let x = seg.clone();
    v.push(Case {
        op: "copy",
        shape: format!("{mb}x{hw}x{hw} f32 (scale by 1)"),
        flops: 0.0,
        bytes: 8.0 * px as f64,
        peer: None,
        validate: None,
        run: Box::new(move || elementwise::scale(&x.0, 1.0)),
    });
    let x = seg.clone();
    v.push(Case {
        op: "dice_bce",
        shape: format!("{mb}x{hw}x{hw}"),
        flops: 0.0,
        bytes: 8.0 * px as f64,
        peer: Some(format!("dice_bce {mb} {hw}")),
        validate: None,
        run: Box::new(move || Ok(loss::dice_bce(&x.0, &x.1)?.loss)),
    });
    let x = seg.clone();
    v.push(Case {
        op: "dice_bce_bwd",
        shape: format!("{mb}x{hw}x{hw}"),
        flops: 0.0,
        bytes: 12.0 * px as f64,
        peer: None,
        validate: None,
        run: Box::new(move || {
            let f = loss::dice_bce(&x.0, &x.1)?;
            loss::dice_bce_backward(&x.0, &x.1, &f, 1.0)
        }),
    });
    let x = seg.clone();
    v.push(Case {
        op: "metrics",
        shape: format!("{mb}x{hw}x{hw}"),
        flops: 0.0,
        bytes: 8.0 * px as f64,
        peer: None,
        validate: None,
        run: Box::new(move || Ok(loss::metrics(&x.0, &x.1)?.mean)),
    });
    let x = seg;
    v.push(Case {
        op: "mse",
        shape: format!("{mb}x{hw}x{hw}"),
        flops: 0.0,
        bytes: 8.0 * px as f64,
        peer: Some(format!("mse {mb} {hw}")),
        validate: None,
        run: Box::new(move || loss::mse(&x.0, &x.1)),
    });
    Ok(())
}

/// The U-Net's first pooling (8×64×224² -> 112²) and last upsampling (112² -> 224²).
fn pool_cases(dev: &Device, small: bool, v: &mut Vec<Case>) -> Result<()> {
    let (b, c, hw) = if small { (2, 4, 28) } else { (8, 64, 224) };
    let big = rand_tensor(&[b, c, hw, hw], 18, dev)?;
    let (pooled, idx) = pool::max_pool2(&big)?;
    let n = (b * c * hw * hw) as f64;
    let shape = format!("{b}x{c}x{hw}x{hw} <-> {}x{}", hw / 2, hw / 2);
    let x = big.clone();
    v.push(Case {
        op: "max_pool2",
        shape: shape.clone(),
        flops: 0.75 * n,
        bytes: 4.0 * n * 1.5,
        peer: Some(format!("maxpool {b} {c} {hw}")),
        validate: None,
        run: Box::new(move || Ok(pool::max_pool2(&x)?.0)),
    });
    let (g, i, full) = (pooled.clone(), idx, big.shape().to_vec());
    v.push(Case {
        op: "max_pool2_bwd",
        shape: shape.clone(),
        flops: 0.0,
        bytes: 4.0 * n * 1.5,
        peer: None,
        validate: None,
        run: Box::new(move || pool::max_pool2_backward(&g, &i, &full)),
    });
    let x = pooled;
    v.push(Case {
        op: "upsample2",
        shape: shape.clone(),
        flops: 0.0,
        bytes: 4.0 * n * 1.25,
        peer: Some(format!("upsample {b} {c} {}", hw / 2)),
        validate: None,
        run: Box::new(move || pool::upsample2(&x)),
    });
    v.push(Case {
        op: "upsample2_bwd",
        shape,
        flops: 0.75 * n,
        bytes: 4.0 * n * 1.25,
        peer: None,
        validate: None,
        run: Box::new(move || pool::upsample2_backward(&big)),
    });
    Ok(())
}

/// The U-Net's 3×3 convolutions at the official shapes (encoder 224² × 64 down to 14² × 512, the
/// decoder's 1024→256, 512→128, 256→64, 128→64), batch 1, some at batch 8, one backward; and the
/// PLAM gate's 1×1 convolution.
fn conv_cases(dev: &Device, small: bool, v: &mut Vec<Case>) -> Result<()> {
    // (op, batch, ci, co, hw)
    let shapes: &[(&'static str, usize, usize, usize, usize)] = if small {
        &[
            ("conv3x3", 1, 8, 8, 16),
            ("conv3x3_b8", 2, 8, 8, 16),
            ("conv3x3_bwd", 1, 8, 8, 16),
            ("conv1x1", 1, 16, 16, 16),
            ("conv3x3_cat", 1, 8, 8, 16),
        ]
    } else {
        &[
            ("conv3x3", 1, 64, 64, 224),
            ("conv3x3", 1, 128, 128, 112),
            ("conv3x3", 1, 256, 256, 56),
            ("conv3x3", 1, 512, 512, 28),
            ("conv3x3", 1, 512, 512, 14),
            ("conv3x3", 1, 1024, 256, 28),
            ("conv3x3", 1, 512, 128, 56),
            ("conv3x3", 1, 256, 64, 112),
            ("conv3x3", 1, 128, 64, 224),
            ("conv3x3_b8", 8, 64, 64, 224),
            ("conv3x3_b8", 8, 256, 256, 28),
            ("conv3x3_bwd", 1, 64, 64, 224),
            ("conv3x3_bwd", 1, 512, 512, 28),
            ("conv1x1", 1, 64, 64, 224),
            ("conv1x1", 1, 512, 512, 28),
            // the decoder's first convolution over concat[gated skip, upsampled], never built
            ("conv3x3_cat", 1, 1024, 256, 28),
            ("conv3x3_cat", 1, 128, 64, 224),
        ]
    };
    for (i, &(op, b, ci, co, hw)) in shapes.iter().enumerate() {
        if !matches!(op, "conv3x3_cat" | "conv3x3_bwd") {
            v.push(conv_case(dev, op, (b, ci, co, hw), i as u64)?);
            continue;
        }
        let k = 3;
        let x = rand_tensor(&[b, ci, hw, hw], 20 + i as u64, dev)?;
        let w = rand_tensor(&[co, ci, k, k], 40 + i as u64, dev)?;
        let bias = rand_tensor(&[co], 60 + i as u64, dev)?;
        let s = conv::ConvShape { b, ci, co, h: hw, w: hw, kh: k, kw: k };
        let algo = if dev.is_gpu_like() { GemmAlgo::TensorCore } else { GemmAlgo::Auto };
        let bytes = 4.0 * (b * (ci + co) * hw * hw + co * ci * k * k) as f64;
        let shape = format!("b{b} {ci}->{co} {hw}x{hw} k{k}");
        if op == "conv3x3_cat" {
            let half = ci / 2;
            let (x1, x2) =
                (rand_tensor(&[b, half, hw, hw], 90 + i as u64, dev)?, rand_tensor(&[b, ci - half, hw, hw], 95, dev)?);
            v.push(Case {
                op,
                shape: format!("b{b} ({half}+{})->{co} {hw}x{hw} k{k}", ci - half),
                flops: s.flops(),
                bytes,
                peer: Some(format!("conv_cat {b} {half} {} {co} {hw}", ci - half)),
                validate: None,
                run: Box::new(move || conv::conv2d_cat(&[&x1, &x2], &w, Some(&bias), algo)),
            });
        } else {
            let dy = rand_tensor(&[b, co, hw, hw], 80 + i as u64, dev)?;
            v.push(Case {
                op,
                shape,
                flops: 2.0 * s.flops(),
                bytes: 2.0 * bytes,
                peer: Some(format!("conv_bwd {b} {ci} {co} {hw} {k}")),
                validate: None,
                run: Box::new(move || Ok(conv::conv2d_backward(&x, &w, &dy, true, algo)?.dw)),
            });
        }
    }
    Ok(())
}

/// Training-mode batch norm + ReLU on the first U-Net activation (8×64×224²), and its backward.
fn bn_cases(dev: &Device, small: bool, v: &mut Vec<Case>) -> Result<()> {
    let (b, c, hw) = if small { (2, 4, 16) } else { (8, 64, 224) };
    let x = rand_tensor(&[b, c, hw, hw], 90, dev)?;
    let (g, bt) = (rand_tensor(&[c], 91, dev)?, rand_tensor(&[c], 92, dev)?);
    let (rm, rv) = (Tensor::zeros(&[c], dev)?, Tensor::from_vec(vec![1.0; c], &[c], dev)?);
    let o = norm::BnOpts { relu: true, ..Default::default() };
    let n = (b * c * hw * hw) as f64;
    let shape = format!("{b}x{c}x{hw}x{hw} train");
    let p = std::rc::Rc::new((x, g, bt, rm, rv));
    let q = p.clone();
    v.push(Case {
        op: "batch_norm_relu",
        shape: shape.clone(),
        flops: 0.0,
        bytes: 3.0 * 4.0 * n, // two reads for the statistics, one for the output, one write
        peer: Some(format!("bn_relu {b} {c} {hw}")),
        validate: None,
        run: Box::new(move || Ok(norm::batch_norm(&q.0, &q.1, &q.2, &q.3, &q.4, o)?.y)),
    });
    let f = norm::batch_norm(&p.0, &p.1, &p.2, &p.3, &p.4, o)?;
    let dy = rand_tensor(&[b, c, hw, hw], 93, dev)?;
    // x and y in bf16, as bf16 autocast keeps them (the kernel widens them as it reads)
    let bf16 = |t: &Tensor| crate::ops::cast::cast(t, DType::BF16);
    let half = (bf16(&p.0)?, p.1.clone(), norm::BnForward { y: bf16(&f.y)?, ..f.clone() }, dy.clone());
    v.push(Case {
        op: "batch_norm_relu_bwd",
        shape: shape.clone(),
        flops: 0.0,
        bytes: 7.0 * 4.0 * n,
        peer: None,
        validate: None,
        run: Box::new(move || Ok(norm::batch_norm_backward(&p.0, &p.1, &f, &dy, o)?.dx)),
    });
    v.push(Case {
        op: "batch_norm_relu_bwd_bf16",
        shape,
        flops: 0.0,
        bytes: 5.0 * 4.0 * n, // x and y as bf16 (read twice each), dy twice, dx once
        peer: None,
        validate: None,
        run: Box::new(move || Ok(norm::batch_norm_backward(&half.0, &half.1, &half.2, &half.3, o)?.dx)),
    });
    Ok(())
}

/// The PLAM gate of the first and last decoder stages (512 channels at 28², 64 at 224²), batch 1.
fn plam_cases(dev: &Device, small: bool, v: &mut Vec<Case>) -> Result<()> {
    let shapes: &[(usize, usize)] = if small { &[(8, 8)] } else { &[(512, 28), (64, 224)] };
    for (i, &(c, hw)) in shapes.iter().enumerate() {
        let r = |shape: &[usize], k: u64| rand_tensor(shape, 100 + 10 * i as u64 + k, dev);
        let s = r(&[1, c, hw, hw], 0)?;
        let ws = std::rc::Rc::new([
            r(&[c, c, 1, 1], 1)?,
            r(&[c, c, 1, 1], 2)?,
            r(&[6, 3], 3)?,
            r(&[6], 4)?,
            r(&[1, 6], 5)?,
            r(&[1], 6)?,
        ]);
        let algo = if dev.is_gpu_like() { GemmAlgo::TensorCore } else { GemmAlgo::Auto };
        let flops = 4.0 * (c * c * hw * hw) as f64; // the two 1×1 convolutions
        let bytes = 4.0 * 4.0 * (c * hw * hw) as f64;
        let (s1, w1) = (s.clone(), ws.clone());
        v.push(Case {
            op: "plam",
            shape: format!("b1 C{c} {hw}x{hw}"),
            flops,
            bytes,
            peer: Some(format!("plam 1 {c} {hw}")),
            validate: None,
            run: Box::new(move || {
                let w = PlamRef(&w1).get();
                Ok(plam::plam_gate(&s1, &w, algo)?.out)
            }),
        });
        let dout = r(&[1, c, hw, hw], 7)?;
        v.push(Case {
            op: "plam_bwd",
            shape: format!("b1 C{c} {hw}x{hw}"),
            flops: 3.0 * flops,
            bytes: 3.0 * bytes,
            peer: None,
            validate: None,
            run: Box::new(move || {
                let w = PlamRef(&ws).get();
                let f = plam::plam_gate(&s, &w, algo)?;
                Ok(plam::plam_gate_backward(&s, &w, f, &dout, algo)?.ds)
            }),
        });
    }
    Ok(())
}

/// The six gate tensors as `PlamWeights`.
struct PlamRef<'a>(&'a [Tensor; 6]);

impl<'a> PlamRef<'a> {
    fn get(&self) -> plam::PlamWeights<'a> {
        let w = self.0;
        plam::PlamWeights { w_avg: &w[0], w_max: &w[1], fc1_w: &w[2], fc1_b: &w[3], fc2_w: &w[4], fc2_b: &w[5] }
    }
}

/// 1 where x > 0, else 0 (a synthetic mask).
fn unary_step(x: &Tensor) -> Result<Tensor> {
    let host: Vec<f32> = x.to_vec()?.iter().map(|&v| if v > 0.0 { 1.0 } else { 0.0 }).collect();
    Tensor::from_vec(host, x.shape(), x.device())
}

/// Compares 64 sampled elements of an s x s x s product with f64 dot products.
/// 64 sampled elements of C [m,n] = A [m,k] · B [k,n] against f64 dot products.
fn check_gemm_mnk(a: &[f32], b: &[f32], c: &[f32], (m, n, kk): (usize, usize, usize), tol: f64) -> Result<()> {
    let mut r = crate::rng::Rng::new(99);
    for _ in 0..64 {
        let (i, j) = ((r.next_u64() % m as u64) as usize, (r.next_u64() % n as u64) as usize);
        let (mut acc, mut mag) = (0.0f64, 0.0f64);
        for k in 0..kk {
            acc += a[i * kk + k] as f64 * b[k * n + j] as f64;
            mag += (a[i * kk + k] as f64 * b[k * n + j] as f64).abs();
        }
        let got = c[i * n + j] as f64;
        if (got - acc).abs() > tol * mag {
            return Err(Error::Other(format!("gemm {m}x{n}x{kk} is wrong at ({i},{j}): {got} vs {acc}")));
        }
    }
    Ok(())
}

/// C [m,n] = A [m,k] · B [k,n] with `algo`, validated on sampled elements against f64.
fn gemm_case(dev: &Device, name: &'static str, algo: GemmAlgo, (m, n, k): (usize, usize, usize)) -> Result<Case> {
    let (a, b) = (rand_tensor(&[m, k], 1, dev)?, rand_tensor(&[k, n], 2, dev)?);
    let (ha, hb) = (a.to_vec()?, b.to_vec()?);
    // tf32 rounds operands to 11 significant bits; exact f32 accumulates k roundings.
    let tol = if algo == GemmAlgo::TensorCore { 2.0 / 2048.0 } else { k as f64 * f32::EPSILON as f64 };
    Ok(Case {
        op: name,
        shape: format!("{m}x{n}x{k}"),
        flops: 2.0 * (m * n * k) as f64,
        bytes: 4.0 * (m * k + k * n + m * n) as f64,
        peer: Some(format!("mm {m} {n} {k}")),
        run: Box::new(move || gemm::matmul(&a, &b, GemmOpts { algo, ..Default::default() })),
        validate: Some(Box::new(move |c| check_gemm_mnk(&ha, &hb, &c.to_vec()?, (m, n, k), tol))),
    })
}

/// A square-map convolution with bias ("conv3x3" or "conv1x1"); `seed` varies the data.
fn conv_case(dev: &Device, op: &'static str, (b, ci, co, hw): (usize, usize, usize, usize), seed: u64) -> Result<Case> {
    let k = if op == "conv1x1" { 1 } else { 3 };
    let x = rand_tensor(&[b, ci, hw, hw], 20 + seed, dev)?;
    let w = rand_tensor(&[co, ci, k, k], 40 + seed, dev)?;
    let bias = rand_tensor(&[co], 60 + seed, dev)?;
    let s = conv::ConvShape { b, ci, co, h: hw, w: hw, kh: k, kw: k };
    let algo = if dev.is_gpu_like() { GemmAlgo::TensorCore } else { GemmAlgo::Auto };
    Ok(Case {
        op,
        shape: format!("b{b} {ci}->{co} {hw}x{hw} k{k}"),
        flops: s.flops(),
        bytes: 4.0 * (b * (ci + co) * hw * hw + co * ci * k * k) as f64,
        peer: Some(format!("conv {b} {ci} {co} {hw} {k}")),
        validate: None,
        run: Box::new(move || conv::conv2d(&x, &w, Some(&bias), algo)),
    })
}

/// Softmax over the rows of x [rows, cols].
fn softmax_case(x: Tensor) -> Case {
    let (rows, cols) = (x.shape()[0], x.shape()[1]);
    Case {
        op: "softmax",
        shape: format!("{rows}x{cols}"),
        flops: 5.0 * (rows * cols) as f64,
        bytes: 8.0 * (rows * cols) as f64,
        peer: Some(format!("softmax {rows} {cols}")),
        run: Box::new(move || softmax::softmax(&x)),
        validate: None,
    }
}

/// ReLU over x of any shape.
fn relu_case(x: Tensor) -> Case {
    let dims: Vec<String> = x.shape().iter().map(|d| d.to_string()).collect();
    let n = x.numel() as f64;
    Case {
        op: "relu",
        shape: dims.join("x"),
        flops: n,
        bytes: 8.0 * n,
        peer: Some(format!("relu {}", dims.join(" "))),
        run: Box::new(move || elementwise::unary(&x, UnaryOp::Relu)),
        validate: None,
    }
}

/// The ops `--shape` takes, and the form of their shape.
pub const SHAPED: &str = "gemm MxNxK, conv3x3 / conv1x1 BxCIxCOxHW (square maps), softmax ROWSxCOLS, relu DxDx...";

/// One case of `op` at a shape from the command line (`--shape`): "512x768x1024" and so on.
pub fn shape_case(dev: &Device, op: &str, shape: &str) -> Result<Case> {
    let bad = |why: &str| Error::Config(format!("--shape {shape:?} for {op}: {why} (shapes: {SHAPED})"));
    let dims: Vec<usize> = shape
        .split('x')
        .map(|d| d.trim().parse::<usize>().ok().filter(|&d| d > 0))
        .collect::<Option<_>>()
        .ok_or_else(|| bad("dimensions are positive integers joined by x"))?;
    // the largest operand a shaped case may allocate: 1 Gi floats (4 GB)
    let fits = |n: Option<usize>| n.filter(|&n| n <= 1 << 30).ok_or_else(|| bad("too large (over 2^30 elements)"));
    match (op, dims.as_slice()) {
        ("gemm", &[m, n, k]) => {
            fits(m.checked_mul(k))?;
            fits(k.checked_mul(n))?;
            fits(m.checked_mul(n))?;
            gemm_case(dev, "gemm", GemmAlgo::Auto, (m, n, k))
        }
        (op @ ("conv3x3" | "conv1x1"), &[b, ci, co, hw]) => {
            fits(b.checked_mul(ci.max(co)).and_then(|x| x.checked_mul(hw)).and_then(|x| x.checked_mul(hw)))?;
            conv_case(dev, if op == "conv1x1" { "conv1x1" } else { "conv3x3" }, (b, ci, co, hw), 0)
        }
        ("softmax", &[rows, cols]) => {
            fits(rows.checked_mul(cols))?;
            Ok(softmax_case(rand_tensor(&[rows, cols], 3, dev)?))
        }
        ("relu", d) => {
            fits(crate::tensor::checked_numel(d))?;
            Ok(relu_case(rand_tensor(d, 5, dev)?))
        }
        ("gemm" | "conv3x3" | "conv1x1" | "softmax", _) => Err(bad("wrong number of dimensions")),
        _ => Err(bad("this op takes no --shape yet")),
    }
}

/// Times one case: `warmup` untimed runs, then `reps` timed ones.
pub fn measure(dev: &Device, case: &Case, warmup: usize, reps: usize) -> Result<Timing> {
    let first = case.run.as_ref()()?;
    if let Some(v) = &case.validate {
        v(&first)?;
    }
    for _ in 0..warmup {
        case.run.as_ref()()?;
    }
    dev.synchronize()?;
    #[cfg(feature = "cuda")]
    if let Device::Cuda(d) = dev {
        use cudarc::driver::sys::CUevent_flags;
        let flush =
            d.context().default_stream().alloc_zeros::<u8>(256 << 20).map_err(|e| Error::Cuda(e.to_string()))?;
        let mut times = Vec::with_capacity(reps);
        for _ in 0..reps {
            d.fill(&flush, 0)?;
            let ev = |_| {
                d.stream().record_event(Some(CUevent_flags::CU_EVENT_DEFAULT)).map_err(|e| Error::Cuda(e.to_string()))
            };
            let start = ev(())?;
            let out = case.run.as_ref()()?;
            let end = ev(())?;
            end.synchronize().map_err(|e| Error::Cuda(e.to_string()))?;
            times.push(start.elapsed_ms(&end).map_err(|e| Error::Cuda(e.to_string()))? as f64 / 1e3);
            drop(out);
        }
        return Ok(Timing::of(times));
    }
    let mut times = Vec::with_capacity(reps);
    for _ in 0..reps {
        let t0 = Instant::now();
        let out = case.run.as_ref()()?;
        dev.synchronize()?;
        times.push(t0.elapsed().as_secs_f64());
        drop(out);
    }
    Ok(Timing::of(times))
}

/// Runs the peer script once for all cases that have a PyTorch form; returns median seconds by
/// peer spec.
fn run_peer(python: &str, specs: &[String], device: &str, reps: usize) -> Result<Vec<(String, f64)>> {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/benches/peer_torch.py");
    let out = std::process::Command::new(python)
        .arg(script)
        .arg("--device")
        .arg(device)
        .arg("--reps")
        .arg(reps.to_string())
        .args(specs)
        .output()
        .map_err(|e| Error::Other(format!("cannot run peer {python}: {e}")))?;
    if !out.status.success() {
        return Err(Error::Other(format!("peer script failed: {}", String::from_utf8_lossy(&out.stderr))));
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let mut res = Vec::new();
    for line in text.lines() {
        // "<spec>\t<median seconds>"
        if let Some((spec, t)) = line.rsplit_once('\t') {
            if let Ok(t) = t.trim().parse::<f64>() {
                res.push((spec.to_string(), t));
            }
        }
    }
    Ok(res)
}

pub struct BenchOpts<'a> {
    pub filter: Option<&'a str>,
    /// One shape for the one op in `filter` (`shape_case`) instead of its built-in cases.
    pub shape: Option<&'a str>,
    pub peer: Option<&'a str>,
    pub reps: usize,
    /// The machine's ceilings (`ceilings::measure`), for each case's share of its roofline.
    pub ceilings: Option<ceilings::Ceilings>,
}

pub fn run(dev: &Device, opts: &BenchOpts) -> Result<Vec<Measurement>> {
    let all = match opts.shape {
        Some(shape) => match opts.filter {
            Some(op) if !op.contains(',') => vec![shape_case(dev, op, shape)?],
            _ => return Err(Error::Config(format!("--shape needs exactly one --op ({SHAPED})"))),
        },
        None => cases(dev, opts.filter)?,
    };
    let chosen: Vec<&Case> =
        all.iter().filter(|c| opts.filter.is_none_or(|f| f.split(',').any(|f| c.op == f))).collect();
    if chosen.is_empty() {
        let names: Vec<&str> = GROUPS.iter().flat_map(|(ops, _)| ops.iter().copied()).collect();
        return Err(Error::Other(format!(
            "no benchmark named {:?}; known: {}",
            opts.filter.unwrap_or(""),
            names.join(", ")
        )));
    }
    let mut out = Vec::new();
    for c in &chosen {
        let (warm, reps) = if matches!(dev, Device::Emu) { (1, 3) } else { (2, opts.reps) };
        let t = measure(dev, c, warm, reps)?;
        out.push(Measurement {
            op: c.op.to_string(),
            shape: c.shape.clone(),
            reps: t.reps,
            min_s: t.min,
            median_s: t.median,
            p90_s: t.p90,
            gflops: c.flops / t.median / 1e9,
            gbs: c.bytes / t.median / 1e9,
            peer_median_s: None,
            roofline_pct: opts.ceilings.as_ref().and_then(|cl| ceilings::roofline_pct(cl, c.flops, c.bytes, t.median)),
            h100_min_s: h100::min_seconds(c.op, c.flops, c.bytes),
        });
    }
    if let Some(py) = opts.peer {
        let specs: Vec<String> = chosen.iter().filter_map(|c| c.peer.clone()).collect();
        let device = if matches!(dev, Device::Cuda(_)) { "cuda" } else { "cpu" };
        let peer = run_peer(py, &specs, device, opts.reps)?;
        for (m, c) in out.iter_mut().zip(&chosen) {
            if let Some(spec) = &c.peer {
                m.peer_median_s = peer.iter().find(|(s, _)| s == spec).map(|(_, t)| *t);
            }
        }
    }
    Ok(out)
}

pub fn format_table(dev: &Device, ms: &[Measurement]) -> String {
    use std::fmt::Write;
    let mut s = String::new();
    let _ = writeln!(s, "device: {}", dev.describe());
    let _ = writeln!(
        s,
        "{:<20} {:<34} {:>12} {:>12} {:>12} {:>10} {:>9} {:>7} {:>12} {:>12} {:>8}",
        "op", "shape", "min", "median", "p90", "GFLOP/s", "GB/s", "% roof", "H100 min", "peer median", "ratio"
    );
    for m in ms {
        let (pt, ratio) = match m.peer_median_s {
            Some(p) => (format!("{:.3} ms", p * 1e3), format!("{:.2}x", p / m.median_s)),
            None => ("-".into(), "-".into()),
        };
        let _ = writeln!(
            s,
            "{:<20} {:<34} {:>9.3} ms {:>9.3} ms {:>9.3} ms {:>10.1} {:>9.1} {:>7} {:>12} {:>12} {:>8}",
            m.op,
            m.shape,
            m.min_s * 1e3,
            m.median_s * 1e3,
            m.p90_s * 1e3,
            m.gflops,
            m.gbs,
            m.roofline_pct.map_or("-".into(), |p| format!("{p:.0}")),
            m.h100_min_s.map_or("-".into(), |t| format!("{:.2} us", t * 1e6)),
            pt,
            ratio
        );
    }
    s
}
