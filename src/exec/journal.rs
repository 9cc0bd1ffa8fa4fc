//! The run journal, `journal.jsonl`: one JSON line per event (a trial starts, a stage is reused,
//! resumes, checkpoints, finishes, diverges or fails), appended and flushed as it happens. It is a
//! log for people and tests; the cache, not the journal, decides what is already done. A line cut
//! short by a kill is skipped when reading.

use std::io::Write;
use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Event {
    pub unix_ms: u64,
    pub pid: u32,
    pub trial: String,
    pub stage: String,
    /// `start`, `cached`, `resume`, `checkpoint`, `done`, `diverged`, `failed`.
    pub event: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub step: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
}

pub struct Journal {
    file: Option<std::fs::File>,
}

impl Journal {
    pub fn open(run_dir: &Path) -> std::io::Result<Self> {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(run_dir.join("journal.jsonl"))?;
        Ok(Self { file: Some(file) })
    }

    /// Appends one event as one write; a journal that cannot be written is not worth stopping for.
    pub fn log(&mut self, trial: &str, stage: &str, event: &str) -> Entry<'_> {
        Entry {
            journal: self,
            event: Event {
                unix_ms: SystemTime::now()
                    .duration_since(UNIX_EPOCH)
                    .map_or(0, |d| d.as_millis() as u64),
                pid: std::process::id(),
                trial: trial.into(),
                stage: stage.into(),
                event: event.into(),
                step: None,
                key: None,
                detail: None,
            },
        }
    }
}

/// An event being written; it is appended when dropped.
pub struct Entry<'a> {
    journal: &'a mut Journal,
    event: Event,
}

impl Entry<'_> {
    pub fn step(mut self, step: usize) -> Self {
        self.event.step = Some(step);
        self
    }
    pub fn key(mut self, key: &str) -> Self {
        self.event.key = Some(key.into());
        self
    }
    pub fn detail(mut self, detail: impl Into<String>) -> Self {
        self.event.detail = Some(detail.into());
        self
    }
}

impl Drop for Entry<'_> {
    fn drop(&mut self) {
        let Some(file) = self.journal.file.as_mut() else {
            return;
        };
        if let Ok(mut line) = serde_json::to_string(&self.event) {
            line.push('\n');
            // Array tasks on several hosts append to one journal; on a network filesystem an
            // append is one write only under a lock.
            let locked = file.lock().is_ok();
            let _ = file.write_all(line.as_bytes());
            if locked {
                let _ = file.unlock();
            }
        }
    }
}

/// Every complete event of a run directory's journal, in order.
pub fn read(run_dir: &Path) -> Vec<Event> {
    std::fs::read_to_string(run_dir.join("journal.jsonl"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}
