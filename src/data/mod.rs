//! Data: reading the corpus and the labelled splits (`read`), the label set, and turning token ids into
//! padded batches with MLM or AR targets (`batch`). Nothing here knows about burn.

pub mod batch;
pub mod read;

use std::collections::BTreeSet;

pub use read::{DataError, Example, Skipped, Split};

use crate::config::Experiment;

/// Every split of an experiment, read and checked.
pub struct Datasets {
    pub corpus: Option<Split>,
    pub train: Split,
    pub dev: Option<Split>,
    pub test: Option<Split>,
    /// Sorted label names from the training split; a label's index is its class id.
    pub labels: Vec<String>,
}

impl Datasets {
    pub fn load(exp: &Experiment) -> Result<Self, DataError> {
        let d = &exp.raw.data;
        let resolve = |p: &str| exp.data_path(p);
        let read = |spec, labelled| read::read_source(spec, &resolve, d.on_error, labelled);
        let corpus = d.corpus.as_ref().map(|s| read(s, false)).transpose()?;
        let train = read(&d.train, true)?;
        let dev = d.dev.as_ref().map(|s| read(s, true)).transpose()?;
        let test = d.test.as_ref().map(|s| read(s, true)).transpose()?;
        if train.examples.is_empty() {
            let file = exp.data_path(d.train.paths.first().map_or("", String::as_str));
            return Err(DataError::Line {
                file,
                line: 0,
                message: "the training split has no usable examples".into(),
            });
        }
        let labels: Vec<String> = train
            .examples
            .iter()
            .filter_map(|e| e.label.clone())
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect();
        for split in [&dev, &test].into_iter().flatten() {
            check_labels(split, &labels)?;
        }
        Ok(Self {
            corpus,
            train,
            dev,
            test,
            labels,
        })
    }

    pub fn class_of(&self, label: &str) -> Option<usize> {
        self.labels.binary_search_by(|l| l.as_str().cmp(label)).ok()
    }

    /// Texts the tokenizer learns from: the corpus, or the training split when there is none.
    pub fn tokenizer_texts(&self) -> impl Iterator<Item = &str> {
        let split = self.corpus.as_ref().unwrap_or(&self.train);
        split
            .examples
            .iter()
            .flat_map(|e| std::iter::once(e.text.as_str()).chain(e.text_pair.as_deref()))
    }
}

/// Every dev/test example whose label the training split lacks, reported together.
fn check_labels(split: &Split, labels: &[String]) -> Result<(), DataError> {
    let unseen: Vec<&Example> = split
        .examples
        .iter()
        .filter(|e| {
            e.label
                .as_ref()
                .is_some_and(|l| labels.binary_search(l).is_err())
        })
        .collect();
    if unseen.is_empty() {
        return Ok(());
    }
    let mut shown: Vec<&str> = labels.iter().take(12).map(String::as_str).collect();
    if labels.len() > 12 {
        shown.push("…");
    }
    Err(DataError::Lines {
        problems: unseen
            .iter()
            .map(|e| {
                let label = e.label.as_deref().unwrap_or_default();
                let msg = format!("label {label:?} does not occur in the training split");
                (e.file.to_path_buf(), e.line, msg)
            })
            .collect(),
        hint: format!("(the training split's labels: {})", shown.join(", ")),
    })
}
