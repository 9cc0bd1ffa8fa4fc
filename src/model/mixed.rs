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
//!
//! The same per-thread settings record whether the backend computes on the host (the CPU), where
//! projections, attention, GELU, the heads' split and merge (`model::host`), AdamW's update
//! (`train::adamw`) and dropout's masks (`model::dropout`) take a path of their own.

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
    /// Whether the thread's backend computes on the host (the CPU backend). Set the same way.
    static HOST: Cell<bool> = const { Cell::new(false) };
}

/// Records whether the calling thread's backend computes on the host (`true`: the CPU backend).
/// The one switch for everything that takes a host path: projections, attention, GELU, the heads'
/// split and merge (`model::host`), AdamW's update, and dropout's masks (`dropout::draw_on_host`).
pub fn set_host(on: bool) {
    HOST.with(|h| h.set(on));
    super::dropout::draw_on_host(on);
}

/// Whether the calling thread's backend computes on the host.
pub fn on_host() -> bool {
    HOST.with(Cell::get)
}

/// Sets the calling thread's compute type for products (`None`: the tensors' own type).
pub fn set_compute(dtype: Option<FloatDType>) {
    COMPUTE.with(|c| c.set(dtype));
}

/// The calling thread's compute type for products.
pub fn compute() -> Option<FloatDType> {
    COMPUTE.with(Cell::get)
}

/// `layer.forward(x)` for `x` `[rows, d_in]`, computed in the compute type and returned in f32
/// under mixed precision.
pub fn linear<B: Backend>(layer: &Linear<B>, x: Tensor<B, 2>) -> Tensor<B, 2> {
    let Some(half) = compute() else {
        return super::host::linear(layer, x);
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
        // On the host, attention is burn's products around a softmax computed in one pass per
        // row (`host::attention`), in training and evaluation alike. The CPU backend's own
        // kernel first copies the queries, keys and values (views that `swap_dims` left
        // strided) element by element: 23% of an evaluation's samples in a profile. The
        // products read the views as they are.
        None if on_host() => super::host::attention(q, k, v, mask, options),
        None => attention(q, k, v, Some(mask), None, options),
        Some(half) => {
            let (q, k, v) = (q.cast(half), k.cast(half), v.cast(half));
            attention(q, k, v, Some(mask), None, options).cast(FloatDType::F32)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::{Distribution, TensorData};

    type Cpu = crate::train::backend::Cpu;

    /// Attention composed of products on the host computes what the CPU backend's kernel does,
    /// on strided views as `SelfAttention` passes them, with padding masked and causally.
    #[test]
    fn host_attention_is_the_backends() {
        let _rng = crate::model::rng_lock();
        let device = Default::default();
        let [batch, seq, heads, d_head] = [3, 6, 2, 4];
        Cpu::seed(&device, 7);
        let view = || {
            Tensor::<Cpu, 4>::random(
                [batch, seq, heads, d_head],
                Distribution::Normal(0.0, 1.0),
                &device,
            )
            .swap_dims(1, 2)
        };
        let (q, k, v) = (view(), view(), view());
        // Row 1 has two padded positions, row 2 one.
        let pad: Vec<bool> = (0..batch * seq)
            .map(|i| (i / seq == 1 && i % seq >= 4) || (i / seq == 2 && i % seq == 5))
            .collect();
        let mask = Tensor::<Cpu, 2, Bool>::from_data(TensorData::new(pad, [batch, seq]), &device)
            .reshape([batch, 1, 1, seq])
            .expand([batch, heads, seq, seq]);
        for is_causal in [false, true] {
            let options = AttentionModuleOptions {
                scale: None,
                softcap: None,
                is_causal,
            };
            let run = |host| {
                set_host(host);
                let out = attend(q.clone(), k.clone(), v.clone(), mask.clone(), options);
                set_host(false);
                out.into_data().to_vec::<f32>().unwrap_or_default()
            };
            let (host, kernel) = (run(true), run(false));
            assert_eq!(host.len(), batch * heads * seq * d_head);
            let worst = host
                .iter()
                .zip(&kernel)
                .map(|(a, b)| (a - b).abs())
                .fold(0.0f32, f32::max);
            assert!(worst < 1e-5, "causal {is_causal}: differs by {worst}");
        }
    }
}
