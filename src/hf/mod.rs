//! Hugging Face checkpoints: a `config.json` + `model.safetensors` directory of the BERT family
//! (bert, roberta, MiniLM-style BERTs) or GPT-2 becomes xrun's backbone and heads, and back.
//!
//! One table (`each_param`) names every parameter in Hugging Face's terms; import and export both
//! walk it, so the two directions cannot disagree. Nothing loads partially: missing, unexpected and
//! misshapen tensors are listed by name.

pub mod export;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use burn::module::Param;
use burn::nn::{LayerNorm, Linear};
use burn::tensor::backend::Backend;
use burn::tensor::{Tensor, TensorData};
use serde_json::Value;

use crate::model::{Backbone, BackboneConfig, ClassifierHead, Family, LmHead};

pub use export::{export, ExportArgs, WhichHead};

/// A checkpoint's `config.json`, read into xrun's terms.
#[derive(Debug, Clone)]
pub struct HfConfig {
    pub family: Family,
    pub vocab_size: usize,
    pub d_model: usize,
    pub layers: usize,
    pub heads: usize,
    pub d_ff: usize,
    /// Rows of the position table (RoBERTa's include its 2 offset rows).
    pub positions: usize,
    pub type_vocab: usize,
    pub norm_eps: f64,
    pub gelu_tanh: bool,
    pub tie_word_embeddings: bool,
}

impl HfConfig {
    /// Longest input in tokens the position table allows.
    pub fn max_len(&self) -> usize {
        self.positions - self.family.position_offset()
    }

    /// The backbone this checkpoint describes; `sep` numbers segments for the BERT family.
    /// The BERT family gets a pooler (loaded from the checkpoint when it has one).
    pub fn backbone(&self, dropout: f64, sep: u32) -> BackboneConfig {
        let bert = self.family != Family::Gpt2;
        BackboneConfig {
            vocab_size: self.vocab_size,
            d_model: self.d_model,
            layers: self.layers,
            heads: self.heads,
            d_ff: self.d_ff,
            max_len: self.positions,
            dropout,
            pre_norm: !bert,
            causal: !bert,
            segments: (bert && self.type_vocab > 0).then_some(sep),
            type_vocab: self.type_vocab.max(1),
            family: self.family,
            norm_eps: self.norm_eps,
            gelu_tanh: self.gelu_tanh,
            pooler: bert,
        }
    }
}

/// The checkpoint's tokenizer: `tokenizer.json`, else BERT's `vocab.txt`.
pub fn tokenizer_file(dir: &Path) -> Option<PathBuf> {
    ["tokenizer.json", "vocab.txt"]
        .iter()
        .map(|f| dir.join(f))
        .find(|p| p.is_file())
}

/// Loads the checkpoint's tokenizer. A bare `vocab.txt` becomes BERT's WordPiece, lowercasing
/// unless `tokenizer_config.json` says `do_lower_case = false`.
pub fn load_tokenizer(dir: &Path) -> Result<crate::tokenizer::TextTokenizer, String> {
    let file = tokenizer_file(dir)
        .ok_or_else(|| format!("{}: no tokenizer.json (nor vocab.txt)", dir.display()))?;
    if file.ends_with("tokenizer.json") {
        return crate::tokenizer::TextTokenizer::load(&file).map_err(|e| e.to_string());
    }
    let lowercase = std::fs::read_to_string(dir.join("tokenizer_config.json"))
        .ok()
        .and_then(|t| serde_json::from_str::<Value>(&t).ok())
        .and_then(|j| j.get("do_lower_case").and_then(Value::as_bool))
        .unwrap_or(true);
    crate::tokenizer::TextTokenizer::from_vocab(&file, lowercase).map_err(|e| e.to_string())
}

/// The files whose content identifies a checkpoint (for cache keys): config, weights, tokenizer.
pub fn checkpoint_files(dir: &Path) -> Vec<PathBuf> {
    let mut files = vec![config_path(dir)];
    let index = dir.join("model.safetensors.index.json");
    let single = dir.join("model.safetensors");
    if single.is_file() {
        files.push(single);
    } else if index.is_file() {
        files.push(index.clone());
        let shards: BTreeSet<String> = std::fs::read_to_string(&index)
            .ok()
            .and_then(|t| serde_json::from_str::<Value>(&t).ok())
            .and_then(|j| {
                j.get("weight_map").and_then(Value::as_object).map(|m| {
                    m.values()
                        .filter_map(Value::as_str)
                        .map(str::to_string)
                        .collect()
                })
            })
            .unwrap_or_default();
        files.extend(shards.iter().map(|s| dir.join(s)));
    }
    files.extend(tokenizer_file(dir));
    let config = dir.join("tokenizer_config.json");
    if config.is_file() {
        files.push(config);
    }
    files
}

fn config_path(dir: &Path) -> PathBuf {
    dir.join("config.json")
}

/// Reads `DIR/config.json`; every problem names the file and the key.
pub fn read_config(dir: &Path) -> Result<HfConfig, String> {
    let path = config_path(dir);
    let text = std::fs::read_to_string(&path)
        .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let json: Value = serde_json::from_str(&text)
        .map_err(|e| format!("{}: not valid JSON: {e}", path.display()))?;
    let file = path.display().to_string();
    let get = |key: &str| json.get(key).filter(|v| !v.is_null());
    let num = |key: &str| -> Result<usize, String> {
        get(key)
            .and_then(Value::as_u64)
            .map(|v| v as usize)
            .ok_or_else(|| format!("{file}: key `{key}` is missing or not a whole number"))
    };
    let float = |key: &str, default: f64| -> Result<f64, String> {
        match get(key) {
            None => Ok(default),
            Some(v) => v
                .as_f64()
                .ok_or_else(|| format!("{file}: key `{key}` is not a number")),
        }
    };
    let text_of = |key: &str| get(key).and_then(Value::as_str);
    let model_type =
        text_of("model_type").ok_or_else(|| format!("{file}: key `model_type` is missing"))?;
    let family = match model_type {
        "bert" => Family::Bert,
        "roberta" | "xlm-roberta" => Family::Roberta,
        "gpt2" => Family::Gpt2,
        other => {
            return Err(format!(
                "{file}: `model_type` = {other:?} is not supported; xrun imports bert (and \
                 MiniLM-style BERTs), roberta and gpt2"
            ))
        }
    };
    let tie_word_embeddings = get("tie_word_embeddings")
        .and_then(Value::as_bool)
        .unwrap_or(true);
    let gelu = |key: &str, default: &str| -> Result<bool, String> {
        match text_of(key).unwrap_or(default) {
            "gelu" => Ok(false),
            "gelu_new" | "gelu_pytorch_tanh" | "gelu_fast" => Ok(true),
            other => Err(format!(
                "{file}: `{key}` = {other:?} is not supported (gelu, gelu_new, gelu_pytorch_tanh)"
            )),
        }
    };
    if family == Family::Gpt2 {
        let d_model = num("n_embd")?;
        for (key, unsupported) in [
            ("scale_attn_by_inverse_layer_idx", true),
            ("add_cross_attention", true),
            ("scale_attn_weights", false),
        ] {
            if get(key).and_then(Value::as_bool) == Some(unsupported) {
                return Err(format!(
                    "{file}: `{key}` = {unsupported} is not supported by xrun's GPT-2"
                ));
            }
        }
        return Ok(HfConfig {
            family,
            vocab_size: num("vocab_size")?,
            d_model,
            layers: num("n_layer")?,
            heads: num("n_head")?,
            d_ff: if get("n_inner").is_some() {
                num("n_inner")?
            } else {
                4 * d_model
            },
            positions: num("n_positions")?,
            type_vocab: 0,
            norm_eps: float("layer_norm_epsilon", 1e-5)?,
            gelu_tanh: gelu("activation_function", "gelu_new")?,
            tie_word_embeddings,
        });
    }
    if let Some(p) = text_of("position_embedding_type").filter(|p| *p != "absolute") {
        return Err(format!(
            "{file}: `position_embedding_type` = {p:?} is not supported; xrun's BERT has absolute positions"
        ));
    }
    if get("is_decoder").and_then(Value::as_bool) == Some(true) {
        return Err(format!(
            "{file}: `is_decoder` = true (a causal BERT) is not supported"
        ));
    }
    let cfg = HfConfig {
        family,
        vocab_size: num("vocab_size")?,
        d_model: num("hidden_size")?,
        layers: num("num_hidden_layers")?,
        heads: num("num_attention_heads")?,
        d_ff: num("intermediate_size")?,
        positions: num("max_position_embeddings")?,
        type_vocab: if get("type_vocab_size").is_some() {
            num("type_vocab_size")?
        } else {
            2
        },
        norm_eps: float("layer_norm_eps", 1e-12)?,
        gelu_tanh: gelu("hidden_act", "gelu")?,
        tie_word_embeddings,
    };
    if cfg.positions <= family.position_offset() {
        return Err(format!(
            "{file}: `max_position_embeddings` = {} leaves no positions",
            cfg.positions
        ));
    }
    Ok(cfg)
}

/// One checkpoint tensor, as f32.
#[derive(Debug, Clone)]
pub struct HfTensor {
    pub shape: Vec<usize>,
    pub data: Vec<f32>,
}

/// The tensors of `DIR/model.safetensors` (or of its shards), by name.
pub fn read_tensors(dir: &Path) -> Result<BTreeMap<String, HfTensor>, String> {
    let single = dir.join("model.safetensors");
    let index = dir.join("model.safetensors.index.json");
    let files: Vec<PathBuf> = if single.is_file() {
        vec![single]
    } else if index.is_file() {
        let text = std::fs::read_to_string(&index)
            .map_err(|e| format!("cannot read {}: {e}", index.display()))?;
        let json: Value = serde_json::from_str(&text)
            .map_err(|e| format!("{}: not valid JSON: {e}", index.display()))?;
        let map = json
            .get("weight_map")
            .and_then(Value::as_object)
            .ok_or_else(|| format!("{}: key `weight_map` is missing", index.display()))?;
        let shards: BTreeSet<&str> = map.values().filter_map(Value::as_str).collect();
        shards.into_iter().map(|s| dir.join(s)).collect()
    } else if dir.join("pytorch_model.bin").is_file() {
        return Err(format!(
            "{} has pytorch_model.bin but no model.safetensors: xrun reads safetensors. Convert it \
             once with transformers: `AutoModel.from_pretrained(DIR).save_pretrained(DIR, safe_serialization=True)`",
            dir.display()
        ));
    } else {
        return Err(format!(
            "{}: no model.safetensors (nor model.safetensors.index.json)",
            dir.display()
        ));
    };
    let mut out = BTreeMap::new();
    for file in files {
        let bytes =
            std::fs::read(&file).map_err(|e| format!("cannot read {}: {e}", file.display()))?;
        let st = safetensors::SafeTensors::deserialize(&bytes)
            .map_err(|e| format!("{}: not a safetensors file: {e}", file.display()))?;
        for (name, view) in st.tensors() {
            use safetensors::Dtype;
            let raw = view.data();
            let data: Vec<f32> = match view.dtype() {
                Dtype::F32 => raw
                    .chunks_exact(4)
                    .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                    .collect(),
                Dtype::F16 => raw
                    .chunks_exact(2)
                    .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32())
                    .collect(),
                Dtype::BF16 => raw
                    .chunks_exact(2)
                    .map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32())
                    .collect(),
                Dtype::F64 => raw
                    .chunks_exact(8)
                    .map(|c| f64::from_le_bytes(c.try_into().expect("8 bytes")) as f32)
                    .collect(),
                // Integer buffers (BERT's `position_ids`) are not parameters: listed as
                // ignored or unexpected by name, never read.
                _ => Vec::new(),
            };
            out.insert(
                name,
                HfTensor {
                    shape: view.shape().to_vec(),
                    data,
                },
            );
        }
    }
    Ok(out)
}

/// How a Hugging Face tensor lies relative to burn's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layout {
    /// Same shape (embeddings, norms, biases, GPT-2's `Conv1D` weights).
    Plain,
    /// PyTorch `Linear` weights are `[out, in]`, burn's `[in, out]`.
    Transposed,
    /// Part `i` of 3 along the last axis of a fused tensor (GPT-2's `c_attn`).
    Fused(usize),
}

/// A parameter of the model, to read or replace.
pub enum Slot<'a, B: Backend> {
    One(&'a mut Param<Tensor<B, 1>>),
    Two(&'a mut Param<Tensor<B, 2>>),
}

/// What a checkpoint holds or an export writes beside the backbone.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HeadKind {
    None,
    /// The pretraining head (masked or causal LM).
    Lm,
    /// A classifier on the pooled sequence.
    Sequence,
    /// A classifier on every token.
    Token,
}

/// The model's parts, as the table walks them.
pub struct Parts<B: Backend> {
    pub backbone: Backbone<B>,
    pub lm_head: Option<LmHead<B>>,
    pub classifier: Option<ClassifierHead<B>>,
    pub head: HeadKind,
}

/// Calls `f` with every parameter's Hugging Face name (without the model prefix such as
/// `bert.`), its layout, and the parameter.
pub fn each_param<B: Backend>(
    family: Family,
    parts: &mut Parts<B>,
    f: &mut dyn FnMut(&str, Layout, Slot<'_, B>),
) {
    let linear = |f: &mut dyn FnMut(&str, Layout, Slot<'_, B>),
                  name: &str,
                  l: &mut Linear<B>,
                  layout: Layout| {
        f(&format!("{name}.weight"), layout, Slot::Two(&mut l.weight));
        if let Some(b) = &mut l.bias {
            let bias_layout = match layout {
                Layout::Fused(i) => Layout::Fused(i),
                _ => Layout::Plain,
            };
            // The MLM decoders keep their bias beside them, as the head's own.
            let bias = match name {
                "cls.predictions.decoder" => "cls.predictions.bias".to_string(),
                "lm_head.decoder" => "lm_head.bias".to_string(),
                _ => format!("{name}.bias"),
            };
            f(&bias, bias_layout, Slot::One(b));
        }
    };
    let norm = |f: &mut dyn FnMut(&str, Layout, Slot<'_, B>), name: &str, n: &mut LayerNorm<B>| {
        f(
            &format!("{name}.weight"),
            Layout::Plain,
            Slot::One(&mut n.gamma),
        );
        if let Some(b) = &mut n.beta {
            f(&format!("{name}.bias"), Layout::Plain, Slot::One(b));
        }
    };
    let b = &mut parts.backbone;
    if family == Family::Gpt2 {
        f("wte.weight", Layout::Plain, Slot::Two(&mut b.tokens.weight));
        f(
            "wpe.weight",
            Layout::Plain,
            Slot::Two(&mut b.positions.weight),
        );
        for (i, block) in b.blocks.iter_mut().enumerate() {
            let p = format!("h.{i}");
            let a = &mut block.attention;
            norm(f, &format!("{p}.ln_1"), &mut block.norm_attention);
            linear(
                f,
                &format!("{p}.attn.c_attn"),
                &mut a.query,
                Layout::Fused(0),
            );
            linear(f, &format!("{p}.attn.c_attn"), &mut a.key, Layout::Fused(1));
            linear(
                f,
                &format!("{p}.attn.c_attn"),
                &mut a.value,
                Layout::Fused(2),
            );
            linear(f, &format!("{p}.attn.c_proj"), &mut a.output, Layout::Plain);
            norm(f, &format!("{p}.ln_2"), &mut block.norm_feed_forward);
            let ff = &mut block.feed_forward;
            linear(f, &format!("{p}.mlp.c_fc"), &mut ff.up, Layout::Plain);
            linear(f, &format!("{p}.mlp.c_proj"), &mut ff.down, Layout::Plain);
        }
        if let Some(n) = &mut b.final_norm {
            norm(f, "ln_f", n);
        }
    } else {
        let e = "embeddings";
        f(
            &format!("{e}.word_embeddings.weight"),
            Layout::Plain,
            Slot::Two(&mut b.tokens.weight),
        );
        f(
            &format!("{e}.position_embeddings.weight"),
            Layout::Plain,
            Slot::Two(&mut b.positions.weight),
        );
        if let Some(s) = &mut b.segments {
            f(
                &format!("{e}.token_type_embeddings.weight"),
                Layout::Plain,
                Slot::Two(&mut s.weight),
            );
        }
        if let Some(n) = &mut b.embed_norm {
            norm(f, &format!("{e}.LayerNorm"), n);
        }
        for (i, block) in b.blocks.iter_mut().enumerate() {
            let p = format!("encoder.layer.{i}");
            let a = &mut block.attention;
            let t = Layout::Transposed;
            linear(f, &format!("{p}.attention.self.query"), &mut a.query, t);
            linear(f, &format!("{p}.attention.self.key"), &mut a.key, t);
            linear(f, &format!("{p}.attention.self.value"), &mut a.value, t);
            linear(f, &format!("{p}.attention.output.dense"), &mut a.output, t);
            norm(
                f,
                &format!("{p}.attention.output.LayerNorm"),
                &mut block.norm_attention,
            );
            let ff = &mut block.feed_forward;
            linear(f, &format!("{p}.intermediate.dense"), &mut ff.up, t);
            linear(f, &format!("{p}.output.dense"), &mut ff.down, t);
            norm(
                f,
                &format!("{p}.output.LayerNorm"),
                &mut block.norm_feed_forward,
            );
        }
        if let Some(pooler) = &mut b.pooler {
            // RoBERTa's sequence classifier carries its own dense + tanh.
            let name = if family == Family::Roberta && parts.head == HeadKind::Sequence {
                "classifier.dense"
            } else {
                "pooler.dense"
            };
            linear(f, name, pooler, Layout::Transposed);
        }
    }
    let t = Layout::Transposed;
    match parts.head {
        HeadKind::None => {}
        HeadKind::Lm => {
            let h = parts.lm_head.as_mut().expect("an LM head for HeadKind::Lm");
            let (dense, norm_name, decoder) = match family {
                Family::Roberta => ("lm_head.dense", "lm_head.layer_norm", "lm_head.decoder"),
                Family::Gpt2 => ("", "", "lm_head"),
                _ => (
                    "cls.predictions.transform.dense",
                    "cls.predictions.transform.LayerNorm",
                    "cls.predictions.decoder",
                ),
            };
            if let Some(d) = &mut h.dense {
                linear(f, dense, d, t);
            }
            if let Some(n) = &mut h.norm {
                norm(f, norm_name, n);
            }
            linear(f, decoder, &mut h.decoder, t);
        }
        HeadKind::Sequence | HeadKind::Token => {
            let h = parts
                .classifier
                .as_mut()
                .expect("a classifier for a classification head");
            let name = match (family, parts.head) {
                (Family::Gpt2, HeadKind::Sequence) => "score",
                (Family::Roberta, HeadKind::Sequence) => "classifier.out_proj",
                _ => "classifier",
            };
            linear(f, name, &mut h.output, t);
        }
    }
}

/// The name prefix Hugging Face's task models put before the backbone's tensors.
pub fn model_prefix(family: Family) -> &'static str {
    match family {
        Family::Gpt2 => "transformer.",
        Family::Roberta => "roberta.",
        _ => "bert.",
    }
}

/// Tensors that are buffers or heads xrun does not use: (pattern, why), matched as substrings.
const IGNORED: [(&str, &str); 4] = [
    ("position_ids", "a buffer"),
    (".attn.bias", "GPT-2's causal-mask buffer"),
    (".attn.masked_bias", "GPT-2's mask buffer"),
    ("cls.seq_relationship.", "BERT's next-sentence head"),
];

/// An imported model: backbone (with its pooler when the checkpoint has one) and LM head when the
/// checkpoint has one, plus notes on what was left out.
pub struct Imported<B: Backend> {
    pub backbone: Backbone<B>,
    pub lm_head: Option<LmHead<B>>,
    pub notes: Vec<String>,
}

/// Whether a checkpoint has a BERT pooler (`pooler.dense`), under any prefix.
pub fn has_pooler(tensors: &BTreeMap<String, HfTensor>) -> bool {
    tensors.keys().any(|k| k.ends_with("pooler.dense.weight"))
}

/// Loads `dir` into a backbone built from `cfg` (from `read_config`'s `backbone`). The LM head
/// comes too when the checkpoint has one (its decoder tied to the word embeddings where the
/// checkpoint leaves it out).
pub fn import<B: Backend>(
    dir: &Path,
    cfg: &BackboneConfig,
    device: &B::Device,
) -> Result<Imported<B>, String> {
    let hf = read_config(dir)?;
    let mut tensors = read_tensors(dir)?;
    let file = dir.join("model.safetensors").display().to_string();
    let family = cfg.family;
    // Names without the task model's prefix; TF-era BERTs call LayerNorm's parameters gamma/beta.
    let prefix = model_prefix(family);
    tensors = tensors
        .into_iter()
        .map(|(k, v)| {
            let k = k.strip_prefix(prefix).map(str::to_string).unwrap_or(k);
            let k = if k.contains("LayerNorm.") {
                k.replace("LayerNorm.gamma", "LayerNorm.weight")
                    .replace("LayerNorm.beta", "LayerNorm.bias")
            } else {
                k
            };
            (k, v)
        })
        .collect();
    // The decoder's bias is what the forward pass adds; older files keep only its tied twin.
    for (twin, bias) in [
        ("cls.predictions.decoder.bias", "cls.predictions.bias"),
        ("lm_head.decoder.bias", "lm_head.bias"),
    ] {
        if let Some(t) = tensors.remove(twin) {
            tensors.insert(bias.to_string(), t);
        }
    }
    let (lm_names, decoder) = match family {
        Family::Roberta => (
            ["lm_head.dense.weight", "lm_head.bias"],
            "lm_head.decoder.weight",
        ),
        Family::Gpt2 => (["lm_head.weight", "lm_head.weight"], "lm_head.weight"),
        _ => (
            [
                "cls.predictions.transform.dense.weight",
                "cls.predictions.bias",
            ],
            "cls.predictions.decoder.weight",
        ),
    };
    let words = if family == Family::Gpt2 {
        "wte.weight"
    } else {
        "embeddings.word_embeddings.weight"
    };
    let has_lm = lm_names.iter().any(|n| tensors.contains_key(*n))
        || (family == Family::Gpt2 && hf.tie_word_embeddings);
    if has_lm && !tensors.contains_key(decoder) {
        if let Some(w) = tensors.get(words).cloned() {
            // Tied: the checkpoint stores the word embeddings once.
            tensors.insert(decoder.to_string(), w);
        }
    }
    let mut parts = Parts {
        backbone: cfg.init::<B>(device),
        lm_head: has_lm.then(|| cfg.lm_head::<B>(device)),
        classifier: None,
        head: if has_lm { HeadKind::Lm } else { HeadKind::None },
    };
    let mut missing = Vec::new();
    let mut misshapen = Vec::new();
    let mut used = BTreeSet::new();
    // Fused tensors are split once and read by part.
    let mut fresh = Vec::new();
    each_param(family, &mut parts, &mut |name, layout, slot| {
        let Some(t) = tensors.get(name) else {
            if name.starts_with("pooler.") {
                // Base checkpoints saved without a pooler (MLM models): a new one, as
                // transformers initialises it.
                fresh.push(name.to_string());
            } else {
                missing.push(name.to_string());
            }
            return;
        };
        used.insert(name.to_string());
        let want = slot_shape(&slot);
        let got = hf_shape(&want, layout);
        if t.shape != got || t.data.is_empty() {
            misshapen.push(format!(
                "{name}: the checkpoint has {:?}, config.json implies {got:?}",
                t.shape
            ));
            return;
        }
        set_slot(slot, from_hf(t, layout, &want), device);
    });
    let mut unexpected = Vec::new();
    let mut ignored = Vec::new();
    for name in tensors.keys().filter(|k| !used.contains(*k)) {
        if let Some((_, why)) = IGNORED.iter().find(|(p, _)| name.contains(p)) {
            ignored.push(format!("{name} ({why})"));
        } else if name.starts_with("classifier.") || name.starts_with("score.") {
            ignored.push(format!(
                "{name} (a classification head: xrun trains a new one for the task's labels)"
            ));
        } else {
            unexpected.push(name.clone());
        }
    }
    let mut problems = Vec::new();
    if !missing.is_empty() {
        problems.push(format!("missing tensors: {}", list(&missing)));
    }
    if !misshapen.is_empty() {
        problems.push(format!("shape mismatches: {}", list(&misshapen)));
    }
    if !unexpected.is_empty() {
        problems.push(format!(
            "unexpected tensors (not part of a {} model xrun knows): {}",
            family.name(),
            list(&unexpected)
        ));
    }
    if !problems.is_empty() {
        return Err(format!(
            "{file}: cannot import as {} (nothing was loaded): {}",
            family.name(),
            problems.join("; ")
        ));
    }
    let mut notes = Vec::new();
    if !ignored.is_empty() {
        notes.push(format!("not imported: {}", list(&ignored)));
    }
    if !fresh.is_empty() {
        notes.push(format!(
            "no pooler in the checkpoint: a classifier starts from a new one ({})",
            fresh.join(", ")
        ));
    }
    if !has_lm {
        notes.push(
            "the checkpoint has no LM head: a pretraining or prompt stage starts a new one".into(),
        );
    }
    Ok(Imported {
        backbone: parts.backbone,
        lm_head: parts.lm_head,
        notes,
    })
}

/// At most 12 names, then a count.
fn list(names: &[String]) -> String {
    let shown: Vec<&str> = names.iter().take(12).map(String::as_str).collect();
    let more = names.len().saturating_sub(12);
    if more > 0 {
        format!("{} … and {more} more", shown.join(", "))
    } else {
        shown.join(", ")
    }
}

fn slot_shape<B: Backend>(slot: &Slot<'_, B>) -> Vec<usize> {
    match slot {
        Slot::One(p) => p.dims().to_vec(),
        Slot::Two(p) => p.dims().to_vec(),
    }
}

/// The Hugging Face shape of a parameter whose burn shape is `burn`.
fn hf_shape(burn: &[usize], layout: Layout) -> Vec<usize> {
    match layout {
        Layout::Plain => burn.to_vec(),
        Layout::Transposed => burn.iter().rev().copied().collect(),
        Layout::Fused(_) => {
            let mut s = burn.to_vec();
            *s.last_mut().expect("a shape") *= 3;
            s
        }
    }
}

/// A checkpoint tensor rearranged to burn's layout (`want`).
fn from_hf(t: &HfTensor, layout: Layout, want: &[usize]) -> Vec<f32> {
    match layout {
        Layout::Plain => t.data.clone(),
        Layout::Transposed => transpose(&t.data, t.shape[0], t.shape[1]),
        Layout::Fused(i) => {
            let width = *want.last().expect("a shape");
            t.data
                .chunks_exact(3 * width)
                .flat_map(|row| row[i * width..(i + 1) * width].iter().copied())
                .collect()
        }
    }
}

/// `[rows, cols]` row-major → `[cols, rows]`.
fn transpose(data: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    let mut out = vec![0.0; data.len()];
    for r in 0..rows {
        for c in 0..cols {
            out[c * rows + r] = data[r * cols + c];
        }
    }
    out
}

fn set_slot<B: Backend>(slot: Slot<'_, B>, data: Vec<f32>, device: &B::Device) {
    match slot {
        Slot::One(p) => {
            let shape = [p.dims()[0]];
            *p = Param::from_tensor(Tensor::from_data(TensorData::new(data, shape), device));
        }
        Slot::Two(p) => {
            let shape = p.dims();
            *p = Param::from_tensor(Tensor::from_data(TensorData::new(data, shape), device));
        }
    }
}

fn slot_values<B: Backend>(slot: &Slot<'_, B>) -> Vec<f32> {
    let data = match slot {
        Slot::One(p) => p.val().into_data(),
        Slot::Two(p) => p.val().into_data(),
    };
    data.convert::<f32>().to_vec().expect("f32 values")
}

/// The model's tensors under their Hugging Face names (without prefix), fused ones joined.
pub fn hf_tensors<B: Backend>(family: Family, parts: &mut Parts<B>) -> BTreeMap<String, HfTensor> {
    let mut out: BTreeMap<String, HfTensor> = BTreeMap::new();
    // Fused tensors' parts, by part index, in burn's layout.
    let mut fused: BTreeMap<String, BTreeMap<usize, HfTensor>> = BTreeMap::new();
    each_param(family, parts, &mut |name, layout, slot| {
        let shape = slot_shape(&slot);
        let values = slot_values(&slot);
        match layout {
            Layout::Plain => {
                out.insert(
                    name.into(),
                    HfTensor {
                        shape,
                        data: values,
                    },
                );
            }
            Layout::Transposed => {
                out.insert(
                    name.into(),
                    HfTensor {
                        shape: vec![shape[1], shape[0]],
                        data: transpose(&values, shape[0], shape[1]),
                    },
                );
            }
            Layout::Fused(i) => {
                fused.entry(name.into()).or_default().insert(
                    i,
                    HfTensor {
                        shape,
                        data: values,
                    },
                );
            }
        }
    });
    for (name, pieces) in fused {
        let mut shape = pieces[&0].shape.clone();
        let width = *shape.last().expect("a shape");
        let rows = pieces[&0].data.len() / width;
        let mut data = Vec::with_capacity(rows * width * 3);
        for r in 0..rows {
            for piece in pieces.values() {
                data.extend_from_slice(&piece.data[r * width..(r + 1) * width]);
            }
        }
        *shape.last_mut().expect("a shape") *= 3;
        out.insert(name, HfTensor { shape, data });
    }
    out
}

/// Writes tensors as one `model.safetensors` (f32).
pub fn write_safetensors(path: &Path, tensors: &BTreeMap<String, HfTensor>) -> Result<(), String> {
    let bytes: Vec<(String, Vec<usize>, Vec<u8>)> = tensors
        .iter()
        .map(|(k, t)| {
            (
                k.clone(),
                t.shape.clone(),
                t.data.iter().flat_map(|v| v.to_le_bytes()).collect(),
            )
        })
        .collect();
    let views = bytes
        .iter()
        .map(|(k, shape, b)| {
            safetensors::tensor::TensorView::new(safetensors::Dtype::F32, shape.clone(), b)
                .map(|v| (k.clone(), v))
                .map_err(|e| format!("tensor {k}: {e}"))
        })
        .collect::<Result<Vec<_>, String>>()?;
    let meta = std::collections::HashMap::from([("format".to_string(), "pt".to_string())]);
    safetensors::serialize_to_file(views, Some(meta), path)
        .map_err(|e| format!("cannot write {}: {e}", path.display()))
}

#[cfg(test)]
mod tests;
