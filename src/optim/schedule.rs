//! Learning-rate schedules (per epoch, as the official training steps them).

/// torch's CosineAnnealingWarmRestarts: lr = η_min + (lr0 − η_min)·(1 + cos(π·T_cur/T_i))/2,
/// T_i starting at `t0` and multiplied by `t_mult` at each restart.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct CosineWarmRestarts {
    pub lr0: f64,
    pub t0: usize,
    pub t_mult: usize,
    pub eta_min: f64,
}

impl CosineWarmRestarts {
    pub fn lr(&self, epoch: usize) -> f64 {
        let (mut t_cur, mut t_i) = (epoch, self.t0.max(1));
        while t_cur >= t_i {
            t_cur -= t_i;
            t_i *= self.t_mult.max(1);
        }
        self.eta_min
            + (self.lr0 - self.eta_min) * (1.0 + (std::f64::consts::PI * t_cur as f64 / t_i as f64).cos()) / 2.0
    }
}

/// torch's ExponentialLR: lr = lr0·γ^epoch.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Exponential {
    pub lr0: f64,
    pub gamma: f64,
}

impl Exponential {
    pub fn lr(&self, epoch: usize) -> f64 {
        self.lr0 * self.gamma.powi(epoch as i32)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cosine_restarts_like_torch() {
        let s = CosineWarmRestarts { lr0: 1.0, t0: 2, t_mult: 2, eta_min: 0.0 };
        // periods 2, 4, 8: restarts at epochs 2 and 6
        let want = [1.0, 0.5, 1.0, 0.853_553_390_593_273_8, 0.5, 0.146_446_609_406_726_3, 1.0];
        for (e, w) in want.iter().enumerate() {
            assert!((s.lr(e) - w).abs() < 1e-12, "epoch {e}: {} vs {w}", s.lr(e));
        }
    }

    #[test]
    fn exponential_like_torch() {
        let s = Exponential { lr0: 2.0, gamma: 0.5 };
        assert_eq!(s.lr(0), 2.0);
        assert_eq!(s.lr(3), 0.25);
    }
}
