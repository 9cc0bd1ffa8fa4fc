//! Token ids for every split, and the numbers the report shows about them: sizes, skipped lines,
//! label distribution, token lengths, truncation and the unknown-token rate.

use serde::{Deserialize, Serialize};

use std::collections::BTreeMap;

use super::tasks::{Labelled, Tagged};
use crate::data::batch::rng;
use crate::data::{Datasets, Skipped, Split};
use crate::metrics::tagging::spans;
use crate::tokenizer::{TextTokenizer, TokenizerError};
use rand::seq::SliceRandom;

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SplitStats {
    pub name: String,
    pub examples: usize,
    pub skipped: usize,
    /// The first few skipped lines, with their reasons.
    pub skipped_lines: Vec<Skipped>,
    pub mean_tokens: f64,
    pub max_tokens: usize,
    pub truncated: usize,
    /// Share of non-special tokens that are `[UNK]`.
    pub unk_rate: f64,
    /// `length_counts[n]`: examples of `n` tokens.
    pub length_counts: Vec<usize>,
    /// `(label, count)` in label order; entities by type for token classification; empty for the corpus.
    pub labels: Vec<(String, usize)>,
}

pub struct Encoded {
    pub corpus: Vec<Vec<u32>>,
    pub train: Labelled,
    pub dev: Option<Labelled>,
    pub test: Option<Labelled>,
    pub pad_id: u32,
    pub stats: Vec<SplitStats>,
}

fn encode_split(
    name: &str,
    split: &Split,
    data: &Datasets,
    tok: &TextTokenizer,
    max_len: usize,
) -> Result<(Labelled, SplitStats), TokenizerError> {
    let mut ids = Vec::with_capacity(split.examples.len());
    let mut classes = Vec::with_capacity(split.examples.len());
    let (mut truncated, mut unk, mut tokens) = (0, 0usize, 0usize);
    let mut counts = vec![0usize; data.labels.len()];
    // Token classification (a labelled CoNLL split): positions and tag classes per sentence, and
    // entity counts by type for the label chart.
    let tagging = data.scheme.is_some() && name != "corpus";
    let mut tagged = Tagged {
        positions: Vec::new(),
        tags: Vec::new(),
    };
    let mut entity_counts: BTreeMap<String, usize> = BTreeMap::new();
    for e in &split.examples {
        let (seq, cut) = if tagging {
            let (seq, positions, cut) = tok.encode_words(&e.words, max_len)?;
            let tags = e.tags.iter().filter_map(|t| data.class_of(t)).collect();
            tagged.positions.push(positions);
            tagged.tags.push(tags);
            for s in spans(&e.tags) {
                *entity_counts.entry(s.kind.to_string()).or_default() += 1;
            }
            (seq, cut)
        } else {
            tok.encode(&e.text, e.text_pair.as_deref(), max_len)?
        };
        truncated += usize::from(cut);
        let body = seq.iter().filter(|&&t| !tok.specials.contains(t));
        for &t in body {
            tokens += 1;
            unk += usize::from(t == tok.specials.unk);
        }
        if let Some(class) = e.label.as_deref().and_then(|l| data.class_of(l)) {
            counts[class] += 1;
            classes.push(class);
        }
        ids.push(seq);
    }
    let lengths: Vec<usize> = ids.iter().map(Vec::len).collect();
    let stats = SplitStats {
        name: name.to_string(),
        examples: ids.len(),
        skipped: split.skipped.len(),
        skipped_lines: split.skipped.iter().take(10).cloned().collect(),
        mean_tokens: lengths.iter().sum::<usize>() as f64 / lengths.len().max(1) as f64,
        max_tokens: lengths.iter().copied().max().unwrap_or(0),
        truncated,
        unk_rate: unk as f64 / tokens.max(1) as f64,
        length_counts: counts_by_length(&lengths),
        labels: if name == "corpus" {
            Vec::new()
        } else if tagging {
            entity_counts.into_iter().collect()
        } else {
            data.labels.iter().cloned().zip(counts).collect()
        },
    };
    let tagged = tagging.then_some(tagged);
    Ok((
        Labelled {
            ids,
            classes,
            tagged,
        },
        stats,
    ))
}

fn counts_by_length(lengths: &[usize]) -> Vec<usize> {
    let mut counts = vec![0; lengths.iter().copied().max().map_or(0, |m| m + 1)];
    for &l in lengths {
        counts[l] += 1;
    }
    counts
}

pub fn encode_all(
    data: &Datasets,
    tok: &TextTokenizer,
    max_len: usize,
) -> Result<Encoded, TokenizerError> {
    let mut stats = Vec::new();
    let mut labelled = |name: &str, split: &Split| -> Result<Labelled, TokenizerError> {
        let (labelled, s) = encode_split(name, split, data, tok, max_len)?;
        stats.push(s);
        Ok(labelled)
    };
    let train = labelled("train", &data.train)?;
    let dev = data.dev.as_ref().map(|s| labelled("dev", s)).transpose()?;
    let test = data
        .test
        .as_ref()
        .map(|s| labelled("test", s))
        .transpose()?;
    let corpus = match &data.corpus {
        Some(split) => {
            let (labelled, s) = encode_split("corpus", split, data, tok, max_len)?;
            stats.insert(0, s);
            labelled.ids
        }
        None => Vec::new(),
    };
    Ok(Encoded {
        corpus,
        train,
        dev,
        test,
        pad_id: tok.specials.pad,
        stats,
    })
}

/// Splits the corpus into (train, validation), the validation share drawn at random with `seed`.
pub fn hold_out(corpus: &[Vec<u32>], fraction: f64, seed: u64) -> (Vec<Vec<u32>>, Vec<Vec<u32>>) {
    let mut order: Vec<usize> = (0..corpus.len()).collect();
    order.shuffle(&mut rng(seed, 4, 0));
    let n_val = if fraction > 0.0 && corpus.len() >= 2 {
        ((corpus.len() as f64 * fraction).ceil() as usize).clamp(1, corpus.len() - 1)
    } else {
        0
    };
    let (val, train) = order.split_at(n_val);
    let pick = |idx: &[usize]| idx.iter().map(|&i| corpus[i].clone()).collect();
    (pick(train), pick(val))
}
