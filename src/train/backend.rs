//! The one file that names burn backends. Everything else is generic over `B: AutodiffBackend`.

use crate::config::experiment::BackendChoice;

pub type Cpu = burn::backend::Flex;
pub type CpuTrain = burn::backend::Autodiff<Cpu>;

/// What ran, for the report.
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
pub struct DeviceInfo {
    pub backend: String,
    pub device: String,
    pub threads: usize,
}

#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    #[error(
        "backend `{0}` is not available in this build of xrun: it trains on the CPU backend only \
         (set experiment.backend = \"cpu\" or \"auto\")"
    )]
    NotBuilt(&'static str),
}

/// Work generic over the training backend; `dispatch` picks the backend and runs it.
pub trait Job {
    type Output;
    fn run<B: burn::tensor::backend::AutodiffBackend>(
        self,
        device: B::Device,
        info: DeviceInfo,
    ) -> Self::Output;
}

/// Runs `job` on the backend `choice` names. `auto` falls back to the CPU when no GPU backend is
/// built in.
pub fn dispatch<J: Job>(choice: BackendChoice, job: J) -> Result<J::Output, BackendError> {
    let info = resolve(choice)?;
    Ok(job.run::<CpuTrain>(Default::default(), info))
}

/// The backend `choice` trains on in this build: `auto` is the CPU until a GPU backend is built in.
/// Cache keys use it, so `auto` and the backend it picks share their cached stages.
pub fn concrete(choice: BackendChoice) -> BackendChoice {
    match choice {
        BackendChoice::Auto => BackendChoice::Cpu,
        other => other,
    }
}

fn resolve(choice: BackendChoice) -> Result<DeviceInfo, BackendError> {
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    match choice {
        BackendChoice::Cpu | BackendChoice::Auto => Ok(DeviceInfo {
            backend: "cpu (burn Flex)".into(),
            device: format!("{} ({} threads)", std::env::consts::ARCH, threads),
            threads,
        }),
        BackendChoice::Wgpu => Err(BackendError::NotBuilt("wgpu")),
        BackendChoice::Cuda => Err(BackendError::NotBuilt("cuda")),
    }
}
