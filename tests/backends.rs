//! The GPU backends where there is no GPU: wgpu on Mesa's software Vulkan (lavapipe), installed
//! from Debian's `mesa-vulkan-drivers` and `libvulkan1` when missing (set XRUN_SKIP_WGPU=1 to skip).
//! CUDA's code paths are compiled in every build; they run on the GPU machine (BENCHMARKS.md).

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

mod common;

use common::text;

const XRUN: &str = env!("CARGO_BIN_EXE_xrun");

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Installs lavapipe and the Vulkan loader unless they are there.
fn ensure_lavapipe() {
    let icd = Path::new("/usr/share/vulkan/icd.d");
    let present = std::fs::read_dir(icd).is_ok_and(|d| {
        d.filter_map(Result::ok)
            .any(|e| e.file_name().to_string_lossy().starts_with("lvp_icd"))
    }) && Path::new("/usr/lib/x86_64-linux-gnu/libvulkan.so.1").exists();
    if present {
        return;
    }
    common::apt_install(&["mesa-vulkan-drivers", "libvulkan1"], "XRUN_SKIP_WGPU");
}

/// Whether the wgpu tests run: not with XRUN_SKIP_WGPU set; else lavapipe is installed if missing.
fn wgpu_ready() -> bool {
    if std::env::var_os("XRUN_SKIP_WGPU").is_some() {
        eprintln!("XRUN_SKIP_WGPU is set: skipped");
        return false;
    }
    ensure_lavapipe();
    true
}

/// The smoke experiment without pretraining, on `backend`, into `out`.
fn run(out: &Path, backend: &str) -> Output {
    run_with(out, backend, &["--set", "pretrain.objective=\"none\""])
}

/// The smoke experiment with two fine-tuning epochs and `extra` arguments.
fn run_with(out: &Path, backend: &str, extra: &[&str]) -> Output {
    let out_set = format!("experiment.output_dir={}", out.display());
    let backend_set = format!("experiment.backend=\"{backend}\"");
    Command::new(XRUN)
        .current_dir(root())
        .args([
            "experiments/smoke.toml",
            "--quiet",
            "--set",
            &out_set,
            "--set",
            &backend_set,
            "--set",
            "finetune.epochs=2",
            // The least effort, which the key sets over CubeCL's variable.
            "--autotune",
            "minimal",
        ])
        .args(extra)
        .env_remove("XRUN_DATA_ROOT")
        .env("CUBECL_AUTOTUNE_LEVEL", "balanced")
        .output()
        .expect("xrun runs")
}

/// Mean training loss of each fine-tuning epoch.
fn epoch_losses(run: &Path) -> Vec<f64> {
    use polars::prelude::*;
    let df = xrun::metrics::read_parquet(&run.join("metrics.parquet")).unwrap();
    let mask = df.column("stage").unwrap().str().unwrap().equal("finetune")
        & df.column("metric").unwrap().str().unwrap().equal("loss")
        & df.column("split").unwrap().str().unwrap().equal("train");
    let rows = df.filter(&mask).unwrap();
    let epochs: Vec<u64> = rows
        .column("epoch")
        .unwrap()
        .u64()
        .unwrap()
        .into_no_null_iter()
        .collect();
    let values: Vec<f64> = rows
        .column("value")
        .unwrap()
        .f64()
        .unwrap()
        .into_no_null_iter()
        .collect();
    let last = epochs.iter().copied().max().unwrap_or(0);
    (1..=last)
        .map(|e| {
            let v: Vec<f64> = epochs
                .iter()
                .zip(&values)
                .filter(|(x, _)| **x == e)
                .map(|(_, v)| *v)
                .collect();
            v.iter().sum::<f64>() / v.len() as f64
        })
        .collect()
}

#[test]
fn wgpu_on_software_vulkan_trains_like_the_cpu() {
    if !wgpu_ready() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let (cpu_out, gpu_out) = (tmp.path().join("cpu"), tmp.path().join("wgpu"));
    let o = run(&cpu_out, "cpu");
    assert!(o.status.success(), "{}", text(&o));
    let o = run(&gpu_out, "wgpu");
    assert!(o.status.success(), "{}", text(&o));
    assert!(
        !text(&o).contains("XDG_RUNTIME_DIR"),
        "Mesa's complaint is not shown: {}",
        text(&o)
    );
    let (cpu, gpu) = (
        cpu_out.join("smoke/trials/base"),
        gpu_out.join("smoke/trials/base"),
    );
    let summary: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(gpu.join("summary.json")).unwrap()).unwrap();
    let device = summary["device"]["device"].as_str().unwrap();
    assert!(
        device.contains("llvmpipe"),
        "the report names the adapter: {device}"
    );
    // The adapter's buffer limit, under which attention, the feed-forward network and the LM
    // head compute in pieces (lavapipe's is 128 MiB); the CPU has none.
    let max_buffer = summary["device"]["max_buffer"].as_u64();
    assert!(
        max_buffer.is_some_and(|b| b >= 1 << 20),
        "the adapter's buffer limit is recorded: {max_buffer:?}"
    );
    let cpu_summary: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(cpu.join("summary.json")).unwrap()).unwrap();
    assert!(cpu_summary["device"].get("max_buffer").is_none());
    // Batches are padded to multiples of 16 on a GPU (each new length compiles kernels there).
    assert_eq!(summary["device"]["pad_multiple"], 16);
    let backend = summary["device"]["backend"].as_str().unwrap();
    assert!(
        backend.starts_with("wgpu") && backend.ends_with("autotune minimal)"),
        "the report names the backend and the autotune effort in force: {backend}"
    );
    // The same seed initialises differently on each backend, so the curves are not identical;
    // both must learn the same way: every epoch's mean loss within 15% of the CPU's.
    let (a, b) = (epoch_losses(&cpu), epoch_losses(&gpu));
    assert_eq!(a.len(), 2);
    assert_eq!(a.len(), b.len());
    for (x, y) in a.iter().zip(&b) {
        assert!(
            (x - y).abs() <= 0.15 * x,
            "epoch losses: cpu {a:?}, wgpu {b:?}"
        );
    }
    // Autotune results persist under the experiment's cache, not wherever the process started.
    let tuned = gpu_out.join(".cache/autotune");
    let files = walk(&tuned);
    assert!(
        !files.is_empty(),
        "no autotune cache in {}",
        tuned.display()
    );

    // `xrun bench` on wgpu reports the device memory burn's pools reserved for the shape: at
    // least the parameters, their gradients and AdamW's two moments, four f32 copies.
    let o = Command::new(XRUN)
        .current_dir(tmp.path())
        .args([
            "bench",
            "--backend",
            "wgpu",
            "--shape",
            "bert-mini",
            "--steps",
            "2",
            "--warmup",
            "1",
            "--batch",
            "4",
            "--seq",
            "16",
            "--min-len",
            "8",
            "--vocab",
            "100",
            "--autotune",
            "minimal",
            "--cache-dir",
        ])
        .arg(gpu_out.join(".cache"))
        .output()
        .expect("xrun runs");
    assert!(o.status.success(), "{}", text(&o));
    let figures: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let parameters = figures["parameters"].as_f64().unwrap();
    let reserved = figures["device_memory_mib"].as_f64().unwrap();
    let floor = 4.0 * parameters * 4.0 / f64::from(1u32 << 20);
    assert!(
        reserved >= floor && reserved < 20.0 * floor,
        "{reserved} MiB reserved for {parameters} parameters: {figures}"
    );
}

/// Settings that change how a CPU run computes but not what it learns: half precision, and
/// padding every batch to a multiple of 16 positions (the GPU default, where each new length
/// compiles kernels). Each trains every stage, says so in the report and `summary.json`, keeps
/// its own cache entries, and follows the f32 run's curve.
#[test]
fn half_precision_and_padded_lengths_on_the_cpu_train_every_stage_and_learn_like_f32() {
    // With MLM pretraining, so a variant's model also goes through the stage cache into
    // fine-tuning. Batches of similar lengths: drawn at random, nearly every batch of the
    // smoke data holds a row cut at max_len (32), and rounding its length up changes nothing.
    let tmp = tempfile::tempdir().unwrap();
    let f32_out = tmp.path().join("f32");
    let by_length = [
        "--set",
        "pretrain.batching=\"length\"",
        "--set",
        "finetune.batching=\"length\"",
    ];
    let o = run_with(&f32_out, "cpu", &by_length);
    assert!(o.status.success(), "{}", text(&o));
    let base = f32_out.join("smoke/trials/base");
    let x = epoch_losses(&base);
    assert_eq!(x.len(), 2);
    let summary = |trial: &Path| -> serde_json::Value {
        serde_json::from_str(&std::fs::read_to_string(trial.join("summary.json")).unwrap()).unwrap()
    };
    assert!(summary(&base)["device"].get("pad_multiple").is_none());
    let variants: [(&str, &[&str], &str, &str); 3] = [
        (
            "bf16",
            &["--precision", "bf16"],
            "precision",
            "<td class=\"l\">bf16</td>",
        ),
        (
            "bf16-mixed",
            &["--precision", "bf16-mixed"],
            "precision",
            "<td class=\"l\">bf16-mixed</td>",
        ),
        (
            "16",
            &["--set", "experiment.pad_multiple=16"],
            "pad_multiple",
            "padded to a multiple of 16 positions",
        ),
    ];
    for (value, args, field, shown) in variants {
        let out = tmp.path().join(field).join(value);
        let o = run_with(&out, "cpu", &[&by_length[..], args].concat());
        assert!(o.status.success(), "{}", text(&o));
        let b = out.join("smoke/trials/base");
        assert_eq!(
            summary(&b)["device"][field].to_string().trim_matches('"'),
            value
        );
        let html = std::fs::read_to_string(out.join("smoke/index.html")).unwrap();
        assert!(html.contains(shown), "the report says {field} {value}");
        // bf16 keeps 8 significant bits; longer rows draw other dropout masks. The curves
        // differ from f32's, and follow them.
        let y = epoch_losses(&b);
        assert_eq!(x.len(), y.len());
        assert_ne!(x, y, "{field} {value} computes differently");
        for (p, q) in x.iter().zip(&y) {
            assert!(
                (p - q).abs() <= 0.15 * p,
                "epoch losses: f32 {x:?}, {field} {value} {y:?}"
            );
        }
        // Separate cache entries: the f32 run's stages are not reused.
        let plan = Command::new(XRUN)
            .current_dir(root())
            .args([
                "plan",
                "experiments/smoke.toml",
                "--set",
                "finetune.epochs=2",
            ])
            .args(by_length)
            .args(args)
            .arg("--set")
            .arg(format!("experiment.output_dir={}", f32_out.display()))
            .env_remove("XRUN_DATA_ROOT")
            .output()
            .unwrap();
        let listing = text(&plan);
        assert!(plan.status.success(), "{listing}");
        let row = listing
            .lines()
            .find(|l| l.starts_with("base"))
            .unwrap_or("");
        assert_eq!(
            row.matches("run ").count(),
            2,
            "pretraining and fine-tuning run again with {field} {value}, the tokenizer is shared: {listing}"
        );
    }
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p);
        }
    }
    out
}

/// A tensor past the adapter's buffer limit (here a 32768-wide embedding table; lavapipe allows
/// 128 MiB per buffer) makes the runtime panic in its own thread, and every thread waiting on it
/// after: the run ends with one error naming the device, the size and what to lower, not pages of
/// panics, and the stages that finished stay cached.
#[test]
fn a_tensor_past_the_buffer_limit_is_one_clear_error() {
    if !wgpu_ready() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let o = run_with(
        tmp.path(),
        "wgpu",
        &[
            "--set",
            "model.d_model=32768",
            "--set",
            "model.heads=1",
            "--set",
            "model.d_ff=32",
            "--set",
            "pretrain.objective=\"none\"",
        ],
    );
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(
        err.contains("failed in the GPU runtime: can't allocate buffer")
            && err.contains("where one buffer holds at most")
            && err.contains("model.d_model"),
        "{err}"
    );
    assert!(!err.contains("panicked"), "{err}");
    assert!(err.lines().count() <= 6, "{err}");
    let tokenizers = walk(&tmp.path().join(".cache/tokenizer"));
    assert!(
        tokenizers.iter().any(|p| p.ends_with("tokenizer.json")),
        "the tokenizer stage stays cached: {tokenizers:?}"
    );
}
