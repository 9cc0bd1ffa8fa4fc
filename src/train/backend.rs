//! The one file that names burn backends. Everything else is generic over `B: AutodiffBackend`.
//!
//! `cpu` is burn's Flex; `wgpu` (Vulkan, Metal, DX12; Mesa's lavapipe without a GPU) and `cuda`
//! are CubeCL backends with fusion and autotune. `auto` takes CUDA if a device answers, then a
//! wgpu adapter, then the CPU. A GPU backend is probed before anything runs: a missing driver or
//! library is an error naming it, not a panic halfway through a sweep.

use std::path::Path;

use crate::config::experiment::BackendChoice;

pub type Cpu = burn::backend::Flex;
pub type CpuTrain = burn::backend::Autodiff<Cpu>;
pub type WgpuTrain = burn::backend::Autodiff<burn::backend::Wgpu>;
pub type CudaTrain = burn::backend::Autodiff<burn::backend::Cuda>;

/// What ran, for the report.
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
pub struct DeviceInfo {
    pub backend: String,
    pub device: String,
    pub threads: usize,
}

#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    #[error("backend `{backend}` is not available here: {reason}\n  {hint}")]
    Unavailable {
        backend: &'static str,
        reason: String,
        hint: &'static str,
    },
}

const CUDA_HINT: &str =
    "CUDA needs the NVIDIA driver (libcuda.so.1) and the CUDA toolkit's libnvrtc on \
     LD_LIBRARY_PATH (e.g. export LD_LIBRARY_PATH=/usr/local/cuda/lib64); set experiment.backend = \
     \"auto\" to fall back to wgpu or the CPU";
const WGPU_HINT: &str =
    "wgpu needs a Vulkan, Metal or DX12 adapter and its loader (Linux: libvulkan1 \
     and a driver; without a GPU, Mesa's software renderer: apt-get install mesa-vulkan-drivers \
     libvulkan1); set experiment.backend = \"auto\" to fall back to the CPU";

/// Work generic over the training backend; `dispatch` picks the backend and runs it.
pub trait Job {
    type Output;
    fn run<B: burn::tensor::backend::AutodiffBackend>(
        self,
        device: B::Device,
        info: DeviceInfo,
    ) -> Self::Output;
}

/// Runs `job` on the backend `choice` names, after probing that it works here. `cache_dir` keeps
/// the GPU backends' autotune results, so a sweep and later runs tune once.
pub fn dispatch<J: Job>(
    choice: BackendChoice,
    cache_dir: &Path,
    job: J,
) -> Result<J::Output, BackendError> {
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let cpu = || DeviceInfo {
        backend: "cpu (burn Flex)".into(),
        device: format!("{} ({threads} threads)", std::env::consts::ARCH),
        threads,
    };
    match choice {
        BackendChoice::Cpu => Ok(job.run::<CpuTrain>(Default::default(), cpu())),
        BackendChoice::Cuda => {
            let info = probe_cuda(cache_dir)?;
            Ok(job.run::<CudaTrain>(Default::default(), info))
        }
        BackendChoice::Wgpu => {
            let info = probe_wgpu(cache_dir)?;
            Ok(job.run::<WgpuTrain>(Default::default(), info))
        }
        BackendChoice::Auto => {
            if let Ok(info) = probe_cuda(cache_dir) {
                return Ok(job.run::<CudaTrain>(Default::default(), info));
            }
            if let Ok(info) = probe_wgpu(cache_dir) {
                return Ok(job.run::<WgpuTrain>(Default::default(), info));
            }
            Ok(job.run::<CpuTrain>(Default::default(), cpu()))
        }
    }
}

/// The backend `choice` trains on here (`auto` resolved by probing, once per process). Cache keys
/// use it, so `auto` and the backend it picks share their cached stages.
pub fn concrete(choice: BackendChoice, cache_dir: &Path) -> BackendChoice {
    use std::sync::OnceLock;
    static AUTO: OnceLock<BackendChoice> = OnceLock::new();
    match choice {
        BackendChoice::Auto => *AUTO.get_or_init(|| {
            if probe_cuda(cache_dir).is_ok() {
                BackendChoice::Cuda
            } else if probe_wgpu(cache_dir).is_ok() {
                BackendChoice::Wgpu
            } else {
                BackendChoice::Cpu
            }
        }),
        other => other,
    }
}

/// Runs `f`, turning a panic into its message (GPU runtimes panic when a driver or library is
/// missing). The panic hook is silenced meanwhile so nothing is printed.
fn catch<T>(f: impl FnOnce() -> T + std::panic::UnwindSafe) -> Result<T, String> {
    use std::sync::Mutex;
    static HOOK: Mutex<()> = Mutex::new(());
    let _guard = HOOK.lock().unwrap_or_else(|e| e.into_inner());
    let previous = std::panic::take_hook();
    std::panic::set_hook(Box::new(|_| {}));
    let result = std::panic::catch_unwind(f);
    std::panic::set_hook(previous);
    result.map_err(|payload| {
        payload
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| payload.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_else(|| "the runtime failed to start".into())
    })
}

/// Persists CubeCL's autotune results under `cache_dir/autotune` (its default is the `target/` of
/// the nearest Cargo project, else a per-user folder: the same binary started elsewhere tuned
/// again). `CUBECL_AUTOTUNE_LEVEL` still sets the effort. Set once per process, before any GPU use.
fn configure_cubecl(cache_dir: &Path) {
    use cubecl_runtime::config::{cache::CacheConfig, CubeClRuntimeConfig, RuntimeConfig};
    use std::sync::Once;
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let dir = cache_dir.join("autotune");
        let _ = std::fs::create_dir_all(&dir);
        // As CubeCL reads it (a cubecl.toml above the working directory, then CUBECL_* variables),
        // with the cache moved; `set` must come before anything reads the configuration.
        let mut config = CubeClRuntimeConfig::from_current_dir().override_from_env();
        config.autotune.cache = CacheConfig::File(dir);
        CubeClRuntimeConfig::set(config);
        // Mesa's Vulkan drivers complain on stderr without a runtime directory.
        if std::env::var_os("XDG_RUNTIME_DIR").is_none() {
            use std::os::unix::fs::{DirBuilderExt, MetadataExt};
            // One per user, as the variable's contract asks (owned by the user, mode 0700).
            let uid = std::fs::metadata("/proc/self").map_or(0, |m| m.uid());
            let runtime = std::env::temp_dir().join(format!("xrun-runtime-{uid}"));
            let made = std::fs::DirBuilder::new().mode(0o700).create(&runtime);
            if made.is_ok() || runtime.is_dir() {
                std::env::set_var("XDG_RUNTIME_DIR", runtime);
            }
        }
    });
}

type Probed = std::sync::OnceLock<Result<DeviceInfo, String>>;

/// Whether CUDA works here, probed once per process.
fn probe_cuda(cache_dir: &Path) -> Result<DeviceInfo, BackendError> {
    static PROBED: Probed = Probed::new();
    once(&PROBED, || start_cuda(cache_dir), "cuda", CUDA_HINT)
}

/// Whether a wgpu adapter works here, probed once per process (its device is set up once).
fn probe_wgpu(cache_dir: &Path) -> Result<DeviceInfo, BackendError> {
    static PROBED: Probed = Probed::new();
    once(&PROBED, || start_wgpu(cache_dir), "wgpu", WGPU_HINT)
}

/// The first `start`'s outcome, kept in `cell` for every later probe.
fn once(
    cell: &'static Probed,
    start: impl FnOnce() -> Result<DeviceInfo, String>,
    backend: &'static str,
    hint: &'static str,
) -> Result<DeviceInfo, BackendError> {
    cell.get_or_init(start)
        .clone()
        .map_err(|reason| BackendError::Unavailable {
            backend,
            reason,
            hint,
        })
}

fn start_cuda(cache_dir: &Path) -> Result<DeviceInfo, String> {
    configure_cubecl(cache_dir);
    catch(|| {
        use burn::tensor::Tensor;
        let device = Default::default();
        let t = Tensor::<burn::backend::Cuda, 1>::ones([4], &device);
        t.sum().into_scalar()
    })?;
    Ok(DeviceInfo {
        backend: "cuda (burn Cuda, fusion + autotune)".into(),
        device: "CUDA device 0".into(),
        threads: 0,
    })
}

fn start_wgpu(cache_dir: &Path) -> Result<DeviceInfo, String> {
    configure_cubecl(cache_dir);
    let adapter = catch(|| {
        use burn::backend::wgpu::{graphics::AutoGraphicsApi, init_setup, WgpuDevice};
        let setup = init_setup::<AutoGraphicsApi>(&WgpuDevice::DefaultDevice, Default::default());
        let info = setup.adapter.get_info();
        format!(
            "{} ({:?}, driver {} {})",
            info.name, setup.backend, info.driver, info.driver_info
        )
    })?;
    Ok(DeviceInfo {
        backend: "wgpu (burn Wgpu, fusion + autotune)".into(),
        device: adapter,
        threads: 0,
    })
}
