//! Checks that serde cannot express: ranges, cross-field rules and input files that must exist.
//! Each rule is a small function that pushes a diagnostic pointing at the key to change.

use std::path::{Path, PathBuf};

use super::data::SourceSpec;
use super::experiment::valid_name;
use super::model::{NormPlacement, TokenizerKind};
use super::train::{Objective, OptimSection, SelectMetric};
use super::{Diagnostic, Experiment, Places, RawDoc};

struct Checker<'a> {
    places: &'a Places<'a>,
    diags: &'a mut Vec<Diagnostic>,
}

impl Checker<'_> {
    fn fail(&mut self, path: &str, message: String) {
        let origin = self.places.of(path);
        self.diags.push(Diagnostic::new(message, origin));
    }

    fn require(&mut self, ok: bool, path: &str, message: impl FnOnce() -> String) {
        if !ok {
            self.fail(path, message());
        }
    }

    fn at_least(&mut self, path: &str, value: usize, min: usize) {
        self.require(value >= min, path, || {
            format!("`{path}` must be at least {min}, got {value}")
        });
    }

    fn in_range(&mut self, path: &str, value: f64, lo: f64, hi: f64, hi_open: bool) {
        let ok = value.is_finite() && value >= lo && if hi_open { value < hi } else { value <= hi };
        let bracket = if hi_open { ")" } else { "]" };
        self.require(ok, path, || {
            format!("`{path}` must be in [{lo}, {hi}{bracket}, got {value}")
        });
    }
}

pub(super) fn check(
    file: &Path,
    raw: RawDoc,
    places: &Places<'_>,
    diags: &mut Vec<Diagnostic>,
) -> Option<Experiment> {
    let mut c = Checker { places, diags };
    let base = file.parent().unwrap_or(Path::new("")).to_path_buf();
    let data_root = data_root(&base, &raw, places);
    experiment(&mut c, &raw);
    if let Err(errors) = raw.cluster.slurm.sbatch_options() {
        for (key, message) in errors {
            c.fail(&key, message);
        }
    }
    model(&mut c, &raw);
    match &raw.model.init {
        Some(init) => hf_init(&mut c, &raw, &base.join(&init.hf)),
        None => tokenizer(&mut c, &raw, &base),
    }
    pretrain(&mut c, &raw);
    optim(&mut c, "pretrain.optim", &raw.pretrain.optim);
    optim(&mut c, "finetune.optim", &raw.finetune.optim);
    method(&mut c, &raw);
    c.at_least("finetune.epochs", raw.finetune.epochs, 1);
    c.at_least("finetune.batch_size", raw.finetune.batch_size, 1);
    c.at_least("eval.batch_size", raw.eval.batch_size, 1);
    if let Some(m) = raw.experiment.pad_multiple {
        c.at_least("experiment.pad_multiple", m, 1);
    }
    data(&mut c, &raw, &data_root);
    continual(&mut c, &raw, &data_root);
    report(&mut c, &raw);
    let mut raw = raw;
    // Token classification selects on entity F1 unless the file says otherwise.
    if raw.data.tagging() && !places.is_set("finetune.select_metric") {
        raw.finetune.select_metric = SelectMetric::EntityF1;
    }
    // Segment embeddings: on for sentence pairs unless the file says otherwise. Without pairs
    // nothing is written out (or hashed), so those files keep their cache keys. Idempotent: every
    // trial of a sweep is checked again from the resolved document.
    let pairs = raw.data.train.text_pair.is_some();
    raw.model.segments = match raw.model.segments.unwrap_or(pairs) {
        true => Some(true),
        false => pairs.then_some(false),
    };
    Some(Experiment {
        file: file.to_path_buf(),
        data_root,
        raw,
        source: String::new(),
        sets: Vec::new(),
    })
}

/// `--set data.root` wins over `XRUN_DATA_ROOT`, which wins over the file's `data.root`.
fn data_root(base: &Path, raw: &RawDoc, places: &Places<'_>) -> PathBuf {
    let from_set = matches!(places.of("data.root"), super::Origin::Set(_));
    match std::env::var_os("XRUN_DATA_ROOT") {
        Some(env) if !from_set && !env.is_empty() => PathBuf::from(env),
        _ => base.join(&raw.data.root),
    }
}

fn experiment(c: &mut Checker, raw: &RawDoc) {
    let name = &raw.experiment.name;
    c.require(valid_name(name), "experiment.name", || {
        format!("`experiment.name` = {name:?} must be non-empty and use only letters, digits, `-`, `_` and `.`")
    });
    use super::experiment::{BackendChoice, Precision};
    let e = &raw.experiment;
    c.require(
        !(e.backend == BackendChoice::Wgpu
            && matches!(e.precision, Precision::Bf16 | Precision::Bf16Mixed)),
        "experiment.precision",
        || {
            format!("`experiment.precision` = \"{}\" is not available on wgpu (WGSL has no bf16); use \"f16\" there, or backend \"cuda\"", e.precision.name())
        },
    );
    if e.precision == Precision::F16 {
        // f16's smallest normal number; AdamW's default 1e-8 rounds to 0 there.
        const F16_MIN: f64 = 6.1e-5;
        let stages = [
            (
                "pretrain",
                &raw.pretrain.optim,
                raw.pretrain.objective != Objective::None,
            ),
            ("finetune", &raw.finetune.optim, true),
        ];
        for (stage, optim, used) in stages {
            let eps = optim.eps.unwrap_or(super::train::DEFAULT_EPS);
            if !used || eps >= F16_MIN {
                continue;
            }
            let key = format!("{stage}.optim.eps");
            let at = if c.places.is_set(&key) {
                key.clone()
            } else {
                "experiment.precision".into()
            };
            c.fail(
                &at,
                format!(
                    "`{key}` = {eps:e} is 0 in f16: AdamW would divide 0 by 0 for every parameter \
                     without a gradient (NaN at the second step); with `experiment.precision` = \
                     \"f16\" set `{key}` to at least 1e-4 (bf16 keeps 1e-8)"
                ),
            );
        }
    }
}

fn model(c: &mut Checker, raw: &RawDoc) {
    let m = &raw.model;
    c.at_least("model.d_model", m.d_model, 8);
    c.at_least("model.layers", m.layers, 1);
    c.at_least("model.heads", m.heads, 1);
    c.at_least("model.d_ff", m.d_ff, 1);
    c.at_least("model.max_len", m.max_len, 8);
    c.in_range("model.dropout", m.dropout, 0.0, 1.0, true);
    if m.heads > 0 && !m.d_model.is_multiple_of(m.heads) {
        let path = if c.places.is_set("model.heads") {
            "model.heads"
        } else {
            "model.d_model"
        };
        c.fail(
            path,
            format!(
                "`model.d_model` = {} is not divisible by `model.heads` = {}",
                m.d_model, m.heads
            ),
        );
    }
}

/// `model.init = { hf = DIR }`: the checkpoint sets the shape and the tokenizer, so `[model]`
/// shape keys must agree with its `config.json` and `[tokenizer]` must be absent.
fn hf_init(c: &mut Checker, raw: &RawDoc, dir: &Path) {
    let hf = match crate::hf::read_config(dir) {
        Ok(hf) => hf,
        Err(e) => return c.fail("model.init", e),
    };
    if crate::hf::tokenizer_file(dir).is_none() {
        c.fail(
            "model.init",
            format!("{}: no tokenizer.json (nor vocab.txt)", dir.display()),
        );
    }
    for key in [
        "kind",
        "vocab_size",
        "min_frequency",
        "lowercase",
        "limit_alphabet",
        "path",
    ] {
        let path = format!("tokenizer.{key}");
        if c.places.is_set(&path) {
            c.fail(
                &path,
                format!(
                    "`{path}` is set, but `model.init` uses the checkpoint's own tokenizer; remove it"
                ),
            );
        }
    }
    let m = &raw.model;
    let bert = hf.family != crate::model::Family::Gpt2;
    let norm = if bert {
        NormPlacement::Post
    } else {
        NormPlacement::Pre
    };
    let shape = [
        ("model.d_model", m.d_model, hf.d_model),
        ("model.layers", m.layers, hf.layers),
        ("model.heads", m.heads, hf.heads),
        ("model.d_ff", m.d_ff, hf.d_ff),
    ];
    for (path, ours, theirs) in shape {
        if c.places.is_set(path) && ours != theirs {
            c.fail(
                path,
                format!(
                    "`{path}` = {ours} conflicts with {} ({theirs}): the checkpoint sets the shape; remove the key",
                    dir.join("config.json").display()
                ),
            );
        }
    }
    if c.places.is_set("model.norm") && m.norm != norm {
        c.fail(
            "model.norm",
            format!(
                "`model.norm` conflicts with the checkpoint: a {} is {}-norm",
                hf.family.name(),
                if bert { "post" } else { "pre" }
            ),
        );
    }
    if m.max_len > hf.max_len() {
        c.fail(
            "model.max_len",
            format!(
                "`model.max_len` = {} is longer than the checkpoint's {} positions",
                m.max_len,
                hf.max_len()
            ),
        );
    }
    if !bert && m.segments == Some(true) {
        c.fail(
            "model.segments",
            "GPT-2 has no segment embeddings: `model.segments = true` cannot apply".into(),
        );
    }
    let objective = raw.pretrain.objective;
    if (bert && objective == Objective::Ar) || (!bert && objective == Objective::Mlm) {
        c.fail(
            "pretrain.objective",
            format!(
                "continued pretraining of a {} needs `objective = \"{}\"` (or \"none\")",
                hf.family.name(),
                if bert { "mlm" } else { "ar" }
            ),
        );
    }
}

fn tokenizer(c: &mut Checker, raw: &RawDoc, base: &Path) {
    let t = &raw.tokenizer;
    c.at_least("tokenizer.vocab_size", t.vocab_size, 16);
    if let Some(limit) = t.limit_alphabet {
        c.at_least("tokenizer.limit_alphabet", limit, 1);
    }
    match (&t.kind, &t.path) {
        (TokenizerKind::File, None) => c.fail(
            "tokenizer.kind",
            "`tokenizer.kind = \"file\"` needs `tokenizer.path` (a tokenizer.json)".into(),
        ),
        (TokenizerKind::File, Some(p)) => {
            let full = base.join(p);
            c.require(full.is_file(), "tokenizer.path", || {
                format!("tokenizer file not found: {}", full.display())
            });
        }
        (_, Some(_)) => c.fail(
            "tokenizer.path",
            "`tokenizer.path` is only read with `kind = \"file\"`".into(),
        ),
        _ => {}
    }
}

fn pretrain(c: &mut Checker, raw: &RawDoc) {
    let p = &raw.pretrain;
    if p.objective == Objective::None {
        return;
    }
    if p.steps.is_some() && p.epochs.is_some() {
        c.fail(
            "pretrain.epochs",
            "give `pretrain.steps` or `pretrain.epochs`, not both".into(),
        );
    }
    if let Some(steps) = p.steps {
        c.at_least("pretrain.steps", steps, 1);
    }
    if let Some(epochs) = p.epochs {
        c.at_least("pretrain.epochs", epochs, 1);
    }
    c.at_least("pretrain.batch_size", p.batch_size, 1);
    c.at_least("pretrain.eval_every", p.eval_every, 1);
    c.in_range("pretrain.mask_prob", p.mask_prob, 0.01, 1.0, true);
    c.in_range(
        "pretrain.validation_fraction",
        p.validation_fraction,
        0.0,
        0.5,
        false,
    );
    if raw.data.corpus.is_none() {
        c.fail(
            "pretrain.objective",
            format!(
                "`pretrain.objective = \"{}\"` needs an unlabeled corpus: add [data.corpus] or set objective = \"none\"",
                p.objective.name()
            ),
        );
    }
}

fn optim(c: &mut Checker, section: &str, o: &OptimSection) {
    let key = |k: &str| format!("{section}.{k}");
    if let Some(lr) = o.lr {
        // No upper bound: learning-rate range tests go far past 1, and a run that diverges is
        // stopped and reported as such.
        c.require(lr.is_finite() && lr > 0.0, &key("lr"), || {
            format!("`{section}.lr` must be a positive number, got {lr}")
        });
    }
    if let Some([b1, b2]) = o.betas {
        c.in_range(&key("betas"), b1, 0.0, 1.0, true);
        c.in_range(&key("betas"), b2, 0.0, 1.0, true);
    }
    if let Some(eps) = o.eps {
        c.require(eps > 0.0 && eps < 1.0, &key("eps"), || {
            format!("`{section}.eps` must be in (0, 1), got {eps}")
        });
    }
    if let Some(wd) = o.weight_decay {
        c.in_range(&key("weight_decay"), wd, 0.0, 1.0, false);
    }
    if let Some(w) = o.warmup_fraction {
        c.in_range(&key("warmup_fraction"), w, 0.0, 1.0, true);
    }
    if let Some(clip) = o.clip_norm {
        c.in_range(&key("clip_norm"), clip, 0.0, f64::MAX, false);
    }
}

/// A method's settings are checked, and settings for another method than the one chosen are an
/// error rather than silently ignored.
fn method(c: &mut Checker, raw: &RawDoc) {
    let f = &raw.finetune;
    let chosen = f.method.name();
    let sections = [
        ("lora", f.lora.is_some()),
        ("adapter", f.adapter.is_some()),
        ("prefix", f.prefix.is_some()),
        ("prompt", f.prompt.is_some()),
    ];
    for (name, present) in sections {
        let wants = if name == "prompt" {
            "zero_shot\" or \"pet"
        } else {
            name
        };
        let uses = chosen == name || (name == "prompt" && matches!(chosen, "zero_shot" | "pet"));
        // A sweep over methods carries every method's settings; each trial uses its own.
        if present && !uses && !raw.sweep.varies("finetune.method") {
            c.fail(&format!("finetune.{name}"), format!(
                "[finetune.{name}] is set but finetune.method = \"{chosen}\": set method = \"{wants}\" or remove the section"
            ));
        }
    }
    if let Some(l) = &f.lora {
        c.at_least("finetune.lora.rank", l.rank, 1);
        c.require(l.rank <= raw.model.d_model, "finetune.lora.rank", || {
            format!(
                "`finetune.lora.rank` ({}) must not exceed model.d_model ({})",
                l.rank, raw.model.d_model
            )
        });
        c.in_range(
            "finetune.lora.alpha",
            l.alpha,
            f64::MIN_POSITIVE,
            f64::MAX,
            false,
        );
        c.in_range("finetune.lora.dropout", l.dropout, 0.0, 1.0, true);
        c.require(!l.targets.is_empty(), "finetune.lora.targets", || {
            "`finetune.lora.targets` names no projection: use some of query, key, value, output, up, down".into()
        });
        let mut seen = Vec::new();
        for t in &l.targets {
            if seen.contains(t) {
                c.fail(
                    "finetune.lora.targets",
                    format!(
                        "`finetune.lora.targets` names `{}` twice",
                        format!("{t:?}").to_lowercase()
                    ),
                );
            }
            seen.push(*t);
        }
    }
    if matches!(chosen, "zero_shot" | "pet") && f.prompt.is_none() {
        c.fail(
            "finetune.method",
            format!("finetune.method = \"{chosen}\" needs [finetune.prompt] with a template and a verbalizer"),
        );
    }
    if let Some(p) = &f.prompt {
        for slot in ["{text}", "{label}"] {
            let n = p.template.matches(slot).count();
            c.require(n == 1, "finetune.prompt.template", || {
                format!("`finetune.prompt.template` must hold {slot} exactly once, found {n}")
            });
        }
        let (label, text) = (p.template.find("{label}"), p.template.find("{text}"));
        let causal = raw.pretrain.objective == Objective::Ar;
        let uses = matches!(chosen, "zero_shot" | "pet");
        if let (true, true, Some(label), Some(text)) = (uses, causal, label, text) {
            c.require(label > text, "finetune.prompt.template", || {
                "with pretrain.objective = \"ar\" the {label} slot must come after {text}: a \
                 causal LM scores the label from what precedes it"
                    .into()
            });
        }
        c.require(!p.verbalizer.is_empty(), "finetune.prompt.verbalizer", || {
            "`finetune.prompt.verbalizer` is empty: give a word per label, e.g. { positive = \"好\" }".into()
        });
    }
    if let Some(a) = &f.adapter {
        c.at_least("finetune.adapter.size", a.size, 1);
    }
    if let Some(p) = &f.prefix {
        c.at_least("finetune.prefix.length", p.length, 1);
    }
}

fn data(c: &mut Checker, raw: &RawDoc, root: &Path) {
    let d = &raw.data;
    if let Some(n) = d.train_examples {
        c.at_least("data.train_examples", n, 1);
    }
    if let Some(f) = d.train_fraction {
        c.require(f > 0.0 && f <= 1.0, "data.train_fraction", || {
            format!("`data.train_fraction` must be in (0, 1], got {f}")
        });
    }
    if d.train_examples.is_some() && d.train_fraction.is_some() {
        c.fail(
            "data.train_fraction",
            "give `data.train_examples` or `data.train_fraction`, not both".into(),
        );
    }
    if let Some(split) = &d.split {
        c.require(
            matches!(split, toml::Value::Integer(_) | toml::Value::String(_)),
            "data.split",
            || format!("`data.split` must be a number or a name, got {split}"),
        );
    }
    let tagging = d.tagging();
    if d.tag_scheme.is_some() && !tagging {
        c.fail(
            "data.tag_scheme",
            "`data.tag_scheme` applies to token classification: the training split is not a CoNLL file (format = \"conll\")".into(),
        );
    }
    if d.balanced && tagging {
        c.fail(
            "data.balanced",
            "`data.balanced` draws evenly per label, but a tagged sentence has no single label: remove it".into(),
        );
    }
    let f = &raw.finetune;
    if tagging && matches!(f.method.name(), "zero_shot" | "pet") {
        c.fail(
            "finetune.method",
            format!("finetune.method = \"{}\" scores one label per text; token classification (CoNLL data) needs a method that trains a tagging head: full, linear_probe, lora, adapter or prefix", f.method.name()),
        );
    }
    if f.select_metric == SelectMetric::EntityF1 && !tagging {
        c.fail(
            "finetune.select_metric",
            "`select_metric = \"entity_f1\"` needs token classification (CoNLL data); use \"accuracy\" or \"macro_f1\"".into(),
        );
    }
    c.require(root.is_dir(), "data.root", || {
        format!("data root is not a folder: {}", root.display())
    });
    let splits: [(&str, Option<&SourceSpec>, bool); 4] = [
        ("corpus", d.corpus.as_ref(), false),
        ("train", Some(&d.train), true),
        ("dev", d.dev.as_ref(), true),
        ("test", d.test.as_ref(), true),
    ];
    for (name, spec, labelled) in splits {
        let Some(spec) = spec else { continue };
        source(
            c,
            raw,
            root,
            &format!("data.{name}"),
            spec,
            labelled,
            tagging,
        );
    }
}

/// One source's checks: paths given and present (per split value), the fields a labelled split
/// needs, and the same reading (CoNLL or not) as the training split. `at` is its table, e.g.
/// `data.train` or `continual.tasks.0.dev`.
fn source(
    c: &mut Checker,
    raw: &RawDoc,
    root: &Path,
    at_table: &str,
    spec: &SourceSpec,
    labelled: bool,
    tagging: bool,
) {
    let d = &raw.data;
    let at = format!("{at_table}.paths");
    c.require(!spec.paths.is_empty(), &at, || {
        format!("`{at_table}.paths` is empty")
    });
    if root.is_dir() {
        for p in &spec.paths {
            if p.contains("{split}") && d.split.is_none() {
                // Each trial of a split sweep checks its own files.
                c.require(!raw.sweep.split.is_empty(), &at, || {
                    format!(
                        "`{p}` uses {{split}}, but no split is set: add `split = [...]` to \
                         [sweep] or set `data.split`"
                    )
                });
                continue;
            }
            let full = root.join(super::fill_split(p, d.split.as_ref()));
            // A missing split file is the split value's fault when a sweep set it.
            let place = if p.contains("{split}") {
                "data.split"
            } else {
                at.as_str()
            };
            c.require(full.is_file(), place, || {
                format!("data file not found: {}", full.display())
            });
        }
    }
    let conll = spec.conll();
    if labelled && conll != tagging {
        let (train, this) = if tagging {
            ("a CoNLL file (token classification)", "is not")
        } else {
            ("not a CoNLL file", "is")
        };
        c.fail(
            at_table,
            format!("the training split is {train} but [{at_table}] {this}: every labelled split must be read the same way (see `format`)"),
        );
    }
    if conll && spec.text_pair.is_some() {
        c.fail(
            &format!("{at_table}.text_pair"),
            "`text_pair` does not apply to CoNLL files (one token and tag per line)".into(),
        );
    }
    if labelled && spec.label.is_none() && !conll {
        c.fail(
            at_table,
            format!("[{at_table}] needs `label`: the field that holds each example's label"),
        );
    }
    if let Some(limit) = spec.limit {
        c.at_least(&format!("{at_table}.limit"), limit, 1);
    }
}

/// A sequence of tasks: named uniquely, each with labelled files, classifier methods only.
fn continual(c: &mut Checker, raw: &RawDoc, root: &Path) {
    let Some(cl) = &raw.continual else { return };
    let mut names: Vec<&str> = vec![cl.first.as_str()];
    c.require(valid_name(&cl.first), "continual.first", || {
        format!(
            "`continual.first` = {:?} must be non-empty and use only letters, digits, `-`, `_` and `.`",
            cl.first
        )
    });
    c.require(!cl.tasks.is_empty(), "continual.tasks", || {
        "[continual] needs at least one [[continual.tasks]] after the first task".into()
    });
    // The accuracy matrix is measured on test splits.
    c.require(raw.data.test.is_some(), "continual", || {
        "continual learning tests every task after every task: the first task needs [data.test]"
            .into()
    });
    for (i, t) in cl.tasks.iter().enumerate() {
        let at = format!("continual.tasks.{i}");
        c.require(t.test.is_some(), &at, || {
            format!(
                "task {:?} needs a `test` split: the accuracy matrix is measured on test",
                t.name
            )
        });
        c.require(valid_name(&t.name), &format!("{at}.name"), || {
            format!(
                "task name {:?} must be non-empty and use only letters, digits, `-`, `_` and `.`",
                t.name
            )
        });
        c.require(
            !names.contains(&t.name.as_str()),
            &format!("{at}.name"),
            || format!("two tasks are named {:?}", t.name),
        );
        names.push(&t.name);
        let splits = [
            ("train", Some(&t.train)),
            ("dev", t.dev.as_ref()),
            ("test", t.test.as_ref()),
        ];
        for (split, spec) in splits {
            if let Some(spec) = spec {
                source(c, raw, root, &format!("{at}.{split}"), spec, true, false);
            }
        }
    }
    if raw.data.tagging() {
        c.fail(
            "continual",
            "continual learning runs classification tasks; token classification (CoNLL data) is not supported in a sequence".into(),
        );
    }
    let method = raw.finetune.method.name();
    if matches!(method, "zero_shot" | "pet") {
        c.fail(
            "finetune.method",
            format!("finetune.method = \"{method}\" is not a continual-learning method: each task trains its own classifier head (full, linear_probe, lora, adapter or prefix)"),
        );
    }
    if raw.data.train_examples.is_some() || raw.data.train_fraction.is_some() {
        c.fail(
            "continual",
            "`data.train_examples` / `train_fraction` draw from one training split; with [continual] set `limit` on each task's split instead".into(),
        );
    }
    c.at_least("continual.replay_examples", cl.replay_examples, 1);
    c.require(
        cl.ewc_lambda.is_finite() && cl.ewc_lambda > 0.0,
        "continual.ewc_lambda",
        || {
            format!(
                "`continual.ewc_lambda` must be a positive number, got {}",
                cl.ewc_lambda
            )
        },
    );
    // A strategy's setting with another strategy chosen is an error, unless the strategy is swept.
    let strategy = cl.strategy.name();
    for (key, wants) in [("replay_examples", "replay"), ("ewc_lambda", "ewc")] {
        let path = format!("continual.{key}");
        if c.places.is_set(&path) && strategy != wants && !raw.sweep.varies("continual.strategy") {
            c.fail(
                &path,
                format!("`{path}` is set but continual.strategy = \"{strategy}\": set strategy = \"{wants}\" or remove it"),
            );
        }
    }
}

/// Paper tables: a usable file name, a `split.metric`, and row/column keys the config has.
fn report(c: &mut Checker, raw: &RawDoc) {
    let mut names: Vec<&str> = Vec::new();
    for (i, t) in raw.report.table.iter().enumerate() {
        let at = |k: &str| format!("report.table.{i}.{k}");
        let ok_name = !t.name.is_empty()
            && t.name
                .chars()
                .all(|ch| ch.is_ascii_alphanumeric() || matches!(ch, '-' | '_'));
        c.require(ok_name, &at("name"), || {
            format!(
                "table name {:?} must be non-empty and use only letters, digits, `-` and `_`",
                t.name
            )
        });
        c.require(!names.contains(&t.name.as_str()), &at("name"), || {
            format!("two tables are named {:?}", t.name)
        });
        names.push(&t.name);
        let metric_ok = t
            .metric
            .split_once('.')
            .is_some_and(|(split, m)| !split.is_empty() && !m.is_empty());
        c.require(metric_ok, &at("metric"), || {
            format!(
                "`metric` = {:?} must be `split.metric`, e.g. \"test.accuracy\" or \"dev.macro_f1\"",
                t.metric
            )
        });
        for (key, path) in [("rows", Some(&t.rows)), ("columns", t.columns.as_ref())] {
            let Some(path) = path else { continue };
            c.require(super::is_key(raw, path) || is_axis(raw, path), &at(key), || {
                format!("`{key}` = {path:?} is not a config key (e.g. \"pretrain.objective\", \"data.split\")")
            });
        }
    }
}

/// Keys that only exist once a sweep sets them (`data.split` has no default value).
fn is_axis(raw: &RawDoc, path: &str) -> bool {
    (path == "data.split" && !raw.sweep.split.is_empty()) || path == "experiment.seed"
}
