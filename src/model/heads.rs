//! Heads on top of the backbone: a language-model head that scores only the positions it is asked
//! about (masked positions for MLM, non-pad positions for AR — never the full `[batch, seq, vocab]`),
//! and a classification head on a pooled vector.

use burn::module::Module;
use burn::nn::{Dropout, DropoutConfig, LayerNorm, LayerNormConfig, Linear, LinearConfig};
use std::ops::Range;

use burn::tensor::backend::Backend;
use burn::tensor::{Bool, Int, Tensor};

use super::host::{gelu, layer_norm, target_log_probs};
use super::pieces::{max_buffer, pieces, ELEMENT_BYTES};
use super::{linear, mixed, INIT};

/// BERT's MLM head (dense → GELU → LayerNorm → vocabulary projection), used for AR as well; a
/// GPT-2 import has the projection alone, without bias.
#[derive(Module, Debug)]
pub struct LmHead<B: Backend> {
    pub dense: Option<Linear<B>>,
    pub norm: Option<LayerNorm<B>>,
    pub decoder: Linear<B>,
    /// The LayerNorm's epsilon (see `Block::norm_eps`); not part of the record.
    pub norm_eps: f64,
}

impl<B: Backend> LmHead<B> {
    /// `transform`: BERT's layout (dense, LayerNorm, projection with bias); else GPT-2's.
    pub fn new(
        d_model: usize,
        vocab_size: usize,
        transform: bool,
        norm_eps: f64,
        device: &B::Device,
    ) -> Self {
        let dense = transform.then(|| linear(d_model, d_model, device));
        let norm = transform.then(|| {
            LayerNormConfig::new(d_model)
                .with_epsilon(norm_eps)
                .init(device)
        });
        Self {
            dense,
            norm,
            decoder: LinearConfig::new(d_model, vocab_size)
                .with_initializer(INIT)
                .with_bias(transform)
                .init(device),
            norm_eps,
        }
    }

    /// `h`: `[n, d]`, the backbone's rows at the positions to score. Returns `[n, vocab]`.
    pub fn forward(&self, mut h: Tensor<B, 2>) -> Tensor<B, 2> {
        if let Some(dense) = &self.dense {
            h = gelu(mixed::linear(dense, h));
        }
        if let Some(norm) = &self.norm {
            h = layer_norm(norm, self.norm_eps, h);
        }
        mixed::linear(&self.decoder, h)
    }

    /// Log-probabilities `[n]` of `targets` `[n]` given the backbone's rows `hidden` `[n, d]` at
    /// their positions. The `[n, vocab]` logits are computed a number of positions at a time
    /// where they would not fit one device buffer.
    pub fn target_log_probs(
        &self,
        hidden: Tensor<B, 2>,
        targets: Tensor<B, 1, Int>,
    ) -> Tensor<B, 1> {
        let scored = |hidden, targets| target_log_probs(self.forward(hidden), targets);
        let [n] = targets.dims();
        // `lazy_shape`: reading the shape must not initialise a lazy parameter, which would draw
        // its weights out of turn and change what a seed gives.
        let row = self.decoder.weight.lazy_shape()[1] as u64 * ELEMENT_BYTES;
        let parts = pieces(n, row, max_buffer());
        if parts.len() == 1 {
            return scored(hidden, targets);
        }
        let cut = |r: &Range<usize>| {
            let h = hidden.clone().narrow(0, r.start, r.len());
            scored(h, targets.clone().narrow(0, r.start, r.len()))
        };
        Tensor::cat(parts.iter().map(cut).collect(), 0)
    }
}

/// How a sequence becomes one vector for classification.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pool {
    /// The first token (`[CLS]`).
    First,
    /// The last non-pad token (`[SEP]`): the only one that has seen the whole text under a causal mask.
    Last,
    /// The mean over non-pad tokens.
    Mean,
}

#[derive(Module, Debug)]
pub struct ClassifierHead<B: Backend> {
    pub dropout: Dropout,
    pub output: Linear<B>,
}

impl<B: Backend> ClassifierHead<B> {
    /// `bias`: false for GPT-2's bias-free `score` projection.
    pub fn new(
        d_model: usize,
        classes: usize,
        dropout: f64,
        bias: bool,
        device: &B::Device,
    ) -> Self {
        Self {
            dropout: DropoutConfig::new(dropout).init(),
            output: LinearConfig::new(d_model, classes)
                .with_initializer(INIT)
                .with_bias(bias)
                .init(device),
        }
    }

    /// `pooled`: `[batch, d]`, one vector per sequence. Returns logits `[batch, classes]`.
    /// A BERT `pooler` (dense + tanh) applies to the pooled vector first.
    pub fn forward(&self, mut pooled: Tensor<B, 2>, pooler: Option<&Linear<B>>) -> Tensor<B, 2> {
        if let Some(dense) = pooler {
            pooled = mixed::linear(dense, pooled).tanh();
        }
        self.forward_rows(pooled)
    }

    /// Logits `[n, classes]` of the backbone's rows `[n, d]` (token classification: the rows at
    /// the tagged positions).
    pub fn forward_rows(&self, rows: Tensor<B, 2>) -> Tensor<B, 2> {
        mixed::linear(&self.output, super::dropout::forward(&self.dropout, rows))
    }
}

impl Pool {
    /// The row (flat index into `batch * seq`) each sequence is read at, `[batch]`; `None` for
    /// `Mean`, which reads every row.
    pub fn rows<B: Backend>(self, pad: &Tensor<B, 2, Bool>) -> Option<Tensor<B, 1, Int>> {
        let [batch, seq] = pad.dims();
        let device = pad.device();
        let starts = Tensor::<B, 1, Int>::arange(0..batch as i64, &device) * (seq as i64);
        match self {
            Pool::First => Some(starts),
            Pool::Last => {
                // The last non-pad token of each row.
                let lengths = pad.clone().bool_not().int().sum_dim(1).reshape([batch]);
                Some(starts + lengths - 1)
            }
            Pool::Mean => None,
        }
    }
}

/// The mean of `hidden` `[batch, seq, d]` over each sequence's non-pad tokens, `[batch, d]`.
pub fn mean_pool<B: Backend>(hidden: Tensor<B, 3>, pad: Tensor<B, 2, Bool>) -> Tensor<B, 2> {
    let [batch, seq, d] = hidden.dims();
    let keep = pad.bool_not().float(); // [batch, seq], 1 at real tokens
    let weights = keep.clone().reshape([batch, seq, 1]);
    let summed = (hidden * weights).sum_dim(1).reshape([batch, d]);
    summed / keep.sum_dim(1).clamp_min(1.0)
}
