//! Running a sweep on a cluster. The plan becomes a job graph: each shared stage that is not cached
//! yet (a tokenizer, each distinct pretraining) is a job of its own, and the trials are job arrays,
//! one per upstream job they wait for. Every job is `xrun run FILE --trial ID [--until STAGE]`
//! against the same run and cache directories, so the cache locks, the journal and the merged
//! study are what keep concurrent jobs apart. `slurm` submits the graph and reads its state back;
//! `local` runs it on this machine, several processes at once (`xrun run FILE --jobs N`).

pub mod local;
pub mod slurm;

use std::collections::HashMap;
use std::path::Path;

use crate::exec::{finished, Cache, TrialStatus, Until};
use crate::plan::keys::StageKeys;
use crate::plan::Trial;

/// What a job waits for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum After {
    /// A job of this graph, by position.
    Job(usize),
    /// A job submitted earlier that is still queued or running (`--retry-failed`).
    Submitted(String),
}

#[derive(Debug, Clone, PartialEq)]
pub enum Work {
    /// Builds one shared stage's cache entry through a trial that needs it.
    Stage {
        until: Until,
        key: String,
        trial: String,
    },
    /// One array task per trial.
    Trials(Vec<String>),
}

#[derive(Debug, Clone)]
pub struct Job {
    /// Short and unique within the graph: `tokenizer-1a2b3c4d`, `pretrain-…`, `trials-1`.
    pub name: String,
    pub work: Work,
    pub after: Option<After>,
}

/// Whether a trial still needs to run: it has no result in its folder, or it failed.
pub fn needs_run(run_dir: &Path, t: &Trial, k: &StageKeys) -> bool {
    !matches!(
        finished(run_dir, t, k).and_then(|(s, _)| s.status),
        Some(TrialStatus::Done | TrialStatus::Diverged { .. })
    )
}

/// The jobs that run trials `todo` (plan positions): the shared stages they need that are neither
/// cached nor being built by a job in `active` (`(stage, key)` → job id), then their arrays.
pub fn graph(
    trials: &[Trial],
    keys: &[StageKeys],
    todo: &[usize],
    cache: &Cache,
    active: &HashMap<(String, String), String>,
) -> Vec<Job> {
    let mut jobs: Vec<Job> = Vec::new();
    let mut arrays: Vec<(Option<After>, Vec<String>)> = Vec::new();
    for &i in todo {
        let (t, k) = (&trials[i], &keys[i]);
        let mut upstream = |until: Until, key: &crate::plan::keys::Key, after: Option<After>| {
            if cache.done(until.name(), key).is_some() {
                return after;
            }
            if let Some(id) = active.get(&(until.name().to_string(), key.hash.clone())) {
                return Some(After::Submitted(id.clone()));
            }
            let work = Work::Stage {
                until,
                key: key.hash.clone(),
                trial: t.id.clone(),
            };
            let same = |j: &Job| matches!(&j.work, Work::Stage { until: u, key: h, .. } if *u == until && *h == key.hash);
            let pos = jobs.iter().position(same).unwrap_or_else(|| {
                jobs.push(Job {
                    name: format!("{}-{}", until.name(), &key.hash[..8]),
                    work,
                    after,
                });
                jobs.len() - 1
            });
            Some(After::Job(pos))
        };
        let after = upstream(Until::Tokenizer, &k.tokenizer, None);
        let after = match &k.pretrain {
            Some(p) => upstream(Until::Pretrain, p, after),
            None => after,
        };
        match arrays.iter_mut().find(|(a, _)| *a == after) {
            Some((_, ids)) => ids.push(t.id.clone()),
            None => arrays.push((after, vec![t.id.clone()])),
        }
    }
    let n = arrays.len();
    for (i, (after, ids)) in arrays.into_iter().enumerate() {
        jobs.push(Job {
            name: if n == 1 {
                "trials".into()
            } else {
                format!("trials-{}", i + 1)
            },
            work: Work::Trials(ids),
            after,
        });
    }
    jobs
}

/// The graph as text, for `--dry-run` and the submission log.
pub fn describe(jobs: &[Job]) -> String {
    let mut out = String::new();
    for (i, j) in jobs.iter().enumerate() {
        let what = match &j.work {
            Work::Stage { until, key, trial } => {
                format!("{} {} (through trial {trial})", until.name(), &key[..12])
            }
            Work::Trials(ids) => format!(
                "array of {} trial{}: {}",
                ids.len(),
                if ids.len() == 1 { "" } else { "s" },
                ids.join(", ")
            ),
        };
        let after = match &j.after {
            None => String::new(),
            Some(After::Job(p)) => format!(" after job {} ({})", p + 1, jobs[*p].name),
            Some(After::Submitted(id)) => format!(" after Slurm job {id} (queued earlier)"),
        };
        out.push_str(&format!("job {}: {} - {what}{after}\n", i + 1, j.name));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stages_are_shared_and_arrays_grouped_by_what_they_wait_for() {
        let root = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"));
        let file = root.join("tests/fixtures/sweeps/fewclue.toml");
        let exp = crate::config::load(&file, &[]).unwrap();
        let trials = crate::plan::expand(&exp).unwrap();
        let keys = crate::exec::keys(&trials).unwrap();
        let tmp = std::env::temp_dir().join(format!("xrun-graph-{}", std::process::id()));
        let cache = Cache::new(tmp.clone());
        let todo: Vec<usize> = (0..trials.len()).collect();
        let jobs = graph(&trials, &keys, &todo, &cache, &HashMap::new());
        let text = describe(&jobs);
        // 3 splits × {none, mlm}: the tokenizer is trained on each split's texts, so one
        // tokenizer job per split, one pretraining per split, and one array per upstream job.
        let tokenizers = jobs
            .iter()
            .filter(|j| {
                matches!(
                    j.work,
                    Work::Stage {
                        until: Until::Tokenizer,
                        ..
                    }
                )
            })
            .count();
        let pretrains = jobs
            .iter()
            .filter(|j| {
                matches!(
                    j.work,
                    Work::Stage {
                        until: Until::Pretrain,
                        ..
                    }
                )
            })
            .count();
        let distinct_tok: std::collections::HashSet<_> =
            keys.iter().map(|k| &k.tokenizer.hash).collect();
        let distinct_pre: std::collections::HashSet<_> = keys
            .iter()
            .filter_map(|k| k.pretrain.as_ref())
            .map(|k| &k.hash)
            .collect();
        assert_eq!(tokenizers, distinct_tok.len(), "{text}");
        assert_eq!(pretrains, distinct_pre.len(), "{text}");
        let arrays: Vec<&Job> = jobs
            .iter()
            .filter(|j| matches!(j.work, Work::Trials(_)))
            .collect();
        let in_arrays: usize = arrays
            .iter()
            .map(|j| match &j.work {
                Work::Trials(ids) => ids.len(),
                _ => 0,
            })
            .sum();
        assert_eq!(in_arrays, trials.len(), "{text}");
        // Every job waits only for a job listed before it, and a pretraining for its tokenizer.
        for (i, j) in jobs.iter().enumerate() {
            if let Some(After::Job(p)) = j.after {
                assert!(p < i, "{text}");
            }
            if let Work::Stage {
                until: Until::Pretrain,
                ..
            } = j.work
            {
                assert!(
                    matches!(j.after, Some(After::Job(p)) if matches!(jobs[p].work, Work::Stage { until: Until::Tokenizer, .. })),
                    "{text}"
                );
            }
        }
        // A stage that an earlier submission is building is waited for, not submitted again.
        let (pre_key, pre_job) = jobs
            .iter()
            .find_map(|j| match &j.work {
                Work::Stage {
                    until: Until::Pretrain,
                    key,
                    ..
                } => Some((key.clone(), j.name.clone())),
                _ => None,
            })
            .unwrap();
        let active = HashMap::from([(("pretrain".to_string(), pre_key), "77".to_string())]);
        let again = graph(&trials, &keys, &todo, &cache, &active);
        assert!(again.iter().all(|j| j.name != pre_job));
        assert!(again
            .iter()
            .any(|j| j.after == Some(After::Submitted("77".into()))));
    }
}
