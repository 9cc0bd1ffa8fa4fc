//! Entity-level scores for token classification: spans decoded from tag sequences the way
//! conlleval (and seqeval's default mode) does, precision/recall/F1 by exact span match, micro over
//! all entities and per entity type.

use serde::{Deserialize, Serialize};

use super::classification::PerClass;

/// An entity: tokens `start..end` of type `kind`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Span<'a> {
    pub start: usize,
    pub end: usize,
    pub kind: &'a str,
}

/// The entities of one tag sequence. BIO, BIOES and BMES decode alike (`M-` is `I-`): an entity
/// starts at `B-`/`S-`, or at `I-`/`E-` that does not continue an entity of its type; it ends at
/// `E-`/`S-`, or before `O`, `B-`, `S-` or a change of type. Ill-formed predictions thus still
/// yield spans, as conlleval reads them.
pub fn spans<S: AsRef<str>>(tags: &[S]) -> Vec<Span<'_>> {
    let mut out = Vec::new();
    let mut current: Option<(usize, &str)> = None;
    for (i, tag) in tags.iter().enumerate() {
        let tag = tag.as_ref();
        let (prefix, kind) = match tag.split_once('-') {
            Some((p, k)) if tag != "O" => (if p == "M" { "I" } else { p }, k),
            _ => ("O", ""),
        };
        if let Some((start, k)) = current {
            if matches!(prefix, "O" | "B" | "S") || k != kind {
                out.push(Span {
                    start,
                    end: i,
                    kind: k,
                });
                current = None;
            }
        }
        match prefix {
            "B" | "S" => current = Some((i, kind)),
            "I" | "E" if current.is_none() => current = Some((i, kind)),
            _ => {}
        }
        if matches!(prefix, "E" | "S") {
            if let Some((start, k)) = current.take() {
                out.push(Span {
                    start,
                    end: i + 1,
                    kind: k,
                });
            }
        }
    }
    if let Some((start, kind)) = current {
        out.push(Span {
            start,
            end: tags.len(),
            kind,
        });
    }
    out
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct EntityScores {
    /// Micro-averaged over all entities.
    pub precision: f64,
    pub recall: f64,
    pub f1: f64,
    /// Mean F1 over the entity types that occur in the gold or predicted tags.
    pub macro_f1: f64,
    /// Entities in the gold tags, in the predictions, and predicted exactly (span and type).
    pub gold: usize,
    pub predicted: usize,
    pub correct: usize,
    /// Per entity type, sorted by name; `support` counts gold entities.
    pub per_type: Vec<(String, PerClass)>,
}

fn prf(correct: usize, predicted: usize, gold: usize) -> (f64, f64, f64) {
    let ratio = |a: usize, b: usize| if b == 0 { 0.0 } else { a as f64 / b as f64 };
    let (p, r) = (ratio(correct, predicted), ratio(correct, gold));
    let f = if p + r == 0.0 {
        0.0
    } else {
        2.0 * p * r / (p + r)
    };
    (p, r, f)
}

/// Exact-match entity scores of `predicted` against `gold`, sentence by sentence (each pair of the
/// same length).
pub fn score_entities<S: AsRef<str>, T: AsRef<str>>(
    gold: &[Vec<S>],
    predicted: &[Vec<T>],
) -> EntityScores {
    use std::collections::BTreeMap;
    // (gold, predicted, correct) per type.
    let mut counts: BTreeMap<String, (usize, usize, usize)> = BTreeMap::new();
    for (g, p) in gold.iter().zip(predicted) {
        let (g, p) = (spans(g), spans(p));
        for s in &g {
            counts.entry(s.kind.to_string()).or_default().0 += 1;
        }
        for s in &p {
            let c = counts.entry(s.kind.to_string()).or_default();
            c.1 += 1;
            if g.contains(s) {
                c.2 += 1;
            }
        }
    }
    let total = counts
        .values()
        .fold((0, 0, 0), |a, c| (a.0 + c.0, a.1 + c.1, a.2 + c.2));
    let (precision, recall, f1) = prf(total.2, total.1, total.0);
    let per_type: Vec<(String, PerClass)> = counts
        .into_iter()
        .map(|(kind, (g, p, c))| {
            let (precision, recall, f1) = prf(c, p, g);
            let scores = PerClass {
                precision,
                recall,
                f1,
                support: g,
            };
            (kind, scores)
        })
        .collect();
    let macro_f1 = if per_type.is_empty() {
        0.0
    } else {
        per_type.iter().map(|(_, s)| s.f1).sum::<f64>() / per_type.len() as f64
    };
    EntityScores {
        precision,
        recall,
        f1,
        macro_f1,
        gold: total.0,
        predicted: total.1,
        correct: total.2,
        per_type,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(s: &str) -> Vec<&str> {
        s.split(' ').collect()
    }

    fn spans_of(s: &str) -> Vec<(usize, usize, String)> {
        spans(&v(s))
            .into_iter()
            .map(|s| (s.start, s.end, s.kind.to_string()))
            .collect()
    }

    fn want(v: &[(usize, usize, &str)]) -> Vec<(usize, usize, String)> {
        v.iter().map(|&(a, b, k)| (a, b, k.to_string())).collect()
    }

    #[test]
    fn decodes_every_scheme_and_ill_formed_predictions() {
        // BMES (ResumeNER): a 3-character name, a single-character entity, an organisation.
        assert_eq!(
            spans_of("B-NAME M-NAME E-NAME O S-RACE B-ORG E-ORG"),
            want(&[(0, 3, "NAME"), (4, 5, "RACE"), (5, 7, "ORG")])
        );
        // BIO: B- after I- of the same type starts a new entity.
        assert_eq!(
            spans_of("B-PER I-PER B-PER O B-LOC"),
            want(&[(0, 2, "PER"), (2, 3, "PER"), (4, 5, "LOC")])
        );
        // BIOES with a type change inside and an entity running to the end.
        assert_eq!(
            spans_of("B-ORG E-ORG S-LOC B-PER I-PER"),
            want(&[(0, 2, "ORG"), (2, 3, "LOC"), (3, 5, "PER")])
        );
        // Ill-formed: I- after O starts an entity (conlleval); a type change splits; a lone E- is one token.
        assert_eq!(
            spans_of("O I-PER I-PER I-LOC O E-ORG M-ORG"),
            want(&[(1, 3, "PER"), (3, 4, "LOC"), (5, 6, "ORG"), (6, 7, "ORG")])
        );
        assert!(spans_of("O O O").is_empty());
    }

    /// seqeval's README example:
    /// ```python
    /// from seqeval.metrics import f1_score, classification_report
    /// y_true = [['O','O','O','B-MISC','I-MISC','I-MISC','O'], ['B-PER','I-PER','O']]
    /// y_pred = [['O','O','B-MISC','I-MISC','I-MISC','I-MISC','O'], ['B-PER','I-PER','O']]
    /// f1_score(y_true, y_pred)  # 0.50
    /// # MISC: P 0.00 R 0.00 F 0.00 support 1;  PER: P 1.00 R 1.00 F 1.00 support 1
    /// ```
    #[test]
    fn matches_seqeval() {
        let gold = vec![v("O O O B-MISC I-MISC I-MISC O"), v("B-PER I-PER O")];
        let pred = vec![v("O O B-MISC I-MISC I-MISC I-MISC O"), v("B-PER I-PER O")];
        let s = score_entities(&gold, &pred);
        assert_eq!((s.gold, s.predicted, s.correct), (2, 2, 1));
        assert!((s.precision - 0.5).abs() < 1e-12 && (s.recall - 0.5).abs() < 1e-12);
        assert!((s.f1 - 0.5).abs() < 1e-12);
        assert_eq!(s.per_type[0].0, "MISC");
        assert_eq!(s.per_type[0].1.f1, 0.0);
        assert_eq!(s.per_type[1].0, "PER");
        assert_eq!(s.per_type[1].1.f1, 1.0);
        assert!((s.macro_f1 - 0.5).abs() < 1e-12);
        // Precision and recall differ when the counts do: 3 gold, 2 predicted, 2 correct.
        let gold = vec![v("S-A O B-B E-B O S-C")];
        let pred = vec![v("S-A O B-B E-B O O")];
        let s = score_entities(&gold, &pred);
        assert_eq!((s.precision, s.recall), (1.0, 2.0 / 3.0));
        assert!((s.f1 - 0.8).abs() < 1e-12);
        let none = score_entities::<&str, &str>(&[], &[]);
        assert_eq!((none.f1, none.gold), (0.0, 0));
    }
}
