//! Slurm: job scripts, `sbatch` with `--dependency=afterok:`, and the queue read back with
//! `squeue`. Every submitted job is recorded in `<run_dir>/slurm/jobs.jsonl` (its id, its trials or
//! stage, its script and log), which is how `xrun status` and `--retry-failed` find them again.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::process::Command;

use serde::{Deserialize, Serialize};

use super::{describe, graph, needs_run, After, Job, Work};
use crate::config::cluster::SlurmSection;
use crate::config::Experiment;
use crate::exec::{finished, Cache, RunError, TrialStatus};
use crate::plan::keys::StageKeys;
use crate::plan::Trial;

/// One submitted job, as `jobs.jsonl` keeps it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Record {
    pub job_id: String,
    pub name: String,
    pub submitted_unix: u64,
    /// `tokenizer` or `pretrain` for a stage job.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stage: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
    /// The array's trials, task `i` runs `trials[i]`; a stage job's one trial.
    pub trials: Vec<String>,
    pub array: bool,
    /// The log file; `%a` stands for the array task.
    pub log: String,
    pub script: String,
}

impl Record {
    /// The Slurm id of the task that runs `trial`, and its log.
    fn task_of(&self, trial: &str) -> Option<(String, String)> {
        let i = self.trials.iter().position(|t| t == trial)?;
        Some(if self.array {
            (
                format!("{}_{i}", self.job_id),
                self.log.replace("%a", &i.to_string()),
            )
        } else {
            (self.job_id.clone(), self.log.clone())
        })
    }
}

fn slurm_dir(run_dir: &Path) -> PathBuf {
    run_dir.join("slurm")
}

/// Every job submitted for this run directory, oldest first.
pub fn records(run_dir: &Path) -> Vec<Record> {
    std::fs::read_to_string(slurm_dir(run_dir).join("jobs.jsonl"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

fn append_record(run_dir: &Path, r: &Record) -> Result<(), RunError> {
    use std::io::Write;
    let path = slurm_dir(run_dir).join("jobs.jsonl");
    let mut line = serde_json::to_string(r).map_err(|e| RunError::Input(e.to_string()))?;
    line.push('\n');
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
        .and_then(|mut f| f.write_all(line.as_bytes()))
        .map_err(|e| RunError::Input(format!("cannot write {}: {e}", path.display())))
}

/// A queued or running job or array task: Slurm's state (`PENDING`, `RUNNING`, …) and reason.
#[derive(Debug, Clone)]
pub struct Queued {
    pub state: String,
    pub reason: String,
}

/// Every job in the queue by id (`12`, or `12_3` for an array task).
pub fn squeue() -> Result<HashMap<String, Queued>, RunError> {
    let out = run_with_timeout(
        Command::new("squeue").args(["-h", "-r", "-o", "%i|%T|%r"]),
        SQUEUE_TIMEOUT,
    )
    .map_err(|e| {
        RunError::Input(format!(
            "cannot run squeue ({e}): xrun needs Slurm's client commands on PATH (run it on \
             a login node of the cluster)"
        ))
    })?;
    let Some(out) = out else {
        return Err(RunError::Input(format!(
            "squeue did not answer within {} s (is slurmctld reachable?)",
            SQUEUE_TIMEOUT.as_secs()
        )));
    };
    if !out.status.success() {
        let stderr = String::from_utf8_lossy(&out.stderr);
        return Err(RunError::Input(format!(
            "squeue failed: {}",
            stderr.trim().lines().last().unwrap_or("no message")
        )));
    }
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| {
            let mut parts = l.trim().splitn(3, '|');
            let id = parts.next()?.to_string();
            let state = parts.next()?.to_string();
            let reason = parts.next().unwrap_or("").to_string();
            Some((id, Queued { state, reason }))
        })
        .collect())
}

/// How long `squeue` may take: with a controller that cannot be reached it hangs for about a
/// minute before failing.
const SQUEUE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// Runs `cmd` to completion, or kills it after `timeout` (`Ok(None)`). Its output goes through
/// temporary files, so a long listing cannot fill a pipe and stall it.
fn run_with_timeout(
    cmd: &mut Command,
    timeout: std::time::Duration,
) -> std::io::Result<Option<std::process::Output>> {
    use std::io::{Read, Seek};
    let mut stdout = tempfile::tempfile()?;
    let mut stderr = tempfile::tempfile()?;
    let mut child = cmd
        .stdout(stdout.try_clone()?)
        .stderr(stderr.try_clone()?)
        .spawn()?;
    let start = std::time::Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break status;
        }
        if start.elapsed() > timeout {
            let _ = child.kill();
            let _ = child.wait();
            return Ok(None);
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    };
    let read = |f: &mut std::fs::File| -> std::io::Result<Vec<u8>> {
        let mut v = Vec::new();
        f.rewind()?;
        f.read_to_end(&mut v)?;
        Ok(v)
    };
    Ok(Some(std::process::Output {
        status,
        stdout: read(&mut stdout)?,
        stderr: read(&mut stderr)?,
    }))
}

/// Whether a record's job (any of its tasks) is still in the queue.
fn in_queue(r: &Record, queue: &HashMap<String, Queued>) -> bool {
    let prefix = format!("{}_", r.job_id);
    queue
        .keys()
        .any(|id| *id == r.job_id || id.starts_with(&prefix))
}

/// The trials, stage entries and jobs of every submission that are still queued or running.
struct Active {
    trials: HashSet<String>,
    stages: HashMap<(String, String), String>,
    jobs: Vec<String>,
}

fn active(records: &[Record], queue: &HashMap<String, Queued>) -> Active {
    let mut a = Active {
        trials: HashSet::new(),
        stages: HashMap::new(),
        jobs: Vec::new(),
    };
    for r in records {
        if !in_queue(r, queue) {
            continue;
        }
        a.jobs.push(r.job_id.clone());
        match (&r.stage, &r.key) {
            (Some(stage), Some(key)) => {
                a.stages
                    .insert((stage.clone(), key.clone()), r.job_id.clone());
            }
            _ => {
                for t in &r.trials {
                    if r.task_of(t).is_some_and(|(id, _)| queue.contains_key(&id)) {
                        a.trials.insert(t.clone());
                    }
                }
            }
        }
    }
    a
}

/// What `xrun submit` was asked for.
pub struct SubmitOptions<'a> {
    /// The experiment file and `--set` overrides, as given: the jobs run the same command.
    pub file: &'a Path,
    pub sets: &'a [String],
    pub settings: SlurmSection,
    pub dry_run: bool,
    pub retry_failed: bool,
}

/// Quotes `s` for a POSIX shell.
fn quote(s: &str) -> String {
    if !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_./=:,+@%".contains(c))
    {
        s.to_string()
    } else {
        format!("'{}'", s.replace('\'', r"'\''"))
    }
}

struct ScriptContext {
    xrun: PathBuf,
    cwd: PathBuf,
    logs: PathBuf,
    experiment: String,
}

fn script(
    job: &Job,
    cx: &ScriptContext,
    o: &SubmitOptions,
    options: &[String],
) -> (String, String) {
    let mut s = String::from("#!/bin/bash\n");
    let name = format!("xrun-{}-{}", cx.experiment, job.name);
    s.push_str(&format!("#SBATCH --job-name={}\n", quote(&name)));
    s.push_str(&format!(
        "#SBATCH --chdir={}\n",
        quote(&cx.cwd.display().to_string())
    ));
    let (log, array) = match &job.work {
        Work::Trials(ids) => (
            cx.logs.join(format!("{}-%A_%a.out", job.name)),
            Some(ids.len()),
        ),
        Work::Stage { .. } => (cx.logs.join(format!("{}-%j.out", job.name)), None),
    };
    s.push_str(&format!(
        "#SBATCH --output={}\n",
        quote(&log.display().to_string())
    ));
    if let Some(n) = array {
        s.push_str(&format!("#SBATCH --array=0-{}\n", n - 1));
    }
    for opt in options {
        s.push_str(&format!("#SBATCH {opt}\n"));
    }
    s.push_str(&format!(
        "# Written by xrun {} for {}; `xrun status` follows it.\nset -eu\n",
        env!("CARGO_PKG_VERSION"),
        o.file.display()
    ));
    for line in &o.settings.setup {
        s.push_str(line);
        s.push('\n');
    }
    let mut cmd = vec![
        quote(&cx.xrun.display().to_string()),
        "run".into(),
        quote(&o.file.display().to_string()),
    ];
    for set in o.sets {
        cmd.push("--set".into());
        cmd.push(quote(set));
    }
    match &job.work {
        Work::Trials(ids) => {
            let list: Vec<String> = ids.iter().map(|i| quote(i)).collect();
            s.push_str(&format!("trials=({})\n", list.join(" ")));
            cmd.push("--trial".into());
            cmd.push("\"${trials[$SLURM_ARRAY_TASK_ID]}\"".into());
        }
        Work::Stage { until, trial, .. } => {
            cmd.push("--trial".into());
            cmd.push(quote(trial));
            cmd.push("--until".into());
            cmd.push(until.name().into());
        }
    }
    s.push_str(&format!("exec {}\n", cmd.join(" ")));
    (s, log.display().to_string())
}

fn sbatch(script: &Path, after: Option<&str>) -> Result<String, RunError> {
    let mut cmd = Command::new("sbatch");
    cmd.arg("--parsable");
    if let Some(id) = after {
        cmd.arg(format!("--dependency=afterok:{id}"));
    }
    let out = cmd.arg(script).output().map_err(|e| {
        RunError::Input(format!(
            "cannot run sbatch ({e}): xrun submit needs Slurm's client commands on PATH (run it \
             on a login node of the cluster)"
        ))
    })?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let id = stdout.trim().split(';').next().unwrap_or("").to_string();
    if !out.status.success() || id.is_empty() || !id.chars().all(|c| c.is_ascii_digit()) {
        return Err(RunError::Input(format!(
            "sbatch refused {}: {}{}",
            script.display(),
            String::from_utf8_lossy(&out.stderr).trim(),
            stdout.trim()
        )));
    }
    Ok(id)
}

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// `xrun submit`: the jobs for every trial without a result, submitted in dependency order (or
/// printed, with `dry_run`). Returns what to tell the user.
pub fn submit(
    exp: &Experiment,
    trials: &[Trial],
    keys: &[StageKeys],
    o: &SubmitOptions,
) -> Result<String, RunError> {
    let run_dir = exp.run_dir();
    let cache = Cache::new(exp.cache_dir());
    let options = o.settings.sbatch_options().map_err(|errors| {
        let messages: Vec<String> = errors.into_iter().map(|e| e.1).collect();
        RunError::Input(messages.join("; "))
    })?;
    let earlier = records(&run_dir);
    let queue = if earlier.is_empty() || o.dry_run && !o.retry_failed {
        HashMap::new()
    } else {
        squeue()?
    };
    let act = active(&earlier, &queue);
    if o.retry_failed && earlier.is_empty() {
        return Err(RunError::Input(format!(
            "--retry-failed: nothing was submitted for {} yet; run `xrun submit {}` first",
            run_dir.display(),
            o.file.display()
        )));
    }
    if !o.retry_failed && !act.jobs.is_empty() {
        return Err(RunError::Input(format!(
            "jobs of an earlier submission are still queued or running (Slurm job{} {}): \
             `xrun status {}` shows them; `xrun submit --retry-failed` submits only the trials \
             that ended without a result",
            if act.jobs.len() == 1 { "" } else { "s" },
            act.jobs.join(", "),
            o.file.display()
        )));
    }
    let todo: Vec<usize> = (0..trials.len())
        .filter(|&i| needs_run(&run_dir, &trials[i], &keys[i]))
        .filter(|&i| !act.trials.contains(&trials[i].id))
        .collect();
    let jobs = graph(trials, keys, &todo, &cache, &act.stages);
    if jobs.is_empty() {
        return Ok(format!(
            "nothing to submit: every trial of {} has a result or a job in the queue\n",
            exp.raw.experiment.name
        ));
    }
    let cwd = std::env::current_dir().map_err(|e| RunError::Input(e.to_string()))?;
    let abs_run = cwd.join(&run_dir);
    let cx = ScriptContext {
        xrun: std::env::current_exe()
            .map_err(|e| RunError::Input(format!("cannot find the xrun binary: {e}")))?,
        cwd: cwd.clone(),
        logs: abs_run.join("slurm").join("logs"),
        experiment: exp.raw.experiment.name.clone(),
    };
    let mut out = describe(&jobs);
    let stamp = now();
    if o.dry_run {
        for (i, j) in jobs.iter().enumerate() {
            let (text, _) = script(j, &cx, o, &options);
            let dep = match &j.after {
                None => String::new(),
                Some(After::Job(p)) => format!(" --dependency=afterok:<job {}>", p + 1),
                Some(After::Submitted(id)) => format!(" --dependency=afterok:{id}"),
            };
            out.push_str(&format!(
                "\n# job {}: sbatch --parsable{dep} {}/slurm/{}-{stamp}.sbatch\n{text}",
                i + 1,
                abs_run.display(),
                j.name
            ));
        }
        out.push_str("\n(dry run: nothing was submitted)\n");
        return Ok(out);
    }
    let io =
        |p: &Path, e: std::io::Error| RunError::Input(format!("cannot write {}: {e}", p.display()));
    std::fs::create_dir_all(&cx.logs).map_err(|e| io(&cx.logs, e))?;
    let mut ids: Vec<String> = Vec::new();
    for j in &jobs {
        let (text, log) = script(j, &cx, o, &options);
        let path = abs_run
            .join("slurm")
            .join(format!("{}-{stamp}.sbatch", j.name));
        std::fs::write(&path, text).map_err(|e| io(&path, e))?;
        let after = match &j.after {
            None => None,
            Some(After::Job(p)) => Some(ids[*p].clone()),
            Some(After::Submitted(id)) => Some(id.clone()),
        };
        let id = sbatch(&path, after.as_deref())?;
        let (stage, key, trials) = match &j.work {
            Work::Stage { until, key, trial } => (
                Some(until.name().to_string()),
                Some(key.clone()),
                vec![trial.clone()],
            ),
            Work::Trials(t) => (None, None, t.clone()),
        };
        let array = matches!(j.work, Work::Trials(_));
        append_record(
            &run_dir,
            &Record {
                log: log.replace("%A", &id).replace("%j", &id),
                job_id: id.clone(),
                name: j.name.clone(),
                submitted_unix: stamp,
                stage,
                key,
                trials,
                array,
                script: path.display().to_string(),
            },
        )?;
        ids.push(id);
    }
    out.push_str(&format!(
        "submitted {} job{} (Slurm {}); follow them with `xrun status {}`\n",
        ids.len(),
        if ids.len() == 1 { "" } else { "s" },
        ids.join(", "),
        o.file.display()
    ));
    Ok(out)
}

/// One line of `xrun status`.
pub struct TrialState {
    pub id: String,
    /// `done`, `diverged`, `failed`, `running`, `queued`, `not submitted`.
    pub state: &'static str,
    pub job: String,
    pub detail: String,
}

/// Every trial's state from its folder, the cache, the submitted jobs and the queue; then one
/// line per stage job still in the queue.
pub fn status(
    exp: &Experiment,
    trials: &[Trial],
    keys: &[StageKeys],
) -> Result<(Vec<TrialState>, Vec<String>), RunError> {
    let run_dir = exp.run_dir();
    let cache = Cache::new(exp.cache_dir());
    let recs = records(&run_dir);
    // Without squeue (the cluster is down, or this is not a login node) the queue is unknown:
    // trials without a result are "unknown", not "failed".
    let (queue, unknown) = match recs.is_empty() {
        true => (HashMap::new(), None),
        false => match squeue() {
            Ok(q) => (q, None),
            Err(e) => (HashMap::new(), Some(e.to_string())),
        },
    };
    let mut out = Vec::new();
    for (t, k) in trials.iter().zip(keys) {
        let task = recs
            .iter()
            .rev()
            .find_map(|r| (r.stage.is_none()).then(|| r.task_of(&t.id)).flatten());
        let (job, log) = task.clone().unwrap_or_default();
        let mut s = TrialState {
            id: t.id.clone(),
            state: if recs.is_empty() {
                "not run"
            } else {
                "not submitted"
            },
            job: job.clone(),
            detail: String::new(),
        };
        let result = finished(&run_dir, t, k);
        // The latest stage with a checkpoint is the one running.
        let step = k.stages().into_iter().rev().find_map(|(stage, key)| {
            key.and_then(|key| cache.partial_step(stage, key))
                .map(|n| (stage, n))
        });
        let queued = queue.get(&job).filter(|_| !job.is_empty());
        match (result.as_ref().and_then(|(s, _)| s.status.clone()), queued) {
            (Some(TrialStatus::Done), _) => {
                s.state = "done";
                if let Some((_, store)) = &result {
                    if let Some(a) = store.result("test", "accuracy") {
                        s.detail = format!("test accuracy {:.2}%", a * 100.0);
                    }
                }
            }
            (Some(TrialStatus::Diverged { stage, step, .. }), _) => {
                s.state = "diverged";
                s.detail = format!("in {stage} at step {step}");
            }
            (_, Some(q)) if q.state == "PENDING" => {
                s.state = "queued";
                s.detail = format!("waiting: {}", q.reason);
            }
            (_, Some(q)) => {
                s.state = "running";
                s.detail = match step {
                    Some((stage, n)) => format!(
                        "{} (last checkpoint: {stage} step {n}); log {log}",
                        q.state.to_lowercase()
                    ),
                    None => format!("{}; log {log}", q.state.to_lowercase()),
                };
            }
            (Some(TrialStatus::Failed { stage, message, .. }), None) => {
                s.state = "failed";
                s.detail = format!("stage {stage}: {message}; log {log}");
            }
            (_, None) if task.is_some() && unknown.is_some() => {
                s.state = "unknown";
                s.detail = format!(
                    "the queue cannot be read ({}); log {log}",
                    unknown.as_deref().unwrap_or_default()
                );
            }
            (_, None) if task.is_some() => {
                s.state = "failed";
                let log = if Path::new(&log).exists() {
                    format!("log {log}")
                } else {
                    "no log: it never started".into()
                };
                s.detail = format!(
                    "the job ended without a result (failed, cancelled, out of time, or an \
                     upstream stage job failed); {log}"
                );
            }
            // No job of ours: a shard or another xrun may be running it right now.
            _ => {
                let busy = k
                    .stages()
                    .into_iter()
                    .any(|(stage, key)| key.is_some_and(|key| cache.busy(stage, key)));
                if busy {
                    s.state = "running";
                    s.detail = format!(
                        "another xrun holds one of its stages (a shard, a `--jobs` process or a second run){}",
                        step.map(|(stage, n)| format!("; last checkpoint: {stage} step {n}"))
                            .unwrap_or_default()
                    );
                }
            }
        }
        out.push(s);
    }
    let stages = recs
        .iter()
        .filter(|r| r.stage.is_some())
        .filter_map(|r| {
            let q = queue.get(&r.job_id)?;
            Some(format!(
                "stage job {} ({}): {}{}; log {}",
                r.job_id,
                r.name,
                q.state.to_lowercase(),
                if q.reason.is_empty() || q.reason == "None" {
                    String::new()
                } else {
                    format!(" ({})", q.reason)
                },
                r.log
            ))
        })
        .collect();
    Ok((out, stages))
}

/// `xrun status` as text: a summary line, then one line per trial and per stage job still queued.
pub fn status_text(
    exp: &Experiment,
    trials: &[Trial],
    keys: &[StageKeys],
) -> Result<String, RunError> {
    let (states, stages) = status(exp, trials, keys)?;
    let order = [
        "done",
        "diverged",
        "running",
        "queued",
        "failed",
        "unknown",
        "not submitted",
        "not run",
    ];
    let summary: Vec<String> = order
        .iter()
        .map(|o| (o, states.iter().filter(|s| s.state == *o).count()))
        .filter(|(_, c)| *c > 0)
        .map(|(o, c)| format!("{c} {o}"))
        .collect();
    let mut out = format!(
        "{}: {} trial{}: {}\n",
        exp.raw.experiment.name,
        states.len(),
        if states.len() == 1 { "" } else { "s" },
        summary.join(", ")
    );
    let w_id = states.iter().map(|s| s.id.len()).max().unwrap_or(5).max(5);
    let w_job = states.iter().map(|s| s.job.len()).max().unwrap_or(3).max(3);
    out.push_str(&format!(
        "{:w_id$}  {:13}  {:w_job$}  detail\n",
        "trial", "state", "job"
    ));
    for s in &states {
        out.push_str(
            format!(
                "{:w_id$}  {:13}  {:w_job$}  {}",
                s.id, s.state, s.job, s.detail
            )
            .trim_end(),
        );
        out.push('\n');
    }
    for line in stages {
        out.push_str(&line);
        out.push('\n');
    }
    Ok(out)
}
