//! The U-Net: ConvBN blocks, max-pool downs, and ups whose skips pass a PLAM gate first.

use crate::autograd::{Graph, Var};
use crate::error::Result;
use crate::nn::params::{ParamId, Params};
use crate::nn::{BatchNorm, Builder, Conv, Linear};

/// Conv3×3 (pad 1, bias) → BatchNorm2d → ReLU.
pub struct ConvBn {
    conv: Conv,
    norm: BatchNorm,
}

impl ConvBn {
    pub fn new(bd: &mut Builder, name: &str, ci: usize, co: usize) -> Result<ConvBn> {
        bd.scope(name, |bd| {
            Ok(ConvBn { conv: Conv::new2d(bd, "conv", ci, co, 3, true)?, norm: BatchNorm::new(bd, "norm", co)? })
        })
    }
    pub fn forward(&self, g: &Graph, p: &Params, x: &Var) -> Result<Var> {
        self.norm.forward_owned(g, p, self.conv.forward(g, p, x)?, true)
    }
    /// On the channel concatenation of `parts` (not materialised).
    pub fn forward_cat(&self, g: &Graph, p: &Params, parts: &[&Var]) -> Result<Var> {
        self.norm.forward_owned(g, p, self.conv.forward_cat(g, p, parts)?, true)
    }
}

/// MaxPool2 → ConvBN → ConvBN (`nConvs.0`, `nConvs.1`).
pub struct Down {
    c0: ConvBn,
    c1: ConvBn,
}

impl Down {
    pub fn new(bd: &mut Builder, name: &str, ci: usize, co: usize) -> Result<Down> {
        bd.scope(name, |bd| {
            bd.scope("nConvs", |bd| Ok(Down { c0: ConvBn::new(bd, "0", ci, co)?, c1: ConvBn::new(bd, "1", co, co)? }))
        })
    }
    pub fn forward(&self, g: &Graph, p: &Params, x: &Var) -> Result<Var> {
        self.c1.forward(g, p, &self.c0.forward(g, p, &g.max_pool2(x)?)?)
    }
}

/// The PLAM gate's parameters (`pixModule`); `conv_sig` is registered (official checkpoints carry
/// it) but never used.
pub struct Plam {
    w: [ParamId; 6],
}

impl Plam {
    pub fn new(bd: &mut Builder, c: usize) -> Result<Plam> {
        bd.scope("pixModule", |bd| {
            let conv_avg = Conv::new2d(bd, "conv_avg", c, c, 1, false)?;
            let conv_max = Conv::new2d(bd, "conv_max", c, c, 1, false)?;
            let (fc1, fc2) = bd
                .scope("bottleneck", |bd| Ok((Linear::new(bd, "0", 3, 6, true)?, Linear::new(bd, "2", 6, 1, true)?)))?;
            bd.scope("conv_sig", |bd| Conv::new2d(bd, "0", c, c, 1, true))?;
            let b = |l: &Linear| l.b.expect("registered with a bias");
            Ok(Plam { w: [conv_avg.w, conv_max.w, fc1.w, b(&fc1), fc2.w, b(&fc2)] })
        })
    }
    pub fn forward(&self, g: &Graph, p: &Params, s: &Var) -> Result<Var> {
        let w: Vec<Var> = self.w.iter().map(|&id| g.param(p, id)).collect();
        g.plam(s, [&w[0], &w[1], &w[2], &w[3], &w[4], &w[5]])
    }
}

/// u = upsample×2(x); output = ConvBN(ConvBN(concat[PLAM(skip), u])).
pub struct Up {
    plam: Plam,
    c0: ConvBn,
    c1: ConvBn,
}

impl Up {
    pub fn new(bd: &mut Builder, name: &str, c_skip: usize, c_in: usize, co: usize) -> Result<Up> {
        bd.scope(name, |bd| {
            let plam = Plam::new(bd, c_skip)?;
            let (c0, c1) =
                bd.scope("nConvs", |bd| Ok((ConvBn::new(bd, "0", c_skip + c_in, co)?, ConvBn::new(bd, "1", co, co)?)))?;
            Ok(Up { plam, c0, c1 })
        })
    }
    /// The output alone, from inputs the caller gives up (inference): each input and
    /// intermediate is dropped after its last use, so that the full-resolution stage holds at
    /// most three of its maps at once instead of five (at batch 8 each is 103 MB).
    pub fn forward_infer(&self, g: &Graph, p: &Params, x: Var, skip: Var) -> Result<Var> {
        let gs = self.plam.forward(g, p, &skip)?;
        drop(skip);
        let u = g.upsample2(&x)?;
        drop(x);
        let y0 = self.c0.forward_cat(g, p, &[&gs, &u])?;
        drop((gs, u));
        self.c1.forward(g, p, &y0)
    }

    /// (output, the gated skip)
    pub fn forward(&self, g: &Graph, p: &Params, x: &Var, skip: &Var) -> Result<(Var, Var)> {
        let u = g.upsample2(x)?;
        let gs = self.plam.forward(g, p, skip)?;
        let y = self.c1.forward(g, p, &self.c0.forward_cat(g, p, &[&gs, &u])?)?;
        Ok((y, gs))
    }
}

/// The U-Net's modules under the official names (`inc`, `down1..4`, `up4..1`, `outc`). In
/// RecLmis the interaction module's output replaces the bottleneck; alone (`forward`, the
/// whole-network benchmark) the bottleneck passes straight through.
pub struct UNet {
    pub inc: ConvBn,
    pub down: [Down; 4],
    pub up: [Up; 4],
    pub outc: Conv,
}

impl UNet {
    /// Widths `[c0, .., c4]` (official: 64/128/256/512/512); `bottleneck`: the channels up4
    /// receives (RecLmis: d_model; alone: c4). `between` registers what comes between `inc` and
    /// `down1` in the official module order, which a seeded initialisation follows (RecLmis: the
    /// interaction module).
    pub fn new_with<T>(
        bd: &mut Builder,
        in_channels: usize,
        widths: [usize; 5],
        bottleneck: usize,
        between: impl FnOnce(&mut Builder) -> Result<T>,
    ) -> Result<(UNet, T)> {
        let [c0, c1, c2, c3, c4] = widths;
        let inc = ConvBn::new(bd, "inc", in_channels, c0)?;
        let t = between(bd)?;
        let down = [
            Down::new(bd, "down1", c0, c1)?,
            Down::new(bd, "down2", c1, c2)?,
            Down::new(bd, "down3", c2, c3)?,
            Down::new(bd, "down4", c3, c4)?,
        ];
        let up = [
            Up::new(bd, "up4", c3, bottleneck, c2)?,
            Up::new(bd, "up3", c2, c2, c1)?,
            Up::new(bd, "up2", c1, c1, c0)?,
            Up::new(bd, "up1", c0, c0, c0)?,
        ];
        let outc = Conv::new2d(bd, "outc", c0, 1, 1, true)?;
        Ok((UNet { inc, down, up, outc }, t))
    }

    /// Logits [B, 1, H, W] of images [B, C, H, W] (H, W multiples of 16), the bottleneck passed
    /// straight through (its width must be `bottleneck`'s). Each skip is dropped once consumed.
    pub fn forward(&self, g: &Graph, p: &Params, x: &Var) -> Result<Var> {
        let mut skips = vec![self.inc.forward(g, p, x)?];
        for d in &self.down {
            let next = d.forward(g, p, skips.last().expect("inc ran"))?;
            skips.push(next);
        }
        let mut cur = skips.pop().expect("five levels");
        for u in &self.up {
            let s = skips.pop().expect("one skip per level");
            cur = u.forward(g, p, &cur, &s)?.0;
        }
        self.outc.forward(g, p, &cur)
    }
}
