//! `[sweep]` and `[report]`: which keys vary across trials, and which paper tables the report draws.
//!
//! Sweep axes name config keys by their dotted path. TOML reads `pretrain.objective = [...]` inside
//! `[sweep.grid]` as nested tables, so axes stay plain tables here and `plan` flattens them into paths.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct SweepSection {
    /// Replicate seeds: `experiment.seed` takes each value.
    #[serde(default)]
    pub seeds: Vec<u64>,
    /// Few-shot splits: `data.split` takes each value and fills `{split}` in data paths.
    #[serde(default)]
    pub split: Vec<toml::Value>,
    /// Every combination of these values (Cartesian product).
    #[serde(default)]
    pub grid: toml::Table,
    /// Groups of keys whose lists vary together (same length), each group one more axis of the grid.
    #[serde(default)]
    pub zip: Vec<toml::Table>,
    pub random: Option<RandomSection>,
}

impl SweepSection {
    /// Whether any axis (grid, zip or random) varies the key at the dotted `path`.
    pub fn varies(&self, path: &str) -> bool {
        fn holds(table: &toml::Table, path: &str) -> bool {
            if table.contains_key(path) {
                return true;
            }
            path.split_once('.').is_some_and(|(head, rest)| {
                table
                    .get(head)
                    .and_then(toml::Value::as_table)
                    .is_some_and(|t| holds(t, rest))
            })
        }
        holds(&self.grid, path)
            || self.zip.iter().any(|z| holds(z, path))
            || self.random.as_ref().is_some_and(|r| holds(&r.params, path))
    }
}

/// Random search: `trials` draws of every parameter, seeded so the same file gives the same trials.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RandomSection {
    pub trials: usize,
    #[serde(default)]
    pub seed: u64,
    /// `key = { uniform = [lo, hi] }`, `{ log_uniform = [lo, hi] }`, `{ int_uniform = [lo, hi] }`
    /// or `{ choice = [a, b, …] }`.
    pub params: toml::Table,
}

/// How a random-search parameter is drawn.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum Distribution {
    Uniform([f64; 2]),
    LogUniform([f64; 2]),
    IntUniform([i64; 2]),
    Choice(Vec<toml::Value>),
}

impl Distribution {
    pub const NAMES: [&'static str; 4] = ["uniform", "log_uniform", "int_uniform", "choice"];
}

#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ReportSection {
    /// `[[report.table]]`: paper tables, rendered in the HTML report and written as `.md` and `.tex`.
    #[serde(default)]
    pub table: Vec<TableSpec>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Aggregate {
    /// Mean over the trials in a cell.
    Mean,
    /// Mean ± standard deviation over the trials in a cell.
    MeanStd,
    Median,
    Max,
    Min,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Best {
    Max,
    Min,
    None,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Summary {
    Mean,
    Std,
    N,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct TableSpec {
    /// File stem of `tables/<name>.md` and `.tex`; letters, digits, `-`, `_`.
    pub name: String,
    #[serde(default)]
    pub title: String,
    /// Config key whose values label the rows, e.g. `pretrain.objective`.
    pub rows: String,
    /// Config key whose values label the columns, e.g. `data.split`; without it, one value column.
    pub columns: Option<String>,
    /// `split.metric` of the final results, e.g. `test.accuracy` or `dev.macro_f1`.
    pub metric: String,
    #[serde(default = "default_aggregate")]
    pub aggregate: Aggregate,
    /// Extra columns summarising each row over its column cells (`mean`, `std`, `n`).
    #[serde(default)]
    pub summary: Vec<Summary>,
    /// Column values the summary columns use (default: all), e.g. the five splits but not `all`.
    #[serde(default)]
    pub summary_over: Vec<toml::Value>,
    /// Multiply values before printing (100 turns accuracy into percent).
    #[serde(default = "default_scale")]
    pub scale: f64,
    #[serde(default = "default_precision")]
    pub precision: usize,
    /// Bold the best value of each column.
    #[serde(default = "default_best")]
    pub best: Best,
}

fn default_aggregate() -> Aggregate {
    Aggregate::Mean
}
fn default_scale() -> f64 {
    1.0
}
fn default_precision() -> usize {
    3
}
fn default_best() -> Best {
    Best::Max
}

/// A grid entry's value: the list of values the key takes.
pub fn is_list(v: &toml::Value) -> bool {
    v.is_array()
}

/// `{ uniform = [..] }`: one key over a non-table value (a misspelt name is still a leaf, so the
/// error names the parameter, not a key inside it).
pub fn is_distribution(v: &toml::Value) -> bool {
    v.as_table()
        .is_some_and(|t| t.len() == 1 && t.values().all(|x| !x.is_table()))
}

/// Dotted paths to every leaf of nested tables; `leaf` says where a value stops being a table.
pub fn flatten(
    table: &toml::Table,
    prefix: &str,
    leaf: &dyn Fn(&toml::Value) -> bool,
    out: &mut Vec<(String, toml::Value)>,
) {
    for (k, v) in table {
        let path = joined(prefix, k);
        match v.as_table() {
            Some(sub) if !leaf(v) => flatten(sub, &path, leaf, out),
            _ => out.push((path, v.clone())),
        }
    }
}

fn joined(prefix: &str, key: &str) -> String {
    if prefix.is_empty() {
        key.to_string()
    } else {
        format!("{prefix}.{key}")
    }
}

/// Whether a value ends a key path in a sweep table (see `flatten`).
type Leaf = fn(&toml::Value) -> bool;

/// The sweep tables whose entries are key paths, and where their leaves stop. In them,
/// `pretrain.objective = […]` (nested tables) and `"pretrain.objective" = […]` (one quoted key)
/// are two spellings of one entry.
const PATH_TABLES: [(&[&str], Leaf); 2] = [
    (&["sweep", "grid"], is_list),
    (&["sweep", "random", "params"], is_distribution),
];

/// Before `value` is set at `path` of the document `tree` (a `--set`): removes the entries of a
/// sweep table that name the same keys in another spelling, so the `--set` replaces them rather
/// than sweeping a key twice.
pub fn forget_other_spellings(tree: &mut toml::Value, path: &[&str], value: &toml::Value) {
    for (base, leaf) in PATH_TABLES {
        if path.len() <= base.len() || !path.starts_with(base) {
            continue;
        }
        let table = base
            .iter()
            .try_fold(&mut *tree, |node, k| node.get_mut(*k))
            .and_then(toml::Value::as_table_mut);
        let Some(table) = table else {
            continue;
        };
        let prefix = path[base.len()..].join(".");
        let mut set = Vec::new();
        match value.as_table() {
            Some(sub) if !leaf(value) => flatten(sub, &prefix, &leaf, &mut set),
            _ => set.push((prefix, value.clone())),
        }
        let paths: Vec<String> = set.into_iter().map(|(p, _)| p).collect();
        remove_leaves(table, "", leaf, &paths);
    }
}

/// Removes the leaves of `table` whose dotted paths are in `paths`, and the tables left empty.
fn remove_leaves(table: &mut toml::Table, prefix: &str, leaf: Leaf, paths: &[String]) {
    table.retain(|k, v| {
        let path = joined(prefix, k);
        let is_leaf = leaf(v);
        match v.as_table_mut() {
            Some(sub) if !is_leaf => {
                remove_leaves(sub, &path, leaf, paths);
                !sub.is_empty()
            }
            _ => !paths.contains(&path),
        }
    });
}
