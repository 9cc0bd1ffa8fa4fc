//! The metrics store: every record a stage emits (one row: stage, step, epoch, split, metric, value,
//! wall time), written to `metrics.parquet` through polars, plus final results to `results.csv`.

pub mod aggregate;
pub mod classification;
pub mod tagging;

use std::path::Path;

use polars::prelude::*;
use serde::Serialize;

/// One measurement: e.g. (`pretrain`, step 200, `validation`, `perplexity`, 84.1).
#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct Record {
    pub stage: String,
    pub step: u64,
    pub epoch: u64,
    pub split: String,
    pub metric: String,
    pub value: f64,
    /// Seconds since the stage started.
    pub wall_s: f64,
}

/// A final metric; `class` is set for per-class precision/recall/F1.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct ResultRow {
    pub split: String,
    pub metric: String,
    pub class: Option<String>,
    pub value: f64,
}

#[derive(Debug, Default)]
pub struct Store {
    pub records: Vec<Record>,
    pub results: Vec<ResultRow>,
}

#[derive(Debug, thiserror::Error)]
#[error("writing {path}: {message}")]
pub struct WriteError {
    pub path: String,
    pub message: String,
}

impl Store {
    pub fn records_frame(&self) -> PolarsResult<DataFrame> {
        let r = &self.records;
        df!(
            "stage" => r.iter().map(|x| x.stage.as_str()).collect::<Vec<_>>(),
            "step" => r.iter().map(|x| x.step).collect::<Vec<_>>(),
            "epoch" => r.iter().map(|x| x.epoch).collect::<Vec<_>>(),
            "split" => r.iter().map(|x| x.split.as_str()).collect::<Vec<_>>(),
            "metric" => r.iter().map(|x| x.metric.as_str()).collect::<Vec<_>>(),
            "value" => r.iter().map(|x| x.value).collect::<Vec<_>>(),
            "wall_s" => r.iter().map(|x| x.wall_s).collect::<Vec<_>>(),
        )
    }

    pub fn results_frame(&self) -> PolarsResult<DataFrame> {
        let r = &self.results;
        df!(
            "split" => r.iter().map(|x| x.split.as_str()).collect::<Vec<_>>(),
            "metric" => r.iter().map(|x| x.metric.as_str()).collect::<Vec<_>>(),
            "class" => r.iter().map(|x| x.class.as_deref()).collect::<Vec<_>>(),
            "value" => r.iter().map(|x| x.value).collect::<Vec<_>>(),
        )
    }

    /// Writes `metrics.parquet` and `results.csv` into `dir`, each through a temporary file and a rename.
    pub fn write(&self, dir: &Path) -> Result<(), WriteError> {
        let parquet = dir.join("metrics.parquet");
        write_atomic(&parquet, |f| {
            let mut df = self.records_frame()?;
            ParquetWriter::new(f).finish(&mut df).map(|_| ())
        })?;
        let csv = dir.join("results.csv");
        write_atomic(&csv, |f| {
            let mut df = self.results_frame()?;
            CsvWriter::new(f).include_header(true).finish(&mut df)
        })
    }

    /// The final results of one evaluated split: overall scores, then per-class ones.
    pub fn push_scores(&mut self, split: &str, s: &classification::Scores, labels: &[String]) {
        let mut row = |metric: &str, class: Option<&String>, value: f64| {
            self.results.push(ResultRow {
                split: split.into(),
                metric: metric.into(),
                class: class.cloned(),
                value,
            })
        };
        row("accuracy", None, s.accuracy);
        row("macro_f1", None, s.macro_f1);
        // Token classification counts tokens; the entity count follows below.
        let count = if s.entities.is_some() {
            "tokens"
        } else {
            "examples"
        };
        row(count, None, s.n as f64);
        for (c, label) in s.per_class.iter().zip(labels) {
            row("precision", Some(label), c.precision);
            row("recall", Some(label), c.recall);
            row("f1", Some(label), c.f1);
            row("support", Some(label), c.support as f64);
        }
        if let Some(e) = &s.entities {
            row("entity_precision", None, e.precision);
            row("entity_recall", None, e.recall);
            row("entity_f1", None, e.f1);
            row("entity_macro_f1", None, e.macro_f1);
            row("entities", None, e.gold as f64);
            for (kind, c) in &e.per_type {
                row("entity_precision", Some(kind), c.precision);
                row("entity_recall", Some(kind), c.recall);
                row("entity_f1", Some(kind), c.f1);
                row("entities", Some(kind), c.support as f64);
            }
        }
    }

    pub fn result(&self, split: &str, metric: &str) -> Option<f64> {
        self.results
            .iter()
            .find(|r| r.split == split && r.metric == metric && r.class.is_none())
            .map(|r| r.value)
    }
}

/// A temporary name beside `path` that no other writer uses: array tasks on different hosts of a
/// cluster write the same study files, and may share a process id.
pub fn tmp_path(path: &Path) -> std::path::PathBuf {
    use std::sync::atomic::{AtomicU64, Ordering};
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    let name = path.file_name().unwrap_or_default().to_string_lossy();
    path.with_file_name(format!(
        ".{name}.tmp-{}-{nanos}-{}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    ))
}

pub fn write_atomic(
    path: &Path,
    write: impl FnOnce(&mut std::fs::File) -> PolarsResult<()>,
) -> Result<(), WriteError> {
    let err = |message: String| WriteError {
        path: path.display().to_string(),
        message,
    };
    let tmp = tmp_path(path);
    let mut file = std::fs::File::create(&tmp).map_err(|e| err(e.to_string()))?;
    write(&mut file).map_err(|e| err(e.to_string()))?;
    file.sync_all().map_err(|e| err(e.to_string()))?;
    std::fs::rename(&tmp, path).map_err(|e| err(e.to_string()))
}

impl Store {
    /// Reads the records of `metrics.parquet` back (results are not needed to re-render a report).
    /// xrun writes no nulls, so every column is read as non-null.
    pub fn read_records(dir: &Path) -> PolarsResult<Self> {
        let df = read_parquet(&dir.join("metrics.parquet"))?;
        let text = |name: &str| -> PolarsResult<Vec<String>> {
            let column = df.column(name)?.str()?;
            Ok((0..column.len())
                .map(|i| column.get(i).unwrap_or_default().to_string())
                .collect())
        };
        let int = |name: &str| -> PolarsResult<Vec<u64>> {
            Ok(df.column(name)?.u64()?.into_no_null_iter().collect())
        };
        let float = |name: &str| -> PolarsResult<Vec<f64>> {
            Ok(df.column(name)?.f64()?.into_no_null_iter().collect())
        };
        let (stage, split, metric) = (text("stage")?, text("split")?, text("metric")?);
        let (step, epoch) = (int("step")?, int("epoch")?);
        let (value, wall) = (float("value")?, float("wall_s")?);
        let records = (0..df.height())
            .map(|i| Record {
                stage: stage[i].clone(),
                step: step[i],
                epoch: epoch[i],
                split: split[i].clone(),
                metric: metric[i].clone(),
                value: value[i],
                wall_s: wall[i],
            })
            .collect();
        Ok(Self {
            records,
            results: Vec::new(),
        })
    }
}

/// Reads `metrics.parquet` back (for tests and `xrun report`).
pub fn read_parquet(path: &Path) -> PolarsResult<DataFrame> {
    let file = std::fs::File::open(path)?;
    ParquetReader::new(file).finish()
}
