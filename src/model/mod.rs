//! The Transformer encoder and its heads. One backbone serves both objectives: MLM reads it with
//! bidirectional attention, AR with a causal mask; heads differ (`LmHead` on gathered positions,
//! `ClassifierHead` on a pooled vector).
//!
//! Layout follows "Attention Is All You Need" (Vaswani et al., 2017, https://arxiv.org/abs/1706.03762)
//! with BERT's learned positions (Devlin et al., 2019, https://arxiv.org/abs/1810.04805); `norm = "pre"`
//! moves LayerNorm before each sub-layer as GPT-2 does (Radford et al., 2019).

mod block;
pub mod dropout;
mod heads;
mod host;
pub mod mixed;
pub mod peft;
pub mod pieces;
pub mod rows;

use burn::module::Module;
use burn::nn::{
    Dropout, DropoutConfig, Embedding, EmbeddingConfig, Initializer, LayerNorm, LayerNormConfig,
    Linear, LinearConfig,
};
use burn::tensor::backend::Backend;
use burn::tensor::{Bool, Int, Tensor};

pub use block::{Block, BlockConfig};
use heads::mean_pool;
pub use heads::{ClassifierHead, LmHead, Pool};
use rows::Rows;

/// BERT's initialiser: N(0, 0.02) for embeddings and projections.
pub const INIT: Initializer = Initializer::Normal {
    mean: 0.0,
    std: 0.02,
};

/// A projection with BERT's initialiser, as every one of the model's is.
pub(crate) fn linear<B: Backend>(d_in: usize, d_out: usize, device: &B::Device) -> Linear<B> {
    LinearConfig::new(d_in, d_out)
        .with_initializer(INIT)
        .init(device)
}

/// Where a backbone's layout comes from: xrun's own, or a Hugging Face family it was imported from
/// (which fixes the heads' layout and how positions are numbered).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Family {
    #[default]
    Xrun,
    Bert,
    Roberta,
    Gpt2,
}

impl Family {
    pub fn name(self) -> &'static str {
        match self {
            Family::Xrun => "xrun",
            Family::Bert => "bert",
            Family::Roberta => "roberta",
            Family::Gpt2 => "gpt2",
        }
    }

    /// RoBERTa numbers positions from `padding_idx + 1` = 2.
    pub fn position_offset(self) -> usize {
        if self == Family::Roberta {
            2
        } else {
            0
        }
    }

    /// GPT-2's LM head is a bias-free projection and its classifier (`score`) has no bias; the
    /// others use BERT's head (dense → GELU → LayerNorm → projection with bias).
    pub fn bert_heads(self) -> bool {
        self != Family::Gpt2
    }
}

fn default_eps() -> f64 {
    1e-5
}

fn default_type_vocab() -> usize {
    2
}

#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct BackboneConfig {
    pub vocab_size: usize,
    pub d_model: usize,
    pub layers: usize,
    pub heads: usize,
    pub d_ff: usize,
    pub max_len: usize,
    pub dropout: f64,
    pub pre_norm: bool,
    /// Causal self-attention (an AR backbone keeps it when fine-tuned).
    pub causal: bool,
    /// Segment embeddings: `Some(sep)` numbers tokens after the first `[SEP]` (id `sep`) segment 1.
    #[serde(default)]
    pub segments: Option<u32>,
    /// Rows of the segment table (RoBERTa has 1: every token is segment 0).
    #[serde(default = "default_type_vocab")]
    pub type_vocab: usize,
    #[serde(default)]
    pub family: Family,
    /// LayerNorm epsilon (BERT 1e-12, GPT-2 and xrun 1e-5).
    #[serde(default = "default_eps")]
    pub norm_eps: f64,
    /// GELU's tanh approximation (GPT-2's `gelu_new`) instead of the exact erf form.
    #[serde(default)]
    pub gelu_tanh: bool,
    /// BERT's pooler (dense + tanh on the pooled vector) before the classifier.
    #[serde(default)]
    pub pooler: bool,
}

#[derive(Module, Debug)]
pub struct Backbone<B: Backend> {
    pub tokens: Embedding<B>,
    pub positions: Embedding<B>,
    /// Sentence A / sentence B embeddings, for text pairs.
    pub segments: Option<Embedding<B>>,
    /// The `[SEP]` id that ends sentence A (meaningful with `segments`).
    pub sep: u32,
    /// Post-norm (BERT) normalises the embeddings; pre-norm (GPT-2) normalises the output instead.
    pub embed_norm: Option<LayerNorm<B>>,
    pub blocks: Vec<Block<B>>,
    pub final_norm: Option<LayerNorm<B>>,
    /// BERT's pooler: `tanh(dense(pooled))` feeds the classifier.
    pub pooler: Option<Linear<B>>,
    pub dropout: Dropout,
    pub heads: usize,
    pub causal: bool,
    pub position_offset: usize,
    /// Rows of the segment table: segment ids are clamped below it.
    pub type_vocab: usize,
    /// The LayerNorms' epsilon (see `Block::norm_eps`); not part of the record.
    pub norm_eps: f64,
}

impl BackboneConfig {
    pub fn init<B: Backend>(&self, device: &B::Device) -> Backbone<B> {
        let norm = || {
            LayerNormConfig::new(self.d_model)
                .with_epsilon(self.norm_eps)
                .init(device)
        };
        let block = BlockConfig {
            d_model: self.d_model,
            heads: self.heads,
            d_ff: self.d_ff,
            dropout: self.dropout,
            pre_norm: self.pre_norm,
            norm_eps: self.norm_eps,
            gelu_tanh: self.gelu_tanh,
        };
        Backbone {
            tokens: EmbeddingConfig::new(self.vocab_size, self.d_model)
                .with_initializer(INIT)
                .init(device),
            positions: EmbeddingConfig::new(self.max_len, self.d_model)
                .with_initializer(INIT)
                .init(device),
            segments: self.segments.map(|_| {
                EmbeddingConfig::new(self.type_vocab, self.d_model)
                    .with_initializer(INIT)
                    .init(device)
            }),
            sep: self.segments.unwrap_or(0),
            embed_norm: (!self.pre_norm).then(norm),
            blocks: (0..self.layers).map(|_| block.init(device)).collect(),
            final_norm: self.pre_norm.then(norm),
            pooler: self
                .pooler
                .then(|| linear(self.d_model, self.d_model, device)),
            dropout: DropoutConfig::new(self.dropout).init(),
            heads: self.heads,
            causal: self.causal,
            position_offset: self.family.position_offset(),
            type_vocab: self.type_vocab,
            norm_eps: self.norm_eps,
        }
    }

    /// A fresh LM head in the family's layout.
    pub fn lm_head<B: Backend>(&self, device: &B::Device) -> LmHead<B> {
        LmHead::new(
            self.d_model,
            self.vocab_size,
            self.family.bert_heads(),
            self.norm_eps,
            device,
        )
    }

    /// A fresh classification head in the family's layout: GPT-2's sequence classifier (`score`)
    /// has no bias, its token classifier has one.
    pub fn classifier_head<B: Backend>(
        &self,
        classes: usize,
        tagging: bool,
        device: &B::Device,
    ) -> ClassifierHead<B> {
        ClassifierHead::new(
            self.d_model,
            classes,
            self.dropout,
            self.family.bert_heads() || tagging,
            device,
        )
    }

    /// Trainable parameters of the backbone (embeddings, blocks, norms), counted from the shapes.
    pub fn parameters(&self) -> usize {
        let (d, f) = (self.d_model, self.d_ff);
        let norm = 2 * d;
        let block = 4 * (d * d + d) + (d * f + f) + (f * d + d) + 2 * norm;
        let segments = if self.segments.is_some() {
            self.type_vocab
        } else {
            0
        };
        let pooler = if self.pooler { d * d + d } else { 0 };
        (self.vocab_size + self.max_len + segments) * d + self.layers * block + norm + pooler
    }
}

impl<B: Backend> Backbone<B> {
    /// The longest sequence it reads: the rows of its position table past the family's offset.
    pub fn max_len(&self) -> usize {
        // `lazy_shape`: reading the shape must not initialise a lazy parameter (a seed's draws
        // would come out of turn).
        self.positions.weight.lazy_shape()[0] - self.position_offset
    }

    /// `ids`: `[batch, seq]`; `pad`: `[batch, seq]`, true at padding. Returns `[batch, seq, d_model]`.
    pub fn forward(&self, ids: Tensor<B, 2, Int>, pad: Tensor<B, 2, Bool>) -> Tensor<B, 3> {
        let [batch, seq] = ids.dims();
        let hidden = self.forward_rows(ids, pad, &Rows::all(batch * seq));
        let d = hidden.dims()[1];
        hidden.reshape([batch, seq, d])
    }

    /// The hidden states `[n, d_model]` at `positions` `[n]` (flat indices into `batch * seq`).
    /// Where the positions are fewer than the rows, the last layer computes past attention for
    /// those rows only (`model::rows`); the numbers are the whole forward's, rounded in another
    /// order.
    pub fn read(
        &self,
        ids: Tensor<B, 2, Int>,
        pad: Tensor<B, 2, Bool>,
        positions: Tensor<B, 1, Int>,
    ) -> Tensor<B, 2> {
        let [batch, seq] = ids.dims();
        let total = batch * seq;
        if positions.dims()[0] < total {
            self.forward_rows(ids, pad, &Rows::picked(total, positions))
        } else {
            self.forward_rows(ids, pad, &Rows::all(total))
                .select(0, positions)
        }
    }

    /// The kept `rows` of the last layer's output (after the final LayerNorm), `[rows, d_model]`.
    fn forward_rows(
        &self,
        ids: Tensor<B, 2, Int>,
        pad: Tensor<B, 2, Bool>,
        rows: &Rows<B>,
    ) -> Tensor<B, 2> {
        let [batch, seq] = ids.dims();
        let device = ids.device();
        let offset = self.position_offset as i64;
        let positions = Tensor::<B, 1, Int>::arange(offset..offset + seq as i64, &device)
            .reshape([1, seq])
            .repeat_dim(0, batch);
        // Segment ids first: `ids` moves into the token lookup, whose sum with the positions keeps
        // the order of operations (and so the exact numbers) of backbones without segments.
        let segments = self
            .segments
            .as_ref()
            .map(|s| s.forward(segment_ids(ids.clone(), self.sep, self.type_vocab)));
        let mut x = self.tokens.forward(ids) + self.positions.forward(positions);
        if let Some(segments) = segments {
            x = x + segments;
        }
        if let Some(norm) = &self.embed_norm {
            x = host::layer_norm(norm, self.norm_eps, x);
        }
        x = dropout::forward(&self.dropout, x);
        // Keys that are padding are hidden from every query: [batch, 1, 1, seq] → [batch, heads, seq, seq].
        let mask = pad
            .reshape([batch, 1, 1, seq])
            .expand([batch, self.heads, seq, seq]);
        let d = x.dims()[2];
        let every = Rows::all(batch * seq);
        let x = match self.blocks.split_last() {
            Some((last, others)) => {
                for block in others {
                    x = block
                        .forward(x, mask.clone(), self.causal, &every)
                        .reshape([batch, seq, d]);
                }
                last.forward(x, mask, self.causal, rows)
            }
            None => rows.keep(x.reshape([batch * seq, d])),
        };
        match &self.final_norm {
            Some(norm) => host::layer_norm(norm, self.norm_eps, x),
            None => x,
        }
    }
}

impl<B: Backend> Backbone<B> {
    /// Adds LoRA updates to the `targets` projections of every layer.
    pub fn with_lora(
        mut self,
        lora: &crate::config::train::LoraSection,
        device: &B::Device,
    ) -> Self {
        use crate::config::train::LoraTarget as T;
        use peft::Lora;
        for block in &mut self.blocks {
            let d = block.attention.query.weight.dims()[0];
            let f = block.feed_forward.up.weight.dims()[1];
            let make = |d_in, d_out| {
                Some(Lora::new(
                    d_in,
                    d_out,
                    lora.rank,
                    lora.alpha,
                    lora.dropout,
                    device,
                ))
            };
            for t in &lora.targets {
                let (a, ff) = (&mut block.attention, &mut block.feed_forward);
                match t {
                    T::Query => a.lora_query = make(d, d),
                    T::Key => a.lora_key = make(d, d),
                    T::Value => a.lora_value = make(d, d),
                    T::Output => a.lora_output = make(d, d),
                    T::Up => ff.lora_up = make(d, f),
                    T::Down => ff.lora_down = make(f, d),
                }
            }
        }
        self
    }

    /// Adds a bottleneck adapter of width `size` after attention and after the feed-forward
    /// network of every layer, and makes every LayerNorm trainable again, as Houlsby et al. train
    /// them with the adapters.
    pub fn with_adapters(mut self, size: usize, device: &B::Device) -> Self {
        for block in &mut self.blocks {
            let d = block.attention.query.weight.dims()[0];
            block.adapter_attention = Some(peft::Adapter::new(d, size, device));
            block.adapter_feed_forward = Some(peft::Adapter::new(d, size, device));
            block.norm_attention = trainable_norm(block.norm_attention.clone());
            block.norm_feed_forward = trainable_norm(block.norm_feed_forward.clone());
        }
        self.embed_norm = self.embed_norm.map(trainable_norm);
        self.final_norm = self.final_norm.map(trainable_norm);
        self
    }

    /// Adds `length` learned key/value prefixes to every layer's attention.
    pub fn with_prefix(mut self, length: usize, device: &B::Device) -> Self {
        for block in &mut self.blocks {
            let d = block.attention.query.weight.dims()[0];
            block.attention.prefix = Some(peft::Prefix::new(length, d, device));
        }
        self
    }

    /// Folds every LoRA update into its projection's weight.
    pub fn merge_lora(mut self) -> Self {
        self.blocks = self.blocks.into_iter().map(Block::merge_lora).collect();
        self
    }
}

/// A LayerNorm whose scale and shift get gradients (after `no_grad` froze them).
fn trainable_norm<B: Backend>(mut norm: LayerNorm<B>) -> LayerNorm<B> {
    norm.gamma = norm.gamma.map(|t| t.set_require_grad(true));
    norm.beta = norm.beta.map(|b| b.map(|t| t.set_require_grad(true)));
    norm
}

/// 0 up to and including the first `[SEP]`, 1 after it: `[CLS] a [SEP]` → 0, `b [SEP]` → 1.
/// With a one-row table (RoBERTa) every token is segment 0.
pub fn segment_ids<B: Backend>(ids: Tensor<B, 2, Int>, sep: u32, rows: usize) -> Tensor<B, 2, Int> {
    let is_sep = ids.equal_elem(sep as i64).int();
    (is_sep.clone().cumsum(1) - is_sep).clamp_max(rows.clamp(1, 2) as i64 - 1)
}

/// Held by every unit test that draws from burn's random generator, which is one per process
/// (seeding it, initialising a model, sampling): tests run side by side, and a draw made between
/// another test's seed and its initialisation would change that test's weights.
#[cfg(test)]
pub(crate) fn rng_lock() -> std::sync::MutexGuard<'static, ()> {
    static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

/// A two-layer pre-norm backbone of width 16 without dropout, for unit tests.
#[cfg(test)]
pub(crate) fn tiny_config(vocab_size: usize, max_len: usize, causal: bool) -> BackboneConfig {
    BackboneConfig {
        vocab_size,
        d_model: 16,
        layers: 2,
        heads: 2,
        d_ff: 32,
        max_len,
        dropout: 0.0,
        pre_norm: true,
        causal,
        segments: None,
        type_vocab: 2,
        family: Family::Xrun,
        norm_eps: 1e-5,
        gelu_tanh: false,
        pooler: false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::train::backend::Cpu as Flex;
    use burn::tensor::backend::Backend;
    use burn::tensor::TensorData;

    type Ad = burn::backend::Autodiff<Flex>;
    /// `ids`, `pad`, `positions`, `targets`.
    type LmInputs = (
        Tensor<Ad, 2, Int>,
        Tensor<Ad, 2, Bool>,
        Tensor<Ad, 1, Int>,
        Tensor<Ad, 1, Int>,
    );

    #[test]
    fn parameter_count_matches_burn() {
        let _rng = crate::model::rng_lock();
        use burn::module::Module;
        let cfg = config(false);
        assert_eq!(
            cfg.parameters(),
            cfg.init::<Flex>(&Default::default()).num_params()
        );
        let pre = config(true);
        assert_eq!(
            pre.parameters(),
            pre.init::<Flex>(&Default::default()).num_params()
        );
    }

    /// Padding is masked: a batch padded past its longest row (as GPUs pad to multiples) gives
    /// every pooling the same class logits, bidirectional and causal.
    #[test]
    fn longer_padding_changes_no_classification() {
        let _rng = crate::model::rng_lock();
        use crate::data::batch;
        let device = Default::default();
        let rows: [&[u32]; 3] = [&[2, 7, 8, 9, 3], &[2, 11, 3], &[2, 5, 6, 3]];
        for causal in [false, true] {
            let cfg = config(causal);
            let model = Classifier::<Flex> {
                backbone: cfg.init(&device),
                head: ClassifierHead::new(cfg.d_model, 3, 0.0, true, &device),
            };
            for pool in [Pool::First, Pool::Last, Pool::Mean] {
                let logits = |multiple| {
                    batch::set_pad_multiple(multiple);
                    let b = batch::pad(&rows, 0, cfg.max_len);
                    batch::set_pad_multiple(1);
                    let ids = Tensor::<Flex, 2, Int>::from_data(
                        TensorData::new(b.ids, [b.batch, b.seq]),
                        &device,
                    );
                    let pad = Tensor::<Flex, 2, Bool>::from_data(
                        TensorData::new(b.pad, [b.batch, b.seq]),
                        &device,
                    );
                    (
                        b.seq,
                        model
                            .forward(ids, pad, pool)
                            .into_data()
                            .to_vec::<f32>()
                            .unwrap(),
                    )
                };
                let ((w1, exact), (w2, padded)) = (logits(1), logits(8));
                assert_eq!((w1, w2), (5, 8));
                for (a, b) in exact.iter().zip(&padded) {
                    assert!(
                        (a - b).abs() < 1e-5,
                        "causal {causal}, {pool:?}: {exact:?} against {padded:?}"
                    );
                }
            }
        }
    }

    fn config(causal: bool) -> BackboneConfig {
        tiny_config(50, 16, causal)
    }

    fn lora_everywhere() -> crate::config::train::LoraSection {
        use crate::config::train::LoraTarget as T;
        crate::config::train::LoraSection {
            rank: 4,
            alpha: 8.0,
            dropout: 0.0,
            targets: vec![T::Query, T::Key, T::Value, T::Output, T::Up, T::Down],
        }
    }

    /// LoRA and adapters start as the identity: the backbone's function is unchanged.
    #[test]
    fn lora_and_adapters_start_where_the_backbone_is() {
        let _rng = crate::model::rng_lock();
        let device = Default::default();
        Flex::seed(&device, 9);
        let base = config(false).init::<Flex>(&device);
        let ids = vec![2, 10, 11, 12, 3];
        let plain = run(&base, ids.clone());
        let lora = run(
            &base.clone().with_lora(&lora_everywhere(), &device),
            ids.clone(),
        );
        let adapted = run(&base.with_adapters(5, &device), ids);
        assert_eq!(plain, lora);
        assert_eq!(plain, adapted);
    }

    /// Merged LoRA weights give the same outputs as the separate low-rank updates.
    #[test]
    fn merged_lora_predicts_like_unmerged_lora() {
        let _rng = crate::model::rng_lock();
        let device = Default::default();
        Flex::seed(&device, 4);
        for causal in [false, true] {
            let mut model = config(causal)
                .init::<Flex>(&device)
                .with_lora(&lora_everywhere(), &device);
            // Trained updates are not zero: give every B random values.
            for block in &mut model.blocks {
                let a = &mut block.attention;
                let f = &mut block.feed_forward;
                for l in [
                    &mut a.lora_query,
                    &mut a.lora_key,
                    &mut a.lora_value,
                    &mut a.lora_output,
                    &mut f.lora_up,
                    &mut f.lora_down,
                ]
                .into_iter()
                .flatten()
                {
                    let dims = l.b.dims();
                    l.b = burn::module::Param::from_tensor(Tensor::random(
                        dims,
                        burn::tensor::Distribution::Normal(0.0, 0.2),
                        &device,
                    ));
                }
            }
            let ids = vec![2, 10, 11, 12, 13, 14, 3];
            let unmerged = run(&model, ids.clone());
            let plain = run(&config(causal).init::<Flex>(&device), ids.clone());
            let merged_model = model.merge_lora();
            assert!(merged_model.blocks[0].attention.lora_query.is_none());
            let merged = run(&merged_model, ids);
            let max = unmerged
                .iter()
                .zip(&merged)
                .map(|(a, b)| (a - b).abs())
                .fold(0.0f32, f32::max);
            assert!(max < 1e-5, "merged and unmerged differ by {max}");
            assert_ne!(unmerged, plain, "the updates are not zero");
        }
    }

    /// Prefixes are seen by every position, and a causal backbone stays causal with them.
    #[test]
    fn prefixes_keep_causal_attention_causal() {
        let _rng = crate::model::rng_lock();
        let device = Default::default();
        Flex::seed(&device, 6);
        let base = config(true).init::<Flex>(&device);
        let with = base.clone().with_prefix(3, &device);
        let a = run(&with, vec![2, 10, 11, 12, 13, 3]);
        let b = run(&with, vec![2, 10, 11, 40, 41, 3]);
        let d = 16;
        assert_eq!(a[..3 * d], b[..3 * d], "positions before the change moved");
        assert_ne!(a[3 * d..4 * d], b[3 * d..4 * d]);
        assert_ne!(
            a,
            run(&base, vec![2, 10, 11, 12, 13, 3]),
            "the prefix is attended to"
        );
    }

    #[test]
    fn segments_number_sentence_b_from_the_first_sep() {
        let _rng = crate::model::rng_lock();
        let device = Default::default();
        let ids = Tensor::<Flex, 2, Int>::from_data(
            TensorData::new(vec![2, 10, 11, 3, 20, 21, 3, 2, 10, 3, 0, 0, 0, 0], [2, 7]),
            &device,
        );
        let seg: Vec<i64> = segment_ids(ids, 3, 2)
            .into_data()
            .convert::<i64>()
            .to_vec()
            .unwrap();
        // Row 2 is one text: its padding after [SEP] counts as 1, and is masked anyway.
        assert_eq!(seg, [0, 0, 0, 0, 1, 1, 1, 0, 0, 0, 1, 1, 1, 1]);
    }

    /// The inputs of `LmModel::target_log_probs` on the autodiff CPU backend: `ids` in rows of
    /// `width` (0 is padding), and the flat `positions` to score with their `targets`.
    fn lm_inputs(ids: &[i32], width: usize, positions: &[i64], targets: &[i64]) -> LmInputs {
        let device = Default::default();
        let rows = [ids.len() / width, width];
        let pad: Vec<bool> = ids.iter().map(|&i| i == 0).collect();
        let flat = |v: &[i64]| TensorData::new(v.to_vec(), [v.len()]);
        (
            Tensor::from_data(TensorData::new(ids.to_vec(), rows), &device),
            Tensor::from_data(TensorData::new(pad, rows), &device),
            Tensor::from_data(flat(positions), &device),
            Tensor::from_data(flat(targets), &device),
        )
    }

    /// Attention, the feed-forward network and the LM head cut into pieces of one sequence (or
    /// one position) each, as under a tiny device buffer limit, give the log-probabilities and
    /// gradients of the uncut model; uncut, the loss is burn's `CrossEntropyLoss` to the bit.
    #[test]
    fn work_cut_to_the_buffer_limit_computes_what_the_whole_does() {
        let _rng = crate::model::rng_lock();
        use crate::model::pieces::set_max_buffer;
        use burn::nn::loss::CrossEntropyLossConfig;
        use burn::tensor::ElementConversion;
        let device = Default::default();
        let values = |t: Tensor<Flex, 2>| -> Vec<f32> { t.into_data().to_vec().unwrap() };
        for causal in [false, true] {
            Flex::seed(&device, 11);
            let cfg = config(causal);
            let mut backbone = cfg.init::<Ad>(&device);
            if causal {
                // Prefix keys: the scores have more keys than queries.
                backbone = backbone.with_prefix(3, &device);
            }
            let model = LmModel {
                backbone,
                head: cfg.lm_head(&device),
            };
            let run = |limit: Option<u64>| {
                set_max_buffer(limit);
                let (ids, pad, p, t) = lm_inputs(
                    &[2, 10, 11, 12, 3, 2, 13, 3, 0, 0, 2, 14, 15, 3, 0],
                    5,
                    &[1, 2, 3, 6, 11, 12],
                    &[11, 12, 3, 3, 15, 3],
                );
                let lp = model.target_log_probs(ids.clone(), pad.clone(), p.clone(), t.clone());
                let loss = lp.clone().mean().neg();
                let ce = CrossEntropyLossConfig::new()
                    .init(&device)
                    .forward(model.head.forward(model.backbone.read(ids, pad, p)), t);
                let grads = loss.backward();
                let block = &model.backbone.blocks[0];
                let grad = |w: &burn::module::Param<Tensor<Ad, 2>>| values(w.grad(&grads).unwrap());
                let g = [
                    grad(&model.head.decoder.weight),
                    grad(&block.attention.query.weight),
                    grad(&block.feed_forward.up.weight),
                ];
                set_max_buffer(None);
                let scalar = |t: Tensor<Ad, 1>| t.inner().into_scalar().elem::<f32>();
                (
                    lp.inner().into_data().to_vec::<f32>().unwrap(),
                    scalar(loss),
                    scalar(ce),
                    g,
                )
            };
            let (whole, loss, ce, whole_grads) = run(None);
            assert_eq!(loss, ce, "uncut, the loss is burn's cross-entropy");
            let (cut, _, _, cut_grads) = run(Some(1));
            let close = |a: &[f32], b: &[f32], what: &str| {
                assert_eq!(a.len(), b.len());
                for (x, y) in a.iter().zip(b) {
                    assert!(
                        (x - y).abs() <= 1e-5,
                        "{what} (causal {causal}): {x} vs {y}"
                    );
                }
            };
            close(&whole, &cut, "log-probabilities");
            for (a, b) in whole_grads.iter().zip(&cut_grads) {
                assert!(a.iter().any(|x| *x != 0.0));
                close(a, b, "gradients");
            }
        }
    }

    /// A head that reads some rows (MLM's masked positions, the `[CLS]` or last token) gets from
    /// `Backbone::read`, whose last layer computes past attention for those rows only, the
    /// log-probabilities, logits and gradients of the whole forward, with dropout on (in the
    /// block, in LoRA and in the head) and the same seed: the masks drawn are the same.
    #[test]
    fn reading_some_rows_computes_what_the_whole_forward_does() {
        let _rng = crate::model::rng_lock();
        let device = Default::default();
        let values = |t: Tensor<Flex, 2>| -> Vec<f32> { t.into_data().to_vec().unwrap() };
        let close = |a: &[f32], b: &[f32], what: &str| {
            assert_eq!(a.len(), b.len(), "{what}");
            for (x, y) in a.iter().zip(b) {
                assert!((x - y).abs() <= 1e-5, "{what}: {x} vs {y}");
            }
        };
        // The outputs and the (non-zero) gradients of a whole run and of a run reading rows.
        type Run = (Vec<f32>, Vec<Vec<f32>>);
        let agree = |(whole, whole_grads): Run, (read, read_grads): Run, what: &str| {
            close(&whole, &read, what);
            for (a, b) in whole_grads.iter().zip(&read_grads) {
                assert!(a.iter().any(|x| *x != 0.0), "{what}: a zero gradient");
                close(a, b, &format!("{what}: gradients"));
            }
        };
        // Masks drawn by burn (as on a GPU) and on the host (as on the CPU).
        for (pre_norm, host) in [(true, false), (false, false), (true, true), (false, true)] {
            crate::model::dropout::draw_on_host(host);
            Flex::seed(&device, 3);
            let mut cfg = config(false);
            cfg.pre_norm = pre_norm;
            cfg.dropout = 0.1;
            let mut lora = lora_everywhere();
            lora.dropout = 0.1;
            let backbone = cfg
                .init::<Ad>(&device)
                .with_lora(&lora, &device)
                .with_adapters(4, &device);
            let lm = LmModel {
                backbone: backbone.clone(),
                head: cfg.lm_head(&device),
            };
            let classifier = Classifier {
                backbone,
                head: cfg.classifier_head(3, false, &device),
            };
            let ids = [2, 10, 11, 12, 3, 2, 13, 3, 0, 0, 2, 14, 15, 3, 0];
            let grads_of = |grads: &<Ad as burn::tensor::backend::AutodiffBackend>::Gradients,
                            b: &Backbone<Ad>| {
                let last = &b.blocks[1];
                let grad = |w: &burn::module::Param<Tensor<Ad, 2>>| values(w.grad(grads).unwrap());
                [
                    grad(&last.feed_forward.up.weight),
                    grad(&last.attention.lora_output.as_ref().unwrap().b),
                    grad(&last.feed_forward.lora_down.as_ref().unwrap().b),
                    grad(&last.adapter_feed_forward.as_ref().unwrap().up.weight),
                    grad(&b.blocks[0].attention.query.weight),
                ]
            };
            // MLM: 4 of the 15 positions.
            let lm_run = |whole: bool| {
                crate::model::dropout::seed::<Flex>(&device, 7);
                let (ids, pad, p, t) = lm_inputs(&ids, 5, &[1, 2, 6, 11], &[11, 12, 3, 15]);
                let lp = if whole {
                    let hidden = lm.backbone.forward(ids, pad).reshape([15, 16]);
                    lm.head.target_log_probs(hidden.select(0, p), t)
                } else {
                    lm.target_log_probs(ids, pad, p, t)
                };
                let grads = lp.clone().mean().neg().backward();
                let mut g = grads_of(&grads, &lm.backbone).to_vec();
                g.push(values(lm.head.decoder.weight.grad(&grads).unwrap()));
                (lp.inner().into_data().to_vec::<f32>().unwrap(), g)
            };
            // Parameters are initialised on first use, drawing from the same stream as dropout:
            // one run first, so that both compared runs draw their masks alone.
            lm_run(true);
            agree(lm_run(true), lm_run(false), "MLM log-probabilities");
            // Classification on the first and on the last token.
            for pool in [Pool::First, Pool::Last] {
                let class_run = |whole: bool| {
                    crate::model::dropout::seed::<Flex>(&device, 9);
                    let (ids, pad, _, _) = lm_inputs(&ids, 5, &[], &[]);
                    let logits = if whole {
                        let hidden = classifier.backbone.forward(ids, pad.clone());
                        let rows = pool.rows(&pad).unwrap();
                        let pooled = hidden.reshape([15, 16]).select(0, rows);
                        classifier.head.forward(pooled, None)
                    } else {
                        classifier.forward(ids, pad, pool)
                    };
                    let grads = logits.clone().powi_scalar(2).mean().backward();
                    let g = grads_of(&grads, &classifier.backbone).to_vec();
                    (values(logits.inner()), g)
                };
                class_run(true);
                agree(class_run(true), class_run(false), "class logits");
            }
        }
        crate::model::dropout::draw_on_host(false);
    }

    /// Under `bf16-mixed` the products and attention run in bf16 (the numbers change a little),
    /// while parameters and their gradients stay f32 and follow the f32 model's closely.
    #[test]
    fn mixed_precision_computes_in_bf16_and_keeps_f32_weights_and_gradients() {
        let _rng = crate::model::rng_lock();
        use crate::model::mixed::set_compute;
        use burn::tensor::{DType, ElementConversion, FloatDType};
        let device = Default::default();
        Flex::seed(&device, 5);
        let cfg = config(false);
        let mut backbone = cfg.init::<Ad>(&device).with_adapters(4, &device);
        backbone = backbone.with_lora(&lora_everywhere(), &device);
        let model = LmModel {
            backbone,
            head: cfg.lm_head(&device),
        };
        let run = |compute: Option<FloatDType>| {
            set_compute(compute);
            let (ids, pad, p, t) = lm_inputs(
                &[2, 10, 11, 12, 3, 2, 13, 3, 0, 0],
                5,
                &[1, 2, 6],
                &[11, 12, 3],
            );
            let lp = model.target_log_probs(ids, pad, p, t);
            let grads = lp.clone().mean().neg().backward();
            set_compute(None);
            let block = &model.backbone.blocks[0];
            let lora = block.attention.lora_query.as_ref().unwrap();
            let weights = [
                &model.head.decoder.weight,
                &block.attention.query.weight,
                &block.feed_forward.up.weight,
                &block.adapter_feed_forward.as_ref().unwrap().up.weight,
                &lora.b,
            ];
            let grads: Vec<Tensor<Flex, 2>> =
                weights.iter().map(|w| w.grad(&grads).unwrap()).collect();
            (lp.inner(), grads)
        };
        let (lp32, g32) = run(None);
        let (lp16, g16) = run(Some(FloatDType::BF16));
        assert_eq!(lp16.dtype(), DType::F32, "losses are read in f32");
        let values = |t: Tensor<Flex, 1>| t.into_data().to_vec::<f32>().unwrap();
        let (a, b) = (values(lp32), values(lp16));
        assert_ne!(a, b, "products ran in bf16");
        for (x, y) in a.iter().zip(&b) {
            assert!(
                (x - y).abs() < 0.05,
                "log-probabilities: f32 {x}, mixed {y}"
            );
        }
        for (x, y) in g32.into_iter().zip(g16) {
            assert_eq!(y.dtype(), DType::F32, "gradients are f32");
            // bf16 keeps 8 significant bits: within a few percent of the gradient's scale.
            let scale: f32 = x.clone().abs().max().into_scalar().elem();
            let gap: f32 = (x - y).abs().max().into_scalar().elem();
            assert!(
                scale > 0.0 && gap <= 0.05 * scale,
                "gradient off by {gap} of {scale}"
            );
        }
        let params = model.backbone.blocks[0].attention.query.weight.val();
        assert_eq!(params.dtype(), DType::F32, "master weights are f32");
    }

    fn run(model: &Backbone<Flex>, ids: Vec<i32>) -> Vec<f32> {
        let device = Default::default();
        let n = ids.len();
        let ids = Tensor::<Flex, 2, Int>::from_data(TensorData::new(ids, [1, n]), &device);
        let pad =
            Tensor::<Flex, 2, Bool>::from_data(TensorData::new(vec![false; n], [1, n]), &device);
        model
            .forward(ids, pad)
            .into_data()
            .convert::<f32>()
            .to_vec()
            .unwrap()
    }

    /// Causal masking: changing a token changes no output at earlier positions.
    #[test]
    fn a_causal_token_never_sees_its_successor() {
        let _rng = crate::model::rng_lock();
        let device = Default::default();
        Flex::seed(&device, 3);
        let model = config(true).init::<Flex>(&device);
        let a = run(&model, vec![2, 10, 11, 12, 13, 3]);
        let b = run(&model, vec![2, 10, 11, 40, 41, 3]);
        let d = 16;
        assert_eq!(a[..3 * d], b[..3 * d], "positions before the change moved");
        assert_ne!(a[3 * d..4 * d], b[3 * d..4 * d]);
    }

    /// Without the causal mask the same change does reach earlier positions.
    #[test]
    fn bidirectional_attention_sees_everything() {
        let _rng = crate::model::rng_lock();
        let device = Default::default();
        Flex::seed(&device, 3);
        let model = config(false).init::<Flex>(&device);
        let a = run(&model, vec![2, 10, 11, 12, 13, 3]);
        let b = run(&model, vec![2, 10, 11, 40, 41, 3]);
        assert_ne!(a[..16], b[..16]);
    }

    /// Padding keys are invisible: appending pads leaves real positions unchanged.
    #[test]
    fn padding_is_masked() {
        let _rng = crate::model::rng_lock();
        let device = Default::default();
        Flex::seed(&device, 5);
        let model = config(false).init::<Flex>(&device);
        let short = run(&model, vec![2, 10, 11, 3]);
        let ids = Tensor::<Flex, 2, Int>::from_data(
            TensorData::new(vec![2, 10, 11, 3, 0, 0], [1, 6]),
            &device,
        );
        let pad = Tensor::<Flex, 2, Bool>::from_data(
            TensorData::new(vec![false, false, false, false, true, true], [1, 6]),
            &device,
        );
        let long: Vec<f32> = model
            .forward(ids, pad)
            .into_data()
            .convert::<f32>()
            .to_vec()
            .unwrap();
        for (x, y) in short.iter().zip(&long[..short.len()]) {
            assert!((x - y).abs() < 1e-5, "{x} vs {y}");
        }
    }
}

/// Backbone + LM head: the pretraining model for both objectives.
#[derive(Module, Debug)]
pub struct LmModel<B: Backend> {
    pub backbone: Backbone<B>,
    pub head: LmHead<B>,
}

/// Backbone + classification head: the fine-tuned model.
#[derive(Module, Debug)]
pub struct Classifier<B: Backend> {
    pub backbone: Backbone<B>,
    pub head: ClassifierHead<B>,
}

/// One backbone with a classification head per task (continual learning).
#[derive(Module, Debug)]
pub struct MultiTask<B: Backend> {
    pub backbone: Backbone<B>,
    pub heads: Vec<ClassifierHead<B>>,
}

impl<B: Backend> MultiTask<B> {
    /// Task `task`'s classifier: the shared backbone and its head. Clones share their parameters
    /// (and gradients) with `self`.
    pub fn classifier(&self, task: usize) -> Classifier<B> {
        Classifier {
            backbone: self.backbone.clone(),
            head: self.heads[task].clone(),
        }
    }
}

impl<B: Backend> LmModel<B> {
    /// Log-probabilities `[n]` of `targets` at the `positions` (flat indices into `batch * seq`),
    /// without holding more logits at once than the device's buffers allow.
    pub fn target_log_probs(
        &self,
        ids: Tensor<B, 2, Int>,
        pad: Tensor<B, 2, Bool>,
        positions: Tensor<B, 1, Int>,
        targets: Tensor<B, 1, Int>,
    ) -> Tensor<B, 1> {
        self.head
            .target_log_probs(self.backbone.read(ids, pad, positions), targets)
    }
}

impl<B: Backend> Classifier<B> {
    pub fn forward(
        &self,
        ids: Tensor<B, 2, Int>,
        pad: Tensor<B, 2, Bool>,
        pool: Pool,
    ) -> Tensor<B, 2> {
        let pooled = match pool.rows(&pad) {
            Some(rows) => self.backbone.read(ids, pad, rows),
            None => mean_pool(self.backbone.forward(ids, pad.clone()), pad),
        };
        self.head.forward(pooled, self.backbone.pooler.as_ref())
    }

    /// Tag logits `[n, classes]` at `positions` (flat indices into `batch * seq`).
    pub fn forward_tokens(
        &self,
        ids: Tensor<B, 2, Int>,
        pad: Tensor<B, 2, Bool>,
        positions: Tensor<B, 1, Int>,
    ) -> Tensor<B, 2> {
        self.head
            .forward_rows(self.backbone.read(ids, pad, positions))
    }
}
