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
    /// CoNLL-style token classification: one token and its tag per line (the first and the last
    /// whitespace-separated column), a blank line between sentences. `.conll`, `.bio`, `.bioes`,
    /// `.bmes`, `.iob` files are read this way under `auto`.
    Conll,
}

impl Format {
    /// `auto` decided by the file's extension.
    pub fn resolve(self, file: &std::path::Path) -> Format {
        if self != Format::Auto {
            return self;
        }
        match file.extension().and_then(|e| e.to_str()) {
            Some("json" | "jsonl" | "ndjson") => Format::Jsonl,
            Some("csv") => Format::Csv,
            Some("tsv") => Format::Tsv,
            Some("conll" | "bio" | "bioes" | "bmes" | "iob") => Format::Conll,
            _ => Format::Text,
        }
    }
}

/// How the tags of a CoNLL file mark entity spans.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum TagScheme {
    /// `B-` begins an entity, `I-` continues it, `O` is outside.
    Bio,
    /// BIO plus `E-` (end) and `S-` (single-token entity).
    Bioes,
    /// `B-`/`M-`/`E-`/`S-`, `O` (BIOES with `M-` for inside), the usual Chinese NER tagging.
    Bmes,
}

impl TagScheme {
    pub fn name(self) -> &'static str {
        match self {
            TagScheme::Bio => "bio",
            TagScheme::Bioes => "bioes",
            TagScheme::Bmes => "bmes",
        }
    }

    /// The prefixes (before `-TYPE`) this scheme allows.
    pub fn prefixes(self) -> &'static [char] {
        match self {
            TagScheme::Bio => &['B', 'I'],
            TagScheme::Bioes => &['B', 'I', 'E', 'S'],
            TagScheme::Bmes => &['B', 'M', 'E', 'S'],
        }
    }
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
    /// Token classification (CoNLL files): the tagging scheme. Detected from the training tags
    /// when absent (`M-` → bmes, `E-`/`S-` with `I-` → bioes, else bio); every tag is checked against it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tag_scheme: Option<TagScheme>,
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

impl DataSection {
    /// Whether the labelled splits are CoNLL token-classification files (decided by the training split).
    pub fn tagging(&self) -> bool {
        self.train.conll()
    }
}

impl SourceSpec {
    /// Whether these files are read as CoNLL (by `format`, or by the first path's extension).
    pub fn conll(&self) -> bool {
        self.paths
            .first()
            .is_some_and(|p| self.format.resolve(std::path::Path::new(p)) == Format::Conll)
    }
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
