//! One Transformer layer: multi-head self-attention and a GELU feed-forward network, each wrapped in a
//! residual connection with LayerNorm before (pre-norm) or after (post-norm) it.

use burn::module::Module;
use burn::nn::{Dropout, DropoutConfig, LayerNorm, LayerNormConfig, Linear};
use burn::tensor::activation::gelu_approximate;
use burn::tensor::backend::Backend;
use burn::tensor::ops::AttentionModuleOptions;
use burn::tensor::{Bool, Int, Tensor, TensorData};

use std::ops::Range;

use super::host::{gelu, layer_norm, merge_heads, split_heads};
use super::linear;
use super::mixed::attend;
use super::peft::{project, project_rows, Adapter, Lora, Prefix};
use super::pieces::{max_buffer, pieces, ELEMENT_BYTES};
use super::rows::Rows;

pub struct BlockConfig {
    pub d_model: usize,
    pub heads: usize,
    pub d_ff: usize,
    pub dropout: f64,
    pub pre_norm: bool,
    pub norm_eps: f64,
    pub gelu_tanh: bool,
}

/// Scaled dot-product attention over `heads` heads (Vaswani et al., 2017, §3.2).
#[derive(Module, Debug)]
pub struct SelfAttention<B: Backend> {
    pub query: Linear<B>,
    pub key: Linear<B>,
    pub value: Linear<B>,
    pub output: Linear<B>,
    pub heads: usize,
    /// LoRA updates of the projections (`finetune.method = "lora"`).
    pub lora_query: Option<Lora<B>>,
    pub lora_key: Option<Lora<B>>,
    pub lora_value: Option<Lora<B>>,
    pub lora_output: Option<Lora<B>>,
    /// Learned key/value prefixes (`finetune.method = "prefix"`).
    pub prefix: Option<Prefix<B>>,
}

#[derive(Module, Debug)]
pub struct FeedForward<B: Backend> {
    pub up: Linear<B>,
    pub down: Linear<B>,
    pub lora_up: Option<Lora<B>>,
    pub lora_down: Option<Lora<B>>,
    /// GELU's tanh approximation (GPT-2) instead of the exact form.
    pub gelu_tanh: bool,
}

#[derive(Module, Debug)]
pub struct Block<B: Backend> {
    pub attention: SelfAttention<B>,
    pub feed_forward: FeedForward<B>,
    pub norm_attention: LayerNorm<B>,
    pub norm_feed_forward: LayerNorm<B>,
    pub dropout: Dropout,
    pub pre_norm: bool,
    /// The LayerNorms' epsilon, which burn's `LayerNorm` keeps private (`host::layer_norm` reads
    /// it here). Not part of the record: a checkpoint saved before it loads as it did.
    pub norm_eps: f64,
    /// Bottleneck adapters after attention and after the feed-forward network
    /// (`finetune.method = "adapter"`).
    pub adapter_attention: Option<Adapter<B>>,
    pub adapter_feed_forward: Option<Adapter<B>>,
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
                lora_query: None,
                lora_key: None,
                lora_value: None,
                lora_output: None,
                prefix: None,
            },
            feed_forward: FeedForward {
                up: linear(d, self.d_ff, device),
                down: linear(self.d_ff, d, device),
                lora_up: None,
                lora_down: None,
                gelu_tanh: self.gelu_tanh,
            },
            norm_attention: LayerNormConfig::new(d)
                .with_epsilon(self.norm_eps)
                .init(device),
            norm_feed_forward: LayerNormConfig::new(d)
                .with_epsilon(self.norm_eps)
                .init(device),
            dropout: DropoutConfig::new(self.dropout).init(),
            pre_norm: self.pre_norm,
            norm_eps: self.norm_eps,
            adapter_attention: None,
            adapter_feed_forward: None,
        }
    }
}

impl<B: Backend> SelfAttention<B> {
    /// `x` `[batch, seq, d]`. Returns the kept `rows` of the output, `[rows, d]`: every query is
    /// scored, as the keys and values need every row, and the output projection runs on the kept
    /// rows only.
    pub fn forward(
        &self,
        x: Tensor<B, 3>,
        mask: Tensor<B, 4, Bool>,
        causal: bool,
        rows: &Rows<B>,
    ) -> Tensor<B, 2> {
        let [batch, seq, _] = x.dims();
        let split = |y: Tensor<B, 3>| split_heads(y, self.heads);
        let q = split(project(&self.query, &self.lora_query, x.clone()));
        let k = split(project(&self.key, &self.lora_key, x.clone()));
        let v = split(project(&self.value, &self.lora_value, x));
        let (k, v, mask, causal) = match &self.prefix {
            None => (k, v, mask, causal),
            Some(p) => {
                let (pk, pv) = p.heads(batch, self.heads);
                let mask = prefix_mask(mask, p.length(), causal);
                (
                    Tensor::cat(vec![pk, k], 2),
                    Tensor::cat(vec![pv, v], 2),
                    mask,
                    false,
                )
            }
        };
        let options = AttentionModuleOptions {
            scale: None,
            softcap: None,
            is_causal: causal,
        };
        // Scores and mask are `[batch, heads, seq, keys]`: computed a few sequences at a time
        // where they would not fit one device buffer.
        let row = (self.heads * seq * k.dims()[2]) as u64 * ELEMENT_BYTES;
        let parts = pieces(batch, row, max_buffer());
        let context = if parts.len() == 1 {
            attend(q, k, v, mask, options)
        } else {
            let cut = |r: &Range<usize>| {
                let rows = |t: Tensor<B, 4>| t.narrow(0, r.start, r.len());
                let mask = mask.clone().narrow(0, r.start, r.len());
                let (q, k, v) = (rows(q.clone()), rows(k.clone()), rows(v.clone()));
                attend(q, k, v, mask, options)
            };
            Tensor::cat(parts.iter().map(cut).collect(), 0)
        };
        let context = merge_heads(context);
        project_rows(&self.output, &self.lora_output, rows.keep(context), rows)
    }
}

/// The attention mask with `length` prefix keys in front, which every query sees; the causal
/// part is spelled out, since the keys no longer line up with the queries.
fn prefix_mask<B: Backend>(
    mask: Tensor<B, 4, Bool>,
    length: usize,
    causal: bool,
) -> Tensor<B, 4, Bool> {
    let [batch, heads, seq, _] = mask.dims();
    let device = mask.device();
    let visible = Tensor::<B, 4, Int>::zeros([batch, heads, seq, length], &device).equal_elem(1);
    let mask = Tensor::cat(vec![visible, mask], 3);
    if !causal {
        return mask;
    }
    let width = length + seq;
    let future: Vec<bool> = (0..seq)
        .flat_map(|i| (0..width).map(move |j| j >= length && j - length > i))
        .collect();
    let future = Tensor::<B, 2, Bool>::from_data(TensorData::new(future, [seq, width]), &device)
        .reshape([1, 1, seq, width])
        .expand([batch, heads, seq, width]);
    mask.bool_or(future)
}

impl<B: Backend> FeedForward<B> {
    /// `x`: the kept `rows` `[rows, d]` of a layer's activation.
    pub fn forward(&self, x: Tensor<B, 2>, rows: &Rows<B>) -> Tensor<B, 2> {
        // The `[rows, d_ff]` activations, a number of rows at a time where they would not fit one
        // device buffer.
        // `lazy_shape`: reading the shape must not initialise a lazy parameter, which would draw
        // its weights out of turn and change what a seed gives.
        let row = self.up.weight.lazy_shape()[1] as u64 * ELEMENT_BYTES;
        let parts = pieces(x.dims()[0], row, max_buffer());
        if parts.len() == 1 {
            return self.rows(x, rows);
        }
        let cut =
            |r: &Range<usize>| self.rows(x.clone().narrow(0, r.start, r.len()), &rows.narrow(r));
        Tensor::cat(parts.iter().map(cut).collect(), 0)
    }

    fn rows(&self, x: Tensor<B, 2>, rows: &Rows<B>) -> Tensor<B, 2> {
        let h = project_rows(&self.up, &self.lora_up, x, rows);
        let h = if self.gelu_tanh {
            gelu_approximate(h)
        } else {
            gelu(h)
        };
        project_rows(&self.down, &self.lora_down, h, rows)
    }
}

impl<B: Backend> Block<B> {
    /// `x` `[batch, seq, d]`. Returns the kept `rows` of the layer's output, `[rows, d]`; past
    /// attention, only those are computed (`model::rows`).
    pub fn forward(
        &self,
        x: Tensor<B, 3>,
        mask: Tensor<B, 4, Bool>,
        causal: bool,
        rows: &Rows<B>,
    ) -> Tensor<B, 2> {
        let adapt = |adapter: &Option<Adapter<B>>, h: Tensor<B, 2>| match adapter {
            Some(a) => a.forward(h),
            None => h,
        };
        let [batch, seq, d] = x.dims();
        let kept = |x: Tensor<B, 3>| rows.keep(x.reshape([batch * seq, d]));
        let drop = |h: Tensor<B, 2>| rows.dropout(&self.dropout, h);
        if self.pre_norm {
            let h = layer_norm(&self.norm_attention, self.norm_eps, x.clone());
            let a = adapt(
                &self.adapter_attention,
                self.attention.forward(h, mask, causal, rows),
            );
            let x = kept(x) + drop(a);
            let h = layer_norm(&self.norm_feed_forward, self.norm_eps, x.clone());
            let f = adapt(
                &self.adapter_feed_forward,
                self.feed_forward.forward(h, rows),
            );
            x + drop(f)
        } else {
            let a = adapt(
                &self.adapter_attention,
                self.attention.forward(x.clone(), mask, causal, rows),
            );
            let x = layer_norm(&self.norm_attention, self.norm_eps, kept(x) + drop(a));
            let f = adapt(
                &self.adapter_feed_forward,
                self.feed_forward.forward(x.clone(), rows),
            );
            layer_norm(&self.norm_feed_forward, self.norm_eps, x + drop(f))
        }
    }

    /// Folds every LoRA update into its projection: the same function, plain `Linear`s.
    pub fn merge_lora(mut self) -> Self {
        let fold = |linear: &mut Linear<B>, lora: &mut Option<Lora<B>>| {
            if let Some(l) = lora.take() {
                *linear = l.merge(linear.clone());
            }
        };
        let a = &mut self.attention;
        fold(&mut a.query, &mut a.lora_query);
        fold(&mut a.key, &mut a.lora_key);
        fold(&mut a.value, &mut a.lora_value);
        fold(&mut a.output, &mut a.lora_output);
        let f = &mut self.feed_forward;
        fold(&mut f.up, &mut f.lora_up);
        fold(&mut f.down, &mut f.lora_down);
        self
    }
}
