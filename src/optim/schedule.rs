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

/// The learning-rate schedules `train` offers, each stepped once per epoch as the official code
/// steps its scheduler.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Schedule {
    /// One cosine period over the whole run, down to lr/100 (reclmis' default).
    Cosine,
    /// The official QaTa-COV19 configuration (`lr = 'cosineLR'`): CosineAnnealingWarmRestarts with
    /// T_0 = 10, T_mult = 1, eta_min = 1e-4.
    Restarts,
    /// The official MosMedData+ configuration (`lr = 'exp'`): LambdaLR(max(0.99^epoch, 0.1)).
    Exp,
}

impl Schedule {
    pub const NAMES: [&'static str; 3] = ["cosine", "restarts", "exp"];

    pub fn parse(s: &str) -> crate::error::Result<Schedule> {
        match s {
            "cosine" => Ok(Schedule::Cosine),
            "restarts" => Ok(Schedule::Restarts),
            "exp" => Ok(Schedule::Exp),
            other => Err(crate::error::Error::Config(format!("--schedule {other:?}: one of {:?}", Self::NAMES))),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Schedule::Cosine => "cosine",
            Schedule::Restarts => "restarts",
            Schedule::Exp => "exp",
        }
    }

    /// The learning rate of `epoch` (0-based) of an `epochs`-long run starting at `lr0`.
    pub fn lr(self, lr0: f64, epoch: usize, epochs: usize) -> f64 {
        match self {
            Schedule::Cosine => CosineWarmRestarts { lr0, t0: epochs, t_mult: 1, eta_min: lr0 / 100.0 }.lr(epoch),
            Schedule::Restarts => CosineWarmRestarts { lr0, t0: 10, t_mult: 1, eta_min: 1e-4 }.lr(epoch),
            Schedule::Exp => lr0 * Exponential { lr0: 1.0, gamma: 0.99 }.lr(epoch).max(0.1),
        }
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
    fn official_schedules() {
        // QaTa: 3e-4 falls to 1e-4 over 10 epochs and restarts
        assert_eq!(Schedule::Restarts.lr(3e-4, 0, 2000), 3e-4);
        assert!((Schedule::Restarts.lr(3e-4, 5, 2000) - 2e-4).abs() < 1e-15);
        assert_eq!(Schedule::Restarts.lr(3e-4, 10, 2000), 3e-4);
        // MosMedData+: 0.99^epoch, floored at a tenth (epoch 229 is the first below 0.1)
        assert!((Schedule::Exp.lr(3e-4, 1, 400) - 2.97e-4).abs() < 1e-15);
        assert_eq!(Schedule::Exp.lr(3e-4, 300, 400), 3e-4 * 0.1);
        assert_eq!(Schedule::Cosine.lr(1e-3, 0, 30), 1e-3);
        for n in Schedule::NAMES {
            assert_eq!(Schedule::parse(n).unwrap().name(), n);
        }
    }

    #[test]
    fn exponential_like_torch() {
        let s = Exponential { lr0: 2.0, gamma: 0.5 };
        assert_eq!(s.lr(0), 2.0);
        assert_eq!(s.lr(3), 0.25);
    }
}
