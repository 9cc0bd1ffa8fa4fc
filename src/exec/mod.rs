//! Runs an experiment: every trial of its sweep in order, each stage reused from the cache when an
//! earlier run computed it, resumed from its checkpoint when a run was killed, run otherwise. After
//! every trial the study's results and report are written again, so what finished is never lost.

mod cache;
mod inspect;
mod journal;
mod stats;
pub mod tasks;
mod trial;

use std::path::{Path, PathBuf};

use burn::tensor::backend::AutodiffBackend;

use crate::config::train::SelectMetric;
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
}

pub struct Outcome {
    pub run_dir: PathBuf,
    pub report: PathBuf,
    /// `(trial, status)` in order.
    pub trials: Vec<(String, TrialStatus)>,
    /// Test accuracy of a single-trial run.
    pub test_accuracy: Option<f64>,
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
    backend::dispatch(exp.raw.experiment.backend, RunJob { exp, trials, opts })?
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
        select_metric: match exp.raw.finetune.select_metric {
            SelectMetric::Accuracy => "accuracy".into(),
            SelectMetric::MacroF1 => "macro_f1".into(),
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
    std::fs::create_dir_all(run_dir.join("trials"))
        .map_err(|e| io(format!("cannot create {}: {e}", run_dir.display())))?;
    // Held until this function returns: a second xrun on the same run directory refuses.
    let _lock = lock_run_dir(&run_dir)?;
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
    let mut report = run_dir.join("index.html");
    for (i, (t, k)) in trials.iter().zip(&keys).enumerate() {
        let label = if trials.len() > 1 {
            format!("[{}/{}] {}", i + 1, trials.len(), t.id)
        } else {
            String::new()
        };
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
        write_trial(&run_dir, t, k, &cache, &r)?;
        log(opts, &trial_line(&label, &r));
        runs.push(r);
        report = write_study(&run_dir, exp, &trials[..runs.len()], &runs)?;
    }
    let outcome_trials: Vec<(String, TrialStatus)> = trials
        .iter()
        .zip(&runs)
        .map(|(t, r)| (t.id.clone(), r.status.clone()))
        .collect();
    let failures: Vec<(&String, &TrialStatus)> = outcome_trials
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
        let message = if trials.len() == 1 {
            first
        } else {
            format!(
                "{} of {} trials failed; the first, {id}: {first}",
                failures.len(),
                trials.len()
            )
        };
        return Err(RunError::Trials {
            message,
            code: *code,
        });
    }
    if !runs.iter().any(|r| r.status == TrialStatus::Done) {
        let what = if runs.len() == 1 {
            "the trial diverged".to_string()
        } else {
            format!("all {} trials diverged", runs.len())
        };
        return Err(RunError::Trials {
            message: format!("{what}; see {}", report.display()),
            code: 1,
        });
    }
    let test_accuracy = match runs.as_slice() {
        [one] => one.store.result("test", "accuracy"),
        _ => None,
    };
    Ok(Outcome {
        run_dir,
        report,
        trials: outcome_trials,
        test_accuracy,
    })
}

fn trial_line(label: &str, r: &trial::TrialRun) -> String {
    let score = |split: &str| {
        r.store
            .result(split, "accuracy")
            .map(|a| format!(" {split} accuracy {:.2}%", a * 100.0))
            .unwrap_or_default()
    };
    let cached = r.summary.stages.iter().filter(|s| s.cached).count();
    let reused = if cached > 0 {
        format!(
            " ({cached} stage{} reused)",
            if cached == 1 { "" } else { "s" }
        )
    } else {
        String::new()
    };
    let status = match &r.status {
        TrialStatus::Done => format!("done:{}{}{reused}", score("dev"), score("test")),
        TrialStatus::Diverged {
            stage,
            step,
            reason,
        } => {
            format!("diverged in {stage} at step {step} ({reason})")
        }
        TrialStatus::Failed { stage, message, .. } => format!("failed in {stage}: {message}"),
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
