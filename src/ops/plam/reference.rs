//! The PLAM gate in f64, 1×1 convolutions included. Tests only.

/// out [B,C,HW] for s [B,C,HW], w_avg and w_max [C,C], fc1 [6,3] + [6], fc2 [6] + [1].
#[allow(clippy::too_many_arguments)]
pub fn plam(
    s: &[f64],
    w_avg: &[f64],
    w_max: &[f64],
    fc1w: &[f64],
    fc1b: &[f64],
    fc2w: &[f64],
    fc2b: f64,
    b: usize,
    c: usize,
    hw: usize,
) -> Vec<f64> {
    // the two 1×1 convolutions, then the gate (`gate`) and the scaling
    let conv = |w: &[f64]| {
        let mut y = vec![0.0; s.len()];
        for i in 0..b {
            for p in 0..hw {
                for o in 0..c {
                    y[(i * c + o) * hw + p] = (0..c).map(|ch| w[o * c + ch] * s[(i * c + ch) * hw + p]).sum::<f64>();
                }
            }
        }
        y
    };
    let px = gate(&conv(w_avg), &conv(w_max), fc1w, fc1b, fc2w, fc2b, b, c, hw);
    (0..s.len()).map(|e| px[e / (c * hw) * hw + e % hw].0 * s[e]).collect()
}

/// The smallest distance of any kink input to its kink over all pixels: the ReLUs' arguments
/// (A, M and the MLP's six pre-activations) to 0, and the gap between the two largest ReLU(M)
/// when the largest is positive (the max's routing). Finite differences across a kink are not
/// derivatives, so gradient tests keep away from them.
#[allow(clippy::too_many_arguments)]
pub fn kink_margin(
    s: &[f64],
    w_avg: &[f64],
    w_max: &[f64],
    fc1w: &[f64],
    fc1b: &[f64],
    b: usize,
    c: usize,
    hw: usize,
) -> f64 {
    let mut margin = f64::INFINITY;
    for i in 0..b {
        for p in 0..hw {
            let at = |ch: usize| s[(i * c + ch) * hw + p];
            let conv = |w: &[f64], o: usize| (0..c).map(|ch| w[o * c + ch] * at(ch)).sum::<f64>();
            let av: Vec<f64> = (0..c).map(|o| conv(w_avg, o)).collect();
            let mut mv: Vec<f64> = (0..c).map(|o| conv(w_max, o)).collect();
            for v in av.iter().chain(&mv) {
                margin = margin.min(v.abs());
            }
            let a = av.iter().map(|v| v.max(0.0)).sum::<f64>() / c as f64;
            mv.sort_by(|x, y| y.total_cmp(x));
            let m = mv[0].max(0.0);
            if c > 1 && mv[0] > 0.0 {
                margin = margin.min(mv[0] - mv[1].max(0.0));
            }
            let f = [a, m, a + m];
            for j in 0..6 {
                margin =
                    margin.min((fc1w[j * 3] * f[0] + fc1w[j * 3 + 1] * f[1] + fc1w[j * 3 + 2] * f[2] + fc1b[j]).abs());
            }
        }
    }
    margin
}

/// The gate after its two 1×1 convolutions, in f64: from A and M [B, C, HW], per pixel
/// (g, the argmax of ReLU(M) over channels with ties to the lowest, the MLP's six
/// pre-activations). The kernels' `plam_features` and MLP.
#[allow(clippy::too_many_arguments)]
pub fn gate(
    a: &[f64],
    m: &[f64],
    fc1w: &[f64],
    fc1b: &[f64],
    fc2w: &[f64],
    fc2b: f64,
    b: usize,
    c: usize,
    hw: usize,
) -> Vec<(f64, usize, [f64; 6])> {
    let mut out = Vec::with_capacity(b * hw);
    for i in 0..b {
        for p in 0..hw {
            let at = |t: &[f64], ch: usize| t[(i * c + ch) * hw + p];
            let av = (0..c).map(|ch| at(a, ch).max(0.0)).sum::<f64>() / c as f64;
            let (mut mv, mut arg) = (f64::NEG_INFINITY, 0);
            for ch in 0..c {
                if at(m, ch).max(0.0) > mv {
                    (mv, arg) = (at(m, ch).max(0.0), ch);
                }
            }
            let f = [av, mv, av + mv];
            let z: [f64; 6] =
                std::array::from_fn(|j| fc1w[j * 3] * f[0] + fc1w[j * 3 + 1] * f[1] + fc1w[j * 3 + 2] * f[2] + fc1b[j]);
            let g = fc2b + (0..6).map(|j| fc2w[j] * z[j].max(0.0)).sum::<f64>();
            out.push((g, arg, z));
        }
    }
    out
}

/// The gate's backward after its convolutions, in f64: for out = g·s and the output gradient
/// dout, (dA, dM [B, C, HW], the MLP's 31 parameter gradients in the kernels' order dfc1w (18),
/// dfc1b (6), dfc2w (6), dfc2b (1), and the magnitudes their rounding errors scale with: sums
/// of absolute terms, for dfc2w the ReLU's input's terms (for rounding bounds)).
/// The input gradient's direct path is g·dout; the convolutions' gradients follow from dA, dM.
#[allow(clippy::too_many_arguments, clippy::type_complexity)]
pub fn gate_backward(
    a: &[f64],
    m: &[f64],
    s: &[f64],
    dout: &[f64],
    fc1w: &[f64],
    fc1b: &[f64],
    fc2w: &[f64],
    fc2b: f64,
    b: usize,
    c: usize,
    hw: usize,
) -> (Vec<f64>, Vec<f64>, [f64; 31], [f64; 31]) {
    let px = gate(a, m, fc1w, fc1b, fc2w, fc2b, b, c, hw);
    let (mut da, mut dm) = (vec![0.0; a.len()], vec![0.0; m.len()]);
    let (mut fcg, mut mag) = ([0.0f64; 31], [0.0f64; 31]);
    // a term v of gradient k, and the magnitude its f32 rounding error scales with
    let mut add = |k: usize, v: f64, m: f64| {
        fcg[k] += v;
        mag[k] += m;
    };
    for i in 0..b {
        for p in 0..hw {
            let e = |ch: usize| (i * c + ch) * hw + p;
            let (_, arg, z) = px[i * hw + p];
            let av = (0..c).map(|ch| a[e(ch)].max(0.0)).sum::<f64>() / c as f64;
            let mv = m[e(arg)].max(0.0);
            let f = [av, mv, av + mv];
            let dg = (0..c).map(|ch| dout[e(ch)] * s[e(ch)]).sum::<f64>();
            let mut df = [0.0; 3];
            for j in 0..6 {
                // ReLU(z) of a z whose terms cancel carries their rounding, not its own
                let zmag = (0..3).map(|k| (fc1w[j * 3 + k] * f[k]).abs()).sum::<f64>() + fc1b[j].abs();
                add(24 + j, dg * z[j].max(0.0), if z[j] > 0.0 { (dg * zmag).abs() } else { 0.0 });
                let dz = if z[j] > 0.0 { dg * fc2w[j] } else { 0.0 };
                for (k, fk) in f.iter().enumerate() {
                    add(j * 3 + k, dz * fk, (dz * fk).abs());
                    df[k] += dz * fc1w[j * 3 + k];
                }
                add(18 + j, dz, dz.abs());
            }
            add(30, dg, dg.abs());
            let (dav, dmv) = ((df[0] + df[2]) / c as f64, df[1] + df[2]);
            for ch in 0..c {
                da[e(ch)] = if a[e(ch)] > 0.0 { dav } else { 0.0 };
                dm[e(ch)] = if ch == arg && m[e(ch)] > 0.0 { dmv } else { 0.0 };
            }
        }
    }
    (da, dm, fcg, mag)
}
