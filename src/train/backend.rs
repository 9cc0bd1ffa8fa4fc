//! The one file that names burn backends. Everything else is generic over `B: AutodiffBackend`.
//!
//! `cpu` is burn's Flex; `wgpu` (Vulkan, Metal, DX12; Mesa's lavapipe without a GPU) and `cuda`
//! are CubeCL backends with fusion and autotune. `auto` takes CUDA if a device answers, then a
//! wgpu adapter, then the CPU. A GPU backend is probed before anything runs: a missing driver or
//! library is an error naming it, not a panic halfway through a sweep.

use std::path::Path;

use crate::config::experiment::{BackendChoice, Precision};

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
    /// The float type of every tensor (`f32`, `bf16`, `f16`); empty in runs from before it was
    /// recorded, which were f32.
    #[serde(default)]
    pub precision: String,
}

#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    #[error("backend `{backend}` is not available here: {reason}\n  {hint}")]
    Unavailable {
        backend: &'static str,
        reason: String,
        hint: &'static str,
    },
    #[error("`experiment.precision` = \"{precision}\" is not available on {backend}: {reason}")]
    Precision {
        precision: &'static str,
        backend: String,
        reason: String,
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

/// Runs `job` on the backend `choice` names, in `precision`, after probing that it works here.
/// `cache_dir` keeps the GPU backends' autotune results, so a sweep and later runs tune once.
pub fn dispatch<J: Job>(
    choice: BackendChoice,
    precision: Precision,
    cache_dir: &Path,
    job: J,
) -> Result<J::Output, BackendError> {
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let cpu = || DeviceInfo {
        backend: "cpu (burn Flex)".into(),
        device: format!("{} ({threads} threads)", std::env::consts::ARCH),
        threads,
        precision: String::new(),
    };
    match choice {
        BackendChoice::Cpu => start::<CpuTrain, J>(job, cpu(), precision),
        BackendChoice::Cuda => start::<CudaTrain, J>(job, probe_cuda(cache_dir)?, precision),
        BackendChoice::Wgpu => start::<WgpuTrain, J>(job, probe_wgpu(cache_dir)?, precision),
        BackendChoice::Auto => {
            if let Ok(info) = probe_cuda(cache_dir) {
                return start::<CudaTrain, J>(job, info, precision);
            }
            if let Ok(info) = probe_wgpu(cache_dir) {
                return start::<WgpuTrain, J>(job, info, precision);
            }
            start::<CpuTrain, J>(job, cpu(), precision)
        }
    }
}

/// Makes `precision` the float type of every tensor created on `B`'s default device from now on,
/// then runs `job` there. Burn keeps one such setting per device and process, fixed by the first
/// tensor created: the probes create theirs with an explicit f32, so they fix nothing.
fn start<B: burn::tensor::backend::AutodiffBackend, J: Job>(
    job: J,
    mut info: DeviceInfo,
    precision: Precision,
) -> Result<J::Output, BackendError> {
    use burn::tensor::{get_device_settings, set_default_dtypes, FloatDType, IntDType};
    let device = B::Device::default();
    let wanted = match precision {
        Precision::F32 => FloatDType::F32,
        Precision::Bf16 => FloatDType::BF16,
        Precision::F16 => FloatDType::F16,
    };
    let failed = |reason: String| BackendError::Precision {
        precision: precision.name(),
        backend: info.backend.clone(),
        reason,
    };
    if !precision.is_f32() {
        // A panic from the runtime is an error here, not mid-run. Set twice in one process (tests)
        // is fine when it is the same type, which the check below makes sure of.
        let set = catch(std::panic::AssertUnwindSafe(|| {
            set_default_dtypes::<B>(&device, wanted, IntDType::I32)
        }))
        .map_err(&failed)?;
        match set {
            Ok(()) | Err(burn::tensor::backend::DeviceError::AlreadyInitialized { .. }) => {}
            Err(e) => return Err(failed(e.to_string())),
        }
    }
    let actual = get_device_settings::<B>(&device).float_dtype;
    if actual != wanted {
        return Err(failed(format!(
            "this process already creates {actual:?} tensors on that device"
        )));
    }
    info.precision = precision.name().into();
    Ok(job.run::<B>(device, info))
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
        // An explicit dtype: the device's default float type stays unset for `start`.
        let device = Default::default();
        let t = Tensor::<burn::backend::Cuda, 1>::ones([4], (&device, burn::tensor::DType::F32));
        t.sum().into_scalar()
    })?;
    Ok(DeviceInfo {
        backend: "cuda (burn Cuda, fusion + autotune)".into(),
        device: "CUDA device 0".into(),
        threads: 0,
        precision: String::new(),
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
        precision: String::new(),
    })
}
