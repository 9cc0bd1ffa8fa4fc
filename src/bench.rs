//! `xrun bench`: trains named model shapes for a fixed number of steps through the one training
//! loop (`train::fit`, MLM or AR pretraining as a run does it) and prints one JSON line per shape:
//! time to first step (autotune included), step time, padded and effective (non-pad) tokens per
//! second, peak memory (resident, and on GPUs the device memory burn's pools reserved).
//! `benches/pytorch_reference.py` measures the same work in PyTorch.

use std::path::PathBuf;
use std::time::Instant;

use burn::tensor::backend::AutodiffBackend;
use rand::Rng;
use serde::Serialize;

use crate::config::experiment::{Autotune, BackendChoice, Precision};
use crate::config::train::{Batching, Objective, OptimSection};
use crate::exec::tasks::{PretrainTask, MASKING};
use crate::metrics::Store;
use crate::model::{BackboneConfig, LmModel};
use crate::tokenizer::Specials;
use crate::train::backend::{self, DeviceInfo, Job};
use crate::train::{fit, Budget, Progress};

/// A named model shape.
#[derive(Debug, Clone, Copy)]
pub struct Shape {
    pub name: &'static str,
    pub layers: usize,
    pub d_model: usize,
    pub heads: usize,
    pub d_ff: usize,
    /// GPT-style: pre-norm, causal, AR objective; else BERT-style post-norm MLM.
    pub causal: bool,
}

pub const SHAPES: [Shape; 4] = [
    Shape {
        name: "bert-mini",
        layers: 4,
        d_model: 256,
        heads: 4,
        d_ff: 1024,
        causal: false,
    },
    Shape {
        name: "bert-small",
        layers: 4,
        d_model: 512,
        heads: 8,
        d_ff: 2048,
        causal: false,
    },
    Shape {
        name: "bert-base",
        layers: 12,
        d_model: 768,
        heads: 12,
        d_ff: 3072,
        causal: false,
    },
    Shape {
        name: "gpt-small",
        layers: 12,
        d_model: 768,
        heads: 12,
        d_ff: 3072,
        causal: true,
    },
];

#[derive(Debug, clap::Args)]
pub struct BenchArgs {
    /// Shapes to train: bert-mini, bert-small, bert-base, gpt-small (repeatable).
    #[arg(long = "shape", default_value = "bert-mini")]
    pub shapes: Vec<String>,
    #[arg(long, value_enum, default_value = "auto")]
    pub backend: BackendChoice,
    /// f32, bf16 products with f32 weights (`bf16-mixed`), or every tensor in bf16 or f16 (as
    /// `experiment.precision`).
    #[arg(long, value_enum, default_value = "f32")]
    pub precision: Precision,
    /// Measured steps, after the warm-up steps.
    #[arg(long, default_value_t = 20)]
    pub steps: usize,
    /// Steps before measuring (the first compiles and autotunes kernels on GPUs).
    #[arg(long, default_value_t = 3)]
    pub warmup: usize,
    #[arg(long, default_value_t = 32)]
    pub batch: usize,
    /// Longest sequence; lengths are uniform in [--min-len, --seq], padded per batch.
    #[arg(long, default_value_t = 128)]
    pub seq: usize,
    #[arg(long, default_value_t = 16)]
    pub min_len: usize,
    /// Vocabulary size (21128: Chinese BERT's).
    #[arg(long, default_value_t = 21128)]
    pub vocab: usize,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// `length` groups similar lengths into batches (less padding); `random` as runs default to.
    #[arg(long, value_enum, default_value = "random")]
    pub batching: Batching,
    /// Where GPU autotune results and compiled CUDA kernels persist (as for runs:
    /// `<cache_dir>/autotune`, `<cache_dir>/kernels`).
    #[arg(long, default_value = "reports/.cache")]
    pub cache_dir: PathBuf,
    /// The GPU autotune effort (as `experiment.autotune`); default `CUBECL_AUTOTUNE_LEVEL`, else
    /// CubeCL's `balanced`.
    #[arg(long, value_enum)]
    pub autotune: Option<Autotune>,
    /// Pad each batch to a multiple of this many positions (as `experiment.pad_multiple`);
    /// default 16 on GPUs, 1 (the longest sequence exactly) on the CPU.
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    pub pad_multiple: Option<u64>,
}

/// One shape's figures (the JSON line).
#[derive(Debug, Serialize)]
pub struct Figures {
    pub shape: String,
    pub objective: &'static str,
    pub backend: String,
    pub device: String,
    pub precision: String,
    pub batching: Batching,
    /// Batches are padded to a multiple of this many positions (`--pad-multiple`).
    pub pad_multiple: usize,
    pub parameters: usize,
    pub batch: usize,
    pub seq: usize,
    pub steps: usize,
    /// From building the model to the end of the first step (kernel compilation and autotune
    /// included on GPUs).
    pub time_to_first_step_s: f64,
    /// Mean over the measured steps (after `warmup`).
    pub step_ms: f64,
    /// Padding and masking one batch on the host, which the loop does before each step.
    pub host_prep_ms: f64,
    /// Tokens per second counting padding (every batch is padded to its longest sequence,
    /// rounded up to `pad_multiple`).
    pub tokens_per_s: f64,
    /// Non-pad tokens per second.
    pub effective_tokens_per_s: f64,
    /// The process's peak resident memory (VmHWM), MiB: the CPU backend's memory.
    pub peak_rss_mib: Option<f64>,
    /// The lengths of each step's sequences, in the order trained (the warm-up's first):
    /// `benches/pytorch_reference.py --lengths-from` replays them, so both train the same batches.
    pub batch_lengths: Vec<Vec<usize>>,
    /// GPU backends: the device memory burn's pools reserved for this shape, MiB (their pages,
    /// freed before the shape and kept until its runs end, so its peak; the runtime's context is
    /// not counted). None on the CPU.
    pub device_memory_mib: Option<f64>,
}

/// Random token sequences: `[CLS] … [SEP]`, lengths uniform in `min_len..=seq`.
fn sequences(n: usize, a: &BenchArgs, specials: &Specials) -> Vec<Vec<u32>> {
    let mut rng = crate::data::batch::rng(a.seed, 7, 0);
    (0..n)
        .map(|_| {
            let len = rng.random_range(a.min_len.max(3)..=a.seq);
            let mut s = Vec::with_capacity(len);
            s.push(specials.cls);
            s.extend((0..len - 2).map(|_| rng.random_range(5..a.vocab as u32)));
            s.push(specials.sep);
            s
        })
        .collect()
}

fn peak_rss_mib() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb / 1024.0)
}

struct BenchJob<'a> {
    args: &'a BenchArgs,
    shapes: Vec<Shape>,
}

impl Job for BenchJob<'_> {
    type Output = Result<Vec<Figures>, String>;
    fn run<B: AutodiffBackend>(self, device: B::Device, info: DeviceInfo) -> Self::Output {
        self.shapes
            .iter()
            .map(|s| bench_shape::<B>(s, self.args, &device, &info))
            .collect()
    }
}

fn bench_shape<B: AutodiffBackend>(
    shape: &Shape,
    a: &BenchArgs,
    device: &B::Device,
    info: &DeviceInfo,
) -> Result<Figures, String> {
    let specials = Specials {
        pad: 0,
        unk: 1,
        cls: 2,
        sep: 3,
        mask: 4,
    };
    let total = a.warmup + a.steps;
    let train = sequences(total * a.batch, a, &specials);
    let objective = if shape.causal {
        Objective::Ar
    } else {
        Objective::Mlm
    };
    let task = PretrainTask::<B> {
        train: &train,
        validation: &[],
        objective,
        specials,
        vocab_size: a.vocab,
        mask_prob: 0.15,
        batch_size: a.batch,
        batching: a.batching,
        eval_batch_size: a.batch,
        seed: a.seed,
        max_len: a.seq,
        device: device.clone(),
    };
    let cfg = BackboneConfig {
        vocab_size: a.vocab,
        d_model: shape.d_model,
        layers: shape.layers,
        heads: shape.heads,
        d_ff: shape.d_ff,
        max_len: a.seq,
        dropout: 0.1,
        pre_norm: shape.causal,
        causal: shape.causal,
        segments: None,
        type_vocab: 2,
        family: Default::default(),
        norm_eps: 1e-5,
        gelu_tanh: false,
        pooler: false,
    };
    // Seconds to build a fresh model and train it `steps` steps. The loop reads the losses back
    // when it ends, so the time covers the device's work, not only its queueing.
    let train_for = |steps: usize| -> Result<(f64, usize), String> {
        let started = Instant::now();
        B::seed(device, a.seed);
        let model = LmModel {
            backbone: cfg.init::<B>(device),
            head: cfg.lm_head(device),
        };
        let parameters = burn::module::Module::num_params(&model);
        let budget = Budget {
            max_steps: steps,
            max_epochs: usize::MAX,
            eval_every: None,
            eval_each_epoch: false,
            patience: 0,
            keep_best: false,
            seed: a.seed,
        };
        let mut store = Store::default();
        let mut progress = Progress::new(shape.name, true);
        let optim = OptimSection::default().resolve(1e-4);
        fit(
            &task,
            model,
            &optim,
            &budget,
            "bench",
            &mut store,
            &mut progress,
            None,
        )
        .map_err(|e| format!("{}: {e}", shape.name))?;
        Ok((started.elapsed().as_secs_f64(), parameters))
    };
    // Each shape's device memory is its own: what an earlier shape reserved is freed.
    if let Some(pools) = info.pools {
        (pools.release)();
    }
    // The first run compiles (and on GPUs autotunes) every kernel of a step; the later ones find
    // them ready. The measured steps are the difference of two runs over the same batches, as the
    // loop does not wait for the device at every step.
    let (time_to_first_step_s, parameters) = train_for(1)?;
    let (warm_s, _) = train_for(a.warmup)?;
    let (all_s, _) = train_for(total)?;
    let seconds = (all_s - warm_s).max(f64::MIN_POSITIVE);
    let device_memory_mib = info
        .pools
        .and_then(|p| (p.reserved)())
        .map(|bytes| bytes as f64 / f64::from(1u32 << 20));
    // The batches the loop trained on, in its order (one epoch covers every step).
    let lengths: Vec<usize> = train.iter().map(Vec::len).collect();
    let batches = crate::data::batch::batches(&lengths, a.batch, a.seed, 0, a.batching);
    let tokens = |rows: &Vec<usize>| {
        let lens: Vec<usize> = rows.iter().map(|&r| train[r].len()).collect();
        let longest = lens.iter().copied().max().unwrap_or(0);
        (rows.len() * longest, lens.iter().sum::<usize>())
    };
    let trained = &batches[..total.min(batches.len())];
    let window = &trained[a.warmup.min(trained.len())..];
    let batch_lengths = trained
        .iter()
        .map(|rows| rows.iter().map(|&r| train[r].len()).collect())
        .collect();
    let (padded, effective) = window
        .iter()
        .map(tokens)
        .fold((0, 0), |(p, e), (bp, be)| (p + bp, e + be));
    // The host's share of each step (padding, masking), timed apart from the loop over the same
    // batches: what moving it off the training thread could save at most.
    let prepared = Instant::now();
    for (i, rows) in window.iter().enumerate() {
        std::hint::black_box(task.prepare(&train, rows, MASKING, i as u64));
    }
    let host_prep_ms = prepared.elapsed().as_secs_f64() * 1000.0 / window.len().max(1) as f64;
    Ok(Figures {
        shape: shape.name.into(),
        objective: objective.name(),
        backend: info.backend.clone(),
        device: info.device.clone(),
        precision: info.precision.clone(),
        batching: a.batching,
        pad_multiple: info.pad_multiple,
        parameters,
        batch: a.batch,
        seq: a.seq,
        steps: a.steps,
        time_to_first_step_s,
        step_ms: seconds * 1000.0 / a.steps as f64,
        host_prep_ms,
        tokens_per_s: padded as f64 / seconds,
        effective_tokens_per_s: effective as f64 / seconds,
        peak_rss_mib: peak_rss_mib(),
        batch_lengths,
        device_memory_mib,
    })
}

/// Runs the benchmark; one JSON line per shape on stdout.
pub fn run(a: &BenchArgs) -> Result<Vec<Figures>, String> {
    let shapes: Vec<Shape> = a
        .shapes
        .iter()
        .map(|n| {
            SHAPES.iter().copied().find(|s| s.name == n).ok_or_else(|| {
                format!(
                    "unknown shape `{n}`; the shapes are {}",
                    SHAPES.map(|s| s.name).join(", ")
                )
            })
        })
        .collect::<Result<_, _>>()?;
    if a.steps == 0
        || a.warmup == 0
        || a.batch == 0
        || a.seq < 8
        || a.min_len > a.seq
        || a.vocab < 16
    {
        return Err(
            "need --steps ≥ 1, --warmup ≥ 1, --batch ≥ 1, --seq ≥ 8, --min-len ≤ --seq, --vocab ≥ 16"
                .into(),
        );
    }
    backend::dispatch(
        a.backend,
        a.precision,
        &backend::GpuSetup {
            cache_dir: a.cache_dir.clone(),
            autotune: a.autotune,
            pad_multiple: a.pad_multiple.map(|m| m as usize),
        },
        BenchJob { args: a, shapes },
    )
    .map_err(|e| e.to_string())?
}
