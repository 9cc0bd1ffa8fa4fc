//! Data: reading the corpus and the labelled splits (`read`), the label set, and turning token ids into
//! padded batches with MLM or AR targets (`batch`). Nothing here knows about burn.

pub mod batch;
pub mod read;

use std::collections::BTreeSet;

pub use read::{DataError, Example, Skipped, Split};

use crate::config::data::{SourceSpec, TagScheme};
use crate::config::Experiment;

/// Seeds the label-efficiency draw (a stream of its own, beside shuffling and masking).
const SAMPLING: u64 = 5;

/// Every split of an experiment, read and checked.
pub struct Datasets {
    pub corpus: Option<Split>,
    pub train: Split,
    pub dev: Option<Split>,
    pub test: Option<Split>,
    /// Sorted label names from the training split; a label's index is its class id. For token
    /// classification: every tag of every labelled split (a tag the training split lacks still
    /// counts against recall).
    pub labels: Vec<String>,
    /// Token classification: the tagging scheme, given or detected.
    pub scheme: Option<TagScheme>,
}

impl Datasets {
    pub fn load(exp: &Experiment) -> Result<Self, DataError> {
        let d = &exp.raw.data;
        Self::read(
            exp,
            d.corpus.as_ref(),
            &d.train,
            d.dev.as_ref(),
            d.test.as_ref(),
        )
    }

    /// A later task of a continual-learning sequence: its own splits and label set, no corpus.
    pub fn load_task(
        exp: &Experiment,
        task: &crate::config::continual::TaskSpec,
    ) -> Result<Self, DataError> {
        Self::read(
            exp,
            None,
            &task.train,
            task.dev.as_ref(),
            task.test.as_ref(),
        )
    }

    fn read(
        exp: &Experiment,
        corpus: Option<&SourceSpec>,
        train_spec: &SourceSpec,
        dev: Option<&SourceSpec>,
        test: Option<&SourceSpec>,
    ) -> Result<Self, DataError> {
        let d = &exp.raw.data;
        let resolve = |p: &str| exp.data_path(p);
        let read = |spec, labelled| read::read_source(spec, &resolve, d.on_error, labelled);
        let corpus = corpus.map(|s| read(s, false)).transpose()?;
        let train = read(train_spec, true)?;
        let dev = dev.map(|s| read(s, true)).transpose()?;
        let test = test.map(|s| read(s, true)).transpose()?;
        if train.examples.is_empty() {
            let file = exp.data_path(train_spec.paths.first().map_or("", String::as_str));
            return Err(DataError::Line {
                file,
                line: 0,
                message: "the training split has no usable examples".into(),
            });
        }
        if train_spec.conll() {
            let splits: Vec<&Split> = [Some(&train), dev.as_ref(), test.as_ref()]
                .into_iter()
                .flatten()
                .collect();
            let scheme = d.tag_scheme.unwrap_or_else(|| detect_scheme(&train));
            check_tags(&splits, scheme)?;
            // `O` always has a class: words cut by truncation are predicted as it.
            let labels = splits
                .iter()
                .flat_map(|s| s.examples.iter().flat_map(|e| e.tags.iter().cloned()))
                .chain(std::iter::once("O".to_string()))
                .collect::<BTreeSet<_>>()
                .into_iter()
                .collect();
            return Ok(Self {
                corpus,
                train,
                dev,
                test,
                labels,
                scheme: Some(scheme),
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
            scheme: None,
        })
    }

    /// Keeps `n` training examples drawn with `seed` (file order kept). `balanced` takes them in turn
    /// from each label's shuffled examples, so every label gets the same number as far as it has them.
    /// The label set stays that of the whole split.
    pub fn sample_train(&mut self, n: usize, balanced: bool, seed: u64) -> Result<(), DataError> {
        use rand::seq::SliceRandom;
        let total = self.train.examples.len();
        if n > total {
            let first = &self.train.examples[0];
            return Err(DataError::Line {
                file: first.file.as_ref().clone(),
                line: 0,
                message: format!(
                    "`data.train_examples` = {n}, but the training split has {total} examples"
                ),
            });
        }
        // A sentence of tags has no one label to balance by.
        let mut keep: Vec<usize> = if balanced && self.scheme.is_none() {
            let mut by_class: Vec<Vec<usize>> = vec![Vec::new(); self.labels.len()];
            for (i, e) in self.train.examples.iter().enumerate() {
                if let Some(c) = e.label.as_deref().and_then(|l| self.class_of(l)) {
                    by_class[c].push(i);
                }
            }
            for (c, rows) in by_class.iter_mut().enumerate() {
                rows.shuffle(&mut batch::rng(seed, SAMPLING, c as u64));
            }
            let mut out = Vec::with_capacity(n);
            for round in 0.. {
                if out.len() == n {
                    break;
                }
                for rows in &by_class {
                    if let Some(&i) = rows.get(round).filter(|_| out.len() < n) {
                        out.push(i);
                    }
                }
            }
            out
        } else {
            let mut all: Vec<usize> = (0..total).collect();
            all.shuffle(&mut batch::rng(seed, SAMPLING, u64::MAX));
            all.truncate(n);
            all
        };
        keep.sort_unstable();
        let mut examples = std::mem::take(&mut self.train.examples);
        let mut kept = Vec::with_capacity(n);
        for (i, e) in examples.drain(..).enumerate() {
            if keep.binary_search(&i).is_ok() {
                kept.push(e);
            }
        }
        self.train.examples = kept;
        Ok(())
    }

    /// How many training examples `data.train_examples` / `train_fraction` ask for, if either.
    pub fn requested_train(&self, exp: &Experiment) -> Option<usize> {
        let d = &exp.raw.data;
        let total = self.train.examples.len();
        d.train_examples.or_else(|| {
            d.train_fraction
                .map(|f| ((f * total as f64).ceil() as usize).max(1))
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

/// The scheme the training tags are written in: `M-` only occurs in BMES, `I-` with `E-`/`S-` in
/// BIOES; anything else reads as BIO (whose check then names any `E-`/`S-`/`M-` tag).
fn detect_scheme(train: &Split) -> TagScheme {
    let has = |p: &str| {
        train
            .examples
            .iter()
            .any(|e| e.tags.iter().any(|t| t.starts_with(p)))
    };
    if has("M-") {
        TagScheme::Bmes
    } else if has("E-") || has("S-") {
        if has("I-") || !has("B-") {
            TagScheme::Bioes
        } else {
            // B-, E-, S- without I- or M-: BMES and BIOES read the same; BMES is the usual name.
            TagScheme::Bmes
        }
    } else {
        TagScheme::Bio
    }
}

/// Every tag whose prefix the scheme does not have, reported together with its line (a sentence's
/// tokens are on consecutive lines from `Example::line`).
fn check_tags(splits: &[&Split], scheme: TagScheme) -> Result<(), DataError> {
    let allowed = scheme.prefixes();
    let mut problems = Vec::new();
    for split in splits {
        for e in &split.examples {
            for (i, tag) in e.tags.iter().enumerate() {
                let prefix = tag.chars().next().unwrap_or('O');
                if tag != "O" && !allowed.contains(&prefix) {
                    problems.push((
                        e.file.to_path_buf(),
                        e.line + i,
                        format!("tag {tag:?} is not a {} tag", scheme.name().to_uppercase()),
                    ));
                }
            }
        }
    }
    if problems.is_empty() {
        return Ok(());
    }
    let prefixes: Vec<String> = allowed.iter().map(|p| format!("{p}-")).collect();
    Err(DataError::Lines {
        problems,
        hint: format!(
            "(data.tag_scheme = \"{}\" allows O and {}; set data.tag_scheme to the file's scheme)",
            scheme.name(),
            prefixes.join(", ")
        ),
    })
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;
    use std::sync::Arc;

    /// 12 examples: labels a ×8, b ×3, c ×1, in that order in the file.
    fn datasets() -> Datasets {
        let file = Arc::new(PathBuf::from("train.jsonl"));
        let labels = ["a", "a", "b", "a", "a", "c", "a", "b", "a", "a", "b", "a"];
        let examples = labels
            .iter()
            .enumerate()
            .map(|(i, l)| Example {
                text: format!("t{i}"),
                text_pair: None,
                label: Some(l.to_string()),
                file: file.clone(),
                line: i + 1,
                ..Example::default()
            })
            .collect();
        Datasets {
            corpus: None,
            train: Split {
                examples,
                skipped: Vec::new(),
            },
            dev: None,
            test: None,
            labels: vec!["a".into(), "b".into(), "c".into()],
            scheme: None,
        }
    }

    fn drawn(n: usize, balanced: bool, seed: u64) -> Vec<usize> {
        let mut d = datasets();
        d.sample_train(n, balanced, seed).expect("enough examples");
        d.train.examples.iter().map(|e| e.line).collect()
    }

    #[test]
    fn draws_are_seeded_balanced_and_in_file_order() {
        let a = drawn(6, true, 1);
        assert_eq!(a, drawn(6, true, 1), "same seed, same draw");
        assert_ne!(a, drawn(6, true, 2), "another seed, another draw");
        assert!(a.windows(2).all(|w| w[0] < w[1]), "file order kept: {a:?}");
        let d = datasets();
        let label = |line: usize| d.train.examples[line - 1].label.clone().unwrap();
        let count = |l: &str| a.iter().filter(|&&i| label(i) == l).count();
        // Round robin: a, b, c, a, b, a — c has only one example.
        assert_eq!((count("a"), count("b"), count("c")), (3, 2, 1));
        assert_eq!(drawn(12, false, 3).len(), 12);
        let mut too_many = datasets();
        let err = too_many.sample_train(13, false, 1).expect_err("only 12");
        assert!(err.to_string().contains("has 12 examples"), "{err}");
    }

    fn tagged(sentences: &[&str]) -> Split {
        let file = Arc::new(PathBuf::from("t.conll"));
        let mut line = 1;
        let examples = sentences
            .iter()
            .map(|s| {
                let tags: Vec<String> = s.split(' ').map(str::to_string).collect();
                let e = Example {
                    words: tags.iter().map(|_| "x".to_string()).collect(),
                    tags,
                    file: file.clone(),
                    line,
                    ..Example::default()
                };
                line += e.tags.len() + 1;
                e
            })
            .collect();
        Split {
            examples,
            skipped: Vec::new(),
        }
    }

    #[test]
    fn tag_schemes_are_detected_and_enforced() {
        let bmes = tagged(&["B-NAME M-NAME E-NAME O", "S-RACE O"]);
        let bioes = tagged(&["B-PER I-PER E-PER", "S-LOC"]);
        let bio = tagged(&["B-PER I-PER O", "B-LOC"]);
        assert_eq!(detect_scheme(&bmes), TagScheme::Bmes);
        assert_eq!(detect_scheme(&bioes), TagScheme::Bioes);
        assert_eq!(detect_scheme(&bio), TagScheme::Bio);
        assert!(check_tags(&[&bmes], TagScheme::Bmes).is_ok());
        // BIO tags are valid BIOES; BMES tags are not BIO: each bad tag is named with its line.
        assert!(check_tags(&[&bio], TagScheme::Bioes).is_ok());
        let err = check_tags(&[&bmes], TagScheme::Bio)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("t.conll:2: tag \"M-NAME\" is not a BIO tag"),
            "{err}"
        );
        assert!(err.contains("t.conll:3: tag \"E-NAME\""), "{err}");
        assert!(err.contains("t.conll:6: tag \"S-RACE\""), "{err}");
        assert!(err.contains("allows O and B-, I-"), "{err}");
    }
}
