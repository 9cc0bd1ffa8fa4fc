//! `xrun run FILE --jobs N`: the job graph of a sweep run on this machine, up to N processes at
//! once. Each job is the same `xrun run FILE --trial ID [--until STAGE]` a cluster job runs, so the
//! cache locks, the journal and the merged study keep the processes apart exactly as they keep
//! Slurm's jobs apart. A trial starts once the shared stages it needs have been built (or have
//! failed: it then tries them itself, as a run in one process would); trials that already have a
//! result are not run again. Each process writes its log to `<run_dir>/logs/`.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::{graph, needs_run, After, Work};
use crate::config::Experiment;
use crate::exec::{
    conclude, finished, lock_run_dir, merge_study, trial_line, Cache, Outcome, RunError,
    TrialStatus, Until,
};
use crate::plan::keys::StageKeys;
use crate::plan::Trial;

pub struct LocalOptions<'a> {
    /// The experiment file and the overrides of this run, handed to every process.
    pub file: &'a Path,
    pub sets: &'a [String],
    /// How many processes run at once (at least 2; 1 is a run in one process).
    pub jobs: usize,
    pub quiet: bool,
}

/// One process to start: a shared stage (`until`) built through one of its trials, or a trial.
struct Task {
    trial: usize,
    until: Option<Until>,
    /// The stage job (its position in the graph) that must end first.
    after: Option<usize>,
    /// This task's own stage job, which others may wait for.
    job: usize,
    name: String,
}

struct Running {
    task: usize,
    child: Child,
    started: Instant,
    log: PathBuf,
}

/// Runs every trial of the plan without a result, `o.jobs` processes at a time, then merges the
/// study from the trial folders.
pub fn run(
    exp: &Experiment,
    trials: &[Trial],
    keys: &[StageKeys],
    o: &LocalOptions,
) -> Result<Outcome, RunError> {
    let run_dir = exp.run_dir();
    let logs = run_dir.join("logs");
    let setup = |e: String| RunError::Stage {
        stage: "setup",
        message: e,
    };
    std::fs::create_dir_all(&logs)
        .map_err(|e| setup(format!("cannot create {}: {e}", logs.display())))?;
    // Shared, like the processes it starts: a whole run in one process refuses meanwhile.
    let _lock = lock_run_dir(&run_dir, false)?;
    let xrun =
        std::env::current_exe().map_err(|e| setup(format!("cannot find the xrun binary: {e}")))?;
    let cache = Cache::new(exp.cache_dir());
    let todo: Vec<usize> = (0..trials.len())
        .filter(|&i| needs_run(&run_dir, &trials[i], &keys[i]))
        .collect();
    let jobs = graph(trials, keys, &todo, &cache, &HashMap::new());
    // The graph names trials by id; every id in it is one of `trials`.
    let position: HashMap<&str, usize> = trials
        .iter()
        .enumerate()
        .map(|(i, t)| (t.id.as_str(), i))
        .collect();
    let mut tasks: Vec<Task> = Vec::new();
    for (j, job) in jobs.iter().enumerate() {
        let after = match job.after {
            Some(After::Job(p)) => Some(p),
            // Only a Slurm submission waits for jobs submitted earlier.
            Some(After::Submitted(_)) | None => None,
        };
        match &job.work {
            Work::Stage { until, trial, .. } => tasks.push(Task {
                trial: position[trial.as_str()],
                until: Some(*until),
                after,
                job: j,
                name: job.name.clone(),
            }),
            Work::Trials(ids) => tasks.extend(ids.iter().map(|id| Task {
                trial: position[id.as_str()],
                until: None,
                after,
                job: j,
                name: id.clone(),
            })),
        }
    }
    let say = |line: &str| {
        if !o.quiet {
            eprintln!("{line}");
        }
    };
    let n_trials = tasks.iter().filter(|t| t.until.is_none()).count();
    let skipped = trials.len() - todo.len();
    say(&format!(
        "{} of {} trials to run{}, {} processes at a time; logs in {}",
        n_trials,
        trials.len(),
        if skipped > 0 {
            format!(" ({skipped} already have a result)")
        } else {
            String::new()
        },
        o.jobs,
        logs.display()
    ));

    let mut ended = vec![false; jobs.len()];
    let mut started = vec![false; tasks.len()];
    let mut running: Vec<Running> = Vec::new();
    let mut crashed: HashMap<usize, String> = HashMap::new();
    let mut trials_done = 0;
    loop {
        while running.len() < o.jobs {
            let Some(next) =
                (0..tasks.len()).find(|&i| !started[i] && tasks[i].after.is_none_or(|p| ended[p]))
            else {
                break;
            };
            started[next] = true;
            let t = &tasks[next];
            let log = logs.join(format!("{}.log", t.name));
            let child = spawn(&xrun, o, &trials[t.trial].id, t.until, &log)?;
            say(&format!("{}: started", t.name));
            running.push(Running {
                task: next,
                child,
                started: Instant::now(),
                log,
            });
        }
        if running.is_empty() {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
        let mut i = 0;
        while i < running.len() {
            let status = running[i]
                .child
                .try_wait()
                .map_err(|e| setup(format!("cannot wait for an xrun process: {e}")))?;
            let Some(status) = status else {
                i += 1;
                continue;
            };
            let r = running.swap_remove(i);
            let t = &tasks[r.task];
            let secs = r.started.elapsed().as_secs_f64();
            let line = match t.until {
                Some(until) => {
                    ended[t.job] = true;
                    if status.success() {
                        format!("{}: done in {secs:.1} s", t.name)
                    } else {
                        format!(
                            "{}: the {} failed after {secs:.1} s ({status}): {}; the trials \
                             that need it try it themselves; see {}",
                            t.name,
                            until.name(),
                            last_error(&r.log),
                            r.log.display()
                        )
                    }
                }
                None => {
                    trials_done += 1;
                    let (trial, k) = (&trials[t.trial], &keys[t.trial]);
                    let label = format!("[{trials_done}/{n_trials}] {}", trial.id);
                    match finished(&run_dir, trial, k) {
                        Some((summary, store)) => {
                            let s = summary.status.clone().unwrap_or(TrialStatus::Pending);
                            format!(
                                "{} in {secs:.1} s",
                                trial_line(&label, &s, &summary, &store)
                            )
                        }
                        None => {
                            let why = format!(
                                "xrun ended ({status}) without a result: {}; see {}",
                                last_error(&r.log),
                                r.log.display()
                            );
                            crashed.insert(t.trial, why.clone());
                            format!("{label}: {why}")
                        }
                    }
                }
            };
            say(&line);
        }
    }

    // The merged study read every trial folder; a trial whose process ended without writing
    // one fails the run rather than showing as pending.
    let merged = merge_study(exp, trials, keys)?;
    let statuses: Vec<(String, TrialStatus)> = trials
        .iter()
        .zip(merged.statuses)
        .enumerate()
        .map(|(i, (t, status))| {
            let status = match (status, crashed.remove(&i)) {
                (TrialStatus::Pending, Some(message)) => TrialStatus::Failed {
                    stage: "run".into(),
                    message,
                    code: 1,
                },
                (status, _) => status,
            };
            (t.id.clone(), status)
        })
        .collect();
    conclude(
        run_dir,
        merged.report,
        trials.len(),
        statuses,
        merged.test_score,
    )
}

/// The threads each of `jobs` processes gets on `cores`: an equal share, at least one. Each
/// process would otherwise start a pool as large as the machine, and N of them would ask for N
/// times its cores, their idle workers spinning on cores the others need. On 2 cores the gain
/// was small: 0.92–0.99× the wall time, 0.91–0.96× the CPU time (BENCHMARKS.md, "Dropout masks
/// drawn in bulk").
fn share_of_cores(cores: usize, jobs: usize) -> usize {
    (cores / jobs.max(1)).max(1)
}

/// Starts `xrun run FILE --trial ID [--until STAGE]` with this run's overrides, its output to `log`,
/// with its share of the cores (unless `RAYON_NUM_THREADS` is set: then every process keeps it).
fn spawn(
    xrun: &Path,
    o: &LocalOptions,
    trial: &str,
    until: Option<Until>,
    log: &Path,
) -> Result<Child, RunError> {
    let err = |e: std::io::Error| RunError::Stage {
        stage: "setup",
        message: format!("cannot start {} for {trial}: {e}", xrun.display()),
    };
    let out = std::fs::File::create(log).map_err(|e| RunError::Stage {
        stage: "setup",
        message: format!("cannot create {}: {e}", log.display()),
    })?;
    let mut cmd = Command::new(xrun);
    cmd.arg("run").arg(o.file);
    for set in o.sets {
        cmd.arg("--set").arg(set);
    }
    cmd.args(["--trial", trial]);
    if let Some(until) = until {
        cmd.args(["--until", until.name()]);
    }
    use crate::train::backend::{cores, CPU_THREADS_VAR};
    if std::env::var_os(CPU_THREADS_VAR).is_none() {
        cmd.env(CPU_THREADS_VAR, share_of_cores(cores(), o.jobs).to_string());
    }
    cmd.stdin(Stdio::null())
        .stdout(out.try_clone().map_err(err)?)
        .stderr(out);
    die_with_parent(&mut cmd);
    cmd.spawn().map_err(err)
}

/// A process this run starts ends when the run does, however it ends (killed, out of time): the
/// kernel sends it SIGTERM. Its stage checkpoints stay, so running the command again resumes.
#[cfg(target_os = "linux")]
fn die_with_parent(cmd: &mut Command) {
    use std::os::unix::process::CommandExt;
    let parent = std::process::id() as libc::pid_t;
    // SAFETY: between fork and exec the closure calls only async-signal-safe functions (prctl,
    // getppid, _exit) and allocates nothing.
    unsafe {
        cmd.pre_exec(move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            // The run ended before the request took effect.
            if libc::getppid() != parent {
                libc::_exit(1);
            }
            Ok(())
        });
    }
}

#[cfg(not(target_os = "linux"))]
fn die_with_parent(_cmd: &mut Command) {}

/// The last `error:` line of a process's log, for the line that says it failed.
fn last_error(log: &Path) -> String {
    std::fs::read_to_string(log)
        .ok()
        .and_then(|text| {
            text.lines()
                .rev()
                .find_map(|l| l.strip_prefix("error: ").map(str::to_string))
        })
        .unwrap_or_else(|| "no error message".into())
}
