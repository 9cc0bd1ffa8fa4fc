//! The study: every trial of a sweep together. Writes `results.csv` and `metrics.parquet` with one
//! column per swept key, `groups.csv` (n, mean, std, median, min, max, 95% CI per group and metric), `study.json` (enough to render again without training), the paper tables as
//! `tables/<name>.md` and `.tex`, and `index.html`: groups with mean ± std and 95% CI, the
//! configuration selected on dev with its test score, the tables, overlaid curves and the trial list.

use std::path::{Path, PathBuf};

use minijinja::{context, Value};
use polars::prelude::*;
use serde::{Deserialize, Serialize};

use super::{charts, tables, write_file, RunSummary};
use crate::config::sweep::TableSpec;
use crate::exec::TrialStatus;
use crate::metrics::aggregate::{floats, strings, summarize};
use crate::metrics::Store;

const TEMPLATE: &str = include_str!("../../templates/study.html");

/// What the study report needs besides each trial's own summary and records.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StudyMeta {
    pub name: String,
    pub description: String,
    pub experiment_file: String,
    pub xrun_version: String,
    pub config_toml: String,
    /// Swept keys, in canonical order.
    pub axes: Vec<String>,
    /// Swept keys that define a method (not `data.split` or `experiment.seed`): groups average over
    /// the rest.
    pub group_keys: Vec<String>,
    /// `accuracy` or `macro_f1`: the dev metric that selects a configuration.
    pub select_metric: String,
    /// The test metrics of the group table: `accuracy` and `macro_f1`, or for token
    /// classification `entity_f1` and `accuracy` (over tokens).
    #[serde(default = "default_test_metrics")]
    pub test_metrics: (String, String),
    pub tables: Vec<TableSpec>,
    pub trials: Vec<TrialMeta>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TrialMeta {
    pub id: String,
    /// `(key, value)` for every swept key and every key a table is laid out by.
    pub values: Vec<(String, String)>,
    #[serde(flatten)]
    pub status: TrialStatus,
}

impl StudyMeta {
    /// Every key a trial carries a value for, in order of first appearance.
    fn keys(&self) -> Vec<String> {
        let mut out: Vec<String> = Vec::new();
        for t in &self.trials {
            for (k, _) in &t.values {
                if !out.contains(k) {
                    out.push(k.clone());
                }
            }
        }
        out
    }
}

fn default_test_metrics() -> (String, String) {
    ("accuracy".into(), "macro_f1".into())
}

fn value_of<'a>(t: &'a TrialMeta, key: &str) -> &'a str {
    t.values
        .iter()
        .find(|(k, _)| k == key)
        .map_or("", |(_, v)| v.as_str())
}

/// One row per (trial, split, metric, class) with the trial's key values and status.
pub fn results_frame(meta: &StudyMeta, stores: &[&Store]) -> PolarsResult<DataFrame> {
    let keys = meta.keys();
    let mut trial = Vec::new();
    let mut status = Vec::new();
    let mut key_cols: Vec<Vec<String>> = vec![Vec::new(); keys.len()];
    let (mut split, mut metric, mut class, mut value) = (vec![], vec![], vec![], vec![]);
    for (t, store) in meta.trials.iter().zip(stores) {
        for r in &store.results {
            trial.push(t.id.clone());
            status.push(t.status.name());
            for (i, k) in keys.iter().enumerate() {
                key_cols[i].push(value_of(t, k).to_string());
            }
            split.push(r.split.clone());
            metric.push(r.metric.clone());
            class.push(r.class.clone());
            value.push(r.value);
        }
    }
    let mut columns = vec![Column::new("trial".into(), trial)];
    for (k, v) in keys.iter().zip(key_cols) {
        columns.push(Column::new(k.as_str().into(), v));
    }
    columns.push(Column::new("status".into(), status));
    columns.push(Column::new("split".into(), split));
    columns.push(Column::new("metric".into(), metric));
    columns.push(Column::new("class".into(), class));
    columns.push(Column::new("value".into(), value));
    DataFrame::new_infer_height(columns)
}

/// Every trial's metric records, with a `trial` column in front.
fn records_frame(meta: &StudyMeta, stores: &[&Store]) -> PolarsResult<DataFrame> {
    let mut out: Option<DataFrame> = None;
    for (t, store) in meta.trials.iter().zip(stores) {
        let mut df = store.records_frame()?;
        let ids = vec![t.id.as_str(); df.height()];
        df.insert_column(0, Column::new("trial".into(), ids))?;
        out = Some(match out {
            Some(acc) => acc.vstack(&df)?,
            None => df,
        });
    }
    match out {
        Some(df) => Ok(df),
        None => Store::default().records_frame().and_then(|mut df| {
            df.insert_column(0, Column::new("trial".into(), Vec::<String>::new()))?;
            Ok(df)
        }),
    }
}

#[derive(Debug, Serialize)]
struct Stat {
    mean: f64,
    std: Option<f64>,
    ci95: Option<f64>,
    n: u64,
}

#[derive(Debug, Serialize)]
struct Group {
    label: String,
    values: Vec<String>,
    dev: Option<Stat>,
    test: Option<Stat>,
    test_f1: Option<Stat>,
    selected: bool,
}

fn groups(meta: &StudyMeta, results: &DataFrame) -> PolarsResult<Vec<Group>> {
    let s = summarize(results, &meta.group_keys)?;
    let key_vals: Vec<Vec<String>> = meta
        .group_keys
        .iter()
        .map(|k| strings(&s, k))
        .collect::<PolarsResult<_>>()?;
    let split = strings(&s, "split")?;
    let metric = strings(&s, "metric")?;
    let n: Vec<u64> = s.column("n")?.u64()?.into_no_null_iter().collect();
    let mean = floats(&s, "mean")?;
    let std = floats(&s, "std")?;
    let ci = floats(&s, "ci95")?;
    let mut out: Vec<Group> = Vec::new();
    for i in 0..s.height() {
        let values: Vec<String> = key_vals.iter().map(|c| c[i].clone()).collect();
        let pos = match out.iter().position(|g| g.values == values) {
            Some(p) => p,
            None => {
                let label = if values.is_empty() {
                    "all trials".to_string()
                } else {
                    meta.group_keys
                        .iter()
                        .zip(&values)
                        .map(|(k, v)| format!("{}={v}", short(k)))
                        .collect::<Vec<_>>()
                        .join(", ")
                };
                out.push(Group {
                    label,
                    values,
                    dev: None,
                    test: None,
                    test_f1: None,
                    selected: false,
                });
                out.len() - 1
            }
        };
        let Some(m) = mean[i] else { continue };
        let stat = Stat {
            mean: m,
            std: std[i],
            ci95: ci[i],
            n: n[i],
        };
        let g = &mut out[pos];
        match (split[i].as_str(), metric[i].as_str()) {
            ("dev", x) if x == meta.select_metric => g.dev = Some(stat),
            ("test", x) if x == meta.test_metrics.0 => g.test = Some(stat),
            ("test", x) if x == meta.test_metrics.1 => g.test_f1 = Some(stat),
            _ => {}
        }
    }
    let best = out
        .iter()
        .enumerate()
        .filter_map(|(i, g)| g.dev.as_ref().map(|d| (i, d.mean)))
        .fold(None, |acc: Option<(usize, f64)>, (i, m)| match acc {
            Some((_, b)) if b >= m => acc,
            _ => Some((i, m)),
        });
    if let Some((i, _)) = best {
        out[i].selected = true;
    }
    Ok(out)
}

fn short(key: &str) -> &str {
    key.rsplit('.').next().unwrap_or(key)
}

/// A group's label for one trial.
fn group_label(meta: &StudyMeta, t: &TrialMeta) -> String {
    if meta.group_keys.is_empty() {
        return "all trials".into();
    }
    meta.group_keys
        .iter()
        .map(|k| format!("{}={}", short(k), value_of(t, k)))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Sum and count of a curve's values at each x.
type Sums = std::collections::BTreeMap<u64, (f64, usize)>;

/// Mean curve per group of one (stage, split, metric), x by epoch or step.
fn group_curves(
    meta: &StudyMeta,
    stores: &[&Store],
    stage: &str,
    split: &str,
    metric: &str,
    by_epoch: bool,
) -> Vec<(String, Vec<(f64, f64)>)> {
    let mut out: Vec<(String, Sums)> = Vec::new();
    for (t, store) in meta.trials.iter().zip(stores) {
        if t.status != TrialStatus::Done {
            continue;
        }
        let label = group_label(meta, t);
        let pos = match out.iter().position(|(l, _)| *l == label) {
            Some(p) => p,
            None => {
                out.push((label, Default::default()));
                out.len() - 1
            }
        };
        for r in store
            .records
            .iter()
            .filter(|r| r.stage == stage && r.split == split && r.metric == metric)
        {
            let x = if by_epoch { r.epoch } else { r.step };
            let e = out[pos].1.entry(x).or_insert((0.0, 0));
            e.0 += r.value;
            e.1 += 1;
        }
    }
    out.into_iter()
        .filter(|(_, m)| !m.is_empty())
        .map(|(l, m)| {
            let points = m
                .into_iter()
                .map(|(x, (s, n))| (x as f64, s / n as f64))
                .collect();
            (l, points)
        })
        .collect()
}

/// For each numeric method key with several values: the test metric (dev without a test split)
/// against it, mean ± std over replicates, one line per combination of the other keys.
fn numeric_charts(meta: &StudyMeta, results: &DataFrame) -> Vec<String> {
    let mut out = Vec::new();
    let Ok(s) = summarize(results, &meta.group_keys) else {
        return out;
    };
    let (Ok(split), Ok(metric), Ok(mean), Ok(std)) = (
        strings(&s, "split"),
        strings(&s, "metric"),
        floats(&s, "mean"),
        floats(&s, "std"),
    ) else {
        return out;
    };
    let target = if split.iter().any(|x| x == "test") {
        "test"
    } else {
        "dev"
    };
    for (ki, key) in meta.group_keys.iter().enumerate() {
        let Ok(vals) = strings(&s, key) else { continue };
        let xs: Vec<Option<f64>> = vals.iter().map(|v| v.parse::<f64>().ok()).collect();
        let distinct: std::collections::BTreeSet<String> = vals.iter().cloned().collect();
        if xs.iter().any(Option::is_none) || distinct.len() < 2 {
            continue;
        }
        let mut series: Vec<charts::BarSeries> = Vec::new();
        for i in 0..s.height() {
            if split[i] != target || metric[i] != meta.select_metric {
                continue;
            }
            let (Some(x), Some(m)) = (xs[i], mean[i]) else {
                continue;
            };
            let others: Vec<String> = meta
                .group_keys
                .iter()
                .enumerate()
                .filter(|(j, _)| *j != ki)
                .filter_map(|(_, k)| {
                    strings(&s, k)
                        .ok()
                        .map(|c| format!("{}={}", short(k), c[i]))
                })
                .collect();
            let name = if others.is_empty() {
                format!("{target} {}", meta.select_metric)
            } else {
                others.join(", ")
            };
            let pos = match series.iter().position(|(n, _)| *n == name) {
                Some(p) => p,
                None => {
                    series.push((name, Vec::new()));
                    series.len() - 1
                }
            };
            series[pos].1.push((x, m, std[i].unwrap_or(0.0)));
        }
        for (_, pts) in &mut series {
            pts.sort_by(|a, b| a.0.total_cmp(&b.0));
        }
        let title = format!("{target} {} against {key} (mean ± std)", meta.select_metric);
        if let Ok(svg) = charts::error_bars(&title, key, &meta.select_metric, &series) {
            out.push(svg);
        }
    }
    out
}

#[derive(Serialize)]
struct TrialRow {
    id: String,
    values: Vec<String>,
    status: String,
    detail: String,
    dev: Option<f64>,
    test: Option<f64>,
    /// `(trained, total)` parameters of the fine-tuned model.
    trained: Option<(usize, usize)>,
    reused: String,
}

/// Writes the study's files and report into `run_dir`; returns the report's path.
pub fn write(
    run_dir: &Path,
    meta: &StudyMeta,
    trials: &[(&RunSummary, &Store)],
) -> Result<PathBuf, String> {
    let stores: Vec<&Store> = trials.iter().map(|t| t.1).collect();
    let e = |x: PolarsError| format!("study results: {x}");
    let mut results = results_frame(meta, &stores).map_err(e)?;
    let mut records = records_frame(meta, &stores).map_err(e)?;
    crate::metrics::write_atomic(&run_dir.join("results.csv"), |f| {
        CsvWriter::new(f).include_header(true).finish(&mut results)
    })
    .map_err(|x| x.to_string())?;
    crate::metrics::write_atomic(&run_dir.join("metrics.parquet"), |f| {
        ParquetWriter::new(f).finish(&mut records).map(|_| ())
    })
    .map_err(|x| x.to_string())?;
    let mut groups_df = summarize(&results, &meta.group_keys).map_err(e)?;
    crate::metrics::write_atomic(&run_dir.join("groups.csv"), |f| {
        CsvWriter::new(f)
            .include_header(true)
            .finish(&mut groups_df)
    })
    .map_err(|x| x.to_string())?;
    let json = serde_json::to_string_pretty(meta).map_err(|x| x.to_string())?;
    write_file(&run_dir.join("study.json"), json.as_bytes())?;
    let mut built = Vec::new();
    if !meta.tables.is_empty() {
        std::fs::create_dir_all(run_dir.join("tables")).map_err(|x| x.to_string())?;
    }
    for spec in &meta.tables {
        let t = tables::build(spec, &results)?;
        let dir = run_dir.join("tables");
        write_file(
            &dir.join(format!("{}.md", t.name)),
            tables::markdown(&t).as_bytes(),
        )?;
        write_file(
            &dir.join(format!("{}.tex", t.name)),
            tables::latex(&t).as_bytes(),
        )?;
        built.push(t);
    }
    let path = run_dir.join("index.html");
    let html = if meta.trials.len() == 1 {
        super::render(trials[0].0, trials[0].1)?
    } else {
        render(meta, trials, &results, &built)?
    };
    write_file(&path, html.as_bytes())?;
    Ok(path)
}

fn render(
    meta: &StudyMeta,
    trials: &[(&RunSummary, &Store)],
    results: &DataFrame,
    built: &[tables::Table],
) -> Result<String, String> {
    let stores: Vec<&Store> = trials.iter().map(|t| t.1).collect();
    let groups = groups(meta, results).map_err(|x| format!("study groups: {x}"))?;
    let rows: Vec<TrialRow> = meta
        .trials
        .iter()
        .zip(trials)
        .map(|(t, (summary, store))| {
            let score = |split: &str| {
                store
                    .results
                    .iter()
                    .find(|r| {
                        r.split == split && r.metric == meta.select_metric && r.class.is_none()
                    })
                    .map(|r| r.value)
            };
            let reused: Vec<&str> = summary
                .stages
                .iter()
                .filter(|s| s.cached)
                .map(|s| s.stage.as_str())
                .collect();
            TrialRow {
                id: t.id.clone(),
                values: meta
                    .axes
                    .iter()
                    .map(|k| value_of(t, k).to_string())
                    .collect(),
                status: t.status.name().into(),
                detail: summary.failure.clone().unwrap_or_default(),
                dev: score("dev"),
                test: score("test"),
                trained: summary.trainable_parameters.filter(|(_, total)| *total > 0),
                reused: reused.join(", "),
            }
        })
        .collect();
    let svg = |s: Option<String>| s.map_or(Value::from(()), Value::from_safe_string);
    let dev_curves = group_curves(meta, &stores, "finetune", "dev", &meta.select_metric, true);
    let pre_curves = group_curves(meta, &stores, "pretrain", "validation", "loss", false);
    let dev_chart = (!dev_curves.is_empty())
        .then(|| {
            let title = format!("Dev {} per epoch, mean per group", meta.select_metric);
            charts::lines(&title, "epoch", &meta.select_metric, &dev_curves).ok()
        })
        .flatten();
    let pre_chart = (!pre_curves.is_empty())
        .then(|| {
            charts::lines(
                "Pretraining validation loss, mean per group",
                "step",
                "cross-entropy",
                &pre_curves,
            )
            .ok()
        })
        .flatten();
    let numeric: Vec<Value> = numeric_charts(meta, results)
        .into_iter()
        .map(Value::from_safe_string)
        .collect();
    let env = super::environment("study.html", TEMPLATE)?;
    let selected = groups.iter().find(|g| g.selected);
    let n_done = meta
        .trials
        .iter()
        .filter(|t| t.status == TrialStatus::Done)
        .count();
    env.get_template("study.html")
        .map_err(|x| x.to_string())?
        .render(context! {
            m => meta,
            group_keys => meta.group_keys.iter().map(|k| short(k)).collect::<Vec<_>>(),
            groups => groups,
            selected => selected,
            tables => built,
            trials => rows,
            n_done => n_done,
            chart_dev => svg(dev_chart),
            chart_pretrain => svg(pre_chart),
            charts_numeric => numeric,
        })
        .map_err(|x| format!("rendering the study report: {x}"))
}

/// Renders the study again from `study.json` and each trial's stored summary and records.
/// A trial folder's summary and metric records, with its final scores as results.
pub fn load_trial(dir: &Path) -> Result<(RunSummary, Store), String> {
    let summary: RunSummary = super::read_json(&dir.join("summary.json"))?;
    let mut store = Store::read_records(dir)
        .map_err(|x| format!("cannot read {}: {x}", dir.join("metrics.parquet").display()))?;
    summary.push_results(&mut store);
    Ok((summary, store))
}

pub fn rerender(run_dir: &Path) -> Result<PathBuf, String> {
    let meta: StudyMeta = super::read_json(&run_dir.join("study.json"))
        .map_err(|x| format!("{x} (is this a run directory?)"))?;
    let mut loaded = Vec::new();
    for t in &meta.trials {
        let dir = run_dir.join("trials").join(&t.id);
        if t.status == TrialStatus::Pending {
            loaded.push((RunSummary::new_pending(&meta.name, &t.id), Store::default()));
            continue;
        }
        let (summary, store) = load_trial(&dir)?;
        super::write(&dir, &summary, &store)?;
        loaded.push((summary, store));
    }
    let refs: Vec<(&RunSummary, &Store)> = loaded.iter().map(|(s, st)| (s, st)).collect();
    write(run_dir, &meta, &refs)
}
