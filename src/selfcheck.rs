//! `reclmis selfcheck`: every op family on the chosen device against its f64 reference, on
//! seeded data with odd sizes. A quick way to see that a device computes what the cpu does.

use crate::device::Device;
use crate::error::Result;
use crate::ops::elementwise::{self, BinaryOp, UnaryOp};
use crate::ops::gemm::{self, GemmAlgo, GemmOpts};
use crate::ops::{reduce, softmax, transpose};
use crate::tensor::Tensor;
use crate::testing::{f64s, mismatch, mismatch_scaled, Rng, EPS32, EPS_TF32};

pub struct Report {
    pub ok: bool,
    pub text: String,
}

pub fn run(dev: &Device) -> Result<Report> {
    let mut rng = Rng::new(2026);
    let mut lines = vec![format!("selfcheck on {}", dev.describe())];
    let mut ok = true;
    let mut record = |name: &str, m: Option<String>| {
        ok &= m.is_none();
        lines.push(match m {
            None => format!("  ok    {name}"),
            Some(e) => format!("  FAIL  {name}: {e}"),
        });
    };

    let x = rng.vec(37 * 53, -4.0, 4.0);
    let xt = Tensor::from_vec(x.clone(), &[37, 53], dev)?;
    for op in [UnaryOp::Relu, UnaryOp::Sigmoid, UnaryOp::Exp, UnaryOp::Scale(-1.5), UnaryOp::AddScalar(0.25)] {
        let y = elementwise::unary(&xt, op)?.to_vec()?;
        record(
            &format!("unary {op:?}"),
            mismatch(&y, &elementwise::reference::unary(&f64s(&x), op), 1e-6, 4.0 * EPS32),
        );
    }
    let b = rng.vec(53, -2.0, 2.0);
    let bt = Tensor::from_vec(b.clone(), &[1, 53], dev)?;
    for op in [BinaryOp::Add, BinaryOp::Sub, BinaryOp::Mul] {
        let y = elementwise::binary(&xt, &bt, op)?.to_vec()?;
        let want = elementwise::reference::binary(&f64s(&x), &[37, 53], &f64s(&b), &[1, 53], op);
        record(&format!("binary {op:?} (broadcast)"), mismatch(&y, &want, 1e-6, 2.0 * EPS32));
    }
    for (axis, (outer, n, inner)) in [(1isize, (37, 53, 1)), (0, (1, 37, 53))] {
        for op in [reduce::ReduceOp::Sum, reduce::ReduceOp::Max] {
            let (y, _) = reduce::reduce(&xt, axis, op)?;
            let (want, _) = reduce::reference::reduce(&f64s(&x), outer, n, inner, op);
            // a sum of n values of magnitude <= 4 has rounding error below n·eps·4
            record(
                &format!("reduce {op:?} axis {axis}"),
                mismatch(&y.to_vec()?, &want, 4.0 * n as f64 * EPS32 * 4.0, 0.0),
            );
        }
    }
    let s = softmax::softmax(&xt)?.to_vec()?;
    record("softmax", mismatch(&s, &softmax::reference::forward(&f64s(&x), 53, false), 1e-7, 64.0 * EPS32));
    let t = transpose::transpose(&xt, 0, 1)?.to_vec()?;
    record("transpose", mismatch(&t, &transpose::reference::permute(&f64s(&x), &[37, 53], &[1, 0]), 0.0, 0.0));

    let (m, k, n) = (67, 45, 71);
    let a = rng.vec(m * k, -1.0, 1.0);
    let bb = rng.vec(k * n, -1.0, 1.0);
    let (at, bt2) = (Tensor::from_vec(a.clone(), &[m, k], dev)?, Tensor::from_vec(bb.clone(), &[k, n], dev)?);
    let (plan, _) = gemm::plan(&[m, k], &[k, n], false, false)?;
    let (want, mag) = gemm::reference::gemm(&f64s(&a), &f64s(&bb), &plan, 1.0);
    let algos: &[(GemmAlgo, f64)] = if dev.is_gpu_like() {
        &[(GemmAlgo::Tiled, k as f64 * EPS32), (GemmAlgo::TensorCore, 2.0 * EPS_TF32 + k as f64 * EPS32)]
    } else {
        &[(GemmAlgo::Auto, k as f64 * EPS32)]
    };
    for &(algo, tol) in algos {
        let c = gemm::matmul(&at, &bt2, GemmOpts { algo, ..Default::default() })?.to_vec()?;
        record(&format!("gemm {algo:?} {m}x{k}x{n}"), mismatch_scaled(&c, &want, &mag, tol, 0.0));
    }
    lines.push(if ok { "all ok".into() } else { "FAILED".into() });
    Ok(Report { ok, text: lines.join("\n") + "\n" })
}
