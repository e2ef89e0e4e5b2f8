//! The official U-Net (encoder + decoder with PLAM skip gates) composed from the engine's ops,
//! evaluation mode, for the whole-network benchmark figure (issue 3). Random weights scaled by
//! 1/√fan-in and unit running statistics keep the activations finite. The model proper, with its
//! parameters, the tape and the text branch, is issue 6's.

use super::rand_tensor;
use crate::device::Device;
use crate::error::Result;
use crate::ops::elementwise;
use crate::ops::gemm::GemmAlgo;
use crate::ops::norm::{self, BnOpts};
use crate::ops::{conv, plam, pool};
use crate::tensor::Tensor;

/// Conv 3×3 (bias) → BatchNorm (running statistics) → ReLU.
struct ConvBn {
    w: Tensor,
    b: Tensor,
    gamma: Tensor,
    beta: Tensor,
    rm: Tensor,
    rv: Tensor,
}

fn scaled(shape: &[usize], seed: u64, fan_in: usize, dev: &Device) -> Result<Tensor> {
    elementwise::scale(&rand_tensor(shape, seed, dev)?, (3.0 / fan_in as f32).sqrt())
}

impl ConvBn {
    fn new(ci: usize, co: usize, seed: u64, dev: &Device) -> Result<ConvBn> {
        let ones = Tensor::from_vec(vec![1.0; co], &[co], dev)?;
        Ok(ConvBn {
            w: scaled(&[co, ci, 3, 3], seed, ci * 9, dev)?,
            b: scaled(&[co], seed + 1, ci * 9, dev)?,
            gamma: ones.clone(),
            beta: Tensor::zeros(&[co], dev)?,
            rm: Tensor::zeros(&[co], dev)?,
            rv: ones,
        })
    }
    fn bn_relu(&self, y: &Tensor) -> Result<Tensor> {
        let o = BnOpts { relu: true, train: false, ..BnOpts::default() };
        Ok(norm::batch_norm(y, &self.gamma, &self.beta, &self.rm, &self.rv, o)?.y)
    }
    fn run(&self, x: &Tensor, algo: GemmAlgo) -> Result<Tensor> {
        self.bn_relu(&conv::conv2d(x, &self.w, Some(&self.b), algo)?)
    }
    /// Over the channel concatenation of `parts`, never built.
    fn run_cat(&self, parts: &[&Tensor], algo: GemmAlgo) -> Result<Tensor> {
        self.bn_relu(&conv::conv2d_cat(parts, &self.w, Some(&self.b), algo)?)
    }
}

pub struct UNet {
    inc: ConvBn,
    downs: Vec<(ConvBn, ConvBn)>,
    /// up4, up3, up2, up1: PLAM gate weights, then the two ConvBNs
    ups: Vec<([Tensor; 6], ConvBn, ConvBn)>,
    outc_w: Tensor,
    outc_b: Tensor,
    /// FLOPs of one image's forward (the convolutions)
    pub flops_per_image: f64,
}

impl UNet {
    /// The official widths for base width `c` (64: 64/128/256/512/512), 3 input channels.
    pub fn new(c: usize, dev: &Device) -> Result<UNet> {
        let widths = [c, 2 * c, 4 * c, 8 * c, 8 * c];
        let mut seed = 1000;
        let mut next = || {
            seed += 10;
            seed
        };
        let inc = ConvBn::new(3, c, next(), dev)?;
        let mut downs = Vec::new();
        for k in 1..5 {
            downs.push((
                ConvBn::new(widths[k - 1], widths[k], next(), dev)?,
                ConvBn::new(widths[k], widths[k], next(), dev)?,
            ));
        }
        let mut ups = Vec::new();
        // up_k: skip widths[k-1] ++ upsampled (widths[k] for k = 4, else the previous up's output)
        let mut below = widths[4];
        for k in (1..5).rev() {
            let skip = widths[k - 1];
            let out = if k == 1 { c } else { widths[k - 2] };
            let gate = [
                scaled(&[skip, skip, 1, 1], next(), skip, dev)?,
                scaled(&[skip, skip, 1, 1], next(), skip, dev)?,
                scaled(&[6, 3], next(), 3, dev)?,
                scaled(&[6], next(), 3, dev)?,
                scaled(&[1, 6], next(), 6, dev)?,
                scaled(&[1], next(), 6, dev)?,
            ];
            ups.push((gate, ConvBn::new(skip + below, out, next(), dev)?, ConvBn::new(out, out, next(), dev)?));
            below = out;
        }
        let outc_w = scaled(&[1, c, 1, 1], next(), c, dev)?;
        let outc_b = scaled(&[1], next(), c, dev)?;
        // FLOPs at 224²: 2·Co·Ci·k²·H·W per convolution
        let mut f = 0.0;
        let mut conv_f = |ci: usize, co: usize, k: usize, hw: usize| f += 2.0 * (co * ci * k * k * hw * hw) as f64;
        conv_f(3, c, 3, 224);
        for k in 1..5 {
            let hw = 224 >> k;
            conv_f(widths[k - 1], widths[k], 3, hw);
            conv_f(widths[k], widths[k], 3, hw);
        }
        let mut below = widths[4];
        for k in (1..5).rev() {
            let (skip, hw) = (widths[k - 1], 224 >> (k - 1));
            let out = if k == 1 { c } else { widths[k - 2] };
            conv_f(skip, skip, 1, hw);
            conv_f(skip, skip, 1, hw);
            conv_f(skip + below, out, 3, hw);
            conv_f(out, out, 3, hw);
            below = out;
        }
        conv_f(c, 1, 1, 224);
        Ok(UNet { inc, downs, ups, outc_w, outc_b, flops_per_image: f })
    }

    /// Logits [B, 1, H, W] of images [B, 3, H, W] (H, W multiples of 16); the bottleneck passes
    /// straight through (in the model, the interaction module's output replaces it).
    pub fn forward(&self, x: &Tensor, algo: GemmAlgo) -> Result<Tensor> {
        let mut skips = vec![self.inc.run(x, algo)?];
        for (c1, c2) in &self.downs {
            let (p, _) = pool::max_pool2(skips.last().expect("inc ran"))?;
            skips.push(c2.run(&c1.run(&p, algo)?, algo)?);
        }
        let mut cur = skips.pop().expect("five levels");
        for (gate, c1, c2) in &self.ups {
            let s = skips.pop().expect("one skip per level");
            let u = pool::upsample2(&cur)?;
            let w = plam::PlamWeights {
                w_avg: &gate[0],
                w_max: &gate[1],
                fc1_w: &gate[2],
                fc1_b: &gate[3],
                fc2_w: &gate[4],
                fc2_b: &gate[5],
            };
            let g = plam::plam_gate(&s, &w, algo)?.out;
            cur = c2.run(&c1.run_cat(&[&g, &u], algo)?, algo)?;
        }
        conv::conv2d(&cur, &self.outc_w, Some(&self.outc_b), algo)
    }
}
