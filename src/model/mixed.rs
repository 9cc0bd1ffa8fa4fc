//! Mixed precision (`experiment.precision = "bf16-mixed"`): matrix products and attention in a
//! half type, everything else in f32.
//!
//! Burn has no autocast. Here the parameters, gradients and AdamW's moments stay f32 (the "master
//! weights"), and so do the residual stream, LayerNorm, GELU, dropout, softmax over a vocabulary
//! and every loss. Each projection casts its input, weight and bias to the half type, multiplies
//! there and casts the result back; attention does the same with its queries, keys and values.
//! This is the split PyTorch's autocast makes. A cast's gradient is cast back to f32 by burn's
//! autodiff, so a weight's update is computed and applied in f32 and small updates are not lost
//! to bf16's 8-bit significand, as they are in pure bf16.
//!
//! With no half type set, which is every f32 and pure bf16/f16 run, each function here is exactly
//! the plain operation.

use std::cell::Cell;

use burn::nn::Linear;
use burn::tensor::backend::Backend;
use burn::tensor::module::{attention, linear as linear_op};
use burn::tensor::ops::AttentionModuleOptions;
use burn::tensor::{Bool, FloatDType, Tensor};

thread_local! {
    /// The half type products are computed in, `None` for none. Per thread, like the buffer
    /// limit in `pieces`: the thread that starts a backend builds every tensor operation it runs.
    static COMPUTE: Cell<Option<FloatDType>> = const { Cell::new(None) };
}

/// Sets the calling thread's compute type for products (`None`: the tensors' own type).
pub fn set_compute(dtype: Option<FloatDType>) {
    COMPUTE.with(|c| c.set(dtype));
}

/// The calling thread's compute type for products.
pub fn compute() -> Option<FloatDType> {
    COMPUTE.with(Cell::get)
}

/// `layer.forward(x)`, computed in the compute type and returned in f32 under mixed precision.
pub fn linear<B: Backend, const D: usize>(layer: &Linear<B>, x: Tensor<B, D>) -> Tensor<B, D> {
    let Some(half) = compute() else {
        return layer.forward(x);
    };
    let weight = layer.weight.val().cast(half);
    let bias = layer.bias.as_ref().map(|b| b.val().cast(half));
    linear_op(x.cast(half), weight, bias).cast(FloatDType::F32)
}

/// `x · w`, computed in the compute type and returned in f32 under mixed precision.
pub fn matmul<B: Backend>(x: Tensor<B, 2>, w: Tensor<B, 2>) -> Tensor<B, 2> {
    match compute() {
        None => x.matmul(w),
        Some(half) => x.cast(half).matmul(w.cast(half)).cast(FloatDType::F32),
    }
}

/// Scaled dot-product attention, computed in the compute type and returned in f32 under mixed
/// precision.
pub fn attend<B: Backend>(
    q: Tensor<B, 4>,
    k: Tensor<B, 4>,
    v: Tensor<B, 4>,
    mask: Tensor<B, 4, Bool>,
    options: AttentionModuleOptions,
) -> Tensor<B, 4> {
    match compute() {
        None => attention(q, k, v, Some(mask), None, options),
        Some(half) => {
            let (q, k, v) = (q.cast(half), k.cast(half), v.cast(half));
            attention(q, k, v, Some(mask), None, options).cast(FloatDType::F32)
        }
    }
}
