//! Learning-rate schedule: linear warm-up from 0, then linear or half-cosine decay to 0, or constant.

use crate::config::train::{Optim, Schedule};

/// Learning rate for optimiser step `step` (0-based) of `total`.
pub fn learning_rate(o: &Optim, step: usize, total: usize) -> f64 {
    let total = total.max(1) as f64;
    let warmup = (o.warmup_fraction * total).round();
    let s = step as f64 + 1.0;
    if s <= warmup {
        return o.lr * s / warmup;
    }
    let progress = ((s - warmup) / (total - warmup).max(1.0)).clamp(0.0, 1.0);
    match o.schedule {
        Schedule::Constant => o.lr,
        Schedule::Linear => o.lr * (1.0 - progress).max(0.0),
        Schedule::Cosine => o.lr * 0.5 * (1.0 + (std::f64::consts::PI * progress).cos()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn optim(schedule: Schedule) -> Optim {
        Optim {
            lr: 1.0,
            betas: [0.9, 0.999],
            eps: 1e-8,
            weight_decay: 0.0,
            warmup_fraction: 0.1,
            schedule,
            clip_norm: 0.0,
        }
    }

    #[test]
    fn warms_up_then_decays() {
        let o = optim(Schedule::Linear);
        assert!((learning_rate(&o, 0, 100) - 0.1).abs() < 1e-12);
        assert!((learning_rate(&o, 9, 100) - 1.0).abs() < 1e-12);
        assert!((learning_rate(&o, 54, 100) - 0.5).abs() < 1e-12);
        assert!(learning_rate(&o, 99, 100).abs() < 1e-12);
        let c = optim(Schedule::Cosine);
        assert!((learning_rate(&c, 54, 100) - 0.5).abs() < 1e-12);
        assert!((learning_rate(&optim(Schedule::Constant), 80, 100) - 1.0).abs() < 1e-12);
    }
}
