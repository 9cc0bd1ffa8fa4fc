//! Parameter-efficient fine-tuning: the small trainable parts that `finetune.method` adds to a
//! frozen backbone.
//!
//! - `Lora`: a low-rank update `x·A·B·(alpha/r)` beside a frozen projection (Hu et al., 2021,
//!   https://arxiv.org/abs/2106.09685); `B` starts at zero, so training starts from the backbone.
//!   `merge` folds it into the projection's weight.
//! - `Adapter`: a bottleneck `h + up(gelu(down(h)))` after attention and after the feed-forward
//!   network, before the residual sum (Houlsby et al., 2019, https://arxiv.org/abs/1902.00751);
//!   `up` starts at zero, so an adapter starts as the identity. The backbone's LayerNorms train
//!   with the adapters, as in the paper (`Backbone::with_adapters`).
//! - `Prefix`: learned keys and values prepended to every layer's attention (Li & Liang, 2021,
//!   https://arxiv.org/abs/2101.00190), without the reparameterisation MLP.

use super::host::gelu;
use burn::module::{Module, Param};
use burn::nn::{Dropout, DropoutConfig, Initializer, Linear, LinearConfig};
use burn::tensor::backend::Backend;
use burn::tensor::Tensor;

use super::rows::Rows;
use super::{linear, mixed, INIT};

#[derive(Module, Debug)]
pub struct Lora<B: Backend> {
    /// `[d_in, rank]`.
    pub a: Param<Tensor<B, 2>>,
    /// `[rank, d_out]`, zero at the start.
    pub b: Param<Tensor<B, 2>>,
    pub scale: f64,
    pub dropout: Dropout,
}

impl<B: Backend> Lora<B> {
    pub fn new(
        d_in: usize,
        d_out: usize,
        rank: usize,
        alpha: f64,
        dropout: f64,
        device: &B::Device,
    ) -> Self {
        // PEFT's choice: A ~ Kaiming-uniform, B = 0.
        let bound = 1.0 / (d_in as f64).sqrt();
        let a = Initializer::Uniform {
            min: -bound,
            max: bound,
        }
        .init([d_in, rank], device);
        let b = Initializer::Zeros.init([rank, d_out], device);
        Self {
            a,
            b,
            scale: alpha / rank as f64,
            dropout: DropoutConfig::new(dropout).init(),
        }
    }

    /// The update to add to the projection's output for input rows `x` `[rows, d_in]`, the kept
    /// `rows` of the layer's activation.
    pub fn forward(&self, x: Tensor<B, 2>, rows: &Rows<B>) -> Tensor<B, 2> {
        let x = rows.dropout(&self.dropout, x);
        mixed::matmul(mixed::matmul(x, self.a.val()), self.b.val()).mul_scalar(self.scale)
    }

    /// `linear` with this update folded into its weight: same outputs, no extra work.
    pub fn merge(&self, linear: Linear<B>) -> Linear<B> {
        let delta = self.a.val().matmul(self.b.val()).mul_scalar(self.scale);
        let weight = linear.weight.val() + delta;
        Linear {
            weight: Param::from_tensor(weight),
            bias: linear.bias,
        }
    }
}

/// A projection and, when fine-tuning with LoRA, its low-rank update.
pub fn project<B: Backend>(
    linear: &Linear<B>,
    lora: &Option<Lora<B>>,
    x: Tensor<B, 3>,
) -> Tensor<B, 3> {
    by_rows(x, |x| {
        let rows = Rows::all(x.dims()[0]);
        project_rows(linear, lora, x, &rows)
    })
}

/// `project` on the kept `rows` `x` `[rows, d_in]` of a layer's activation.
pub fn project_rows<B: Backend>(
    linear: &Linear<B>,
    lora: &Option<Lora<B>>,
    x: Tensor<B, 2>,
    rows: &Rows<B>,
) -> Tensor<B, 2> {
    match lora {
        Some(l) => mixed::linear(linear, x.clone()) + l.forward(x, rows),
        None => mixed::linear(linear, x),
    }
}

/// `f` applied to `x` `[batch, seq, d]` as one `[batch·seq, d]` matrix, reshaped back.
///
/// A `Linear` on the 3-d tensor is a batched product against a broadcast weight: on the CPU one
/// small gemm per sequence, and its weight gradient materialises `[batch, d_in, d_out]` before
/// summing it. On the rows it is one product each way, which gemm splits across threads.
pub fn by_rows<B: Backend>(
    x: Tensor<B, 3>,
    f: impl FnOnce(Tensor<B, 2>) -> Tensor<B, 2>,
) -> Tensor<B, 3> {
    let [batch, seq, d] = x.dims();
    let y = f(x.reshape([batch * seq, d]));
    let d_out = y.dims()[1];
    y.reshape([batch, seq, d_out])
}

#[derive(Module, Debug)]
pub struct Adapter<B: Backend> {
    pub down: Linear<B>,
    pub up: Linear<B>,
}

impl<B: Backend> Adapter<B> {
    pub fn new(d_model: usize, size: usize, device: &B::Device) -> Self {
        Self {
            down: linear(d_model, size, device),
            up: LinearConfig::new(size, d_model)
                .with_initializer(Initializer::Zeros)
                .init(device),
        }
    }

    /// `h` `[rows, d]`.
    pub fn forward(&self, h: Tensor<B, 2>) -> Tensor<B, 2> {
        h.clone() + mixed::linear(&self.up, gelu(mixed::linear(&self.down, h)))
    }
}

#[derive(Module, Debug)]
pub struct Prefix<B: Backend> {
    /// `[length, d_model]`, split into heads like the projected keys.
    pub keys: Param<Tensor<B, 2>>,
    pub values: Param<Tensor<B, 2>>,
}

impl<B: Backend> Prefix<B> {
    pub fn new(length: usize, d_model: usize, device: &B::Device) -> Self {
        Self {
            keys: INIT.init([length, d_model], device),
            values: INIT.init([length, d_model], device),
        }
    }

    pub fn length(&self) -> usize {
        self.keys.dims()[0]
    }

    /// `[batch, heads, length, d_head]` keys and values.
    pub fn heads(&self, batch: usize, heads: usize) -> (Tensor<B, 4>, Tensor<B, 4>) {
        let [length, d_model] = self.keys.dims();
        let split = |p: Tensor<B, 2>| {
            p.reshape([1, length, heads, d_model / heads])
                .swap_dims(1, 2)
                .repeat_dim(0, batch)
        };
        (split(self.keys.val()), split(self.values.val()))
    }
}
