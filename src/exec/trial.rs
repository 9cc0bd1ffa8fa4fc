//! One trial: data → tokenizer → pretrain → finetune + eval, each stage taken from the cache when its
//! key is there, resumed from its checkpoints when a killed run left some, and run otherwise.
//! A stage whose loss stops being finite ends the trial as `diverged`; that outcome is cached too.

use std::path::Path;
use std::time::Instant;

use burn::module::{AutodiffModule, Module};
use burn::record::{FullPrecisionSettings, NamedMpkFileRecorder};
use burn::tensor::backend::{AutodiffBackend, Backend};
use serde::{Deserialize, Serialize};

use super::cache::{Building, Cache, Status};
use super::cloze;
use super::continual;
use super::journal::Journal;
use super::stats::{self, Encoded};
use super::tasks::{self, FinetuneTask, PretrainTask};
use super::{Options, Until};
use crate::config::train::{Method, Objective, Pooling, DEFAULT_PRETRAIN_STEPS};
use crate::data::Datasets;
use crate::metrics::Store;
use crate::model::{Backbone, BackboneConfig, Classifier, LmHead, LmModel, Pool};
use crate::plan::keys::StageKeys;
use crate::plan::Trial;
use crate::report::{RunSummary, StageUse};
use crate::tokenizer::TextTokenizer;
use crate::train::backend::DeviceInfo;
use crate::train::{fit, Budget, Checkpoints, Progress, TrainError};

/// How a trial ended.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "lowercase", tag = "status")]
pub enum TrialStatus {
    Done,
    /// Loss became NaN or infinite; the trial stopped there and the sweep went on.
    Diverged {
        stage: String,
        step: usize,
        reason: String,
    },
    /// Anything else that stopped it (unreadable data, a full disk); exit code `code`.
    Failed {
        stage: String,
        message: String,
        code: i32,
    },
    /// Not finished yet: a study merged while its trials still run (`xrun report FILE`).
    Pending,
}

impl TrialStatus {
    pub fn name(&self) -> &'static str {
        match self {
            TrialStatus::Done => "done",
            TrialStatus::Diverged { .. } => "diverged",
            TrialStatus::Failed { .. } => "failed",
            TrialStatus::Pending => "pending",
        }
    }
}

/// What one trial produced: its summary (as far as it got) and its metric records and results.
pub struct TrialRun {
    pub status: TrialStatus,
    pub summary: RunSummary,
    pub store: Store,
}

/// Everything a trial's stages share.
pub struct Context<'a, B: Backend> {
    pub cache: &'a Cache,
    pub journal: &'a mut Journal,
    pub opts: &'a Options,
    pub device: B::Device,
    pub info: &'a DeviceInfo,
    /// `[3/15]`, shown before progress lines.
    pub label: String,
    pub experiment: &'a str,
}

/// Stops a stage early: a failure, or a divergence that is the trial's result.
pub(super) enum Stop {
    Failed {
        stage: &'static str,
        message: String,
        code: i32,
    },
    Diverged {
        stage: &'static str,
        step: usize,
        reason: String,
    },
}

pub(super) fn failed(stage: &'static str) -> impl Fn(String) -> Stop {
    move |message| Stop::Failed {
        stage,
        message,
        code: 1,
    }
}

pub(super) fn recorder() -> NamedMpkFileRecorder<FullPrecisionSettings> {
    NamedMpkFileRecorder::<FullPrecisionSettings>::new()
}

pub fn run<B: AutodiffBackend>(trial: &Trial, keys: &StageKeys, cx: &mut Context<B>) -> TrialRun {
    let mut summary = RunSummary::new(&trial.exp, cx.info);
    summary.trial = trial.id.clone();
    let mut store = Store::default();
    cx.journal.log(&trial.id, "trial", "start");
    let result = stages(trial, keys, cx, &mut summary, &mut store);
    let status = match result {
        Ok(()) => TrialStatus::Done,
        Err(Stop::Diverged {
            stage,
            step,
            reason,
        }) => TrialStatus::Diverged {
            stage: stage.into(),
            step,
            reason,
        },
        Err(Stop::Failed {
            stage,
            message,
            code,
        }) => TrialStatus::Failed {
            stage: stage.into(),
            message,
            code,
        },
    };
    match &status {
        TrialStatus::Done => {}
        TrialStatus::Diverged {
            stage,
            step,
            reason,
        } => {
            summary.failure = Some(format!("`{stage}` diverged at step {step}: {reason}"));
        }
        TrialStatus::Failed { stage, message, .. } => {
            summary.failure = Some(format!("stage `{stage}` failed: {message}"));
            cx.journal
                .log(&trial.id, stage, "failed")
                .detail(message.clone());
        }
        TrialStatus::Pending => {}
    }
    summary.status = Some(status.clone());
    TrialRun {
        status,
        summary,
        store,
    }
}

fn stages<B: AutodiffBackend>(
    trial: &Trial,
    keys: &StageKeys,
    cx: &mut Context<B>,
    summary: &mut RunSummary,
    store: &mut Store,
) -> Result<(), Stop> {
    // Fast path: the whole trial is cached; nothing to load but its records.
    if let Some(m) = cx.cache.done("finetune", &keys.finetune) {
        return reuse_finetune(trial, keys, cx, summary, store, m.status);
    }
    let exp = &trial.exp;
    let started = Instant::now();
    let data_error = |e: crate::data::DataError| Stop::Failed {
        stage: "data",
        message: e.to_string(),
        code: 2,
    };
    let mut data = Datasets::load(exp).map_err(data_error)?;
    summary.labels = data.labels.clone();
    summary.tag_scheme = data.scheme.map(|s| s.name().to_string());
    summary
        .stage_times
        .push(("data".into(), started.elapsed().as_secs_f64()));

    let started = Instant::now();
    let tokenizer = tokenizer_stage(trial, keys, cx, &data, summary)?;
    if cx.opts.until == Some(Until::Tokenizer) {
        return Ok(());
    }
    summary.vocab_size = Some(tokenizer.vocab_size);
    // Label efficiency: the tokenizer has seen the whole split; fine-tuning sees the draw.
    if let Some(n) = data.requested_train(exp) {
        data.sample_train(n, exp.raw.data.balanced, exp.raw.experiment.seed)
            .map_err(data_error)?;
    }
    let encoded = stats::encode_all(&data, &tokenizer, exp.raw.model.max_len)
        .map_err(|e| failed("tokenizer")(e.to_string()))?;
    summary.data = encoded.stats.clone();
    summary
        .stage_times
        .push(("tokenizer".into(), started.elapsed().as_secs_f64()));

    let m = &exp.raw.model;
    let cfg = match exp.hf_init() {
        Some(dir) => {
            let hf = crate::hf::read_config(&dir).map_err(failed("pretrain"))?;
            if tokenizer.vocab_size > hf.vocab_size {
                return Err(failed("pretrain")(format!(
                    "{}: the tokenizer has {} tokens, the model's `vocab_size` {}",
                    dir.display(),
                    tokenizer.vocab_size,
                    hf.vocab_size
                )));
            }
            hf.backbone(m.dropout, tokenizer.specials.sep)
        }
        None => BackboneConfig {
            vocab_size: tokenizer.vocab_size,
            d_model: m.d_model,
            layers: m.layers,
            heads: m.heads,
            d_ff: m.d_ff,
            max_len: m.max_len,
            dropout: m.dropout,
            pre_norm: m.norm == crate::config::model::NormPlacement::Pre,
            causal: exp.raw.pretrain.objective == Objective::Ar,
            segments: (m.segments == Some(true)).then_some(tokenizer.specials.sep),
            type_vocab: 2,
            family: Default::default(),
            norm_eps: 1e-5,
            gelu_tanh: false,
            pooler: false,
        },
    };
    summary.parameters = Some(cfg.parameters());
    summary.model = Some(cfg.clone());

    let started = Instant::now();
    let (backbone, lm_head) =
        pretrain_stage(trial, keys, cx, &encoded, &tokenizer, &cfg, summary, store)?;
    summary
        .stage_times
        .push(("pretrain".into(), started.elapsed().as_secs_f64()));
    if cx.opts.until == Some(Until::Pretrain) {
        return Ok(());
    }

    let Some(building) = begin_or_reuse(trial, keys, cx, summary, store)? else {
        return Ok(());
    };
    if matches!(exp.raw.finetune.method, Method::ZeroShot | Method::Pet) {
        let model = LmModel {
            head: lm_head.unwrap_or_else(|| {
                // No pretraining: an untrained head, the chance-level baseline.
                crate::model::dropout::seed::<B>(
                    &cx.device,
                    exp.raw.experiment.seed.wrapping_add(1),
                );
                cfg.lm_head::<B>(&cx.device).valid()
            }),
            backbone,
        };
        return prompt_stage(
            trial, keys, cx, &data, &encoded, &tokenizer, model, &cfg, summary, store, building,
        );
    }
    if let Some(cl) = &exp.raw.continual {
        let pad_id = encoded.pad_id;
        let first = continual::TaskData {
            name: cl.first.clone(),
            labels: data.labels.clone(),
            train: encoded.train,
            dev: encoded.dev,
            test: encoded.test,
        };
        let tasks = continual::load_tasks(trial, cl, first, &tokenizer, summary)?;
        let pool = pool_for(exp.raw.finetune.pooling, &cfg);
        return continual::continual_stage(
            trial, keys, cx, cl, tasks, pad_id, pool, backbone, &cfg, summary, store, building,
        );
    }
    finetune_stage(
        trial, keys, cx, &data, &encoded, backbone, &cfg, summary, store, building,
    )
}

/// Locks the finetune entry; if another process finished it while we waited, reuses it instead.
fn begin_or_reuse<B: AutodiffBackend>(
    trial: &Trial,
    keys: &StageKeys,
    cx: &mut Context<B>,
    summary: &mut RunSummary,
    store: &mut Store,
) -> Result<Option<Building>, Stop> {
    let building = cx
        .cache
        .begin("finetune", &keys.finetune, waiting(cx.opts, "finetune"))
        .map_err(failed("finetune"))?;
    match cx.cache.done("finetune", &keys.finetune) {
        Some(m) => {
            drop(building);
            store.records.clear();
            reuse_finetune(trial, keys, cx, summary, store, m.status).map(|()| None)
        }
        None => Ok(Some(building)),
    }
}

/// Fills the trial from cached entries: the finetune entry's summary and records, plus the
/// pretraining records of its parent entry.
fn reuse_finetune<B: Backend>(
    trial: &Trial,
    keys: &StageKeys,
    cx: &mut Context<B>,
    summary: &mut RunSummary,
    store: &mut Store,
    status: Status,
) -> Result<(), Stop> {
    let entry = cx.cache.entry("finetune", &keys.finetune);
    cx.journal
        .log(&trial.id, "finetune", "cached")
        .key(&keys.finetune.hash);
    let cached: RunSummary = crate::report::read_json(&entry.join("summary.json"))
        .map_err(|e| failed("finetune")(format!("cached entry: {e}")))?;
    let fresh = std::mem::replace(summary, cached);
    // The entry may have been built by another trial or experiment: keep this trial's identity.
    summary.name = fresh.name;
    summary.description = fresh.description;
    summary.experiment_file = fresh.experiment_file;
    summary.config_toml = fresh.config_toml;
    summary.trial = fresh.trial;
    summary.git_commit = fresh.git_commit;
    summary.data_root = fresh.data_root;
    for s in &mut summary.stages {
        s.cached = true;
    }
    if let Some(key) = &keys.pretrain {
        let dir = cx.cache.entry("pretrain", key);
        store.records.extend(read_records(&dir, "pretrain")?);
    }
    store.records.extend(read_records(&entry, "finetune")?);
    summary.push_results(store);
    match status {
        Status::Done => Ok(()),
        // Only a finetune divergence is cached in a finetune entry: a diverged pretraining stops
        // its trials before they have one.
        Status::Diverged { step, reason } => Err(Stop::Diverged {
            stage: "finetune",
            step,
            reason,
        }),
    }
}

fn read_records(dir: &Path, stage: &'static str) -> Result<Vec<crate::metrics::Record>, Stop> {
    Store::read_records(dir)
        .map(|s| s.records)
        .map_err(|e| failed(stage)(format!("cached records in {}: {e}", dir.display())))
}

fn tokenizer_stage<B: Backend>(
    trial: &Trial,
    keys: &StageKeys,
    cx: &mut Context<B>,
    data: &Datasets,
    summary: &mut RunSummary,
) -> Result<TextTokenizer, Stop> {
    let err = failed("tokenizer");
    let key = &keys.tokenizer;
    let load = |dir: &Path| TextTokenizer::load(&dir.join("tokenizer.json"));
    let cached = cx.cache.done("tokenizer", key).is_some();
    summary
        .stages
        .push(StageUse::new("tokenizer", &key.hash, cached));
    if cached {
        cx.journal
            .log(&trial.id, "tokenizer", "cached")
            .key(&key.hash);
        return load(&cx.cache.entry("tokenizer", key)).map_err(|e| err(e.to_string()));
    }
    let building = cx
        .cache
        .begin("tokenizer", key, waiting(cx.opts, "tokenizer"))
        .map_err(&err)?;
    if cx.cache.done("tokenizer", key).is_some() {
        return load(&cx.cache.entry("tokenizer", key)).map_err(|e| err(e.to_string()));
    }
    cx.journal
        .log(&trial.id, "tokenizer", "start")
        .key(&key.hash);
    let exp = &trial.exp;
    let tok = match exp.hf_init() {
        Some(dir) => crate::hf::load_tokenizer(&dir).map_err(&err)?,
        None => {
            let base_dir = exp.file.parent().unwrap_or(Path::new("")).to_path_buf();
            TextTokenizer::build(&exp.raw.tokenizer, &base_dir, data.tokenizer_texts())
                .map_err(|e| err(e.to_string()))?
        }
    };
    let built_by = format!("{}/{}", cx.experiment, trial.id);
    cx.cache
        .commit("tokenizer", key, building, &built_by, Status::Done, |dir| {
            tok.save(&dir.join("tokenizer.json"))
                .map_err(|e| e.to_string())
        })
        .map_err(&err)?;
    cx.journal
        .log(&trial.id, "tokenizer", "done")
        .key(&key.hash);
    log(
        cx.opts,
        &format!("tokenizer: {} tokens in the vocabulary", tok.vocab_size),
    );
    Ok(tok)
}

/// Logs a stage's divergence and ends the trial with it.
fn diverged(
    journal: &mut Journal,
    trial: &Trial,
    stage: &'static str,
    key: &crate::plan::keys::Key,
    step: usize,
    reason: String,
) -> Stop {
    journal
        .log(&trial.id, stage, "diverged")
        .key(&key.hash)
        .step(step)
        .detail(reason.clone());
    Stop::Diverged {
        stage,
        step,
        reason,
    }
}

/// Says why nothing happens while another xrun builds the same cache entry.
fn waiting<'a>(opts: &'a Options, stage: &'a str) -> impl FnOnce() + 'a {
    move || {
        log(
            opts,
            &format!("{stage}: another xrun is computing this stage; waiting to reuse its result"),
        )
    }
}

pub(super) fn log(opts: &Options, line: &str) {
    if !opts.quiet {
        eprintln!("{line}");
    }
}

/// Keeps a stage's throughput for the report and says it.
fn measured(
    opts: &Options,
    label: &str,
    stage: &str,
    throughput: Option<crate::train::Throughput>,
    summary: &mut RunSummary,
) {
    let Some(t) = throughput else {
        return;
    };
    log(
        opts,
        format!(
            "{label} {stage}: {:.0} tokens/s, {:.0} without padding ({} steps in {:.1} s, \
             evaluation left out)",
            t.tokens_per_s(),
            t.effective_tokens_per_s(),
            t.steps,
            t.seconds
        )
        .trim_start(),
    );
    summary.throughput.push((stage.into(), t));
}

/// A pretraining's backbone, and its LM head (none without pretraining).
type Pretrained<B> = (
    Backbone<<B as AutodiffBackend>::InnerBackend>,
    Option<LmHead<<B as AutodiffBackend>::InnerBackend>>,
);

#[allow(clippy::too_many_arguments)]
fn pretrain_stage<B: AutodiffBackend>(
    trial: &Trial,
    keys: &StageKeys,
    cx: &mut Context<B>,
    encoded: &Encoded,
    tokenizer: &TextTokenizer,
    cfg: &BackboneConfig,
    summary: &mut RunSummary,
    store: &mut Store,
) -> Result<Pretrained<B>, Stop> {
    let exp = &trial.exp;
    let p = &exp.raw.pretrain;
    let seed = exp.raw.experiment.seed;
    let device = cx.device.clone();
    crate::model::dropout::seed::<B>(&device, seed);
    let err = failed("pretrain");
    let (backbone, head) = match exp.hf_init() {
        Some(dir) => {
            let imported = crate::hf::import::<B>(&dir, cfg, &device).map_err(&err)?;
            for note in &imported.notes {
                log(cx.opts, &format!("{}: {note}", dir.display()));
            }
            (imported.backbone, imported.lm_head)
        }
        None => (cfg.init::<B>(&device), None),
    };
    let Some(key) = &keys.pretrain else {
        return Ok((backbone.valid(), head.map(|h| h.valid())));
    };
    let model = LmModel {
        backbone,
        head: head.unwrap_or_else(|| cfg.lm_head(&device)),
    };
    let reuse =
        |cx: &mut Context<B>, store: &mut Store, summary: &mut RunSummary, status: Status| {
            let dir = cx.cache.entry("pretrain", key);
            cx.journal
                .log(&trial.id, "pretrain", "cached")
                .key(&key.hash);
            summary
                .stages
                .push(StageUse::new("pretrain", &key.hash, true));
            store.records.extend(read_records(&dir, "pretrain")?);
            if let Status::Diverged { step, reason } = status {
                return Err(Stop::Diverged {
                    stage: "pretrain",
                    step,
                    reason,
                });
            }
            // Loaded into the trainable module, then made inner: a record loaded straight into an
            // inner module marks its parameters as not requiring gradients, and fine-tuning would
            // then train the head alone.
            let loaded = model
                .clone()
                .load_file(dir.join("model"), &recorder(), &device)
                .map_err(|e| err(format!("cached model in {}: {e}", dir.display())))?;
            let loaded = loaded.valid();
            Ok((loaded.backbone, Some(loaded.head)))
        };
    if let Some(m) = cx.cache.done("pretrain", key) {
        return reuse(cx, store, summary, m.status);
    }
    let building = cx
        .cache
        .begin("pretrain", key, waiting(cx.opts, "pretrain"))
        .map_err(&err)?;
    if let Some(m) = cx.cache.done("pretrain", key) {
        drop(building);
        return reuse(cx, store, summary, m.status);
    }
    summary
        .stages
        .push(StageUse::new("pretrain", &key.hash, false));
    let (mut train, validation) = stats::hold_out(&encoded.corpus, p.validation_fraction, seed);
    if p.packing {
        train = crate::data::batch::pack(&train, exp.raw.model.max_len, seed);
    }
    let task = PretrainTask::<B> {
        train: &train,
        validation: &validation,
        objective: p.objective,
        specials: tokenizer.specials,
        vocab_size: tokenizer.vocab_size,
        mask_prob: p.mask_prob,
        batch_size: p.batch_size,
        batching: p.batching,
        eval_batch_size: exp.raw.eval.batch_size,
        seed,
        max_len: exp.raw.model.max_len,
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
        seed,
    };
    let mut stage_store = Store::default();
    let result = run_fit(
        trial,
        key,
        cx,
        "pretrain",
        &building.partial,
        &task,
        model,
        &exp.pretrain_optim(),
        &budget,
        &mut stage_store,
    );
    store.records.extend(stage_store.records.iter().cloned());
    let built_by = format!("{}/{}", cx.experiment, trial.id);
    let write_records = |dir: &Path| stage_store.write(dir).map_err(|e| e.to_string());
    match result {
        Ok(fitted) => {
            measured(cx.opts, &cx.label, "pretrain", fitted.throughput, summary);
            let model = fitted.model;
            cx.cache
                .commit("pretrain", key, building, &built_by, Status::Done, |dir| {
                    write_records(dir)?;
                    model
                        .clone()
                        .save_file(dir.join("model"), &recorder())
                        .map_err(|e| e.to_string())
                })
                .map_err(&err)?;
            cx.journal
                .log(&trial.id, "pretrain", "done")
                .key(&key.hash)
                .step(fitted.steps);
            Ok((model.backbone, Some(model.head)))
        }
        Err(TrainError::Diverged { step, value }) => {
            let reason = format!("loss became {value}");
            let status = Status::Diverged {
                step,
                reason: reason.clone(),
            };
            cx.cache
                .commit("pretrain", key, building, &built_by, status, write_records)
                .map_err(&err)?;
            Err(diverged(cx.journal, trial, "pretrain", key, step, reason))
        }
        Err(e) => Err(err(e.to_string())),
    }
}

/// Runs `fit` with checkpoints in `ck_dir` (the entry's partial folder, or a folder in it),
/// saying so when it resumes.
#[allow(clippy::too_many_arguments)]
pub(super) fn run_fit<B: AutodiffBackend, T: crate::train::Task<B>>(
    trial: &Trial,
    key: &crate::plan::keys::Key,
    cx: &mut Context<B>,
    stage: &str,
    ck_dir: &Path,
    task: &T,
    model: T::Model,
    optim: &crate::config::train::Optim,
    budget: &Budget,
    store: &mut Store,
) -> Result<crate::train::Fitted<<T::Model as AutodiffModule<B>>::InnerModule>, TrainError> {
    match Checkpoints::latest_step(ck_dir) {
        Some(step) => {
            cx.journal
                .log(&trial.id, stage, "resume")
                .key(&key.hash)
                .step(step);
            log(
                cx.opts,
                &format!(
                    "{} {stage}: resuming from the checkpoint at step {step}",
                    cx.label
                ),
            );
        }
        None => {
            cx.journal.log(&trial.id, stage, "start").key(&key.hash);
        }
    }
    let every = trial.exp.raw.experiment.checkpoint_every;
    let name = format!("{} {stage}", cx.label);
    let mut bar = Progress::new(name.trim_start(), cx.opts.quiet);
    let journal = &mut *cx.journal;
    let mut on_save = |step: usize| {
        journal.log(&trial.id, stage, "checkpoint").step(step);
    };
    // 0 turns checkpoints off (a killed stage then starts over).
    let ck = (every > 0).then(|| Checkpoints {
        dir: ck_dir.to_path_buf(),
        every,
        on_save: &mut on_save,
    });
    fit(task, model, optim, budget, stage, store, &mut bar, ck)
}

#[allow(clippy::too_many_arguments)]
fn finetune_stage<B: AutodiffBackend>(
    trial: &Trial,
    keys: &StageKeys,
    cx: &mut Context<B>,
    data: &Datasets,
    encoded: &Encoded,
    backbone: Backbone<B::InnerBackend>,
    cfg: &BackboneConfig,
    summary: &mut RunSummary,
    store: &mut Store,
    building: Building,
) -> Result<(), Stop> {
    let exp = &trial.exp;
    let key = &keys.finetune;
    let f = &exp.raw.finetune;
    let seed = exp.raw.experiment.seed;
    let device = cx.device.clone();
    summary
        .stages
        .push(StageUse::new("finetune", &key.hash, false));
    crate::model::dropout::seed::<B>(&device, seed.wrapping_add(1));
    let pool = pool_for(f.pooling, cfg);
    let classes = data.labels.len();
    let backbone = with_method(f, Backbone::<B>::from_inner(backbone), &device);
    let model = Classifier {
        backbone,
        head: cfg.classifier_head(classes, data.scheme.is_some(), &device),
    };
    let (trainable, total) = crate::train::parameter_counts::<B, _>(&model);
    summary.trainable_parameters = Some((trainable, total));
    let task = FinetuneTask::<B> {
        train: &encoded.train,
        dev: encoded.dev.as_ref(),
        labels: &data.labels,
        pool,
        pad_id: encoded.pad_id,
        batch_size: f.batch_size,
        batching: f.batching,
        eval_batch_size: exp.raw.eval.batch_size,
        select: f.select_metric,
        seed: seed.wrapping_add(1),
        device: device.clone(),
    };
    let mut stage_store = Store::default();
    let (status, model) = fit_finetune(
        trial,
        key,
        cx,
        "finetune",
        &building.partial,
        &task,
        model,
        encoded.train.ids.len(),
        summary,
        store,
        &mut stage_store,
    )?;
    if let Some(model) = &model {
        let started = Instant::now();
        evaluate::<B::InnerBackend>(exp, encoded, model, pool, &data.labels, summary, &device);
        summary
            .stage_times
            .push(("eval".into(), started.elapsed().as_secs_f64()));
    }
    publish_finetune(
        trial,
        key,
        cx,
        building,
        summary,
        store,
        stage_store,
        status,
        model,
    )
}

/// How a classifier pools: `auto` is the last token under causal attention, `[CLS]` otherwise.
pub(super) fn pool_for(pooling: Pooling, cfg: &BackboneConfig) -> Pool {
    match pooling {
        Pooling::Cls => Pool::First,
        Pooling::Mean => Pool::Mean,
        Pooling::Last => Pool::Last,
        Pooling::Auto if cfg.causal => Pool::Last,
        Pooling::Auto => Pool::First,
    }
}

/// A pretrained backbone made ready for `finetune.method`: trainable, frozen, or frozen with the
/// parts a parameter-efficient method adds (created after freezing, so they train).
pub(super) fn with_method<B: AutodiffBackend>(
    f: &crate::config::train::FinetuneSection,
    backbone: Backbone<B>,
    device: &B::Device,
) -> Backbone<B> {
    match f.method {
        Method::Full => backbone,
        Method::LinearProbe => backbone.no_grad(),
        Method::Lora => backbone
            .no_grad()
            .with_lora(&f.lora.clone().unwrap_or_default(), device),
        Method::Adapter => {
            let size = f.adapter.clone().unwrap_or_default().size;
            backbone.no_grad().with_adapters(size, device)
        }
        Method::Prefix => {
            let length = f.prefix.clone().unwrap_or_default().length;
            backbone.no_grad().with_prefix(length, device)
        }
        Method::ZeroShot | Method::Pet => {
            unreachable!("prompt-based methods run through `prompt_stage`")
        }
    }
}

/// The inference form of a task's trained model.
pub(super) type Trained<B, T> =
    <<T as crate::train::Task<B>>::Model as AutodiffModule<B>>::InnerModule;

/// Fine-tunes `model` on `task` for `finetune.epochs` epochs of `train_len` examples, keeping the
/// dev-best snapshot: the model, or the divergence that is the trial's result.
#[allow(clippy::too_many_arguments)]
pub(super) fn fit_finetune<B: AutodiffBackend, T: crate::train::Task<B>>(
    trial: &Trial,
    key: &crate::plan::keys::Key,
    cx: &mut Context<B>,
    stage: &str,
    ck_dir: &Path,
    task: &T,
    model: T::Model,
    train_len: usize,
    summary: &mut RunSummary,
    store: &mut Store,
    stage_store: &mut Store,
) -> Result<(Status, Option<Trained<B, T>>), Stop> {
    let exp = &trial.exp;
    let f = &exp.raw.finetune;
    let budget = Budget {
        max_steps: f.epochs * train_len.div_ceil(f.batch_size).max(1),
        max_epochs: f.epochs,
        eval_every: None,
        eval_each_epoch: true,
        patience: f.patience,
        keep_best: true,
        seed: exp.raw.experiment.seed.wrapping_add(1),
    };
    let started = Instant::now();
    let result = run_fit(
        trial,
        key,
        cx,
        stage,
        ck_dir,
        task,
        model,
        &exp.finetune_optim(),
        &budget,
        stage_store,
    );
    summary
        .stage_times
        .push((stage.into(), started.elapsed().as_secs_f64()));
    match result {
        Ok(fitted) => {
            measured(cx.opts, &cx.label, stage, fitted.throughput, summary);
            log(
                cx.opts,
                &format!(
                    "{} {stage}: {} steps{}{}",
                    cx.label,
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
            Ok((Status::Done, Some(fitted.model)))
        }
        Err(TrainError::Diverged { step, value }) => {
            let reason = format!("loss became {value}");
            summary.failure = Some(format!("`{stage}` diverged at step {step}: {reason}"));
            Ok((Status::Diverged { step, reason }, None))
        }
        Err(e) => {
            store.records.append(&mut stage_store.records);
            Err(failed("finetune")(e.to_string()))
        }
    }
}

/// Publishes a finetune entry (summary, records, the trained model if any) and takes its scores
/// into the trial's store.
#[allow(clippy::too_many_arguments)]
pub(super) fn publish_finetune<B: Backend, M: Module<B>>(
    trial: &Trial,
    key: &crate::plan::keys::Key,
    cx: &mut Context<impl Backend>,
    building: Building,
    summary: &mut RunSummary,
    store: &mut Store,
    stage_store: Store,
    status: Status,
    model: Option<M>,
) -> Result<(), Stop> {
    let err = failed("finetune");
    let built_by = format!("{}/{}", cx.experiment, trial.id);
    cx.cache
        .commit(
            "finetune",
            key,
            building,
            &built_by,
            status.clone(),
            |dir| {
                stage_store.write(dir).map_err(|e| e.to_string())?;
                let json = serde_json::to_string_pretty(&*summary).map_err(|e| e.to_string())?;
                std::fs::write(dir.join("summary.json"), json).map_err(|e| e.to_string())?;
                match &model {
                    Some(m) => m
                        .clone()
                        .save_file(dir.join("model"), &recorder())
                        .map_err(|e| e.to_string()),
                    None => Ok(()),
                }
            },
        )
        .map_err(&err)?;
    store.records.extend(stage_store.records);
    summary.push_results(store);
    match status {
        Status::Done => {
            cx.journal.log(&trial.id, "finetune", "done").key(&key.hash);
            Ok(())
        }
        Status::Diverged { step, reason } => {
            Err(diverged(cx.journal, trial, "finetune", key, step, reason))
        }
    }
}

/// `method = "zero_shot"`: dev and test scored by the pretrained LM through the prompt, nothing
/// trained; the entry holds the scores, no model. `method = "pet"`: the LM first fine-tunes on
/// the labelled examples through the same prompt (`cloze::ClozeTask`).
#[allow(clippy::too_many_arguments)]
fn prompt_stage<B: AutodiffBackend>(
    trial: &Trial,
    keys: &StageKeys,
    cx: &mut Context<B>,
    data: &Datasets,
    encoded: &Encoded,
    tokenizer: &TextTokenizer,
    model: LmModel<B::InnerBackend>,
    cfg: &BackboneConfig,
    summary: &mut RunSummary,
    store: &mut Store,
    building: Building,
) -> Result<(), Stop> {
    let exp = &trial.exp;
    let f = &exp.raw.finetune;
    let key = &keys.finetune;
    let device = cx.device.clone();
    let seed = exp.raw.experiment.seed.wrapping_add(1);
    summary
        .stages
        .push(StageUse::new("finetune", &key.hash, false));
    let input_error = |message: String| Stop::Failed {
        stage: "finetune",
        message,
        code: 2,
    };
    let prompt_cfg = f.prompt.as_ref().ok_or_else(|| {
        input_error(format!(
            "finetune.method = \"{}\" needs [finetune.prompt]",
            f.method.name()
        ))
    })?;
    let prompt = cloze::Prompt::new(prompt_cfg, tokenizer, &data.labels).map_err(input_error)?;
    // The prompt's texts beside the classes the encoded splits already hold, example for example.
    let tokenize = |examples: &[crate::data::Example], classes: &[usize]| {
        let texts = cloze::tokenize(tokenizer, examples).map_err(failed("finetune"))?;
        Ok::<_, Stop>((texts, classes.to_vec()))
    };
    let dev = data
        .dev
        .as_ref()
        .zip(encoded.dev.as_ref())
        .map(|(s, l)| tokenize(&s.examples, &l.classes))
        .transpose()?;
    let test = data
        .test
        .as_ref()
        .zip(encoded.test.as_ref())
        .map(|(s, l)| tokenize(&s.examples, &l.classes))
        .transpose()?;
    let total = model.num_params();
    let mut stage_store = Store::default();
    let (status, model) = if f.method == Method::Pet {
        summary.trainable_parameters = Some((total, total));
        let (train, train_classes) = tokenize(&data.train.examples, &encoded.train.classes)?;
        crate::model::dropout::seed::<B>(&device, seed);
        let task = cloze::ClozeTask::<B> {
            prompt: &prompt,
            tok: tokenizer,
            train: &train,
            train_classes: &train_classes,
            dev: dev.as_ref().map(|(t, c)| (t, c.as_slice())),
            causal: cfg.causal,
            // The truncation length (an imported model's position table may be longer).
            max_len: exp.raw.model.max_len,
            batch_size: f.batch_size,
            batching: f.batching,
            eval_batch_size: exp.raw.eval.batch_size,
            select: f.select_metric,
            seed,
            device: device.clone(),
        };
        fit_finetune(
            trial,
            key,
            cx,
            "finetune",
            &building.partial,
            &task,
            LmModel::<B>::from_inner(model),
            train.len(),
            summary,
            store,
            &mut stage_store,
        )?
    } else {
        cx.journal
            .log(&trial.id, "finetune", "start")
            .key(&key.hash);
        summary.trainable_parameters = Some((0, total));
        (Status::Done, Some(model))
    };
    if let Some(model) = &model {
        let started = Instant::now();
        for (name, split) in [("dev", &dev), ("test", &test)] {
            let Some((texts, truth)) = split else {
                continue;
            };
            let predicted = cloze::predict(
                model,
                &prompt,
                tokenizer,
                texts,
                cfg.causal,
                exp.raw.model.max_len,
                exp.raw.eval.batch_size,
                &device,
            );
            let scores =
                crate::metrics::classification::score(truth, &predicted, data.labels.len());
            log(
                cx.opts,
                &format!(
                    "{} {} {name} accuracy {:.2}%",
                    cx.label,
                    f.method.name(),
                    scores.accuracy * 100.0
                ),
            );
            summary.scores.push((name.to_string(), scores));
        }
        summary
            .stage_times
            .push(("eval".into(), started.elapsed().as_secs_f64()));
    }
    // Zero-shot trained nothing: the pretraining entry already holds its model.
    let trained = if f.method == Method::Pet { model } else { None };
    publish_finetune(
        trial,
        key,
        cx,
        building,
        summary,
        store,
        stage_store,
        status,
        trained,
    )
}

fn evaluate<B: Backend>(
    exp: &crate::config::Experiment,
    encoded: &Encoded,
    model: &Classifier<B>,
    pool: Pool,
    labels: &[String],
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
        let scores =
            tasks::evaluate_split(model, split, labels, pool, encoded.pad_id, batch, device);
        summary.scores.push((name.to_string(), scores));
    }
}
