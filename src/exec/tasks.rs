//! The two `Task`s the training loop runs: self-supervised pretraining (MLM or AR) and sequence
//! classification. Both build their batches from token ids here and turn them into tensors.

use burn::module::AutodiffModule;
use burn::nn::loss::CrossEntropyLossConfig;
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{Bool, ElementConversion, Int, Tensor, TensorData};

use crate::config::train::{Batching, Objective, SelectMetric};
use crate::data::batch::{self, Padded, Targets};
use crate::metrics::classification::{score, Scores};
use crate::metrics::tagging::score_entities;
use crate::model::{Classifier, LmModel, Pool};
use crate::tokenizer::Specials;
use crate::train::{Evaluation, Task};

pub(crate) const MASKING: u64 = 2;
const VALIDATION_MASKING: u64 = 3;

pub fn ids_tensor<B: Backend>(
    p: &Padded,
    device: &B::Device,
) -> (Tensor<B, 2, Int>, Tensor<B, 2, Bool>) {
    let ids = Tensor::from_data(TensorData::new(p.ids.clone(), [p.batch, p.seq]), device);
    let pad = Tensor::from_data(TensorData::new(p.pad.clone(), [p.batch, p.seq]), device);
    (ids, pad)
}

fn int_tensor<B: Backend>(v: &[i32], device: &B::Device) -> Tensor<B, 1, Int> {
    Tensor::from_data(TensorData::new(v.to_vec(), [v.len()]), device)
}

pub struct PretrainTask<'a, B: Backend> {
    pub train: &'a [Vec<u32>],
    pub validation: &'a [Vec<u32>],
    pub objective: Objective,
    pub specials: Specials,
    pub vocab_size: usize,
    pub mask_prob: f64,
    pub batch_size: usize,
    pub batching: Batching,
    pub eval_batch_size: usize,
    pub seed: u64,
    /// The model's positions: no batch is padded past them.
    pub max_len: usize,
    pub device: B::Device,
}

/// One pretraining batch: which sequences, and a counter that seeds its masking.
pub struct LmBatch {
    rows: Vec<usize>,
    counter: u64,
}

impl<B: Backend> PretrainTask<'_, B> {
    /// Pads `rows` of `seqs` and draws their targets: the host's share of a step.
    pub(crate) fn prepare(
        &self,
        seqs: &[Vec<u32>],
        rows: &[usize],
        purpose: u64,
        counter: u64,
    ) -> (Padded, Targets) {
        let refs: Vec<&[u32]> = rows.iter().map(|&i| seqs[i].as_slice()).collect();
        let mut padded = batch::pad(&refs, self.specials.pad, self.max_len);
        let targets = match self.objective {
            Objective::Ar => batch::ar_targets(&padded),
            _ => {
                let mut rng = batch::rng(self.seed, purpose, counter);
                batch::mask_mlm(
                    &mut padded,
                    &self.specials,
                    self.vocab_size,
                    self.mask_prob,
                    &mut rng,
                )
            }
        };
        (padded, targets)
    }

    /// Mean cross-entropy over the predicted tokens (burn's `CrossEntropyLoss`, operation for
    /// operation, where the logits fit one device buffer).
    fn loss_on<M: Backend>(
        model: &LmModel<M>,
        padded: &Padded,
        t: &Targets,
        device: &M::Device,
    ) -> Tensor<M, 1> {
        let (ids, pad) = ids_tensor::<M>(padded, device);
        let (positions, targets) = (
            int_tensor(&t.positions, device),
            int_tensor(&t.targets, device),
        );
        model
            .target_log_probs(ids, pad, positions, targets)
            .mean()
            .neg()
    }
}

impl<B: AutodiffBackend> Task<B> for PretrainTask<'_, B> {
    type Model = LmModel<B>;
    type Batch = LmBatch;

    fn batches(&self, epoch: usize) -> Vec<LmBatch> {
        let lengths: Vec<usize> = self.train.iter().map(Vec::len).collect();
        batch::batches(
            &lengths,
            self.batch_size,
            self.seed,
            epoch as u64,
            self.batching,
        )
        .into_iter()
        .enumerate()
        .filter(|(_, rows)| rows.iter().any(|&r| self.train[r].len() > 2))
        .map(|(i, rows)| LmBatch {
            rows,
            counter: ((epoch as u64) << 32) | i as u64,
        })
        .collect()
    }

    fn loss(&self, model: &LmModel<B>, b: &LmBatch) -> Tensor<B, 1> {
        let (padded, targets) = self.prepare(self.train, &b.rows, MASKING, b.counter);
        Self::loss_on(model, &padded, &targets, &self.device)
    }

    fn device(&self) -> B::Device {
        self.device.clone()
    }

    fn evaluate(&self, model: &LmModel<B::InnerBackend>) -> Evaluation {
        if self.validation.is_empty() {
            return Evaluation::default();
        }
        let (mut total, mut count) = (0.0, 0usize);
        let rows: Vec<usize> = (0..self.validation.len()).collect();
        for (i, chunk) in rows.chunks(self.eval_batch_size).enumerate() {
            // Fixed masking per batch, so every evaluation scores the same task.
            let (padded, targets) =
                self.prepare(self.validation, chunk, VALIDATION_MASKING, i as u64);
            if targets.targets.is_empty() {
                continue;
            }
            let loss = Self::loss_on(model, &padded, &targets, &self.device);
            let n = targets.targets.len();
            total += loss.into_scalar().elem::<f64>() * n as f64;
            count += n;
        }
        let loss = total / count.max(1) as f64;
        Evaluation {
            score: Some(-loss),
            metrics: vec![
                ("validation".into(), "loss".into(), loss),
                ("validation".into(), "perplexity".into(), loss.exp()),
            ],
        }
    }
}

/// Token ids and class ids of one labelled split.
pub struct Labelled {
    pub ids: Vec<Vec<u32>>,
    /// One class per example (sequence classification; empty for token classification).
    pub classes: Vec<usize>,
    /// Token classification: where each word's tag is predicted, and every word's tag.
    pub tagged: Option<Tagged>,
}

impl Labelled {
    /// Every example's length in tokens.
    pub fn lengths(&self) -> Vec<usize> {
        self.ids.iter().map(Vec::len).collect()
    }
}

/// The tags of a split's sentences.
pub struct Tagged {
    /// Per sentence, the token position of each word that fit in `max_len`.
    pub positions: Vec<Vec<u32>>,
    /// Per sentence, the tag class of every word, including words cut by truncation (those are
    /// predicted `O`, so they count against recall).
    pub tags: Vec<Vec<usize>>,
}

impl Tagged {
    /// Flat indices into `[rows.len() * seq]` and the tag to predict there, for a batch of `rows`.
    fn gather(&self, rows: &[usize], seq: usize) -> (Vec<i32>, Vec<i32>) {
        let (mut positions, mut targets) = (Vec::new(), Vec::new());
        for (r, &i) in rows.iter().enumerate() {
            for (&p, &t) in self.positions[i].iter().zip(&self.tags[i]) {
                positions.push((r * seq) as i32 + p as i32);
                targets.push(t as i32);
            }
        }
        (positions, targets)
    }
}

pub struct FinetuneTask<'a, B: Backend> {
    pub train: &'a Labelled,
    pub dev: Option<&'a Labelled>,
    /// Class names (labels, or tags for token classification).
    pub labels: &'a [String],
    pub pool: Pool,
    pub pad_id: u32,
    pub batch_size: usize,
    pub batching: Batching,
    pub eval_batch_size: usize,
    pub select: SelectMetric,
    pub seed: u64,
    pub device: B::Device,
}

/// Predicted tag classes of every word of every sentence of a tagged `split`; words cut by
/// truncation get `outside` (the class of `O`).
pub fn predict_tags<B: Backend>(
    model: &Classifier<B>,
    split: &Labelled,
    tagged: &Tagged,
    outside: usize,
    pad_id: u32,
    batch_size: usize,
    device: &B::Device,
) -> Vec<Vec<usize>> {
    let mut out = vec![Vec::new(); split.ids.len()];
    for chunk in batch::eval_batches(&split.lengths(), batch_size) {
        let refs: Vec<&[u32]> = chunk.iter().map(|&i| split.ids[i].as_slice()).collect();
        let padded = batch::pad(&refs, pad_id, model.backbone.max_len());
        let (positions, _) = tagged.gather(&chunk, padded.seq);
        let (ids, pad) = ids_tensor::<B>(&padded, device);
        let logits = model.forward_tokens(ids, pad, int_tensor::<B>(&positions, device));
        let predicted = logits.argmax(1).into_data().convert::<i64>();
        let mut flat = predicted.iter::<i64>().map(|c| c as usize);
        for &i in &chunk {
            let mut tags: Vec<usize> = flat.by_ref().take(tagged.positions[i].len()).collect();
            tags.resize(tagged.tags[i].len(), outside);
            out[i] = tags;
        }
    }
    out
}

/// Predicted classes for every example of `split`, in order.
pub fn predict<B: Backend>(
    model: &Classifier<B>,
    split: &Labelled,
    pool: Pool,
    pad_id: u32,
    batch_size: usize,
    device: &B::Device,
) -> Vec<usize> {
    let mut out = vec![0; split.ids.len()];
    for chunk in batch::eval_batches(&split.lengths(), batch_size) {
        let refs: Vec<&[u32]> = chunk.iter().map(|&i| split.ids[i].as_slice()).collect();
        let (ids, pad) =
            ids_tensor::<B>(&batch::pad(&refs, pad_id, model.backbone.max_len()), device);
        let predicted = model.forward(ids, pad, pool).argmax(1).into_data();
        let predicted = predicted.convert::<i64>();
        for (&i, c) in chunk.iter().zip(predicted.iter::<i64>()) {
            out[i] = c as usize;
        }
    }
    out
}

/// Scores a split: accuracy and F1 over examples, or for token classification over words, with
/// entity-level scores beside.
pub fn evaluate_split<B: Backend>(
    model: &Classifier<B>,
    split: &Labelled,
    labels: &[String],
    pool: Pool,
    pad_id: u32,
    batch_size: usize,
    device: &B::Device,
) -> Scores {
    let Some(tagged) = &split.tagged else {
        let predicted = predict(model, split, pool, pad_id, batch_size, device);
        return score(&split.classes, &predicted, labels.len());
    };
    let outside = labels.iter().position(|l| l == "O").unwrap_or(0);
    let predicted = predict_tags(model, split, tagged, outside, pad_id, batch_size, device);
    let flat = |t: &[Vec<usize>]| t.iter().flatten().copied().collect::<Vec<_>>();
    let mut scores = score(&flat(&tagged.tags), &flat(&predicted), labels.len());
    let names = |t: &[Vec<usize>]| -> Vec<Vec<&str>> {
        t.iter()
            .map(|s| s.iter().map(|&c| labels[c].as_str()).collect())
            .collect()
    };
    scores.entities = Some(score_entities(&names(&tagged.tags), &names(&predicted)));
    scores
}

impl<B: AutodiffBackend> Task<B> for FinetuneTask<'_, B> {
    type Model = Classifier<B>;
    type Batch = Vec<usize>;

    fn batches(&self, epoch: usize) -> Vec<Vec<usize>> {
        batch::batches(
            &self.train.lengths(),
            self.batch_size,
            self.seed,
            epoch as u64,
            self.batching,
        )
    }

    fn loss(&self, model: &Classifier<B>, rows: &Vec<usize>) -> Tensor<B, 1> {
        let padded = pad_rows(self.train, rows, self.pad_id, model.backbone.max_len());
        let Some(tagged) = &self.train.tagged else {
            return class_loss(model, self.train, rows, self.pool, &padded, &self.device);
        };
        let (ids, pad) = ids_tensor::<B>(&padded, &self.device);
        let (positions, tags) = tagged.gather(rows, padded.seq);
        let positions = int_tensor::<B>(&positions, &self.device);
        CrossEntropyLossConfig::new().init(&self.device).forward(
            model.forward_tokens(ids, pad, positions),
            int_tensor::<B>(&tags, &self.device),
        )
    }

    fn device(&self) -> B::Device {
        self.device.clone()
    }

    fn evaluate(&self, model: &<Classifier<B> as AutodiffModule<B>>::InnerModule) -> Evaluation {
        let Some(dev) = self.dev else {
            return Evaluation::default();
        };
        let s = evaluate_split(
            model,
            dev,
            self.labels,
            self.pool,
            self.pad_id,
            self.eval_batch_size,
            &self.device,
        );
        dev_evaluation(&s, self.select)
    }
}

/// Mean cross-entropy of a classifier on `rows` of `split`, whose token ids `padded` holds.
pub fn class_loss<B: Backend>(
    model: &Classifier<B>,
    split: &Labelled,
    rows: &[usize],
    pool: Pool,
    padded: &Padded,
    device: &B::Device,
) -> Tensor<B, 1> {
    let (ids, pad) = ids_tensor::<B>(padded, device);
    let labels: Vec<i32> = rows.iter().map(|&i| split.classes[i] as i32).collect();
    CrossEntropyLossConfig::new().init(device).forward(
        model.forward(ids, pad, pool),
        int_tensor::<B>(&labels, device),
    )
}

/// Pads `rows` of `split` into one batch for a model of `limit` positions.
pub fn pad_rows(split: &Labelled, rows: &[usize], pad_id: u32, limit: usize) -> Padded {
    let refs: Vec<&[u32]> = rows.iter().map(|&i| split.ids[i].as_slice()).collect();
    batch::pad(&refs, pad_id, limit)
}

/// A dev split's scores as the training loop sees them: the selection score and the records.
pub fn dev_evaluation(s: &Scores, select: SelectMetric) -> Evaluation {
    let entity_f1 = s.entities.as_ref().map(|e| e.f1);
    let score = match select {
        SelectMetric::Accuracy => s.accuracy,
        SelectMetric::MacroF1 => s.macro_f1,
        SelectMetric::EntityF1 => entity_f1.unwrap_or(0.0),
    };
    let mut metrics = vec![
        ("dev".into(), "accuracy".into(), s.accuracy),
        ("dev".into(), "macro_f1".into(), s.macro_f1),
    ];
    if let Some(f1) = entity_f1 {
        metrics.push(("dev".into(), "entity_f1".into(), f1));
    }
    Evaluation {
        score: Some(score),
        metrics,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::train::{Method, OptimSection};
    use crate::metrics::Store;
    use crate::model::{BackboneConfig, ClassifierHead};
    use crate::train::backend::CpuTrain;
    use crate::train::{fit, parameter_counts, Budget, Progress};
    use burn::module::{Module, ModuleVisitor, Param};

    /// Every float parameter of a module by id: ids survive training, so frozen and trained
    /// parameters can be told apart afterwards.
    fn values<B: burn::tensor::backend::Backend, M: Module<B>>(
        m: &M,
    ) -> std::collections::BTreeMap<String, Vec<f32>> {
        struct Collect(std::collections::BTreeMap<String, Vec<f32>>);
        impl<B: burn::tensor::backend::Backend> ModuleVisitor<B> for Collect {
            fn visit_float<const D: usize>(&mut self, p: &Param<Tensor<B, D>>) {
                let data = p.val().into_data().convert::<f32>();
                self.0
                    .insert(p.id.to_string(), data.iter::<f32>().collect());
            }
        }
        let mut c = Collect(Default::default());
        m.visit(&mut c);
        c.0
    }

    fn tiny() -> BackboneConfig {
        BackboneConfig {
            vocab_size: 40,
            d_model: 16,
            layers: 1,
            heads: 2,
            d_ff: 32,
            max_len: 12,
            dropout: 0.1,
            pre_norm: true,
            causal: false,
            segments: None,
            type_vocab: 2,
            family: Default::default(),
            norm_eps: 1e-5,
            gelu_tanh: false,
            pooler: false,
        }
    }

    /// Trains a classifier with `method` for a few steps; returns the backbone's own parameters
    /// before and after, every parameter after, and the trainable count.
    fn train_with(method: Method) -> (Values, Values, Values, usize) {
        let device = Default::default();
        let cfg = tiny();
        let base = cfg.init::<CpuTrain>(&device);
        let before = values(&base);
        let backbone = match method {
            Method::Full => base,
            Method::LinearProbe => base.no_grad(),
            Method::Lora => base.no_grad().with_lora(&Default::default(), &device),
            Method::Adapter => base.no_grad().with_adapters(4, &device),
            Method::Prefix => base.no_grad().with_prefix(3, &device),
            Method::ZeroShot | Method::Pet => panic!("prompt-based methods train an LmModel"),
        };
        let model = Classifier {
            backbone,
            head: ClassifierHead::new(16, 3, 0.1, true, &device),
        };
        let (trainable, total) = parameter_counts::<CpuTrain, _>(&model);
        assert_eq!(total, values(&model).values().map(Vec::len).sum::<usize>());
        let head_before = values(&model.head);
        let all_before = values(&model);
        let train = Labelled {
            ids: (0..24u32)
                .map(|i| vec![2, 5 + i % 30, 6 + i % 7, 3])
                .collect(),
            classes: (0..24).map(|i| i % 3).collect(),
            tagged: None,
        };
        let task = FinetuneTask::<CpuTrain> {
            train: &train,
            dev: None,
            labels: &["a".into(), "b".into(), "c".into()],
            pool: Pool::First,
            pad_id: 0,
            batch_size: 8,
            batching: Batching::Random,
            eval_batch_size: 8,
            select: SelectMetric::Accuracy,
            seed: 1,
            device,
        };
        let budget = Budget {
            max_steps: 6,
            max_epochs: 2,
            eval_every: None,
            eval_each_epoch: true,
            patience: 0,
            keep_best: false,
            seed: 1,
        };
        let optim = OptimSection::default().resolve(1e-2);
        let mut store = Store::default();
        let fitted = fit(
            &task,
            model,
            &optim,
            &budget,
            "finetune",
            &mut store,
            &mut Progress::new("t", true),
            None,
        )
        .expect("trains");
        let after = values(&fitted.model);
        let head_after = values(&fitted.model.head);
        assert_ne!(head_after, head_before, "the head trains");
        for (k, v) in &after {
            if !before.contains_key(k) {
                assert_ne!(
                    *v, all_before[k],
                    "{method:?}: an added parameter did not train"
                );
            }
        }
        let own_after = before
            .keys()
            .map(|k| (k.clone(), after[k].clone()))
            .collect();
        (before, own_after, after, trainable)
    }

    type Values = std::collections::BTreeMap<String, Vec<f32>>;

    /// AdamW keeps moments for the parameters that get gradients only: a LoRA model's optimiser
    /// state covers the LoRA matrices and the head, not the frozen backbone.
    #[test]
    fn optimiser_state_exists_only_for_trainable_parameters() {
        let _rng = crate::model::rng_lock();
        use burn::optim::{GradientsParams, Optimizer};
        use burn::tensor::{Int, TensorData};
        let device = Default::default();
        let model = Classifier {
            backbone: tiny()
                .init::<CpuTrain>(&device)
                .no_grad()
                .with_lora(&Default::default(), &device),
            head: ClassifierHead::new(16, 3, 0.0, true, &device),
        };
        let ids = Tensor::<CpuTrain, 2, Int>::from_data(
            TensorData::new(vec![2, 5, 6, 3, 2, 7, 8, 3], [2, 4]),
            &device,
        );
        let pad = ids.clone().equal_elem(0);
        let loss = model.forward(ids, pad, Pool::First).powi_scalar(2).mean();
        let grads = GradientsParams::from_grads(loss.backward(), &model);
        let mut optim = crate::train::adamw(&OptimSection::default().resolve(1e-3));
        let model = optim.step(1e-3, model, grads);
        // Query and value LoRA (A and B each) in one layer, the head's weight and bias.
        assert_eq!(optim.to_record().len(), 2 * 2 + 2);
        let _ = model;
    }

    #[test]
    fn frozen_parameters_stay_frozen_and_added_ones_train() {
        let head = 16 * 3 + 3;
        let (d, layers) = (16, 1);
        let cases = [
            (Method::LinearProbe, head),
            // rank 8 on query and value: (d·8 + 8·d) each.
            (Method::Lora, head + layers * 2 * (d * 8 + 8 * d)),
            // two adapters of width 4: d·4 + 4 + 4·d + d each, and the LayerNorms.
            (
                Method::Adapter,
                head + layers * 2 * (d * 4 + 4 + 4 * d + d) + (layers * 2 + 1) * 2 * d,
            ),
            // 3 prefix keys and values of width d.
            (Method::Prefix, head + layers * 2 * 3 * d),
        ];
        for (method, expected) in cases {
            let (before, own_after, after, trainable) = train_with(method);
            assert_eq!(trainable, expected, "{method:?}");
            // Adapters train the LayerNorms too (two per layer and the final one, scale and shift).
            let changed: usize = before
                .iter()
                .filter(|(k, v)| own_after[*k] != **v)
                .map(|(_, v)| v.len())
                .sum();
            let norms = if method == Method::Adapter {
                (layers * 2 + 1) * 2 * d
            } else {
                0
            };
            assert_eq!(
                changed, norms,
                "{method:?}: frozen parameters must not change"
            );
            let added: Vec<&String> = after.keys().filter(|k| !before.contains_key(*k)).collect();
            assert_eq!(
                added.iter().map(|k| after[*k].len()).sum::<usize>() + norms,
                expected,
                "{method:?}: what was added is what trains (and the head)"
            );
        }
        let (before, own_after, _, trainable) = train_with(Method::Full);
        assert_eq!(trainable, tiny().parameters() + head);
        assert_ne!(own_after, before, "full fine-tuning changes the backbone");
    }
}
