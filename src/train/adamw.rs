//! AdamW, with its update computed in one pass where the tensors live on the host.
//!
//! burn's `AdamW` updates a parameter in about fifteen tensor operations (two moments, their
//! bias corrections, the square root, the quotient, the decay, the step), each a pass over the
//! parameter with a buffer of its own. On the CPU backend that was 5% of the samples of both a
//! length-batched MLM pretraining and a fine-tuning (`perf`, one thread; batches of short
//! headlines against three million parameters). On a thread that computes on the host
//! (`model::mixed::on_host`, the CPU backend) the same arithmetic runs here as one loop over the
//! parameter, its gradient and its two moments, in place, runs of it spread over rayon's pool: the
//! CPU backend hands a tensor's buffer over without a copy when nothing else holds it. Each
//! element goes through the same f32 operations in the same order as burn's, so the numbers are
//! the same to the bit. On a GPU every step is burn's.
//!
//! The state is burn's `AdamWState`, so checkpoints hold what they held before.

use burn::module::AutodiffModule;
use burn::optim::adaptor::OptimizerAdaptor;
use burn::optim::grad_clipping::GradientClippingConfig;
use burn::optim::{AdamWConfig, AdamWState, AdaptiveMomentumState, LearningRate, SimpleOptimizer};
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{DType, Tensor, TensorData};
use rayon::prelude::*;

use crate::config::train::Optim;

/// AdamW as configured by `[….optim]`: burn's, or the same arithmetic in one pass on the host.
#[derive(Clone)]
pub struct AdamW {
    burn: burn::optim::AdamW,
    beta_1: f32,
    beta_2: f32,
    epsilon: f32,
    weight_decay: f32,
}

/// The optimiser of a stage: AdamW with `o`'s settings and gradient clipping.
pub fn adamw<B: AutodiffBackend, M: AutodiffModule<B>>(o: &Optim) -> OptimizerAdaptor<AdamW, M, B> {
    let optim = OptimizerAdaptor::from(AdamW::new(o));
    match o.clip_norm > 0.0 {
        true => optim.with_grad_clipping(GradientClippingConfig::Norm(o.clip_norm as f32).init()),
        false => optim,
    }
}

impl AdamW {
    fn new(o: &Optim) -> Self {
        let (beta_1, beta_2) = (o.betas[0] as f32, o.betas[1] as f32);
        let (epsilon, weight_decay) = (o.eps as f32, o.weight_decay as f32);
        let burn = AdamWConfig::new()
            .with_beta_1(beta_1)
            .with_beta_2(beta_2)
            .with_epsilon(epsilon)
            .with_weight_decay(weight_decay)
            .build();
        AdamW {
            burn,
            beta_1,
            beta_2,
            epsilon,
            weight_decay,
        }
    }
}

impl<B: Backend> SimpleOptimizer<B> for AdamW {
    type State<const D: usize> = AdamWState<B, D>;

    fn step<const D: usize>(
        &self,
        lr: LearningRate,
        tensor: Tensor<B, D>,
        grad: Tensor<B, D>,
        state: Option<Self::State<D>>,
    ) -> (Tensor<B, D>, Option<Self::State<D>>) {
        let host = crate::model::mixed::on_host()
            && tensor.dtype() == DType::F32
            && grad.dtype() == DType::F32;
        if !host {
            return SimpleOptimizer::<B>::step(&self.burn, lr, tensor, grad, state);
        }
        let device = tensor.device();
        let shape = tensor.shape();
        let mut param = tensor.into_data();
        let grad = grad.into_data();
        let (time, moments) = match state {
            Some(s) => (
                s.momentum.time + 1,
                Some((
                    s.momentum.moment_1.into_data(),
                    s.momentum.moment_2.into_data(),
                )),
            ),
            None => (1, None),
        };
        let (mut m, mut v) = match moments {
            Some(mv) => mv,
            // The first step sets the moments from the gradient alone, as burn's does; these
            // buffers are only written.
            None => {
                let zeros = || TensorData::zeros::<f32, _>(shape.clone());
                (zeros(), zeros())
            }
        };
        let back = |data: TensorData| Tensor::<B, D>::from_data(data, (&device, DType::F32));
        let constants = Constants::new(self, lr, time);
        let slices = (
            param.as_mut_slice::<f32>(),
            grad.as_slice::<f32>(),
            m.as_mut_slice::<f32>(),
            v.as_mut_slice::<f32>(),
        );
        if let (Ok(p), Ok(g), Ok(m), Ok(v)) = slices {
            constants.update(p, g, m, v, time == 1);
        } else {
            // A buffer that does not read as f32 slices (never seen): burn's arithmetic instead.
            let state = (time > 1).then(|| AdamWState {
                momentum: AdaptiveMomentumState {
                    time: time - 1,
                    moment_1: back(m),
                    moment_2: back(v),
                    max_moment_2: None,
                },
            });
            return SimpleOptimizer::<B>::step(&self.burn, lr, back(param), back(grad), state);
        }
        let state = AdamWState {
            momentum: AdaptiveMomentumState {
                time,
                moment_1: back(m),
                moment_2: back(v),
                max_moment_2: None,
            },
        };
        (back(param), Some(state))
    }

    fn to_device<const D: usize>(state: Self::State<D>, device: &B::Device) -> Self::State<D> {
        <burn::optim::AdamW as SimpleOptimizer<B>>::to_device(state, device)
    }
}

/// One step's scalars, each the f32 burn's operations would use.
struct Constants {
    beta_1: f32,
    beta_2: f32,
    factor_1: f32,
    factor_2: f32,
    correction_1: f32,
    correction_2: f32,
    epsilon: f32,
    /// `1 - lr·weight_decay`, `None` without weight decay (burn then leaves the tensor as is).
    keep: Option<f32>,
    lr: f32,
}

impl Constants {
    fn new(o: &AdamW, lr: LearningRate, time: usize) -> Self {
        let decay = lr * o.weight_decay as f64;
        Constants {
            beta_1: o.beta_1,
            beta_2: o.beta_2,
            factor_1: 1.0 - o.beta_1,
            factor_2: 1.0 - o.beta_2,
            correction_1: 1f32 - o.beta_1.powi(time as i32),
            correction_2: 1f32 - o.beta_2.powi(time as i32),
            epsilon: o.epsilon,
            keep: (decay != 0.0).then_some((1.0 - decay) as f32),
            lr: lr as f32,
        }
    }

    /// Updates the parameter `p` and the moments `m`, `v` from the gradient `g` in place, runs
    /// of `RUN` elements spread over rayon's pool (each element's arithmetic is its own, so the
    /// split changes no number). `first`: the moments hold nothing yet.
    fn update(&self, p: &mut [f32], g: &[f32], m: &mut [f32], v: &mut [f32], first: bool) {
        /// Elements per task: below two runs, the calling thread updates the parameter alone.
        const RUN: usize = 1 << 14;
        if p.len() < 2 * RUN {
            return self.update_run(p, g, m, v, first);
        }
        p.par_chunks_mut(RUN)
            .zip(g.par_chunks(RUN))
            .zip(m.par_chunks_mut(RUN))
            .zip(v.par_chunks_mut(RUN))
            .for_each(|(((p, g), m), v)| self.update_run(p, g, m, v, first));
    }

    /// `update` of one run of elements, on the calling thread.
    fn update_run(&self, p: &mut [f32], g: &[f32], m: &mut [f32], v: &mut [f32], first: bool) {
        let c = self;
        for (((p, &g), m), v) in p.iter_mut().zip(g).zip(m.iter_mut()).zip(v.iter_mut()) {
            let square = g * g;
            if first {
                *m = g * c.factor_1;
                *v = square * c.factor_2;
            } else {
                *m = *m * c.beta_1 + g * c.factor_1;
                *v = *v * c.beta_2 + square * c.factor_2;
            }
            let delta = (*m / c.correction_1) / ((*v / c.correction_2).sqrt() + c.epsilon);
            let decayed = match c.keep {
                Some(keep) => *p * keep,
                None => *p,
            };
            *p = decayed - delta * c.lr;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::train::backend::Cpu;

    /// Values spread over a few orders of magnitude and both signs, with exact zeros among them.
    fn values(n: usize, seed: u64) -> Vec<f32> {
        let mut x = seed;
        (0..n)
            .map(|i| {
                x = x
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                let unit = (x >> 40) as f32 / (1u64 << 24) as f32 - 0.5;
                if i % 97 == 0 {
                    0.0
                } else {
                    unit * 10f32.powi((i % 5) as i32 - 3)
                }
            })
            .collect()
    }

    fn bits(t: &Tensor<Cpu, 2>) -> Vec<u32> {
        let data = t.to_data();
        data.as_slice::<f32>()
            .map(|s| s.iter().map(|x| x.to_bits()).collect())
            .unwrap_or_default()
    }

    /// Three steps on the host give burn's parameters and moments to the bit, with weight decay
    /// and without, for a parameter the calling thread updates alone and one spread over the
    /// pool.
    #[test]
    fn the_host_update_is_burns_to_the_bit() {
        let device = Default::default();
        for (shape, weight_decay) in [([7, 300], 0.01), ([7, 300], 0.0), ([70, 1000], 0.01)] {
            let o = crate::config::train::OptimSection {
                weight_decay: Some(weight_decay),
                ..Default::default()
            }
            .resolve(1e-3);
            let optim = AdamW::new(&o);
            let mut runs = Vec::new();
            for host in [false, true] {
                crate::model::mixed::set_host(host);
                let tensor = |seed| {
                    Tensor::<Cpu, 2>::from_data(
                        TensorData::new(values(shape[0] * shape[1], seed), shape),
                        &device,
                    )
                };
                let (mut param, mut state) = (tensor(1), None);
                for step in 0..3u64 {
                    let lr = 1e-3 * (step + 1) as f64;
                    (param, state) =
                        SimpleOptimizer::<Cpu>::step(&optim, lr, param, tensor(10 + step), state);
                }
                let state = state.map(|s| s.momentum);
                let moments = state.map(|s| (s.time, bits(&s.moment_1), bits(&s.moment_2)));
                runs.push((bits(&param), moments));
            }
            crate::model::mixed::set_host(false);
            assert_eq!(runs[0].1.as_ref().map(|m| m.0), Some(3));
            assert_eq!(runs[0].0.len(), shape[0] * shape[1]);
            assert_eq!(runs[0], runs[1], "{shape:?}, weight decay {weight_decay}");
        }
    }
}
