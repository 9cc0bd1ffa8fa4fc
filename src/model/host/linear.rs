//! Projections `x · W + b` and their gradients, gemm writing straight into each output.
//!
//! burn's CPU backend builds a product's output zeroed and then copies it into a buffer of its
//! runtime's alignment before gemm writes it: two passes over every projection's output, and
//! over each gradient's, on the training thread while the pool waits. Its bias is a broadcast sum
//! and the bias gradient a sum over rows, on that thread too. In a bert-mini MLM step those were
//! about a third of the training thread's samples (`perf`, per thread). Here the products are
//! `matmul::product`'s, gemm writing into a buffer nothing has cleared; the bias is added and its
//! gradient summed on the pool, each column in the backend's order. Every number is the
//! backend's, to the bit. Tensors that are not f32 matrices take the backend's functions.

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops};
use burn::backend::flex::FlexTensor;
use burn::module::Param;
use burn::nn::Linear;
use burn::tensor::backend::Backend;
use burn::tensor::ops::{FloatTensor, ModuleOps};
use burn::tensor::{Tensor, TensorData};

use super::matmul::{product, Matrix};
use super::{columns, on_cpu, primitive, rows, tracked_by};
use crate::train::backend::{Cpu, CpuTrain};

/// `layer.forward(x)` for `x` `[rows, d_in]`.
pub fn linear<B: Backend>(layer: &Linear<B>, x: Tensor<B, 2>) -> Tensor<B, 2> {
    let weight = || layer.weight.val();
    let bias = || layer.bias.as_ref().map(Param::val);
    let train = |x: FloatTensor<CpuTrain>| {
        let w = primitive::<CpuTrain, B, 2>(weight());
        let b = bias().map(primitive::<CpuTrain, B, 1>);
        tracked(x, w, b)
    };
    let plain = |x: FlexTensor| {
        let w = primitive::<Cpu, B, 2>(weight());
        let b = bias().map(primitive::<Cpu, B, 1>);
        forward(&x, &w, b.as_ref())
    };
    on_cpu(x, train, plain).unwrap_or_else(|x| layer.forward(x))
}

/// The projection as an operation of burn's autodiff; what its backward pass keeps is what the
/// gradients that are asked for read (burn's `linear` keeps the same).
fn tracked(
    x: FloatTensor<CpuTrain>,
    w: FloatTensor<CpuTrain>,
    b: Option<FloatTensor<CpuTrain>>,
) -> FloatTensor<CpuTrain> {
    let state = State {
        x: w.is_tracked().then(|| x.primitive.clone()),
        w: x.is_tracked().then(|| w.primitive.clone()),
    };
    let run = || forward(&x.primitive, &w.primitive, b.as_ref().map(|b| &b.primitive));
    match &b {
        Some(b) => tracked_by(Project, [&x, &w, b], || (run(), state)),
        None => tracked_by(Project, [&x, &w], || (run(), state)),
    }
}

/// `x · w + b`.
fn forward(x: &FlexTensor, w: &FlexTensor, b: Option<&FlexTensor>) -> FlexTensor {
    let bias = match b {
        Some(b) => match b.as_slice::<f32>() {
            Some(values) if b.layout().shape().num_dims() == 1 => Some(values),
            _ => return Cpu::linear(x.clone(), w.clone(), Some(b.clone())),
        },
        None => None,
    };
    let (Some(lhs), Some(rhs)) = (Matrix::of(x), Matrix::of(w)) else {
        return Cpu::linear(x.clone(), w.clone(), b.cloned());
    };
    if lhs.cols != rhs.rows || bias.is_some_and(|b| b.len() != rhs.cols) {
        return Cpu::linear(x.clone(), w.clone(), b.cloned());
    }
    let mut out = product(&lhs, &rhs);
    if let Some(bias) = bias {
        // The backend's broadcast sum, `(x · w) + b` in f32, each value alone.
        rows(&mut out, rhs.cols, |_, row| {
            row.iter_mut().zip(bias).for_each(|(v, b)| *v += b);
        });
    }
    matrix(out, lhs.rows, rhs.cols)
}

#[derive(Debug)]
struct Project;

#[derive(Clone, Debug)]
struct State {
    /// The input, where the weight's gradient is asked for.
    x: Option<FlexTensor>,
    /// The weight, where the input's gradient is asked for.
    w: Option<FlexTensor>,
}

impl<const N: usize> Backward<Cpu, N> for Project {
    type State = State;

    fn backward(self, ops: Ops<Self::State, N>, grads: &mut Gradients, _: &mut Checkpointer) {
        let grad = grads.consume::<Cpu>(&ops.node);
        let mut parents = ops.parents.into_iter();
        let (x, w, b) = (parents.next(), parents.next(), parents.next());
        let State {
            x: input,
            w: weight,
        } = ops.state;
        let g = Matrix::of(&grad);
        if let (Some(Some(node)), Some(weight)) = (x, &weight) {
            let d = match (&g, Matrix::of(weight)) {
                (Some(g), Some(w)) => matrix(product(g, &w.t()), g.rows, w.rows),
                _ => Cpu::linear_x_backward(weight.clone(), grad.clone()),
            };
            grads.register::<Cpu>(node.id, d);
        }
        if let (Some(Some(node)), Some(input)) = (w, &input) {
            let d = match (&g, Matrix::of(input)) {
                (Some(g), Some(x)) => matrix(product(&x.t(), g), x.cols, g.cols),
                _ => Cpu::linear_weight_backward(input.clone(), grad.clone()),
            };
            grads.register::<Cpu>(node.id, d);
        }
        if let Some(Some(node)) = b {
            let d = match &g {
                Some(g) => FlexTensor::from_data(TensorData::new(column_sums(g), [g.cols])),
                None => Cpu::linear_bias_backward(grad.clone()),
            };
            grads.register::<Cpu>(node.id, d);
        }
    }
}

/// Row-major `values` as a `[rows, cols]` tensor.
fn matrix(values: Vec<f32>, rows: usize, cols: usize) -> FlexTensor {
    FlexTensor::from_data(TensorData::new(values, [rows, cols]))
}

/// The sum of each column of `g`, its rows added in order from zero, as the backend sums them;
/// columns spread over the pool.
fn column_sums(g: &Matrix) -> Vec<f32> {
    let mut out = vec![0.0f32; g.cols];
    columns(&mut out, g.rows * g.cols, |first, sums| {
        for r in 0..g.rows {
            for (c, s) in sums.iter_mut().enumerate() {
                *s += g.at(r, first + c);
            }
        }
    });
    out
}

#[cfg(test)]
mod tests {
    use super::super::bits;
    use super::*;
    use burn::module::{AutodiffModule, Module};
    use burn::nn::LinearConfig;
    use burn::tensor::Distribution;

    /// A projection here gives the backend's output and gradients (input, weight and bias) to
    /// the bit: rows few enough for the calling thread and many enough for the pool, with and
    /// without bias, on a transposed view, with the weight frozen, and outside autodiff.
    #[test]
    fn projections_are_burns_to_the_bit() {
        let _rng = crate::model::rng_lock();
        let device = Default::default();
        CpuTrain::seed(&device, 11);
        for [rows, d_in, d_out] in [[5, 3, 4], [600, 256, 192]] {
            for bias in [true, false] {
                let layer = LinearConfig::new(d_in, d_out)
                    .with_bias(bias)
                    .init::<CpuTrain>(&device);
                let input =
                    Tensor::<CpuTrain, 2>::random([rows, d_in], Distribution::Default, &device);
                let weights =
                    Tensor::<CpuTrain, 2>::random([rows, d_out], Distribution::Default, &device);
                for frozen in [false, true] {
                    let layer = if frozen {
                        layer.clone().no_grad()
                    } else {
                        layer.clone()
                    };
                    let run = |host: bool| {
                        crate::model::mixed::set_host(host);
                        let x = input.clone().require_grad();
                        let y = linear(&layer, x.clone());
                        let t = input.clone().transpose().require_grad();
                        let yt = linear(&layer, t.clone().transpose());
                        let eval = linear(&layer.valid(), input.clone().inner());
                        let loss = (y.clone() * weights.clone()).sum()
                            + (yt.clone() * weights.clone()).sum();
                        let grads = loss.backward();
                        crate::model::mixed::set_host(false);
                        let w = layer.weight.grad(&grads).map(bits);
                        let b = layer.bias.as_ref().and_then(|b| b.grad(&grads)).map(bits);
                        let eval = Tensor::<CpuTrain, 2>::from_inner(eval);
                        (
                            bits(y),
                            bits(yt),
                            bits(eval),
                            x.grad(&grads).map(bits),
                            t.grad(&grads).map(bits),
                            w,
                            b,
                        )
                    };
                    let (host, burn) = (run(true), run(false));
                    let case = format!("[{rows}, {d_in}] → {d_out}, bias {bias}, frozen {frozen}");
                    assert_eq!(host.0.len(), rows * d_out, "{case}");
                    assert!(
                        host.3.as_ref().is_some_and(|g| g.len() == rows * d_in),
                        "{case}"
                    );
                    assert_eq!(host.5.is_some(), !frozen, "{case}");
                    assert_eq!(host.6.is_some(), bias && !frozen, "{case}");
                    assert_eq!(host, burn, "{case}");
                }
            }
        }
    }
}
