//! Cache keys. Each stage's key is the hash of a `Serialize` struct listing everything its output
//! depends on: its own config subset (with defaults filled in), its parents' keys, the content hashes
//! of its input files, the backend and xrun's version. Paths and names are left out, so moving the
//! data or renaming the experiment reuses what was computed.

use std::collections::HashMap;
use std::io::Read;
use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::config::data::{Format, OnError, SourceSpec};
use crate::config::experiment::{BackendChoice, Precision};
use crate::config::model::{ModelSection, TokenizerSection};
use crate::config::train::{EvalSection, Method, Objective, Optim, PretrainSection};
use crate::config::Experiment;

/// Content hashes of input files, each file read once per process.
#[derive(Default)]
pub struct FileHashes {
    known: HashMap<PathBuf, String>,
}

impl FileHashes {
    pub fn of(&mut self, path: &Path) -> std::io::Result<String> {
        if let Some(h) = self.known.get(path) {
            return Ok(h.clone());
        }
        let mut file = std::fs::File::open(path)
            .map_err(|e| std::io::Error::new(e.kind(), format!("{}: {e}", path.display())))?;
        let mut hasher = blake3::Hasher::new();
        let mut buf = vec![0u8; 1 << 16];
        loop {
            let n = file.read(&mut buf)?;
            if n == 0 {
                break;
            }
            hasher.update(&buf[..n]);
        }
        let hex = hasher.finalize().to_hex().to_string();
        self.known.insert(path.to_path_buf(), hex.clone());
        Ok(hex)
    }
}

/// The keys of one trial's stages; `pretrain` is `None` when the objective is `none`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct StageKeys {
    pub tokenizer: Key,
    pub pretrain: Option<Key>,
    pub finetune: Key,
}

impl StageKeys {
    /// Every stage with its key (none for `pretrain` without pretraining), in pipeline order.
    pub fn stages(&self) -> [(&'static str, Option<&Key>); 3] {
        [
            ("tokenizer", Some(&self.tokenizer)),
            ("pretrain", self.pretrain.as_ref()),
            ("finetune", Some(&self.finetune)),
        ]
    }

    /// The key of the stage named `stage`.
    pub fn get(&self, stage: &str) -> Option<&Key> {
        self.stages()
            .into_iter()
            .find(|(name, _)| *name == stage)
            .and_then(|(_, key)| key)
    }
}

/// A stage key: the short hash names the cache entry; the JSON it hashes is kept in its manifest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Key {
    pub hash: String,
    pub inputs: serde_json::Value,
}

impl Key {
    fn of<T: Serialize>(inputs: &T) -> Self {
        let inputs = serde_json::to_value(inputs).unwrap_or_default();
        let bytes = serde_json::to_vec(&inputs).unwrap_or_default();
        let hash = blake3::hash(&bytes).to_hex()[..20].to_string();
        Key { hash, inputs }
    }
}

const VERSION: &str = env!("CARGO_PKG_VERSION");

/// Revisions of what each stage computes, part of its key: a fix that changes a stage's results
/// bumps its revision, so exactly the entries it affects are computed again.
/// Revision 1 is left out of the key, so keys from before revisions existed stay valid.
///
/// - finetune 2: a pretrained backbone reused from the cache was frozen during fine-tuning.
/// - finetune 3: counting parameters for the report initialises the classifier head before the
///   first batch, so it no longer draws its weights after that batch's dropout masks (same seed,
///   other numbers; found when a Slurm run of the headline study disagreed with the cache).
/// - pretrain 2, finetune 4: every projection multiplies the `[batch·seq, d]` rows in one product
///   (`model::peft::by_rows`), 1.3x faster on the CPU. The same function, rounded in another order:
///   losses differ from the fourth significant digit on.
///
/// Drawing dropout masks on the host on the CPU (`model::dropout`) changed the CPU's numbers and no
/// GPU's: it is the `masks` input, not a revision, so GPU entries keep their keys.
const TOKENIZER_REV: u32 = 1;
const PRETRAIN_REV: u32 = 2;
const FINETUNE_REV: u32 = 4;

/// Revisions of one fine-tuning method (absent at 1), so a fix to a method recomputes its trials
/// and no others.
///
/// - adapter 2: the backbone's LayerNorms train with the adapters, as in Houlsby et al.
fn method_rev(method: Method) -> Option<u32> {
    match method {
        Method::Adapter => Some(2),
        _ => None,
    }
}

fn is_first(rev: &u32) -> bool {
    *rev == 1
}

#[derive(Serialize)]
struct Source<'a> {
    format: Format,
    text: &'a str,
    text_pair: Option<&'a str>,
    label: Option<&'a str>,
    limit: Option<usize>,
    files: Vec<String>,
}

#[derive(Serialize)]
struct TokenizerInputs<'a> {
    stage: &'static str,
    xrun: &'static str,
    #[serde(skip_serializing_if = "is_first")]
    rev: u32,
    tokenizer: &'a TokenizerSection,
    tokenizer_file: Option<String>,
    /// `model.init`'s checkpoint files, by content.
    #[serde(skip_serializing_if = "Option::is_none")]
    init: Option<Vec<String>>,
    on_error: OnError,
    texts: Source<'a>,
}

#[derive(Serialize)]
struct PretrainInputs<'a> {
    stage: &'static str,
    xrun: &'static str,
    #[serde(skip_serializing_if = "is_first")]
    rev: u32,
    backend: BackendChoice,
    /// Absent at f32, so earlier keys hold.
    #[serde(skip_serializing_if = "Precision::is_f32")]
    precision: Precision,
    /// The multiple batches are padded to; absent at 1 (exact, the CPU's default), so earlier
    /// keys hold.
    #[serde(skip_serializing_if = "crate::train::backend::is_one")]
    pad_multiple: usize,
    /// `host` on the CPU, whose dropout masks xrun draws on the host (`model::dropout`: one seed,
    /// other masks than burn's draw); absent where the backend draws them, so GPU keys hold.
    #[serde(skip_serializing_if = "Option::is_none")]
    masks: Option<&'static str>,
    seed: u64,
    tokenizer: &'a str,
    model: &'a ModelSection,
    #[serde(skip_serializing_if = "Option::is_none")]
    init: Option<Vec<String>>,
    pretrain: PretrainSection,
    optim: Optim,
    eval: &'a EvalSection,
    on_error: OnError,
    corpus: Source<'a>,
}

#[derive(Serialize)]
struct FinetuneInputs<'a> {
    stage: &'static str,
    xrun: &'static str,
    #[serde(skip_serializing_if = "is_first")]
    rev: u32,
    backend: BackendChoice,
    /// Absent at f32, so earlier keys hold.
    #[serde(skip_serializing_if = "Precision::is_f32")]
    precision: Precision,
    /// The multiple batches are padded to; absent at 1 (exact, the CPU's default), so earlier
    /// keys hold.
    #[serde(skip_serializing_if = "crate::train::backend::is_one")]
    pad_multiple: usize,
    /// `host` on the CPU, whose dropout masks xrun draws on the host (`model::dropout`: one seed,
    /// other masks than burn's draw); absent where the backend draws them, so GPU keys hold.
    #[serde(skip_serializing_if = "Option::is_none")]
    masks: Option<&'static str>,
    seed: u64,
    tokenizer: &'a str,
    pretrain: Option<&'a str>,
    objective: Objective,
    model: &'a ModelSection,
    #[serde(skip_serializing_if = "Option::is_none")]
    init: Option<Vec<String>>,
    /// The section without `method` when it is `full`, so keys from before methods existed hold.
    finetune: serde_json::Value,
    optim: Optim,
    eval: &'a EvalSection,
    on_error: OnError,
    train: Source<'a>,
    /// Present only when a label-efficiency draw is asked for, so other keys stay as they were.
    #[serde(skip_serializing_if = "Option::is_none")]
    train_sample: Option<Sample>,
    dev: Option<Source<'a>>,
    test: Option<Source<'a>>,
    /// Token classification's `data.tag_scheme` when the file gives one (the tags are checked
    /// against it), absent otherwise so other keys stay as they were.
    #[serde(skip_serializing_if = "Option::is_none")]
    tag_scheme: Option<crate::config::data::TagScheme>,
    /// The later tasks of a continual-learning sequence and how it learns them.
    #[serde(skip_serializing_if = "Option::is_none")]
    continual: Option<ContinualInputs<'a>>,
}

#[derive(Serialize)]
struct ContinualInputs<'a> {
    first: &'a str,
    strategy: crate::config::continual::Strategy,
    /// Only the chosen strategy's setting.
    #[serde(skip_serializing_if = "Option::is_none")]
    replay_examples: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    ewc_lambda: Option<f64>,
    tasks: Vec<TaskInputs<'a>>,
}

#[derive(Serialize)]
struct TaskInputs<'a> {
    name: &'a str,
    train: Source<'a>,
    dev: Option<Source<'a>>,
    test: Option<Source<'a>>,
}

/// `data.train_examples` / `train_fraction` / `balanced`.
#[derive(Serialize)]
struct Sample {
    examples: Option<usize>,
    fraction: Option<f64>,
    balanced: bool,
}

fn source<'a>(
    exp: &Experiment,
    spec: &'a SourceSpec,
    hashes: &mut FileHashes,
) -> std::io::Result<Source<'a>> {
    let files = spec
        .paths
        .iter()
        .map(|p| hashes.of(&exp.data_path(p)))
        .collect::<Result<_, _>>()?;
    Ok(Source {
        format: spec.format,
        text: &spec.text,
        text_pair: spec.text_pair.as_deref(),
        label: spec.label.as_deref(),
        limit: spec.limit,
        files,
    })
}

fn continual_inputs<'a>(
    exp: &Experiment,
    cl: &'a crate::config::continual::ContinualSection,
    hashes: &mut FileHashes,
) -> std::io::Result<ContinualInputs<'a>> {
    use crate::config::continual::Strategy;
    let mut tasks = Vec::with_capacity(cl.tasks.len());
    for t in &cl.tasks {
        let mut opt =
            |s: &'a Option<SourceSpec>| s.as_ref().map(|s| source(exp, s, hashes)).transpose();
        tasks.push(TaskInputs {
            name: &t.name,
            dev: opt(&t.dev)?,
            test: opt(&t.test)?,
            train: source(exp, &t.train, hashes)?,
        });
    }
    Ok(ContinualInputs {
        first: &cl.first,
        strategy: cl.strategy,
        replay_examples: (cl.strategy == Strategy::Replay).then_some(cl.replay_examples),
        ewc_lambda: (cl.strategy == Strategy::Ewc).then_some(cl.ewc_lambda),
        tasks,
    })
}

pub fn stage_keys(exp: &Experiment, hashes: &mut FileHashes) -> std::io::Result<StageKeys> {
    let raw = &exp.raw;
    let d = &raw.data;
    let base = exp.file.parent().unwrap_or(Path::new(""));
    let tokenizer_file = match &raw.tokenizer.path {
        Some(p) => Some(hashes.of(&base.join(p))?),
        None => None,
    };
    let mut tokenizer_section = raw.tokenizer.clone();
    tokenizer_section.path = None;
    let init = match &raw.model.init {
        Some(i) => Some(
            crate::hf::checkpoint_files(&base.join(&i.hf))
                .iter()
                .map(|f| hashes.of(f))
                .collect::<std::io::Result<Vec<_>>>()?,
        ),
        None => None,
    };
    let tokenizer = Key::of(&TokenizerInputs {
        stage: "tokenizer",
        xrun: VERSION,
        rev: TOKENIZER_REV,
        tokenizer: &tokenizer_section,
        tokenizer_file,
        init: init.clone(),
        on_error: d.on_error,
        texts: source(exp, d.corpus.as_ref().unwrap_or(&d.train), hashes)?,
    });
    let backend = crate::train::backend::concrete(raw.experiment.backend, &exp.gpu_setup());
    let gpu = backend != BackendChoice::Cpu;
    let pad_multiple = crate::train::backend::pad_multiple(gpu, raw.experiment.pad_multiple);
    // As `train::backend::start` sets `model::mixed::set_host` (and so dropout's host masks).
    let masks = (!gpu).then_some("host");
    let seed = raw.experiment.seed;
    let pretrain = match (&d.corpus, raw.pretrain.objective) {
        (Some(corpus), objective) if objective != Objective::None => {
            let mut section = raw.pretrain.clone();
            let optim = exp.pretrain_optim();
            section.optim = Default::default();
            Some(Key::of(&PretrainInputs {
                stage: "pretrain",
                xrun: VERSION,
                rev: PRETRAIN_REV,
                backend,
                precision: raw.experiment.precision,
                pad_multiple,
                masks,
                seed,
                tokenizer: &tokenizer.hash,
                model: &raw.model,
                init: init.clone(),
                pretrain: section,
                optim,
                eval: &raw.eval,
                on_error: d.on_error,
                corpus: source(exp, corpus, hashes)?,
            }))
        }
        _ => None,
    };
    let mut finetune_section = raw.finetune.clone();
    finetune_section.optim = Default::default();
    // Settings of the methods a trial does not use (a sweep over methods carries them all) are
    // not its inputs: a `full` trial keeps its key whatever [finetune.lora] says.
    let method = finetune_section.method;
    if method != Method::Lora {
        finetune_section.lora = None;
    }
    if method != Method::Adapter {
        finetune_section.adapter = None;
    }
    if method != Method::Prefix {
        finetune_section.prefix = None;
    }
    if !matches!(method, Method::ZeroShot | Method::Pet) {
        finetune_section.prompt = None;
    }
    let mut finetune_section = serde_json::to_value(&finetune_section).unwrap_or_default();
    if method == Method::Full {
        if let Some(map) = finetune_section.as_object_mut() {
            map.remove("method");
        }
    }
    // A method's own revision, beside the stage's: it invalidates that method's entries only.
    if let (Some(rev), Some(map)) = (method_rev(method), finetune_section.as_object_mut()) {
        map.insert("method_rev".into(), rev.into());
    }
    let finetune = Key::of(&FinetuneInputs {
        stage: "finetune",
        xrun: VERSION,
        rev: FINETUNE_REV,
        backend,
        precision: raw.experiment.precision,
        pad_multiple,
        masks,
        seed,
        tokenizer: &tokenizer.hash,
        pretrain: pretrain.as_ref().map(|k| k.hash.as_str()),
        objective: raw.pretrain.objective,
        model: &raw.model,
        init,
        finetune: finetune_section,
        optim: exp.finetune_optim(),
        eval: &raw.eval,
        on_error: d.on_error,
        train: source(exp, &d.train, hashes)?,
        train_sample: (d.train_examples.is_some() || d.train_fraction.is_some()).then_some(
            Sample {
                examples: d.train_examples,
                fraction: d.train_fraction,
                balanced: d.balanced,
            },
        ),
        dev: d.dev.as_ref().map(|s| source(exp, s, hashes)).transpose()?,
        test: d
            .test
            .as_ref()
            .map(|s| source(exp, s, hashes))
            .transpose()?,
        tag_scheme: d.tag_scheme,
        continual: raw
            .continual
            .as_ref()
            .map(|cl| continual_inputs(exp, cl, hashes))
            .transpose()?,
    });
    Ok(StageKeys {
        tokenizer,
        pretrain,
        finetune,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn finetune_key(sets: &[&str]) -> String {
        let root = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"));
        let sets: Vec<String> = sets.iter().map(|s| s.to_string()).collect();
        let exp = crate::config::load(&root.join("experiments/smoke.toml"), &sets).unwrap();
        stage_keys(&exp, &mut FileHashes::default())
            .unwrap()
            .finetune
            .hash
    }

    /// A sweep over methods carries every method's settings; each trial is keyed by its own.
    #[test]
    fn settings_of_other_methods_leave_a_trials_key_alone() {
        let lora = "finetune.lora={rank=4}";
        let sweep = "sweep.grid.finetune.method=[\"full\", \"lora\"]";
        let full = finetune_key(&[]);
        assert_eq!(finetune_key(&[sweep, lora]), full);
        let with_lora = finetune_key(&["finetune.method=\"lora\"", lora]);
        assert_ne!(with_lora, full);
        assert_ne!(
            with_lora,
            finetune_key(&["finetune.method=\"lora\"", "finetune.lora={rank=8}"])
        );
    }
}
