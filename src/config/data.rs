//! `[data]`: where the corpus and the labelled splits come from and how their fields map to text and label.

use serde::{Deserialize, Serialize};

/// What a reader does with an empty text or a malformed line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum OnError {
    /// Skip the line, count it, and list the first few in the report.
    Skip,
    /// Stop with an error naming the file and line.
    Error,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Format {
    /// From the extension: `.json`/`.jsonl` → jsonl, `.csv`, `.tsv`, anything else → text.
    Auto,
    Jsonl,
    Csv,
    Tsv,
    /// One text per line, no fields.
    Text,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct DataSection {
    /// Base folder of every `paths` entry, relative to the experiment file.
    /// `XRUN_DATA_ROOT` replaces it; `--set data.root=…` replaces both.
    #[serde(default = "default_root")]
    pub root: String,
    #[serde(default = "default_on_error")]
    pub on_error: OnError,
    /// Fills `{split}` in every path (a number or a name); usually set by `[sweep] split = [...]`.
    pub split: Option<toml::Value>,
    /// Label efficiency: fine-tune on this many examples drawn from the training split, a different
    /// draw for each `experiment.seed` …
    pub train_examples: Option<usize>,
    /// … or on this share of it (rounded up).
    pub train_fraction: Option<f64>,
    /// Draw as evenly from every label as the split allows.
    #[serde(default)]
    pub balanced: bool,
    /// Unlabeled text for pretraining and for training the tokenizer.
    pub corpus: Option<SourceSpec>,
    pub train: SourceSpec,
    pub dev: Option<SourceSpec>,
    pub test: Option<SourceSpec>,
}

/// One or more files read the same way.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct SourceSpec {
    pub paths: Vec<String>,
    #[serde(default = "default_format")]
    pub format: Format,
    /// Field (JSON key or CSV column) holding the text; ignored for `text` files.
    #[serde(default = "default_text_field")]
    pub text: String,
    /// Field holding the second text of a sentence pair (joined `[CLS] a [SEP] b [SEP]`).
    pub text_pair: Option<String>,
    /// Field holding the label; required for train/dev/test, ignored for the corpus.
    pub label: Option<String>,
    /// Read at most this many examples (after skipping bad lines), in file order.
    pub limit: Option<usize>,
}

fn default_root() -> String {
    ".".into()
}
fn default_on_error() -> OnError {
    OnError::Error
}
fn default_format() -> Format {
    Format::Auto
}
fn default_text_field() -> String {
    "text".into()
}
