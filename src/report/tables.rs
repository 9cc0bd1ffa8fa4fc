//! Paper tables from `[[report.table]]`: rows and columns by config keys, one metric, an aggregate
//! per cell, optional summary columns (mean, std, n over the row's cells), the best value of each
//! column in bold. The same table is rendered as HTML (through the template), Markdown and LaTeX.

use polars::prelude::*;
use serde::Serialize;

use crate::config::sweep::{Aggregate, Best, Summary, TableSpec};
use crate::metrics::aggregate::{floats, strings};
use crate::plan::value_label;

#[derive(Debug, Clone, Serialize)]
pub struct Cell {
    pub text: String,
    pub bold: bool,
}

#[derive(Debug, Clone, Serialize)]
pub struct Table {
    pub name: String,
    pub title: String,
    /// What the cells hold, e.g. "test accuracy ×100, mean over trials".
    pub caption: String,
    pub header: Vec<String>,
    pub rows: Vec<(String, Vec<Cell>)>,
}

/// One cell's statistics over the trials that fall in it.
#[derive(Clone, Copy)]
struct Stats {
    mean: f64,
    std: Option<f64>,
    median: f64,
    min: f64,
    max: f64,
}

impl Stats {
    fn center(&self, a: Aggregate) -> f64 {
        match a {
            Aggregate::Mean | Aggregate::MeanStd => self.mean,
            Aggregate::Median => self.median,
            Aggregate::Max => self.max,
            Aggregate::Min => self.min,
        }
    }
}

fn sample_std(v: &[f64]) -> Option<f64> {
    if v.len() < 2 {
        return None;
    }
    let m = v.iter().sum::<f64>() / v.len() as f64;
    Some((v.iter().map(|x| (x - m).powi(2)).sum::<f64>() / (v.len() - 1) as f64).sqrt())
}

/// Builds a table from the study's results frame (one string column per config key).
pub fn build(spec: &TableSpec, results: &DataFrame) -> Result<Table, String> {
    let e = |x: PolarsError| format!("table `{}`: {x}", spec.name);
    let (split, metric) = spec
        .metric
        .split_once('.')
        .unwrap_or(("test", &spec.metric));
    let row_key = spec.rows.as_str();
    let col_key = spec.columns.as_deref();
    let mut keys = vec![col(row_key)];
    if let Some(c) = col_key {
        keys.push(col(c));
    }
    let filtered = results
        .clone()
        .lazy()
        .filter(
            col("class")
                .is_null()
                .and(col("status").eq(lit("done")))
                .and(col("split").eq(lit(split)))
                .and(col("metric").eq(lit(metric))),
        )
        .collect()
        .map_err(e)?;
    let cells = filtered
        .clone()
        .lazy()
        .group_by_stable(keys)
        .agg([
            col("value").mean().alias("mean"),
            col("value").std(1).alias("std"),
            col("value").median().alias("median"),
            col("value").min().alias("min"),
            col("value").max().alias("max"),
        ])
        .collect()
        .map_err(e)?;
    let row_vals = strings(&cells, row_key).map_err(e)?;
    let col_vals = match col_key {
        Some(c) => strings(&cells, c).map_err(e)?,
        None => vec![String::new(); cells.height()],
    };
    let [mean, std, median, min, max] =
        ["mean", "std", "median", "min", "max"].map(|n| floats(&cells, n).unwrap_or_default());
    let unique = |v: &[String]| {
        let mut out: Vec<String> = Vec::new();
        for x in v {
            if !out.contains(x) {
                out.push(x.clone());
            }
        }
        out
    };
    let rows = unique(&row_vals);
    let columns = unique(&col_vals);
    let stats = |r: &str, c: &str| -> Option<Stats> {
        let i = (0..cells.height()).find(|&i| row_vals[i] == r && col_vals[i] == c)?;
        Some(Stats {
            mean: mean[i]?,
            std: std[i],
            median: median[i]?,
            min: min[i]?,
            max: max[i]?,
        })
    };
    let over: Vec<String> = spec.summary_over.iter().map(value_label).collect();
    let p = spec.precision;
    let fmt = |x: f64| format!("{:.p$}", x * spec.scale);
    // Each row: cell texts with their centre values (for bolding), then summary columns.
    let mut grid: Vec<Vec<(String, Option<f64>)>> = Vec::new();
    for r in &rows {
        let mut line = Vec::new();
        let mut centres = Vec::new();
        for c in &columns {
            match stats(r, c) {
                Some(s) => {
                    let centre = s.center(spec.aggregate);
                    if over.is_empty() || over.contains(c) {
                        centres.push(centre);
                    }
                    let text = match (spec.aggregate, s.std) {
                        (Aggregate::MeanStd, Some(sd)) => format!("{} ± {}", fmt(centre), fmt(sd)),
                        _ => fmt(centre),
                    };
                    line.push((text, Some(centre)));
                }
                None => line.push(("–".into(), None)),
            }
        }
        for s in &spec.summary {
            line.push(match s {
                Summary::Mean if !centres.is_empty() => {
                    let m = centres.iter().sum::<f64>() / centres.len() as f64;
                    (fmt(m), Some(m))
                }
                Summary::Std => match sample_std(&centres) {
                    Some(sd) => (fmt(sd), None),
                    None => ("–".into(), None),
                },
                Summary::N => (centres.len().to_string(), None),
                Summary::Mean => ("–".into(), None),
            });
        }
        grid.push(line);
    }
    let width = grid.first().map_or(0, Vec::len);
    let best: Vec<Option<f64>> = (0..width)
        .map(|j| {
            let vals = grid.iter().filter_map(|line| line[j].1);
            match spec.best {
                Best::Max => vals.fold(None, |a: Option<f64>, v| Some(a.map_or(v, |a| a.max(v)))),
                Best::Min => vals.fold(None, |a: Option<f64>, v| Some(a.map_or(v, |a| a.min(v)))),
                Best::None => None,
            }
        })
        .collect();
    let mut header = vec![short(row_key).to_string()];
    header.extend(columns.iter().map(|c| match col_key {
        Some(k) if !c.is_empty() => format!("{} {c}", short(k)),
        _ => metric.to_string(),
    }));
    header.extend(spec.summary.iter().map(|s| {
        match s {
            Summary::Mean => "mean",
            Summary::Std => "std",
            Summary::N => "n",
        }
        .to_string()
    }));
    let rows = rows
        .into_iter()
        .zip(grid)
        .map(|(label, line)| {
            let cells = line
                .into_iter()
                .enumerate()
                .map(|(j, (text, v))| Cell {
                    bold: rows_compete(&best, j, v),
                    text,
                })
                .collect();
            (label, cells)
        })
        .collect();
    let aggregate = match spec.aggregate {
        Aggregate::Mean => "mean",
        Aggregate::MeanStd => "mean ± std",
        Aggregate::Median => "median",
        Aggregate::Max => "max",
        Aggregate::Min => "min",
    };
    let scale = if spec.scale == 1.0 {
        String::new()
    } else {
        format!(" ×{}", spec.scale)
    };
    Ok(Table {
        name: spec.name.clone(),
        title: if spec.title.is_empty() {
            format!("{split} {metric}")
        } else {
            spec.title.clone()
        },
        caption: format!(
            "{split} {metric}{scale}; each cell the {aggregate} over its trials{}",
            if spec.summary.is_empty() {
                String::new()
            } else if over.is_empty() {
                "; summary columns over the row's cells".to_string()
            } else {
                format!("; summary columns over {}", over.join(", "))
            }
        ),
        header,
        rows,
    })
}

fn rows_compete(best: &[Option<f64>], j: usize, v: Option<f64>) -> bool {
    matches!((best[j], v), (Some(b), Some(v)) if b == v)
}

/// `pretrain.objective` → `objective`.
fn short(key: &str) -> &str {
    key.rsplit('.').next().unwrap_or(key)
}

pub fn markdown(t: &Table) -> String {
    let esc = |s: &str| s.replace('|', "\\|");
    let mut out = format!("**{}**\n\n", esc(&t.title));
    out.push_str(&format!(
        "| {} |\n",
        t.header
            .iter()
            .map(|h| esc(h))
            .collect::<Vec<_>>()
            .join(" | ")
    ));
    let mut rule = vec![":--".to_string()];
    rule.extend((1..t.header.len()).map(|_| "--:".to_string()));
    out.push_str(&format!("| {} |\n", rule.join(" | ")));
    for (label, cells) in &t.rows {
        let mut line = vec![esc(label)];
        line.extend(cells.iter().map(|c| {
            if c.bold {
                format!("**{}**", esc(&c.text))
            } else {
                esc(&c.text)
            }
        }));
        out.push_str(&format!("| {} |\n", line.join(" | ")));
    }
    out.push_str(&format!("\n{}\n", esc(&t.caption)));
    out
}

/// Escapes the characters LaTeX treats specially in text.
fn tex(s: &str) -> String {
    let mut out = String::new();
    for ch in s.chars() {
        match ch {
            '\\' => out.push_str("\\textbackslash{}"),
            '&' | '%' | '$' | '#' | '_' | '{' | '}' => {
                out.push('\\');
                out.push(ch);
            }
            '~' => out.push_str("\\textasciitilde{}"),
            '^' => out.push_str("\\textasciicircum{}"),
            '±' => out.push_str("$\\pm$"),
            '–' => out.push_str("--"),
            _ => out.push(ch),
        }
    }
    out
}

/// A booktabs table (`\usepackage{booktabs}`).
pub fn latex(t: &Table) -> String {
    let mut out = String::from("\\begin{table}[t]\n\\centering\n");
    out.push_str(&format!("\\caption{{{}}}\n", tex(&t.title)));
    out.push_str(&format!("\\label{{tab:{}}}\n", t.name));
    out.push_str(&format!(
        "\\begin{{tabular}}{{l{}}}\n\\toprule\n",
        "r".repeat(t.header.len().saturating_sub(1))
    ));
    let header: Vec<String> = t.header.iter().map(|h| tex(h)).collect();
    out.push_str(&format!("{} \\\\\n\\midrule\n", header.join(" & ")));
    for (label, cells) in &t.rows {
        let mut line = vec![tex(label)];
        line.extend(cells.iter().map(|c| {
            if c.bold {
                format!("\\textbf{{{}}}", tex(&c.text))
            } else {
                tex(&c.text)
            }
        }));
        out.push_str(&format!("{} \\\\\n", line.join(" & ")));
    }
    out.push_str("\\bottomrule\n\\end{tabular}\n");
    out.push_str(&format!(
        "\\par\\smallskip{{\\footnotesize {}}}\n",
        tex(&t.caption)
    ));
    out.push_str("\\end{table}\n");
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::sweep::TableSpec;

    fn spec(toml_text: &str) -> TableSpec {
        toml::from_str(toml_text).expect("a table spec")
    }

    /// Two methods × three splits (`all` left out of the summary), seed replicates in one cell.
    fn results() -> DataFrame {
        let rows = [
            ("none", "0", 0.30),
            ("none", "1", 0.40),
            ("none", "all", 0.50),
            ("mlm", "0", 0.36),
            ("mlm", "0", 0.40),
            ("mlm", "1", 0.38),
            ("mlm", "all", 0.45),
        ];
        let n = rows.len();
        df!(
            "trial" => (0..n).map(|i| format!("t{i}")).collect::<Vec<_>>(),
            "pretrain.objective" => rows.iter().map(|r| r.0).collect::<Vec<_>>(),
            "data.split" => rows.iter().map(|r| r.1).collect::<Vec<_>>(),
            "status" => vec!["done"; n],
            "split" => vec!["test"; n],
            "metric" => vec!["accuracy"; n],
            "class" => vec![None::<&str>; n],
            "value" => rows.iter().map(|r| r.2).collect::<Vec<_>>(),
        )
        .expect("frame")
    }

    #[test]
    fn a_fewclue_shaped_table_has_splits_all_mean_and_std() {
        let t = build(
            &spec(
                r#"name = "t"
rows = "pretrain.objective"
columns = "data.split"
metric = "test.accuracy"
scale = 100
precision = 1
summary = ["mean", "std"]
summary_over = [0, 1]"#,
            ),
            &results(),
        )
        .expect("built");
        assert_eq!(
            t.header,
            [
                "objective",
                "split 0",
                "split 1",
                "split all",
                "mean",
                "std"
            ]
        );
        let row = |name: &str| &t.rows.iter().find(|r| r.0 == name).expect("row").1;
        let texts = |name: &str| row(name).iter().map(|c| c.text.clone()).collect::<Vec<_>>();
        // mlm split 0 is the mean of its two seeds; mean/std run over splits 0 and 1 only.
        // numpy: np.mean([38.0, 38.0]) = 38.0, np.std([38.0, 38.0], ddof=1) = 0.0;
        //        np.mean([30, 40]) = 35.0, np.std([30, 40], ddof=1) = 7.07
        assert_eq!(texts("mlm"), ["38.0", "38.0", "45.0", "38.0", "0.0"]);
        assert_eq!(texts("none"), ["30.0", "40.0", "50.0", "35.0", "7.1"]);
        let bold = |name: &str| row(name).iter().map(|c| c.bold).collect::<Vec<_>>();
        assert_eq!(bold("mlm"), [true, false, false, true, false]);
        assert_eq!(bold("none"), [false, true, true, false, false]);
    }

    #[test]
    fn mean_std_cells_and_both_file_formats() {
        let t = build(
            &spec(
                r#"name = "seeds_and_more"
title = "Accuracy & more"
rows = "data.split"
metric = "test.accuracy"
aggregate = "mean_std"
precision = 2
best = "min""#,
            ),
            &results(),
        )
        .expect("built");
        // Split 0 holds three trials: 0.30, 0.36, 0.40 → mean 0.353, std 0.0503 (numpy ddof=1).
        let split0 = &t.rows[0].1[0];
        assert_eq!(split0.text, "0.35 ± 0.05");
        assert!(split0.bold, "the lowest mean is best here");
        let md = markdown(&t);
        assert!(md.contains("| split | accuracy |"), "{md}");
        assert!(md.contains("| 0 | **0.35 ± 0.05** |"), "{md}");
        let tex = latex(&t);
        assert!(tex.contains("\\caption{Accuracy \\& more}"), "{tex}");
        assert!(tex.contains("0 & \\textbf{0.35 $\\pm$ 0.05} \\\\"), "{tex}");
        assert!(tex.contains("\\toprule") && tex.contains("\\bottomrule"));
        assert!(tex.contains("\\label{tab:seeds_and_more}"));
    }
}
