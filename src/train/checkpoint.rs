//! Resumable checkpoints of a running stage: model, optimiser state, the best snapshot so far and the
//! loop's position and records. Each checkpoint is written into a fresh folder, then a one-line
//! `latest` file is swapped in by rename, so a process killed at any instant leaves either the old
//! checkpoint or the new one, never half of one.

use std::path::{Path, PathBuf};

use burn::module::{AutodiffModule, Module};
use burn::optim::Optimizer;
use burn::record::{FullPrecisionSettings, NamedMpkFileRecorder, Recorder};
use burn::tensor::backend::AutodiffBackend;
use serde::{Deserialize, Serialize};

use crate::metrics::Record;

/// Where a stage keeps its checkpoints and how often it writes one.
pub struct Checkpoints<'a> {
    pub dir: PathBuf,
    /// Every this many steps, besides every epoch end.
    pub every: usize,
    /// Told the step of every checkpoint written (the run journal records it).
    pub on_save: &'a mut dyn FnMut(usize),
}

/// The loop's position: resuming runs batch `batch` of epoch `epoch` next.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct State {
    pub step: usize,
    pub epoch: usize,
    pub batch: usize,
    pub best: Option<(f64, usize)>,
    pub stale: usize,
    pub records: Vec<Record>,
    pub elapsed_s: f64,
}

fn recorder() -> NamedMpkFileRecorder<FullPrecisionSettings> {
    NamedMpkFileRecorder::<FullPrecisionSettings>::new()
}

fn io(what: &str, path: &Path, e: impl std::fmt::Display) -> String {
    format!("{what} {}: {e}", path.display())
}

/// What a resumed loop needs, loaded from the newest complete checkpoint.
pub struct Loaded<M, O, I> {
    pub state: State,
    pub model: M,
    pub optimizer: O,
    pub best: Option<I>,
}

impl Checkpoints<'_> {
    /// The step of the newest checkpoint in `dir`, if it holds one.
    pub fn latest_step(dir: &Path) -> Option<usize> {
        let name = std::fs::read_to_string(dir.join("latest")).ok()?;
        name.trim().strip_prefix("step-")?.parse().ok()
    }

    fn latest(&self) -> Option<PathBuf> {
        let name = std::fs::read_to_string(self.dir.join("latest")).ok()?;
        let dir = self.dir.join(name.trim());
        dir.join("state.json").is_file().then_some(dir)
    }

    /// Writes a checkpoint and points `latest` at it; older ones are removed afterwards.
    pub fn save<B, M, O>(
        &mut self,
        state: &State,
        model: &M,
        optimizer: &O,
        best: Option<&M::InnerModule>,
    ) -> Result<(), String>
    where
        B: AutodiffBackend,
        M: AutodiffModule<B>,
        O: Optimizer<M, B>,
    {
        let name = format!("step-{:08}", state.step);
        let dir = self.dir.join(&name);
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).map_err(|e| io("cannot create", &dir, e))?;
        let rec = recorder();
        model
            .clone()
            .save_file(dir.join("model"), &rec)
            .map_err(|e| io("cannot save", &dir, e))?;
        Recorder::<B>::record(&rec, optimizer.to_record(), dir.join("optim"))
            .map_err(|e| io("cannot save", &dir, e))?;
        if let Some(best) = best {
            best.clone()
                .save_file(dir.join("best"), &rec)
                .map_err(|e| io("cannot save", &dir, e))?;
        }
        // The record files are written without fsync; make them durable before `latest` names them.
        if let Ok(entries) = std::fs::read_dir(&dir) {
            for e in entries.flatten() {
                if let Ok(f) = std::fs::File::open(e.path()) {
                    let _ = f.sync_all();
                }
            }
        }
        let json = serde_json::to_vec(state).map_err(|e| e.to_string())?;
        write_synced(&dir.join("state.json"), &json)?;
        sync_dir(&dir);
        let tmp = self.dir.join("latest.tmp");
        write_synced(&tmp, name.as_bytes())?;
        std::fs::rename(&tmp, self.dir.join("latest"))
            .map_err(|e| io("cannot update", &self.dir, e))?;
        sync_dir(&self.dir);
        if let Ok(entries) = std::fs::read_dir(&self.dir) {
            for e in entries.flatten() {
                let n = e.file_name().to_string_lossy().to_string();
                if n.starts_with("step-") && n != name {
                    let _ = std::fs::remove_dir_all(e.path());
                }
            }
        }
        (self.on_save)(state.step);
        Ok(())
    }

    /// Loads the newest checkpoint into `model` and `optimizer`, or gives them back untouched.
    pub fn load<B, M, O>(
        &self,
        model: M,
        optimizer: O,
        device: &B::Device,
    ) -> Result<Loaded<M, O, M::InnerModule>, (M, O)>
    where
        B: AutodiffBackend,
        M: AutodiffModule<B>,
        O: Optimizer<M, B>,
    {
        let Some(dir) = self.latest() else {
            return Err((model, optimizer));
        };
        let Some(state) = std::fs::read(dir.join("state.json"))
            .ok()
            .and_then(|b| serde_json::from_slice::<State>(&b).ok())
        else {
            return Err((model, optimizer));
        };
        let rec = recorder();
        let best_file = dir.join("best");
        let best = if state.best.is_some() && best_file.with_extension("mpk").is_file() {
            match model.valid().load_file(&best_file, &rec, device) {
                Ok(m) => Some(m),
                Err(_) => return Err((model, optimizer)),
            }
        } else {
            None
        };
        let optim_record = match Recorder::<B>::load(&rec, dir.join("optim"), device) {
            Ok(r) => r,
            Err(_) => return Err((model, optimizer)),
        };
        let loaded = match model.clone().load_file(dir.join("model"), &rec, device) {
            Ok(m) => m,
            Err(_) => return Err((model, optimizer)),
        };
        Ok(Loaded {
            state,
            model: loaded,
            optimizer: optimizer.load_record(optim_record),
            best,
        })
    }
}

fn write_synced(path: &Path, bytes: &[u8]) -> Result<(), String> {
    use std::io::Write;
    let mut f = std::fs::File::create(path).map_err(|e| io("cannot write", path, e))?;
    f.write_all(bytes)
        .and_then(|()| f.sync_all())
        .map_err(|e| io("cannot write", path, e))
}

/// Makes a rename inside `dir` durable; best effort (not every filesystem supports it).
fn sync_dir(dir: &Path) {
    if let Ok(f) = std::fs::File::open(dir) {
        let _ = f.sync_all();
    }
}
