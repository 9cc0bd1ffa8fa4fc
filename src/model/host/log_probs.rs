//! The language-model head's log-probabilities of its targets, in one pass per row, on every core.
//!
//! burn computes `log_softmax(logits).gather(targets)` as six operations over the `[rows,
//! vocab]` logits on the calling thread (row maxima, subtraction, `exp`, row sums, `log`,
//! subtraction), keeps `[rows, vocab]` log-probabilities only to gather one value per row, and
//! its autodiff runs the gradient of each (the gather's scatters a `[rows, vocab]` one-hot).
//! With 21,128 tokens in the vocabulary, `exp` alone was 12% of the training thread's samples in
//! a bert-mini MLM step after attention's softmax moved to the pool. Here each row's maximum `m`
//! and sum `S = Σ exp(x − m)` are computed in one pass, rows spread over rayon's pool, and the
//! output is `(x_target − m) − ln S`, burn's expressions; the backward pass writes
//! `g · (1[j = target] − exp(x_j − m) / S)` in one more. Only the order of the row sums differs
//! from burn's, so the numbers agree to rounding.

use std::sync::Arc;

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{unary, Backward, Ops};
use burn::backend::flex::FlexTensor;
use burn::tensor::activation::log_softmax;
use burn::tensor::backend::Backend;
use burn::tensor::{DType, Int, Tensor, TensorData};
use rayon::prelude::*;

use super::{contiguous, cpu, on_cpu, on_host, rows, tracked, GRAIN};
use crate::train::backend::Cpu;

/// `log_softmax(logits, 1)` at `targets`: `logits` `[n, vocab]`, `targets` `[n]`; returns `[n]`.
pub fn target_log_probs<B: Backend>(
    logits: Tensor<B, 2>,
    targets: Tensor<B, 1, Int>,
) -> Tensor<B, 1> {
    let [n, vocab] = logits.dims();
    if !(on_host() && cpu::<B>() && logits.dtype() == DType::F32) {
        return log_softmax(logits, 1)
            .gather(1, targets.reshape([n, 1]))
            .reshape([n]);
    }
    let targets: Arc<[usize]> = targets
        .into_data()
        .iter::<i64>()
        .map(|t| match usize::try_from(t) {
            Ok(t) if t < vocab => t,
            _ => panic!("target id {t} is outside the vocabulary of {vocab} tokens"),
        })
        .collect();
    let train = |t| {
        tracked(TargetLogProbs, t, |x| {
            let x = contiguous(&x);
            let (out, stats) = forward(&x, &targets, vocab);
            let state = State {
                logits: x,
                targets: targets.clone(),
                stats,
            };
            (out, state)
        })
    };
    let plain = |x| forward(&contiguous(&x), &targets, vocab).0;
    on_cpu::<B, 2, 1>(logits, train, plain)
        .unwrap_or_else(|_| unreachable!("`B` is `Cpu` or `CpuTrain`, on the host"))
}

/// The log-probabilities `[n]` of `targets` under the rows of `x` (contiguous `[n, vocab]`), and
/// each row's maximum and sum of `exp(x − max)`.
fn forward(x: &FlexTensor, targets: &[usize], vocab: usize) -> (FlexTensor, Arc<[(f32, f32)]>) {
    let x: &[f32] = &x.storage()[..targets.len() * vocab];
    let row = |r: usize| {
        let x = &x[r * vocab..(r + 1) * vocab];
        let max = x.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b));
        let sum: f32 = x.iter().map(|&v| (v - max).exp()).sum();
        ((x[targets[r]] - max) - sum.ln(), (max, sum))
    };
    let min_rows = GRAIN.div_ceil(vocab.max(1));
    let (out, stats): (Vec<f32>, Vec<(f32, f32)>) = if targets.len() * vocab < 2 * GRAIN {
        (0..targets.len()).map(row).unzip()
    } else {
        (0..targets.len())
            .into_par_iter()
            .with_min_len(min_rows)
            .map(row)
            .unzip()
    };
    let n = out.len();
    let out = FlexTensor::from_data(TensorData::new(out, [n]));
    (out, stats.into())
}

/// What the backward pass keeps: the logits, the targets, and each row's maximum and sum.
#[derive(Debug, Clone)]
struct State {
    logits: FlexTensor,
    targets: Arc<[usize]>,
    stats: Arc<[(f32, f32)]>,
}

#[derive(Debug)]
struct TargetLogProbs;

impl Backward<Cpu, 1> for TargetLogProbs {
    type State = State;

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let State {
            logits,
            targets,
            stats,
        } = ops.state;
        unary::<Cpu, _>(ops.parents, ops.node, grads, |grad| {
            let grad = contiguous(&grad);
            let g: &[f32] = &grad.storage()[..targets.len()];
            let vocab = logits.layout().shape()[1];
            let x: &[f32] = &logits.storage()[..targets.len() * vocab];
            let mut out = vec![0.0f32; x.len()];
            rows(&mut out, vocab, |r, d| {
                let (max, sum) = stats[r];
                let x = &x[r * vocab..(r + 1) * vocab];
                for (d, &x) in d.iter_mut().zip(x) {
                    *d = -g[r] * ((x - max).exp() / sum);
                }
                d[targets[r]] += g[r];
            });
            FlexTensor::from_data(TensorData::new(out, [targets.len(), vocab]))
        });
    }
}

#[cfg(test)]
mod tests {
    use super::super::assert_close;
    use super::*;
    use crate::train::backend::CpuTrain;
    use burn::tensor::Distribution;

    /// The log-probabilities of the targets and the logits' gradient are burn's composition's to
    /// rounding, outside autodiff too, on rows few enough for the calling thread and many enough
    /// for the pool; a target outside the vocabulary is an error naming it.
    #[test]
    fn target_log_probs_and_their_gradient_are_burns() {
        let _rng = crate::model::rng_lock();
        let device = Default::default();
        CpuTrain::seed(&device, 9);
        for [n, vocab] in [[3, 11], [40, 3000]] {
            let logits =
                Tensor::<CpuTrain, 2>::random([n, vocab], Distribution::Normal(0.0, 4.0), &device);
            let ids: Vec<i64> = (0..n as i64).map(|r| (r * 7919) % vocab as i64).collect();
            let targets = Tensor::<CpuTrain, 1, Int>::from_data(TensorData::new(ids, [n]), &device);
            let weights = Tensor::<CpuTrain, 1>::random([n], Distribution::Default, &device);
            let run = |host: bool| {
                crate::model::mixed::set_host(host);
                let x = logits.clone().require_grad();
                let lp = target_log_probs(x.clone(), targets.clone());
                let eval = target_log_probs(logits.clone().inner(), targets.clone().inner());
                let grads = (lp.clone() * weights.clone()).sum().backward();
                crate::model::mixed::set_host(false);
                let values = |d: TensorData| d.to_vec::<f32>().unwrap_or_default();
                let grad = x.grad(&grads).map(|g| values(g.into_data()));
                [
                    values(lp.into_data()),
                    values(eval.into_data()),
                    grad.unwrap_or_default(),
                ]
            };
            let (host, burn) = (run(true), run(false));
            for ((h, b), what) in host
                .iter()
                .zip(&burn)
                .zip(["output", "evaluation", "gradient"])
            {
                assert_close(h, b, &format!("{what}, [{n}, {vocab}]"));
            }
        }
        crate::model::mixed::set_host(true);
        let logits = Tensor::<Cpu, 2>::zeros([2, 5], &device);
        let targets =
            Tensor::<Cpu, 1, Int>::from_data(TensorData::new(vec![1i64, 5], [2]), &device);
        let outside = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            target_log_probs(logits, targets)
        }));
        crate::model::mixed::set_host(false);
        let message = outside.err().and_then(|e| e.downcast::<String>().ok());
        assert_eq!(
            message.as_deref().map(String::as_str),
            Some("target id 5 is outside the vocabulary of 5 tokens")
        );
    }
}
