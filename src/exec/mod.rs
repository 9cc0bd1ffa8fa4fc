//! Runs an experiment: every trial of its sweep in order, each stage reused from the cache when an
//! earlier run computed it, resumed from its checkpoint when a run was killed, run otherwise. After
//! every trial the study's results and report are written again, so what finished is never lost.

mod cache;
mod cloze;
mod continual;
mod inspect;
mod journal;
mod stats;
pub mod tasks;
mod trial;

use std::path::{Path, PathBuf};

use burn::tensor::backend::AutodiffBackend;

use crate::config::Experiment;
use crate::data::{DataError, Datasets};
use crate::metrics::Store;
use crate::plan::keys::{stage_keys, FileHashes, StageKeys};
use crate::plan::{Trial, REPLICATE_KEYS};
use crate::report::study::{StudyMeta, TrialMeta};
use crate::report::{write_file, RunSummary};
use crate::train::backend::{self, BackendError, DeviceInfo};
pub use cache::{Cache, Manifest};
pub use inspect::{gc, plan_text};
pub use journal::{read as read_journal, Event};
pub use stats::SplitStats;
pub use trial::TrialStatus;

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error(transparent)]
    Backend(#[from] BackendError),
    #[error("{0}")]
    Data(#[from] DataError),
    #[error("{0}")]
    Input(String),
    #[error("stage `{stage}` failed: {message}")]
    Stage {
        stage: &'static str,
        message: String,
    },
    /// Trials that failed (not diverged); the sweep went on without them.
    #[error("{message}")]
    Trials { message: String, code: i32 },
}

impl RunError {
    /// 2 for bad input (the user's file or data), 1 for a stage that failed while running.
    pub fn exit_code(&self) -> i32 {
        match self {
            RunError::Backend(BackendError::Failed { .. }) => 1,
            RunError::Backend(_) | RunError::Data(_) | RunError::Input(_) => 2,
            RunError::Stage { .. } => 1,
            RunError::Trials { code, .. } => *code,
        }
    }
}

fn stage_err(stage: &'static str) -> impl Fn(String) -> RunError {
    move |message| RunError::Stage { stage, message }
}

pub struct Options {
    pub quiet: bool,
    /// Which trials of the plan this process runs.
    pub select: Select,
    /// Stop every selected trial after this stage: a cluster job that builds a shared stage.
    pub until: Option<Until>,
}

impl Options {
    pub fn quiet(quiet: bool) -> Self {
        Self {
            quiet,
            select: Select::All,
            until: None,
        }
    }
}

/// The trials one process runs. `All` owns the run directory; the others share it with the
/// processes that run the rest (cluster array tasks, shards), and merge the study from disk.
#[derive(Debug, Clone, PartialEq)]
pub enum Select {
    All,
    /// One trial, by id (`xrun run FILE --trial ID`).
    Trial(String),
    /// Trials `index`, `index + count`, … of the plan (`--shard INDEX/COUNT`, from 0).
    Shard {
        index: usize,
        count: usize,
    },
}

impl Select {
    /// Parses `--shard I/N`.
    pub fn shard(text: &str) -> Result<Self, String> {
        let bad =
            || format!("--shard `{text}`: expected INDEX/COUNT with 0 <= INDEX < COUNT, e.g. 0/4");
        let (i, n) = text.split_once('/').ok_or_else(bad)?;
        let index: usize = i.trim().parse().map_err(|_| bad())?;
        let count: usize = n.trim().parse().map_err(|_| bad())?;
        if count == 0 || index >= count {
            return Err(bad());
        }
        Ok(Select::Shard { index, count })
    }

    /// The plan positions this selection runs.
    pub fn positions(&self, trials: &[Trial]) -> Result<Vec<usize>, RunError> {
        match self {
            Select::All => Ok((0..trials.len()).collect()),
            Select::Shard { index, count } => {
                Ok((0..trials.len()).filter(|i| i % count == *index).collect())
            }
            Select::Trial(id) => match trials.iter().position(|t| &t.id == id) {
                Some(i) => Ok(vec![i]),
                None => {
                    let ids: Vec<&str> = trials.iter().map(|t| t.id.as_str()).collect();
                    let hint = crate::config::suggest(id, ids.iter().copied())
                        .map(|s| format!("; did you mean `{s}`?"))
                        .unwrap_or_default();
                    Err(RunError::Input(format!(
                        "--trial `{id}`: the experiment has no such trial{hint} (`xrun plan` \
                         lists them: {})",
                        ids.join(", ")
                    )))
                }
            },
        }
    }
}

/// The stage a stage job stops after.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Until {
    Tokenizer,
    Pretrain,
}

impl Until {
    pub fn name(self) -> &'static str {
        match self {
            Until::Tokenizer => "tokenizer",
            Until::Pretrain => "pretrain",
        }
    }
}

pub struct Outcome {
    pub run_dir: PathBuf,
    pub report: PathBuf,
    /// `(trial, status)` in order.
    pub trials: Vec<(String, TrialStatus)>,
    /// The headline test score of a single-trial run: accuracy, or entity F1 for token
    /// classification, with its name.
    pub test_score: Option<(&'static str, f64)>,
}

/// Reads every split and checks labels, without training: the data half of `xrun validate`.
pub fn check_data(exp: &Experiment) -> Result<Datasets, RunError> {
    Ok(Datasets::load(exp)?)
}

/// Every trial's stage keys, hashing each input file once.
pub fn keys(trials: &[Trial]) -> Result<Vec<StageKeys>, RunError> {
    let mut hashes = FileHashes::default();
    trials
        .iter()
        .map(|t| stage_keys(&t.exp, &mut hashes))
        .collect::<Result<_, _>>()
        .map_err(|e| RunError::Input(format!("cannot read an input file: {e}")))
}

pub fn run(exp: &Experiment, trials: &[Trial], opts: &Options) -> Result<Outcome, RunError> {
    backend::dispatch(
        exp.raw.experiment.backend,
        exp.raw.experiment.precision,
        &exp.gpu_setup(),
        RunJob { exp, trials, opts },
    )?
}

struct RunJob<'a> {
    exp: &'a Experiment,
    trials: &'a [Trial],
    opts: &'a Options,
}

impl backend::Job for RunJob<'_> {
    type Output = Result<Outcome, RunError>;
    fn run<B: AutodiffBackend>(self, device: B::Device, info: DeviceInfo) -> Self::Output {
        run_on::<B>(self.exp, self.trials, self.opts, info, device)
    }
}

/// The study's description of its trials, for the report.
pub fn study_meta(exp: &Experiment, trials: &[Trial], statuses: &[TrialStatus]) -> StudyMeta {
    let axes = crate::plan::swept_keys(trials);
    let group_keys: Vec<String> = axes
        .iter()
        .filter(|k| !REPLICATE_KEYS.contains(&k.as_str()))
        .cloned()
        .collect();
    let mut keys = axes.clone();
    for t in &exp.raw.report.table {
        for k in std::iter::once(&t.rows).chain(t.columns.as_ref()) {
            if !keys.contains(k) {
                keys.push(k.clone());
            }
        }
    }
    let metas = trials
        .iter()
        .zip(statuses)
        .map(|(t, status)| TrialMeta {
            id: t.id.clone(),
            values: keys
                .iter()
                .map(|k| {
                    let v = crate::config::lookup(&t.exp.raw, k)
                        .map_or(String::new(), |v| crate::plan::value_label(&v));
                    (k.clone(), v)
                })
                .collect(),
            status: status.clone(),
        })
        .collect();
    StudyMeta {
        name: exp.raw.experiment.name.clone(),
        description: exp.raw.experiment.description.clone(),
        experiment_file: exp.file.display().to_string(),
        xrun_version: env!("CARGO_PKG_VERSION").into(),
        config_toml: exp.resolved_toml(),
        axes,
        group_keys,
        select_metric: exp.raw.finetune.select_metric.name().into(),
        test_metrics: if exp.raw.data.tagging() {
            ("entity_f1".into(), "accuracy".into())
        } else if exp.raw.continual.is_some() {
            ("accuracy".into(), "forgetting".into())
        } else {
            ("accuracy".into(), "macro_f1".into())
        },
        tables: exp.raw.report.table.clone(),
        trials: metas,
    }
}

fn run_on<B: AutodiffBackend>(
    exp: &Experiment,
    trials: &[Trial],
    opts: &Options,
    info: DeviceInfo,
    device: B::Device,
) -> Result<Outcome, RunError> {
    let run_dir = exp.run_dir();
    let io = stage_err("setup");
    let positions = opts.select.positions(trials)?;
    std::fs::create_dir_all(run_dir.join("trials"))
        .map_err(|e| io(format!("cannot create {}: {e}", run_dir.display())))?;
    // Held until this function returns. A whole run owns the directory; processes that each run
    // part of the plan share it, and a whole run refuses while they do (and they while it does).
    let _lock = lock_run_dir(&run_dir, opts.select == Select::All)?;
    write_file(
        &run_dir.join("config.resolved.toml"),
        exp.resolved_toml().as_bytes(),
    )
    .map_err(&io)?;
    let keys = keys(trials)?;
    write_plan(&run_dir, trials, &keys)?;
    let cache = Cache::new(exp.cache_dir());
    let mut journal = journal::Journal::open(&run_dir).map_err(|e| {
        io(format!(
            "cannot open the journal in {}: {e}",
            run_dir.display()
        ))
    })?;
    let mut runs: Vec<trial::TrialRun> = Vec::new();
    let mut outcome_trials: Vec<(String, TrialStatus)> = Vec::new();
    let mut report = run_dir.join("index.html");
    for (n, &i) in positions.iter().enumerate() {
        let (t, k) = (&trials[i], &keys[i]);
        let label = if positions.len() > 1 {
            format!("[{}/{}] {}", n + 1, positions.len(), t.id)
        } else if trials.len() > 1 {
            t.id.clone()
        } else {
            String::new()
        };
        if let Some(until) = opts.until {
            let key = k.get(until.name());
            if key.is_none_or(|key| cache.done(until.name(), key).is_some()) {
                let what = if key.is_some() {
                    "is already cached"
                } else {
                    "is not needed"
                };
                log(opts, &format!("{label}: {} {what}", until.name()));
                continue;
            }
        }
        let mut cx = trial::Context::<B> {
            cache: &cache,
            journal: &mut journal,
            opts,
            device: device.clone(),
            info: &info,
            label: label.clone(),
            experiment: &exp.raw.experiment.name,
        };
        let r = trial::run::<B>(t, k, &mut cx);
        outcome_trials.push((t.id.clone(), r.status.clone()));
        match opts.until {
            // A stage job: the stage is in the cache now; the trial itself has not run.
            Some(until) if r.status == TrialStatus::Done => {
                log(opts, &format!("{label}: {} done", until.name()));
            }
            Some(_) => log(opts, &trial_line(&label, &r.status, &r.summary, &r.store)),
            None => {
                write_trial(&run_dir, t, k, &cache, &r)?;
                log(opts, &trial_line(&label, &r.status, &r.summary, &r.store));
            }
        }
        runs.push(r);
        if opts.until.is_none() {
            report = if opts.select == Select::All {
                write_study(&run_dir, exp, &trials[..runs.len()], &runs)?
            } else {
                merge_study(exp, trials, &keys)?.report
            };
        }
    }
    let test_score = match runs.as_slice() {
        [one] => headline(&one.store, "test"),
        _ => None,
    };
    conclude(run_dir, report, trials.len(), outcome_trials, test_score)
}

/// The outcome of the trials a run ran (`statuses`, in order): an error when any failed, or when
/// all diverged; otherwise the report and, for a single trial, its test score.
pub(crate) fn conclude(
    run_dir: PathBuf,
    report: PathBuf,
    total: usize,
    statuses: Vec<(String, TrialStatus)>,
    test_score: Option<(&'static str, f64)>,
) -> Result<Outcome, RunError> {
    let failures: Vec<(&String, &TrialStatus)> = statuses
        .iter()
        .filter(|(_, s)| matches!(s, TrialStatus::Failed { .. }))
        .map(|(id, s)| (id, s))
        .collect();
    if let Some((
        id,
        TrialStatus::Failed {
            stage,
            message,
            code,
        },
    )) = failures.first()
    {
        let first = format!("stage `{stage}` failed: {message}");
        let message = if total == 1 {
            first
        } else {
            format!(
                "{} of {} trials failed; the first, {id}: {first}",
                failures.len(),
                total
            )
        };
        return Err(RunError::Trials {
            message,
            code: *code,
        });
    }
    if !statuses.is_empty() && !statuses.iter().any(|(_, s)| *s == TrialStatus::Done) {
        let what = if statuses.len() == 1 {
            "the trial diverged".to_string()
        } else {
            format!("all {} trials diverged", statuses.len())
        };
        return Err(RunError::Trials {
            message: format!("{what}; see {}", report.display()),
            code: 1,
        });
    }
    Ok(Outcome {
        run_dir,
        report,
        trials: statuses,
        test_score,
    })
}

/// A split's headline score: entity F1 for token classification, accuracy otherwise.
fn headline(store: &Store, split: &str) -> Option<(&'static str, f64)> {
    match store.result(split, "entity_f1") {
        Some(f1) => Some(("entity F1", f1)),
        None => store.result(split, "accuracy").map(|a| ("accuracy", a)),
    }
}

/// A trial's outcome in one log line: its status, its dev and test scores, the stages reused.
pub(crate) fn trial_line(
    label: &str,
    status: &TrialStatus,
    summary: &RunSummary,
    store: &Store,
) -> String {
    let score = |split: &str| {
        headline(store, split)
            .map(|(name, v)| format!(" {split} {name} {:.2}%", v * 100.0))
            .unwrap_or_default()
    };
    let cached = summary.stages.iter().filter(|s| s.cached).count();
    let reused = if cached > 0 {
        format!(
            " ({cached} stage{} reused)",
            if cached == 1 { "" } else { "s" }
        )
    } else {
        String::new()
    };
    let status = match status {
        TrialStatus::Done => format!("done:{}{}{reused}", score("dev"), score("test")),
        TrialStatus::Diverged {
            stage,
            step,
            reason,
        } => {
            format!("diverged in {stage} at step {step} ({reason})")
        }
        TrialStatus::Failed { stage, message, .. } => format!("failed in {stage}: {message}"),
        TrialStatus::Pending => "pending".into(),
    };
    if label.is_empty() {
        status
    } else {
        format!("{label}: {status}")
    }
}

/// `plan.json`: the trials and the cache entries they use (`xrun gc` keeps what any plan names).
fn write_plan(run_dir: &Path, trials: &[Trial], keys: &[StageKeys]) -> Result<(), RunError> {
    #[derive(serde::Serialize)]
    struct PlanTrial<'a> {
        id: &'a str,
        assignments: Vec<(String, String)>,
        tokenizer: &'a str,
        pretrain: Option<&'a str>,
        finetune: &'a str,
    }
    let list: Vec<PlanTrial> = trials
        .iter()
        .zip(keys)
        .map(|(t, k)| PlanTrial {
            id: &t.id,
            assignments: t
                .assignments
                .iter()
                .map(|(p, v)| (p.clone(), crate::plan::value_label(v)))
                .collect(),
            tokenizer: &k.tokenizer.hash,
            pretrain: k.pretrain.as_ref().map(|p| p.hash.as_str()),
            finetune: &k.finetune.hash,
        })
        .collect();
    let json = serde_json::to_string_pretty(&list).unwrap_or_default();
    write_file(&run_dir.join("plan.json"), json.as_bytes()).map_err(stage_err("setup"))
}

/// A trial's own folder: its resolved config, records, results and report, and links to the
/// tokenizer and models in the cache (hard links, so they outlive a `gc` of the cache).
fn write_trial(
    run_dir: &Path,
    t: &Trial,
    keys: &StageKeys,
    cache: &Cache,
    r: &trial::TrialRun,
) -> Result<(), RunError> {
    let err = stage_err("report");
    let dir = run_dir.join("trials").join(&t.id);
    std::fs::create_dir_all(dir.join("checkpoints"))
        .map_err(|e| err(format!("cannot create {}: {e}", dir.display())))?;
    let artefacts = [
        (
            Some(
                cache
                    .entry("tokenizer", &keys.tokenizer)
                    .join("tokenizer.json"),
            ),
            dir.join("tokenizer.json"),
        ),
        (
            keys.pretrain
                .as_ref()
                .map(|k| cache.entry("pretrain", k).join("model.mpk")),
            dir.join("checkpoints/pretrain.mpk"),
        ),
        (
            Some(cache.entry("finetune", &keys.finetune).join("model.mpk")),
            dir.join("checkpoints/finetune.mpk"),
        ),
    ];
    for (from, to) in artefacts {
        let Some(from) = from.filter(|f| f.is_file()) else {
            continue;
        };
        let _ = std::fs::remove_file(&to);
        if std::fs::hard_link(&from, &to).is_err() {
            std::fs::copy(&from, &to).map_err(|e| {
                err(format!(
                    "cannot copy {} to {}: {e}",
                    from.display(),
                    to.display()
                ))
            })?;
        }
    }
    write_file(
        &dir.join("config.resolved.toml"),
        t.exp.resolved_toml().as_bytes(),
    )
    .map_err(&err)?;
    r.store.write(&dir).map_err(|e| err(e.to_string()))?;
    crate::report::write(&dir, &r.summary, &r.store).map_err(err)?;
    Ok(())
}

fn write_study(
    run_dir: &Path,
    exp: &Experiment,
    trials: &[Trial],
    runs: &[trial::TrialRun],
) -> Result<PathBuf, RunError> {
    let statuses: Vec<TrialStatus> = runs.iter().map(|r| r.status.clone()).collect();
    let meta = study_meta(exp, trials, &statuses);
    let pairs: Vec<(&RunSummary, &Store)> = runs.iter().map(|r| (&r.summary, &r.store)).collect();
    crate::report::study::write(run_dir, &meta, &pairs).map_err(stage_err("report"))
}

/// Locks `<run_dir>/.lock` (released when the file is dropped or the process dies): exclusively
/// for a whole run, which writes this process's id into it so the refusal can say who holds it;
/// shared for a process that runs part of the plan beside others.
pub(crate) fn lock_run_dir(run_dir: &Path, exclusive: bool) -> Result<std::fs::File, RunError> {
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
    let locked = if exclusive {
        file.try_lock()
    } else {
        file.try_lock_shared()
    };
    if let Err(e) = locked {
        let mut holder = String::new();
        let _ = file.read_to_string(&mut holder);
        let holder = holder.trim();
        // Shared holders are processes running part of the plan; an exclusive one, a whole run.
        let shared_holders = exclusive && file.try_lock_shared().is_ok();
        let who = if shared_holders {
            let _ = file.unlock();
            "xrun processes running trials of this experiment (shards, cluster jobs or `--jobs`) are"
                .to_string()
        } else if holder.is_empty() {
            "another xrun is".to_string()
        } else {
            format!("xrun (pid {holder}) is")
        };
        return Err(err(format!(
            "{who} already running in {} ({e}); wait for it to finish or set another \
             experiment.output_dir",
            run_dir.display()
        )));
    }
    if exclusive {
        let written = file
            .set_len(0)
            .and_then(|()| file.rewind())
            .and_then(|()| write!(file, "{}", std::process::id()))
            .and_then(|()| file.flush());
        written.map_err(|e| err(format!("cannot write {}: {e}", path.display())))?;
    }
    Ok(file)
}

/// A study merged from the trial folders on disk.
pub struct Merged {
    pub report: PathBuf,
    /// Every trial's status, in plan order; `Pending` without a result.
    pub statuses: Vec<TrialStatus>,
    /// The headline test score when the plan has one trial and it has a result.
    pub test_score: Option<(&'static str, f64)>,
}

impl Merged {
    /// How many trials have a result.
    pub fn finished(&self) -> usize {
        self.statuses
            .iter()
            .filter(|s| **s != TrialStatus::Pending)
            .count()
    }
}

/// How a trial of the plan ended, read from its folder; `None` when it has not run, failed before
/// writing it, or its folder holds an earlier configuration's result (another stage key).
pub fn finished(run_dir: &Path, t: &Trial, k: &StageKeys) -> Option<(RunSummary, Store)> {
    let dir = run_dir.join("trials").join(&t.id);
    let (summary, store) = crate::report::study::load_trial(&dir).ok()?;
    let current = !summary.stages.is_empty()
        && summary
            .stages
            .iter()
            .all(|s| k.get(&s.stage).is_some_and(|key| key.hash == s.key));
    (current && summary.status.is_some()).then_some((summary, store))
}

/// Writes the study from every trial folder of the plan, under `<run_dir>/.study.lock`: processes
/// running different trials each merge after every trial they finish. Trials without a result
/// show as pending, and the report says it is partial.
pub fn merge_study(
    exp: &Experiment,
    trials: &[Trial],
    keys: &[StageKeys],
) -> Result<Merged, RunError> {
    let run_dir = exp.run_dir();
    let err = stage_err("report");
    let path = run_dir.join(".study.lock");
    let lock = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(|e| err(format!("cannot open {}: {e}", path.display())))?;
    lock.lock()
        .map_err(|e| err(format!("cannot lock {}: {e}", path.display())))?;
    let mut loaded = Vec::new();
    let mut statuses = Vec::new();
    for (t, k) in trials.iter().zip(keys) {
        match finished(&run_dir, t, k) {
            Some((summary, store)) => {
                statuses.push(summary.status.clone().unwrap_or(TrialStatus::Pending));
                loaded.push((summary, store));
            }
            None => {
                statuses.push(TrialStatus::Pending);
                loaded.push((
                    RunSummary::new_pending(&exp.raw.experiment.name, &t.id),
                    Store::default(),
                ));
            }
        }
    }
    let meta = study_meta(exp, trials, &statuses);
    let pairs: Vec<(&RunSummary, &Store)> = loaded.iter().map(|(s, st)| (s, st)).collect();
    let report = crate::report::study::write(&run_dir, &meta, &pairs).map_err(err)?;
    let test_score = match loaded.as_slice() {
        [(_, store)] => headline(store, "test"),
        _ => None,
    };
    Ok(Merged {
        report,
        statuses,
        test_score,
    })
}

fn log(opts: &Options, line: &str) {
    if !opts.quiet {
        eprintln!("{line}");
    }
}
