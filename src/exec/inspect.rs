//! Looking at a run without training: `xrun plan` (what each trial's stages will do) and `xrun gc`
//! (what the cache holds that no run directory references).

use std::path::Path;

use super::{keys, Cache, RunError};
use crate::config::Experiment;
use crate::plan::Trial;

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
        for (stage, key) in k.stages() {
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
            for key in k.stages().into_iter().filter_map(|(_, key)| key) {
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
