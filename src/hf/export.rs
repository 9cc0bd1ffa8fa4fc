//! `xrun export RUN_DIR --format hf --out DIR`: a trial's model as a directory transformers loads
//! (`config.json`, `model.safetensors`, the tokenizer, a model card).

use std::path::{Path, PathBuf};

use burn::module::Module;
use serde_json::{json, Value};

use burn::tensor::backend::Backend;

use super::{hf_tensors, model_prefix, write_safetensors, HeadKind, Parts};
use crate::config::train::Method;
use crate::config::RawDoc;
use crate::model::{BackboneConfig, Classifier, Family, LmModel};
use crate::report::RunSummary;
use crate::tokenizer::{Specials, TextTokenizer};
use crate::train::backend::Cpu;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum WhichHead {
    /// The fine-tuned classifier when the trial has one, else the pretraining LM head.
    Auto,
    /// The pretraining (masked or causal) LM head.
    Lm,
    /// The fine-tuned classifier.
    Classifier,
    /// The backbone alone (`AutoModel`).
    Base,
}

pub struct ExportArgs {
    pub run_dir: PathBuf,
    pub trial: Option<String>,
    pub out: PathBuf,
    pub head: WhichHead,
}

/// A trial's folder: `path` itself, or the one trial of a run directory, or `--trial`'s.
fn trial_dir(path: &Path, trial: Option<&str>) -> Result<PathBuf, String> {
    if path.join("summary.json").is_file() && trial.is_none() {
        return Ok(path.to_path_buf());
    }
    let trials = path.join("trials");
    if let Some(t) = trial {
        let dir = trials.join(t);
        return if dir.join("summary.json").is_file() {
            Ok(dir)
        } else {
            Err(format!("no trial `{t}` in {}", trials.display()))
        };
    }
    let mut ids: Vec<String> = std::fs::read_dir(&trials)
        .map_err(|_| {
            format!(
                "{} is neither a trial folder (summary.json) nor a run directory (trials/)",
                path.display()
            )
        })?
        .filter_map(|e| e.ok())
        .filter(|e| e.path().join("summary.json").is_file())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    ids.sort();
    match ids.len() {
        1 => Ok(trials.join(&ids[0])),
        0 => Err(format!("{} has no finished trial", trials.display())),
        _ => Err(format!(
            "{} has {} trials: name one with --trial ({})",
            path.display(),
            ids.len(),
            ids.join(", ")
        )),
    }
}

/// The Hugging Face family a backbone is written as: its own, or BERT for xrun's post-norm
/// bidirectional layout and GPT-2 for its pre-norm causal one.
fn target_family(cfg: &BackboneConfig, head: HeadKind) -> Result<Family, String> {
    match cfg.family {
        Family::Xrun if !cfg.pre_norm && !cfg.causal => {
            if head == HeadKind::Sequence {
                return Err("this model was trained by xrun without BERT's pooler, which \
                    BertForSequenceClassification applies: its classifier has no transformers \
                    equivalent. Export the backbone (`--head base`) or the LM (`--head lm`), or \
                    start from an imported BERT (`model.init`)"
                    .into());
            }
            Ok(Family::Bert)
        }
        Family::Xrun if cfg.pre_norm && cfg.causal => {
            if head != HeadKind::None {
                return Err("xrun's own pre-norm causal model has BERT-style heads (an LM head \
                    with a transform, a classifier with bias) that GPT-2's heads cannot hold: \
                    export the backbone with `--head base` (GPT2Model), or start from an \
                    imported GPT-2 (`model.init`)"
                    .into());
            }
            Ok(Family::Gpt2)
        }
        Family::Xrun => Err(format!(
            "a {} {} backbone has no transformers equivalent: BERT is post-norm and \
             bidirectional (`model.norm = \"post\"`, objective mlm or none), GPT-2 pre-norm and causal",
            if cfg.pre_norm { "pre-norm" } else { "post-norm" },
            if cfg.causal { "causal" } else { "bidirectional" },
        )),
        f => Ok(f),
    }
}

fn architecture(family: Family, head: HeadKind) -> &'static str {
    match (family, head) {
        (Family::Gpt2, HeadKind::None) => "GPT2Model",
        (Family::Gpt2, HeadKind::Lm) => "GPT2LMHeadModel",
        (Family::Gpt2, HeadKind::Sequence) => "GPT2ForSequenceClassification",
        (Family::Gpt2, HeadKind::Token) => "GPT2ForTokenClassification",
        (Family::Roberta, HeadKind::None) => "RobertaModel",
        (Family::Roberta, HeadKind::Lm) => "RobertaForMaskedLM",
        (Family::Roberta, HeadKind::Sequence) => "RobertaForSequenceClassification",
        (Family::Roberta, HeadKind::Token) => "RobertaForTokenClassification",
        (_, HeadKind::None) => "BertModel",
        (_, HeadKind::Lm) => "BertForMaskedLM",
        (_, HeadKind::Sequence) => "BertForSequenceClassification",
        (_, HeadKind::Token) => "BertForTokenClassification",
    }
}

/// Writes the export; returns a line saying what was written.
pub fn export(args: &ExportArgs) -> Result<String, String> {
    let dir = trial_dir(&args.run_dir, args.trial.as_deref())?;
    let summary: RunSummary = crate::report::read_json(&dir.join("summary.json"))?;
    let config_path = dir.join("config.resolved.toml");
    let config_text = std::fs::read_to_string(&config_path)
        .map_err(|e| format!("cannot read {}: {e}", config_path.display()))?;
    let raw: RawDoc =
        toml::from_str(&config_text).map_err(|e| format!("{}: {e}", config_path.display()))?;
    let cfg = summary.model.clone().ok_or_else(|| {
        format!(
            "{}: the trial has no model (it stopped before the pretraining stage)",
            dir.display()
        )
    })?;
    let tokenizer = TextTokenizer::load(&dir.join("tokenizer.json")).map_err(|e| e.to_string())?;
    let finetuned = dir.join("checkpoints/finetune.mpk");
    let pretrained = dir.join("checkpoints/pretrain.mpk");
    let method = raw.finetune.method;
    let prompt = matches!(method, Method::ZeroShot | Method::Pet);
    let tagging = summary.tag_scheme.is_some();
    let classifier_head = if tagging {
        HeadKind::Token
    } else {
        HeadKind::Sequence
    };
    let head = match args.head {
        WhichHead::Auto if finetuned.is_file() && !prompt => classifier_head,
        WhichHead::Auto | WhichHead::Lm => HeadKind::Lm,
        WhichHead::Classifier => classifier_head,
        WhichHead::Base => HeadKind::None,
    };
    if raw.continual.is_some() && head != HeadKind::Lm {
        return Err(
            "a continual-learning trial's model has a head per task, which no \
            transformers class holds; export its LM (`--head lm`) if it was pretrained"
                .into(),
        );
    }
    let family = target_family(&cfg, head)?;
    let device = Default::default();
    let (parts, source) =
        if head == HeadKind::Lm || (head == HeadKind::None && (prompt || !finetuned.is_file())) {
            // Zero-shot and PET trials keep their LM (PET's tuned) as the fine-tuned model.
            let file = if prompt && finetuned.is_file() {
                finetuned.clone()
            } else {
                pretrained.clone()
            };
            if !file.is_file() {
                return Err(format!(
                    "{}: no pretrained model to export (the trial has no pretraining stage{})",
                    dir.display(),
                    if finetuned.is_file() {
                        "; its classifier exports with `--head classifier`"
                    } else {
                        ""
                    }
                ));
            }
            let model = LmModel::<Cpu> {
                backbone: cfg.init(&device),
                head: cfg.lm_head(&device),
            }
            .load_file(
                file.with_extension(""),
                &burn::record::NamedMpkFileRecorder::<burn::record::FullPrecisionSettings>::new(),
                &device,
            )
            .map_err(|e| format!("cannot load {}: {e}", file.display()))?;
            (
                Parts {
                    backbone: model.backbone,
                    lm_head: Some(model.head),
                    classifier: None,
                    head,
                },
                file,
            )
        } else {
            if prompt || !finetuned.is_file() {
                return Err(format!(
                    "{}: no fine-tuned classifier to export{}",
                    dir.display(),
                    if prompt {
                        " (zero-shot and PET score through the LM head: use `--head lm`)"
                    } else {
                        ""
                    }
                ));
            }
            let backbone = match method {
                Method::Lora => cfg
                    .init::<Cpu>(&device)
                    .with_lora(&raw.finetune.lora.clone().unwrap_or_default(), &device),
                Method::Adapter | Method::Prefix => {
                    return Err(format!(
                        "finetune.method = \"{}\" adds layers no transformers class has; full \
                     fine-tuning, linear probes and LoRA (merged) export",
                        method.name()
                    ))
                }
                _ => cfg.init::<Cpu>(&device),
            };
            let classes = summary.labels.len();
            let model = Classifier::<Cpu> {
                backbone,
                head: cfg.classifier_head(classes, tagging, &device),
            }
            .load_file(
                finetuned.with_extension(""),
                &burn::record::NamedMpkFileRecorder::<burn::record::FullPrecisionSettings>::new(),
                &device,
            )
            .map_err(|e| format!("cannot load {}: {e}", finetuned.display()))?;
            let backbone = model.backbone.merge_lora();
            (
                Parts {
                    backbone,
                    lm_head: None,
                    classifier: Some(model.head),
                    head,
                },
                finetuned.clone(),
            )
        };
    write_model(
        &args.out,
        family,
        &cfg,
        tokenizer.specials,
        &summary.labels,
        parts,
    )?;
    let max_len = raw.model.max_len;
    write_tokenizer(&dir, &args.out, &tokenizer, max_len)?;
    let card = model_card(&summary, &raw, family, head, &source, &args.out);
    std::fs::write(args.out.join("README.md"), card)
        .map_err(|e| format!("cannot write the model card: {e}"))?;
    Ok(format!(
        "exported {} ({}) from {} to {}",
        architecture(family, head),
        summary.trial,
        source.display(),
        args.out.display()
    ))
}

/// Writes `config.json` and `model.safetensors` for `parts` as a `family` model.
pub fn write_model<B: Backend>(
    out: &Path,
    family: Family,
    cfg: &BackboneConfig,
    specials: Specials,
    labels: &[String],
    mut parts: Parts<B>,
) -> Result<(), String> {
    let head = parts.head;
    if matches!(head, HeadKind::Lm | HeadKind::Token) {
        // The masked-LM and token-classification models have no pooler.
        parts.backbone.pooler = None;
    }
    let mut tensors = hf_tensors(family, &mut parts);
    if family == Family::Bert && parts.backbone.segments.is_none() {
        // BERT always adds a token-type embedding: segment 0's, zero here, changes nothing.
        tensors.insert(
            "embeddings.token_type_embeddings.weight".into(),
            super::HfTensor {
                shape: vec![2, cfg.d_model],
                data: vec![0.0; 2 * cfg.d_model],
            },
        );
    }
    // transformers 5 reads an untied decoder's bias from `decoder.bias`; 4 from its tied twin.
    for (bias, twin) in [
        ("cls.predictions.bias", "cls.predictions.decoder.bias"),
        ("lm_head.bias", "lm_head.decoder.bias"),
    ] {
        if let Some(t) = tensors.get(bias).cloned() {
            tensors.insert(twin.to_string(), t);
        }
    }
    if head != HeadKind::None {
        // Task models keep the backbone under a prefix (`bert.`), the head beside it.
        let prefix = model_prefix(family);
        let is_head = |k: &str| {
            ["cls.", "lm_head", "classifier.", "score."]
                .iter()
                .any(|h| k.starts_with(h))
        };
        tensors = tensors
            .into_iter()
            .map(|(k, v)| {
                if is_head(&k) {
                    (k, v)
                } else {
                    (format!("{prefix}{k}"), v)
                }
            })
            .collect();
    }
    std::fs::create_dir_all(out).map_err(|e| format!("cannot create {}: {e}", out.display()))?;
    write_safetensors(&out.join("model.safetensors"), &tensors)?;
    let config = hf_config(family, head, cfg, specials, labels);
    write_json(&out.join("config.json"), &config)
}

fn write_json(path: &Path, value: &Value) -> Result<(), String> {
    let text = serde_json::to_string_pretty(value).map_err(|e| e.to_string())?;
    std::fs::write(path, text + "\n").map_err(|e| format!("cannot write {}: {e}", path.display()))
}

fn hf_config(
    family: Family,
    head: HeadKind,
    cfg: &BackboneConfig,
    s: Specials,
    labels: &[String],
) -> Value {
    let act = if cfg.gelu_tanh { "gelu_new" } else { "gelu" };
    let mut config = if family == Family::Gpt2 {
        json!({
            "model_type": "gpt2",
            "vocab_size": cfg.vocab_size,
            "n_embd": cfg.d_model,
            "n_layer": cfg.layers,
            "n_head": cfg.heads,
            "n_inner": cfg.d_ff,
            "n_positions": cfg.max_len,
            "activation_function": act,
            "layer_norm_epsilon": cfg.norm_eps,
            "resid_pdrop": cfg.dropout,
            "embd_pdrop": cfg.dropout,
            "attn_pdrop": 0.0,
            "summary_pdrop": cfg.dropout,
            "bos_token_id": s.cls,
            "eos_token_id": s.sep,
            "pad_token_id": s.pad,
        })
    } else {
        json!({
            "model_type": family.name(),
            "vocab_size": cfg.vocab_size,
            "hidden_size": cfg.d_model,
            "num_hidden_layers": cfg.layers,
            "num_attention_heads": cfg.heads,
            "intermediate_size": cfg.d_ff,
            "max_position_embeddings": cfg.max_len,
            "type_vocab_size": if cfg.segments.is_some() { cfg.type_vocab } else { 2 },
            "hidden_act": act,
            "layer_norm_eps": cfg.norm_eps,
            "hidden_dropout_prob": cfg.dropout,
            "attention_probs_dropout_prob": 0.0,
            "position_embedding_type": "absolute",
            "pad_token_id": s.pad,
            "bos_token_id": s.cls,
            "eos_token_id": s.sep,
        })
    };
    let c = config.as_object_mut().expect("an object");
    c.insert("architectures".into(), json!([architecture(family, head)]));
    // xrun trains the LM head's projection apart from the word embeddings.
    c.insert("tie_word_embeddings".into(), json!(false));
    c.insert("torch_dtype".into(), json!("float32"));
    if matches!(head, HeadKind::Sequence | HeadKind::Token) {
        let id2label: serde_json::Map<String, Value> = labels
            .iter()
            .enumerate()
            .map(|(i, l)| (i.to_string(), json!(l)))
            .collect();
        let label2id: serde_json::Map<String, Value> = labels
            .iter()
            .enumerate()
            .map(|(i, l)| (l.clone(), json!(i)))
            .collect();
        c.insert("id2label".into(), Value::Object(id2label));
        c.insert("label2id".into(), Value::Object(label2id));
        c.insert("problem_type".into(), json!("single_label_classification"));
    }
    config
}

/// `tokenizer.json` with a post-processor that frames texts as xrun does (`[CLS] a [SEP]`,
/// `[CLS] a [SEP] b [SEP]`), and the `tokenizer_config.json` transformers reads.
fn write_tokenizer(
    trial: &Path,
    out: &Path,
    tokenizer: &TextTokenizer,
    max_len: usize,
) -> Result<(), String> {
    let path = trial.join("tokenizer.json");
    let text = std::fs::read_to_string(&path)
        .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let mut json: Value =
        serde_json::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))?;
    let s = tokenizer.specials;
    let name = |id: u32| {
        tokenizer
            .token(id)
            .ok_or_else(|| format!("{}: no token for id {id}", path.display()))
    };
    let (cls, sep, pad, unk, mask) = (
        name(s.cls)?,
        name(s.sep)?,
        name(s.pad)?,
        name(s.unk)?,
        name(s.mask)?,
    );
    let special = |t: &str, type_id: u32| json!({"SpecialToken": {"id": t, "type_id": type_id}});
    let seq = |id: &str, type_id: u32| json!({"Sequence": {"id": id, "type_id": type_id}});
    let mut specials = serde_json::Map::new();
    for (t, id) in [(&cls, s.cls), (&sep, s.sep)] {
        specials.insert(t.clone(), json!({"id": t, "ids": [id], "tokens": [t]}));
    }
    let (single, pair) = if tokenizer.closes() {
        (
            json!([special(&cls, 0), seq("A", 0), special(&sep, 0)]),
            json!([
                special(&cls, 0),
                seq("A", 0),
                special(&sep, 0),
                seq("B", 1),
                special(&sep, 1)
            ]),
        )
    } else {
        // GPT-2's framing in xrun: `<|endoftext|> a` and `<|endoftext|> a <|endoftext|> b`.
        (
            json!([special(&cls, 0), seq("A", 0)]),
            json!([special(&cls, 0), seq("A", 0), special(&sep, 0), seq("B", 1)]),
        )
    };
    json["post_processor"] = json!({
        "type": "TemplateProcessing",
        "single": single,
        "pair": pair,
        "special_tokens": specials,
    });
    write_json(&out.join("tokenizer.json"), &json)?;
    write_json(
        &out.join("tokenizer_config.json"),
        &json!({
            "tokenizer_class": "PreTrainedTokenizerFast",
            "model_max_length": max_len,
            "padding_side": "right",
            "truncation_side": "right",
            "cls_token": cls,
            "sep_token": sep,
            "pad_token": pad,
            "unk_token": unk,
            "mask_token": mask,
            "bos_token": cls,
            "eos_token": sep,
        }),
    )
}

fn model_card(
    summary: &RunSummary,
    raw: &RawDoc,
    family: Family,
    head: HeadKind,
    source: &Path,
    out: &Path,
) -> String {
    let mut card = String::new();
    let arch = architecture(family, head);
    card.push_str("---\nlibrary_name: transformers\ntags:\n- xrun\n");
    card.push_str(&format!(
        "pipeline_tag: {}\n---\n\n",
        match head {
            HeadKind::Lm if family == Family::Gpt2 => "text-generation",
            HeadKind::Lm => "fill-mask",
            HeadKind::Sequence => "text-classification",
            HeadKind::Token => "token-classification",
            HeadKind::None => "feature-extraction",
        }
    ));
    card.push_str(&format!(
        "# {} — {}\n\n{}\n\n",
        summary.name, summary.trial, summary.description
    ));
    card.push_str(&format!(
        "A `{arch}` exported by xrun {} from `{}`{}.\n\n",
        summary.xrun_version,
        source.display(),
        summary
            .git_commit
            .as_deref()
            .map(|c| format!(" (xrun commit {c})"))
            .unwrap_or_default()
    ));
    card.push_str(&format!(
        "Load it with `transformers.{}.from_pretrained(\"{}\")` and `AutoTokenizer`. \
         The tokenizer frames inputs as xrun did during training (`[CLS] text [SEP]`; truncate \
         to {} tokens).\n\n",
        match head {
            HeadKind::None => "AutoModel",
            HeadKind::Lm if family == Family::Gpt2 => "AutoModelForCausalLM",
            HeadKind::Lm => "AutoModelForMaskedLM",
            HeadKind::Sequence => "AutoModelForSequenceClassification",
            HeadKind::Token => "AutoModelForTokenClassification",
        },
        out.display(),
        raw.model.max_len
    ));
    card.push_str("## Experiment\n\n");
    card.push_str(&format!(
        "- experiment file: `{}`\n- trial: `{}`\n- pretraining objective: {}\n- fine-tuning method: {}\n- seed: {}\n- data root: `{}`\n",
        summary.experiment_file,
        summary.trial,
        summary.objective,
        summary.method,
        summary.seed,
        summary.data_root
    ));
    if let Some(init) = &raw.model.init {
        card.push_str(&format!(
            "- initialised from the Hugging Face checkpoint `{}`\n",
            init.hf
        ));
    }
    card.push_str("\n## Data\n\n| split | examples |\n|---|---:|\n");
    for s in &summary.data {
        card.push_str(&format!("| {} | {} |\n", s.name, s.examples));
    }
    if !summary.scores.is_empty() {
        card.push_str("\n## Metrics\n\n| split | examples | accuracy | macro-F1 | entity F1 |\n|---|---:|---:|---:|---:|\n");
        for (split, s) in &summary.scores {
            card.push_str(&format!(
                "| {split} | {} | {:.2} | {:.2} | {} |\n",
                s.n,
                100.0 * s.accuracy,
                100.0 * s.macro_f1,
                s.entities
                    .as_ref()
                    .map(|e| format!("{:.2}", 100.0 * e.f1))
                    .unwrap_or_else(|| "–".into())
            ));
        }
    }
    if !summary.labels.is_empty() && head != HeadKind::Lm && head != HeadKind::None {
        card.push_str(&format!(
            "\nLabels (in id order): {}\n",
            summary.labels.join(", ")
        ));
    }
    card.push_str(&format!(
        "\n## Experiment file\n\n```toml\n{}\n```\n",
        summary.config_toml.trim_end()
    ));
    card
}
