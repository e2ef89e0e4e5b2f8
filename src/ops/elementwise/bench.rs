//! Elementwise benchmark cases (ReLU and its backward, broadcast add, GELU, QuickGELU),
//! `--shape DxDx...` for ReLU, and the unary and broadcast binary self-checks.

use crate::bench::{cap, check_with, host, rand_tensor, Case, Group, Shaped};
use crate::device::Device;
use crate::error::Result;
use crate::ops::elementwise::{self, BinaryOp, UnaryOp};
use crate::selfcheck::Checks;
use crate::tensor::Tensor;
use crate::testing::{f64s, mismatch, EPS32};

pub const GROUP: Group = Group {
    names: &["relu", "relu_bwd", "add_bcast", "gelu", "quick_gelu"],
    cases,
    shaped: &[Shaped { op: "relu", form: "DxDx...", make: shaped }],
    check: Some(check),
};

/// ReLU, its backward and a broadcast add on a U-Net activation; the transformers' GELUs.
fn cases(dev: &Device, small: bool, v: &mut Vec<Case>) -> Result<()> {
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
        validate: {
            let (x, dy) = (a5.clone(), g5.clone());
            // dy where x > 0, else 0: exact
            check_with("relu_bwd", (0.0, 0.0), move || {
                Ok(elementwise::reference::unary_backward(UnaryOp::Relu, &host(&x)?, &host(&dy)?))
            })
        },
        run: Box::new(move || elementwise::unary_backward(UnaryOp::Relu, &a5, &y5, &g5)),
    });
    let a2 = act.clone();
    v.push(Case {
        op: "add_bcast",
        shape: format!("{bt}x{c}x{hw}x{hw}+1x{c}x1x1"),
        flops: n,
        bytes: 8.0 * n,
        peer: Some(format!("add_bcast {bt} {c} {hw} {hw}")),
        validate: {
            let (a, b) = (a2.clone(), bias.clone());
            // one correctly rounded f32 add: half an ulp of the sum
            check_with("add_bcast", (0.0, EPS32), move || {
                Ok(elementwise::reference::binary(&host(&a)?, a.shape(), &host(&b)?, b.shape(), BinaryOp::Add))
            })
        },
        run: Box::new(move || elementwise::add(&a2, &bias)),
    });
    // the reconstruction transformers' GELU over 32 images x 196 tokens x 512 channels, and the
    // CLIP tower's QuickGELU on its 2048-wide MLP over 32 x 18 tokens
    let (rows, c) = if small { (64, 64) } else { (32 * 196, 512) };
    let n = (rows * c) as f64;
    let xg = rand_tensor(&[rows, c], 31, dev)?;
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
    Ok(())
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
        validate: {
            let x = x.clone();
            check_with("relu", (0.0, 0.0), move || Ok(elementwise::reference::unary(&host(&x)?, UnaryOp::Relu)))
        },
        run: Box::new(move || elementwise::unary(&x, UnaryOp::Relu)),
    }
}

/// `--shape DxDx...`: ReLU over a tensor of any rank.
fn shaped(dev: &Device, d: &[usize]) -> Result<Case> {
    cap(crate::tensor::checked_numel(d))?;
    Ok(relu_case(rand_tensor(d, 5, dev)?))
}

fn check(dev: &Device, c: &mut Checks) -> Result<()> {
    let x = c.rng.vec(37 * 53, -4.0, 4.0);
    let xt = Tensor::from_vec(x.clone(), &[37, 53], dev)?;
    for op in [UnaryOp::Relu, UnaryOp::Sigmoid, UnaryOp::Exp, UnaryOp::Scale(-1.5), UnaryOp::AddScalar(0.25)] {
        let y = elementwise::unary(&xt, op)?.to_vec()?;
        c.record(
            &format!("unary {op:?}"),
            mismatch(&y, &elementwise::reference::unary(&f64s(&x), op), 1e-6, 4.0 * EPS32),
        );
    }
    let b = c.rng.vec(53, -2.0, 2.0);
    let bt = Tensor::from_vec(b.clone(), &[1, 53], dev)?;
    for op in [BinaryOp::Add, BinaryOp::Sub, BinaryOp::Mul] {
        let y = elementwise::binary(&xt, &bt, op)?.to_vec()?;
        let want = elementwise::reference::binary(&f64s(&x), &[37, 53], &f64s(&b), &[1, 53], op);
        c.record(&format!("binary {op:?} (broadcast)"), mismatch(&y, &want, 1e-6, 2.0 * EPS32));
    }
    Ok(())
}
