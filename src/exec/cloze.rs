//! Zero-shot classification with a pretrained LM: every example is put into a template, and each
//! label is scored by how likely the LM finds its verbalizer (a word per label) in the template's
//! label slot. No labelled example is used.
//!
//! - MLM backbone (cloze, as in PET, Schick & Schütze 2021, https://arxiv.org/abs/2001.07676): the
//!   slot holds as many `[MASK]`s as the verbalizer has tokens; the score is the sum of the log
//!   probabilities of the verbalizer's tokens at those positions. Labels whose verbalizers have the
//!   same length share one forward pass.
//! - AR backbone: the slot holds the verbalizer itself; the score is the log-likelihood of its
//!   tokens given everything before them (one forward pass per label).
//!
//! `ClozeTask` fine-tunes the whole LM on these scores (`method = "pet"`, PET without its
//! ensemble and distillation steps).

use burn::nn::loss::CrossEntropyLossConfig;
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{Int, Tensor, TensorData};

use super::tasks::{dev_evaluation, ids_tensor};
use crate::config::train::{Batching, PromptSection, SelectMetric};
use crate::data::batch::{self, Padded};
use crate::data::read::Example;
use crate::metrics::classification::score;
use crate::model::LmModel;
use crate::tokenizer::TextTokenizer;
use crate::train::{Evaluation, Task};

enum Piece {
    Tokens(Vec<u32>),
    Text,
    Pair,
    Label,
}

/// A template split into its literal parts and slots, and each class's verbalizer tokens.
pub struct Prompt {
    pieces: Vec<Piece>,
    /// Per class, in label order.
    pub verbalizers: Vec<Vec<u32>>,
}

impl Prompt {
    /// Tokenizes the template and the verbalizers; every label needs a verbalizer that the
    /// vocabulary can spell without `[UNK]`.
    pub fn new(p: &PromptSection, tok: &TextTokenizer, labels: &[String]) -> Result<Self, String> {
        let mut pieces = Vec::new();
        let mut rest = p.template.as_str();
        while let Some(open) = rest.find('{') {
            let close = rest[open..].find('}').map(|c| open + c).ok_or_else(|| {
                format!(
                    "finetune.prompt.template: `{{` without `}}` in `{}`",
                    p.template
                )
            })?;
            if open > 0 {
                pieces.push(Piece::Tokens(
                    tok.ids(&rest[..open]).map_err(|e| e.to_string())?,
                ));
            }
            pieces.push(match &rest[open + 1..close] {
                "text" => Piece::Text,
                "text_pair" => Piece::Pair,
                "label" => Piece::Label,
                other => {
                    return Err(format!(
                        "finetune.prompt.template: unknown slot `{{{other}}}` (use {{text}}, \
                         {{text_pair}} and {{label}})"
                    ))
                }
            });
            rest = &rest[close + 1..];
        }
        if !rest.is_empty() {
            pieces.push(Piece::Tokens(tok.ids(rest).map_err(|e| e.to_string())?));
        }
        for (slot, piece) in [("{text}", Piece::Text), ("{label}", Piece::Label)] {
            let n = pieces
                .iter()
                .filter(|p| std::mem::discriminant(*p) == std::mem::discriminant(&piece))
                .count();
            if n != 1 {
                return Err(format!(
                    "finetune.prompt.template must hold {slot} exactly once, found {n}: `{}`",
                    p.template
                ));
            }
        }
        let mut verbalizers = Vec::with_capacity(labels.len());
        for label in labels {
            let word = p.verbalizer.get(label).ok_or_else(|| {
                format!(
                    "finetune.prompt.verbalizer has no word for the label `{label}` (labels: {})",
                    labels.join(", ")
                )
            })?;
            let ids = tok.ids(word).map_err(|e| e.to_string())?;
            if ids.is_empty() || ids.contains(&tok.specials.unk) {
                return Err(format!(
                    "finetune.prompt.verbalizer: `{label}` = \"{word}\" has no tokens or an \
                     unknown one in this tokenizer's vocabulary"
                ));
            }
            verbalizers.push(ids);
        }
        Ok(Self {
            pieces,
            verbalizers,
        })
    }

    /// `[CLS] template [SEP]` with `fill` in the label slot, the text cut so that it fits in
    /// `max_len`; also where the label slot starts.
    fn encode(
        &self,
        tok: &TextTokenizer,
        text: &[u32],
        pair: &[u32],
        fill: &[u32],
        max_len: usize,
    ) -> (Vec<u32>, usize) {
        let fixed: usize = self
            .pieces
            .iter()
            .map(|p| match p {
                Piece::Tokens(t) => t.len(),
                Piece::Label => fill.len(),
                Piece::Pair => pair.len(),
                Piece::Text => 0,
            })
            .sum::<usize>()
            + 2;
        let room = max_len.saturating_sub(fixed);
        let text = &text[..text.len().min(room)];
        let mut out = vec![tok.specials.cls];
        let mut start = 0;
        for p in &self.pieces {
            match p {
                Piece::Tokens(t) => out.extend(t),
                Piece::Text => out.extend(text),
                Piece::Pair => out.extend(pair),
                Piece::Label => {
                    start = out.len();
                    out.extend(fill);
                }
            }
        }
        out.push(tok.specials.sep);
        (out, start)
    }
}

/// Summed log-probabilities of `targets[i]` at flat `positions[i]` of `padded`, `per`
/// consecutive entries a sum: `[positions.len() / per]`.
fn summed_log_probs<B: Backend>(
    model: &LmModel<B>,
    padded: &Padded,
    positions: Vec<i32>,
    targets: Vec<i32>,
    per: usize,
    device: &B::Device,
) -> Tensor<B, 1> {
    let (ids, pad) = ids_tensor::<B>(padded, device);
    let n = positions.len();
    let pos = Tensor::<B, 1, Int>::from_data(TensorData::new(positions, [n]), device);
    let target = Tensor::<B, 1, Int>::from_data(TensorData::new(targets, [n]), device);
    model
        .target_log_probs(ids, pad, pos, target)
        .reshape([n / per, per])
        .sum_dim(1)
        .reshape([n / per])
}

/// Token ids of each example's text and second text.
pub type Texts = Vec<(Vec<u32>, Vec<u32>)>;

pub fn tokenize(tok: &TextTokenizer, examples: &[Example]) -> Result<Texts, String> {
    examples
        .iter()
        .map(|e| {
            let a = tok.ids(&e.text)?;
            let b = e.text_pair.as_deref().map(|p| tok.ids(p)).transpose()?;
            Ok((a, b.unwrap_or_default()))
        })
        .collect::<Result<_, crate::tokenizer::TokenizerError>>()
        .map_err(|e| e.to_string())
}

/// Every label's score for every row, `[rows, classes]`: the summed log-probability of its
/// verbalizer in the label slot. Differentiable, so prompt-based fine-tuning trains on it.
pub fn label_scores<B: Backend>(
    model: &LmModel<B>,
    prompt: &Prompt,
    tok: &TextTokenizer,
    texts: &[&(Vec<u32>, Vec<u32>)],
    causal: bool,
    max_len: usize,
    device: &B::Device,
) -> Tensor<B, 2> {
    let classes = prompt.verbalizers.len();
    let rows = texts.len();
    // MLM: one pass per verbalizer length; AR: one pass per label.
    let mut groups: Vec<Vec<usize>> = Vec::new();
    for c in 0..classes {
        let len = prompt.verbalizers[c].len();
        match groups
            .iter_mut()
            .find(|g| !causal && prompt.verbalizers[g[0]].len() == len)
        {
            Some(g) => g.push(c),
            None => groups.push(vec![c]),
        }
    }
    let mut columns: Vec<Option<Tensor<B, 2>>> = vec![None; classes];
    for group in groups {
        let len = prompt.verbalizers[group[0]].len();
        let fill: Vec<u32> = if causal {
            prompt.verbalizers[group[0]].clone()
        } else {
            vec![tok.specials.mask; len]
        };
        let encoded: Vec<(Vec<u32>, usize)> = texts
            .iter()
            .map(|(a, b)| prompt.encode(tok, a, b, &fill, max_len))
            .collect();
        let refs: Vec<&[u32]> = encoded.iter().map(|(s, _)| s.as_slice()).collect();
        // Flat positions count rows of the padded width, which may be past the longest row.
        let padded = batch::pad(&refs, tok.specials.pad, model.backbone.max_len());
        let width = padded.seq;
        let (mut positions, mut targets) = (Vec::new(), Vec::new());
        for &c in &group {
            for (row, (_, start)) in encoded.iter().enumerate() {
                for (k, &t) in prompt.verbalizers[c].iter().enumerate() {
                    // AR predicts each token from the position before it.
                    let at = if causal { start + k - 1 } else { start + k };
                    positions.push((row * width + at) as i32);
                    targets.push(t as i32);
                }
            }
        }
        let s = summed_log_probs(model, &padded, positions, targets, len, device)
            .reshape([group.len(), rows]);
        for (gi, &c) in group.iter().enumerate() {
            columns[c] = Some(s.clone().narrow(0, gi, 1));
        }
    }
    let columns: Vec<Tensor<B, 2>> = columns.into_iter().flatten().collect();
    Tensor::cat(columns, 0).swap_dims(0, 1)
}

/// Prompt-based fine-tuning (PET): the whole LM (backbone and LM head) trains on the labelled
/// examples through the prompt, with cross-entropy over the labels' verbalizer scores.
pub struct ClozeTask<'a, B: Backend> {
    pub prompt: &'a Prompt,
    pub tok: &'a TextTokenizer,
    pub train: &'a Texts,
    pub train_classes: &'a [usize],
    pub dev: Option<(&'a Texts, &'a [usize])>,
    pub causal: bool,
    pub max_len: usize,
    pub batch_size: usize,
    pub batching: Batching,
    pub eval_batch_size: usize,
    pub select: SelectMetric,
    pub seed: u64,
    pub device: B::Device,
}

impl<B: AutodiffBackend> Task<B> for ClozeTask<'_, B> {
    type Model = LmModel<B>;
    type Batch = Vec<usize>;

    fn batches(&self, epoch: usize) -> Vec<Vec<usize>> {
        let lengths: Vec<usize> = self.train.iter().map(|(text, _)| text.len()).collect();
        batch::batches(
            &lengths,
            self.batch_size,
            self.seed,
            epoch as u64,
            self.batching,
        )
    }

    fn loss(&self, model: &LmModel<B>, rows: &Vec<usize>) -> Tensor<B, 1> {
        let texts: Vec<&(Vec<u32>, Vec<u32>)> = rows.iter().map(|&i| &self.train[i]).collect();
        let scores = label_scores(
            model,
            self.prompt,
            self.tok,
            &texts,
            self.causal,
            self.max_len,
            &self.device,
        );
        let labels: Vec<i64> = rows.iter().map(|&i| self.train_classes[i] as i64).collect();
        let n = labels.len();
        let labels = Tensor::<B, 1, Int>::from_data(TensorData::new(labels, [n]), &self.device);
        CrossEntropyLossConfig::new()
            .init(&self.device)
            .forward(scores, labels)
    }

    fn evaluate(&self, model: &LmModel<B::InnerBackend>) -> Evaluation {
        let Some((texts, classes)) = self.dev else {
            return Evaluation::default();
        };
        let predicted = predict(
            model,
            self.prompt,
            self.tok,
            texts,
            self.causal,
            self.max_len,
            self.eval_batch_size,
            &self.device,
        );
        let s = score(classes, &predicted, self.prompt.verbalizers.len());
        dev_evaluation(&s, self.select)
    }

    fn device(&self) -> B::Device {
        self.device.clone()
    }
}

/// Predicted class of every example.
#[allow(clippy::too_many_arguments)]
pub fn predict<B: Backend>(
    model: &LmModel<B>,
    prompt: &Prompt,
    tok: &TextTokenizer,
    texts: &Texts,
    causal: bool,
    max_len: usize,
    batch_size: usize,
    device: &B::Device,
) -> Vec<usize> {
    let lengths: Vec<usize> = texts.iter().map(|(a, b)| a.len() + b.len()).collect();
    let mut out = vec![0; texts.len()];
    for chunk in batch::eval_batches(&lengths, batch_size) {
        let refs: Vec<&(Vec<u32>, Vec<u32>)> = chunk.iter().map(|&i| &texts[i]).collect();
        let scores = label_scores(model, prompt, tok, &refs, causal, max_len, device);
        let best = scores.argmax(1).into_data().convert::<i64>();
        for (&i, c) in chunk.iter().zip(best.iter::<i64>()) {
            out[i] = c as usize;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::model::TokenizerSection;

    fn tokenizer() -> TextTokenizer {
        let texts = [
            "这个 东西 很好 很差",
            "质量 好 差 东西 不错",
            "很好 很差 质量",
        ];
        let cfg = TokenizerSection {
            vocab_size: 200,
            min_frequency: 1,
            ..Default::default()
        };
        TextTokenizer::build(&cfg, std::path::Path::new("."), texts.iter().copied()).unwrap()
    }

    fn section(template: &str) -> PromptSection {
        PromptSection {
            template: template.into(),
            verbalizer: [("Negative", "差"), ("Positive", "好")]
                .into_iter()
                .map(|(a, b)| (a.to_string(), b.to_string()))
                .collect(),
        }
    }

    #[test]
    fn the_template_is_laid_out_around_the_text_and_cut_to_fit() {
        let tok = tokenizer();
        let labels = vec!["Negative".to_string(), "Positive".to_string()];
        let p = Prompt::new(&section("质量{label}：{text}"), &tok, &labels).unwrap();
        assert_eq!(
            p.verbalizers,
            [tok.ids("差").unwrap(), tok.ids("好").unwrap()]
        );
        let text = tok.ids("这个东西很好").unwrap();
        let mask = [tok.specials.mask];
        let (seq, start) = p.encode(&tok, &text, &[], &mask, 64);
        let mut expected = vec![tok.specials.cls];
        expected.extend(tok.ids("质量").unwrap());
        assert_eq!(
            start,
            expected.len(),
            "the label slot follows the literal prefix"
        );
        expected.push(tok.specials.mask);
        expected.extend(tok.ids("：").unwrap());
        expected.extend(&text);
        expected.push(tok.specials.sep);
        assert_eq!(seq, expected);
        // Too long: the text loses tokens, the template and the slot stay.
        let (short, start2) = p.encode(&tok, &text, &[], &mask, seq.len() - 2);
        assert_eq!(short.len(), seq.len() - 2);
        assert_eq!((start2, short[start2]), (start, tok.specials.mask));
        assert_eq!(short.last(), Some(&tok.specials.sep));
    }

    /// Padding is masked, so padding to a multiple (as on GPUs) changes no label's score: the
    /// label slots are found in rows of the padded width. Both objectives, as AR predicts each
    /// verbalizer token from the position before it.
    #[test]
    fn label_scores_do_not_depend_on_the_padded_width() {
        let _rng = crate::model::rng_lock();
        use crate::model::LmModel;
        type Cpu = crate::train::backend::Cpu;
        let tok = tokenizer();
        let labels = vec!["Negative".to_string(), "Positive".to_string()];
        let prompt = Prompt::new(&section("{text}。很{label}"), &tok, &labels).unwrap();
        let texts: Vec<(Vec<u32>, Vec<u32>)> = ["这个东西很好", "质量差", "不错"]
            .iter()
            .map(|t| (tok.ids(t).unwrap(), Vec::new()))
            .collect();
        let refs: Vec<&(Vec<u32>, Vec<u32>)> = texts.iter().collect();
        let device = Default::default();
        for causal in [false, true] {
            let cfg = crate::model::tiny_config(tok.vocab_size, 40, causal);
            let model = LmModel::<Cpu> {
                backbone: cfg.init(&device),
                head: cfg.lm_head(&device),
            };
            let scores = |multiple| {
                batch::set_pad_multiple(multiple);
                let s = label_scores(&model, &prompt, &tok, &refs, causal, 40, &device);
                batch::set_pad_multiple(1);
                s.into_data().to_vec::<f32>().unwrap()
            };
            let (exact, padded) = (scores(1), scores(16));
            assert_eq!(exact.len(), 6);
            for (a, b) in exact.iter().zip(&padded) {
                assert!(
                    (a - b).abs() < 1e-4,
                    "causal {causal}: {exact:?} against {padded:?}"
                );
            }
        }
    }

    #[test]
    fn a_missing_word_or_slot_is_named() {
        let tok = tokenizer();
        let labels = vec!["Negative".to_string(), "Neutral".to_string()];
        let e = Prompt::new(&section("{label}{text}"), &tok, &labels)
            .err()
            .unwrap();
        assert!(e.contains("no word for the label `Neutral`"), "{e}");
        let two = vec!["Negative".to_string(), "Positive".to_string()];
        let e = Prompt::new(&section("{label}{txt}"), &tok, &two)
            .err()
            .unwrap();
        assert!(e.contains("unknown slot `{txt}`"), "{e}");
        let e = Prompt::new(&section("{text}"), &tok, &two).err().unwrap();
        assert!(e.contains("{label} exactly once"), "{e}");
    }
}
