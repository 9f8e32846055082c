//! Learning-rate schedules: linear warm-up, then constant, linear or cosine decay to zero.
//!
//! For 0-based step `s` of `T` with `W` warm-up steps: `s < W` gives `lr·(s+1)/W`; after it,
//! linear gives `lr·(T−s)/(T−W)` and cosine `lr·½(1+cos(π(s−W)/(T−W)))`.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ScheduleKind {
    Constant,
    #[default]
    Linear,
    Cosine,
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LrSchedule {
    pub kind: ScheduleKind,
    pub peak_lr: f64,
    pub warmup_steps: u64,
    pub total_steps: u64,
}

impl LrSchedule {
    /// The learning rate of 0-based optimizer step `step`.
    pub fn lr(&self, step: u64) -> f64 {
        let w = self.warmup_steps;
        if step < w {
            return self.peak_lr * (step + 1) as f64 / w as f64;
        }
        let span = self.total_steps.saturating_sub(w).max(1) as f64;
        let done = (step - w) as f64;
        let factor = match self.kind {
            ScheduleKind::Constant => 1.0,
            ScheduleKind::Linear => ((span - done) / span).max(0.0),
            ScheduleKind::Cosine => 0.5 * (1.0 + (std::f64::consts::PI * (done / span).min(1.0)).cos()),
        };
        self.peak_lr * factor
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn warmup_then_decay() {
        let s = LrSchedule { kind: ScheduleKind::Linear, peak_lr: 1.0, warmup_steps: 4, total_steps: 14 };
        assert_eq!(s.lr(0), 0.25);
        assert_eq!(s.lr(3), 1.0);
        assert_eq!(s.lr(4), 1.0);
        assert!((s.lr(9) - 0.5).abs() < 1e-12);
        assert!((s.lr(13) - 0.1).abs() < 1e-12);
        let c = LrSchedule { kind: ScheduleKind::Cosine, ..s };
        assert!((c.lr(9) - 0.5).abs() < 1e-12);
        assert!(c.lr(13) < 0.03);
        let k = LrSchedule { kind: ScheduleKind::Constant, ..s };
        assert_eq!(k.lr(13), 1.0);
    }
}
