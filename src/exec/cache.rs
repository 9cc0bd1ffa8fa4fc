//! The stage cache: `<cache>/<stage>/<key>/` holds one stage's outputs and a `manifest.json`. An entry
//! is built in a temporary folder and renamed into place, so it either exists whole or not at all.
//! A stage that is running keeps its checkpoints in `<key>.partial/` and holds `<key>.lock`; another
//! xrun that needs the same entry waits for that lock and then reuses the result.

use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::plan::keys::Key;

/// How a cached stage ended. A diverged stage is an outcome too: running it again diverges again.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "lowercase", tag = "status")]
pub enum Status {
    Done,
    Diverged { step: usize, reason: String },
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Manifest {
    pub stage: String,
    pub key: String,
    pub xrun: String,
    pub created_unix: u64,
    /// The trial that built it (`experiment/trial`), for people reading the cache.
    pub built_by: String,
    #[serde(flatten)]
    pub status: Status,
    /// Everything the key hashes.
    pub inputs: serde_json::Value,
}

pub struct Cache {
    pub root: PathBuf,
}

/// Held while a stage builds its entry; dropping it releases the lock.
pub struct Building {
    _lock: std::fs::File,
    pub partial: PathBuf,
}

impl Cache {
    pub fn new(root: PathBuf) -> Self {
        Self { root }
    }

    pub fn entry(&self, stage: &str, key: &Key) -> PathBuf {
        self.root.join(stage).join(&key.hash)
    }

    /// The manifest of a finished entry.
    pub fn done(&self, stage: &str, key: &Key) -> Option<Manifest> {
        let text = std::fs::read_to_string(self.entry(stage, key).join("manifest.json")).ok()?;
        serde_json::from_str(&text).ok()
    }

    /// Whether a killed run left checkpoints of this entry; the step of the newest, if readable.
    pub fn partial_step(&self, stage: &str, key: &Key) -> Option<usize> {
        let dir = self.root.join(stage).join(format!("{}.partial", key.hash));
        crate::train::Checkpoints::latest_step(&dir)
    }

    /// Whether another process holds the entry's lock (it is building it now).
    pub fn busy(&self, stage: &str, key: &Key) -> bool {
        let path = self.root.join(stage).join(format!("{}.lock", key.hash));
        std::fs::OpenOptions::new()
            .write(true)
            .open(path)
            .is_ok_and(|f| f.try_lock().is_err())
    }

    /// Locks the entry for building, waiting while another process builds it. Call `done` again
    /// afterwards: the other process may have finished it meanwhile.
    pub fn begin(
        &self,
        stage: &str,
        key: &Key,
        on_wait: impl FnOnce(),
    ) -> Result<Building, String> {
        let dir = self.root.join(stage);
        std::fs::create_dir_all(&dir)
            .map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
        let path = dir.join(format!("{}.lock", key.hash));
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(|e| format!("cannot open {}: {e}", path.display()))?;
        if file.try_lock().is_err() {
            on_wait();
            file.lock()
                .map_err(|e| format!("cannot lock {}: {e}", path.display()))?;
        }
        Ok(Building {
            _lock: file,
            partial: dir.join(format!("{}.partial", key.hash)),
        })
    }

    /// Publishes an entry: `fill` writes the outputs into a fresh folder, the manifest goes last,
    /// and the folder is renamed into place. The stage's checkpoints are removed afterwards.
    pub fn commit(
        &self,
        stage: &str,
        key: &Key,
        building: Building,
        built_by: &str,
        status: Status,
        fill: impl FnOnce(&Path) -> Result<(), String>,
    ) -> Result<PathBuf, String> {
        let entry = self.entry(stage, key);
        let tmp = self
            .root
            .join(stage)
            .join(format!("{}.tmp-{}", key.hash, std::process::id()));
        let _ = std::fs::remove_dir_all(&tmp);
        std::fs::create_dir_all(&tmp)
            .map_err(|e| format!("cannot create {}: {e}", tmp.display()))?;
        fill(&tmp)?;
        let manifest = Manifest {
            stage: stage.into(),
            key: key.hash.clone(),
            xrun: env!("CARGO_PKG_VERSION").into(),
            created_unix: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
            built_by: built_by.into(),
            status,
            inputs: key.inputs.clone(),
        };
        let json = serde_json::to_string_pretty(&manifest).map_err(|e| e.to_string())?;
        std::fs::write(tmp.join("manifest.json"), json)
            .map_err(|e| format!("cannot write the manifest in {}: {e}", tmp.display()))?;
        sync_tree(&tmp);
        // An entry left by an older, interrupted commit has no manifest; it is replaced.
        if entry.exists() {
            let _ = std::fs::remove_dir_all(&entry);
        }
        std::fs::rename(&tmp, &entry)
            .map_err(|e| format!("cannot move {} into place: {e}", entry.display()))?;
        let _ = std::fs::remove_dir_all(&building.partial);
        Ok(entry)
    }
}

fn sync_tree(dir: &Path) {
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            if let Ok(f) = std::fs::File::open(e.path()) {
                let _ = f.sync_all();
            }
        }
    }
    if let Ok(f) = std::fs::File::open(dir) {
        let _ = f.sync_all();
    }
}
