//! `[pretrain]`, `[finetune]` (each with its `optim` table) and `[eval]`: the training budgets and the
//! optimiser. Both stages share one `OptimSection`, so one set of keys means the same thing everywhere.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Objective {
    /// Masked language modelling (BERT): 15% of tokens selected, 80/10/10 mask/random/keep.
    Mlm,
    /// Autoregressive next-token prediction with a causal mask.
    Ar,
    /// No pretraining: fine-tune a randomly initialised backbone.
    None,
}

impl Objective {
    /// The name used in experiment files and reports.
    pub fn name(self) -> &'static str {
        match self {
            Objective::Mlm => "mlm",
            Objective::Ar => "ar",
            Objective::None => "none",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Schedule {
    /// Linear warm-up, then linear decay to zero.
    Linear,
    /// Linear warm-up, then half-cosine decay to zero.
    Cosine,
    /// Linear warm-up, then constant.
    Constant,
}

/// AdamW with warm-up, decay and gradient clipping. Every field has a default.
#[derive(Debug, Clone, Deserialize, Serialize, Default)]
#[serde(deny_unknown_fields)]
pub struct OptimSection {
    pub lr: Option<f64>,
    pub betas: Option<[f64; 2]>,
    pub eps: Option<f64>,
    pub weight_decay: Option<f64>,
    /// Fraction of the total steps spent warming up (default 0.06).
    pub warmup_fraction: Option<f64>,
    pub schedule: Option<Schedule>,
    /// Clip each parameter tensor's gradient to this L2 norm (burn's `Norm` clipping, per tensor,
    /// not the global norm of PyTorch's `clip_grad_norm_`); 0 turns clipping off.
    pub clip_norm: Option<f64>,
}

/// The keys of `OptimSection`, for the "belongs in [….optim]" hint (a test keeps them in step).
pub const OPTIM_KEYS: [&str; 7] = [
    "lr",
    "betas",
    "eps",
    "weight_decay",
    "warmup_fraction",
    "schedule",
    "clip_norm",
];

/// AdamW's epsilon when `[….optim]` gives none.
pub const DEFAULT_EPS: f64 = 1e-8;

/// `OptimSection` with every default filled in; the stage decides the default learning rate.
#[derive(Debug, Clone, Serialize)]
pub struct Optim {
    pub lr: f64,
    pub betas: [f64; 2],
    pub eps: f64,
    pub weight_decay: f64,
    pub warmup_fraction: f64,
    pub schedule: Schedule,
    pub clip_norm: f64,
}

impl OptimSection {
    pub fn resolve(&self, default_lr: f64) -> Optim {
        Optim {
            lr: self.lr.unwrap_or(default_lr),
            betas: self.betas.unwrap_or([0.9, 0.999]),
            eps: self.eps.unwrap_or(DEFAULT_EPS),
            weight_decay: self.weight_decay.unwrap_or(0.01),
            warmup_fraction: self.warmup_fraction.unwrap_or(0.06),
            schedule: self.schedule.unwrap_or(Schedule::Linear),
            clip_norm: self.clip_norm.unwrap_or(1.0),
        }
    }
}

/// How an epoch's examples are grouped into batches (each batch is padded to its longest).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum Batching {
    /// Shuffled, then cut into batches.
    #[default]
    Random,
    /// Shuffled, sorted by length within windows of 50 batches, cut, and the batches shuffled:
    /// similar lengths share a batch, so less padding is computed.
    Length,
}

impl Batching {
    /// Absent from cache keys at its default, so earlier keys hold.
    pub fn is_random(&self) -> bool {
        *self == Batching::Random
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct PretrainSection {
    #[serde(default = "default_objective")]
    pub objective: Objective,
    /// Budget in optimiser steps; give `steps` or `epochs`, not both (default: 500 steps).
    pub steps: Option<usize>,
    pub epochs: Option<usize>,
    #[serde(default = "default_pretrain_batch")]
    pub batch_size: usize,
    #[serde(default, skip_serializing_if = "Batching::is_random")]
    pub batching: Batching,
    /// Concatenate the training sequences and cut them into rows of `model.max_len` tokens, so
    /// batches carry no padding (validation stays unpacked, so its loss compares with unpacked
    /// runs). Absent from cache keys when off.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub packing: bool,
    /// MLM: share of (non-special) tokens selected for prediction.
    #[serde(default = "default_mask_prob")]
    pub mask_prob: f64,
    /// Share of the corpus held out for validation loss and perplexity.
    #[serde(default = "default_validation_fraction")]
    pub validation_fraction: f64,
    /// Validate every this many steps (and at the end).
    #[serde(default = "default_eval_every")]
    pub eval_every: usize,
    #[serde(default)]
    pub optim: OptimSection,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum SelectMetric {
    Accuracy,
    MacroF1,
    /// Token classification: micro entity F1 (exact spans); the default there.
    EntityF1,
}

impl SelectMetric {
    /// The metric's name in results and reports.
    pub fn name(self) -> &'static str {
        match self {
            SelectMetric::Accuracy => "accuracy",
            SelectMetric::MacroF1 => "macro_f1",
            SelectMetric::EntityF1 => "entity_f1",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Pooling {
    /// `last` for an `ar` backbone (its `[CLS]` sees nothing), `cls` otherwise.
    Auto,
    Cls,
    Mean,
    Last,
}

/// What fine-tuning trains.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Method {
    /// Every parameter.
    #[default]
    Full,
    /// The classification head only; the (pretrained) backbone stays frozen.
    LinearProbe,
    /// Low-rank updates of chosen projections (`[finetune.lora]`) and the head; backbone frozen.
    Lora,
    /// Bottleneck adapters in every layer (`[finetune.adapter]`) and the head; backbone frozen.
    Adapter,
    /// Learned key/value prefixes in every layer (`[finetune.prefix]`) and the head; backbone frozen.
    Prefix,
    /// No training: each label scored by its verbalizer in a template (`[finetune.prompt]`).
    ZeroShot,
    /// Prompt-based fine-tuning: the LM (backbone and LM head) trains on the labelled examples
    /// through the same template and verbalizer, cross-entropy over the labels' scores.
    Pet,
}

impl Method {
    pub fn name(self) -> &'static str {
        match self {
            Method::Full => "full",
            Method::LinearProbe => "linear_probe",
            Method::Lora => "lora",
            Method::Adapter => "adapter",
            Method::Prefix => "prefix",
            Method::ZeroShot => "zero_shot",
            Method::Pet => "pet",
        }
    }
}

/// A projection LoRA can update.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum LoraTarget {
    Query,
    Key,
    Value,
    Output,
    /// The feed-forward network's first projection.
    Up,
    /// The feed-forward network's second projection.
    Down,
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct LoraSection {
    #[serde(default = "default_lora_rank")]
    pub rank: usize,
    /// The update is scaled by alpha / rank.
    #[serde(default = "default_lora_alpha")]
    pub alpha: f64,
    #[serde(default)]
    pub dropout: f64,
    #[serde(default = "default_lora_targets")]
    pub targets: Vec<LoraTarget>,
}

impl Default for LoraSection {
    fn default() -> Self {
        Self {
            rank: default_lora_rank(),
            alpha: default_lora_alpha(),
            dropout: 0.0,
            targets: default_lora_targets(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct AdapterSection {
    /// Bottleneck width.
    #[serde(default = "default_adapter_size")]
    pub size: usize,
}

impl Default for AdapterSection {
    fn default() -> Self {
        Self {
            size: default_adapter_size(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct PrefixSection {
    /// Prefix keys and values per layer.
    #[serde(default = "default_prefix_length")]
    pub length: usize,
}

impl Default for PrefixSection {
    fn default() -> Self {
        Self {
            length: default_prefix_length(),
        }
    }
}

/// A cloze template and a word per label, for `method = "zero_shot"`.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct PromptSection {
    /// Text with the slots `{text}`, `{label}` (each once) and optionally `{text_pair}`.
    pub template: String,
    /// Label name → the word that stands for it in the `{label}` slot.
    pub verbalizer: std::collections::BTreeMap<String, String>,
}

fn default_lora_rank() -> usize {
    8
}
fn default_lora_alpha() -> f64 {
    16.0
}
fn default_lora_targets() -> Vec<LoraTarget> {
    vec![LoraTarget::Query, LoraTarget::Value]
}
fn default_adapter_size() -> usize {
    64
}
fn default_prefix_length() -> usize {
    16
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct FinetuneSection {
    #[serde(default)]
    pub method: Method,
    #[serde(default = "default_epochs")]
    pub epochs: usize,
    #[serde(default = "default_finetune_batch")]
    pub batch_size: usize,
    #[serde(default, skip_serializing_if = "Batching::is_random")]
    pub batching: Batching,
    /// Stop after this many epochs without a better dev score (0: never stop early).
    #[serde(default = "default_patience")]
    pub patience: usize,
    #[serde(default = "default_select")]
    pub select_metric: SelectMetric,
    #[serde(default = "default_pooling")]
    pub pooling: Pooling,
    #[serde(default)]
    pub optim: OptimSection,
    /// `method = "lora"` settings (defaults when absent).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lora: Option<LoraSection>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub adapter: Option<AdapterSection>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prefix: Option<PrefixSection>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prompt: Option<PromptSection>,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct EvalSection {
    #[serde(default = "default_eval_batch")]
    pub batch_size: usize,
}

impl Default for PretrainSection {
    fn default() -> Self {
        Self {
            objective: default_objective(),
            steps: None,
            epochs: None,
            batch_size: default_pretrain_batch(),
            batching: Batching::Random,
            packing: false,
            mask_prob: default_mask_prob(),
            validation_fraction: default_validation_fraction(),
            eval_every: default_eval_every(),
            optim: OptimSection::default(),
        }
    }
}

impl Default for FinetuneSection {
    fn default() -> Self {
        Self {
            method: Method::Full,
            epochs: default_epochs(),
            batch_size: default_finetune_batch(),
            batching: Batching::Random,
            patience: default_patience(),
            select_metric: default_select(),
            pooling: default_pooling(),
            optim: OptimSection::default(),
            lora: None,
            adapter: None,
            prefix: None,
            prompt: None,
        }
    }
}

impl Default for EvalSection {
    fn default() -> Self {
        Self {
            batch_size: default_eval_batch(),
        }
    }
}

pub const PRETRAIN_LR: f64 = 5e-4;
pub const FINETUNE_LR: f64 = 2e-4;
pub const DEFAULT_PRETRAIN_STEPS: usize = 500;

fn default_objective() -> Objective {
    Objective::Mlm
}
fn default_pretrain_batch() -> usize {
    32
}
fn default_mask_prob() -> f64 {
    0.15
}
fn default_validation_fraction() -> f64 {
    0.05
}
fn default_eval_every() -> usize {
    100
}
fn default_epochs() -> usize {
    10
}
fn default_finetune_batch() -> usize {
    32
}
fn default_patience() -> usize {
    3
}
fn default_select() -> SelectMetric {
    SelectMetric::Accuracy
}
fn default_pooling() -> Pooling {
    Pooling::Auto
}
fn default_eval_batch() -> usize {
    64
}
