//! `[continual]`: fine-tune one backbone on a sequence of tasks. The first task is the one `[data]`
//! describes; `[[continual.tasks]]` follow in order, each with its own splits, labels and head.

use serde::{Deserialize, Serialize};

use super::data::SourceSpec;

/// How a task is learned without forgetting the ones before it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Strategy {
    /// Plain sequential fine-tuning: the baseline that forgets.
    Sequential,
    /// Experience replay: `replay_examples` training examples of every earlier task are kept, and
    /// every batch of the current task comes with a batch drawn from them.
    Replay,
    /// Elastic weight consolidation (Kirkpatrick et al., 2017): a penalty
    /// `ewc_lambda / 2 · Σ F (θ − θ*)²` per earlier task, with its diagonal Fisher information `F`
    /// and the weights `θ*` it ended with.
    Ewc,
}

impl Strategy {
    pub fn name(self) -> &'static str {
        match self {
            Strategy::Sequential => "sequential",
            Strategy::Replay => "replay",
            Strategy::Ewc => "ewc",
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ContinualSection {
    /// The name of the first task, the one `[data]` describes.
    pub first: String,
    #[serde(default = "default_strategy")]
    pub strategy: Strategy,
    /// Replay: stored training examples per earlier task.
    #[serde(default = "default_replay")]
    pub replay_examples: usize,
    /// EWC: the penalty's weight. The Fisher terms are mean squared per-example gradients, small
    /// for small models; sweep it on a log scale.
    #[serde(default = "default_lambda")]
    pub ewc_lambda: f64,
    /// The tasks after the first, in training order.
    pub tasks: Vec<TaskSpec>,
}

/// One later task: its name and splits (read like `[data.train]`, `[data.dev]`, `[data.test]`).
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct TaskSpec {
    pub name: String,
    pub train: SourceSpec,
    pub dev: Option<SourceSpec>,
    pub test: Option<SourceSpec>,
}

fn default_strategy() -> Strategy {
    Strategy::Sequential
}
fn default_replay() -> usize {
    32
}
fn default_lambda() -> f64 {
    1000.0
}
