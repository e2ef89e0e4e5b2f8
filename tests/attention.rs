//! Fused attention: forward and backward against the f64 reference (which follows the official
//! code literally), against the same computation composed from primitive ops, finite-difference
//! checks of the reference, and the documented edge cases (rows with no key, w = 0).

mod common;
use common::*;
use proptest::prelude::*;
use reclmis::ops::attention::{
    self as attn, composed,
    reference::{Cond, Problem},
    AttnOpts, Condition,
};
use reclmis::ops::gemm::GemmAlgo;
use reclmis::testing::{fd_mismatch, mismatch_scaled, Rng, EPS32, EPS_TF32};
use reclmis::{Device, Tensor};

/// Sequence lengths: 1, the model's 18 text tokens, 16 and 36 of the fixtures, tile neighbours,
/// and (rarely, the emulator is slow) the 196 image tokens of a 224² input.
fn seq() -> impl Strategy<Value = usize> {
    prop_oneof![
        8 => prop::sample::select(vec![1usize, 2, 5, 15, 16, 17, 18, 33, 36]),
        1 => Just(196usize),
    ]
}

/// Head dims: every padding class (16, 32, 64, 128) at and off its edge.
fn head_dim() -> impl Strategy<Value = usize> {
    prop::sample::select(vec![1usize, 3, 8, 16, 17, 32, 33, 64, 100, 128])
}

#[derive(Clone, Debug)]
struct Case {
    b: usize,
    h: usize,
    tq: usize,
    s: usize,
    dh: usize,
    causal: bool,
    /// 0: no key mask, 1: random invalid keys, 2: also one batch row with no valid key
    mask_kind: u8,
    /// 0: none, 1: official (probabilities), 2: paper (logits)
    cond: u8,
    tc: bool,
    probs: bool,
    amp: f32,
    seed: u64,
}

fn case() -> impl Strategy<Value = Case> {
    (
        (1usize..=2, 1usize..=3, seq(), seq(), head_dim()),
        (any::<bool>(), 0u8..3, 0u8..3, any::<bool>(), any::<bool>()),
        (prop::sample::select(vec![0.5f32, 1.0, 3.0]), any::<u64>()),
    )
        .prop_filter("keep the emulator's work bounded", |((b, h, tq, s, dh), _, _)| b * h * tq * s * dh <= 2_000_000)
        .prop_map(|((b, h, tq, s, dh), (causal, mask_kind, cond, tc, probs), (amp, seed))| Case {
            b,
            h,
            tq,
            s,
            dh,
            causal,
            mask_kind,
            cond,
            tc,
            probs,
            amp,
            seed,
        })
}

struct Data {
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    dout: Vec<f32>,
    valid: Option<Vec<i32>>,
    w: Option<Vec<f32>>,
}

/// Condition weights with exact zeros, tiny values, ordinary ones and large ones (large means
/// 50 for probability weights, 4 for logit multipliers, which sharpen the softmax).
fn weights(rng: &mut Rng, n: usize, cond: u8) -> Vec<f32> {
    (0..n)
        .map(|_| match rng.next_u64() % 8 {
            0 => 0.0,
            1 => 1e-12,
            2 => {
                if cond == 1 {
                    50.0
                } else {
                    4.0
                }
            }
            3 if cond == 2 => -1.0,
            _ => rng.uniform(0.0, 1.0),
        })
        .collect()
}

fn data(c: &Case) -> Data {
    let mut rng = Rng::new(c.seed);
    let e = c.h * c.dh;
    let mut vals = |n: usize, a: f32| rng.vec(n, -a, a);
    let (q, k, v, dout) =
        (vals(c.b * c.tq * e, c.amp), vals(c.b * c.s * e, c.amp), vals(c.b * c.s * e, 1.0), vals(c.b * c.tq * e, 1.0));
    let valid = (c.mask_kind > 0).then(|| {
        let mut m: Vec<i32> = (0..c.b * c.s).map(|_| !rng.next_u64().is_multiple_of(4) as i32).collect();
        if c.mask_kind == 2 {
            m[..c.s].fill(0);
        }
        m
    });
    let w = (c.cond > 0).then(|| weights(&mut rng, c.b * c.s, c.cond));
    Data { q, k, v, dout, valid, w }
}

fn problem(c: &Case, d: &Data) -> Problem {
    let w64 = || f64s(d.w.as_ref().unwrap());
    Problem {
        b: c.b,
        h: c.h,
        tq: c.tq,
        s: c.s,
        dh: c.dh,
        scale: (1.0 / (c.dh as f32).sqrt()) as f64,
        causal: c.causal,
        valid: d.valid.as_ref().map(|m| m.iter().map(|&x| x != 0).collect()),
        cond: match c.cond {
            0 => Cond::None,
            1 => Cond::Probs(w64()),
            _ => Cond::Logits(w64()),
        },
    }
}

/// The first-order error bounds of the computation, as multiples of each output's magnitude
/// (the reference's sums of absolute terms). u_op is the operand rounding of the products
/// (tf32: 2^-11 per operand; exact f32: 0), each f32 sum of n terms adds n·eps (worst case).
/// A logit is off by at most E = (2·u_op + Dh·eps)·max|logit terms| plus the rounding of
/// ln(w + 1e-10) and of the logsumexp; a probability is then off by 2E relative, and every output
/// is a sum of probability-weighted terms. Factor 2 of slack over the bound.
struct Tol {
    o: f64,
    dv: f64,
    dqk: f64,
}

fn tolerances(c: &Case, d: &Data, p: &Problem) -> Tol {
    let u_op = if c.tc { EPS_TF32 } else { 0.0 };
    let e = c.h * c.dh;
    let mut lmax: f64 = 0.0;
    for b in 0..c.b {
        for h in 0..c.h {
            for i in 0..c.tq {
                for j in 0..c.s {
                    let wj = match &d.w {
                        Some(w) if c.cond == 2 => w[b * c.s + j].abs() as f64,
                        _ => 1.0,
                    };
                    let dot: f64 = (0..c.dh)
                        .map(|x| {
                            (d.q[(b * c.tq + i) * e + h * c.dh + x] * d.k[(b * c.s + j) * e + h * c.dh + x]).abs()
                                as f64
                        })
                        .sum();
                    lmax = lmax.max(p.scale * dot * wj);
                }
            }
        }
    }
    let lse_mag = lmax + 24.0 + (c.s as f64 + 1.0).ln();
    let big_e = (2.0 * u_op + c.dh as f64 * EPS32) * lmax + 4.0 * EPS32 * lse_mag;
    Tol {
        o: 2.0 * (2.0 * big_e + 2.0 * u_op + (c.s + 4) as f64 * EPS32),
        dv: 2.0 * (2.0 * big_e + 2.0 * u_op + (c.tq + 4) as f64 * EPS32),
        // dS = P·(dP − delta) with delta_i = ⟨o_i, dO_i⟩: P is off by 2E, and delta carries
        // all of o's error (2E from its probabilities, an S-term sum) plus its own Dh-term dot;
        // dS is then summed over Tq (dk) or S (dq) terms. The errors add: 4E, and S + Tq + Dh
        // sums. (With 2E and only the larger sum, the case `dk_error_adds_the_delta_and_the_sum`
        // — Dh = 1, weights near 1e-10 — failed by 1.4x.)
        dqk: 2.0 * (4.0 * big_e + 4.0 * u_op + (c.dh + c.s + c.tq + 8) as f64 * EPS32),
    }
}

struct Tensors {
    q: Tensor,
    k: Tensor,
    v: Tensor,
    dout: Tensor,
    valid: Option<Tensor>,
    w: Option<Tensor>,
}

fn tensors(c: &Case, d: &Data, dev: &Device) -> Tensors {
    let e = c.h * c.dh;
    Tensors {
        q: tensor(&d.q, &[c.b, c.tq, e], dev),
        k: tensor(&d.k, &[c.b, c.s, e], dev),
        v: tensor(&d.v, &[c.b, c.s, e], dev),
        dout: tensor(&d.dout, &[c.b, c.tq, e], dev),
        valid: d.valid.as_ref().map(|m| Tensor::from_vec_i32(m.clone(), &[c.b, c.s], dev).unwrap()),
        w: d.w.as_ref().map(|w| tensor(w, &[c.b, c.s], dev)),
    }
}

fn opts<'a>(c: &Case, t: &'a Tensors) -> AttnOpts<'a> {
    AttnOpts {
        causal: c.causal,
        key_valid: t.valid.as_ref(),
        condition: match (c.cond, &t.w) {
            (1, Some(w)) => Condition::Probs(w),
            (2, Some(w)) => Condition::Logits(w),
            _ => Condition::None,
        },
        want_probs: c.probs,
        algo: if c.tc { GemmAlgo::TensorCore } else { GemmAlgo::Tiled },
        ..AttnOpts::new(c.h)
    }
}

fn check_fused(dev: &Device, c: Case) -> Result<(), TestCaseError> {
    let d = data(&c);
    let p = problem(&c, &d);
    let tol = tolerances(&c, &d, &p);
    let t = tensors(&c, &d, dev);
    let o = opts(&c, &t);
    let f = attn::attention(&t.q, &t.k, &t.v, &o).unwrap();
    // At tf32 the pipelined kernels take head dims 16, 32, 64 and 128 (when no probabilities are
    // asked for): they ran, and their ldmatrix and 32-bit shared-memory reads are conflict-free.
    #[cfg(feature = "emu")]
    let pipelined = c.tc && [16, 32, 64, 128].contains(&c.dh);
    #[cfg(feature = "emu")]
    if matches!(dev, Device::Emu) && pipelined && !c.probs && c.b * c.tq > 0 {
        use reclmis::kernels::Kernel;
        prop_assert!(reclmis::device::emu::launched_kernels().contains(&Kernel::attention_pipe_fwd_f32));
        let st = reclmis::device::emu::last_smem_stats();
        prop_assert!(st.phases > 0 && st.extra_wavefronts == 0, "forward shared-memory phases {:?}", st);
    }
    let want = p.forward(&f64s(&d.q), &f64s(&d.k), &f64s(&d.v));
    let tiny = 1e-30;
    assert_none("o", mismatch_scaled(&f.o.to_vec().unwrap(), &want.o, &want.o_mag, tol.o, tiny))?;
    if c.probs {
        let pr = f.probs.as_ref().expect("probabilities were asked for");
        assert_none("probs", mismatch_scaled(&pr.to_vec().unwrap(), &want.probs, &want.probs, tol.o, tiny))?;
    }
    let g = attn::attention_backward(&t.q, &t.k, &t.v, &f, &t.dout, &o).unwrap();
    #[cfg(feature = "emu")]
    if matches!(dev, Device::Emu) && pipelined && c.cond == 0 && c.b * c.s > 0 {
        // the dK/dV kernel ran last (the dQ one before it)
        use reclmis::kernels::Kernel;
        let launched = reclmis::device::emu::launched_kernels();
        prop_assert!(launched.contains(&Kernel::attention_pipe_dkdv_bwd_f32));
        prop_assert!(launched.contains(&Kernel::attention_pipe_dq_bwd_f32));
        let st = reclmis::device::emu::last_smem_stats();
        prop_assert!(st.phases > 0 && st.extra_wavefronts == 0, "backward shared-memory phases {:?}", st);
    }
    let wg = p.backward(&f64s(&d.q), &f64s(&d.k), &f64s(&d.v), &f64s(&d.dout));
    assert_none("dv", mismatch_scaled(&g.dv.to_vec().unwrap(), &wg.dv, &wg.dv_mag, tol.dv, tiny))?;
    assert_none("dq", mismatch_scaled(&g.dq.to_vec().unwrap(), &wg.dq, &wg.dq_mag, tol.dqk, tiny))?;
    assert_none("dk", mismatch_scaled(&g.dk.to_vec().unwrap(), &wg.dk, &wg.dk_mag, tol.dqk, tiny))?;
    match (&g.dw, c.cond) {
        (None, 0) => Ok(()),
        (Some(dw), 1 | 2) => {
            assert_none("dw", mismatch_scaled(&dw.to_vec().unwrap(), &wg.dw, &wg.dw_mag, tol.dqk, tiny))
        }
        _ => Err(TestCaseError::fail("dw present exactly when there is a condition")),
    }
}

per_device!(check_fused, (c in case()));

/// The composition of primitive ops computes the same thing (it is what the fused op is
/// benchmarked against). Rows with no key are excluded: there the composition gives NaN.
fn check_composed(dev: &Device, mut c: Case) -> Result<(), TestCaseError> {
    if c.mask_kind == 2 {
        c.mask_kind = 1;
    }
    let mut d = data(&c);
    if let Some(m) = &mut d.valid {
        // Keep key 0 valid so that no row is empty (causal rows always see key 0).
        for b in 0..c.b {
            m[b * c.s] = 1;
        }
    }
    let p = problem(&c, &d);
    let tol = tolerances(&c, &d, &p);
    let t = tensors(&c, &d, dev);
    let o = opts(&c, &t);
    let cf = composed::forward(&t.q, &t.k, &t.v, &o).unwrap();
    let want = p.forward(&f64s(&d.q), &f64s(&d.k), &f64s(&d.v));
    // The composition rounds a few more times (separate scale, mask, renormalisation passes).
    let slack = 2.0;
    assert_none("o", mismatch_scaled(&cf.o.to_vec().unwrap(), &want.o, &want.o_mag, slack * tol.o, 1e-30))?;
    let (dq, dk, dv, dw) = composed::backward(&cf, &t.dout, &o).unwrap();
    let wg = p.backward(&f64s(&d.q), &f64s(&d.k), &f64s(&d.v), &f64s(&d.dout));
    assert_none("dv", mismatch_scaled(&dv.to_vec().unwrap(), &wg.dv, &wg.dv_mag, slack * tol.dv, 1e-30))?;
    // Under the official condition the composition backpropagates through the softmax before
    // the ·(w + eps): its dz = p·(dp − Σ p·dp) cancels to ~0 for a key with tiny w, leaving
    // rounding noise of the size of the unconditioned p, not of the final probability. Its error
    // is then bounded only normwise (by the largest magnitude in the tensor), which is what is
    // checked there; the fused op does not have this weakness (checked elementwise above).
    let normwise = |mag: &[f64]| -> Vec<f64> {
        let m = mag.iter().fold(0.0f64, |a, &b| a.max(b));
        if c.cond == 1 {
            vec![m; mag.len()]
        } else {
            mag.to_vec()
        }
    };
    assert_none("dq", mismatch_scaled(&dq.to_vec().unwrap(), &wg.dq, &normwise(&wg.dq_mag), slack * tol.dqk, 1e-30))?;
    assert_none("dk", mismatch_scaled(&dk.to_vec().unwrap(), &wg.dk, &normwise(&wg.dk_mag), slack * tol.dqk, 1e-30))?;
    if let Some(dw) = dw {
        assert_none(
            "dw",
            mismatch_scaled(&dw.to_vec().unwrap(), &wg.dw, &normwise(&wg.dw_mag), slack * tol.dqk, 1e-30),
        )?;
    }
    Ok(())
}

mod composed_matches_reference {
    use super::*;
    proptest! {
        #![proptest_config(ProptestConfig { cases: 24, failure_persistence: None, ..ProptestConfig::default() })]
        #[test]
        fn cpu(c in case()) { check_composed(&device("cpu"), c)?; }
        #[test]
        fn emu(c in case().prop_filter("small", |c| c.b * c.h * c.tq * c.s * c.dh <= 200_000)) {
            check_composed(&device("emu"), c)?;
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, failure_persistence: None, ..ProptestConfig::default() })]

    /// The reference backward (chain rule through softmax, ·(w + eps), renormalisation) equals
    /// central finite differences of the reference forward, for q, k, v and w.
    #[test]
    fn reference_grads_match_finite_differences(
        (b, h, tq, s, dh) in (1usize..=2, 1usize..=2, 1usize..=5, 1usize..=5, 1usize..=4),
        causal in any::<bool>(), masked in any::<bool>(), cond in 0u8..3, seed in any::<u64>()
    ) {
        let c = Case { b, h, tq, s, dh, causal, mask_kind: masked as u8, cond, tc: false, probs: false, amp: 1.0, seed };
        let mut d = data(&c);
        if let Some(w) = &mut d.w {
            // finite differences need a smooth neighbourhood: w away from 0 under the official form
            for x in w.iter_mut() {
                if cond == 1 {
                    *x = x.abs().clamp(0.05, 5.0);
                }
            }
        }
        let p = problem(&c, &d);
        let (q, k, v, dout) = (f64s(&d.q), f64s(&d.k), f64s(&d.v), f64s(&d.dout));
        let g = p.backward(&q, &k, &v, &dout);
        assert_none("dq", fd_mismatch(|x| p.forward(x, &k, &v).o, &q, &dout, &g.dq, 1e-6))?;
        assert_none("dk", fd_mismatch(|x| p.forward(&q, x, &v).o, &k, &dout, &g.dk, 1e-6))?;
        assert_none("dv", fd_mismatch(|x| p.forward(&q, &k, x).o, &v, &dout, &g.dv, 1e-6))?;
        if let Some(w) = &d.w {
            let with_w = |x: &[f64]| {
                let mut p2 = p.clone();
                p2.cond = if cond == 1 { Cond::Probs(x.to_vec()) } else { Cond::Logits(x.to_vec()) };
                p2.forward(&q, &k, &v).o
            };
            assert_none("dw", fd_mismatch(with_w, &f64s(w), &dout, &g.dw, 1e-6))?;
        }
    }
}

/// Rows with no key: zeros everywhere (output, probabilities, gradients), a logsumexp of −inf,
/// and no NaN, on every device and both product kinds.
#[test]
fn rows_without_keys_are_zero_not_nan() {
    for kind in ["cpu", "emu"] {
        for tc in [false, true] {
            let c = Case {
                b: 2,
                h: 2,
                tq: 5,
                s: 7,
                dh: 8,
                causal: false,
                mask_kind: 2,
                cond: 1,
                tc,
                probs: true,
                amp: 1.0,
                seed: 3,
            };
            let dev = device(kind);
            let d = data(&c);
            let t = tensors(&c, &d, &dev);
            let o = opts(&c, &t);
            let f = attn::attention(&t.q, &t.k, &t.v, &o).unwrap();
            let g = attn::attention_backward(&t.q, &t.k, &t.v, &f, &t.dout, &o).unwrap();
            let e = c.h * c.dh;
            let out = f.o.to_vec().unwrap();
            assert!(out[..c.tq * e].iter().all(|&x| x == 0.0), "{kind} tc={tc}: batch 0 has no key: {out:?}");
            assert!(out.iter().all(|x| x.is_finite()), "{kind}");
            let lse = f.lse.to_vec().unwrap();
            assert!(lse[..c.h * c.tq].iter().all(|&x| x == f32::NEG_INFINITY), "{kind}: {lse:?}");
            assert!(f.probs.unwrap().to_vec().unwrap()[..c.h * c.tq * c.s].iter().all(|&x| x == 0.0), "{kind}");
            for (name, x, n) in [("dq", &g.dq, c.tq * e), ("dk", &g.dk, c.s * e), ("dv", &g.dv, c.s * e)] {
                let x = x.to_vec().unwrap();
                assert!(x[..n].iter().all(|&v| v == 0.0) && x.iter().all(|v| v.is_finite()), "{kind} {name}: {x:?}");
            }
            let dw = g.dw.unwrap().to_vec().unwrap();
            assert!(dw[..c.s].iter().all(|&v| v == 0.0) && dw.iter().all(|v| v.is_finite()), "{kind}: {dw:?}");
        }
    }
}

/// The official condition with w = 0 on every key a row sees leaves only the 1e-10: the row is
/// then the plain softmax over those keys (renormalised), not NaN or zero.
#[test]
fn all_zero_weights_fall_back_to_the_plain_softmax() {
    for kind in ["cpu", "emu"] {
        let dev = device(kind);
        let mut rng = Rng::new(11);
        let (b, tq, s, e) = (1, 4, 6, 8);
        let q = tensor(&rng.vec(b * tq * e, -1.0, 1.0), &[b, tq, e], &dev);
        let k = tensor(&rng.vec(b * s * e, -1.0, 1.0), &[b, s, e], &dev);
        let v = tensor(&rng.vec(b * s * e, -1.0, 1.0), &[b, s, e], &dev);
        let w = tensor(&vec![0.0; b * s], &[b, s], &dev);
        let plain = attn::attention(&q, &k, &v, &AttnOpts::new(2)).unwrap().o.to_vec().unwrap();
        let zero_w = AttnOpts { condition: Condition::Probs(&w), ..AttnOpts::new(2) };
        let got = attn::attention(&q, &k, &v, &zero_w).unwrap().o.to_vec().unwrap();
        for (a, z) in plain.iter().zip(&got) {
            assert!((a - z).abs() <= 1e-5 * (1.0 + a.abs()), "{kind}: {a} vs {z}");
        }
    }
}

#[test]
fn bad_shapes_are_named() {
    let dev = Device::Cpu;
    let q = tensor(&[0.0; 2 * 3 * 8], &[2, 3, 8], &dev);
    let k = tensor(&[0.0; 2 * 5 * 8], &[2, 5, 8], &dev);
    let e = attn::attention(&q, &k, &k, &AttnOpts::new(3)).err().unwrap().to_string();
    assert!(e.contains("width 8 does not split into 3 heads"), "{e}");
    let short = tensor(&[0.0; 2 * 5 * 4], &[2, 5, 4], &dev);
    let e = attn::attention(&q, &short, &short, &AttnOpts::new(2)).err().unwrap().to_string();
    assert!(e.contains("k and v must be [B,S,E]"), "{e}");
    let w = tensor(&[0.0; 2 * 4], &[2, 4], &dev);
    let e = attn::attention(&q, &k, &k, &AttnOpts { condition: Condition::Logits(&w), ..AttnOpts::new(2) })
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("condition weights must be [B,S] = [2,5]"), "{e}");
    let wide = tensor(&vec![0.0; 2 * 3 * 258], &[2, 3, 258], &dev);
    let e = attn::attention(&wide, &wide, &wide, &AttnOpts::new(1)).err().unwrap().to_string();
    assert!(e.contains("head dim 258 > 128"), "{e}");
}

/// A case CI found: under the paper's condition dw sums dS·t, and a logit t that is small
/// because its terms cancel still carries their rounding; the error scale must use Σ|q||k|.
#[test]
fn composed_dw_with_cancelling_logits() {
    let c = Case {
        b: 1,
        h: 1,
        tq: 1,
        s: 196,
        dh: 33,
        causal: false,
        mask_kind: 0,
        cond: 2,
        tc: false,
        probs: false,
        amp: 0.5,
        seed: 8899326998587891398,
    };
    for kind in ["cpu", "emu"] {
        check_composed(&device(kind), c.clone()).unwrap();
        check_fused(&device(kind), c.clone()).unwrap();
    }
}

/// A case a proptest run found: Dh = 1, official condition with weights near 1e-10, causal,
/// S = 17 > Tq = 15; dk's error is the sum of o's (through delta) and of dk's own Tq-term sum.
#[test]
fn dk_error_adds_the_delta_and_the_sum() {
    let c = Case {
        b: 2,
        h: 3,
        tq: 15,
        s: 17,
        dh: 1,
        causal: true,
        mask_kind: 1,
        cond: 1,
        tc: false,
        probs: false,
        amp: 3.0,
        seed: 7435805422588590893,
    };
    for kind in ["cpu", "emu"] {
        check_fused(&device(kind), c.clone()).unwrap();
    }
}

/// The tensor-core attention on the GPU against the same kernels on the emulator (both round
/// the operands to tf32 the same way; they differ in accumulation order only), forward and
/// backward, at the official head dims. A wrong mma fragment layout shows as O(1) differences.
#[test]
#[ignore = "needs a CUDA GPU"]
fn tensor_core_attention_gpu_matches_emulator() {
    let (gpu, emu) = (device("cuda"), device("emu"));
    for (h, dh, tq, s, causal, cond) in
        [(4, 128, 18, 196, false, 1u8), (8, 64, 18, 18, true, 0), (2, 16, 36, 17, true, 2)]
    {
        let c = Case { b: 2, h, tq, s, dh, causal, mask_kind: 1, cond, tc: true, probs: false, amp: 1.0, seed: 5 };
        let d = data(&c);
        let run = |dev: &Device| {
            let t = tensors(&c, &d, dev);
            let o = opts(&c, &t);
            let f = attn::attention(&t.q, &t.k, &t.v, &o).unwrap();
            let g = attn::attention_backward(&t.q, &t.k, &t.v, &f, &t.dout, &o).unwrap();
            [f.o.to_vec().unwrap(), g.dq.to_vec().unwrap(), g.dk.to_vec().unwrap(), g.dv.to_vec().unwrap()]
        };
        let (a, b) = (run(&gpu), run(&emu));
        for (name, (x, y)) in ["o", "dq", "dk", "dv"].iter().zip(a.iter().zip(&b)) {
            let worst = x.iter().zip(y).map(|(p, q)| (p - q).abs()).fold(0.0f32, f32::max);
            let scale = y.iter().fold(0.0f32, |m, v| m.max(v.abs())).max(1e-6);
            assert!(
                worst <= 1e-4 * scale,
                "{h}x{dh} {tq}x{s}: {name}: GPU vs emulator differ by {worst} (max |value| {scale})"
            );
        }
    }
}

/// bf16 unit roundoff: 8 significant bits, round to nearest even.
const EPS_BF16: f64 = 1.0 / 256.0;

/// The bf16 forward (`attention::bf16`: the pipelined kernel on emu/cuda at head dims 16, 32, 64
/// and 128, the f32 kernel of widened copies at the others) on bf16 q, k, v, against the f64
/// reference of the rounded values. Bound: the f32 path's with exact operand products (bf16 times
/// bf16 is exact in f32: u_op = 0), plus P rounded to bf16 before P·V (at most u_bf16 of each
/// term of o's magnitude) and the output's rounding (u_bf16 of |o| <= its magnitude), with the
/// same factor 2 of slack. The logsumexp against the f32 kernel's on the same values: both sum
/// the same exact products in f32 (in other orders), so they differ by the logit bound. Then the
/// bf16 backward (`attention_backward_bf16`: the pipelined dQ and dK/dV kernels where the
/// forward's are taken).
fn check_fused_bf16(dev: &Device, mut c: Case) -> Result<(), TestCaseError> {
    use reclmis::ops::cast::cast;
    use reclmis::DType;
    c.tc = false;
    let mut d = data(&c);
    let r = |v: &mut Vec<f32>| v.iter_mut().for_each(|x| *x = half::bf16::from_f32(*x).to_f32());
    r(&mut d.q);
    r(&mut d.k);
    r(&mut d.v);
    let p = problem(&c, &d);
    let tol = tolerances(&c, &d, &p);
    let t = tensors(&c, &d, dev);
    let o = opts(&c, &t);
    let b = |x: &Tensor| cast(x, DType::BF16).unwrap();
    let f = attn::bf16::attention_bf16(&b(&t.q), &b(&t.k), &b(&t.v), &o).unwrap();
    prop_assert_eq!(f.o.dtype(), DType::BF16);
    #[cfg(feature = "emu")]
    if matches!(dev, Device::Emu) && [16, 32, 64, 128].contains(&c.dh) && !c.probs && c.b * c.tq > 0 {
        // the pipelined kernel ran last: its ldmatrix reads the swizzled tiles without conflicts
        let st = reclmis::device::emu::last_smem_stats();
        prop_assert!(st.phases > 0 && st.extra_wavefronts == 0, "ldmatrix phases {:?}", st);
    }
    let want = p.forward(&f64s(&d.q), &f64s(&d.k), &f64s(&d.v));
    let o_tol = tol.o + 2.0 * 2.0 * EPS_BF16;
    assert_none(
        "o",
        mismatch_scaled(&cast(&f.o, DType::F32).unwrap().to_vec().unwrap(), &want.o, &want.o_mag, o_tol, 1e-30),
    )?;
    let f32_lse = attn::attention(&t.q, &t.k, &t.v, &o).unwrap().lse.to_vec().unwrap();
    for (i, (a, e)) in f.lse.to_vec().unwrap().iter().zip(&f32_lse).enumerate() {
        let ok = (a == e) || ((a - e).abs() as f64) <= tol.o * (1.0 + e.abs() as f64);
        prop_assert!(ok, "lse[{}]: {} vs the f32 kernel's {}", i, a, e);
    }

    // The backward from this forward (its bf16 o and f32 lse) and a bf16 d_out, against the f64
    // reference of the rounded values. Beyond the f32 path's bounds: o as stored carries up to
    // 2·u_bf16 of its magnitude more (P's rounding in the forward, o's own), which delta =
    // Σ dO·o passes on to dS (at most 2·u_bf16 of dq's and dk's magnitudes); P and dS are rounded
    // to bf16 as the A operands of the products (u_bf16 of each term), and the outputs once
    // more. dw is summed in f32 from unrounded terms: only delta's share. Factor 2 of slack.
    r(&mut d.dout);
    let dout = b(&tensor(&d.dout, &[c.b, c.tq, c.h * c.dh], dev));
    let g = attn::bf16::attention_backward_bf16(&b(&t.q), &b(&t.k), &b(&t.v), &f, &dout, &o).unwrap();
    for x in [&g.dq, &g.dk, &g.dv] {
        prop_assert_eq!(x.dtype(), DType::BF16);
    }
    #[cfg(feature = "emu")]
    if matches!(dev, Device::Emu) && [16, 32, 64, 128].contains(&c.dh) && c.cond == 0 && c.b * c.s > 0 {
        // the dK/dV kernel ran last (the dQ one before it): conflict-free ldmatrix too
        let st = reclmis::device::emu::last_smem_stats();
        prop_assert!(st.phases > 0 && st.extra_wavefronts == 0, "backward ldmatrix phases {:?}", st);
    }
    let wg = p.backward(&f64s(&d.q), &f64s(&d.k), &f64s(&d.v), &f64s(&d.dout));
    let wide = |x: &Tensor| cast(x, DType::F32).unwrap().to_vec().unwrap();
    let tiny = 1e-30;
    assert_none("dv", mismatch_scaled(&wide(&g.dv), &wg.dv, &wg.dv_mag, tol.dv + 2.0 * 2.0 * EPS_BF16, tiny))?;
    let dqk_tol = tol.dqk + 2.0 * 4.0 * EPS_BF16;
    assert_none("dq", mismatch_scaled(&wide(&g.dq), &wg.dq, &wg.dq_mag, dqk_tol, tiny))?;
    assert_none("dk", mismatch_scaled(&wide(&g.dk), &wg.dk, &wg.dk_mag, dqk_tol, tiny))?;
    match (&g.dw, c.cond) {
        (None, 0) => Ok(()),
        (Some(dw), 1 | 2) => assert_none(
            "dw",
            mismatch_scaled(&dw.to_vec().unwrap(), &wg.dw, &wg.dw_mag, tol.dqk + 2.0 * 2.0 * EPS_BF16, tiny),
        ),
        _ => Err(TestCaseError::fail("dw present exactly when there is a condition")),
    }
}

per_device!(check_fused_bf16, (c in case()));

/// The pipelined bf16 forward and backward on the GPU against the emulator: the same bf16 operands and f32
/// statistics, sums in another order, so the outputs are within two bf16 rounding steps plus the
/// f32 bound; a wrong fragment layout (P from the accumulators into A fragments, V through
/// ldmatrix.trans) or a missing pipeline wait is O(1) off.
#[test]
#[ignore = "needs a CUDA GPU"]
fn bf16_attention_gpu_matches_emulator() {
    use reclmis::ops::cast::cast;
    use reclmis::DType;
    let (gpu, emu) = (device("cuda"), device("emu"));
    for (b, h, tq, s, dh, causal) in
        [(1, 1, 16, 16, 16, false), (2, 4, 67, 45, 32, true), (1, 2, 130, 97, 64, false), (2, 4, 196, 18, 128, false)]
    {
        let c = Case { b, h, tq, s, dh, causal, mask_kind: 1, cond: 1, tc: false, probs: false, amp: 1.0, seed: 5 };
        let d = data(&c);
        let run = |dev: &Device| {
            let t = tensors(&c, &d, dev);
            let bf = |x: &Tensor| cast(x, DType::BF16).unwrap();
            let o = opts(&c, &t);
            let f = attn::bf16::attention_bf16(&bf(&t.q), &bf(&t.k), &bf(&t.v), &o).unwrap();
            let g = attn::bf16::attention_backward_bf16(&bf(&t.q), &bf(&t.k), &bf(&t.v), &f, &bf(&t.dout), &o).unwrap();
            let wide = |x: &Tensor| cast(x, DType::F32).unwrap().to_vec().unwrap();
            let grads = [wide(&g.dq), wide(&g.dk), wide(&g.dv), g.dw.unwrap().to_vec().unwrap()];
            (wide(&f.o), f.lse.to_vec().unwrap(), grads)
        };
        let ((go, gl, gg), (eo, el, eg)) = (run(&gpu), run(&emu));
        // the backward: the same f32 recomputation of P and dS, whose bf16 roundings (P, dS, the
        // outputs) may tip by a step where expf differs in the last bit; a wrong fragment layout
        // or pipeline stage is O(1) off
        for (name, (x, y)) in ["dq", "dk", "dv", "dw"].iter().zip(gg.iter().zip(&eg)) {
            let scale = y.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-6);
            for (i, (a, e)) in x.iter().zip(y).enumerate() {
                let allowed = 3.0 / 256.0 * a.abs().max(e.abs()) + 1e-3 * scale;
                assert!((a - e).abs() <= allowed, "b{b} h{h} tq{tq} s{s} dh{dh} {name}[{i}]: gpu {a} vs emu {e}");
            }
        }
        for (i, (x, y)) in go.iter().zip(&eo).enumerate() {
            // the output's rounding (one bf16 step of either) and P's (expf may differ in the last
            // f32 bit, tipping P's bf16 rounding by a step: u_bf16 of Σ p·|v| / l <= 1, |v| <= 1)
            let allowed = 2.0 / 256.0 * (x.abs().max(y.abs()) + 1.0);
            assert!((x - y).abs() <= allowed, "b{b} h{h} tq{tq} s{s} dh{dh} o[{i}]: gpu {x} vs emu {y}");
        }
        for (i, (x, y)) in gl.iter().zip(&el).enumerate() {
            assert!(x == y || (x - y).abs() <= 1e-4 * (1.0 + y.abs()), "lse[{i}]: gpu {x} vs emu {y}");
        }
    }
}
