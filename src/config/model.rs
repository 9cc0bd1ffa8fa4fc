//! `[tokenizer]` and `[model]`: how text becomes ids and the Transformer encoder that reads them.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum TokenizerKind {
    /// BERT-style WordPiece; CJK characters are split one per token.
    Wordpiece,
    /// Byte-level BPE (GPT-2 style).
    Bpe,
    /// Load an existing `tokenizer.json` from `path`.
    File,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct TokenizerSection {
    #[serde(default = "default_kind")]
    pub kind: TokenizerKind,
    /// Requested size; the trained vocabulary may be smaller and the model is sized from it.
    #[serde(default = "default_vocab")]
    pub vocab_size: usize,
    #[serde(default = "default_min_frequency")]
    pub min_frequency: u64,
    #[serde(default = "default_true")]
    pub lowercase: bool,
    /// Most distinct characters WordPiece keeps; defaults to `vocab_size` (the trainer's own 1000
    /// turns ~12% of Chinese tokens into `[UNK]`).
    pub limit_alphabet: Option<usize>,
    /// For `kind = "file"`: a `tokenizer.json`, relative to the experiment file.
    pub path: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum NormPlacement {
    /// LayerNorm before attention and feed-forward, plus a final one (GPT-2).
    Pre,
    /// LayerNorm after each residual sum, plus one on the embeddings (BERT).
    Post,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ModelSection {
    #[serde(default = "default_d_model")]
    pub d_model: usize,
    #[serde(default = "default_layers")]
    pub layers: usize,
    #[serde(default = "default_heads")]
    pub heads: usize,
    #[serde(default = "default_d_ff")]
    pub d_ff: usize,
    /// Longest sequence in tokens, `[CLS]` and `[SEP]` included; longer texts are truncated.
    #[serde(default = "default_max_len")]
    pub max_len: usize,
    #[serde(default = "default_dropout")]
    pub dropout: f64,
    #[serde(default = "default_norm")]
    pub norm: NormPlacement,
    /// Segment (token-type) embeddings, BERT's sentence A / sentence B: `[CLS] a [SEP]` is segment
    /// 0, `b [SEP]` segment 1. Default: on when `data.train.text_pair` is set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub segments: Option<bool>,
    /// Start from a Hugging Face checkpoint: `init = { hf = "path/to/dir" }` (a directory with
    /// `config.json`, `model.safetensors` and `tokenizer.json` or `vocab.txt`, relative to the
    /// experiment file). Its `config.json` sets the shape; `[tokenizer]` is its tokenizer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub init: Option<InitSection>,
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct InitSection {
    pub hf: String,
}

impl Default for TokenizerSection {
    fn default() -> Self {
        Self {
            kind: default_kind(),
            vocab_size: default_vocab(),
            min_frequency: default_min_frequency(),
            lowercase: true,
            limit_alphabet: None,
            path: None,
        }
    }
}

impl Default for ModelSection {
    fn default() -> Self {
        Self {
            d_model: default_d_model(),
            layers: default_layers(),
            heads: default_heads(),
            d_ff: default_d_ff(),
            max_len: default_max_len(),
            dropout: default_dropout(),
            norm: default_norm(),
            segments: None,
            init: None,
        }
    }
}

fn default_kind() -> TokenizerKind {
    TokenizerKind::Wordpiece
}
fn default_vocab() -> usize {
    8000
}
fn default_min_frequency() -> u64 {
    2
}
fn default_true() -> bool {
    true
}
fn default_d_model() -> usize {
    128
}
fn default_layers() -> usize {
    2
}
fn default_heads() -> usize {
    4
}
fn default_d_ff() -> usize {
    512
}
fn default_max_len() -> usize {
    64
}
fn default_dropout() -> f64 {
    0.1
}
fn default_norm() -> NormPlacement {
    NormPlacement::Pre
}
