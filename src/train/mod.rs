//! The one training loop, used by pretraining and fine-tuning alike. A stage supplies its batches, its
//! loss and its evaluation (`Task`); the loop owns the optimiser, the schedule, divergence checks,
//! periodic evaluation, early stopping and the best snapshot.

pub mod backend;
pub mod checkpoint;
pub mod progress;
pub mod schedule;

use std::time::Instant;

use burn::module::AutodiffModule;
use burn::optim::grad_clipping::GradientClippingConfig;
use burn::optim::{AdamWConfig, GradientsParams, Optimizer};
use burn::tensor::backend::AutodiffBackend;
use burn::tensor::{ElementConversion, Tensor};

use crate::config::train::Optim;
use crate::metrics::{Record, Store};
pub use checkpoint::Checkpoints;
use checkpoint::State;
pub use progress::Progress;

/// What an evaluation measured; `score` (higher is better) drives early stopping and model selection.
#[derive(Debug, Default)]
pub struct Evaluation {
    pub score: Option<f64>,
    /// `(split, metric, value)`.
    pub metrics: Vec<(String, String, f64)>,
}

pub trait Task<B: AutodiffBackend> {
    type Model: AutodiffModule<B>;
    type Batch;
    /// The batches of one epoch, in training order.
    fn batches(&self, epoch: usize) -> Vec<Self::Batch>;
    fn loss(&self, model: &Self::Model, batch: &Self::Batch) -> Tensor<B, 1>;
    fn evaluate(&self, model: &<Self::Model as AutodiffModule<B>>::InnerModule) -> Evaluation;
    fn device(&self) -> B::Device;
}

/// How long to train and when to look.
pub struct Budget {
    pub max_steps: usize,
    pub max_epochs: usize,
    /// Evaluate every this many steps (pretraining) …
    pub eval_every: Option<usize>,
    /// … or after every epoch (fine-tuning).
    pub eval_each_epoch: bool,
    /// Stop after this many evaluations without a better score; 0 never stops early.
    pub patience: usize,
    /// Return the best-scoring snapshot instead of the last one.
    pub keep_best: bool,
    /// Seeds the backend's random stream (dropout) afresh at every step, so a resumed run draws
    /// exactly what an uninterrupted one would.
    pub seed: u64,
}

pub struct Fitted<M> {
    pub model: M,
    pub steps: usize,
    pub best_step: Option<usize>,
    pub stopped_early: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    #[error(
        "loss became {value} at step {step} (diverged); lower the learning rate or clip gradients"
    )]
    Diverged { step: usize, value: f64 },
    #[error("the training split yields no batches")]
    NoBatches,
    #[error("checkpoint: {0}")]
    Checkpoint(String),
}

/// `(trainable, total)` parameter counts: frozen parameters do not require gradients.
pub fn parameter_counts<B: AutodiffBackend, M: burn::module::Module<B>>(
    model: &M,
) -> (usize, usize) {
    struct Count(usize, usize);
    impl<B: AutodiffBackend> burn::module::ModuleVisitor<B> for Count {
        fn visit_float<const D: usize>(&mut self, param: &burn::module::Param<Tensor<B, D>>) {
            let value = param.val();
            let n = value.shape().num_elements();
            self.1 += n;
            if value.is_require_grad() {
                self.0 += n;
            }
        }
    }
    let mut count = Count(0, 0);
    model.visit(&mut count);
    (count.0, count.1)
}

pub fn adamw(o: &Optim) -> AdamWConfig {
    let clip = (o.clip_norm > 0.0).then_some(GradientClippingConfig::Norm(o.clip_norm as f32));
    AdamWConfig::new()
        .with_beta_1(o.betas[0] as f32)
        .with_beta_2(o.betas[1] as f32)
        .with_epsilon(o.eps as f32)
        .with_weight_decay(o.weight_decay as f32)
        .with_grad_clipping(clip)
}

/// Snapshot bookkeeping: the best score so far and how long since it improved.
struct Selection<M> {
    best: Option<(f64, usize, M)>,
    stale: usize,
}

/// Trains `model` on `task` within `budget`. With `checkpoints`, it resumes from the newest
/// checkpoint there (if any) and writes one every `every` steps and at every epoch end.
#[allow(clippy::too_many_arguments)]
pub fn fit<B: AutodiffBackend, T: Task<B>>(
    task: &T,
    mut model: T::Model,
    optim: &Optim,
    budget: &Budget,
    stage: &str,
    store: &mut Store,
    progress: &mut Progress,
    mut checkpoints: Option<Checkpoints>,
) -> Result<Fitted<<T::Model as AutodiffModule<B>>::InnerModule>, TrainError> {
    let device = task.device();
    let mut optimizer = adamw(optim).init::<B, T::Model>();
    let first_record = store.records.len();
    let mut rec = Recorder {
        stage,
        store,
        started: Instant::now(),
        offset_s: 0.0,
    };
    let mut select = Selection {
        best: None,
        stale: 0,
    };
    let (mut step, mut start) = (0, (0, 0));
    if let Some(ck) = &checkpoints {
        match ck.load::<B, _, _>(model, optimizer, &device) {
            Ok(loaded) => {
                let st = loaded.state;
                model = loaded.model;
                optimizer = loaded.optimizer;
                select.stale = st.stale;
                select.best = st.best.zip(loaded.best).map(|((s, at), m)| (s, at, m));
                rec.store.records.extend(st.records);
                rec.offset_s = st.elapsed_s;
                step = st.step;
                start = (st.epoch, st.batch);
            }
            Err((m, o)) => (model, optimizer) = (m, o),
        }
    }
    let mut stopped_early = false;
    progress.start(budget.max_steps);
    for epoch in start.0..budget.max_epochs {
        if step >= budget.max_steps {
            break;
        }
        let batches = task.batches(epoch);
        if batches.is_empty() {
            return Err(TrainError::NoBatches);
        }
        let skip = if epoch == start.0 { start.1 } else { 0 };
        for (i, batch) in batches.iter().enumerate().skip(skip) {
            let lr = schedule::learning_rate(optim, step, budget.max_steps);
            B::seed(
                &device,
                budget.seed ^ (step as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15),
            );
            let loss = task.loss(&model, batch);
            let value: f64 = loss.clone().into_scalar().elem();
            if !value.is_finite() {
                return Err(TrainError::Diverged {
                    step: step + 1,
                    value,
                });
            }
            let grads = GradientsParams::from_grads(loss.backward(), &model);
            model = optimizer.step(lr, model, grads);
            step += 1;
            rec.push(step, epoch, "train", "loss", value);
            rec.push(step, epoch, "train", "lr", lr);
            progress.step(step, epoch + 1, value);
            let due = budget.eval_every.is_some_and(|n| step % n == 0) || step == budget.max_steps;
            if due && !budget.eval_each_epoch {
                let snapshot = model.valid();
                select.observe(task.evaluate(&snapshot), snapshot, step, epoch, &mut rec);
            }
            let last = step >= budget.max_steps || i + 1 == batches.len();
            if let Some(ck) = checkpoints
                .as_mut()
                .filter(|c| step % c.every == 0 && !last)
            {
                let state = select.state(step, epoch, i + 1, &rec, first_record);
                ck.save::<B, _, _>(&state, &model, &optimizer, select.snapshot())
                    .map_err(TrainError::Checkpoint)?;
            }
            if step >= budget.max_steps {
                break;
            }
        }
        if budget.eval_each_epoch {
            let snapshot = model.valid();
            select.observe(task.evaluate(&snapshot), snapshot, step, epoch, &mut rec);
            if budget.patience > 0 && select.stale >= budget.patience && step < budget.max_steps {
                stopped_early = true;
                break;
            }
        }
        if let Some(ck) = checkpoints.as_mut().filter(|_| step < budget.max_steps) {
            let state = select.state(step, epoch + 1, 0, &rec, first_record);
            ck.save::<B, _, _>(&state, &model, &optimizer, select.snapshot())
                .map_err(TrainError::Checkpoint)?;
        }
    }
    progress.finish();
    let best_step = select.best.as_ref().map(|b| b.1);
    let model = match select.best {
        Some((_, _, best)) if budget.keep_best => best,
        _ => model.valid(),
    };
    Ok(Fitted {
        model,
        steps: step,
        best_step,
        stopped_early,
    })
}

/// Writes one stage's records into the store, stamped with the time since the stage started.
struct Recorder<'a> {
    stage: &'a str,
    store: &'a mut Store,
    started: Instant,
    /// Seconds the stage ran before it was resumed.
    offset_s: f64,
}

impl Recorder<'_> {
    fn push(&mut self, step: usize, epoch: usize, split: &str, metric: &str, value: f64) {
        self.store.records.push(Record {
            stage: self.stage.into(),
            step: step as u64,
            epoch: epoch as u64 + 1,
            split: split.into(),
            metric: metric.into(),
            value,
            wall_s: self.offset_s + self.started.elapsed().as_secs_f64(),
        });
    }
}

impl<M: Clone> Selection<M> {
    fn snapshot(&self) -> Option<&M> {
        self.best.as_ref().map(|b| &b.2)
    }

    /// The loop's position for a checkpoint: batch `batch` of `epoch` runs next.
    fn state(
        &self,
        step: usize,
        epoch: usize,
        batch: usize,
        rec: &Recorder,
        first: usize,
    ) -> State {
        State {
            step,
            epoch,
            batch,
            best: self.best.as_ref().map(|b| (b.0, b.1)),
            stale: self.stale,
            records: rec.store.records[first..].to_vec(),
            elapsed_s: rec.offset_s + rec.started.elapsed().as_secs_f64(),
        }
    }

    /// Records an evaluation of `snapshot` and keeps it if it scores best so far.
    fn observe(
        &mut self,
        eval: Evaluation,
        snapshot: M,
        step: usize,
        epoch: usize,
        rec: &mut Recorder,
    ) {
        for (split, metric, value) in &eval.metrics {
            rec.push(step, epoch, split, metric, *value);
        }
        let Some(score) = eval.score else { return };
        if self.best.as_ref().is_none_or(|b| score > b.0) {
            self.best = Some((score, step, snapshot));
            self.stale = 0;
        } else {
            self.stale += 1;
        }
    }
}
