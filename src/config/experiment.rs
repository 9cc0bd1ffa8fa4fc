//! `[experiment]`: what the study is called, where its outputs go, its seed and its backend.

use serde::{Deserialize, Serialize};

/// Which burn backend trains the stages. `auto` picks CUDA, then wgpu, then the CPU.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum BackendChoice {
    Auto,
    Cpu,
    Wgpu,
    Cuda,
}

impl BackendChoice {
    pub fn name(self) -> &'static str {
        match self {
            BackendChoice::Auto => "auto",
            BackendChoice::Cpu => "cpu",
            BackendChoice::Wgpu => "wgpu",
            BackendChoice::Cuda => "cuda",
        }
    }
}

/// The float types a run's tensors are stored and computed in. `bf16` and `f16` hold parameters,
/// activations, gradients and AdamW's moments in that type ("pure" half precision; burn has no
/// autocast). `bf16-mixed` keeps all of those in f32 and computes projections and attention in
/// bf16, as PyTorch's autocast does (`model::mixed`). Losses and metrics are read back as f64.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    #[default]
    F32,
    Bf16,
    F16,
    #[serde(rename = "bf16-mixed")]
    #[value(name = "bf16-mixed")]
    Bf16Mixed,
}

impl Precision {
    /// Absent from cache keys at its default, so earlier keys hold.
    pub fn is_f32(&self) -> bool {
        *self == Precision::F32
    }

    pub fn name(self) -> &'static str {
        match self {
            Precision::F32 => "f32",
            Precision::Bf16 => "bf16",
            Precision::F16 => "f16",
            Precision::Bf16Mixed => "bf16-mixed",
        }
    }
}

/// How hard the GPU backends' autotune searches for each kernel's fastest variant on first use
/// (CubeCL's levels). Its results persist in `<cache_dir>/autotune`, so the effort is paid once
/// per kernel shape and device.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Autotune {
    Minimal,
    Balanced,
    Extensive,
    Full,
}

impl Autotune {
    pub fn name(self) -> &'static str {
        match self {
            Autotune::Minimal => "minimal",
            Autotune::Balanced => "balanced",
            Autotune::Extensive => "extensive",
            Autotune::Full => "full",
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ExperimentSection {
    /// Names the run directory `<output_dir>/<name>/`; letters, digits, `-`, `_`, `.` only.
    pub name: String,
    #[serde(default)]
    pub description: String,
    #[serde(default = "default_seed")]
    pub seed: u64,
    #[serde(default = "default_backend")]
    pub backend: BackendChoice,
    /// `f32` (default), `bf16` (CUDA, CPU) or `f16` (CUDA, wgpu where the adapter has shader f16,
    /// CPU); see `Precision`.
    #[serde(default, skip_serializing_if = "Precision::is_f32")]
    pub precision: Precision,
    /// The GPU backends' autotune effort; unset, `CUBECL_AUTOTUNE_LEVEL` or CubeCL's default
    /// (`balanced`). Speed only: not part of any cache key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub autotune: Option<Autotune>,
    /// Pad each batch to a multiple of this many positions (never past `model.max_len`); unset,
    /// 16 on GPU backends, where every new batch length compiles its own kernels, and 1 (the
    /// longest sequence exactly) on the CPU. Part of the training stages' keys when not 1.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pad_multiple: Option<usize>,
    /// Relative to the working directory xrun is started from.
    #[serde(default = "default_output_dir")]
    pub output_dir: String,
    /// Stage cache shared by every experiment that points at it; default `<output_dir>/.cache`.
    /// Relative to the working directory.
    pub cache_dir: Option<String>,
    /// Save a resumable checkpoint every this many optimiser steps (and at every epoch end);
    /// 0 saves none.
    #[serde(default = "default_checkpoint_every")]
    pub checkpoint_every: usize,
}

fn default_seed() -> u64 {
    42
}
fn default_backend() -> BackendChoice {
    BackendChoice::Cpu
}
fn default_checkpoint_every() -> usize {
    100
}
fn default_output_dir() -> String {
    "reports".into()
}

/// A run-directory name must be one path component that every filesystem accepts.
pub fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name != "."
        && name != ".."
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}
