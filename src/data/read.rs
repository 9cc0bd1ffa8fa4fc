//! Readers for JSON Lines, CSV/TSV and plain-text files with a field mapping. Every problem names its
//! file and line; bad lines are skipped and counted or stop the run, as `data.on_error` says.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::config::data::{Format, OnError, SourceSpec};

/// One text (or text pair) with its label, and the place it came from.
#[derive(Debug, Clone)]
pub struct Example {
    pub text: String,
    pub text_pair: Option<String>,
    pub label: Option<String>,
    pub file: Arc<PathBuf>,
    pub line: usize,
}

/// A line that was skipped, with why.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Skipped {
    pub file: String,
    pub line: usize,
    pub reason: String,
}

#[derive(Debug, thiserror::Error)]
pub enum DataError {
    #[error("cannot read {}: {message}", file.display())]
    Io { file: PathBuf, message: String },
    #[error("{}:{line}: {message}", file.display())]
    Line {
        file: PathBuf,
        line: usize,
        message: String,
    },
}

/// What a split read: its examples and the lines it skipped.
#[derive(Debug, Clone, Default)]
pub struct Split {
    pub examples: Vec<Example>,
    pub skipped: Vec<Skipped>,
}

/// The fields to pull out of each record.
struct Fields<'a> {
    text: &'a str,
    pair: Option<&'a str>,
    label: Option<&'a str>,
}

pub fn read_source(
    spec: &SourceSpec,
    root: &Path,
    on_error: OnError,
    labelled: bool,
) -> Result<Split, DataError> {
    let fields = Fields {
        text: &spec.text,
        pair: spec.text_pair.as_deref(),
        label: if labelled {
            spec.label.as_deref()
        } else {
            None
        },
    };
    let mut split = Split::default();
    for p in &spec.paths {
        let file = Arc::new(root.join(p));
        let mut sink = Sink {
            file: file.clone(),
            on_error,
            split: &mut split,
            limit: spec.limit,
        };
        match resolve_format(spec.format, &file) {
            Format::Csv => read_delimited(&mut sink, &fields, b',')?,
            Format::Tsv => read_delimited(&mut sink, &fields, b'\t')?,
            Format::Jsonl => read_jsonl(&mut sink, &fields)?,
            Format::Text | Format::Auto => read_text(&mut sink)?,
        }
        if sink.full() {
            break;
        }
    }
    Ok(split)
}

fn resolve_format(format: Format, file: &Path) -> Format {
    if format != Format::Auto {
        return format;
    }
    match file.extension().and_then(|e| e.to_str()) {
        Some("json" | "jsonl" | "ndjson") => Format::Jsonl,
        Some("csv") => Format::Csv,
        Some("tsv") => Format::Tsv,
        _ => Format::Text,
    }
}

/// Collects examples from one file, applying the error policy and the limit.
struct Sink<'a> {
    file: Arc<PathBuf>,
    on_error: OnError,
    split: &'a mut Split,
    limit: Option<usize>,
}

impl Sink<'_> {
    fn full(&self) -> bool {
        self.limit.is_some_and(|l| self.split.examples.len() >= l)
    }

    fn bad(&mut self, line: usize, message: String) -> Result<(), DataError> {
        match self.on_error {
            OnError::Error => Err(DataError::Line {
                file: self.file.to_path_buf(),
                line,
                message: format!("{message} (set data.on_error = \"skip\" to skip such lines)"),
            }),
            OnError::Skip => {
                self.split.skipped.push(Skipped {
                    file: self.file.display().to_string(),
                    line,
                    reason: message,
                });
                Ok(())
            }
        }
    }

    fn push(
        &mut self,
        line: usize,
        text: String,
        pair: Option<String>,
        label: Option<String>,
    ) -> Result<(), DataError> {
        if text.trim().is_empty() || pair.as_deref().is_some_and(|p| p.trim().is_empty()) {
            return self.bad(line, "empty text".into());
        }
        if label.as_deref().is_some_and(|l| l.trim().is_empty()) {
            return self.bad(line, "empty label".into());
        }
        self.split.examples.push(Example {
            text,
            text_pair: pair,
            label,
            file: self.file.clone(),
            line,
        });
        Ok(())
    }

    fn read_to_string(&self) -> Result<String, DataError> {
        let bytes = std::fs::read(self.file.as_path()).map_err(|e| DataError::Io {
            file: self.file.to_path_buf(),
            message: e.to_string(),
        })?;
        String::from_utf8(bytes).map_err(|e| {
            let upto = &e.as_bytes()[..e.utf8_error().valid_up_to()];
            DataError::Line {
                file: self.file.to_path_buf(),
                line: upto.iter().filter(|b| **b == b'\n').count() + 1,
                message: "not valid UTF-8".into(),
            }
        })
    }
}

fn read_text(sink: &mut Sink) -> Result<(), DataError> {
    let content = sink.read_to_string()?;
    for (i, line) in content.lines().enumerate() {
        if sink.full() {
            break;
        }
        sink.push(i + 1, line.trim_end_matches('\r').to_string(), None, None)?;
    }
    Ok(())
}

fn read_jsonl(sink: &mut Sink, fields: &Fields) -> Result<(), DataError> {
    let content = sink.read_to_string()?;
    for (i, line) in content.lines().enumerate() {
        if sink.full() {
            break;
        }
        let line_no = i + 1;
        let line = line.trim_end_matches('\r');
        if line.trim().is_empty() {
            continue;
        }
        let record = match serde_json::from_str::<serde_json::Value>(line) {
            Ok(serde_json::Value::Object(map)) => map,
            Ok(_) => {
                sink.bad(line_no, "expected a JSON object".into())?;
                continue;
            }
            Err(e) => {
                sink.bad(line_no, format!("invalid JSON: {e}"))?;
                continue;
            }
        };
        let get = |key: &str| -> Result<String, String> {
            match record.get(key) {
                Some(serde_json::Value::String(s)) => Ok(s.clone()),
                Some(v @ (serde_json::Value::Number(_) | serde_json::Value::Bool(_))) => {
                    Ok(v.to_string())
                }
                Some(_) => Err(format!("field `{key}` is not a string or number")),
                None => {
                    let mut keys: Vec<&str> = record.keys().map(String::as_str).collect();
                    keys.sort();
                    Err(format!(
                        "no field `{key}` (fields here: {})",
                        keys.join(", ")
                    ))
                }
            }
        };
        let parsed = (|| {
            let text = get(fields.text)?;
            let pair = fields.pair.map(get).transpose()?;
            let label = fields.label.map(get).transpose()?;
            Ok::<_, String>((text, pair, label))
        })();
        match parsed {
            Ok((text, pair, label)) => sink.push(line_no, text, pair, label)?,
            Err(msg) => sink.bad(line_no, msg)?,
        }
    }
    Ok(())
}

fn read_delimited(sink: &mut Sink, fields: &Fields, delimiter: u8) -> Result<(), DataError> {
    let content = sink.read_to_string()?;
    let mut reader = csv::ReaderBuilder::new()
        .delimiter(delimiter)
        .has_headers(true)
        .flexible(false)
        .from_reader(content.as_bytes());
    let headers = reader
        .headers()
        .map_err(|e| DataError::Line {
            file: sink.file.to_path_buf(),
            line: 1,
            message: format!("cannot read the header row: {e}"),
        })?
        .clone();
    let column = |key: &str| {
        headers
            .iter()
            .position(|h| h.trim() == key)
            .ok_or_else(|| DataError::Line {
                file: sink.file.to_path_buf(),
                line: 1,
                message: format!(
                    "no column `{key}` in the header (columns: {})",
                    headers.iter().collect::<Vec<_>>().join(", ")
                ),
            })
    };
    let text_col = column(fields.text)?;
    let pair_col = fields.pair.map(column).transpose()?;
    let label_col = fields.label.map(column).transpose()?;
    for record in reader.records() {
        if sink.full() {
            break;
        }
        match record {
            Ok(r) => {
                let line = r.position().map_or(0, |p| p.line() as usize);
                let cell = |c: usize| r.get(c).unwrap_or("").to_string();
                sink.push(
                    line,
                    cell(text_col),
                    pair_col.map(cell),
                    label_col.map(cell),
                )?;
            }
            Err(e) => {
                let line = e.position().map_or(0, |p| p.line() as usize);
                sink.bad(line, format!("malformed row: {e}"))?;
            }
        }
    }
    Ok(())
}
