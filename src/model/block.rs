//! One Transformer layer: multi-head self-attention and a GELU feed-forward network, each wrapped in a
//! residual connection with LayerNorm before (pre-norm) or after (post-norm) it.

use burn::module::Module;
use burn::nn::{Dropout, DropoutConfig, LayerNorm, LayerNormConfig, Linear, LinearConfig};
use burn::tensor::activation::gelu;
use burn::tensor::backend::Backend;
use burn::tensor::module::attention;
use burn::tensor::ops::AttentionModuleOptions;
use burn::tensor::{Bool, Tensor};

use super::INIT;

pub struct BlockConfig {
    pub d_model: usize,
    pub heads: usize,
    pub d_ff: usize,
    pub dropout: f64,
    pub pre_norm: bool,
}

/// Scaled dot-product attention over `heads` heads (Vaswani et al., 2017, §3.2).
#[derive(Module, Debug)]
pub struct SelfAttention<B: Backend> {
    pub query: Linear<B>,
    pub key: Linear<B>,
    pub value: Linear<B>,
    pub output: Linear<B>,
    pub heads: usize,
}

#[derive(Module, Debug)]
pub struct FeedForward<B: Backend> {
    pub up: Linear<B>,
    pub down: Linear<B>,
}

#[derive(Module, Debug)]
pub struct Block<B: Backend> {
    pub attention: SelfAttention<B>,
    pub feed_forward: FeedForward<B>,
    pub norm_attention: LayerNorm<B>,
    pub norm_feed_forward: LayerNorm<B>,
    pub dropout: Dropout,
    pub pre_norm: bool,
}

fn linear<B: Backend>(d_in: usize, d_out: usize, device: &B::Device) -> Linear<B> {
    LinearConfig::new(d_in, d_out)
        .with_initializer(INIT)
        .init(device)
}

impl BlockConfig {
    pub fn init<B: Backend>(&self, device: &B::Device) -> Block<B> {
        let d = self.d_model;
        Block {
            attention: SelfAttention {
                query: linear(d, d, device),
                key: linear(d, d, device),
                value: linear(d, d, device),
                output: linear(d, d, device),
                heads: self.heads,
            },
            feed_forward: FeedForward {
                up: linear(d, self.d_ff, device),
                down: linear(self.d_ff, d, device),
            },
            norm_attention: LayerNormConfig::new(d).init(device),
            norm_feed_forward: LayerNormConfig::new(d).init(device),
            dropout: DropoutConfig::new(self.dropout).init(),
            pre_norm: self.pre_norm,
        }
    }
}

impl<B: Backend> SelfAttention<B> {
    /// `x`: `[batch, seq, d_model]`; `mask`: `[batch, heads, seq, seq]`, true where a key is hidden.
    pub fn forward(&self, x: Tensor<B, 3>, mask: Tensor<B, 4, Bool>, causal: bool) -> Tensor<B, 3> {
        let [batch, seq, d_model] = x.dims();
        let d_head = d_model / self.heads;
        // [batch, seq, d_model] → [batch, heads, seq, d_head]
        let split = |y: Tensor<B, 3>| y.reshape([batch, seq, self.heads, d_head]).swap_dims(1, 2);
        let q = split(self.query.forward(x.clone()));
        let k = split(self.key.forward(x.clone()));
        let v = split(self.value.forward(x));
        let options = AttentionModuleOptions {
            scale: None,
            softcap: None,
            is_causal: causal,
        };
        let context = attention(q, k, v, Some(mask), None, options);
        // [batch, heads, seq, d_head] → [batch, seq, d_model]
        let context = context.swap_dims(1, 2).reshape([batch, seq, d_model]);
        self.output.forward(context)
    }
}

impl<B: Backend> FeedForward<B> {
    pub fn forward(&self, x: Tensor<B, 3>) -> Tensor<B, 3> {
        self.down.forward(gelu(self.up.forward(x)))
    }
}

impl<B: Backend> Block<B> {
    pub fn forward(&self, x: Tensor<B, 3>, mask: Tensor<B, 4, Bool>, causal: bool) -> Tensor<B, 3> {
        if self.pre_norm {
            let h = self.norm_attention.forward(x.clone());
            let x = x + self
                .dropout
                .forward(self.attention.forward(h, mask, causal));
            let h = self.norm_feed_forward.forward(x.clone());
            x.clone() + self.dropout.forward(self.feed_forward.forward(h))
        } else {
            let a = self.attention.forward(x.clone(), mask, causal);
            let x = self.norm_attention.forward(x + self.dropout.forward(a));
            let f = self.feed_forward.forward(x.clone());
            self.norm_feed_forward.forward(x + self.dropout.forward(f))
        }
    }
}
