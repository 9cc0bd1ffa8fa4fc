//! The one training loop, used by pretraining and fine-tuning alike. A stage supplies its batches, its
//! loss and its evaluation (`Task`); the loop owns the optimiser, the schedule, divergence checks,
//! periodic evaluation, early stopping and the best snapshot.

pub mod adamw;
pub mod backend;
pub mod checkpoint;
pub mod progress;
pub mod schedule;

use std::time::Instant;

use burn::module::AutodiffModule;
use burn::optim::{GradientsParams, Optimizer};
use burn::tensor::backend::AutodiffBackend;
use burn::tensor::Tensor;

use crate::config::train::Optim;
use crate::metrics::{Record, Store};
pub use adamw::adamw;
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
    /// `None` when this process trained fewer than two steps.
    pub throughput: Option<Throughput>,
}

/// What a stage's training steps processed and how long they took, leaving out the first step
/// this process trains (on a GPU it compiles and autotunes the kernels) and the time spent
/// evaluating and writing checkpoints.
#[derive(Debug, Clone, Copy, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Throughput {
    pub steps: usize,
    pub seconds: f64,
    /// Token positions the steps fed the model, padding included …
    pub tokens: u64,
    /// … and without it.
    pub effective_tokens: u64,
}

impl Throughput {
    pub fn tokens_per_s(&self) -> f64 {
        self.tokens as f64 / self.seconds.max(f64::MIN_POSITIVE)
    }

    pub fn effective_tokens_per_s(&self) -> f64 {
        self.effective_tokens as f64 / self.seconds.max(f64::MIN_POSITIVE)
    }
}

/// Accumulates a `Throughput` while `fit` runs.
#[derive(Default)]
struct Meter {
    /// Set once the first step of this process has finished: the steps after it are measured.
    since: Option<Instant>,
    /// Time spent evaluating and checkpointing since then.
    paused: std::time::Duration,
    counted: Throughput,
}

impl Meter {
    /// Counts one step, given what `pad` had laid out before and after its loss was built.
    fn step(&mut self, before: (u64, u64), after: (u64, u64)) {
        if self.since.is_none() {
            self.since = Some(Instant::now());
            return;
        }
        self.counted.steps += 1;
        self.counted.tokens += after.0 - before.0;
        self.counted.effective_tokens += after.1 - before.1;
    }

    /// Runs `f`, leaving its time out of the measured seconds.
    fn pause<T>(&mut self, f: impl FnOnce() -> T) -> T {
        let started = Instant::now();
        let out = f();
        if self.since.is_some() {
            self.paused += started.elapsed();
        }
        out
    }

    fn finish(self) -> Option<Throughput> {
        let since = self.since?;
        (self.counted.steps > 0).then(|| Throughput {
            seconds: since.elapsed().saturating_sub(self.paused).as_secs_f64(),
            ..self.counted
        })
    }
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
    let mut optimizer = adamw::<B, T::Model>(optim);
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
    let mut unread = Unread::default();
    let mut meter = Meter::default();
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
            crate::model::dropout::seed::<B>(
                &device,
                budget.seed ^ (step as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15),
            );
            let before = crate::data::batch::laid_out();
            let loss = task.loss(&model, batch);
            let after = crate::data::batch::laid_out();
            unread.push(step + 1, epoch, lr, rec.elapsed(), loss.clone().inner());
            let grads = GradientsParams::from_grads(loss.backward(), &model);
            model = optimizer.step(lr, model, grads);
            step += 1;
            let due = budget.eval_every.is_some_and(|n| step % n == 0) || step == budget.max_steps;
            let last = step >= budget.max_steps || i + 1 == batches.len();
            let checkpoint = checkpoints
                .as_ref()
                .is_some_and(|c| step % c.every == 0 && !last);
            // The first step this process trains is read at once: its time (kernel compilation
            // and autotuning on a GPU) shows in the progress, and the throughput starts after it.
            let first = meter.since.is_none();
            if last || due || checkpoint || first || unread.due() {
                unread.read(&mut rec, progress)?;
            }
            meter.step(before, after);
            if due && !budget.eval_each_epoch {
                let snapshot = model.valid();
                let evaluation = meter.pause(|| task.evaluate(&snapshot));
                select.observe(evaluation, snapshot, step, epoch, &mut rec);
            }
            if let Some(ck) = checkpoints.as_mut().filter(|_| checkpoint) {
                let state = select.state(step, epoch, i + 1, &rec, first_record);
                meter
                    .pause(|| ck.save::<B, _, _>(&state, &model, &optimizer, select.snapshot()))
                    .map_err(TrainError::Checkpoint)?;
            }
            if step >= budget.max_steps {
                break;
            }
        }
        if budget.eval_each_epoch {
            let snapshot = model.valid();
            let evaluation = meter.pause(|| task.evaluate(&snapshot));
            select.observe(evaluation, snapshot, step, epoch, &mut rec);
            if budget.patience > 0 && select.stale >= budget.patience && step < budget.max_steps {
                stopped_early = true;
                break;
            }
        }
        if let Some(ck) = checkpoints.as_mut().filter(|_| step < budget.max_steps) {
            let state = select.state(step, epoch + 1, 0, &rec, first_record);
            meter
                .pause(|| ck.save::<B, _, _>(&state, &model, &optimizer, select.snapshot()))
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
        throughput: meter.finish(),
    })
}

/// Read the losses back after this many steps, or sooner when this long has passed since the last
/// read. Reading a loss waits for the device to finish the step; a GPU meanwhile runs ahead.
const READ_EVERY_STEPS: usize = 16;
const READ_EVERY: std::time::Duration = std::time::Duration::from_secs(1);

/// One step's loss, still on the device.
struct UnreadLoss<B: burn::tensor::backend::Backend> {
    step: usize,
    epoch: usize,
    lr: f64,
    wall_s: f64,
    loss: Tensor<B, 1>,
}

/// The losses of the steps since the last read. Each step's records and its divergence check are
/// exactly those of a loop that reads every step; only the time of the check moves (a diverged
/// step is still reported as itself, and nothing after it is kept or checkpointed).
struct Unread<B: burn::tensor::backend::Backend> {
    losses: Vec<UnreadLoss<B>>,
    since: Instant,
}

impl<B: burn::tensor::backend::Backend> Default for Unread<B> {
    fn default() -> Self {
        Self {
            losses: Vec::new(),
            since: Instant::now(),
        }
    }
}

impl<B: burn::tensor::backend::Backend> Unread<B> {
    fn push(&mut self, step: usize, epoch: usize, lr: f64, wall_s: f64, loss: Tensor<B, 1>) {
        self.losses.push(UnreadLoss {
            step,
            epoch,
            lr,
            wall_s,
            loss,
        });
    }

    fn due(&self) -> bool {
        self.losses.len() >= READ_EVERY_STEPS || self.since.elapsed() >= READ_EVERY
    }

    /// Reads every pending loss in one transfer, records them, and fails at the first that is
    /// not finite.
    fn read(&mut self, rec: &mut Recorder, progress: &Progress) -> Result<(), TrainError> {
        self.since = Instant::now();
        if self.losses.is_empty() {
            return Ok(());
        }
        let pending = std::mem::take(&mut self.losses);
        let all = Tensor::cat(pending.iter().map(|p| p.loss.clone()).collect(), 0);
        let values: Vec<f64> = all.into_data().iter::<f64>().collect();
        for (p, value) in pending.iter().zip(values) {
            if !value.is_finite() {
                return Err(TrainError::Diverged {
                    step: p.step,
                    value,
                });
            }
            rec.push_at(p.step, p.epoch, "train", "loss", value, p.wall_s);
            rec.push_at(p.step, p.epoch, "train", "lr", p.lr, p.wall_s);
            progress.step(p.step, p.epoch + 1, value);
        }
        Ok(())
    }
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
    fn elapsed(&self) -> f64 {
        self.offset_s + self.started.elapsed().as_secs_f64()
    }

    fn push(&mut self, step: usize, epoch: usize, split: &str, metric: &str, value: f64) {
        let wall_s = self.elapsed();
        self.push_at(step, epoch, split, metric, value, wall_s);
    }

    fn push_at(
        &mut self,
        step: usize,
        epoch: usize,
        split: &str,
        metric: &str,
        value: f64,
        wall_s: f64,
    ) {
        self.store.records.push(Record {
            stage: self.stage.into(),
            step: step as u64,
            epoch: epoch as u64 + 1,
            split: split.into(),
            metric: metric.into(),
            value,
            wall_s,
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::train::OptimSection;
    use crate::train::backend::CpuTrain;
    use burn::nn::{Linear, LinearConfig};

    /// A task whose loss at step `s` is `values[s - 1]` (plus zero times the model's output, so
    /// there is a gradient); `f64::NAN` makes that step diverge.
    struct Scripted {
        values: Vec<f64>,
        calls: std::cell::Cell<usize>,
    }

    impl Task<CpuTrain> for Scripted {
        type Model = Linear<CpuTrain>;
        type Batch = usize;

        fn batches(&self, _epoch: usize) -> Vec<usize> {
            (0..self.values.len()).collect()
        }

        fn loss(&self, model: &Linear<CpuTrain>, _batch: &usize) -> Tensor<CpuTrain, 1> {
            let step = self.calls.get();
            self.calls.set(step + 1);
            let device = self.device();
            let out = model.forward(Tensor::<CpuTrain, 2>::ones([1, 2], &device));
            let value = Tensor::<CpuTrain, 1>::from_floats([self.values[step] as f32], &device);
            out.sum().mul_scalar(0.0) + value
        }

        fn evaluate(
            &self,
            _model: &Linear<<CpuTrain as AutodiffBackend>::InnerBackend>,
        ) -> Evaluation {
            Evaluation::default()
        }

        fn device(&self) -> burn::tensor::Device<CpuTrain> {
            Default::default()
        }
    }

    fn run(values: Vec<f64>) -> (Result<usize, TrainError>, Store) {
        let task = Scripted {
            values,
            calls: Default::default(),
        };
        let budget = Budget {
            max_steps: task.values.len(),
            max_epochs: 1,
            eval_every: None,
            eval_each_epoch: false,
            patience: 0,
            keep_best: false,
            seed: 1,
        };
        let model = LinearConfig::new(2, 1).init(&task.device());
        let mut store = Store::default();
        let mut progress = Progress::new("test", true);
        let optim = OptimSection::default().resolve(1e-3);
        let fitted = fit(
            &task,
            model,
            &optim,
            &budget,
            "t",
            &mut store,
            &mut progress,
            None,
        );
        (fitted.map(|f| f.steps), store)
    }

    fn losses(store: &Store) -> Vec<(u64, f64)> {
        store
            .records
            .iter()
            .filter(|r| r.metric == "loss")
            .map(|r| (r.step, r.value))
            .collect()
    }

    #[test]
    fn losses_read_in_groups_are_recorded_for_every_step_in_order() {
        // 40 steps: more than two groups of READ_EVERY_STEPS, and a partial one at the end.
        let values: Vec<f64> = (1..=40).map(|s| f64::from(s) * 0.25).collect();
        let (steps, store) = run(values.clone());
        assert_eq!(steps.unwrap(), 40);
        let expected: Vec<(u64, f64)> = (1..=40u64).zip(values).collect();
        assert_eq!(losses(&store), expected);
        let lrs = store.records.iter().filter(|r| r.metric == "lr").count();
        assert_eq!(lrs, 40);
        let walls: Vec<f64> = store.records.iter().map(|r| r.wall_s).collect();
        assert!(walls.windows(2).all(|w| w[0] <= w[1]), "{walls:?}");
    }

    /// Step `s` (batch `s - 1`) pads two sequences of lengths `s` and 1; evaluation pads more.
    struct Padding;

    impl Task<CpuTrain> for Padding {
        type Model = Linear<CpuTrain>;
        type Batch = usize;

        fn batches(&self, _epoch: usize) -> Vec<usize> {
            (0..5).collect()
        }

        fn loss(&self, model: &Linear<CpuTrain>, batch: &usize) -> Tensor<CpuTrain, 1> {
            let long = vec![7u32; batch + 1];
            crate::data::batch::pad(&[&long, &[7]], 0, 64);
            let out = model.forward(Tensor::<CpuTrain, 2>::ones([1, 2], &self.device()));
            out.sum().reshape([1])
        }

        fn evaluate(
            &self,
            _model: &Linear<<CpuTrain as AutodiffBackend>::InnerBackend>,
        ) -> Evaluation {
            crate::data::batch::pad(&[&[7; 40], &[7]], 0, 64);
            Evaluation::default()
        }

        fn device(&self) -> burn::tensor::Device<CpuTrain> {
            Default::default()
        }
    }

    #[test]
    fn throughput_counts_the_steps_after_the_first_and_leaves_evaluation_out() {
        let _rng = crate::model::rng_lock();
        let budget = Budget {
            max_steps: 10,
            max_epochs: 2,
            eval_every: None,
            eval_each_epoch: true,
            patience: 0,
            keep_best: false,
            seed: 1,
        };
        let model = LinearConfig::new(2, 1).init(&Padding.device());
        let fitted = fit(
            &Padding,
            model,
            &OptimSection::default().resolve(1e-3),
            &budget,
            "t",
            &mut Store::default(),
            &mut Progress::new("test", true),
            None,
        )
        .unwrap();
        let t = fitted.throughput.unwrap();
        // Steps 2..=10 are batches 1..=4 of epoch 1 and 0..=4 of epoch 2: two rows padded to the
        // longer, `batch + 1` tokens, and the short row's one.
        let batches = (1..5).chain(0..5);
        assert_eq!(t.steps, 9);
        assert_eq!(t.tokens, batches.clone().map(|b| 2 * (b + 1)).sum::<u64>());
        assert_eq!(t.effective_tokens, batches.map(|b| b + 2).sum::<u64>());
        assert!(t.seconds > 0.0 && t.tokens_per_s() > t.effective_tokens_per_s());
    }

    #[test]
    fn a_diverged_step_inside_a_group_is_reported_as_itself() {
        let mut values: Vec<f64> = vec![1.0; 30];
        values[20] = f64::NAN;
        let (fitted, store) = run(values);
        match fitted {
            Err(TrainError::Diverged { step, value }) => {
                assert_eq!(step, 21);
                assert!(value.is_nan());
            }
            other => panic!("expected divergence at step 21, got {other:?}"),
        }
        let recorded: Vec<u64> = losses(&store).iter().map(|r| r.0).collect();
        assert_eq!(
            recorded,
            (1..=20).collect::<Vec<u64>>(),
            "steps before it stay recorded"
        );
    }
}
