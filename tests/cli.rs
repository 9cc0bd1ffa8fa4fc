//! Integration tests: they drive the `xrun` binary on tiny experiments over the real FewCLUE data in
//! `../shared/data` and check what a user sees (exit codes, messages, files, numbers).

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

const XRUN: &str = env!("CARGO_BIN_EXE_xrun");

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn xrun(dir: &Path, args: &[&str]) -> Output {
    Command::new(XRUN)
        .current_dir(dir)
        .args(args)
        .env_remove("XRUN_DATA_ROOT")
        .env_remove("RAYON_NUM_THREADS")
        .output()
        .expect("the xrun binary runs")
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Runs `experiments/smoke.toml` into a fresh output folder; returns the run directory.
fn smoke(out: &Path, extra: &[&str]) -> PathBuf {
    let out_set = format!("experiment.output_dir={}", out.display());
    let mut args = vec!["experiments/smoke.toml", "--quiet", "--set", &out_set];
    args.extend_from_slice(extra);
    let o = xrun(&root(), &args);
    assert!(o.status.success(), "xrun failed:\n{}", stderr(&o));
    out.join("smoke")
}

fn read_csv(path: &Path) -> Vec<Vec<String>> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(|l| l.split(',').map(str::to_string).collect())
        .collect()
}

/// A study's results.csv row value, found by column name (the swept keys sit between `trial` and
/// `status`).
fn result_of(rows: &[Vec<String>], trial: &str, split: &str, metric: &str) -> f64 {
    let col = |name: &str| rows[0].iter().position(|h| h == name).unwrap();
    let (t, s, m, c, v) = (
        col("trial"),
        col("split"),
        col("metric"),
        col("class"),
        col("value"),
    );
    rows.iter()
        .find(|r| r[t] == trial && r[s] == split && r[m] == metric && r[c].is_empty())
        .unwrap_or_else(|| panic!("no {trial} {split}/{metric} in results.csv"))[v]
        .parse()
        .unwrap()
}

fn result(rows: &[Vec<String>], split: &str, metric: &str) -> f64 {
    result_of(rows, "base", split, metric)
}

fn records(run: &Path, stage: &str, split: &str, metric: &str) -> Vec<f64> {
    use polars::prelude::*;
    let df = xrun::metrics::read_parquet(&run.join("metrics.parquet")).unwrap();
    let mask = df.column("stage").unwrap().str().unwrap().equal(stage)
        & df.column("split").unwrap().str().unwrap().equal(split)
        & df.column("metric").unwrap().str().unwrap().equal(metric);
    let rows = df.filter(&mask).unwrap();
    rows.column("value")
        .unwrap()
        .f64()
        .unwrap()
        .into_no_null_iter()
        .collect()
}

#[test]
fn smoke_runs_end_to_end_and_its_outputs_agree() {
    let tmp = tempfile::tempdir().unwrap();
    let run = smoke(tmp.path(), &[]);
    for f in [
        "index.html",
        "metrics.parquet",
        "results.csv",
        "config.resolved.toml",
        "study.json",
        "journal.jsonl",
        "trials/base/tokenizer.json",
        "trials/base/summary.json",
        "trials/base/index.html",
        "trials/base/checkpoints/pretrain.mpk",
        "trials/base/checkpoints/finetune.mpk",
    ] {
        assert!(run.join(f).is_file(), "{f} missing");
    }
    // Pretraining loss goes down: the mean of the last 5 steps is below the first 5.
    let loss = records(&run, "pretrain", "train", "loss");
    assert_eq!(loss.len(), 30);
    let head: f64 = loss[..5].iter().sum::<f64>() / 5.0;
    let tail: f64 = loss[loss.len() - 5..].iter().sum::<f64>() / 5.0;
    assert!(
        tail < head,
        "pretraining loss did not decrease: {head} → {tail}"
    );
    assert_eq!(
        records(&run, "pretrain", "validation", "perplexity").len(),
        3
    );

    // results.csv, metrics.parquet and the report tell the same story.
    let rows = read_csv(&run.join("results.csv"));
    assert_eq!(
        rows[0],
        vec!["trial", "status", "split", "metric", "class", "value"]
    );
    let test_acc = result(&rows, "test", "accuracy");
    assert!((0.0..=1.0).contains(&test_acc));
    assert_eq!(result(&rows, "test", "examples"), 200.0);
    let dev_curve = records(&run, "finetune", "dev", "accuracy");
    assert_eq!(dev_curve.len(), 3, "one dev evaluation per epoch");
    let best_dev = dev_curve.iter().copied().fold(f64::MIN, f64::max);
    assert!(
        (result(&rows, "dev", "accuracy") - best_dev).abs() < 1e-9,
        "the best dev epoch is the one tested"
    );
    let html = std::fs::read_to_string(run.join("index.html")).unwrap();
    let headline = format!("Test accuracy <strong>{:.2}%</strong>", test_acc * 100.0);
    assert!(html.contains(&headline), "report lacks `{headline}`");
    assert!(html.contains("Content-Security-Policy"));
    assert!(
        !html.contains("<script"),
        "the report must not carry scripts"
    );
    for remote in ["src=\"http", "href=\"http", "url(http", "@import"] {
        assert!(
            !html.contains(remote),
            "the report must load nothing remote: found `{remote}`"
        );
    }
    assert!(html.contains("<svg"), "charts are inline SVG");
}

#[test]
fn the_same_seed_gives_the_same_numbers() {
    let a = tempfile::tempdir().unwrap();
    let b = tempfile::tempdir().unwrap();
    let ra = smoke(a.path(), &["--set", "pretrain.objective=ar"]);
    let rb = smoke(b.path(), &["--set", "pretrain.objective=ar"]);
    assert_eq!(
        std::fs::read_to_string(ra.join("results.csv")).unwrap(),
        std::fs::read_to_string(rb.join("results.csv")).unwrap()
    );
    assert_eq!(
        records(&ra, "pretrain", "train", "loss"),
        records(&rb, "pretrain", "train", "loss")
    );
    let config = std::fs::read_to_string(ra.join("config.resolved.toml")).unwrap();
    assert!(
        config.contains("objective = \"ar\""),
        "--set reaches the resolved config"
    );
}

#[test]
fn overrides_are_typed_and_checked() {
    let o = xrun(
        &root(),
        &[
            "validate",
            "experiments/smoke.toml",
            "--set",
            "model.layerz=2",
            "--set",
            "model.heads=three",
            "--set",
            "model..dropout=0.2",
            "--set",
            "experiment.autotune=\"fastest\"",
        ],
    );
    assert_eq!(o.status.code(), Some(2));
    let err = stderr(&o);
    assert!(
        err.contains("fastest") && err.contains("minimal") && err.contains("full"),
        "an unknown autotune effort lists the efforts: {err}"
    );
    assert!(err.contains("unknown key `layerz` in [model]"), "{err}");
    assert!(err.contains("did you mean `layers`?"), "{err}");
    assert!(err.contains("--set model.heads=three"), "{err}");
    assert!(err.contains("`model..dropout` is not a TOML key"), "{err}");
    assert!(err.contains("4 errors"), "{err}");
    let ok = xrun(
        &root(),
        &[
            "validate",
            "experiments/smoke.toml",
            "--set",
            "model.layers=2",
        ],
    );
    assert!(ok.status.success(), "{}", stderr(&ok));
}

/// The stage keys `xrun plan FILE -v …` prints (`<hash> = {…}` lines), in its order.
fn plan_keys(file: &str, extra: &[&str]) -> Vec<String> {
    let mut args = vec!["plan", file, "-v"];
    args.extend_from_slice(extra);
    let o = xrun(&root(), &args);
    assert!(o.status.success(), "{file}: {}", stderr(&o));
    String::from_utf8_lossy(&o.stdout)
        .lines()
        .filter(|l| l.contains("\"stage\""))
        .map(str::to_string)
        .collect()
}

#[test]
fn shipped_experiments_validate() {
    for file in ["experiments/clue_tnews.toml", "experiments/smoke.toml"] {
        let o = xrun(&root(), &["validate", file]);
        assert!(o.status.success(), "{file}: {}", stderr(&o));
    }
}

/// The methods study promises to reuse the headline's tokenizer, pretrainings and `full`
/// fine-tunings from the cache, and the headline trains on length batches in both stages: every
/// stage key the headline plans is one the methods study plans too.
#[test]
fn the_methods_study_reuses_every_stage_of_the_headline() {
    let keys = |file: &str| -> std::collections::BTreeSet<String> {
        plan_keys(file, &[]).into_iter().collect()
    };
    let headline = keys("experiments/clue_tnews.toml");
    let methods = keys("experiments/fewclue_methods.toml");
    // A tokenizer, two pretrainings and fifteen fine-tunings.
    assert_eq!(headline.len(), 18, "{headline:#?}");
    let trained: Vec<&String> = headline
        .iter()
        .filter(|k| !k.contains("\"stage\":\"tokenizer\""))
        .collect();
    assert_eq!(trained.len(), 17);
    assert!(
        trained
            .iter()
            .all(|k| k.contains("\"batching\":\"length\"")),
        "{trained:#?}"
    );
    let missing: Vec<&String> = headline.difference(&methods).collect();
    assert!(
        missing.is_empty(),
        "not planned by the methods study: {missing:#?}"
    );
}

#[test]
fn data_root_can_be_pointed_elsewhere() {
    let o = Command::new(XRUN)
        .current_dir(root())
        .args(["validate", "experiments/smoke.toml"])
        .env("XRUN_DATA_ROOT", "/nonexistent/data")
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(2));
    assert!(
        stderr(&o).contains("data root is not a folder: /nonexistent/data"),
        "{}",
        stderr(&o)
    );
}

/// Every file in tests/fixtures/invalid fails validation with exit code 2 and the snapshotted message.
#[test]
fn invalid_configs_are_reported_with_their_place() {
    let dir = root().join("tests/fixtures/invalid");
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| n.ends_with(".toml"))
        .collect();
    files.sort();
    assert!(files.len() >= 15, "only {} fixtures", files.len());
    for file in files {
        let o = xrun(&dir, &["validate", &file]);
        assert_eq!(
            o.status.code(),
            Some(2),
            "{file} should be rejected: {}",
            stderr(&o)
        );
        let name = file.trim_end_matches(".toml").to_string();
        insta::assert_snapshot!(name, stderr(&o));
    }
}

#[test]
fn markup_in_labels_and_text_renders_inert() {
    let tmp = tempfile::tempdir().unwrap();
    let data = root().join("../shared/data/fewclue/eprstmt/train_0.json");
    let lines: Vec<String> = std::fs::read_to_string(data)
        .unwrap()
        .lines()
        .take(40)
        .map(|l| {
            let mut v: serde_json::Value = serde_json::from_str(l).unwrap();
            if v["label"] == "Negative" {
                v["label"] = "<script>alert(1)</script>".into();
            }
            v.to_string()
        })
        .collect();
    std::fs::write(tmp.path().join("train.jsonl"), lines.join("\n")).unwrap();
    let toml = r#"
[experiment]
name = "markup"
description = "<img src=x onerror=alert(2)>"

[data]
root = "."

[data.train]
paths = ["train.jsonl"]
text = "sentence"
label = "label"

[data.test]
paths = ["train.jsonl"]
text = "sentence"
label = "label"

[tokenizer]
vocab_size = 500

[model]
d_model = 16
layers = 1
heads = 2
d_ff = 32
max_len = 24

[pretrain]
objective = "none"

[finetune]
epochs = 1
"#;
    std::fs::write(tmp.path().join("markup.toml"), toml).unwrap();
    let o = xrun(tmp.path(), &["markup.toml", "--quiet"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let html = std::fs::read_to_string(tmp.path().join("reports/markup/index.html")).unwrap();
    assert!(!html.contains("<script>alert(1)</script>"));
    assert!(!html.contains("<img src=x"));
    assert!(
        html.contains("&lt;script&gt;alert(1)&lt;&#x2f;script&gt;")
            || html.contains("&lt;script&gt;alert(1)&lt;/script&gt;")
    );
    assert!(html.contains("&lt;img src=x onerror=alert(2)&gt;"));
}

#[test]
fn a_failed_stage_exits_1_and_names_itself() {
    let o = xrun(
        &root(),
        &[
            "experiments/smoke.toml",
            "--quiet",
            "--set",
            "experiment.output_dir=/dev/null/reports",
        ],
    );
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("stage `setup` failed"),
        "{}",
        stderr(&o)
    );
}

#[test]
fn an_unavailable_backend_is_a_clear_error() {
    let o = xrun(
        &root(),
        &["experiments/smoke.toml", "--quiet", "--backend", "cuda"],
    );
    assert_eq!(o.status.code(), Some(2));
    let err = stderr(&o);
    assert!(
        err.contains("backend `cuda` is not available here"),
        "{err}"
    );
    assert!(
        err.contains("libcuda.so.1") && err.contains("libnvrtc"),
        "{err}"
    );
    // The same through the file's key, and no run directory is made.
    let tmp = tempfile::tempdir().unwrap();
    let out_set = format!("experiment.output_dir={}", tmp.path().display());
    let o = xrun(
        &root(),
        &[
            "experiments/smoke.toml",
            "--quiet",
            "--set",
            "experiment.backend=cuda",
            "--set",
            &out_set,
        ],
    );
    assert_eq!(o.status.code(), Some(2));
    assert!(!tmp.path().join("smoke").exists(), "nothing ran");
}

#[test]
fn skipped_lines_are_counted_when_the_file_says_skip() {
    let dir = root().join("tests/fixtures/invalid");
    let o = xrun(
        &dir,
        &[
            "validate",
            "bad_json_line.toml",
            "--set",
            "data.on_error=skip",
        ],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(
        out.contains("valid (2 train examples, 1 label, 1 line skipped)"),
        "{out}"
    );
}

#[test]
fn a_saved_tokenizer_can_be_loaded_by_the_next_experiment() {
    let tmp = tempfile::tempdir().unwrap();
    let first = smoke(&tmp.path().join("a"), &["--set", "pretrain.objective=none"]);
    let saved = first.join("trials/base/tokenizer.json");
    let path_set = format!("tokenizer.path={}", saved.display());
    let second = smoke(
        &tmp.path().join("b"),
        &[
            "--set",
            "pretrain.objective=none",
            "--set",
            "tokenizer.kind=file",
            "--set",
            &path_set,
        ],
    );
    assert_eq!(
        std::fs::read_to_string(first.join("results.csv")).unwrap(),
        std::fs::read_to_string(second.join("results.csv")).unwrap(),
        "the same vocabulary, loaded instead of learned, gives the same run"
    );
}

#[test]
fn a_stage_that_fails_midway_keeps_what_finished_and_says_so_in_the_report() {
    let tmp = tempfile::tempdir().unwrap();
    let first = smoke(&tmp.path().join("a"), &["--set", "pretrain.objective=none"]);
    let broken = tmp.path().join("no_mask.json");
    let json = std::fs::read_to_string(first.join("trials/base/tokenizer.json")).unwrap();
    std::fs::write(&broken, json.replace("[MASK]", "[MASQ]")).unwrap();
    let out_set = format!("experiment.output_dir={}", tmp.path().join("b").display());
    let path_set = format!("tokenizer.path={}", broken.display());
    let o = xrun(
        &root(),
        &[
            "experiments/smoke.toml",
            "-q",
            "--set",
            &out_set,
            "--set",
            "tokenizer.kind=file",
            "--set",
            &path_set,
        ],
    );
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    let err = stderr(&o);
    assert!(err.contains("stage `tokenizer` failed"), "{err}");
    assert!(err.contains("has no [MASK] token"), "{err}");
    let run = tmp.path().join("b/smoke");
    assert!(run.join("config.resolved.toml").is_file());
    let html = std::fs::read_to_string(run.join("index.html")).unwrap();
    assert!(
        html.contains("This run did not finish"),
        "the report names the failure"
    );
    assert!(html.contains("stage `tokenizer` failed"));
}

#[test]
fn report_rerenders_a_run_without_training() {
    let tmp = tempfile::tempdir().unwrap();
    let run = smoke(tmp.path(), &[]);
    let original = std::fs::read_to_string(run.join("index.html")).unwrap();
    std::fs::remove_file(run.join("index.html")).unwrap();
    let o = xrun(&root(), &["report", run.to_str().unwrap()]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(
        std::fs::read_to_string(run.join("index.html")).unwrap(),
        original
    );
    let missing = xrun(&root(), &["report", tmp.path().to_str().unwrap()]);
    assert_eq!(missing.status.code(), Some(2));
    assert!(
        stderr(&missing).contains("is this a run directory?"),
        "{}",
        stderr(&missing)
    );
}

#[test]
fn sentence_pairs_are_read_and_joined() {
    let tmp = tempfile::tempdir().unwrap();
    let toml = format!(
        r#"
[experiment]
name = "pairs"
output_dir = "{out}"

[data]
root = "{root}/../shared/data/fewclue/ocnli"

[data.train]
paths = ["train_0.json"]
text = "sentence1"
text_pair = "sentence2"
label = "label"

[data.test]
paths = ["dev_0.json"]
text = "sentence1"
text_pair = "sentence2"
label = "label"

[tokenizer]
vocab_size = 1000

[model]
d_model = 16
layers = 1
heads = 2
d_ff = 32
max_len = 96

[pretrain]
objective = "none"

[finetune]
epochs = 1
"#,
        out = tmp.path().display(),
        root = root().display()
    );
    std::fs::write(tmp.path().join("pairs.toml"), toml).unwrap();
    let o = xrun(tmp.path(), &["pairs.toml", "-q"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let summary: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(tmp.path().join("pairs/trials/base/summary.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(
        summary["labels"],
        serde_json::json!(["contradiction", "entailment", "neutral"])
    );
    let train = &summary["data"][0];
    assert_eq!(train["name"], "train");
    // Two texts and three special tokens per example: longer than either sentence alone.
    assert!(train["mean_tokens"].as_f64().unwrap() > 25.0, "{train}");
    // Pairs get segment embeddings (sentence A / B) unless the file turns them off.
    let d = 16;
    assert!(
        summary["model"]["segments"].is_u64(),
        "{}",
        summary["model"]
    );
    let with = summary["parameters"].as_u64().unwrap();
    let o = xrun(
        tmp.path(),
        &["pairs.toml", "-q", "--set", "model.segments=false"],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let summary: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(tmp.path().join("pairs/trials/base/summary.json")).unwrap(),
    )
    .unwrap();
    assert!(summary["model"]["segments"].is_null());
    assert_eq!(with - summary["parameters"].as_u64().unwrap(), 2 * d);
}

#[test]
fn a_second_run_on_the_same_directory_refuses() {
    let tmp = tempfile::tempdir().unwrap();
    let out_set = format!("experiment.output_dir={}", tmp.path().display());
    let args = [
        "experiments/smoke.toml",
        "-q",
        "--set",
        &out_set,
        "--set",
        "pretrain.steps=100000",
    ];
    let mut first = Command::new(XRUN)
        .current_dir(root())
        .args(args)
        .env_remove("XRUN_DATA_ROOT")
        .spawn()
        .unwrap();
    // The lock file holds the first run's pid once the lock is taken.
    let lock = tmp.path().join("smoke/.lock");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while std::fs::read_to_string(&lock).map_or(true, |s| s.trim().is_empty()) {
        assert!(
            std::time::Instant::now() < deadline,
            "the first run never took the lock"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let second = xrun(&root(), &args);
    first.kill().unwrap();
    first.wait().unwrap();
    assert_eq!(second.status.code(), Some(1), "{}", stderr(&second));
    let err = stderr(&second);
    assert!(
        err.contains(&format!("xrun (pid {}) is already running", first.id())),
        "{err}"
    );
    // Once the first is gone the directory is free again.
    let third = xrun(
        &root(),
        &["experiments/smoke.toml", "-q", "--set", &out_set],
    );
    assert!(third.status.success(), "{}", stderr(&third));
}

/// Runs a sweep fixture into `out`; returns the process output.
fn sweep(out: &Path, fixture: &str, extra: &[&str]) -> Output {
    let out_set = format!("experiment.output_dir={}", out.display());
    let file = format!("tests/fixtures/sweeps/{fixture}.toml");
    let mut args = vec![file.as_str(), "--quiet", "--set", &out_set];
    args.extend_from_slice(extra);
    xrun(&root(), &args)
}

fn journal(run: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(run.join("journal.jsonl"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

/// Journal events of one kind since the last `start` of the `trial` stage in the given process.
fn events(j: &[serde_json::Value], pid: Option<u64>, stage: &str, event: &str) -> usize {
    j.iter()
        .filter(|e| pid.is_none_or(|p| e["pid"].as_u64() == Some(p)))
        .filter(|e| e["stage"] == stage && e["event"] == event)
        .count()
}

fn last_pid(j: &[serde_json::Value]) -> Option<u64> {
    j.last().and_then(|e| e["pid"].as_u64())
}

#[test]
fn plan_lists_trials_and_stages_without_training() {
    let tmp = tempfile::tempdir().unwrap();
    let out_set = format!("experiment.output_dir={}", tmp.path().display());
    let plan = |extra: &[&str]| {
        let mut args = vec![
            "plan",
            "tests/fixtures/sweeps/fewclue.toml",
            "--set",
            &out_set,
        ];
        args.extend_from_slice(extra);
        let o = xrun(&root(), &args);
        assert!(o.status.success(), "{}", stderr(&o));
        String::from_utf8_lossy(&o.stdout).replace(&tmp.path().display().to_string(), "<out>")
    };
    insta::assert_snapshot!("plan_before", plan(&[]));
    // Backends initialise differently, so they are part of the keys; `auto` is keyed as the
    // backend it picks here (the CPU, or wgpu where Mesa's software Vulkan is installed).
    let named: Vec<String> = ["cpu", "wgpu", "cuda"]
        .iter()
        .map(|b| plan(&["--set", &format!("experiment.backend={b}")]))
        .collect();
    assert_eq!(named[0], plan(&[]));
    assert_ne!(named[0], named[1]);
    assert_ne!(named[1], named[2]);
    assert!(
        named.contains(&plan(&["--set", "experiment.backend=auto"])),
        "`auto` is keyed as the backend it picks"
    );
    assert!(
        !tmp.path().join("fewclue_tiny").exists(),
        "plan trains nothing"
    );
    let o = sweep(tmp.path(), "fewclue", &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    // One more learning rate: the old trials keep their ids and stay cached, only new ones run.
    insta::assert_snapshot!(
        "plan_after_adding_a_value",
        plan(&["--set", "sweep.grid.finetune.optim.lr=[2e-4, 5e-4]"])
    );
    // The grid key quoted, as the file writes it, is the same sweep.
    assert_eq!(
        plan(&["--set", "sweep.grid.\"finetune.optim.lr\"=[2e-4, 5e-4]"]),
        plan(&["--set", "sweep.grid.finetune.optim.lr=[2e-4, 5e-4]"])
    );
    // Either spelling replaces the file's entry, written the other way (nested tables there),
    // rather than sweeping the key twice.
    let mlm_only = plan(&["--set", "sweep.grid.pretrain.objective=[\"mlm\"]"]);
    assert_eq!(
        plan(&["--set", "sweep.grid.\"pretrain.objective\"=[\"mlm\"]"]),
        mlm_only
    );
    assert!(
        mlm_only.contains("mlm") && !mlm_only.contains("none"),
        "{mlm_only}"
    );
}

#[test]
fn a_finished_sweep_reruns_nothing_and_a_new_value_runs_only_its_trials() {
    let tmp = tempfile::tempdir().unwrap();
    let run = tmp.path().join("fewclue_tiny");
    let o = sweep(tmp.path(), "fewclue", &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    let first = std::fs::read_to_string(run.join("results.csv")).unwrap();
    let groups = read_csv(&run.join("groups.csv"));
    assert_eq!(
        groups[0],
        [
            "pretrain.objective",
            "split",
            "metric",
            "n",
            "mean",
            "std",
            "median",
            "min",
            "max",
            "ci95"
        ]
    );
    let mlm_test = groups
        .iter()
        .find(|r| r[0] == "mlm" && r[1] == "test" && r[2] == "accuracy")
        .expect("an mlm test accuracy group");
    assert_eq!(mlm_test[3], "3", "three splits per objective");
    let j = journal(&run);
    let pid = last_pid(&j);
    assert_eq!(
        events(&j, pid, "tokenizer", "done"),
        1,
        "one shared tokenizer"
    );
    assert_eq!(
        events(&j, pid, "pretrain", "done"),
        1,
        "one MLM pretraining for 3 splits"
    );
    assert_eq!(events(&j, pid, "finetune", "done"), 6);

    let o = sweep(tmp.path(), "fewclue", &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    let j = journal(&run);
    let pid = last_pid(&j);
    assert_eq!(events(&j, pid, "finetune", "cached"), 6);
    for stage in ["tokenizer", "pretrain", "finetune"] {
        assert_eq!(events(&j, pid, stage, "start"), 0, "{stage} ran again");
    }
    assert_eq!(
        std::fs::read_to_string(run.join("results.csv")).unwrap(),
        first,
        "reused results are the same results"
    );

    let o = sweep(
        tmp.path(),
        "fewclue",
        &["--set", "sweep.grid.finetune.optim.lr=[2e-4, 5e-4]"],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let j = journal(&run);
    let pid = last_pid(&j);
    assert_eq!(events(&j, pid, "tokenizer", "start"), 0);
    assert_eq!(
        events(&j, pid, "pretrain", "start"),
        0,
        "pretraining is reused"
    );
    assert_eq!(
        events(&j, pid, "finetune", "start"),
        6,
        "only the new lr runs"
    );
    assert_eq!(events(&j, pid, "finetune", "cached"), 6);
    let trials = |run: &Path| -> Vec<String> {
        let text = std::fs::read_to_string(run.join("plan.json")).unwrap();
        let plan: Vec<serde_json::Value> = serde_json::from_str(&text).unwrap();
        plan.iter()
            .map(|t| t["id"].as_str().unwrap().to_string())
            .collect()
    };
    assert!(trials(&run).contains(&"lr=0.0005_objective=mlm_split=1".to_string()));
    let html = std::fs::read_to_string(run.join("index.html")).unwrap();
    assert!(
        html.contains("test accuracy against finetune.optim.lr (mean ± std)"),
        "a numeric swept key gets its error-bar chart"
    );
    // The study report and its tables come back from stored results alone.
    for f in ["index.html", "tables/fewclue.md", "tables/fewclue.tex"] {
        std::fs::remove_file(run.join(f)).unwrap();
    }
    let o = xrun(&root(), &["report", run.to_str().unwrap()]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(
        std::fs::read_to_string(run.join("index.html")).unwrap(),
        html
    );
    let md = std::fs::read_to_string(run.join("tables/fewclue.md")).unwrap();
    assert!(
        md.starts_with("**EPRSTMT test accuracy by objective**"),
        "{md}"
    );

    // A value added to an existing axis leaves the other trials' ids alone.
    let before = trials(&run);
    let o = sweep(
        tmp.path(),
        "fewclue",
        &[
            "--set",
            "sweep.grid.finetune.optim.lr=[2e-4, 5e-4]",
            "--set",
            "sweep.grid.pretrain.objective=[\"none\", \"mlm\", \"ar\"]",
        ],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let after = trials(&run);
    assert!(
        before.iter().all(|t| after.contains(t)),
        "{before:?} vs {after:?}"
    );
    assert_eq!(after.len(), 18);
    let j = journal(&run);
    let pid = last_pid(&j);
    assert_eq!(events(&j, pid, "pretrain", "start"), 1, "only AR pretrains");
    assert_eq!(
        events(&j, pid, "finetune", "start"),
        6,
        "only the AR trials run"
    );
}

#[test]
fn a_diverged_trial_is_reported_and_the_sweep_goes_on() {
    let tmp = tempfile::tempdir().unwrap();
    let run = tmp.path().join("fewclue_tiny");
    let extra = [
        "--set",
        "sweep.split=[1]",
        "--set",
        "sweep.grid.finetune.optim.lr=[2e-4, 1e30]",
    ];
    let o = sweep(tmp.path(), "fewclue", &extra);
    assert!(
        o.status.success(),
        "a diverged trial is a result: {}",
        stderr(&o)
    );
    let rows = read_csv(&run.join("results.csv"));
    let status = rows[0].iter().position(|h| h == "status").unwrap();
    let trial = rows[0].iter().position(|h| h == "trial").unwrap();
    for r in &rows[1..] {
        let expected = if r[trial].starts_with("lr=1e30_") {
            "diverged"
        } else {
            "done"
        };
        assert_eq!(r[status], expected, "{r:?}");
    }
    let j = journal(&run);
    let diverged: Vec<&serde_json::Value> = j.iter().filter(|e| e["event"] == "diverged").collect();
    assert_eq!(diverged.len(), 2, "one per objective");
    // The warm-up's first step has a learning rate of 0; the loss is NaN a step or two later.
    assert!(diverged
        .iter()
        .all(|e| e["stage"] == "finetune"
            && e["step"].as_u64().is_some_and(|s| (2..=3).contains(&s))));
    assert!(diverged.iter().all(|e| e["detail"] == "loss became NaN"));
    let html = std::fs::read_to_string(run.join("index.html")).unwrap();
    assert!(
        html.contains("2 of 4 trials did not finish"),
        "the report lists them"
    );
    assert!(html.contains("`finetune` diverged at step"));
    assert!(html.contains("loss became NaN"));
    // Divergence is a cached outcome: the next run does not train it again.
    let o = sweep(tmp.path(), "fewclue", &extra);
    assert!(o.status.success(), "{}", stderr(&o));
    let j = journal(&run);
    assert_eq!(events(&j, last_pid(&j), "finetune", "start"), 0);
}

/// Spawns the resume fixture and kills it (SIGKILL) once the journal holds `count` events matching
/// `stage`/`event` from this process.
fn run_and_kill(out: &Path, stage: &str, event: &str, count: usize) {
    kill_at(out, "resume", "resume_tiny", stage, event, count);
}

/// Runs a sweep fixture and kills it once its journal shows `count` `stage`/`event` entries.
fn kill_at(out: &Path, fixture: &str, name: &str, stage: &str, event: &str, count: usize) {
    let out_set = format!("experiment.output_dir={}", out.display());
    let file = format!("tests/fixtures/sweeps/{fixture}.toml");
    let mut child = Command::new(XRUN)
        .current_dir(root())
        .args([file.as_str(), "-q", "--set", &out_set])
        .env_remove("XRUN_DATA_ROOT")
        .spawn()
        .unwrap();
    let run = out.join(name);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
    loop {
        let j = journal(&run);
        let mine = Some(u64::from(child.id()));
        if events(&j, mine, stage, event) >= count {
            break;
        }
        assert!(
            child.try_wait().unwrap().is_none(),
            "xrun finished before the kill point {stage}/{event} #{count}"
        );
        assert!(
            std::time::Instant::now() < deadline,
            "kill point never reached"
        );
        std::thread::sleep(std::time::Duration::from_millis(2));
    }
    child.kill().unwrap();
    let status = child.wait().unwrap();
    assert!(
        status.code().is_none(),
        "xrun was killed, not finished: {status}"
    );
}

fn loss_curve(run: &Path, trial: &str, stage: &str) -> Vec<f64> {
    use polars::prelude::*;
    let df = xrun::metrics::read_parquet(&run.join("metrics.parquet")).unwrap();
    let mask = df.column("trial").unwrap().str().unwrap().equal(trial)
        & df.column("stage").unwrap().str().unwrap().equal(stage)
        & df.column("metric").unwrap().str().unwrap().equal("loss")
        & df.column("split").unwrap().str().unwrap().equal("train");
    let rows = df.filter(&mask).unwrap();
    rows.column("value")
        .unwrap()
        .f64()
        .unwrap()
        .into_no_null_iter()
        .collect()
}

#[test]
fn killed_at_any_point_and_restarted_gives_the_uninterrupted_results() {
    let tmp = tempfile::tempdir().unwrap();
    let reference = tmp.path().join("reference");
    let o = sweep(&reference, "resume", &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    let expected = std::fs::read_to_string(reference.join("resume_tiny/results.csv")).unwrap();
    let trials = ["objective=mlm_split=1", "objective=mlm_split=few_all"];

    // Kill points: mid-pretraining (after its 2nd checkpoint), mid-fine-tuning of the first
    // trial, and in the second trial after the first finished; the last directory is killed
    // twice before it is allowed to finish.
    let cases: [&[(&str, &str, usize)]; 3] = [
        &[("pretrain", "checkpoint", 2)],
        &[("finetune", "checkpoint", 3)],
        &[("pretrain", "checkpoint", 1), ("finetune", "done", 1)],
    ];
    for (i, kills) in cases.iter().enumerate() {
        let out = tmp.path().join(format!("killed{i}"));
        for &(stage, event, count) in kills.iter() {
            run_and_kill(&out, stage, event, count);
        }
        let o = sweep(&out, "resume", &[]);
        assert!(o.status.success(), "{}", stderr(&o));
        let run = out.join("resume_tiny");
        assert_eq!(
            std::fs::read_to_string(run.join("results.csv")).unwrap(),
            expected,
            "case {i}: results differ from the uninterrupted run"
        );
        for t in trials {
            for stage in ["pretrain", "finetune"] {
                assert_eq!(
                    loss_curve(&run, t, stage),
                    loss_curve(&reference.join("resume_tiny"), t, stage),
                    "case {i}: {t} {stage} loss curve differs"
                );
            }
        }
        let j = journal(&run);
        let pid = last_pid(&j);
        assert_eq!(events(&j, pid, "trial", "start"), 2);
        let resumed = events(&j, pid, "pretrain", "resume") + events(&j, pid, "finetune", "resume");
        match i {
            0 | 1 => assert_eq!(resumed, 1, "case {i}: the interrupted stage resumed"),
            _ => {
                assert_eq!(
                    events(&j, pid, "finetune", "cached"),
                    1,
                    "the finished trial is reused"
                );
                assert_eq!(events(&j, pid, "pretrain", "start"), 0);
            }
        }
        // No half-written entries or checkpoints are left behind.
        let cache = out.join(".cache");
        for stage in ["tokenizer", "pretrain", "finetune"] {
            for e in std::fs::read_dir(cache.join(stage)).unwrap() {
                let name = e.unwrap().file_name().into_string().unwrap();
                assert!(
                    !name.contains(".tmp-") && !name.ends_with(".partial"),
                    "case {i}: left over {stage}/{name}"
                );
            }
        }
    }
}

#[test]
fn gc_removes_what_no_run_references() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path();
    smoke(out, &[]);
    // The same run directory, now with a different pretraining budget: the first run's pretrain and
    // finetune entries are no longer referenced; the tokenizer still is.
    smoke(out, &["--set", "pretrain.steps=20"]);
    let count = |stage: &str| {
        std::fs::read_dir(out.join(".cache").join(stage))
            .unwrap()
            .filter(|e| {
                !e.as_ref()
                    .unwrap()
                    .file_name()
                    .to_string_lossy()
                    .contains('.')
            })
            .count()
    };
    assert_eq!(
        (count("tokenizer"), count("pretrain"), count("finetune")),
        (1, 2, 2)
    );
    let dry = xrun(&root(), &["gc", "--dry-run", out.to_str().unwrap()]);
    assert!(dry.status.success(), "{}", stderr(&dry));
    let text = String::from_utf8_lossy(&dry.stdout);
    assert!(text.contains("would remove"), "{text}");
    assert_eq!(count("pretrain"), 2, "a dry run removes nothing");
    let real = xrun(&root(), &["gc", out.to_str().unwrap()]);
    assert!(real.status.success(), "{}", stderr(&real));
    assert_eq!(
        (count("tokenizer"), count("pretrain"), count("finetune")),
        (1, 1, 1)
    );
    // What is referenced is still there: the run is all cached.
    smoke(out, &["--set", "pretrain.steps=20"]);
    let j = journal(&out.join("smoke"));
    assert_eq!(events(&j, last_pid(&j), "finetune", "cached"), 1);
}

#[test]
fn two_experiments_sharing_a_cache_compute_each_stage_once() {
    let tmp = tempfile::tempdir().unwrap();
    let out_set = format!("experiment.output_dir={}", tmp.path().display());
    let cache_set = format!(
        "experiment.cache_dir={}",
        tmp.path().join("shared").display()
    );
    let spawn = |name: &str| {
        Command::new(XRUN)
            .current_dir(root())
            .args([
                "experiments/smoke.toml",
                "-q",
                "--set",
                &out_set,
                "--set",
                &cache_set,
                "--set",
                &format!("experiment.name={name}"),
                "--set",
                "pretrain.steps=300",
            ])
            .env_remove("XRUN_DATA_ROOT")
            .stdout(std::process::Stdio::null())
            .spawn()
            .unwrap()
    };
    let (mut a, mut b) = (spawn("a"), spawn("b"));
    assert!(a.wait().unwrap().success());
    assert!(b.wait().unwrap().success());
    let (ja, jb) = (
        journal(&tmp.path().join("a")),
        journal(&tmp.path().join("b")),
    );
    for stage in ["tokenizer", "pretrain", "finetune"] {
        let done = events(&ja, None, stage, "done") + events(&jb, None, stage, "done");
        assert_eq!(done, 1, "{stage} was computed {done} times");
    }
    assert_eq!(
        std::fs::read_to_string(tmp.path().join("a/results.csv")).unwrap(),
        std::fs::read_to_string(tmp.path().join("b/results.csv")).unwrap()
    );
}

#[test]
fn a_diverged_pretraining_marks_every_trial_that_needs_it() {
    let tmp = tempfile::tempdir().unwrap();
    let run = tmp.path().join("fewclue_tiny");
    let extra = [
        "--set",
        "sweep.split=[0, 1]",
        "--set",
        "pretrain.optim.lr=1e30",
    ];
    let o = sweep(tmp.path(), "fewclue", &extra);
    assert!(
        o.status.success(),
        "the none trials finished: {}",
        stderr(&o)
    );
    let j = journal(&run);
    let diverged: Vec<&serde_json::Value> = j.iter().filter(|e| e["event"] == "diverged").collect();
    assert_eq!(diverged.len(), 1, "one shared pretraining, diverged once");
    assert_eq!(diverged[0]["stage"], "pretrain");
    let study: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(run.join("study.json")).unwrap()).unwrap();
    let statuses: Vec<(&str, &str)> = study["trials"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| (t["id"].as_str().unwrap(), t["status"].as_str().unwrap()))
        .collect();
    assert_eq!(
        statuses,
        [
            ("objective=none_split=0", "done"),
            ("objective=none_split=1", "done"),
            ("objective=mlm_split=0", "diverged"),
            ("objective=mlm_split=1", "diverged"),
        ]
    );
    let o = sweep(tmp.path(), "fewclue", &extra);
    assert!(o.status.success(), "{}", stderr(&o));
    let j = journal(&run);
    assert_eq!(
        events(&j, last_pid(&j), "pretrain", "start"),
        0,
        "not trained again"
    );
    assert_eq!(events(&j, last_pid(&j), "pretrain", "cached"), 2);
}

/// A pretraining reused from the cache must fine-tune exactly like the one trained in the same
/// process (it once came back with its parameters frozen).
#[test]
fn a_pretraining_reused_from_the_cache_fine_tunes_like_a_fresh_one() {
    let tmp = tempfile::tempdir().unwrap();
    let alone = tmp.path().join("alone");
    let o = sweep(&alone, "resume", &["--set", "sweep.split=[\"few_all\"]"]);
    assert!(o.status.success(), "{}", stderr(&o));
    // Split 1 runs first and pretrains; few_all then loads that pretraining from the cache.
    let shared = tmp.path().join("shared");
    let o = sweep(&shared, "resume", &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    let j = journal(&shared.join("resume_tiny"));
    assert!(j.iter().any(|e| e["trial"] == "split=few_all"
        && e["stage"] == "pretrain"
        && e["event"] == "cached"));
    let curve = |out: &Path| loss_curve(&out.join("resume_tiny"), "split=few_all", "finetune");
    assert_eq!(curve(&alone), curve(&shared));
    let rows = |out: &Path| read_csv(&out.join("resume_tiny/results.csv"));
    let (a, s) = (rows(&alone), rows(&shared));
    for metric in ["accuracy", "macro_f1"] {
        assert_eq!(
            result_of(&a, "split=few_all", "test", metric),
            result_of(&s, "split=few_all", "test", metric)
        );
    }
}

#[test]
fn label_efficiency_is_a_sweep_axis() {
    let tmp = tempfile::tempdir().unwrap();
    let run = tmp.path().join("fewclue_tiny");
    let o = sweep(
        tmp.path(),
        "fewclue",
        &[
            "--set",
            "sweep.split=[\"few_all\"]",
            "--set",
            "sweep.grid.pretrain.objective=[\"none\"]",
            "--set",
            "sweep.grid.data.train_examples=[8, 32]",
            "--set",
            "sweep.seeds=[1, 2]",
            "--set",
            "data.balanced=true",
        ],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    for (id, n) in [
        ("train_examples=8_objective=none_split=few_all_seed=1", 8),
        ("train_examples=32_objective=none_split=few_all_seed=2", 32),
    ] {
        let summary: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(run.join("trials").join(id).join("summary.json")).unwrap(),
        )
        .unwrap();
        let train = &summary["data"][1];
        assert_eq!(train["name"], "train");
        assert_eq!(train["examples"], n, "{id}");
        // EPRSTMT has two labels: a balanced draw takes half from each.
        let counts: Vec<u64> = train["labels"]
            .as_array()
            .unwrap()
            .iter()
            .map(|l| l[1].as_u64().unwrap())
            .collect();
        assert_eq!(counts, [n / 2, n / 2], "{id}");
    }
    let html = std::fs::read_to_string(run.join("index.html")).unwrap();
    assert!(html.contains("test accuracy against data.train_examples (mean ± std)"));
}

#[test]
fn each_fine_tuning_method_trains_its_own_share_and_says_so() {
    let tmp = tempfile::tempdir().unwrap();
    let run = tmp.path().join("fewclue_tiny");
    let o = sweep(
        tmp.path(),
        "fewclue",
        &[
            "--set",
            "sweep.split=[1]",
            "--set",
            "sweep.grid.pretrain.objective=[\"mlm\"]",
            "--set",
            "sweep.grid.finetune.method=[\"full\", \"linear_probe\", \"lora\", \"adapter\", \"prefix\"]",
        ],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let summary = |method: &str| -> serde_json::Value {
        let id = format!("method={method}_objective=mlm_split=1");
        serde_json::from_str(
            &std::fs::read_to_string(run.join("trials").join(id).join("summary.json")).unwrap(),
        )
        .unwrap()
    };
    let counts = |method: &str| -> (u64, u64) {
        let t = &summary(method)["trainable_parameters"];
        (t[0].as_u64().unwrap(), t[1].as_u64().unwrap())
    };
    let full = counts("full");
    assert_eq!(full.0, full.1, "full fine-tuning trains everything");
    // d_model 32, one layer, 2 labels: the head is 32·2 + 2.
    let head = 32 * 2 + 2;
    let expected = [
        ("linear_probe", head),
        // rank 8 on query and value (the defaults)
        ("lora", head + 2 * (32 * 8 + 8 * 32)),
        // two adapters of the default width 64, and the three LayerNorms (two in the layer, the
        // final one of a pre-norm backbone), scale and shift
        (
            "adapter",
            head + 2 * (32 * 64 + 64 + 64 * 32 + 32) + 3 * 2 * 32,
        ),
        // 16 prefix keys and 16 values of width 32
        ("prefix", head + 2 * 16 * 32),
    ];
    for (method, trained) in expected {
        let (t, total) = counts(method);
        assert_eq!(t, trained, "{method}");
        // The added parts count in the total; the backbone is the same (its LayerNorms train
        // with adapters).
        let norms = if method == "adapter" { 3 * 2 * 32 } else { 0 };
        assert_eq!(total - trained, full.1 - head - norms, "{method}");
        let html = std::fs::read_to_string(run.join(format!(
            "trials/method={method}_objective=mlm_split=1/index.html"
        )))
        .unwrap();
        assert!(
            html.contains(&format!(
                "Fine-tuning method: <strong>{method}</strong>, {trained} of"
            )),
            "{method} report"
        );
        assert!(summary(method)["scores"]
            .as_array()
            .is_some_and(|s| !s.is_empty()));
        // The study's trial list gives the same count and its share.
        let study = std::fs::read_to_string(run.join("index.html")).unwrap();
        assert!(
            study.contains(&format!("<td>{trained} (")),
            "{method} in the study"
        );
    }
    // The methods learn different things from the same pretraining.
    let rows = read_csv(&run.join("results.csv"));
    // `full`, the default, is a value of the method column like any other.
    let method = rows[0].iter().position(|h| h == "finetune.method").unwrap();
    let named: std::collections::BTreeSet<&str> =
        rows[1..].iter().map(|r| r[method].as_str()).collect();
    assert_eq!(
        named.into_iter().collect::<Vec<_>>(),
        ["adapter", "full", "linear_probe", "lora", "prefix"]
    );
    let dev: Vec<f64> = ["full", "linear_probe", "lora", "adapter", "prefix"]
        .iter()
        .map(|m| {
            result_of(
                &rows,
                &format!("method={m}_objective=mlm_split=1"),
                "dev",
                "accuracy",
            )
        })
        .collect();
    assert!(dev.iter().all(|a| (0.0..=1.0).contains(a)), "{dev:?}");
}

#[test]
fn zero_shot_and_prompt_based_fine_tuning_score_labels_through_the_prompt() {
    let tmp = tempfile::tempdir().unwrap();
    let run = tmp.path().join("fewclue_tiny");
    let prompt = "finetune.prompt={template=\"{text}。感觉很{label}。\", verbalizer={Positive=\"好\", Negative=\"差\"}}";
    let args = [
        "--set",
        "sweep.split=[1]",
        "--set",
        "sweep.grid.pretrain.objective=[\"none\", \"mlm\", \"ar\"]",
        "--set",
        "sweep.grid.finetune.method=[\"zero_shot\", \"pet\"]",
        "--set",
        prompt,
    ];
    let o = sweep(tmp.path(), "fewclue", &args);
    assert!(o.status.success(), "{}", stderr(&o));
    let rows = read_csv(&run.join("results.csv"));
    for objective in ["none", "mlm", "ar"] {
        for method in ["zero_shot", "pet"] {
            let id = format!("method={method}_objective={objective}_split=1");
            let dir = run.join("trials").join(&id);
            let s: serde_json::Value =
                serde_json::from_str(&std::fs::read_to_string(dir.join("summary.json")).unwrap())
                    .unwrap();
            assert_eq!(s["method"], method);
            let (trained, total) = (&s["trainable_parameters"][0], &s["trainable_parameters"][1]);
            let losses = records(&dir, "finetune", "train", "loss");
            if method == "zero_shot" {
                assert_eq!(*trained, 0, "{id}: nothing is trained");
                assert!(losses.is_empty(), "{id}: no fine-tuning records");
            } else {
                assert_eq!(trained, total, "{id}: the whole LM trains");
                assert!(
                    !losses.is_empty() && losses.iter().all(|l| l.is_finite()),
                    "{id}"
                );
            }
            for split in ["dev", "test"] {
                let a = result_of(&rows, &id, split, "accuracy");
                assert!((0.0..=1.0).contains(&a), "{id} {split} {a}");
            }
        }
    }
    // A label without a word is an input error that names it.
    let o = sweep(
        tmp.path(),
        "fewclue",
        &[
            "--set",
            "sweep.split=[1]",
            "--set",
            "sweep.grid.pretrain.objective=[\"mlm\"]",
            "--set",
            "finetune.method=\"zero_shot\"",
            "--set",
            "finetune.prompt={template=\"{label}{text}\", verbalizer={Positive=\"好\"}}",
        ],
    );
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("no word for the label `Negative`"),
        "{}",
        stderr(&o)
    );
    // A causal LM cannot score a label placed before the text.
    let o = sweep(
        tmp.path(),
        "fewclue",
        &[
            "--set",
            "sweep.grid.pretrain.objective=[\"ar\"]",
            "--set",
            "finetune.method=\"pet\"",
            "--set",
            "finetune.prompt={template=\"{label}{text}\", verbalizer={Positive=\"好\", Negative=\"差\"}}",
        ],
    );
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("must come after {text}"),
        "{}",
        stderr(&o)
    );
}

#[test]
fn shards_or_parallel_jobs_merge_to_the_whole_runs_results() {
    let tmp = tempfile::tempdir().unwrap();
    let tmp = tmp.path();
    let fixture = "tests/fixtures/sweeps/cluster.toml";
    let set = |out: &Path| format!("experiment.output_dir={}", out.display());
    let whole = tmp.join("whole");
    let o = xrun(&root(), &[fixture, "--quiet", "--set", &set(&whole)]);
    assert!(o.status.success(), "{}", stderr(&o));

    // Two shards at once: they share the tokenizer and the pretraining through the cache locks,
    // and each merges the study after every trial it finishes.
    let sharded = tmp.join("sharded");
    let spawn = |shard: &str| {
        Command::new(XRUN)
            .current_dir(root())
            .args([
                fixture,
                "--quiet",
                "--shard",
                shard,
                "--set",
                &set(&sharded),
            ])
            .env_remove("XRUN_DATA_ROOT")
            .spawn()
            .unwrap()
    };
    let (mut a, mut b) = (spawn("0/2"), spawn("1/2"));
    assert!(a.wait().unwrap().success());
    assert!(b.wait().unwrap().success());
    let run = sharded.join("cluster_tiny");
    let j = journal(&run);
    assert_eq!(events(&j, None, "pretrain", "done"), 1, "{j:?}");
    assert_eq!(events(&j, None, "finetune", "done"), 4, "{j:?}");
    let pids: std::collections::HashSet<u64> = j.iter().filter_map(|e| e["pid"].as_u64()).collect();
    assert_eq!(pids.len(), 2);
    let read = |p: &Path| std::fs::read_to_string(p).unwrap();
    // The study's results and paper table are the whole run's, and the report is complete.
    let same_as_whole = |run: &Path| {
        for file in ["results.csv", "tables/accuracy.md"] {
            let whole = whole.join("cluster_tiny").join(file);
            assert_eq!(read(&run.join(file)), read(&whole), "{file}");
        }
        assert!(!read(&run.join("index.html")).contains("Partial report"));
    };
    same_as_whole(&run);

    // `--jobs 3`: the same job graph run by one xrun, three processes at a time: the tokenizer,
    // then the pretraining, each once, then the four trials, each in its own process.
    let parallel = tmp.join("parallel");
    let jobs = |extra: &[&str]| {
        let out = set(&parallel);
        let mut args = vec![fixture, "--jobs", "3", "--set", out.as_str()];
        args.extend_from_slice(extra);
        xrun(&root(), &args)
    };
    let o = jobs(&[]);
    assert!(o.status.success(), "{}", stderr(&o));
    let run = parallel.join("cluster_tiny");
    let said = stderr(&o);
    assert!(
        said.contains("4 of 4 trials to run, 3 processes at a time"),
        "{said}"
    );
    assert!(said.contains("[4/4] "), "{said}");
    assert_eq!(
        String::from_utf8_lossy(&o.stdout).trim(),
        run.join("index.html").display().to_string()
    );
    let j = journal(&run);
    assert_eq!(events(&j, None, "tokenizer", "done"), 1, "{j:?}");
    assert_eq!(events(&j, None, "pretrain", "done"), 1, "{j:?}");
    assert_eq!(events(&j, None, "finetune", "done"), 4, "{j:?}");
    let pids: std::collections::HashSet<u64> = j.iter().filter_map(|e| e["pid"].as_u64()).collect();
    assert_eq!(
        pids.len(),
        6,
        "a process per stage job and per trial: {j:?}"
    );
    let logs = std::fs::read_dir(run.join("logs")).unwrap().count();
    assert_eq!(logs, 6);
    same_as_whole(&run);
    // Each process sizes burn's CPU pool to its share of the cores, and its report says so.
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    for trial in std::fs::read_dir(run.join("trials")).unwrap() {
        let summary = read(&trial.unwrap().path().join("summary.json"));
        let summary: serde_json::Value = serde_json::from_str(&summary).unwrap();
        assert_eq!(
            summary["device"]["threads"],
            (cores / 3).max(1),
            "{summary}"
        );
    }
    // Run again: every trial has its result, nothing starts.
    let o = jobs(&[]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("0 of 4 trials to run (4 already have a result)"),
        "{}",
        stderr(&o)
    );
    assert_eq!(journal(&run).len(), j.len());

    // A shared stage that fails: each trial tries it, fails and says why; the run exits 1.
    let broken = tmp.join("no_mask.json");
    let tokenizer = read(&run.join("trials/epochs=2_lr=0.001/tokenizer.json"));
    std::fs::write(&broken, tokenizer.replace("[MASK]", "[MASQ]")).unwrap();
    let path = format!("tokenizer.path={}", broken.display());
    let o = jobs(&["--set", "tokenizer.kind=file", "--set", &path]);
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    let said = stderr(&o);
    assert!(said.contains("the tokenizer failed"), "{said}");
    assert!(
        said.contains(
            "error: 4 of 4 trials failed; the first, epochs=2_lr=0.001: stage `tokenizer` failed"
        ),
        "{said}"
    );
    assert!(said.contains("has no [MASK] token"), "{said}");

    // Killed while its pretraining runs: the process training it ends with it (left alone, it
    // would finish in about a second), and the same command finishes the sweep with the whole
    // run's results.
    let killed = tmp.join("killed");
    let out = set(&killed);
    let mut parent = Command::new(XRUN)
        .current_dir(root())
        .args([fixture, "-q", "--jobs", "2", "--set", &out])
        .env_remove("XRUN_DATA_ROOT")
        .spawn()
        .unwrap();
    let run = killed.join("cluster_tiny");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
    while events(&journal(&run), None, "pretrain", "start") == 0 {
        assert!(parent.try_wait().unwrap().is_none(), "finished too early");
        assert!(
            std::time::Instant::now() < deadline,
            "the pretraining never started"
        );
        std::thread::sleep(std::time::Duration::from_millis(2));
    }
    parent.kill().unwrap();
    parent.wait().unwrap();
    let alive = |pid: &u64| {
        std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .is_ok_and(|stat| !stat.contains(") Z "))
    };
    let pids: Vec<u64> = journal(&run)
        .iter()
        .filter_map(|e| e["pid"].as_u64())
        .collect();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while pids.iter().any(alive) {
        assert!(
            std::time::Instant::now() < deadline,
            "processes outlived the run: {:?}",
            pids.iter().filter(|p| alive(p)).collect::<Vec<_>>()
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    assert_eq!(events(&journal(&run), None, "pretrain", "done"), 0);
    let o = xrun(&root(), &[fixture, "--jobs", "2", "--set", &out]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(
        !stderr(&o).contains("0 of 4 trials to run"),
        "{}",
        stderr(&o)
    );
    same_as_whole(&run);
}

#[test]
fn one_trial_or_one_stage_can_be_run_alone() {
    let tmp = tempfile::tempdir().unwrap();
    let tmp = tmp.path();
    let fixture = "tests/fixtures/sweeps/cluster.toml";
    let out = format!("experiment.output_dir={}", tmp.display());
    let args = |extra: &[&str]| {
        let mut a = vec![fixture, "--quiet", "--set", out.as_str()];
        a.extend_from_slice(extra);
        a.into_iter().map(str::to_string).collect::<Vec<_>>()
    };
    let run = |extra: &[&str]| {
        let a = args(extra);
        xrun(&root(), &a.iter().map(String::as_str).collect::<Vec<_>>())
    };
    // A mistyped trial id is an input error that suggests the nearest id.
    let o = run(&["--trial", "epochs=2_lr=0.002"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(
        stderr(&o).contains("did you mean `epochs=2_lr=0.003`"),
        "{}",
        stderr(&o)
    );
    for bad in ["2/2", "1", "a/3", "0/0"] {
        let o = run(&["--shard", bad]);
        assert_eq!(o.status.code(), Some(2), "--shard {bad}");
        assert!(stderr(&o).contains("INDEX/COUNT"), "{}", stderr(&o));
    }
    // A stage job builds the shared pretraining and nothing else.
    let o = run(&["--trial", "epochs=3_lr=0.001", "--until", "pretrain"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let run_dir = tmp.join("cluster_tiny");
    assert!(!run_dir.join("trials/epochs=3_lr=0.001").exists());
    let mut plan_args = vec!["plan".to_string()];
    plan_args.extend(args(&[]).into_iter().filter(|a| a != "--quiet"));
    let plan = xrun(
        &root(),
        &plan_args.iter().map(String::as_str).collect::<Vec<_>>(),
    );
    let plan = String::from_utf8_lossy(&plan.stdout).into_owned();
    assert!(plan.contains("pretrain: 4 cached"), "{plan}");
    assert!(plan.contains("finetune: 4 run"), "{plan}");
    // One trial: its folder, and a study that says the other three are pending.
    let o = run(&["--trial", "epochs=3_lr=0.001"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let study: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(run_dir.join("study.json")).unwrap())
            .unwrap();
    let statuses: Vec<&str> = study["trials"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["status"].as_str().unwrap())
        .collect();
    assert_eq!(statuses, ["pending", "pending", "done", "pending"]);
    let html = std::fs::read_to_string(run_dir.join("index.html")).unwrap();
    assert!(html.contains("Partial report: 3 of 4 trials have not finished yet"));
    let status = xrun(&root(), &["status", fixture, "--set", out.as_str()]);
    let status = String::from_utf8_lossy(&status.stdout).into_owned();
    assert!(status.contains("4 trials: 1 done, 3 not run"), "{status}");
}

/// Numbers pinned on purpose. Cached stages are keyed by their inputs, not by the code's numerics:
/// if a change moves these (the order parameters are first used in, say, which decides the order
/// they draw their initial values in), entries cached before hold other numbers under the same
/// key. When such a change is intended, bump PRETRAIN_REV / FINETUNE_REV in src/plan/keys.rs and
/// update the numbers here.
///
/// They are compared to one part in a million, as the last digits depend on the CPU: gemm sizes
/// its blocks by the caches, which sets the order products sum in. The same code gave 7.180286884
/// on the machines of earlier sessions and 7.180287361 on an AMD EPYC with 1 MiB of L2 per core
/// (8e-8 apart at most, relative). A change of summation order in xrun's own code moves the same
/// digits, so it passes here unseen; whether it needs a new revision is for its author to judge
/// (`by_rows` took one).
#[test]
fn pinned_numbers_catch_changes_that_need_a_new_cache_revision() {
    let tmp = tempfile::tempdir().unwrap();
    let out = format!("experiment.output_dir={}", tmp.path().display());
    let id = "epochs=3_lr=0.003";
    let o = xrun(
        &root(),
        &[
            "tests/fixtures/sweeps/cluster.toml",
            "-q",
            "--trial",
            id,
            "--set",
            &out,
        ],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let trial = tmp.path().join("cluster_tiny/trials").join(id);
    let pretrain = records(&trial, "pretrain", "validation", "loss");
    let finetune = records(&trial, "finetune", "train", "loss");
    let rows = read_csv(&trial.join("results.csv"));
    let col = |name: &str| rows[0].iter().position(|h| h == name).unwrap();
    let test = rows
        .iter()
        .find(|r| r[col("split")] == "test" && r[col("metric")] == "accuracy")
        .unwrap()[col("value")]
    .clone();
    let pinned: [(&str, &[f64], Vec<f64>); 2] = [
        (
            "pretrain validation loss",
            &[7.240492344, 7.174774647],
            pretrain,
        ),
        (
            "finetune train loss",
            &[
                0.688968420,
                0.691755056,
                0.660420775,
                0.694381773,
                0.645887911,
                0.648957849,
            ],
            finetune,
        ),
    ];
    for (what, want, got) in pinned {
        let close = |(a, b): (&f64, &f64)| (a - b).abs() <= 1e-6 * a.abs().max(1.0);
        assert!(
            want.len() == got.len() && want.iter().zip(&got).all(close),
            "{what}: pinned {want:?}, got {got:.9?}"
        );
    }
    assert_eq!(test, "0.595", "test accuracy");
}

/// Gold entities (a `B-` or `S-` tag each, in well-formed BMES) in the first `sentences` sentences
/// of a CoNLL file, and the line of its first tag with the prefix `prefix`.
fn conll_facts(path: &Path, sentences: usize, prefix: &str) -> (usize, usize) {
    let text = std::fs::read_to_string(path).unwrap();
    let (mut seen, mut entities, mut inside) = (0, 0, false);
    let mut first = None;
    for (i, line) in text.lines().enumerate() {
        let line = line.trim_end_matches('\r');
        let tag = line.split_ascii_whitespace().last().unwrap_or("");
        if first.is_none() && tag.starts_with(prefix) {
            first = Some(i + 1);
        }
        if line.trim().is_empty() {
            seen += usize::from(inside);
            inside = false;
            continue;
        }
        if seen < sentences {
            inside = true;
            entities += usize::from(tag.starts_with("B-") || tag.starts_with("S-"));
        }
    }
    (entities, first.unwrap())
}

#[test]
fn ner_tags_characters_and_scores_entities_on_resume_ner() {
    let tmp = tempfile::tempdir().unwrap();
    let o = sweep(tmp.path(), "ner", &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    let run = tmp.path().join("ner_tiny");
    let rows = read_csv(&run.join("results.csv"));
    let data = root().join("../shared/data/resume_ner");
    let (gold, _) = conll_facts(&data.join("test.char.bmes"), 120, "M-");
    for trial in ["method=full", "method=lora"] {
        assert_eq!(
            result_of(&rows, trial, "test", "entities"),
            gold as f64,
            "the entity count is the file's"
        );
        let (p, r, f1) = (
            result_of(&rows, trial, "test", "entity_precision"),
            result_of(&rows, trial, "test", "entity_recall"),
            result_of(&rows, trial, "test", "entity_f1"),
        );
        if p + r > 0.0 {
            assert!((f1 - 2.0 * p * r / (p + r)).abs() < 1e-9, "{trial}");
        }
        assert!(result_of(&rows, trial, "test", "tokens") > gold as f64);
    }
    // Four epochs on 400 sentences: the fully fine-tuned tagger finds a fifth of the entities
    // exactly (an untrained one finds none), more than LoRA on a 30-step pretraining.
    let full = result_of(&rows, "method=full", "test", "entity_f1");
    let lora = result_of(&rows, "method=lora", "test", "entity_f1");
    assert!(full > 0.15, "full fine-tuning test entity F1 {full}");
    assert!(full > lora, "{full} vs {lora}");
    // Per-type rows exist for every type of the data.
    let types: Vec<&Vec<String>> = rows
        .iter()
        .filter(|r| {
            r[0] == "method=full" && r[3] == "test" && r[4] == "entity_f1" && !r[5].is_empty()
        })
        .collect();
    assert_eq!(
        types.len(),
        8,
        "NAME, CONT, RACE, TITLE, EDU, ORG, PRO, LOC"
    );
    let trial = std::fs::read_to_string(run.join("trials/method=full/index.html")).unwrap();
    assert!(
        trial.contains("Test entity F1 <strong>"),
        "trial report headline"
    );
    assert!(trial.contains("BMES tags"));
    assert!(trial.contains("Training entities by type"));
    let study = std::fs::read_to_string(run.join("index.html")).unwrap();
    assert!(study.contains("dev entity_f1") && study.contains("test entity F1"));

    // A scheme that does not fit the tags names the first tag it rejects, by file and line.
    let (_, first_e) = conll_facts(&data.join("train.char.bmes"), 0, "E-");
    let o = sweep(tmp.path(), "ner", &["--set", "data.tag_scheme=\"bio\""]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    let err = stderr(&o);
    assert!(
        err.contains(&format!(
            "train.char.bmes:{first_e}: tag \"E-NAME\" is not a BIO tag"
        )),
        "{err}"
    );
    assert!(
        err.contains("data.tag_scheme = \"bio\" allows O and B-, I-"),
        "{err}"
    );
    // Prompt methods score one label per text: not a tagging method.
    let o = sweep(
        tmp.path(),
        "ner",
        &["--set", "sweep.grid.finetune.method=[\"zero_shot\"]"],
    );
    assert_eq!(o.status.code(), Some(2));
    assert!(
        stderr(&o).contains("needs a method that trains a tagging head"),
        "{}",
        stderr(&o)
    );
}

/// The accuracy matrix of one trial from results.csv: `m[i][j]` after task `i`, on task `j`.
fn matrix(rows: &[Vec<String>], trial: &str, tasks: &[&str]) -> Vec<Vec<f64>> {
    let col = |name: &str| rows[0].iter().position(|h| h == name).unwrap();
    let (t, s, m, c, v) = (
        col("trial"),
        col("split"),
        col("metric"),
        col("class"),
        col("value"),
    );
    tasks
        .iter()
        .enumerate()
        .map(|(i, after)| {
            tasks[..=i]
                .iter()
                .map(|on| {
                    let metric = format!("accuracy after {after}");
                    rows.iter()
                        .find(|r| r[t] == trial && r[s] == "test" && r[m] == metric && r[c] == *on)
                        .unwrap_or_else(|| panic!("{trial}: no {metric} on {on}"))[v]
                        .parse()
                        .unwrap()
                })
                .collect()
        })
        .collect()
}

#[test]
fn continual_learning_fills_the_accuracy_matrix_and_resumes_between_tasks() {
    let tmp = tempfile::tempdir().unwrap();
    let reference = tmp.path().join("reference");
    let o = sweep(&reference, "continual", &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    let run = reference.join("continual_tiny");
    let rows = read_csv(&run.join("results.csv"));
    let tasks = ["tnews", "eprstmt", "iflytek"];
    let m = |strategy: &str| matrix(&rows, &format!("strategy={strategy}"), &tasks);
    for strategy in ["sequential", "replay", "ewc"] {
        let trial = format!("strategy={strategy}");
        let mx = m(strategy);
        // Average accuracy is the last row's mean; forgetting is each earlier task's best before
        // the last task minus its final accuracy, averaged.
        let last = &mx[2];
        let average = last.iter().sum::<f64>() / 3.0;
        assert!((result_of(&rows, &trial, "test", "accuracy") - average).abs() < 1e-12);
        let forgetting = (0..2)
            .map(|j| mx[j..2].iter().map(|r| r[j]).fold(f64::MIN, f64::max) - last[j])
            .sum::<f64>()
            / 2.0;
        assert!((result_of(&rows, &trial, "test", "forgetting") - forgetting).abs() < 1e-12);
        // The first task's row is what any strategy gets: nothing to remember yet.
        assert_eq!(mx[0], m("sequential")[0], "{strategy}");
    }
    // Replay trains the earlier heads on their stored examples, EWC holds the backbone back:
    // both part from plain sequential fine-tuning once there is something to remember.
    assert_ne!(m("replay")[1], m("sequential")[1]);
    assert_ne!(m("ewc")[2], m("sequential")[2]);
    let trial_html =
        std::fs::read_to_string(run.join("trials/strategy=replay/index.html")).unwrap();
    assert!(trial_html.contains("Average test accuracy after all 3 tasks"));
    assert!(trial_html.contains("<th class=\"l\">after eprstmt</th>"));
    let study = std::fs::read_to_string(run.join("index.html")).unwrap();
    assert!(
        study.contains("test average accuracy over tasks") && study.contains("test forgetting")
    );

    // A frozen backbone with a head per task cannot forget: every column stays where it started.
    let probe = tmp.path().join("probe");
    let o = sweep(
        &probe,
        "continual",
        &[
            "--set",
            "sweep.grid.continual.strategy=[\"sequential\"]",
            "--set",
            "finetune.method=\"linear_probe\"",
        ],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let rows = read_csv(&probe.join("continual_tiny/results.csv"));
    let mx = matrix(&rows, "strategy=sequential", &tasks);
    for (i, row) in mx.iter().enumerate() {
        for (j, &v) in row.iter().enumerate() {
            assert_eq!(
                v, mx[j][j],
                "linear probe: after {} on {}",
                tasks[i], tasks[j]
            );
        }
    }
    assert_eq!(
        result_of(&rows, "strategy=sequential", "test", "forgetting"),
        0.0
    );

    // Killed while training the second task (the first one saved), and again in the third:
    // the finished tasks are not trained again and the results are the uninterrupted ones.
    let expected = std::fs::read_to_string(run.join("results.csv")).unwrap();
    let out = tmp.path().join("killed");
    kill_at(
        &out,
        "continual",
        "continual_tiny",
        "finetune.eprstmt",
        "checkpoint",
        1,
    );
    kill_at(
        &out,
        "continual",
        "continual_tiny",
        "finetune.iflytek",
        "checkpoint",
        2,
    );
    let o = sweep(&out, "continual", &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    let killed = out.join("continual_tiny");
    assert_eq!(
        std::fs::read_to_string(killed.join("results.csv")).unwrap(),
        expected,
        "results differ from the uninterrupted run"
    );
    let j = journal(&killed);
    let pid = last_pid(&j);
    let sequential: Vec<serde_json::Value> = j
        .into_iter()
        .filter(|e| e["trial"] == "strategy=sequential")
        .collect();
    assert_eq!(
        events(&sequential, pid, "finetune.tnews", "start")
            + events(&sequential, pid, "finetune.eprstmt", "start"),
        0,
        "the finished tasks are not trained again"
    );
    assert_eq!(events(&sequential, pid, "finetune.iflytek", "resume"), 1);
}

/// `xrun bench` trains a shape through the loop and reports figures that hold together: the
/// parameter count of the model, effective tokens below padded ones, and length batching with
/// less padding than random batches; an unknown shape is an input error.
#[test]
fn bench_reports_throughput_and_length_batching_cuts_padding() {
    let run = |batching: &str| -> serde_json::Value {
        let o = xrun(
            &root(),
            &[
                "bench",
                "--backend",
                "cpu",
                "--shape",
                "bert-mini",
                "--steps",
                "4",
                "--warmup",
                "1",
                "--batch",
                "8",
                "--seq",
                "48",
                "--min-len",
                "8",
                "--vocab",
                "500",
                "--batching",
                batching,
            ],
        );
        assert!(o.status.success(), "{}", stderr(&o));
        serde_json::from_slice(&o.stdout).unwrap()
    };
    let random = run("random");
    let length = run("length");
    // bert-mini with a 500-token vocabulary and 48 positions: embeddings, 4 blocks, the MLM head.
    let d = 256;
    let block = 4 * (d * d + d) + (d * 1024 + 1024) + (1024 * d + d) + 4 * d;
    let expected = (500 + 48) * d + 2 * d + 4 * block + (d * d + d) + 2 * d + (d * 500 + 500);
    assert_eq!(random["parameters"], expected);
    for f in [&random, &length] {
        let (t, e) = (
            f["tokens_per_s"].as_f64().unwrap(),
            f["effective_tokens_per_s"].as_f64().unwrap(),
        );
        assert!(e > 0.0 && e <= t, "{f}");
        assert!(f["time_to_first_step_s"].as_f64().unwrap() > 0.0);
        // Device memory is the GPU backends' figure; the CPU's is the resident memory.
        assert!(f["device_memory_mib"].is_null(), "{f}");
        assert!(f["peak_rss_mib"].as_f64().unwrap() > 0.0, "{f}");
        // Each step's lengths, warm-up and measured steps, for the PyTorch side to replay.
        let steps = f["batch_lengths"].as_array().unwrap();
        assert_eq!(steps.len(), 5, "{f}");
        for lengths in steps {
            let lengths = lengths.as_array().unwrap();
            assert_eq!(lengths.len(), 8, "{f}");
            assert!(lengths
                .iter()
                .all(|n| (8..=48).contains(&n.as_u64().unwrap())));
        }
    }
    let share = |f: &serde_json::Value| {
        f["effective_tokens_per_s"].as_f64().unwrap() / f["tokens_per_s"].as_f64().unwrap()
    };
    assert!(share(&length) > share(&random), "{random}\n{length}");
    let o = xrun(&root(), &["bench", "--shape", "bert-huge"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(
        stderr(&o).contains("unknown shape `bert-huge`"),
        "{}",
        stderr(&o)
    );
}

/// `batching = "length"` is a stage input: it changes the fine-tuning key (not the tokenizer's),
/// and the default leaves keys as they were.
#[test]
fn length_batching_is_part_of_the_finetune_key() {
    let keys = |extra: &[&str]| plan_keys("experiments/smoke.toml", extra);
    let plain = keys(&[]);
    let explicit = keys(&["--set", "finetune.batching=\"random\""]);
    assert_eq!(plain, explicit);
    let length = keys(&["--set", "finetune.batching=\"length\""]);
    assert!(
        length.iter().any(|l| l.contains("\"batching\":\"length\"")),
        "{length:?}"
    );
    assert_eq!(
        plain[0], length[0],
        "the tokenizer key does not depend on batching"
    );
}

#[test]
fn packed_pretraining_trains_on_full_rows_under_its_own_key() {
    let tmp = tempfile::tempdir().unwrap();
    let ar = ["--set", "pretrain.objective=\"ar\""];
    let packed = [&ar[..], &["--set", "pretrain.packing=true"]].concat();
    let plain_run = smoke(&tmp.path().join("plain"), &ar);
    let packed_run = smoke(&tmp.path().join("packed"), &packed);
    // The smoke corpus (400 reviews, most shorter than model.max_len = 32) packs into fewer,
    // full rows: the same 30 steps see more tokens, so the curves differ from the start.
    let (a, b) = (
        records(&plain_run, "pretrain", "train", "loss"),
        records(&packed_run, "pretrain", "train", "loss"),
    );
    assert_eq!(a.len(), 30);
    assert_eq!(b.len(), 30);
    assert_ne!(a, b);
    assert!(b.iter().all(|v| v.is_finite()));
    assert!(b[29] < b[0], "packed AR pretraining learns: {b:?}");
    // Validation stays unpacked, so both runs score the same held-out rows.
    let (va, vb) = (
        records(&plain_run, "pretrain", "validation", "loss"),
        records(&packed_run, "pretrain", "validation", "loss"),
    );
    assert_eq!(va.len(), vb.len());
    // A pretraining key of its own: the packed run is not mistaken for the plain one's cache.
    let plan = xrun(
        &root(),
        &[
            &["plan", "experiments/smoke.toml", "--set"][..],
            &[format!(
                "experiment.output_dir={}",
                tmp.path().join("plain").display()
            )
            .as_str()],
            &packed[..],
        ]
        .concat(),
    );
    let listing = String::from_utf8_lossy(&plan.stdout);
    let row = listing
        .lines()
        .find(|l| l.starts_with("base"))
        .unwrap_or("");
    assert_eq!(row.matches("run ").count(), 2, "{listing}");
}
