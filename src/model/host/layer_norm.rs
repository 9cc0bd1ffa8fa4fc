//! LayerNorm (Ba et al., 2016) and its gradients in one pass per row, on every core.
//!
//! Under autodiff, burn composes LayerNorm of nine operations (the mean, its subtraction, the
//! squares, their mean, epsilon, the square root, the division, the scale and the shift), each a
//! pass over the activations on the calling thread, and its autodiff runs the gradient of each.
//! In a bert-mini MLM step those were about a quarter of the training thread's samples, the pool
//! idle meanwhile. Here the forward pass normalises each row in one pass and the backward pass
//! computes `(ĝ − mean(ĝ) − x̂ · mean(ĝ ⊙ x̂)) / σ` for each row (`ĝ = g ⊙ γ`), rows spread over
//! rayon's pool, and the scale's and shift's gradients are sums over the rows, columns spread over
//! the pool. The expressions are burn's (the biased variance, `σ = √(var + ε)`, a division by
//! it); only the order of the sums differs, so the numbers agree with burn's to rounding, not to
//! the bit. Outside training (the CPU backend without autodiff) the backend's own fused
//! LayerNorm runs, as it does without this module; types other than f32 take burn's composition.

use std::sync::Arc;

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops};
use burn::backend::flex::FlexTensor;
use burn::module::Param;
use burn::nn::LayerNorm;
use burn::tensor::backend::Backend;
use burn::tensor::ops::{FloatTensor, ModuleOps};
use burn::tensor::{Tensor, TensorData};

use super::{columns, contiguous, on_cpu, primitive, rows_and, tracked_by};
use crate::train::backend::{Cpu, CpuTrain};

/// `norm.forward(x)`, normalising over the last dimension; `eps` is the module's epsilon (which
/// burn's `LayerNorm` keeps private: the caller passes the one it configured).
pub fn layer_norm<B: Backend, const D: usize>(
    norm: &LayerNorm<B>,
    eps: f64,
    x: Tensor<B, D>,
) -> Tensor<B, D> {
    let gamma = || norm.gamma.val();
    let beta = || norm.beta.as_ref().map(Param::val);
    let train = |x: FloatTensor<CpuTrain>| {
        let g = primitive::<CpuTrain, B, 1>(gamma());
        let b = beta().map(primitive::<CpuTrain, B, 1>);
        tracked(x, g, b, eps)
    };
    let plain = |x: FlexTensor| {
        let g = primitive::<Cpu, B, 1>(gamma());
        let b = beta().map(primitive::<Cpu, B, 1>);
        Cpu::layer_norm(x, g, b, eps)
    };
    on_cpu(x, train, plain).unwrap_or_else(|x| norm.forward(x))
}

fn tracked(
    x: FloatTensor<CpuTrain>,
    gamma: FloatTensor<CpuTrain>,
    beta: Option<FloatTensor<CpuTrain>>,
    eps: f64,
) -> FloatTensor<CpuTrain> {
    let b = beta.as_ref().map(|b| &b.primitive);
    let Some((out, state)) = forward(&x.primitive, &gamma.primitive, b, eps as f32) else {
        return CpuTrain::layer_norm(x, gamma, beta, eps);
    };
    match &beta {
        Some(b) => tracked_by(Norm, [&x, &gamma, b], || (out, state)),
        None => tracked_by(Norm, [&x, &gamma], || (out, state)),
    }
}

/// What the backward pass reads: the input and each row's mean and `σ`, from which it computes
/// `x̂` again as the forward pass did.
#[derive(Clone, Debug)]
struct State {
    /// The input, contiguous.
    x: FlexTensor,
    /// `(mean, σ = √(var + ε))` of each row.
    stats: Arc<Vec<(f32, f32)>>,
    gamma: FlexTensor,
}

/// `x̂` of a value `v` of a row with `mean` and `sigma`: burn's `(x − mean) / σ`.
fn normed(v: f32, mean: f32, sigma: f32) -> f32 {
    (v - mean) / sigma
}

/// The output and what the backward pass reads; `None` where `x`, `gamma` or `beta` is not f32
/// or their widths differ (burn's composition takes those).
fn forward(
    x: &FlexTensor,
    gamma: &FlexTensor,
    beta: Option<&FlexTensor>,
    eps: f32,
) -> Option<(FlexTensor, State)> {
    let shape = x.layout().shape().clone();
    let d = *shape.last().filter(|&&d| d > 0)?;
    let x = contiguous(x);
    let values = x.as_slice::<f32>()?;
    let scale = gamma.as_slice::<f32>().filter(|g| g.len() == d)?;
    let shift = match beta {
        Some(b) => Some(b.as_slice::<f32>().filter(|b| b.len() == d)?),
        None => None,
    };
    let mut out = vec![0.0f32; values.len()];
    let mut stats = vec![(0.0f32, 0.0f32); values.len() / d];
    let inv = 1.0 / d as f32;
    rows_and(&mut out, d, &mut stats, |r, row, (mean, sigma)| {
        let x = &values[r * d..(r + 1) * d];
        *mean = x.iter().sum::<f32>() * inv;
        let var = x.iter().map(|v| (v - *mean) * (v - *mean)).sum::<f32>() * inv;
        *sigma = (var + eps).sqrt();
        for (j, (o, &v)) in row.iter_mut().zip(x).enumerate() {
            let y = normed(v, *mean, *sigma) * scale[j];
            *o = match shift {
                Some(b) => y + b[j],
                None => y,
            };
        }
    });
    let state = State {
        x,
        stats: Arc::new(stats),
        gamma: gamma.clone(),
    };
    Some((FlexTensor::from_data(TensorData::new(out, shape)), state))
}

#[derive(Debug)]
struct Norm;

impl<const N: usize> Backward<Cpu, N> for Norm {
    type State = State;

    fn backward(self, ops: Ops<Self::State, N>, grads: &mut Gradients, _: &mut Checkpointer) {
        let grad = grads.consume::<Cpu>(&ops.node);
        let State { x, stats, gamma } = ops.state;
        let mut parents = ops.parents.into_iter();
        let (node_x, node_gamma, node_beta) = (parents.next(), parents.next(), parents.next());
        let shape = x.layout().shape().clone();
        // `x` starts its buffer (`contiguous`), which may hold more than `x`: a view of the first
        // rows of a larger tensor. `gamma` is read as the forward pass read it, `d` values.
        let values: &[f32] = &x.storage()[..shape.num_elements()];
        let grad = contiguous(&grad);
        let g: &[f32] = &grad.storage()[..values.len()];
        let scale: &[f32] = gamma.as_slice().unwrap_or_default();
        let d = scale.len();
        if let Some(Some(node)) = node_x {
            let mut dx = vec![0.0f32; values.len()];
            let inv = 1.0 / d as f32;
            super::rows(&mut dx, d, |r, row| {
                let (g, x) = (&g[r * d..(r + 1) * d], &values[r * d..(r + 1) * d]);
                let (mean, sigma) = stats[r];
                let (mut a, mut b) = (0.0f32, 0.0f32);
                for j in 0..d {
                    let gh = g[j] * scale[j];
                    a += gh;
                    b += gh * normed(x[j], mean, sigma);
                }
                let (a, b) = (a * inv, b * inv);
                for j in 0..d {
                    row[j] = (g[j] * scale[j] - a - normed(x[j], mean, sigma) * b) / sigma;
                }
            });
            grads.register::<Cpu>(node.id, FlexTensor::from_data(TensorData::new(dx, shape)));
        }
        let sums = |weighted: bool| {
            let mut out = vec![0.0f32; d];
            columns(&mut out, values.len(), |first, sums| {
                for (r, &(mean, sigma)) in stats.iter().enumerate() {
                    let at = r * d + first;
                    let (g, x) = (&g[at..at + sums.len()], &values[at..at + sums.len()]);
                    for (c, s) in sums.iter_mut().enumerate() {
                        *s += if weighted {
                            g[c] * normed(x[c], mean, sigma)
                        } else {
                            g[c]
                        };
                    }
                }
            });
            FlexTensor::from_data(TensorData::new(out, [d]))
        };
        if let Some(Some(node)) = node_gamma {
            grads.register::<Cpu>(node.id, sums(true));
        }
        if let Some(Some(node)) = node_beta {
            grads.register::<Cpu>(node.id, sums(false));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::assert_close;
    use super::*;
    use burn::module::{AutodiffModule, Module};
    use burn::nn::LayerNormConfig;
    use burn::tensor::Distribution;

    /// LayerNorm here gives burn's output and gradients (input, scale, shift) to rounding: on
    /// rows few enough for the calling thread and many enough for the pool, on a 3-d input, a
    /// transposed view and a view of the first rows, with BERT's epsilon and xrun's, with trained
    /// (not unit) scale and shift, with the module frozen, and outside autodiff.
    #[test]
    fn layer_norm_and_its_gradients_are_burns() {
        let _rng = crate::model::rng_lock();
        let device = Default::default();
        CpuTrain::seed(&device, 13);
        let values = |t: Tensor<CpuTrain, 2>| t.into_data().to_vec::<f32>().unwrap_or_default();
        let grad = |g: Option<Tensor<Cpu, 2>>| {
            g.map(|g| g.into_data().to_vec::<f32>().unwrap_or_default())
        };
        let grad1 = |g: Option<Tensor<Cpu, 1>>| {
            g.map(|g| g.into_data().to_vec::<f32>().unwrap_or_default())
        };
        for ([rows, d], eps) in [([6, 5], 1e-12), ([900, 256], 1e-5)] {
            let mut norm = LayerNormConfig::new(d)
                .with_epsilon(eps)
                .init::<CpuTrain>(&device);
            // A trained scale and shift, not ones and zeros.
            let trained = |mean| {
                let t =
                    Tensor::<CpuTrain, 1>::random([d], Distribution::Normal(mean, 0.5), &device);
                Param::from_tensor(t)
            };
            norm.gamma = trained(1.0);
            norm.beta = Some(trained(0.0));
            let input =
                Tensor::<CpuTrain, 2>::random([rows, d], Distribution::Normal(1.0, 3.0), &device);
            let weights =
                Tensor::<CpuTrain, 2>::random([rows, d], Distribution::Normal(0.0, 1.0), &device);
            for frozen in [false, true] {
                let norm = if frozen {
                    norm.clone().no_grad()
                } else {
                    norm.clone()
                };
                let run = |host: bool| {
                    crate::model::mixed::set_host(host);
                    let x = input.clone().require_grad();
                    let y = layer_norm(&norm, eps, x.clone());
                    // The same rows as a 3-d tensor, and a transposed view's.
                    let three = layer_norm(&norm, eps, x.clone().reshape([2, rows / 2, d]))
                        .reshape([rows, d]);
                    let t = input.clone().transpose().require_grad();
                    let yt = layer_norm(&norm, eps, t.clone().transpose());
                    // The first half of the rows: a view at offset 0 of a larger buffer.
                    let head = layer_norm(&norm, eps, x.clone().slice(0..rows / 2));
                    let eval = layer_norm(&norm.valid(), eps, input.clone().inner());
                    let loss = (y.clone() * weights.clone()).sum()
                        + (three.clone() * weights.clone()).sum()
                        + (yt.clone() * weights.clone()).sum()
                        + (head.clone() * weights.clone().slice(0..rows / 2)).sum();
                    let grads = loss.backward();
                    crate::model::mixed::set_host(false);
                    let outputs = [y, three, yt, Tensor::from_inner(eval), head].map(values);
                    let g = norm.gamma.grad(&grads);
                    let b = norm.beta.as_ref().and_then(|b| b.grad(&grads));
                    let grads = [
                        grad(x.grad(&grads)),
                        grad(t.grad(&grads)),
                        grad1(g),
                        grad1(b),
                    ];
                    (outputs, grads)
                };
                let (host, burn) = (run(true), run(false));
                let case = format!("[{rows}, {d}], ε {eps}, frozen {frozen}");
                let lengths = [rows * d, rows * d, rows * d, rows * d, rows / 2 * d];
                for ((h, b), n) in host.0.iter().zip(&burn.0).zip(lengths) {
                    assert_eq!(h.len(), n, "{case}");
                    assert_close(h, b, &case);
                }
                for (i, (h, b)) in host.1.iter().zip(&burn.1).enumerate() {
                    assert_eq!(h.is_some(), b.is_some(), "{case}: gradient {i}");
                    assert_eq!(h.is_some(), i < 2 || !frozen, "{case}: gradient {i}");
                    if let (Some(h), Some(b)) = (h, b) {
                        assert_close(h, b, &format!("{case}: gradient {i}"));
                    }
                }
            }
        }
    }
}
