//! Readers for JSON Lines, CSV/TSV and plain-text files with a field mapping. Every problem names its
//! file and line; bad lines are skipped and counted or stop the run, as `data.on_error` says.

use std::path::PathBuf;
use std::sync::Arc;

use crate::config::data::{Format, OnError, SourceSpec};

/// One text (or text pair) with its label, or a tagged sentence, and the place it came from.
#[derive(Debug, Clone, Default)]
pub struct Example {
    /// For a CoNLL sentence: its tokens joined by spaces.
    pub text: String,
    pub text_pair: Option<String>,
    pub label: Option<String>,
    /// A CoNLL sentence's tokens, one per line of the file from `line` on.
    pub words: Vec<String>,
    /// The tag of each token (labelled splits of CoNLL files only).
    pub tags: Vec<String>,
    pub file: Arc<PathBuf>,
    pub line: usize,
}

/// A line that was skipped, with why.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
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
    /// Every bad line found, so a user fixes them in one pass.
    #[error("{}", list_lines(problems, hint))]
    Lines {
        /// `(file, line, message)`.
        problems: Vec<(PathBuf, usize, String)>,
        hint: String,
    },
}

/// How many bad lines an error lists before it summarises the rest.
const SHOWN: usize = 5;

fn list_lines(problems: &[(PathBuf, usize, String)], hint: &str) -> String {
    let mut out: Vec<String> = problems
        .iter()
        .take(SHOWN)
        .map(|(file, line, msg)| format!("{}:{line}: {msg}", file.display()))
        .collect();
    if problems.len() > SHOWN {
        out.push(format!("… and {} more bad lines", problems.len() - SHOWN));
    }
    if !hint.is_empty() {
        out.push(hint.to_string());
    }
    out.join("\n")
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

/// `resolve` turns an entry of `spec.paths` into the file to open (data root, `{split}`).
pub fn read_source(
    spec: &SourceSpec,
    resolve: &dyn Fn(&str) -> PathBuf,
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
        let file = Arc::new(resolve(p));
        let mut sink = Sink {
            file: file.clone(),
            on_error,
            split: &mut split,
            limit: spec.limit,
            errors: Vec::new(),
        };
        match spec.format.resolve(&file) {
            Format::Csv => read_delimited(&mut sink, &fields, b',')?,
            Format::Tsv => read_delimited(&mut sink, &fields, b'\t')?,
            Format::Jsonl => read_jsonl(&mut sink, &fields)?,
            Format::Conll => read_conll(&mut sink, labelled)?,
            Format::Text | Format::Auto => read_text(&mut sink)?,
        }
        if !sink.errors.is_empty() {
            return Err(DataError::Lines {
                problems: sink
                    .errors
                    .into_iter()
                    .map(|(line, msg)| (file.to_path_buf(), line, msg))
                    .collect(),
                hint: "(set data.on_error = \"skip\" to skip and count such lines instead)".into(),
            });
        }
        if sink.full() {
            break;
        }
    }
    Ok(split)
}

/// Collects examples from one file, applying the error policy and the limit.
struct Sink<'a> {
    file: Arc<PathBuf>,
    on_error: OnError,
    split: &'a mut Split,
    limit: Option<usize>,
    /// Bad lines under `on_error = "error"`: reading goes on so they are all reported together.
    errors: Vec<(usize, String)>,
}

impl Sink<'_> {
    fn full(&self) -> bool {
        self.limit.is_some_and(|l| self.split.examples.len() >= l)
    }

    /// Records a bad line: kept for the error report, or skipped and counted.
    fn bad(&mut self, line: usize, message: String) {
        match self.on_error {
            OnError::Error => self.errors.push((line, message)),
            OnError::Skip => self.split.skipped.push(Skipped {
                file: self.file.display().to_string(),
                line,
                reason: message,
            }),
        }
    }

    fn push(&mut self, line: usize, text: String, pair: Option<String>, label: Option<String>) {
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
            ..Example::default()
        });
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
        sink.push(i + 1, line.trim_end_matches('\r').to_string(), None, None);
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
                sink.bad(line_no, "expected a JSON object".into());
                continue;
            }
            Err(e) => {
                sink.bad(line_no, format!("invalid JSON: {e}"));
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
            Ok((text, pair, label)) => sink.push(line_no, text, pair, label),
            Err(msg) => sink.bad(line_no, msg),
        }
    }
    Ok(())
}

/// Whether `tag` is `O` or a one-letter prefix (B, I, M, E, S), `-` and an entity type. Which
/// prefixes a file may use is the scheme's business (`Datasets::load`).
fn tag_syntax_ok(tag: &str) -> bool {
    tag == "O"
        || tag
            .split_once('-')
            .is_some_and(|(p, ty)| matches!(p, "B" | "I" | "M" | "E" | "S") && !ty.is_empty())
}

/// Ends a CoNLL sentence: kept unless one of its lines was bad.
fn flush(
    sink: &mut Sink,
    words: &mut Vec<String>,
    tags: &mut Vec<String>,
    start: usize,
    bad: bool,
) {
    if !words.is_empty() && !bad && !sink.full() {
        sink.split.examples.push(Example {
            text: words.join(" "),
            words: std::mem::take(words),
            tags: std::mem::take(tags),
            file: sink.file.clone(),
            line: start,
            ..Example::default()
        });
    }
    words.clear();
    tags.clear();
}

/// CoNLL: a token and a tag per line (first and last column, split on ASCII whitespace so a
/// full-width space stays a token), blank lines between sentences, `-DOCSTART-` lines ignored,
/// LF or CRLF. A bad line makes its whole sentence bad: dropping one token would shift the
/// entities around it.
fn read_conll(sink: &mut Sink, labelled: bool) -> Result<(), DataError> {
    let content = sink.read_to_string()?;
    let (mut words, mut tags) = (Vec::new(), Vec::new());
    let (mut start, mut bad) = (0, false);
    for (i, line) in content.lines().enumerate() {
        if sink.full() {
            break;
        }
        let line_no = i + 1;
        let line = line.trim_end_matches('\r');
        let columns: Vec<&str> = line.split_ascii_whitespace().collect();
        if columns.is_empty() || columns[0] == "-DOCSTART-" {
            flush(sink, &mut words, &mut tags, start, bad);
            bad = false;
            continue;
        }
        if words.is_empty() && !bad {
            start = line_no;
        }
        let tag = columns[columns.len() - 1];
        if labelled && columns.len() < 2 {
            sink.bad(
                line_no,
                format!("expected a token and its tag, found only {line:?}"),
            );
            bad = true;
        } else if labelled && !tag_syntax_ok(tag) {
            sink.bad(
                line_no,
                format!(
                    "tag {tag:?} is neither `O` nor a B-/I-/M-/E-/S- prefix with an entity type"
                ),
            );
            bad = true;
        }
        words.push(columns[0].to_string());
        if labelled {
            tags.push(tag.to_string());
        }
    }
    flush(sink, &mut words, &mut tags, start, bad);
    Ok(())
}

/// 1-based line number of the record starting at a byte offset. After a CRLF row the csv reader
/// reports the next row as starting at the `\n`, so line breaks at the offset are skipped first.
fn line_at(content: &str, byte: u64) -> usize {
    let bytes = content.as_bytes();
    let mut start = (byte as usize).min(bytes.len());
    while start < bytes.len() && matches!(bytes[start], b'\r' | b'\n') {
        start += 1;
    }
    bytes[..start].iter().filter(|b| **b == b'\n').count() + 1
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
                let line = r.position().map_or(0, |p| line_at(&content, p.byte()));
                let cell = |c: usize| r.get(c).unwrap_or("").to_string();
                sink.push(
                    line,
                    cell(text_col),
                    pair_col.map(cell),
                    label_col.map(cell),
                );
            }
            Err(e) => {
                let line = e.position().map_or(0, |p| line_at(&content, p.byte()));
                sink.bad(line, format!("malformed row: {e}"));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn spec(path: &str, format: Format, label: Option<&str>) -> SourceSpec {
        SourceSpec {
            paths: vec![path.into()],
            format,
            text: "text".into(),
            text_pair: None,
            label: label.map(str::to_string),
            limit: None,
        }
    }

    fn write(dir: &Path, name: &str, content: &str) {
        std::fs::write(dir.join(name), content).unwrap();
    }

    #[test]
    fn csv_with_quotes_and_crlf() {
        let dir = tempfile::tempdir().unwrap();
        write(
            dir.path(),
            "a.csv",
            "id,text,label\r\n1,\"hello, world\",pos\r\n2,\"say \"\"hi\"\"\",neg\r\n",
        );
        let s = read_source(
            &spec("a.csv", Format::Auto, Some("label")),
            &|p| dir.path().join(p),
            OnError::Error,
            true,
        )
        .unwrap();
        assert_eq!(s.examples.len(), 2);
        assert_eq!(s.examples[0].text, "hello, world");
        assert_eq!(s.examples[1].text, "say \"hi\"");
        assert_eq!(s.examples[1].label.as_deref(), Some("neg"));
        assert_eq!(s.examples[1].line, 3);
    }

    #[test]
    fn tsv_missing_column_names_the_columns() {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), "a.tsv", "sentence\tlabel\nok\t1\n");
        let err = read_source(
            &spec("a.tsv", Format::Auto, Some("label")),
            &|p| dir.path().join(p),
            OnError::Skip,
            true,
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.ends_with("a.tsv:1: no column `text` in the header (columns: sentence, label)"),
            "{err}"
        );
    }

    #[test]
    fn text_files_skip_and_count_empty_lines() {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), "c.txt", "first\r\n\nthird\n");
        let s = read_source(
            &spec("c.txt", Format::Auto, None),
            &|p| dir.path().join(p),
            OnError::Skip,
            false,
        )
        .unwrap();
        assert_eq!(
            s.examples
                .iter()
                .map(|e| e.text.as_str())
                .collect::<Vec<_>>(),
            ["first", "third"]
        );
        assert_eq!(s.skipped.len(), 1);
        assert_eq!(s.skipped[0].line, 2);
        assert_eq!(s.examples[1].line, 3);
    }

    #[test]
    fn jsonl_numbers_become_labels_and_limit_stops_early() {
        let dir = tempfile::tempdir().unwrap();
        write(
            dir.path(),
            "d.json",
            "{\"text\":\"a\",\"label\":100}\n{\"text\":\"b\",\"label\":101}\n",
        );
        let mut sp = spec("d.json", Format::Auto, Some("label"));
        sp.limit = Some(1);
        let s = read_source(&sp, &|p| dir.path().join(p), OnError::Error, true).unwrap();
        assert_eq!(s.examples.len(), 1);
        assert_eq!(s.examples[0].label.as_deref(), Some("100"));
    }

    #[test]
    fn conll_reads_sentences_with_crlf_or_lf_and_names_bad_lines() {
        let dir = tempfile::tempdir().unwrap();
        // CRLF, a DOCSTART line, extra middle columns, a full-width space token, trailing blank lines.
        write(
            dir.path(),
            "a.bmes",
            "-DOCSTART- O\r\n\r\n高 B-NAME\r\n勇 E-NAME\r\n，\tx\tO\r\n\r\n\u{3000} O\r\n男 S-GENDER\r\n\r\n\r\n",
        );
        let s = read_source(
            &spec("a.bmes", Format::Auto, None),
            &|p| dir.path().join(p),
            OnError::Error,
            true,
        )
        .unwrap();
        assert_eq!(s.examples.len(), 2);
        let first = &s.examples[0];
        assert_eq!(first.words, ["高", "勇", "，"]);
        assert_eq!(first.tags, ["B-NAME", "E-NAME", "O"]);
        assert_eq!((first.text.as_str(), first.line), ("高 勇 ，", 3));
        assert_eq!(s.examples[1].words, ["\u{3000}", "男"]);
        assert_eq!(s.examples[1].line, 7);
        // Unlabelled (a corpus): tags are not kept.
        let corpus = read_source(
            &spec("a.bmes", Format::Conll, None),
            &|p| dir.path().join(p),
            OnError::Error,
            false,
        )
        .unwrap();
        assert!(corpus.examples.iter().all(|e| e.tags.is_empty()));

        // LF; a line without a tag and a malformed tag: both named, their sentences left out.
        write(
            dir.path(),
            "b.conll",
            "EU B-ORG\nrejects O\n\nGerman\ncall O\n\nPeter B-PER\nBlackburn PER\n\nok O\n",
        );
        let b = spec("b.conll", Format::Auto, None);
        let err = read_source(&b, &|p| dir.path().join(p), OnError::Error, true)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("b.conll:4: expected a token and its tag"),
            "{err}"
        );
        assert!(err.contains("b.conll:8: tag \"PER\" is neither"), "{err}");
        let s = read_source(&b, &|p| dir.path().join(p), OnError::Skip, true).unwrap();
        let kept: Vec<usize> = s.examples.iter().map(|e| e.line).collect();
        assert_eq!(kept, [1, 10]);
        assert_eq!(s.skipped.len(), 2);
    }

    #[test]
    fn invalid_utf8_names_its_line() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("e.txt"), b"fine\nbad \xff byte\n").unwrap();
        let err = read_source(
            &spec("e.txt", Format::Text, None),
            &|p| dir.path().join(p),
            OnError::Error,
            false,
        )
        .unwrap_err()
        .to_string();
        assert!(err.ends_with("e.txt:2: not valid UTF-8"), "{err}");
    }
}
