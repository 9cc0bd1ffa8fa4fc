//! GELU (exact form) and its gradient, on every core.
//!
//! burn's CPU backend computes both one element at a time on the calling thread: an `erf` each,
//! and an `exp` more in the gradient. In a bert-mini MLM step that was 19% of the training
//! thread's samples, the pool idle meanwhile. Here rayon's pool computes them, with the backend's
//! own expressions, operation for operation (its `erf`, libm's, and the same `exp`), so every
//! number is the same to the bit. A tensor that is not a contiguous f32 one takes the backend's
//! function.

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{unary, Backward, Ops};
use burn::backend::flex::ops::unary::erf_f32;
use burn::backend::flex::FlexTensor;
use burn::tensor::backend::Backend;
use burn::tensor::ops::ActivationOps;
use burn::tensor::{Tensor, TensorData};

use super::{map, on_cpu, tracked, zip_map};
use crate::train::backend::Cpu;

/// `0.5 · x · (1 + erf(x / √2))` (Hendrycks & Gimpel, 2016), burn's `gelu`.
pub fn gelu<B: Backend, const D: usize>(x: Tensor<B, D>) -> Tensor<B, D> {
    let train = |t| tracked(Gelu, t, |p| (forward(&p), p));
    on_cpu(x, train, |t| forward(&t)).unwrap_or_else(burn::tensor::activation::gelu)
}

/// GELU of `x`'s values.
fn forward(x: &FlexTensor) -> FlexTensor {
    let sqrt2 = core::f32::consts::SQRT_2;
    match x.as_slice::<f32>() {
        Some(values) => like(x, map(values, |x| 0.5 * x * (1.0 + erf_f32(x / sqrt2)))),
        None => Cpu::gelu(x.clone()),
    }
}

/// `grad` times GELU's derivative at `x`.
fn backward(x: &FlexTensor, grad: FlexTensor) -> FlexTensor {
    let sqrt2 = core::f32::consts::SQRT_2;
    let inv_sqrt_2pi = 1.0 / (2.0 * core::f32::consts::PI).sqrt();
    let same_shape = x.layout().shape() == grad.layout().shape();
    match (x.as_slice::<f32>(), grad.as_slice::<f32>()) {
        (Some(xs), Some(gs)) if same_shape => {
            let d = zip_map(xs, gs, |x, g| {
                let cdf = 0.5 * (1.0 + erf_f32(x / sqrt2));
                let pdf = inv_sqrt_2pi * (-0.5 * x * x).exp();
                g * (cdf + x * pdf)
            });
            like(x, d)
        }
        _ => Cpu::gelu_backward(x.clone(), grad),
    }
}

/// `values` in a tensor of `x`'s shape.
fn like(x: &FlexTensor, values: Vec<f32>) -> FlexTensor {
    FlexTensor::from_data(TensorData::new(values, x.layout().shape().clone()))
}

#[derive(Debug)]
struct Gelu;

impl Backward<Cpu, 1> for Gelu {
    /// The input.
    type State = FlexTensor;

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let x = ops.state;
        unary::<Cpu, _>(ops.parents, ops.node, grads, |grad| backward(&x, grad));
    }
}

#[cfg(test)]
mod tests {
    use super::super::bits;
    use super::*;
    use crate::train::backend::CpuTrain;
    use burn::tensor::Distribution;

    /// GELU and its gradient here are burn's to the bit, on tensors large enough for the pool to
    /// split and small enough for the calling thread, on a view the backend computes itself, and
    /// outside autodiff.
    #[test]
    fn gelu_is_burns_to_the_bit() {
        let _rng = crate::model::rng_lock();
        let device = Default::default();
        CpuTrain::seed(&device, 5);
        for [rows, cols] in [[3, 7], [96, 1024]] {
            let input = Tensor::<CpuTrain, 2>::random(
                [rows, cols],
                Distribution::Normal(0.0, 3.0),
                &device,
            );
            let weights =
                Tensor::<CpuTrain, 2>::random([rows, cols], Distribution::Default, &device);
            let run = |host: bool| {
                crate::model::mixed::set_host(host);
                let x = input.clone().require_grad();
                let y = gelu(x.clone());
                // A transposed view: the backend's own GELU.
                let t = gelu(input.clone().transpose()).transpose();
                let eval = gelu(input.clone().inner());
                let loss = (y.clone() * weights.clone()).sum();
                let grads = loss.backward();
                crate::model::mixed::set_host(false);
                let grad = x.grad(&grads).map(bits);
                let eval = Tensor::<CpuTrain, 2>::from_inner(eval);
                (bits(y), bits(t), bits(eval), grad)
            };
            let (host, burn) = (run(true), run(false));
            assert_eq!(host.0.len(), rows * cols);
            assert!(host.3.as_ref().is_some_and(|g| g.len() == rows * cols));
            assert_eq!(host, burn, "[{rows}, {cols}]");
        }
    }
}
