//! Classification metrics from predicted and true class ids: accuracy, macro-F1, per-class
//! precision/recall/F1 and the confusion matrix (rows: true class, columns: predicted class).

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct PerClass {
    pub precision: f64,
    pub recall: f64,
    pub f1: f64,
    pub support: usize,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Scores {
    pub accuracy: f64,
    pub macro_f1: f64,
    pub per_class: Vec<PerClass>,
    /// `confusion[true][predicted]`.
    pub confusion: Vec<Vec<usize>>,
    pub n: usize,
    /// Token classification: entity-level scores (the fields above then count tokens).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub entities: Option<super::tagging::EntityScores>,
}

/// Precision, recall and F1 are 0 where undefined (no predictions / no support), as scikit-learn's
/// `zero_division=0`; macro-F1 averages over every class of the label set.
pub fn score(truth: &[usize], predicted: &[usize], classes: usize) -> Scores {
    let mut confusion = vec![vec![0usize; classes]; classes];
    for (&t, &p) in truth.iter().zip(predicted) {
        confusion[t][p] += 1;
    }
    let n = truth.len();
    let correct: usize = (0..classes).map(|c| confusion[c][c]).sum();
    let ratio = |a: usize, b: usize| if b == 0 { 0.0 } else { a as f64 / b as f64 };
    let per_class: Vec<PerClass> = (0..classes)
        .map(|c| {
            let tp = confusion[c][c];
            let predicted_c: usize = (0..classes).map(|t| confusion[t][c]).sum();
            let support: usize = confusion[c].iter().sum();
            let precision = ratio(tp, predicted_c);
            let recall = ratio(tp, support);
            let f1 = if precision + recall == 0.0 {
                0.0
            } else {
                2.0 * precision * recall / (precision + recall)
            };
            PerClass {
                precision,
                recall,
                f1,
                support,
            }
        })
        .collect();
    let macro_f1 = if classes == 0 {
        0.0
    } else {
        per_class.iter().map(|c| c.f1).sum::<f64>() / classes as f64
    };
    Scores {
        accuracy: ratio(correct, n),
        macro_f1,
        per_class,
        confusion,
        n,
        entities: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Reference values from scikit-learn:
    /// ```python
    /// from sklearn.metrics import accuracy_score, f1_score, precision_recall_fscore_support
    /// y = [0, 0, 0, 1, 1, 2, 2, 2, 2, 3]; p = [0, 1, 0, 1, 2, 2, 2, 0, 2, 0]
    /// accuracy_score(y, p)                                   # 0.6
    /// precision_recall_fscore_support(y, p, labels=[0,1,2,3], zero_division=0)
    /// # P = [0.5, 0.5, 0.75, 0.0]  R = [0.6667, 0.5, 0.75, 0.0]  F = [0.5714, 0.5, 0.75, 0.0]
    /// f1_score(y, p, average="macro", labels=[0,1,2,3], zero_division=0)  # 0.455357
    /// ```
    #[test]
    fn matches_scikit_learn() {
        let y = [0, 0, 0, 1, 1, 2, 2, 2, 2, 3];
        let p = [0, 1, 0, 1, 2, 2, 2, 0, 2, 0];
        let s = score(&y, &p, 4);
        assert!((s.accuracy - 0.6).abs() < 1e-12);
        let close = |a: f64, b: f64| (a - b).abs() < 1e-4;
        let expect = [
            (0.5, 2.0 / 3.0, 0.571_428_6),
            (0.5, 0.5, 0.5),
            (0.75, 0.75, 0.75),
            (0.0, 0.0, 0.0),
        ];
        for (c, (pr, re, f1)) in s.per_class.iter().zip(expect) {
            assert!(
                close(c.precision, pr) && close(c.recall, re) && close(c.f1, f1),
                "{c:?}"
            );
        }
        assert!(close(s.macro_f1, 0.455_357));
        assert_eq!(s.confusion[0], vec![2, 1, 0, 0]);
        assert_eq!(s.confusion[3], vec![1, 0, 0, 0]);
        assert_eq!(s.per_class[2].support, 4);
    }

    #[test]
    fn empty_input_scores_zero() {
        let s = score(&[], &[], 3);
        assert_eq!(s.accuracy, 0.0);
        assert_eq!(s.macro_f1, 0.0);
    }
}
