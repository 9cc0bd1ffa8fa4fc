//! Runs an experiment's stages in order — data, tokenizer, pretrain, finetune, eval — writing each
//! stage's outputs into the run directory as soon as it finishes, then renders the report.
//! A failed stage leaves everything before it on disk and names itself in the error.

mod stats;
pub mod tasks;

use std::path::{Path, PathBuf};
use std::time::Instant;

use burn::module::{AutodiffModule, Module};
use burn::record::{FullPrecisionSettings, NamedMpkFileRecorder};
use burn::tensor::backend::{AutodiffBackend, Backend};

use crate::config::train::{Objective, Pooling, DEFAULT_PRETRAIN_STEPS};
use crate::config::Experiment;
use crate::data::{DataError, Datasets};
use crate::metrics::classification::Scores;
use crate::metrics::{ResultRow, Store};
use crate::model::{BackboneConfig, Classifier, ClassifierHead, LmHead, LmModel, Pool};
use crate::report::{self, RunSummary};
use crate::tokenizer::TextTokenizer;
use crate::train::backend::{self, BackendError, DeviceInfo};
use crate::train::{fit, Budget, Progress, TrainError};
pub use stats::SplitStats;
use tasks::{FinetuneTask, PretrainTask};

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error(transparent)]
    Backend(#[from] BackendError),
    #[error("{0}")]
    Data(#[from] DataError),
    #[error("stage `{stage}` failed: {message}")]
    Stage {
        stage: &'static str,
        message: String,
    },
}

impl RunError {
    /// 2 for bad input (the user's file or data), 1 for a stage that failed while running.
    pub fn exit_code(&self) -> i32 {
        match self {
            RunError::Backend(_) | RunError::Data(_) => 2,
            RunError::Stage { .. } => 1,
        }
    }
}

fn stage_err(stage: &'static str) -> impl Fn(String) -> RunError {
    move |message| RunError::Stage { stage, message }
}

pub struct Options {
    pub quiet: bool,
}

pub struct Outcome {
    pub run_dir: PathBuf,
    pub report: PathBuf,
    pub test_accuracy: Option<f64>,
}

/// Reads every split and checks labels, without training: the data half of `xrun validate`.
pub fn check_data(exp: &Experiment) -> Result<Datasets, RunError> {
    Ok(Datasets::load(exp)?)
}

pub fn run(exp: &Experiment, opts: &Options) -> Result<Outcome, RunError> {
    backend::dispatch(exp.raw.experiment.backend, RunJob { exp, opts })?
}

struct RunJob<'a> {
    exp: &'a Experiment,
    opts: &'a Options,
}

impl backend::Job for RunJob<'_> {
    type Output = Result<Outcome, RunError>;
    fn run<B: AutodiffBackend>(self, device: B::Device, info: DeviceInfo) -> Self::Output {
        run_on::<B>(self.exp, self.opts, info, device)
    }
}

/// Wall-clock time per stage, in the order they ran.
#[derive(Default)]
struct Clock {
    stages: Vec<(String, f64)>,
}

impl Clock {
    fn time<T>(&mut self, stage: &str, f: impl FnOnce() -> T) -> T {
        let t = Instant::now();
        let out = f();
        self.stages
            .push((stage.to_string(), t.elapsed().as_secs_f64()));
        out
    }
}

fn run_on<B: AutodiffBackend>(
    exp: &Experiment,
    opts: &Options,
    info: DeviceInfo,
    device: B::Device,
) -> Result<Outcome, RunError> {
    let run_dir = exp.run_dir();
    let io = stage_err("setup");
    std::fs::create_dir_all(run_dir.join("checkpoints"))
        .map_err(|e| io(format!("cannot create {}: {e}", run_dir.display())))?;
    // Held until this function returns: a second xrun on the same run directory refuses.
    let _lock = lock_run_dir(&run_dir)?;
    std::fs::write(run_dir.join("config.resolved.toml"), exp.resolved_toml())
        .map_err(|e| io(format!("cannot write config.resolved.toml: {e}")))?;
    let mut clock = Clock::default();
    let mut store = Store::default();
    let mut summary = RunSummary::new(exp, &info);
    let result = stages::<B>(
        exp,
        opts,
        &device,
        &run_dir,
        &mut summary,
        &mut store,
        &mut clock,
    );
    // Whatever happened, keep what the finished stages produced and say in the report how it ended.
    summary.stage_times = clock.stages.clone();
    summary.failure = result.as_ref().err().map(ToString::to_string);
    let written = store
        .write(&run_dir)
        .map_err(|e| stage_err("report")(e.to_string()))
        .and_then(|()| {
            report::write(&run_dir, &summary, &store).map_err(|e| stage_err("report")(e))
        });
    result?;
    Ok(Outcome {
        run_dir: run_dir.clone(),
        report: written?,
        test_accuracy: store.result("test", "accuracy"),
    })
}

/// The stages in order; each fills in its part of the summary as soon as it has it.
fn stages<B: AutodiffBackend>(
    exp: &Experiment,
    opts: &Options,
    device: &B::Device,
    run_dir: &Path,
    summary: &mut RunSummary,
    store: &mut Store,
    clock: &mut Clock,
) -> Result<(), RunError> {
    let data = clock.time("data", || Datasets::load(exp))?;
    log(
        opts,
        &format!(
            "data: {} corpus texts, {} train / {} dev / {} test examples, {} labels",
            data.corpus.as_ref().map_or(0, |c| c.examples.len()),
            data.train.examples.len(),
            data.dev.as_ref().map_or(0, |d| d.examples.len()),
            data.test.as_ref().map_or(0, |d| d.examples.len()),
            data.labels.len()
        ),
    );
    summary.labels = data.labels.clone();

    let base_dir = exp.file.parent().unwrap_or(Path::new("")).to_path_buf();
    let tokenizer = clock.time("tokenizer", || {
        let tok = TextTokenizer::build(&exp.raw.tokenizer, &base_dir, data.tokenizer_texts())
            .map_err(|e| stage_err("tokenizer")(e.to_string()))?;
        tok.save(&run_dir.join("tokenizer.json"))
            .map_err(|e| stage_err("tokenizer")(e.to_string()))?;
        Ok::<_, RunError>(tok)
    })?;
    summary.vocab_size = Some(tokenizer.vocab_size);
    let max_len = exp.raw.model.max_len;
    let encoded = clock
        .time("encode", || stats::encode_all(&data, &tokenizer, max_len))
        .map_err(|e| stage_err("tokenizer")(e.to_string()))?;
    summary.data = encoded.stats.clone();
    log(
        opts,
        &format!(
            "tokenizer: {} tokens in the vocabulary",
            tokenizer.vocab_size
        ),
    );

    let m = &exp.raw.model;
    let backbone_cfg = BackboneConfig {
        vocab_size: tokenizer.vocab_size,
        d_model: m.d_model,
        layers: m.layers,
        heads: m.heads,
        d_ff: m.d_ff,
        max_len,
        dropout: m.dropout,
        pre_norm: m.norm == crate::config::model::NormPlacement::Pre,
        causal: exp.raw.pretrain.objective == Objective::Ar,
    };
    summary.parameters = Some(backbone_cfg.parameters());
    summary.model = Some(backbone_cfg.clone());

    let backbone = clock.time("pretrain", || {
        pretrain::<B>(
            exp,
            opts,
            &encoded,
            &tokenizer,
            &backbone_cfg,
            store,
            device,
            run_dir,
        )
    })?;
    store
        .write(run_dir)
        .map_err(|e| stage_err("pretrain")(e.to_string()))?;
    let classes = data.labels.len();
    let (model, pool) = clock.time("finetune", || {
        finetune::<B>(
            exp,
            opts,
            &encoded,
            backbone,
            &backbone_cfg,
            classes,
            store,
            device,
            run_dir,
        )
    })?;
    clock.time("eval", || {
        let pad = tokenizer.specials.pad;
        evaluate::<B::InnerBackend>(
            exp,
            &encoded,
            &model,
            pool,
            &data.labels,
            pad,
            store,
            summary,
            device,
        )
    });
    Ok(())
}

/// Takes an exclusive lock on `<run_dir>/.lock` (released when the file is dropped or the process
/// dies) and writes this process's id into it, so the refusal can say who holds it.
fn lock_run_dir(run_dir: &Path) -> Result<std::fs::File, RunError> {
    use std::io::{Read, Seek, Write};
    let err = stage_err("setup");
    let path = run_dir.join(".lock");
    let mut file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .map_err(|e| err(format!("cannot open {}: {e}", path.display())))?;
    if let Err(e) = file.try_lock() {
        let mut holder = String::new();
        let _ = file.read_to_string(&mut holder);
        let holder = holder.trim();
        let who = if holder.is_empty() {
            "another xrun".to_string()
        } else {
            format!("xrun (pid {holder})")
        };
        return Err(err(format!(
            "{who} is already running in {} ({e}); wait for it to finish or set another \
             experiment.output_dir",
            run_dir.display()
        )));
    }
    let written = file
        .set_len(0)
        .and_then(|()| file.rewind())
        .and_then(|()| write!(file, "{}", std::process::id()))
        .and_then(|()| file.flush());
    written.map_err(|e| err(format!("cannot write {}: {e}", path.display())))?;
    Ok(file)
}

fn log(opts: &Options, line: &str) {
    if !opts.quiet {
        eprintln!("{line}");
    }
}

fn save<B: Backend, M: Module<B>>(
    model: M,
    path: &Path,
    stage: &'static str,
) -> Result<(), RunError> {
    model
        .save_file(path, &NamedMpkFileRecorder::<FullPrecisionSettings>::new())
        .map_err(|e| stage_err(stage)(format!("cannot save {}: {e}", path.display())))
}

fn train_error(stage: &'static str) -> impl Fn(TrainError) -> RunError {
    move |e| stage_err(stage)(e.to_string())
}

#[allow(clippy::too_many_arguments)]
fn pretrain<B: AutodiffBackend>(
    exp: &Experiment,
    opts: &Options,
    encoded: &stats::Encoded,
    tokenizer: &TextTokenizer,
    cfg: &BackboneConfig,
    store: &mut Store,
    device: &B::Device,
    run_dir: &Path,
) -> Result<crate::model::Backbone<B::InnerBackend>, RunError> {
    let p = &exp.raw.pretrain;
    let seed = exp.raw.experiment.seed;
    B::seed(device, seed);
    let backbone = cfg.init::<B>(device);
    if p.objective == Objective::None {
        return Ok(backbone.valid());
    }
    let (train, validation) = stats::hold_out(&encoded.corpus, p.validation_fraction, seed);
    let task = PretrainTask::<B> {
        train: &train,
        validation: &validation,
        objective: p.objective,
        specials: tokenizer.specials,
        vocab_size: tokenizer.vocab_size,
        mask_prob: p.mask_prob,
        batch_size: p.batch_size,
        eval_batch_size: exp.raw.eval.batch_size,
        seed,
        device: device.clone(),
    };
    let per_epoch = train.len().div_ceil(p.batch_size).max(1);
    let max_steps = match (p.steps, p.epochs) {
        (_, Some(epochs)) => epochs * per_epoch,
        (Some(steps), None) => steps,
        (None, None) => DEFAULT_PRETRAIN_STEPS,
    };
    let budget = Budget {
        max_steps,
        max_epochs: usize::MAX,
        eval_every: Some(p.eval_every),
        eval_each_epoch: false,
        patience: 0,
        keep_best: false,
    };
    let model = LmModel {
        backbone,
        head: LmHead::new(cfg.d_model, cfg.vocab_size, device),
    };
    let mut bar = Progress::new("pretrain", opts.quiet);
    let fitted = fit(
        &task,
        model,
        &exp.pretrain_optim(),
        &budget,
        "pretrain",
        store,
        &mut bar,
    )
    .map_err(train_error("pretrain"))?;
    save(
        fitted.model.clone(),
        &run_dir.join("checkpoints/pretrain"),
        "pretrain",
    )?;
    Ok(fitted.model.backbone)
}

#[allow(clippy::too_many_arguments)]
fn finetune<B: AutodiffBackend>(
    exp: &Experiment,
    opts: &Options,
    encoded: &stats::Encoded,
    backbone: crate::model::Backbone<B::InnerBackend>,
    cfg: &BackboneConfig,
    classes: usize,
    store: &mut Store,
    device: &B::Device,
    run_dir: &Path,
) -> Result<(Classifier<B::InnerBackend>, Pool), RunError> {
    let f = &exp.raw.finetune;
    let seed = exp.raw.experiment.seed;
    B::seed(device, seed.wrapping_add(1));
    let pool = match f.pooling {
        Pooling::Cls => Pool::First,
        Pooling::Mean => Pool::Mean,
        Pooling::Last => Pool::Last,
        Pooling::Auto if cfg.causal => Pool::Last,
        Pooling::Auto => Pool::First,
    };
    let model = Classifier {
        backbone: crate::model::Backbone::<B>::from_inner(backbone),
        head: ClassifierHead::new(cfg.d_model, classes, cfg.dropout, device),
    };
    let task = FinetuneTask::<B> {
        train: &encoded.train,
        dev: encoded.dev.as_ref(),
        classes,
        pool,
        pad_id: encoded.pad_id,
        batch_size: f.batch_size,
        eval_batch_size: exp.raw.eval.batch_size,
        select: f.select_metric,
        seed: seed.wrapping_add(1),
        device: device.clone(),
    };
    let per_epoch = encoded.train.ids.len().div_ceil(f.batch_size).max(1);
    let budget = Budget {
        max_steps: f.epochs * per_epoch,
        max_epochs: f.epochs,
        eval_every: None,
        eval_each_epoch: true,
        patience: f.patience,
        keep_best: true,
    };
    let mut bar = Progress::new("finetune", opts.quiet);
    let fitted = fit(
        &task,
        model,
        &exp.finetune_optim(),
        &budget,
        "finetune",
        store,
        &mut bar,
    )
    .map_err(train_error("finetune"))?;
    save(
        fitted.model.clone(),
        &run_dir.join("checkpoints/finetune"),
        "finetune",
    )?;
    log(
        opts,
        &format!(
            "finetune: {} steps{}{}",
            fitted.steps,
            fitted
                .best_step
                .map_or(String::new(), |s| format!(", best dev score at step {s}")),
            if fitted.stopped_early {
                ", stopped early"
            } else {
                ""
            }
        ),
    );
    Ok((fitted.model, pool))
}

#[allow(clippy::too_many_arguments)]
fn evaluate<B: Backend>(
    exp: &Experiment,
    encoded: &stats::Encoded,
    model: &Classifier<B>,
    pool: Pool,
    labels: &[String],
    pad_id: u32,
    store: &mut Store,
    summary: &mut RunSummary,
    device: &B::Device,
) {
    let batch = exp.raw.eval.batch_size;
    let splits = [
        ("dev", encoded.dev.as_ref()),
        ("test", encoded.test.as_ref()),
    ];
    for (name, split) in splits {
        let Some(split) = split else { continue };
        let scores = tasks::evaluate_split(model, split, labels.len(), pool, pad_id, batch, device);
        push_results(store, name, &scores, labels);
        summary.scores.push((name.to_string(), scores));
    }
}

fn push_results(store: &mut Store, split: &str, s: &Scores, labels: &[String]) {
    let row = |metric: &str, class: Option<&String>, value: f64| ResultRow {
        split: split.into(),
        metric: metric.into(),
        class: class.cloned(),
        value,
    };
    store.results.push(row("accuracy", None, s.accuracy));
    store.results.push(row("macro_f1", None, s.macro_f1));
    store.results.push(row("examples", None, s.n as f64));
    for (c, label) in s.per_class.iter().zip(labels) {
        store
            .results
            .push(row("precision", Some(label), c.precision));
        store.results.push(row("recall", Some(label), c.recall));
        store.results.push(row("f1", Some(label), c.f1));
        store
            .results
            .push(row("support", Some(label), c.support as f64));
    }
}
