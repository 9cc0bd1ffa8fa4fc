//! Config errors with their place: a message, the byte range in the experiment file (or the `--set`
//! that introduced the value), and an optional hint, rendered like a compiler diagnostic.

use std::fmt;
use std::ops::Range;
use std::path::PathBuf;

/// Where a bad value came from.
#[derive(Debug, Clone, PartialEq)]
pub enum Origin {
    /// A byte range of the experiment file.
    File(Range<usize>),
    /// A `--set KEY=VALUE` argument, quoted as given.
    Set(String),
    /// The file as a whole (a missing section, an unreadable file).
    Nowhere,
}

#[derive(Debug, Clone)]
pub struct Diagnostic {
    pub message: String,
    pub origin: Origin,
    pub help: Option<String>,
}

impl Diagnostic {
    pub fn new(message: impl Into<String>, origin: Origin) -> Self {
        Self {
            message: message.into(),
            origin,
            help: None,
        }
    }

    pub fn with_help(mut self, help: Option<String>) -> Self {
        self.help = help;
        self
    }
}

/// Every problem found in one experiment file, rendered together.
#[derive(Debug)]
pub struct ConfigErrors {
    pub file: PathBuf,
    pub source: String,
    pub diagnostics: Vec<Diagnostic>,
}

impl ConfigErrors {
    fn line_col(&self, offset: usize) -> (usize, usize, &str) {
        let offset = offset.min(self.source.len());
        let before = &self.source[..offset];
        let line_no = before.matches('\n').count() + 1;
        let line_start = before.rfind('\n').map_or(0, |i| i + 1);
        let line_end = self.source[line_start..]
            .find('\n')
            .map_or(self.source.len(), |i| line_start + i);
        let col = self.source[line_start..offset].chars().count() + 1;
        (
            line_no,
            col,
            self.source[line_start..line_end].trim_end_matches('\r'),
        )
    }

    fn render_one(&self, d: &Diagnostic, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "error: {}", d.message)?;
        match &d.origin {
            Origin::File(span) => {
                let (line, col, text) = self.line_col(span.start);
                let width = line.to_string().len();
                let pad = " ".repeat(width);
                writeln!(f, "{pad}--> {}:{line}:{col}", self.file.display())?;
                writeln!(f, "{pad} |")?;
                writeln!(f, "{line} | {text}")?;
                let prefix: String = text.chars().take(col - 1).collect();
                let indent = " ".repeat(console_width(&prefix));
                let span_text = self.source.get(span.clone()).unwrap_or("");
                let first_line = span_text.split('\n').next().unwrap_or("");
                let carets = "^".repeat(console_width(first_line).max(1));
                writeln!(f, "{pad} | {indent}{carets}")?;
            }
            Origin::Set(arg) => writeln!(f, "  --> --set {arg}")?,
            Origin::Nowhere => writeln!(f, "  --> {}", self.file.display())?,
        }
        if let Some(help) = &d.help {
            writeln!(f, "  = help: {help}")?;
        }
        Ok(())
    }
}

/// Columns a string takes in a terminal: CJK characters take two.
fn console_width(s: &str) -> usize {
    s.chars()
        .map(|c| {
            if (c as u32) >= 0x1100 && !c.is_ascii() {
                2
            } else {
                1
            }
        })
        .sum()
}

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, d) in self.diagnostics.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            self.render_one(d, f)?;
        }
        let n = self.diagnostics.len();
        write!(
            f,
            "\n{n} error{} in {}",
            if n == 1 { "" } else { "s" },
            self.file.display()
        )
    }
}

impl std::error::Error for ConfigErrors {}

/// "did you mean" for an unknown name among the accepted ones.
pub fn suggest<'a>(unknown: &str, known: impl IntoIterator<Item = &'a str>) -> Option<String> {
    known
        .into_iter()
        .map(|k| (strsim::jaro_winkler(unknown, k), k))
        .filter(|(score, _)| *score > 0.8)
        .max_by(|a, b| a.0.total_cmp(&b.0))
        .map(|(_, k)| format!("did you mean `{k}`?"))
}
