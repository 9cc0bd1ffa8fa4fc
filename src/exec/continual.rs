//! Continual learning: one backbone fine-tuned on a sequence of classification tasks, each with its
//! own head. After each task every task seen so far is tested, which fills the accuracy matrix;
//! average accuracy and forgetting come from it (`report::ContinualScores`).
//!
//! Strategies (`continual.strategy`): sequential fine-tuning; experience replay (a fixed memory of
//! `replay_examples` training examples per earlier task, and every batch of the current task comes
//! with a batch drawn from it, Chaudhry et al. 2019, https://arxiv.org/abs/1902.10486); EWC
//! (Kirkpatrick et al. 2017, https://arxiv.org/abs/1612.00796), a quadratic penalty per earlier task
//! weighted by its diagonal empirical Fisher information over the trainable backbone parameters.
//!
//! The whole sequence is one fine-tuning stage (one cache entry). Within it, each task's training
//! checkpoints into `task-<i>/` of the entry's partial folder and, once done, leaves its model and
//! matrix row in `after-<i>/`: a killed run resumes at the task it was in, and EWC's Fisher terms
//! are recomputed from the saved models, so the result is the one an uninterrupted run gives.

use std::path::Path;
use std::time::Instant;

use burn::module::{AutodiffModule, Module, ModuleVisitor, Param};
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::Tensor;
use rand::seq::SliceRandom;
use serde::{Deserialize, Serialize};

use super::cache::{Building, Status};
use super::stats::{self, Encoded};
use super::tasks::{class_loss, dev_evaluation, evaluate_split, pad_rows, Labelled};
use super::trial::{
    failed, fit_finetune, log, publish_finetune, recorder, with_method, Context, Stop,
};
use crate::config::continual::{ContinualSection, Strategy};
use crate::config::train::{Batching, SelectMetric};
use crate::data::batch::{batches, rng};
use crate::data::Datasets;
use crate::metrics::Store;
use crate::model::{Backbone, BackboneConfig, MultiTask, Pool};
use crate::plan::keys::StageKeys;
use crate::plan::Trial;
use crate::report::{ContinualScores, RunSummary, StageUse};
use crate::tokenizer::TextTokenizer;
use crate::train::{Evaluation, Task};

/// Seeds the replay memory's draw and the replay batches (streams beside shuffling and masking).
const REPLAY_MEMORY: u64 = 6;
const REPLAY_BATCHES: u64 = 7;
/// Seeds the dropout of the Fisher information's forward passes.
const FISHER: u64 = 8;

/// One task of the sequence, encoded.
pub struct TaskData {
    pub name: String,
    pub labels: Vec<String>,
    pub train: Labelled,
    pub dev: Option<Labelled>,
    pub test: Option<Labelled>,
}

/// What one finished task leaves for a resumed run: its matrix rows.
#[derive(Serialize, Deserialize)]
struct Row {
    test: Vec<f64>,
    dev: Vec<f64>,
}

/// An earlier task's EWC term: the trainable backbone parameters it ended with and their Fisher
/// information, flattened, in the order a visitor meets them.
pub struct Consolidated<B: Backend> {
    anchor: Vec<Tensor<B, 1>>,
    fisher: Vec<Tensor<B, 1>>,
}

/// Fine-tuning on the current task, with replayed examples of earlier ones and their EWC terms.
pub struct ContinualTask<'a, B: AutodiffBackend> {
    pub current: usize,
    pub tasks: &'a [TaskData],
    /// `(task, training row)` kept from earlier tasks (replay only).
    pub memory: Vec<(usize, usize)>,
    pub consolidated: &'a [Consolidated<B::InnerBackend>],
    pub lambda: f64,
    pub pool: Pool,
    pub pad_id: u32,
    pub batch_size: usize,
    pub batching: Batching,
    pub eval_batch_size: usize,
    pub select: SelectMetric,
    pub seed: u64,
    pub device: B::Device,
}

impl<B: AutodiffBackend> Task<B> for ContinualTask<'_, B> {
    type Model = MultiTask<B>;
    /// Rows of the current task and a counter that seeds the replay draw.
    type Batch = (Vec<usize>, u64);

    fn batches(&self, epoch: usize) -> Vec<(Vec<usize>, u64)> {
        let lengths: Vec<usize> = self.tasks[self.current]
            .train
            .ids
            .iter()
            .map(Vec::len)
            .collect();
        batches(
            &lengths,
            self.batch_size,
            self.seed,
            epoch as u64,
            self.batching,
        )
        .into_iter()
        .enumerate()
        .map(|(i, rows)| (rows, ((epoch as u64) << 32) | i as u64))
        .collect()
    }

    /// Mean cross-entropy over the batch and its replayed examples (each through its task's
    /// head), plus `lambda / 2` times the EWC penalties.
    fn loss(&self, model: &MultiTask<B>, (rows, counter): &(Vec<usize>, u64)) -> Tensor<B, 1> {
        let mut groups: Vec<(usize, Vec<usize>)> = vec![(self.current, rows.clone())];
        if !self.memory.is_empty() {
            let mut picks: Vec<usize> = (0..self.memory.len()).collect();
            picks.shuffle(&mut rng(self.seed, REPLAY_BATCHES, *counter));
            picks.truncate(self.batch_size.min(self.memory.len()));
            picks.sort_unstable();
            for p in picks {
                let (task, row) = self.memory[p];
                match groups.iter_mut().find(|g| g.0 == task) {
                    Some(g) => g.1.push(row),
                    None => groups.push((task, vec![row])),
                }
            }
        }
        let total: usize = groups.iter().map(|g| g.1.len()).sum();
        let mut loss: Option<Tensor<B, 1>> = None;
        for (task, rows) in &groups {
            let split = &self.tasks[*task].train;
            let padded = pad_rows(split, rows, self.pad_id, model.backbone.max_len());
            let l = class_loss(
                &model.classifier(*task),
                split,
                rows,
                self.pool,
                &padded,
                &self.device,
            )
            .mul_scalar(rows.len() as f64 / total as f64);
            loss = Some(match loss {
                Some(sum) => sum + l,
                None => l,
            });
        }
        let mut loss = loss.expect("a batch has rows");
        for c in self.consolidated {
            loss = loss + penalty(&model.backbone, c).mul_scalar(self.lambda / 2.0);
        }
        loss
    }

    fn evaluate(&self, model: &MultiTask<B::InnerBackend>) -> Evaluation {
        let t = &self.tasks[self.current];
        let Some(dev) = &t.dev else {
            return Evaluation::default();
        };
        let s = evaluate_split(
            &model.classifier(self.current),
            dev,
            &t.labels,
            self.pool,
            self.pad_id,
            self.eval_batch_size,
            &self.device,
        );
        dev_evaluation(&s, self.select)
    }

    fn device(&self) -> B::Device {
        self.device.clone()
    }
}

/// A parameter that trains, and its element count; EWC's visitors meet these in the same order.
fn trainable<B: AutodiffBackend, const D: usize>(
    p: &Param<Tensor<B, D>>,
) -> Option<(Tensor<B, D>, usize)> {
    let value = p.val();
    let n = value.shape().num_elements();
    value.is_require_grad().then_some((value, n))
}

/// `Σ F (θ − θ*)²` over the trainable backbone parameters.
fn penalty<B: AutodiffBackend>(
    backbone: &Backbone<B>,
    c: &Consolidated<B::InnerBackend>,
) -> Tensor<B, 1> {
    struct Sum<'a, B: AutodiffBackend> {
        c: &'a Consolidated<B::InnerBackend>,
        next: usize,
        sum: Option<Tensor<B, 1>>,
    }
    impl<B: AutodiffBackend> ModuleVisitor<B> for Sum<'_, B> {
        fn visit_float<const D: usize>(&mut self, p: &Param<Tensor<B, D>>) {
            let Some((value, n)) = trainable(p) else {
                return;
            };
            let anchor = Tensor::<B, 1>::from_inner(self.c.anchor[self.next].clone());
            let fisher = Tensor::<B, 1>::from_inner(self.c.fisher[self.next].clone());
            self.next += 1;
            let term = (value.reshape([n]) - anchor)
                .powi_scalar(2)
                .mul(fisher)
                .sum();
            self.sum = Some(match self.sum.take() {
                Some(s) => s + term,
                None => term,
            });
        }
    }
    let mut sum = Sum {
        c,
        next: 0,
        sum: None,
    };
    backbone.visit(&mut sum);
    assert_eq!(
        sum.next,
        c.anchor.len(),
        "EWC: the trainable parameters differ from those consolidated"
    );
    sum.sum
        .unwrap_or_else(|| Tensor::zeros([1], &backbone.tokens.weight.device()))
}

/// Task `task`'s EWC term for `model` as trained on it: the mean squared gradient of each
/// example's loss (the diagonal empirical Fisher information) and the parameters themselves.
fn consolidate<B: AutodiffBackend>(
    model: &MultiTask<B>,
    task: usize,
    split: &Labelled,
    pool: Pool,
    pad_id: u32,
    seed: u64,
    device: &B::Device,
) -> Consolidated<B::InnerBackend> {
    struct Squares<'a, B: AutodiffBackend> {
        grads: &'a B::Gradients,
        sums: &'a mut Vec<Tensor<B::InnerBackend, 1>>,
        next: usize,
    }
    impl<B: AutodiffBackend> ModuleVisitor<B> for Squares<'_, B> {
        fn visit_float<const D: usize>(&mut self, p: &Param<Tensor<B, D>>) {
            let Some((value, n)) = trainable(p) else {
                return;
            };
            let square = match value.grad(self.grads) {
                Some(g) => g.reshape([n]).powi_scalar(2),
                None => Tensor::zeros([n], &value.device()),
            };
            match self.sums.get_mut(self.next) {
                Some(s) => *s = s.clone() + square,
                None => self.sums.push(square),
            }
            self.next += 1;
        }
    }
    struct Anchor<B: AutodiffBackend>(Vec<Tensor<B::InnerBackend, 1>>);
    impl<B: AutodiffBackend> ModuleVisitor<B> for Anchor<B> {
        fn visit_float<const D: usize>(&mut self, p: &Param<Tensor<B, D>>) {
            if let Some((value, n)) = trainable(p) {
                self.0.push(value.inner().reshape([n]));
            }
        }
    }
    let classifier = model.classifier(task);
    let n = split.ids.len();
    let mut sums = Vec::new();
    for i in 0..n {
        crate::model::dropout::seed::<B>(device, rng_seed(seed, i));
        let padded = pad_rows(split, &[i], pad_id, model.backbone.max_len());
        let loss = class_loss(&classifier, split, &[i], pool, &padded, device);
        let grads = loss.backward();
        let mut squares = Squares::<B> {
            grads: &grads,
            sums: &mut sums,
            next: 0,
        };
        model.backbone.visit(&mut squares);
    }
    let fisher = sums
        .into_iter()
        .map(|s| s.div_scalar(n.max(1) as f64))
        .collect();
    let mut anchor = Anchor::<B>(Vec::new());
    model.backbone.visit(&mut anchor);
    Consolidated {
        anchor: anchor.0,
        fisher,
    }
}

fn rng_seed(seed: u64, i: usize) -> u64 {
    seed ^ FISHER.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ (i as u64)
}

/// The replay memory while training task `current`: `per_task` rows of every earlier task's
/// training split, drawn once per task with the seed.
fn memory(tasks: &[TaskData], current: usize, per_task: usize, seed: u64) -> Vec<(usize, usize)> {
    let mut out = Vec::new();
    for (k, t) in tasks.iter().enumerate().take(current) {
        let mut rows: Vec<usize> = (0..t.train.ids.len()).collect();
        rows.shuffle(&mut rng(seed, REPLAY_MEMORY, k as u64));
        rows.truncate(per_task);
        rows.sort_unstable();
        out.extend(rows.into_iter().map(|r| (k, r)));
    }
    out
}

/// Reads and encodes the later tasks, each with its own label set; their split statistics join
/// the summary's as `TASK/train` and so on.
pub fn load_tasks(
    trial: &Trial,
    cl: &ContinualSection,
    first: TaskData,
    tokenizer: &TextTokenizer,
    summary: &mut RunSummary,
) -> Result<Vec<TaskData>, Stop> {
    let exp = &trial.exp;
    let mut tasks = vec![first];
    for spec in &cl.tasks {
        let data = Datasets::load_task(exp, spec).map_err(|e| Stop::Failed {
            stage: "data",
            message: e.to_string(),
            code: 2,
        })?;
        let Encoded {
            train,
            dev,
            test,
            stats,
            ..
        } = stats::encode_all(&data, tokenizer, exp.raw.model.max_len)
            .map_err(|e| failed("tokenizer")(e.to_string()))?;
        for mut s in stats {
            s.name = format!("{}/{}", spec.name, s.name);
            summary.data.push(s);
        }
        tasks.push(TaskData {
            name: spec.name.clone(),
            labels: data.labels,
            train,
            dev,
            test,
        });
    }
    Ok(tasks)
}

/// Trains the sequence and publishes it as the trial's fine-tuning entry.
#[allow(clippy::too_many_arguments)]
pub(super) fn continual_stage<B: AutodiffBackend>(
    trial: &Trial,
    keys: &StageKeys,
    cx: &mut Context<B>,
    cl: &ContinualSection,
    tasks: Vec<TaskData>,
    pad_id: u32,
    pool: Pool,
    backbone: Backbone<B::InnerBackend>,
    cfg: &BackboneConfig,
    summary: &mut RunSummary,
    store: &mut Store,
    building: Building,
) -> Result<(), Stop> {
    let exp = &trial.exp;
    let f = &exp.raw.finetune;
    let key = &keys.finetune;
    let seed = exp.raw.experiment.seed.wrapping_add(1);
    let device = cx.device.clone();
    let err = failed("finetune");
    summary
        .stages
        .push(StageUse::new("finetune", &key.hash, false));
    crate::model::dropout::seed::<B>(&device, seed);
    let backbone = with_method(f, Backbone::<B>::from_inner(backbone), &device);
    let heads = tasks
        .iter()
        .map(|t| cfg.classifier_head(t.labels.len(), false, &device))
        .collect();
    let fresh = MultiTask { backbone, heads };
    let counts = crate::train::parameter_counts::<B, _>(&fresh);
    summary.trainable_parameters = Some(counts);
    let mut scores = ContinualScores {
        strategy: cl.strategy.name().into(),
        tasks: tasks.iter().map(|t| t.name.clone()).collect(),
        test: Vec::new(),
        dev: Vec::new(),
    };
    let partial = building.partial.clone();
    let after = |t: usize| partial.join(format!("after-{t}"));
    let load = |dir: &Path| {
        fresh
            .clone()
            .load_file(dir.join("model"), &recorder(), &device)
            .map_err(|e| err(format!("saved task model in {}: {e}", dir.display())))
    };
    // Tasks a killed run finished: their rows, and the model after the last of them.
    let done = (0..tasks.len())
        .take_while(|&t| after(t).join("row.json").is_file())
        .count();
    let mut model = fresh.clone();
    for t in 0..done {
        let row: Row = crate::report::read_json(&after(t).join("row.json")).map_err(&err)?;
        scores.test.push(row.test);
        scores.dev.push(row.dev);
    }
    if done > 0 {
        model = load(&after(done - 1))?;
        log(
            cx.opts,
            &format!(
                "{} continual: {done} of {} tasks done before; going on from there",
                cx.label,
                tasks.len()
            ),
        );
    }
    let mut consolidated: Vec<Consolidated<B::InnerBackend>> = Vec::new();
    if cl.strategy == Strategy::Ewc {
        // As the loop below: every finished task but the last of the sequence has a term.
        for (t, task) in tasks.iter().enumerate().take(done.min(tasks.len() - 1)) {
            let m = load(&after(t))?;
            consolidated.push(consolidate(&m, t, &task.train, pool, pad_id, seed, &device));
        }
    }
    let mut stage_store = Store::default();
    let mut trained = None;
    for t in done..tasks.len() {
        let task = ContinualTask::<B> {
            current: t,
            tasks: &tasks,
            memory: match cl.strategy {
                Strategy::Replay => memory(&tasks, t, cl.replay_examples, seed),
                _ => Vec::new(),
            },
            consolidated: &consolidated,
            lambda: cl.ewc_lambda,
            pool,
            pad_id,
            batch_size: f.batch_size,
            batching: f.batching,
            eval_batch_size: exp.raw.eval.batch_size,
            select: f.select_metric,
            seed: seed.wrapping_add(t as u64),
            device: device.clone(),
        };
        let stage = format!("finetune.{}", tasks[t].name);
        let ck_dir = partial.join(format!("task-{t}"));
        let (status, fitted) = fit_finetune(
            trial,
            key,
            cx,
            &stage,
            &ck_dir,
            &task,
            model,
            tasks[t].train.ids.len(),
            summary,
            store,
            &mut stage_store,
        )?;
        let Some(inner) = fitted else {
            summary.continual = Some(scores);
            return publish_finetune::<B::InnerBackend, MultiTask<B::InnerBackend>>(
                trial,
                key,
                cx,
                building,
                summary,
                store,
                stage_store,
                status,
                None,
            );
        };
        let started = Instant::now();
        let on = |pick: Pick| accuracies(&inner, &tasks[..=t], pick, pool, pad_id, exp, &device);
        let row = Row {
            test: on(|d| d.test.as_ref()),
            dev: on(|d| d.dev.as_ref()),
        };
        summary.stage_times.push((
            format!("eval after {}", tasks[t].name),
            started.elapsed().as_secs_f64(),
        ));
        log(
            cx.opts,
            &format!(
                "{} after {}: test accuracy {}",
                cx.label,
                tasks[t].name,
                tasks[..=t]
                    .iter()
                    .zip(&row.test)
                    .map(|(d, a)| format!("{} {:.2}%", d.name, a * 100.0))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        );
        save_after(&after(t), &inner, &row).map_err(&err)?;
        scores.test.push(row.test);
        scores.dev.push(row.dev);
        // The next task starts from the saved model loaded into the trainable structure, as a
        // resumed run does: `from_inner` of a trained model loses which parameters train.
        model = load(&after(t))?;
        let now = crate::train::parameter_counts::<B, _>(&model);
        if now != counts {
            return Err(err(format!(
                "the trainable parameters changed between tasks, {counts:?} → {now:?} (an internal error)"
            )));
        }
        if cl.strategy == Strategy::Ewc && t + 1 < tasks.len() {
            let c = consolidate(&model, t, &tasks[t].train, pool, pad_id, seed, &device);
            consolidated.push(c);
        }
        trained = Some(inner);
    }
    // A dev matrix only when every task has a dev split.
    if scores.dev.iter().any(Vec::is_empty) {
        scores.dev.clear();
    }
    summary.continual = Some(scores);
    let trained = match trained {
        Some(m) => m,
        None => load(&after(tasks.len() - 1))?.valid(),
    };
    publish_finetune(
        trial,
        key,
        cx,
        building,
        summary,
        store,
        stage_store,
        Status::Done,
        Some(trained),
    )
}

/// Chooses one split of a task.
type Pick = fn(&TaskData) -> Option<&Labelled>;

/// Accuracy of each task's head on the split `pick` chooses; empty if a task lacks it.
fn accuracies<B: Backend>(
    model: &MultiTask<B>,
    tasks: &[TaskData],
    pick: Pick,
    pool: Pool,
    pad_id: u32,
    exp: &crate::config::Experiment,
    device: &B::Device,
) -> Vec<f64> {
    let mut out = Vec::with_capacity(tasks.len());
    for (j, t) in tasks.iter().enumerate() {
        let Some(split) = pick(t) else {
            return Vec::new();
        };
        let s = evaluate_split(
            &model.classifier(j),
            split,
            &t.labels,
            pool,
            pad_id,
            exp.raw.eval.batch_size,
            device,
        );
        out.push(s.accuracy);
    }
    out
}

/// Leaves a finished task's model and row beside the checkpoints: written in a temporary folder
/// and renamed, so `row.json` exists only with its model.
fn save_after<B: Backend>(dir: &Path, model: &MultiTask<B>, row: &Row) -> Result<(), String> {
    let tmp = crate::metrics::tmp_path(dir);
    std::fs::create_dir_all(&tmp).map_err(|e| format!("cannot create {}: {e}", tmp.display()))?;
    model
        .clone()
        .save_file(tmp.join("model"), &recorder())
        .map_err(|e| e.to_string())?;
    let json = serde_json::to_string(row).map_err(|e| e.to_string())?;
    std::fs::write(tmp.join("row.json"), json).map_err(|e| e.to_string())?;
    let _ = std::fs::remove_dir_all(dir);
    std::fs::rename(&tmp, dir).map_err(|e| format!("cannot move {} into place: {e}", dir.display()))
}
