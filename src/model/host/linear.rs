//! Projections `x · W + b` and their gradients, gemm writing straight into each output.
//!
//! burn's CPU backend builds a product's output zeroed and then copies it into a buffer of its
//! runtime's alignment before gemm writes it: two passes over every projection's output, and
//! over each gradient's, on the training thread while the pool waits. Its bias is a broadcast sum
//! and the bias gradient a sum over rows, on that thread too. In a bert-mini MLM step those were
//! about a third of the training thread's samples (`perf`, per thread). Here gemm is called as
//! the backend calls it (the same strides, the same threshold for the pool) but writes into a
//! buffer nothing has cleared; the bias is added and its gradient summed on the pool, each column
//! in the backend's order. Every number is the backend's, to the bit. Tensors that are not f32
//! matrices take the backend's functions.

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops};
use burn::backend::flex::FlexTensor;
use burn::module::Param;
use burn::nn::Linear;
use burn::tensor::backend::Backend;
use burn::tensor::ops::{FloatTensor, ModuleOps};
use burn::tensor::{DType, Tensor, TensorData};

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

/// A 2-d f32 tensor as gemm reads it: its values from its first, and its strides.
struct Matrix<'a> {
    values: &'a [f32],
    rows: usize,
    cols: usize,
    row_stride: isize,
    col_stride: isize,
}

impl<'a> Matrix<'a> {
    /// `t` as a matrix; `None` where it is not a 2-d f32 tensor with strides of at least zero.
    fn of(t: &'a FlexTensor) -> Option<Self> {
        let layout = t.layout();
        let (shape, strides) = (layout.shape(), layout.strides());
        if t.dtype() != DType::F32 || shape.num_dims() != 2 || strides.iter().any(|&s| s < 0) {
            return None;
        }
        let values = t.storage::<f32>().get(layout.start_offset()..)?;
        let (rows, cols) = (shape[0], shape[1]);
        // The last value gemm reads lies inside the storage.
        let last = (rows.saturating_sub(1) * strides[0] as usize)
            + (cols.saturating_sub(1) * strides[1] as usize);
        (rows * cols == 0 || last < values.len()).then_some(Self {
            values,
            rows,
            cols,
            row_stride: strides[0],
            col_stride: strides[1],
        })
    }

    /// The transpose: the same values, strides swapped.
    fn t(&self) -> Self {
        Self {
            values: self.values,
            rows: self.cols,
            cols: self.rows,
            row_stride: self.col_stride,
            col_stride: self.row_stride,
        }
    }
}

/// Products below this many multiply-adds stay on the calling thread: the backend's threshold.
const POOL_PRODUCT: usize = 192 * 192 * 192;

/// `lhs · rhs` (`[m, k] · [k, n]`), row-major `[m, n]`, by the gemm call the backend makes.
fn product(lhs: &Matrix, rhs: &Matrix) -> Vec<f32> {
    let (m, k, n) = (lhs.rows, lhs.cols, rhs.cols);
    assert_eq!(k, rhs.rows, "a product's inner dimensions");
    let len = m * n;
    if len == 0 {
        return Vec::new();
    }
    let parallelism = if m.saturating_mul(n).saturating_mul(k) >= POOL_PRODUCT {
        gemm::Parallelism::Rayon(0)
    } else {
        gemm::Parallelism::None
    };
    let mut out = Vec::<f32>::with_capacity(len);
    // SAFETY: `Matrix::of` checked that every value gemm reads of `lhs` and `rhs` lies in their
    // slices; `out` has room for the `m · n` values written with row stride `n`. With `read_dst`
    // false, gemm writes each value of `out` (zeros where `k` is 0) and reads none it has not
    // written, so every value is set when the length is.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            out.as_mut_ptr(),
            1,
            n as isize,
            false,
            lhs.values.as_ptr(),
            lhs.col_stride,
            lhs.row_stride,
            rhs.values.as_ptr(),
            rhs.col_stride,
            rhs.row_stride,
            0.0,
            1.0,
            false,
            false,
            false,
            parallelism,
        );
        out.set_len(len);
    }
    out
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
            let row = r as isize * g.row_stride;
            for (c, s) in sums.iter_mut().enumerate() {
                *s += g.values[(row + (first + c) as isize * g.col_stride) as usize];
            }
        }
    });
    out
}

#[cfg(test)]
mod tests {
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
        let bits = |t: Tensor<CpuTrain, 2>| -> Vec<u32> {
            let values = t.into_data().to_vec::<f32>().unwrap_or_default();
            values.iter().map(|v| v.to_bits()).collect()
        };
        let grad_bits = |g: Option<Tensor<Cpu, 2>>| {
            g.map(|g| {
                let values = g.into_data().to_vec::<f32>().unwrap_or_default();
                values.iter().map(|v| v.to_bits()).collect::<Vec<_>>()
            })
        };
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
                        let w = grad_bits(layer.weight.grad(&grads));
                        let b = layer.bias.as_ref().and_then(|b| b.grad(&grads)).map(|g| {
                            let v = g.into_data().to_vec::<f32>().unwrap_or_default();
                            v.iter().map(|v| v.to_bits()).collect::<Vec<_>>()
                        });
                        let eval = Tensor::<CpuTrain, 2>::from_inner(eval);
                        (
                            bits(y),
                            bits(yt),
                            bits(eval),
                            grad_bits(x.grad(&grads)),
                            grad_bits(t.grad(&grads)),
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
