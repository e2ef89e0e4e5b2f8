//! PLAM gate benchmark cases: the gate of the first and last decoder stages, and its backward.

use crate::bench::{gemm_algo, host, rand_tensor, Case, Group};
use crate::device::Device;
use crate::error::Result;
use crate::ops::plam::{self, reference};
use crate::tensor::Tensor;

pub const GROUP: Group =
    Group { names: &["plam", "plam_infer", "plam_bwd", "plam_bf16", "plam_bwd_bf16"], cases, shaped: &[], check: None };

/// The PLAM gate of the four decoder stages (512 channels at 28² … 64 at 224²), batch 1: with
/// its backward's state (`plam`), alone (`plam_infer`: inference), and its backward; at bf16
/// autocast (`plam_bf16`, `plam_bwd_bf16`: bf16 s and 1×1 weights, the forward then the
/// backward, as the peer's autocast forward and backward).
fn cases(dev: &Device, small: bool, v: &mut Vec<Case>) -> Result<()> {
    let shapes: &[(usize, usize)] = if small { &[(8, 8)] } else { &[(512, 28), (256, 56), (128, 112), (64, 224)] };
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
        let algo = gemm_algo(dev);
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
        let (s2, w2) = (s.clone(), ws.clone());
        // on the cpu (exact f32 products) against the f64 forward, bound as tests/plam.rs's
        // (a chain of C-term dot products and the 6-wide MLP); cuda/emu time tf32 products,
        // whose operand rounding the gate's MLP amplifies past a useful bound: tests/plam.rs
        // checks those kernels exactly
        let validate: Option<crate::bench::Validator> = if dev.is_gpu_like() {
            None
        } else {
            let (hs, hw_) = (host(&s)?, ws.iter().map(host).collect::<Result<Vec<_>>>()?);
            let n = hw * hw;
            Some(Box::new(move |y| {
                let want = reference::plam(&hs, &hw_[0], &hw_[1], &hw_[2], &hw_[3], &hw_[4], hw_[5][0], 1, c, n);
                let scale = want.iter().fold(1e-6f64, |m, v| m.max(v.abs()));
                let tol = 64.0 * (c as f64 + 16.0) * crate::testing::EPS32 * scale;
                match crate::testing::mismatch(&y.to_vec()?, &want, tol, 0.0) {
                    None => Ok(()),
                    Some(e) => Err(crate::error::Error::Other(format!("plam_infer: {e}"))),
                }
            }))
        };
        v.push(Case {
            op: "plam_infer",
            shape: format!("b1 C{c} {hw}x{hw}"),
            flops,
            // s read once, the output written (the products stay in cache)
            bytes: 2.0 * 4.0 * (c * hw * hw) as f64,
            peer: Some(format!("plam 1 {c} {hw}")),
            validate,
            run: Box::new(move || plam::plam_gate_infer(&s2, &PlamRef(&w2).get(), algo)),
        });
        let dout = r(&[1, c, hw, hw], 7)?;
        #[cfg(feature = "autocast")]
        {
            use crate::ops::cast::cast;
            use crate::tensor::DType::BF16;
            let (sb, db) = (cast(&s, BF16)?, cast(&dout, BF16)?);
            let wb = std::rc::Rc::new([
                cast(&ws[0], BF16)?,
                cast(&ws[1], BF16)?,
                ws[2].clone(),
                ws[3].clone(),
                ws[4].clone(),
                ws[5].clone(),
            ]);
            let (s3, w3) = (sb.clone(), wb.clone());
            v.push(Case {
                op: "plam_bf16",
                shape: format!("b1 C{c} {hw}x{hw}"),
                flops,
                bytes: bytes / 2.0,
                peer: Some(format!("plam_bf16 1 {c} {hw}")),
                validate: None,
                run: Box::new(move || Ok(plam::bf16::plam_gate_bf16(&s3, &PlamRef(&w3).get())?.out)),
            });
            v.push(Case {
                op: "plam_bwd_bf16",
                shape: format!("b1 C{c} {hw}x{hw}"),
                flops: 3.0 * flops,
                bytes: 3.0 * bytes / 2.0,
                peer: Some(format!("plam_fb_bf16 1 {c} {hw}")),
                validate: None,
                run: Box::new(move || {
                    let w = PlamRef(&wb).get();
                    let f = plam::bf16::plam_gate_bf16(&sb, &w)?;
                    Ok(plam::bf16::plam_gate_backward_bf16(&sb, &w, f, &db)?.ds)
                }),
            });
        }
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
