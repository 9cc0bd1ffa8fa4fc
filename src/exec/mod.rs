//! Runs an experiment: every trial of its sweep in order, each stage reused from the cache when an
//! earlier run computed it, resumed from its checkpoint when a run was killed, run otherwise. After
//! every trial the study's results and report are written again, so what finished is never lost.

mod cache;
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

/// How one stage of one trial stands before a run.
fn stage_state(
    cache: &Cache,
    stage: &str,
    key: &crate::plan::keys::Key,
    seen: &mut Vec<String>,
) -> String {
    let tag = format!("{stage}/{}", key.hash);
    let short = &key.hash[..8];
    if cache.done(stage, key).is_some() {
        format!("cached {short}")
    } else if seen.contains(&tag) {
        format!("shared {short}")
    } else {
        seen.push(tag);
        let word = if cache.busy(stage, key) {
            "running"
        } else {
            "resume"
        };
        match cache.partial_step(stage, key) {
            Some(step) => format!("{word}@{step} {short}"),
            None if word == "running" => format!("running {short}"),
            None => format!("run {short}"),
        }
    }
}

/// `xrun plan`: trials × stages, what is cached, shared within the plan, resumable or to run.
pub fn plan_text(exp: &Experiment, trials: &[Trial], verbose: bool) -> Result<String, RunError> {
    use std::fmt::Write;
    let keys = keys(trials)?;
    let cache = Cache::new(exp.cache_dir());
    let mut seen = Vec::new();
    let mut rows = Vec::new();
    let mut counts = std::collections::BTreeMap::<(&str, String), usize>::new();
    for (t, k) in trials.iter().zip(&keys) {
        let finetune_cached = cache.done("finetune", &k.finetune).is_some();
        let mut cells = Vec::new();
        let stages: [(&str, Option<&crate::plan::keys::Key>); 3] = [
            ("tokenizer", Some(&k.tokenizer)),
            ("pretrain", k.pretrain.as_ref()),
            ("finetune", Some(&k.finetune)),
        ];
        for (stage, key) in stages {
            let cell = match key {
                None => "–".to_string(),
                Some(key) if finetune_cached && stage != "finetune" => {
                    format!("skip {}", &key.hash[..8])
                }
                Some(key) => stage_state(&cache, stage, key, &mut seen),
            };
            let word = cell.split([' ', '@']).next().unwrap_or("").to_string();
            *counts.entry((stage, word)).or_default() += 1;
            cells.push(cell);
        }
        rows.push((t.id.clone(), cells));
    }
    let width = rows.iter().map(|r| r.0.len()).max().unwrap_or(5).max(5);
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{}: {} trial{} × 3 stages; cache {}",
        exp.raw.experiment.name,
        trials.len(),
        if trials.len() == 1 { "" } else { "s" },
        cache.root.display()
    );
    // Column widths from the widest cell, so `resume@12345 <key>` still lines up.
    let col = |i: usize, head: &str| {
        rows.iter()
            .map(|r| r.1[i].chars().count())
            .chain([head.len()])
            .max()
            .unwrap_or(0)
            + 2
    };
    let (w0, w1) = (col(0, "tokenizer"), col(1, "pretrain"));
    let _ = writeln!(
        out,
        "{:width$}  {:w0$}{:w1$}finetune",
        "trial", "tokenizer", "pretrain"
    );
    for (id, cells) in &rows {
        let _ = writeln!(
            out,
            "{id:width$}  {:w0$}{:w1$}{}",
            cells[0], cells[1], cells[2]
        );
    }
    for stage in ["tokenizer", "pretrain", "finetune"] {
        let part: Vec<String> = ["run", "resume", "running", "cached", "shared", "skip"]
            .iter()
            .filter_map(|w| {
                counts
                    .get(&(stage, w.to_string()))
                    .map(|n| format!("{n} {w}"))
            })
            .collect();
        let _ = writeln!(
            out,
            "{stage:>9}: {}",
            if part.is_empty() {
                "none".to_string()
            } else {
                part.join(", ")
            }
        );
    }
    let to_run: usize = counts
        .iter()
        .filter(|((_, w), _)| w == "run" || w == "resume")
        .map(|(_, n)| n)
        .sum();
    let _ = writeln!(
        out,
        "{to_run} stage runs to do; nothing is trained by `xrun plan`"
    );
    if verbose {
        for (t, k) in trials.iter().zip(&keys) {
            let _ = writeln!(out, "\n# {}", t.id);
            for key in [Some(&k.tokenizer), k.pretrain.as_ref(), Some(&k.finetune)]
                .into_iter()
                .flatten()
            {
                let _ = writeln!(
                    out,
                    "{} = {}",
                    key.hash,
                    serde_json::to_string(&key.inputs).unwrap_or_default()
                );
            }
        }
    }
    Ok(out)
}

/// `xrun gc`: removes cache entries, checkpoints and leftovers that no `plan.json` under
/// `output_dir` names. Entries another xrun is building (locked) are left alone.
pub fn gc(output_dir: &Path, cache: &Path, dry_run: bool) -> Result<String, String> {
    use std::fmt::Write;
    let mut keep = std::collections::HashSet::new();
    let runs = std::fs::read_dir(output_dir)
        .map_err(|e| format!("cannot read {}: {e}", output_dir.display()))?;
    for run in runs.flatten() {
        let Ok(text) = std::fs::read_to_string(run.path().join("plan.json")) else {
            continue;
        };
        let Ok(list) = serde_json::from_str::<Vec<serde_json::Value>>(&text) else {
            return Err(format!(
                "{}: not a plan written by xrun",
                run.path().join("plan.json").display()
            ));
        };
        for t in list {
            for stage in ["tokenizer", "pretrain", "finetune"] {
                if let Some(k) = t.get(stage).and_then(|v| v.as_str()) {
                    keep.insert(format!("{stage}/{k}"));
                }
            }
        }
    }
    let mut out = String::new();
    let (mut removed, mut bytes) = (0usize, 0u64);
    for stage in ["tokenizer", "pretrain", "finetune"] {
        let Ok(entries) = std::fs::read_dir(cache.join(stage)) else {
            continue;
        };
        let mut names: Vec<String> = entries
            .flatten()
            .map(|e| e.file_name().to_string_lossy().to_string())
            .collect();
        names.sort();
        for name in names {
            let key = name.split(['.']).next().unwrap_or(&name);
            if keep.contains(&format!("{stage}/{key}")) && !name.contains(".tmp-") {
                continue;
            }
            let path = cache.join(stage).join(&name);
            // Skip what a running xrun holds: its lock is taken while it builds.
            let lock = cache.join(stage).join(format!("{key}.lock"));
            if let Ok(f) = std::fs::OpenOptions::new().write(true).open(&lock) {
                if f.try_lock().is_err() {
                    continue;
                }
            }
            let size = du(&path);
            let _ = writeln!(
                out,
                "{} {} ({:.1} MB)",
                if dry_run { "would remove" } else { "removed" },
                path.display(),
                size as f64 / 1e6
            );
            if !dry_run {
                let r = if path.is_dir() {
                    std::fs::remove_dir_all(&path)
                } else {
                    std::fs::remove_file(&path)
                };
                r.map_err(|e| format!("cannot remove {}: {e}", path.display()))?;
            }
            removed += 1;
            bytes += size;
        }
    }
    let _ = writeln!(
        out,
        "{} {removed} item{} ({:.1} MB); kept {} entries referenced by run directories in {}",
        if dry_run { "would remove" } else { "removed" },
        if removed == 1 { "" } else { "s" },
        bytes as f64 / 1e6,
        keep.len(),
        output_dir.display()
    );
    Ok(out)
}

fn du(path: &Path) -> u64 {
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.is_dir() => std::fs::read_dir(path)
            .map(|d| d.flatten().map(|e| du(&e.path())).sum())
            .unwrap_or(0),
        Ok(m) => m.len(),
        Err(_) => 0,
    }
}
