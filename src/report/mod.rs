//! The HTML report: a plain `Serialize` view of the run (`RunSummary` + the metrics store), charts as
//! inline SVG, rendered by minijinja from `templates/report.html` with auto-escaping on. The page
//! loads nothing from the network and carries a Content-Security-Policy that forbids scripts.

mod charts;
pub mod study;
mod tables;

use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use minijinja::{context, Environment, Value};
use serde::{Deserialize, Serialize};

use crate::config::Experiment;
use crate::exec::SplitStats;
use crate::metrics::classification::Scores;
use crate::metrics::Store;
use crate::model::BackboneConfig;
use crate::train::backend::DeviceInfo;

const TEMPLATE: &str = include_str!("../../templates/report.html");
/// The page both reports extend: head, Content-Security-Policy, styles.
const BASE: &str = include_str!("../../templates/base.html");

/// Everything the report says about a run besides the metric records.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct RunSummary {
    pub name: String,
    /// The trial's id within its sweep (`base` without one).
    #[serde(default)]
    pub trial: String,
    /// Which cache entries the trial's stages used, and whether they were reused.
    #[serde(default)]
    pub stages: Vec<StageUse>,
    pub description: String,
    pub experiment_file: String,
    pub created_unix: u64,
    pub config_toml: String,
    pub xrun_version: String,
    pub git_commit: Option<String>,
    pub device: DeviceInfo,
    pub seed: u64,
    pub data_root: String,
    pub data: Vec<SplitStats>,
    pub labels: Vec<String>,
    /// Token classification: the tagging scheme (`labels` are then the tags).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tag_scheme: Option<String>,
    pub tokenizer: String,
    pub vocab_requested: usize,
    /// Filled in as the stages get that far.
    pub vocab_size: Option<usize>,
    pub model: Option<BackboneConfig>,
    pub parameters: Option<usize>,
    /// `(trainable, total)` parameters of the fine-tuned classifier.
    #[serde(default)]
    pub trainable_parameters: Option<(usize, usize)>,
    /// `full` or `linear_probe`.
    #[serde(default)]
    pub method: String,
    pub objective: String,
    pub scores: Vec<(String, Scores)>,
    pub stage_times: Vec<(String, f64)>,
    /// The training stages this run computed, and how fast their steps went.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub throughput: Vec<(String, crate::train::Throughput)>,
    pub failure: Option<String>,
    /// How the trial ended; read back when a study is merged from its trial folders.
    #[serde(default)]
    pub status: Option<crate::exec::TrialStatus>,
    /// Continual learning: the accuracy matrix and what it says about forgetting.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub continual: Option<ContinualScores>,
}

/// A continual-learning sequence's results. `test[i][j]` is the test accuracy on task `j` after
/// training on task `i` (`j <= i`); `dev` likewise where every task has a dev split.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct ContinualScores {
    pub strategy: String,
    pub tasks: Vec<String>,
    pub test: Vec<Vec<f64>>,
    #[serde(default)]
    pub dev: Vec<Vec<f64>>,
}

impl ContinualScores {
    /// Mean accuracy over all tasks after the last one (of a complete matrix).
    pub fn average(m: &[Vec<f64>]) -> Option<f64> {
        let last = m.last()?;
        Some(last.iter().sum::<f64>() / last.len().max(1) as f64)
    }

    /// Per earlier task, its best accuracy before the last task minus its final accuracy
    /// (Chaudhry et al., 2018); the last task has none.
    pub fn forgetting(m: &[Vec<f64>]) -> Vec<f64> {
        let Some(last) = m.last() else {
            return Vec::new();
        };
        (0..m.len().saturating_sub(1))
            .map(|j| {
                let best = m[j..m.len() - 1]
                    .iter()
                    .map(|row| row[j])
                    .fold(f64::MIN, f64::max);
                best - last[j]
            })
            .collect()
    }
}

/// One stage of a trial: its cache key and whether an earlier run had already computed it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StageUse {
    pub stage: String,
    pub key: String,
    pub cached: bool,
}

impl StageUse {
    pub fn new(stage: &str, key: &str, cached: bool) -> Self {
        Self {
            stage: stage.into(),
            key: key.into(),
            cached,
        }
    }
}

impl RunSummary {
    /// Stands in for a trial of a merged study that has not finished.
    pub fn new_pending(name: &str, trial: &str) -> Self {
        Self {
            name: name.into(),
            trial: trial.into(),
            ..Self::default()
        }
    }

    pub fn new(exp: &Experiment, device: &DeviceInfo) -> Self {
        Self {
            name: exp.raw.experiment.name.clone(),
            trial: String::new(),
            stages: Vec::new(),
            description: exp.raw.experiment.description.clone(),
            experiment_file: exp.file.display().to_string(),
            created_unix: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
            config_toml: exp.resolved_toml(),
            xrun_version: env!("CARGO_PKG_VERSION").to_string(),
            git_commit: git_commit(&exp.file),
            device: device.clone(),
            seed: exp.raw.experiment.seed,
            data_root: std::fs::canonicalize(&exp.data_root)
                .unwrap_or_else(|_| exp.data_root.clone())
                .display()
                .to_string(),
            data: Vec::new(),
            labels: Vec::new(),
            tag_scheme: None,
            tokenizer: format!("{:?}", exp.raw.tokenizer.kind).to_lowercase(),
            vocab_requested: exp.raw.tokenizer.vocab_size,
            vocab_size: None,
            model: None,
            parameters: None,
            trainable_parameters: None,
            status: None,
            method: exp.raw.finetune.method.name().into(),
            objective: exp.raw.pretrain.objective.name().to_string(),
            scores: Vec::new(),
            stage_times: Vec::new(),
            throughput: Vec::new(),
            failure: None,
            continual: None,
        }
    }

    /// The final results this summary holds, as rows of `store`: every split's scores, and for
    /// continual learning the average accuracy over tasks (the `accuracy` of `test` and `dev`),
    /// forgetting, per-task final accuracies and the whole matrix (`accuracy after TASK`).
    pub fn push_results(&self, store: &mut Store) {
        for (split, scores) in &self.scores {
            store.push_scores(split, scores, &self.labels);
        }
        let Some(c) = &self.continual else { return };
        let mut row = |split: &str, metric: String, class: Option<&String>, value: f64| {
            store.results.push(crate::metrics::ResultRow {
                split: split.into(),
                metric,
                class: class.cloned(),
                value,
            })
        };
        for (split, m) in [("test", &c.test), ("dev", &c.dev)] {
            let Some(average) = ContinualScores::average(m) else {
                continue;
            };
            row(split, "accuracy".into(), None, average);
            let forgetting = ContinualScores::forgetting(m);
            if !forgetting.is_empty() {
                let mean = forgetting.iter().sum::<f64>() / forgetting.len() as f64;
                row(split, "forgetting".into(), None, mean);
            }
            for (j, task) in c.tasks.iter().enumerate() {
                if let Some(&v) = m.last().and_then(|r| r.get(j)) {
                    row(split, "accuracy".into(), Some(task), v);
                }
                if let Some(&f) = forgetting.get(j) {
                    row(split, "forgetting".into(), Some(task), f);
                }
            }
            for (i, after) in m.iter().enumerate() {
                for (j, &v) in after.iter().enumerate() {
                    row(
                        split,
                        format!("accuracy after {}", c.tasks[i]),
                        Some(&c.tasks[j]),
                        v,
                    );
                }
            }
        }
    }
}

/// The commit of the repository holding the experiment file, if it is in one.
fn git_commit(file: &Path) -> Option<String> {
    let dir = file
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let out = std::process::Command::new("git")
        .arg("-C")
        .arg(dir)
        .args(["rev-parse", "--short=12", "HEAD"])
        .stderr(std::process::Stdio::null())
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// `(x, y)` points of one metric of one stage and split.
fn curve(store: &Store, stage: &str, split: &str, metric: &str, by_epoch: bool) -> Vec<(f64, f64)> {
    store
        .records
        .iter()
        .filter(|r| r.stage == stage && r.split == split && r.metric == metric)
        .map(|r| {
            (
                if by_epoch {
                    r.epoch as f64
                } else {
                    r.step as f64
                },
                r.value,
            )
        })
        .collect()
}

/// Mean training loss per epoch, so a fine-tuning curve has one point per epoch like the dev metric.
fn epoch_means(store: &Store, stage: &str) -> Vec<(f64, f64)> {
    let mut out: Vec<(f64, f64, usize)> = Vec::new();
    for (epoch, loss) in curve(store, stage, "train", "loss", true) {
        match out.last_mut() {
            Some(last) if last.0 == epoch => {
                last.1 += loss;
                last.2 += 1;
            }
            _ => out.push((epoch, loss, 1)),
        }
    }
    out.into_iter().map(|(e, s, n)| (e, s / n as f64)).collect()
}

/// Training loss smoothed over a window so a few hundred steps read as a curve, not noise.
fn smoothed(points: Vec<(f64, f64)>) -> Vec<(f64, f64)> {
    let window = (points.len() / 50).max(1);
    points
        .chunks(window)
        .map(|c| {
            let n = c.len() as f64;
            (c[c.len() - 1].0, c.iter().map(|p| p.1).sum::<f64>() / n)
        })
        .collect()
}

#[derive(Serialize)]
struct Charts {
    pretrain: Option<String>,
    finetune_loss: Option<String>,
    dev_metric: Option<String>,
    lengths: Option<String>,
    labels: Option<String>,
}

fn charts(summary: &RunSummary, store: &Store) -> Charts {
    let nonempty = |s: &[(String, Vec<(f64, f64)>)]| s.iter().any(|x| !x.1.is_empty());
    let pre = vec![
        (
            "train loss".to_string(),
            smoothed(curve(store, "pretrain", "train", "loss", false)),
        ),
        (
            "validation loss".to_string(),
            curve(store, "pretrain", "validation", "loss", false),
        ),
    ];
    let ft_loss = vec![(
        "train loss (epoch mean)".to_string(),
        epoch_means(store, "finetune"),
    )];
    let tagging = summary.tag_scheme.is_some();
    let mut dev = vec![
        (
            if tagging {
                "dev token accuracy"
            } else {
                "dev accuracy"
            }
            .to_string(),
            curve(store, "finetune", "dev", "accuracy", true),
        ),
        (
            if tagging {
                "dev tag macro-F1"
            } else {
                "dev macro-F1"
            }
            .to_string(),
            curve(store, "finetune", "dev", "macro_f1", true),
        ),
    ];
    if tagging {
        dev.insert(
            0,
            (
                "dev entity F1".to_string(),
                curve(store, "finetune", "dev", "entity_f1", true),
            ),
        );
    }
    let train = summary.data.iter().find(|s| s.name == "train");
    let mut all_lengths: Vec<usize> = Vec::new();
    for s in &summary.data {
        all_lengths.resize(all_lengths.len().max(s.length_counts.len()), 0);
        for (n, c) in s.length_counts.iter().enumerate() {
            all_lengths[n] += c;
        }
    }
    Charts {
        pretrain: nonempty(&pre)
            .then(|| charts::lines("Pretraining loss", "step", "cross-entropy", &pre).ok())
            .flatten(),
        finetune_loss: nonempty(&ft_loss)
            .then(|| charts::lines("Fine-tuning loss", "epoch", "cross-entropy", &ft_loss).ok())
            .flatten(),
        dev_metric: nonempty(&dev)
            .then(|| charts::lines("Dev metrics", "epoch", "score", &dev).ok())
            .flatten(),
        lengths: (!all_lengths.is_empty())
            .then(|| charts::length_histogram("Token lengths, all splits", &all_lengths).ok())
            .flatten(),
        labels: train.and_then(|t| {
            let names: Vec<String> = t.labels.iter().map(|l| l.0.clone()).collect();
            let counts: Vec<f64> = t.labels.iter().map(|l| l.1 as f64).collect();
            let (title, unit) = match summary.tag_scheme {
                Some(_) => ("Training entities by type", "entities"),
                None => ("Training labels", "examples"),
            };
            charts::bars(title, unit, &names, &counts).ok()
        }),
    }
}

/// The label-count table: the splits that count labels, and per label (or entity type) its count
/// in each, in order of first appearance.
fn label_counts(summary: &RunSummary) -> Value {
    let splits: Vec<&SplitStats> = summary
        .data
        .iter()
        .filter(|d| !d.labels.is_empty())
        .collect();
    let mut names: Vec<&str> = Vec::new();
    for d in &splits {
        for (l, _) in &d.labels {
            if !names.contains(&l.as_str()) {
                names.push(l);
            }
        }
    }
    let rows: Vec<(&str, Vec<usize>)> = names
        .iter()
        .map(|&n| {
            let counts = splits
                .iter()
                .map(|d| d.labels.iter().find(|(l, _)| l == n).map_or(0, |x| x.1))
                .collect();
            (n, counts)
        })
        .collect();
    let headers: Vec<&str> = splits.iter().map(|d| d.name.as_str()).collect();
    Value::from_serialize((headers, rows))
}

fn safe_svg(svg: Option<String>) -> Value {
    svg.map_or(Value::from(()), Value::from_safe_string)
}

/// Reads a JSON file xrun wrote (`summary.json`, `study.json`); the error names the file.
pub fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    serde_json::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))
}

/// Re-renders `index.html` of a finished (or failed) run from its `summary.json` and
/// `metrics.parquet`, without training.
pub fn rerender(run_dir: &Path) -> Result<PathBuf, String> {
    if run_dir.join("study.json").is_file() {
        return study::rerender(run_dir);
    }
    let summary: RunSummary = read_json(&run_dir.join("summary.json"))
        .map_err(|e| format!("{e} (is this a run directory?)"))?;
    let store = Store::read_records(run_dir).map_err(|e| {
        format!(
            "cannot read {}: {e}",
            run_dir.join("metrics.parquet").display()
        )
    })?;
    write(run_dir, &summary, &store)
}

/// Renders `index.html` into `run_dir` and saves the view model as `summary.json`.
pub fn write(run_dir: &Path, summary: &RunSummary, store: &Store) -> Result<PathBuf, String> {
    let html = render(summary, store)?;
    let path = run_dir.join("index.html");
    write_file(&path, html.as_bytes())?;
    let json = serde_json::to_string_pretty(summary).map_err(|e| e.to_string())?;
    write_file(&run_dir.join("summary.json"), json.as_bytes())?;
    Ok(path)
}

/// Writes through a temporary file and a rename: a kill never leaves half a file.
pub(crate) fn write_file(path: &Path, bytes: &[u8]) -> Result<(), String> {
    let tmp = crate::metrics::tmp_path(path);
    std::fs::write(&tmp, bytes)
        .and_then(|()| std::fs::rename(&tmp, path))
        .map_err(|x| format!("cannot write {}: {x}", path.display()))
}

/// A template environment holding the base page and `template` as `name`, auto-escaping HTML, with
/// the filter `f(digits)` for fixed-precision numbers.
pub(crate) fn environment(
    name: &'static str,
    template: &'static str,
) -> Result<Environment<'static>, String> {
    let mut env = Environment::new();
    env.add_template("base.html", BASE)
        .map_err(|e| e.to_string())?;
    env.add_template(name, template)
        .map_err(|e| e.to_string())?;
    env.add_filter("f", |v: f64, digits: usize| format!("{v:.digits$}"));
    Ok(env)
}

pub fn render(summary: &RunSummary, store: &Store) -> Result<String, String> {
    let env = environment("report.html", TEMPLATE)?;
    let c = charts(summary, store);
    let pretrain_final = store
        .records
        .iter()
        .rev()
        .find(|r| r.stage == "pretrain" && r.split == "validation" && r.metric == "perplexity")
        .map(|r| r.value);
    let total: f64 = summary.stage_times.iter().map(|s| s.1).sum();
    let template = env.get_template("report.html").map_err(|e| e.to_string())?;
    template
        .render(context! {
            s => summary,
            total_seconds => total,
            chance => 100.0 / summary.labels.len().max(1) as f64,
            label_counts => label_counts(summary),
            continual => summary.continual.as_ref().map(|c| {
                let forgetting = ContinualScores::forgetting(&c.test);
                let mean = (!forgetting.is_empty())
                    .then(|| forgetting.iter().sum::<f64>() / forgetting.len() as f64);
                context! {
                    average => ContinualScores::average(&c.test),
                    dev_average => ContinualScores::average(&c.dev),
                    forgetting => forgetting,
                    forgetting_mean => mean,
                    complete => c.test.len() == c.tasks.len(),
                }
            }),
            selected_on_dev => summary.scores.iter().any(|(split, _)| split == "dev"),
            pretrain_perplexity => pretrain_final,
            chart_pretrain => safe_svg(c.pretrain),
            chart_finetune_loss => safe_svg(c.finetune_loss),
            chart_dev => safe_svg(c.dev_metric),
            chart_lengths => safe_svg(c.lengths),
            chart_labels => safe_svg(c.labels),
        })
        .map_err(|e| format!("rendering the report: {e}"))
}
