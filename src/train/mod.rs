//! The one training loop, used by pretraining and fine-tuning alike. A stage supplies its batches, its
//! loss and its evaluation (`Task`); the loop owns the optimiser, the schedule, divergence checks,
//! periodic evaluation, early stopping and the best snapshot.

pub mod backend;
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

pub fn fit<B: AutodiffBackend, T: Task<B>>(
    task: &T,
    mut model: T::Model,
    optim: &Optim,
    budget: &Budget,
    stage: &str,
    store: &mut Store,
    progress: &mut Progress,
) -> Result<Fitted<<T::Model as AutodiffModule<B>>::InnerModule>, TrainError> {
    let mut optimizer = adamw(optim).init::<B, T::Model>();
    let started = Instant::now();
    let mut select = Selection {
        best: None,
        stale: 0,
    };
    let mut step = 0;
    let mut stopped_early = false;
    progress.start(budget.max_steps);
    for epoch in 0..budget.max_epochs {
        let batches = task.batches(epoch);
        if batches.is_empty() {
            return Err(TrainError::NoBatches);
        }
        for batch in &batches {
            let lr = schedule::learning_rate(optim, step, budget.max_steps);
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
            let wall = started.elapsed().as_secs_f64();
            push(store, stage, step, epoch, "train", "loss", value, wall);
            push(store, stage, step, epoch, "train", "lr", lr, wall);
            progress.step(step, epoch + 1, value);
            let due = budget.eval_every.is_some_and(|n| step % n == 0) || step == budget.max_steps;
            if due && !budget.eval_each_epoch {
                evaluate(
                    task,
                    &model,
                    &mut select,
                    step,
                    epoch,
                    stage,
                    store,
                    started,
                );
            }
            if step >= budget.max_steps {
                break;
            }
        }
        if budget.eval_each_epoch {
            evaluate(
                task,
                &model,
                &mut select,
                step,
                epoch,
                stage,
                store,
                started,
            );
            if budget.patience > 0 && select.stale >= budget.patience && step < budget.max_steps {
                stopped_early = true;
                break;
            }
        }
        if step >= budget.max_steps {
            break;
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

#[allow(clippy::too_many_arguments)]
fn evaluate<B: AutodiffBackend, T: Task<B>>(
    task: &T,
    model: &T::Model,
    select: &mut Selection<<T::Model as AutodiffModule<B>>::InnerModule>,
    step: usize,
    epoch: usize,
    stage: &str,
    store: &mut Store,
    started: Instant,
) {
    let snapshot = model.valid();
    let eval = task.evaluate(&snapshot);
    let wall = started.elapsed().as_secs_f64();
    for (split, metric, value) in &eval.metrics {
        push(store, stage, step, epoch, split, metric, *value, wall);
    }
    let Some(score) = eval.score else { return };
    let improved = select.best.as_ref().is_none_or(|b| score > b.0);
    if improved {
        select.best = Some((score, step, snapshot));
        select.stale = 0;
    } else {
        select.stale += 1;
    }
}

#[allow(clippy::too_many_arguments)]
fn push(
    store: &mut Store,
    stage: &str,
    step: usize,
    epoch: usize,
    split: &str,
    metric: &str,
    value: f64,
    wall_s: f64,
) {
    store.records.push(Record {
        stage: stage.into(),
        step: step as u64,
        epoch: epoch as u64 + 1,
        split: split.into(),
        metric: metric.into(),
        value,
        wall_s,
    });
}
