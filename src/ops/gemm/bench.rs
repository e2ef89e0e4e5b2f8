//! GEMM benchmark cases (square products at each precision, the reconstruction transformers'
//! projection as a Linear), `--shape MxNxK`, and the GEMM self-check.

use crate::bench::{cap, dims, rand_tensor, Case, Group, Shaped};
use crate::device::Device;
use crate::error::{Error, Result};
use crate::ops::gemm::{self, GemmAlgo, GemmOpts};
use crate::selfcheck::{gemm_algos, Checks};
use crate::tensor::{DType, Tensor};
use crate::testing::{f64s, mismatch_scaled, EPS32};

pub const GROUP: Group = Group {
    names: &[
        "gemm",
        "gemm_tc",
        "gemm_tc_elem",
        "gemm_bf16",
        "linear",
        "linear_relu",
        "linear_relu_unfused",
        "linear_relu_bf16",
        "linear_relu_unfused_bf16",
    ],
    cases,
    shaped: &[
        Shaped { op: "gemm", form: "MxNxK", make: shaped },
        Shaped { op: "linear", form: "ROWSxINxOUT", make: shaped_linear },
    ],
    check: Some(check),
};

/// Square GEMMs (exact f32 and, on cuda/emu, tf32 on the tensor cores: `gemm_tc` as the
/// product runs it, the pipelined kernel in builds with autocast; `gemm_tc_elem` the
/// element-loading kernel, for the pipeline's gain in the same run).
fn cases(dev: &Device, small: bool, v: &mut Vec<Case>) -> Result<()> {
    let gemm_sizes: &[usize] = if small {
        &[64, 128]
    } else if dev.is_gpu_like() {
        &[1024, 2048, 4096]
    } else {
        &[256, 1024, 2048]
    };
    for &s in gemm_sizes {
        let algos: &[(&str, GemmAlgo)] = if dev.is_gpu_like() {
            &[("gemm", GemmAlgo::Tiled), ("gemm_tc", GemmAlgo::TensorCore), ("gemm_tc_elem", GemmAlgo::TensorCore)]
        } else {
            &[("gemm", GemmAlgo::Auto)]
        };
        for &(name, algo) in algos {
            v.push(gemm_case(dev, name, algo, (s, s, s))?);
        }
        v.push(gemm_bf16_case(dev, (s, s, s))?);
    }
    v.push(linear_case(dev, small)?);
    v.extend(linear_relu_cases(dev, small)?);
    // the text tower's MLP input product at the official width (few rows: on the cpu the
    // register-tiled dot products, not the packing GEMM)
    let (rows, i, o) = if small { (5, 40, 70) } else { (18, 512, 2048) };
    v.push(linear_rows_case(dev, rows, i, o)?);
    Ok(())
}

/// y [rows, out] = x [rows, in] · wᵀ + bias, w [out, in], validated on 64 sampled outputs
/// against f64 dot products (bound: `in` roundings of the terms' magnitudes).
fn linear_rows_case(dev: &Device, rows: usize, i: usize, o: usize) -> Result<Case> {
    let x = rand_tensor(&[rows, i], 31, dev)?;
    let w = rand_tensor(&[o, i], 36, dev)?;
    let bias = rand_tensor(&[o], 37, dev)?;
    let (hx, hw, hb) = (x.to_vec()?, w.to_vec()?, bias.to_vec()?);
    Ok(Case {
        op: "linear",
        shape: format!("{rows}x{i} -> {o} +bias"),
        flops: 2.0 * (rows * i * o) as f64,
        bytes: 4.0 * (rows * i + i * o + rows * o + o) as f64,
        peer: Some(format!("linear {rows} {i} {o}")),
        validate: Some(Box::new(move |y| {
            // w [o, i] is B [i, o] read transposed: check_gemm_mnk wants B [k, n]
            let wt: Vec<f32> = (0..i * o).map(|e| hw[(e % o) * i + e / o]).collect();
            let y: Vec<f32> = y.to_vec()?.iter().enumerate().map(|(e, v)| v - hb[e % o]).collect();
            check_gemm_mnk(&hx, &wt, &y, (rows, o, i), (i + 2) as f64 * f32::EPSILON as f64)
        })),
        run: Box::new(move || gemm::linear::linear(&x, &w, Some(&bias), GemmAlgo::Auto)),
    })
}

/// `--shape ROWSxINxOUT`: a Linear with bias on `rows` input rows.
fn shaped_linear(dev: &Device, d: &[usize]) -> Result<Case> {
    let [rows, i, o] = dims(d)?;
    cap(rows.checked_mul(i))?;
    cap(i.checked_mul(o))?;
    cap(rows.checked_mul(o))?;
    linear_rows_case(dev, rows, i, o)
}

/// C = A · B in bf16 (f32 accumulation), validated on sampled elements against the f64 product
/// of the bf16 operands: one bf16 rounding of C (2^-8) plus the f32 sum's k roundings.
fn gemm_bf16_case(dev: &Device, (m, n, k): (usize, usize, usize)) -> Result<Case> {
    let a = crate::ops::cast::cast(&rand_tensor(&[m, k], 1, dev)?, DType::BF16)?;
    let b = crate::ops::cast::cast(&rand_tensor(&[k, n], 2, dev)?, DType::BF16)?;
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
        run: Box::new(move || {
            let opts = GemmOpts { algo, ..Default::default() };
            if name == "gemm_tc_elem" {
                crate::ops::tune::with_candidate("tf32_mma", || gemm::matmul(&a, &b, opts))
            } else {
                gemm::matmul(&a, &b, opts)
            }
        }),
        validate: Some(Box::new(move |c| check_gemm_mnk(&ha, &hb, &c.to_vec()?, (m, n, k), tol))),
    })
}

/// The reconstruction transformers' 512->512 projection with its bias over 32 images x 196
/// tokens.
fn linear_case(dev: &Device, small: bool) -> Result<Case> {
    let (rows, c) = if small { (64, 64) } else { (32 * 196, 512) };
    let n = (rows * c) as f64;
    let x = rand_tensor(&[rows, c], 31, dev)?;
    let w = rand_tensor(&[c, c], 36, dev)?;
    let bias = rand_tensor(&[c], 37, dev)?;
    Ok(Case {
        op: "linear",
        shape: format!("{rows}x{c} -> {c} +bias"),
        flops: 2.0 * n * c as f64,
        bytes: 4.0 * (2.0 * n + (c * c) as f64),
        peer: Some(format!("linear {rows} {c} {c}")),
        validate: None,
        run: Box::new(move || gemm::linear::linear(&x, &w, Some(&bias), GemmAlgo::TensorCore)),
    })
}

/// The reconstruction transformers' feed-forward input layer, Linear 512 -> 1024 then ReLU over
/// 32 images x 196 tokens, as the model runs it (`linear_relu`: the ReLU in the GEMM's epilogue)
/// and unfused (`linear_relu_unfused`: the Linear, then the elementwise ReLU: one more pass and
/// tensor), exact f32 and with bf16 operands (`_bf16`: autocast's, the default on cuda). Each
/// fused case is validated against the unfused result, bit for bit.
fn linear_relu_cases(dev: &Device, small: bool) -> Result<Vec<Case>> {
    let (rows, i, o) = if small { (64, 64, 128) } else { (32 * 196, 512, 1024) };
    let mut v = Vec::new();
    // the bf16 Linear exists in builds with autocast
    let kinds: &[bool] = if cfg!(feature = "autocast") { &[false, true] } else { &[false] };
    for &bf16 in kinds {
        let t = |shape: &[usize], seed| {
            let t = rand_tensor(shape, seed, dev)?;
            if bf16 {
                crate::ops::cast::cast(&t, DType::BF16)
            } else {
                Ok(t)
            }
        };
        let (x, w, bias) = (t(&[rows, i], 41)?, t(&[o, i], 42)?, t(&[o], 43)?);
        let linear = move |act| -> Result<Tensor> {
            #[cfg(feature = "autocast")]
            if bf16 {
                return gemm::linear::linear_bf16_act(&x, &w, Some(&bias), act);
            }
            gemm::linear::linear_act(&x, &w, Some(&bias), act, GemmAlgo::Auto)
        };
        let linear = std::rc::Rc::new(linear);
        let unfused = {
            let linear = linear.clone();
            move || {
                // the elementwise ReLU reads f32: a bf16 Linear's output widened and rounded
                // back (both exact), as the graph's unfused ReLU of a bf16 value runs it
                use crate::ops::{cast::cast, elementwise::relu};
                let y = linear(gemm::Act::None)?;
                if bf16 {
                    cast(&relu(&cast(&y, DType::F32)?)?, DType::BF16)
                } else {
                    relu(&y)
                }
            }
        };
        let want = unfused()?.to_vec()?;
        let check: crate::bench::Validator = Box::new(move |y| {
            let got = y.to_vec()?;
            match got.iter().zip(&want).position(|(g, w)| g.to_bits() != w.to_bits()) {
                None => Ok(()),
                Some(e) => {
                    Err(Error::Other(format!("linear_relu: element {e} fused {} vs unfused {}", got[e], want[e])))
                }
            }
        });
        let elem = if bf16 { 2.0 } else { 4.0 };
        // the fused case's name is also the peer's spec
        let (f, u) = if bf16 {
            ("linear_relu_bf16", "linear_relu_unfused_bf16")
        } else {
            ("linear_relu", "linear_relu_unfused")
        };
        let sfx = if bf16 { "_bf16" } else { "" };
        let case = |op: &'static str, run: Box<dyn Fn() -> Result<Tensor>>, validate| Case {
            op,
            shape: format!("{rows}x{i} -> {o} +bias, relu{sfx}"),
            flops: 2.0 * (rows * i * o) as f64,
            bytes: elem * (rows * i + i * o + rows * o + o) as f64,
            peer: Some(format!("{f} {rows} {i} {o}")),
            validate,
            run,
        };
        v.push(case(f, Box::new(move || linear(gemm::Act::Relu)), Some(check)));
        v.push(case(u, Box::new(unfused), None));
    }
    Ok(v)
}

/// `--shape MxNxK`: C [M,N] = A [M,K] · B [K,N] with the device's default algorithm.
fn shaped(dev: &Device, d: &[usize]) -> Result<Case> {
    let [m, n, k] = dims(d)?;
    cap(m.checked_mul(k))?;
    cap(k.checked_mul(n))?;
    cap(m.checked_mul(n))?;
    gemm_case(dev, "gemm", GemmAlgo::Auto, (m, n, k))
}

/// Every algorithm of the device on odd sizes against the f64 product, and bf16 (the pipelined
/// kernel on cuda/emu: sizes multiples of 8) against the f64 product of the bf16-rounded
/// operands.
fn check(dev: &Device, c: &mut Checks) -> Result<()> {
    let (m, k, n) = (67, 45, 71);
    let a = c.rng.vec(m * k, -1.0, 1.0);
    let bb = c.rng.vec(k * n, -1.0, 1.0);
    let (at, bt) = (Tensor::from_vec(a.clone(), &[m, k], dev)?, Tensor::from_vec(bb.clone(), &[k, n], dev)?);
    let (plan, _) = gemm::plan(&[m, k], &[k, n], false, false)?;
    let (want, mag) = gemm::reference::gemm(&f64s(&a), &f64s(&bb), &plan, 1.0);
    for (algo, tol) in gemm_algos(dev, k) {
        let y = gemm::matmul(&at, &bt, GemmOpts { algo, ..Default::default() })?.to_vec()?;
        c.record(&format!("gemm {algo:?} {m}x{k}x{n}"), mismatch_scaled(&y, &want, &mag, tol, 0.0));
    }
    // one bf16 rounding of C (2^-8 of |C| <= the magnitude) plus the f32 sum's k roundings
    let (m, k, n) = (136, 40, 72);
    if dev.is_gpu_like() {
        // tf32 on sizes multiples of 4 (the pipelined kernel in builds with autocast): the tf32
        // bound of every tensor-core product
        let (a, bb) = (c.rng.vec(m * k, -1.0, 1.0), c.rng.vec(k * n, -1.0, 1.0));
        let (plan, _) = gemm::plan(&[m, k], &[k, n], false, false)?;
        let (want, mag) = gemm::reference::gemm(&f64s(&a), &f64s(&bb), &plan, 1.0);
        let (at, bt) = (Tensor::from_vec(a, &[m, k], dev)?, Tensor::from_vec(bb, &[k, n], dev)?);
        let y = gemm::matmul(&at, &bt, GemmOpts { algo: GemmAlgo::TensorCore, ..Default::default() })?.to_vec()?;
        let tol = 2.0 * crate::testing::EPS_TF32 + (k + 2) as f64 * EPS32;
        c.record(&format!("gemm tf32 {m}x{k}x{n} (chunked)"), mismatch_scaled(&y, &want, &mag, tol, 0.0));
    }
    let bf = |v: &[f32]| -> Vec<f32> { v.iter().map(|&x| half::bf16::from_f32(x).to_f32()).collect() };
    let (a, bb) = (bf(&c.rng.vec(m * k, -1.0, 1.0)), bf(&c.rng.vec(k * n, -1.0, 1.0)));
    let to_bf16 =
        |v: &[f32], shape: &[usize]| crate::ops::cast::cast(&Tensor::from_vec(v.to_vec(), shape, dev)?, DType::BF16);
    let (plan, _) = gemm::plan(&[m, k], &[k, n], false, false)?;
    let (want, mag) = gemm::reference::gemm(&f64s(&a), &f64s(&bb), &plan, 1.0);
    let y = gemm::matmul(&to_bf16(&a, &[m, k])?, &to_bf16(&bb, &[k, n])?, GemmOpts::default())?.to_vec()?;
    c.record(&format!("gemm bf16 {m}x{k}x{n}"), mismatch_scaled(&y, &want, &mag, 1.0 / 256.0 + k as f64 * EPS32, 0.0));
    Ok(())
}
