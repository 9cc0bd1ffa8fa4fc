//! The experiment file: parse the TOML (keeping every key's place), apply `--set` overrides, check every
//! value, and hand out an `Experiment` whose sections hold only valid values.
//!
//! Errors are collected, not returned one at a time: a serde error is recorded with its span, the entry
//! it names is blanked out of the text (offsets preserved) and the file parsed again, so one run of
//! `xrun validate` lists every unknown key, wrong type and bad range at once.

pub mod cluster;
pub mod continual;
pub mod data;
mod diagnostic;
pub mod experiment;
pub mod model;
pub mod sweep;
pub mod train;
mod validate;

use std::ops::Range;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use toml_edit::{ImDocument, Item};

use cluster::ClusterSection;
use data::DataSection;
pub use diagnostic::{suggest, ConfigErrors, Diagnostic, Origin};
use experiment::ExperimentSection;
use model::{ModelSection, TokenizerSection};
use sweep::{ReportSection, SweepSection};
use train::{EvalSection, FinetuneSection, Optim, PretrainSection, FINETUNE_LR, PRETRAIN_LR};

/// The sections of an experiment file, as `RawDoc` names them.
const SECTIONS: [&str; 10] = [
    "experiment",
    "data",
    "tokenizer",
    "model",
    "pretrain",
    "finetune",
    "eval",
    "sweep",
    "report",
    "cluster",
];

/// The whole file as serde sees it. Unknown sections and keys are errors.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawDoc {
    pub experiment: ExperimentSection,
    pub data: DataSection,
    #[serde(default)]
    pub tokenizer: TokenizerSection,
    #[serde(default)]
    pub model: ModelSection,
    #[serde(default)]
    pub pretrain: PretrainSection,
    #[serde(default)]
    pub finetune: FinetuneSection,
    #[serde(default)]
    pub eval: EvalSection,
    #[serde(default)]
    pub sweep: SweepSection,
    #[serde(default)]
    pub report: ReportSection,
    #[serde(default, skip_serializing_if = "ClusterSection::is_empty")]
    pub cluster: ClusterSection,
    /// A sequence of fine-tuning tasks on one backbone (absent: one task).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub continual: Option<continual::ContinualSection>,
}

/// A checked experiment: every value in range, every input file present.
#[derive(Debug, Clone)]
pub struct Experiment {
    /// The experiment file as given on the command line.
    pub file: PathBuf,
    /// Folder every data path is relative to (`data.root`, `XRUN_DATA_ROOT` or `--set data.root`).
    pub data_root: PathBuf,
    pub raw: RawDoc,
    /// The file's text and the `--set` overrides, kept so that each trial of a sweep can be checked
    /// again with errors pointing into the same file.
    pub source: String,
    pub sets: Vec<String>,
}

impl Experiment {
    pub fn run_dir(&self) -> PathBuf {
        Path::new(&self.raw.experiment.output_dir).join(&self.raw.experiment.name)
    }

    pub fn data_path(&self, p: &str) -> PathBuf {
        self.data_root
            .join(fill_split(p, self.raw.data.split.as_ref()))
    }

    /// Where a dotted key is written in the file; the nearest written table above it otherwise
    /// (quoted keys such as `"pretrain.objective"` hold dots of their own).
    pub fn origin_of(&self, path: &str) -> Origin {
        let places = Places {
            doc: self.source.parse::<ImDocument<String>>().ok(),
            sets: &[],
            assigned: Vec::new(),
        };
        let parts: Vec<&str> = path.split('.').collect();
        (1..=parts.len())
            .rev()
            .map(|n| places.of(&parts[..n].join(".")))
            .find(|o| !matches!(o, Origin::Nowhere))
            .unwrap_or(Origin::Nowhere)
    }

    /// `model.init`'s Hugging Face checkpoint directory, relative to the experiment file.
    pub fn hf_init(&self) -> Option<PathBuf> {
        let init = self.raw.model.init.as_ref()?;
        Some(self.file.parent().unwrap_or(Path::new("")).join(&init.hf))
    }

    /// Where stage outputs are cached: `experiment.cache_dir`, else `<output_dir>/.cache`.
    pub fn cache_dir(&self) -> PathBuf {
        match &self.raw.experiment.cache_dir {
            Some(dir) => PathBuf::from(dir),
            None => Path::new(&self.raw.experiment.output_dir).join(".cache"),
        }
    }

    /// How the GPU backends are set up for this experiment.
    pub fn gpu_setup(&self) -> crate::train::backend::GpuSetup {
        crate::train::backend::GpuSetup {
            cache_dir: self.cache_dir(),
            autotune: self.raw.experiment.autotune,
            pad_multiple: self.raw.experiment.pad_multiple,
        }
    }

    pub fn pretrain_optim(&self) -> Optim {
        self.raw.pretrain.optim.resolve(PRETRAIN_LR)
    }

    pub fn finetune_optim(&self) -> Optim {
        self.raw.finetune.optim.resolve(FINETUNE_LR)
    }

    /// The file as it ran: overrides applied, defaults written out.
    pub fn resolved_toml(&self) -> String {
        let mut out = format!(
            "# Resolved by xrun {} from {}\n# data root: {}\n\n",
            env!("CARGO_PKG_VERSION"),
            self.file.display(),
            self.data_root.display()
        );
        out.push_str(&toml::to_string_pretty(&self.raw).unwrap_or_default());
        out
    }
}

/// A split value as it appears in paths and trial ids: `0`, `all`.
pub fn split_label(v: &toml::Value) -> String {
    match v {
        toml::Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// Replaces `{split}` in a data path.
pub fn fill_split(path: &str, split: Option<&toml::Value>) -> String {
    match split {
        Some(v) => path.replace("{split}", &split_label(v)),
        None => path.to_string(),
    }
}

/// Checks a sweep trial: the base file with `assigned` values written over it. Errors point at the
/// sweep entry that assigned the bad value.
pub fn check_trial(
    base: &Experiment,
    raw: RawDoc,
    assigned: Vec<(String, Origin)>,
) -> Result<Experiment, ConfigErrors> {
    let doc = base.source.parse::<ImDocument<String>>().ok();
    let places = Places {
        doc,
        sets: &base.sets,
        assigned,
    };
    let mut diags = Vec::new();
    let exp = validate::check(&base.file, raw, &places, &mut diags);
    match exp {
        Some(mut exp) if diags.is_empty() => {
            exp.source = base.source.clone();
            exp.sets = base.sets.clone();
            exp.data_root = base.data_root.clone();
            Ok(exp)
        }
        _ => Err(ConfigErrors {
            file: base.file.clone(),
            source: base.source.clone(),
            diagnostics: diags,
        }),
    }
}

/// Reads, overrides and checks an experiment file. `sets` are `KEY=VALUE` strings.
pub fn load(file: &Path, sets: &[String]) -> Result<Experiment, ConfigErrors> {
    let source = std::fs::read_to_string(file).map_err(|e| ConfigErrors {
        file: file.to_path_buf(),
        source: String::new(),
        diagnostics: vec![Diagnostic::new(
            format!("cannot read the experiment file: {e}"),
            Origin::Nowhere,
        )],
    })?;
    let mut diags = Vec::new();
    let parsed = parse_collecting(&source, &mut diags);
    let doc = source.parse::<ImDocument<String>>().ok();
    let places = Places {
        doc,
        sets,
        assigned: Vec::new(),
    };
    let exp = parsed.and_then(|raw| {
        let raw = apply_sets(raw, sets, &mut diags);
        validate::check(file, raw, &places, &mut diags)
    });
    match exp {
        Some(mut exp) if diags.is_empty() => {
            exp.source = source;
            exp.sets = sets.to_vec();
            Ok(exp)
        }
        _ => Err(ConfigErrors {
            file: file.to_path_buf(),
            source,
            diagnostics: diags,
        }),
    }
}

/// Deserializes `source`, recording each serde error and retrying without the entry it names.
/// Returns `None` only when no retry could get past an error (a syntax error, a missing section).
fn parse_collecting(source: &str, diags: &mut Vec<Diagnostic>) -> Option<RawDoc> {
    let mut text = source.to_string();
    let mut blanked: Vec<String> = Vec::new();
    for _ in 0..64 {
        let doc = match text.parse::<ImDocument<String>>() {
            Ok(doc) => doc,
            Err(e) => {
                let origin = e.span().map_or(Origin::Nowhere, Origin::File);
                diags.push(Diagnostic::new(
                    format!("invalid TOML: {}", e.message().trim()),
                    origin,
                ));
                return None;
            }
        };
        let entries = entries(&doc);
        let err = match toml_edit::de::from_document::<RawDoc>(doc) {
            // Entries blanked after an error fall back to their defaults, so the range checks
            // still run on everything else and report in the same pass.
            Ok(raw) => return Some(raw),
            Err(e) => e,
        };
        let message = err.message().trim().to_string();
        // A missing section is missing from the document, not from the table the span lands in.
        let missing_section = missing_field(&message).is_some_and(|f| SECTIONS.contains(&f));
        let entry = err
            .span()
            .filter(|_| !missing_section)
            .and_then(|s| innermost(&entries, &s));
        if let Some(field) = missing_field(&message) {
            // A required key we blanked after its own error: already reported.
            if blanked.iter().any(|b| b == field) {
                return None;
            }
        }
        // An unknown key is shown at the key; a bad value at the value.
        let key_error = message.starts_with("unknown field");
        let origin = match (&entry, err.span().filter(|_| !missing_section)) {
            (Some(e), _) if key_error => {
                Origin::File(e.key_span.clone().unwrap_or(e.range.clone()))
            }
            (_, Some(span)) => Origin::File(span),
            (Some(e), None) => Origin::File(e.range.clone()),
            (None, None) => Origin::Nowhere,
        };
        let path = entry.map(|e| e.path.join(".")).unwrap_or_default();
        diags.push(humanize(&message, &path, origin));
        match entry {
            Some(e) => {
                blanked.push(e.path.last().cloned().unwrap_or_default());
                blank_lines(&mut text, &e.range);
            }
            None => return None,
        }
    }
    None
}

/// One key of the document with the bytes its key and value take.
struct Entry {
    path: Vec<String>,
    key_span: Option<Range<usize>>,
    range: Range<usize>,
}

fn entries(doc: &ImDocument<String>) -> Vec<Entry> {
    let mut out = Vec::new();
    walk(doc.as_table(), &mut Vec::new(), &mut out);
    out
}

fn walk(table: &dyn toml_edit::TableLike, prefix: &mut Vec<String>, out: &mut Vec<Entry>) {
    for (key, item) in table.iter() {
        let Some((k, _)) = table.get_key_value(key) else {
            continue;
        };
        prefix.push(key.to_string());
        let start = out.len();
        if let Some(sub) = item.as_table_like() {
            walk(sub, prefix, out);
        }
        let mut spans: Vec<Range<usize>> = k.span().into_iter().chain(item.span()).collect();
        spans.extend(out[start..].iter().map(|e| e.range.clone()));
        if let (Some(lo), Some(hi)) = (
            spans.iter().map(|s| s.start).min(),
            spans.iter().map(|s| s.end).max(),
        ) {
            out.push(Entry {
                path: prefix.clone(),
                key_span: k.span(),
                range: lo..hi,
            });
        }
        prefix.pop();
    }
}

fn innermost<'a>(entries: &'a [Entry], span: &Range<usize>) -> Option<&'a Entry> {
    entries
        .iter()
        .filter(|e| e.range.contains(&span.start))
        .min_by_key(|e| e.range.len())
}

/// Replaces whole lines with spaces, keeping every byte offset and line number.
fn blank_lines(text: &mut String, range: &Range<usize>) {
    let start = text[..range.start].rfind('\n').map_or(0, |i| i + 1);
    let end = text[range.end.min(text.len())..]
        .find('\n')
        .map_or(text.len(), |i| range.end + i);
    let blanked: String = text[start..end]
        .bytes()
        .map(|b| {
            if b == b'\n' || b == b'\r' {
                b as char
            } else {
                ' '
            }
        })
        .collect();
    text.replace_range(start..end, &blanked);
}

fn missing_field(message: &str) -> Option<&str> {
    message
        .strip_prefix("missing field `")
        .and_then(|rest| rest.split('`').next())
}

/// Turns serde's wording into ours and adds a "did you mean".
fn humanize(message: &str, path: &str, origin: Origin) -> Diagnostic {
    let quoted = |s: &str| -> Vec<String> {
        s.split('`')
            .skip(1)
            .step_by(2)
            .map(str::to_string)
            .collect()
    };
    let section = path.rsplit_once('.').map_or("", |(s, _)| s);
    let in_section = if section.is_empty() {
        "at the top level".to_string()
    } else {
        format!("in [{section}]")
    };
    for (prefix, what) in [
        ("unknown field", "unknown key"),
        ("unknown variant", "unknown value"),
    ] {
        if message.starts_with(prefix) {
            let names = quoted(message);
            let (bad, known) = names.split_first().map_or(("", &[][..]), |(b, k)| (b, k));
            let help = suggest(bad, known.iter().map(String::as_str)).or_else(|| {
                (!known.is_empty()).then(|| format!("expected one of: {}", known.join(", ")))
            });
            let help = misplaced_optim_key(bad, known).or(help);
            let msg = if what == "unknown key" && section.is_empty() {
                format!("unknown section [{bad}]")
            } else if what == "unknown key" {
                format!("{what} `{bad}` {in_section}")
            } else {
                format!("{what} `{bad}` for `{path}`")
            };
            return Diagnostic::new(msg, origin).with_help(help);
        }
    }
    if let Some(field) = missing_field(message) {
        let msg = if path.is_empty() {
            format!("missing section [{field}]")
        } else {
            format!("missing key `{field}` in [{path}]")
        };
        return Diagnostic::new(msg, origin);
    }
    let msg = if path.is_empty() {
        message.to_string()
    } else {
        format!("`{path}`: {message}")
    };
    Diagnostic::new(msg, origin)
}

/// `lr = …` written in [finetune] instead of [finetune.optim] is the commonest slip; say so.
fn misplaced_optim_key(bad: &str, known: &[String]) -> Option<String> {
    (known.iter().any(|k| k == "optim") && train::OPTIM_KEYS.contains(&bad)).then(|| {
        format!("`{bad}` belongs in the `optim` table of this section, e.g. [finetune.optim]")
    })
}

/// Writes `value` at a dotted `path` of `raw` and reads the result back, as `--set` does.
/// On error, the diagnostic has no origin yet: the caller knows where the value came from.
pub fn assign(raw: &RawDoc, path: &str, value: toml::Value) -> Result<RawDoc, Diagnostic> {
    let mut tree =
        toml::Value::try_from(raw).map_err(|e| Diagnostic::new(e.to_string(), Origin::Nowhere))?;
    let parts: Vec<&str> = path.split('.').collect();
    set_path(&mut tree, &parts, value).map_err(|m| Diagnostic::new(m, Origin::Nowhere))?;
    tree.try_into::<RawDoc>()
        .map_err(|e| humanize(e.message().trim(), path, Origin::Nowhere))
}

/// Whether `path` names a key of the schema, set or not (an unset option has no value to look up).
pub fn is_key(raw: &RawDoc, path: &str) -> bool {
    if lookup(raw, path).is_some() {
        return true;
    }
    match assign(raw, path, toml::Value::Integer(0)) {
        Ok(_) => true,
        Err(d) => {
            !d.message.starts_with("unknown key") && !d.message.starts_with("unknown section")
        }
    }
}

/// The value at a dotted path of the resolved config, if there is one.
pub fn lookup(raw: &RawDoc, path: &str) -> Option<toml::Value> {
    let tree = toml::Value::try_from(raw).ok()?;
    let mut node = &tree;
    for part in path.split('.') {
        node = node.as_table()?.get(part)?;
    }
    Some(node.clone())
}

/// Applies `--set KEY=VALUE` one at a time, so each bad one is reported against itself.
fn apply_sets(raw: RawDoc, sets: &[String], diags: &mut Vec<Diagnostic>) -> RawDoc {
    let mut raw = raw;
    for arg in sets {
        let origin = Origin::Set(arg.clone());
        let Some((key, value)) = arg.split_once('=') else {
            diags.push(Diagnostic::new("expected KEY=VALUE", origin));
            continue;
        };
        let path = match set_key(key) {
            Ok(path) => path,
            Err(msg) => {
                diags.push(Diagnostic::new(msg, origin));
                continue;
            }
        };
        let path: Vec<&str> = path.iter().map(String::as_str).collect();
        let value = parse_value(value.trim());
        let Ok(mut tree) = toml::Value::try_from(&raw) else {
            continue;
        };
        sweep::forget_other_spellings(&mut tree, &path, &value);
        if let Err(msg) = set_path(&mut tree, &path, value) {
            diags.push(Diagnostic::new(msg, origin));
            continue;
        }
        match tree.try_into::<RawDoc>() {
            Ok(next) => raw = next,
            Err(e) => {
                let d = humanize(e.message().trim(), key.trim(), origin);
                diags.push(d);
            }
        }
    }
    raw
}

/// The parts of a `--set` key, read as a TOML dotted key, so a quoted part keeps its dots:
/// `sweep.grid."pretrain.objective"` is the grid entry `pretrain.objective`.
fn set_key(key: &str) -> Result<Vec<String>, String> {
    let key = key.trim();
    toml_edit::Key::parse(key)
        .map(|parts| parts.iter().map(|k| k.get().to_string()).collect())
        .map_err(|_| {
            format!(
                "`{key}` is not a TOML key: bare words (letters, digits, `_`, `-`) or quoted \
                 strings joined by dots, e.g. `finetune.optim.lr` or `sweep.grid.\"finetune.optim.lr\"`"
            )
        })
}

/// `1e-3` → float, `[1, 2]` → array, `ar` → the string "ar".
fn parse_value(text: &str) -> toml::Value {
    format!("v = {text}")
        .parse::<toml::Table>()
        .ok()
        .and_then(|mut t| t.remove("v"))
        .unwrap_or_else(|| toml::Value::String(text.to_string()))
}

fn set_path(tree: &mut toml::Value, path: &[&str], value: toml::Value) -> Result<(), String> {
    let (last, parents) = path.split_last().ok_or("empty key")?;
    let mut node = tree;
    for (i, part) in parents.iter().enumerate() {
        let table = node
            .as_table_mut()
            .ok_or_else(|| format!("`{}` is not a table", parents[..i].join(".")))?;
        node = table
            .entry(part.to_string())
            .or_insert_with(|| toml::Value::Table(Default::default()));
    }
    let table = node
        .as_table_mut()
        .ok_or_else(|| format!("`{}` is not a table", parents.join(".")))?;
    table.insert(last.to_string(), value);
    Ok(())
}

/// Finds where a key's value came from, for errors found after parsing.
pub struct Places<'a> {
    doc: Option<ImDocument<String>>,
    sets: &'a [String],
    /// Keys a sweep assigned, with the place of the sweep entry.
    assigned: Vec<(String, Origin)>,
}

impl Places<'_> {
    pub fn of(&self, path: &str) -> Origin {
        if let Some((_, origin)) = self.assigned.iter().find(|(k, _)| k == path) {
            return origin.clone();
        }
        let set = self.sets.iter().rev().find(|s| {
            s.split_once('=').is_some_and(|(k, _)| {
                let k = set_key(k).map_or_else(|_| k.trim().to_string(), |p| p.join("."));
                k == path || path.starts_with(&format!("{k}."))
            })
        });
        if let Some(s) = set {
            return Origin::Set(s.clone());
        }
        let Some(doc) = &self.doc else {
            return Origin::Nowhere;
        };
        let mut item: &Item = doc.as_item();
        for part in path.split('.') {
            let next = match part.parse::<usize>() {
                Ok(i) => item.get(i),
                Err(_) => item.get(part),
            };
            match next {
                Some(next) => item = next,
                None => return Origin::Nowhere,
            }
        }
        item.span().map_or(Origin::Nowhere, Origin::File)
    }

    pub fn is_set(&self, path: &str) -> bool {
        !matches!(self.of(path), Origin::Nowhere)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Keys serde writes for a value, in order.
    fn keys<T: Serialize>(value: &T) -> Vec<String> {
        let table = toml::Value::try_from(value).expect("serializes");
        table.as_table().expect("a table").keys().cloned().collect()
    }

    /// The hand-kept name lists must match the structs serde reads.
    #[test]
    fn section_and_optim_key_lists_match_the_schema() {
        let raw: RawDoc = toml::from_str(
            "[experiment]\nname = \"x\"\n[data.train]\npaths = [\"t.json\"]\nlabel = \"l\"\n\
             [cluster.slurm]\npartition = \"p\"\n",
        )
        .expect("a minimal file parses");
        let mut sections = keys(&raw);
        sections.sort();
        let mut expected: Vec<String> = SECTIONS.iter().map(|s| s.to_string()).collect();
        expected.sort();
        assert_eq!(sections, expected);

        let full = train::OptimSection {
            lr: Some(1e-3),
            betas: Some([0.9, 0.99]),
            eps: Some(1e-8),
            weight_decay: Some(0.0),
            warmup_fraction: Some(0.1),
            schedule: Some(train::Schedule::Cosine),
            clip_norm: Some(1.0),
        };
        let mut optim = keys(&full);
        optim.sort();
        let mut expected: Vec<String> = train::OPTIM_KEYS.iter().map(|s| s.to_string()).collect();
        expected.sort();
        assert_eq!(optim, expected);
    }
}
