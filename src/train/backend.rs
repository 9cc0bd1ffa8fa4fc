//! The one file that names burn backends. Everything else is generic over `B: AutodiffBackend`.
//!
//! `cpu` is burn's Flex; `wgpu` (Vulkan, Metal, DX12; Mesa's lavapipe without a GPU) and `cuda`
//! are CubeCL backends with fusion and autotune. `auto` takes CUDA if a device answers, then a
//! wgpu adapter, then the CPU. A GPU backend is probed before anything runs: a missing driver or
//! library is an error naming it, not a panic halfway through a sweep.

use std::path::PathBuf;

use crate::config::experiment::{Autotune, BackendChoice, Precision};

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
    /// The precision's name (`f32`, `bf16-mixed`, `bf16`, `f16`); empty in runs from before it
    /// was recorded, which were f32.
    #[serde(default)]
    pub precision: String,
    /// The largest buffer the device allows one tensor, in bytes (None: no limit, the CPU).
    /// Attention, the feed-forward network and the LM head compute in pieces under it
    /// (`model::pieces`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_buffer: Option<u64>,
    /// Batches are padded to a multiple of this many positions (1, exact, is not recorded):
    /// `experiment.pad_multiple`, else `GPU_PAD_MULTIPLE` on a GPU. Set by `start`.
    #[serde(default = "one", skip_serializing_if = "is_one")]
    pub pad_multiple: usize,
    /// burn's device memory pools on a GPU backend (None on the CPU).
    #[serde(skip)]
    pub pools: Option<Pools>,
}

/// A CubeCL backend's memory pools on the default device, for the calling thread's stream.
#[derive(Debug, Clone, Copy)]
pub struct Pools {
    /// The bytes the pools have reserved: the device memory training holds, short of the
    /// runtime's own context. The pools keep their pages until `release` (CubeCL's default
    /// sub-slice pools free none on their own), so read after a run it is the run's peak. `None`
    /// when the runtime does not answer.
    pub reserved: fn() -> Option<u64>,
    /// Frees the pages no live tensor uses, so a later `reserved` measures what comes after.
    pub release: fn(),
}

/// The largest buffer CubeCL's pools hand out on `R`'s default device: wgpu's
/// `max_storage_buffer_binding_size`, a quarter of the memory on CUDA.
fn max_buffer<R: cubecl_runtime::runtime::Runtime>() -> Option<u64>
where
    R::Device: Default,
{
    catch(|| {
        R::client(&Default::default())
            .properties()
            .memory
            .max_page_size
    })
    .ok()
}

impl Pools {
    fn of<R: cubecl_runtime::runtime::Runtime>() -> Self
    where
        R::Device: Default,
    {
        Pools {
            reserved: || {
                catch(|| R::client(&Default::default()).memory_usage())
                    .ok()?
                    .ok()
                    .map(|m| m.bytes_reserved)
            },
            release: || {
                let _ = catch(|| R::client(&Default::default()).memory_cleanup());
            },
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    #[error("backend `{backend}` is not available here: {reason}\n  {hint}")]
    Unavailable {
        backend: &'static str,
        reason: String,
        hint: &'static str,
    },
    #[error("training on {backend}, {device}, failed in the GPU runtime: {reason}\n  {hint}")]
    Failed {
        backend: String,
        device: String,
        reason: String,
        hint: String,
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
const CPU_HINT: &str = "RAYON_NUM_THREADS sets how many threads the CPU backend starts";
const WGPU_HINT: &str =
    "wgpu needs a Vulkan, Metal or DX12 adapter and its loader (Linux: libvulkan1 \
     and a driver; without a GPU, Mesa's software renderer: apt-get install mesa-vulkan-drivers \
     libvulkan1); set experiment.backend = \"auto\" to fall back to the CPU";

/// Work generic over the training backend; `dispatch` picks the backend and runs it (on the
/// CPU, on a thread of its own pool: hence `Send`).
pub trait Job: Send {
    type Output: Send;
    fn run<B: burn::tensor::backend::AutodiffBackend>(
        self,
        device: B::Device,
        info: DeviceInfo,
    ) -> Self::Output;
}

/// How the GPU backends are set up: once per process, by the first probe.
#[derive(Debug, Clone)]
pub struct GpuSetup {
    /// `<cache_dir>/autotune` keeps autotune results and `<cache_dir>/kernels/<device>` compiled
    /// CUDA kernels, so a sweep and later runs tune and compile once.
    pub cache_dir: PathBuf,
    /// The autotune effort; `None` leaves `CUBECL_AUTOTUNE_LEVEL` or CubeCL's default.
    pub autotune: Option<Autotune>,
    /// What padded lengths are rounded up to a multiple of (`experiment.pad_multiple`); `None`:
    /// `GPU_PAD_MULTIPLE` on a GPU, exact (1) on the CPU. See `pad_multiple`.
    pub pad_multiple: Option<usize>,
}

/// Padded lengths on a GPU backend are multiples of this unless `experiment.pad_multiple` says
/// otherwise. Each new `[batch, seq]` compiles and tunes its own kernels there: on an H200 a
/// TNEWS fine-tuning whose batches were padded to their longest (any length up to 48) was still
/// compiling after 330 s, where PyTorch finished all five splits in 7 s. Multiples of 16 leave
/// three lengths for 48 positions and eight for 128, for about 7.5 more padded positions per row.
pub const GPU_PAD_MULTIPLE: usize = 16;

/// The multiple batches are padded to: `explicit` (`experiment.pad_multiple`), else
/// `GPU_PAD_MULTIPLE` on a GPU backend and 1 (exact) on the CPU.
pub fn pad_multiple(gpu: bool, explicit: Option<usize>) -> usize {
    match explicit {
        Some(m) => m.max(1),
        None if gpu => GPU_PAD_MULTIPLE,
        None => 1,
    }
}

fn one() -> usize {
    1
}

/// `skip_serializing_if` for settings whose default is 1 (here and in the stage keys).
pub(crate) fn is_one(n: &usize) -> bool {
    *n == 1
}

/// The variable that sizes the thread pool of burn's CPU backend (rayon's global pool, where
/// gemm splits its products); `--jobs` sets it for each process.
pub const CPU_THREADS_VAR: &str = "RAYON_NUM_THREADS";

/// The cores this process may run on.
pub fn cores() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// The threads of the CPU backend's pool: `CPU_THREADS_VAR` where set to a positive number, as
/// rayon reads it, else one per core.
fn cpu_threads() -> usize {
    std::env::var(CPU_THREADS_VAR)
        .ok()
        .and_then(|n| n.parse::<usize>().ok())
        .filter(|&n| n > 0)
        .unwrap_or_else(cores)
}

/// Runs `job` on the backend `choice` names, in `precision`, after probing that it works here.
pub fn dispatch<J: Job>(
    choice: BackendChoice,
    precision: Precision,
    setup: &GpuSetup,
    job: J,
) -> Result<J::Output, BackendError> {
    let threads = cpu_threads();
    let cpu = || DeviceInfo {
        backend: "cpu (burn Flex)".into(),
        device: format!(
            "{} ({threads} thread{})",
            std::env::consts::ARCH,
            if threads == 1 { "" } else { "s" }
        ),
        threads,
        ..DeviceInfo::default()
    };
    let pad = setup.pad_multiple;
    match choice {
        BackendChoice::Cpu => start::<CpuTrain, J>(job, cpu(), precision, pad),
        BackendChoice::Cuda => start::<CudaTrain, J>(job, probe_cuda(setup)?, precision, pad),
        BackendChoice::Wgpu => start::<WgpuTrain, J>(job, probe_wgpu(setup)?, precision, pad),
        BackendChoice::Auto => {
            if let Ok(info) = probe_cuda(setup) {
                return start::<CudaTrain, J>(job, info, precision, pad);
            }
            if let Ok(info) = probe_wgpu(setup) {
                return start::<WgpuTrain, J>(job, info, precision, pad);
            }
            start::<CpuTrain, J>(job, cpu(), precision, pad)
        }
    }
}

/// Makes `precision`'s storage type the float type of every tensor created on `B`'s default
/// device from now on (and, when mixed, its half type the one products are computed in), then
/// runs `job` there. Burn keeps one such setting per device and process, fixed by the first
/// tensor created: the probes create theirs with an explicit f32, so they fix nothing. Batches are
/// padded to a multiple of `pad`, else of the device kind's default (`pad_multiple`).
fn start<B: burn::tensor::backend::AutodiffBackend, J: Job>(
    job: J,
    mut info: DeviceInfo,
    precision: Precision,
    pad: Option<usize>,
) -> Result<J::Output, BackendError> {
    use burn::tensor::{get_device_settings, set_default_dtypes, FloatDType, IntDType};
    let device = B::Device::default();
    // The type tensors are stored in, and the half type products are computed in when mixed.
    let (wanted, compute) = match precision {
        Precision::F32 => (FloatDType::F32, None),
        Precision::Bf16 => (FloatDType::BF16, None),
        Precision::F16 => (FloatDType::F16, None),
        Precision::Bf16Mixed => (FloatDType::F32, Some(FloatDType::BF16)),
    };
    let failed = |reason: String| BackendError::Precision {
        precision: precision.name(),
        backend: info.backend.clone(),
        reason,
    };
    if wanted != FloatDType::F32 {
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
    info.pad_multiple = pad_multiple(info.pools.is_some(), pad);
    let settings = ThreadSettings {
        max_buffer: info.max_buffer,
        pad_multiple: info.pad_multiple,
        compute,
        host: info.pools.is_none(),
    };
    if info.pools.is_none() {
        // The CPU: a panic there is xrun's own bug, shown as Rust shows it.
        let pool = cpu_pool(info.threads).map_err(|e| BackendError::Unavailable {
            backend: "cpu",
            reason: format!("cannot start its {} threads: {e}", info.threads),
            hint: CPU_HINT,
        })?;
        return Ok(pool.install(move || {
            settings.apply();
            job.run::<B>(device, info)
        }));
    }
    settings.apply();
    let (backend, name, limit) = (info.backend.clone(), info.device.clone(), info.max_buffer);
    guarded(|| job.run::<B>(device, info)).map_err(|reason| BackendError::Failed {
        hint: failure_hint(&reason, limit),
        backend,
        device: name,
        reason,
    })
}

/// What the thread running a job reads from thread-locals: the settings of its device.
struct ThreadSettings {
    max_buffer: Option<u64>,
    pad_multiple: usize,
    compute: Option<burn::tensor::FloatDType>,
    host: bool,
}

impl ThreadSettings {
    /// Makes these the calling thread's settings.
    fn apply(&self) {
        crate::model::pieces::set_max_buffer(self.max_buffer);
        crate::data::batch::set_pad_multiple(self.pad_multiple);
        crate::model::mixed::set_compute(self.compute);
        crate::model::mixed::set_host(self.host);
    }
}

/// The stack of each thread of `cpu_pool`: what the main thread has on Linux, since the whole job
/// (the training loop, evaluation, the report) runs on one of them.
const CPU_STACK: usize = 8 << 20;

/// The thread pool a CPU job runs in, `threads` threads, the job itself on one of them.
///
/// burn's CPU backend, gemm and `model::host` split their work over the pool of the thread that
/// calls them. Called from outside the pool, as when the job ran on the main thread, every split
/// hands all its parts to the pool and puts the caller to sleep until they are done: a wake-up
/// each way per operation, and three threads on the cores whenever the pool's threads spin while
/// the caller computes alone. Run on a thread of the pool, the job computes a share of each split
/// itself and takes back the parts no other thread has started. The numbers are the same to the
/// bit; the headline study in one process took 0.95× the time and a third less system time, with
/// `--jobs 2` 0.98× (BENCHMARKS.md, "The job on a thread of its own pool"). A pool of its own,
/// not rayon's global one, so that no other work is run inside a job's waits (tests run jobs side
/// by side) and its threads have the main thread's stack.
fn cpu_pool(threads: usize) -> Result<rayon::ThreadPool, rayon::ThreadPoolBuildError> {
    rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .stack_size(CPU_STACK)
        .thread_name(|i| format!("xrun-cpu-{i}"))
        .build()
}

/// Runs `f`, in which a GPU runtime may fail. The runtime fails by panicking in its own thread,
/// and then every thread waiting on it panics in turn (thousands of lines): the first panic in
/// the process is printed as one line, with its thread and place (a bug of xrun's own would show
/// there too), and returned as the failure; the rest are silenced. After a failure the silencing
/// stays, since the runtime's threads may go on panicking until the process ends.
fn guarded<T>(f: impl FnOnce() -> T) -> Result<T, String> {
    use std::sync::Mutex;
    static FIRST: Mutex<Option<String>> = Mutex::new(None);
    let first = || FIRST.lock().unwrap_or_else(|e| e.into_inner());
    *first() = None;
    let previous = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |panic| {
        let mut seen = first();
        if seen.is_none() {
            let message = panic_message(panic.payload());
            let thread = std::thread::current();
            let place = panic.location().map(|l| {
                // From the crate's folder on: `cubecl-wgpu-0.10.0/src/compute/server.rs:270`.
                let file = l.file();
                let short = file.rfind("/src/").map_or(file, |i| {
                    let start = file[..i].rfind('/').map_or(0, |j| j + 1);
                    &file[start..]
                });
                format!(", {short}:{}", l.line())
            });
            eprintln!(
                "xrun: first panic (thread {}{}): {message}",
                thread.name().unwrap_or("unnamed"),
                place.unwrap_or_default()
            );
            *seen = Some(message);
        }
    }));
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)) {
        Ok(value) => {
            std::panic::set_hook(previous);
            Ok(value)
        }
        Err(payload) => Err(first()
            .take()
            .unwrap_or_else(|| panic_message(payload.as_ref()))),
    }
}

/// A panic's message, its first line (runtimes append their backtraces).
fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    let text = payload_text(payload).unwrap_or("a panic without a message");
    let line = text.lines().next().unwrap_or_default();
    line.strip_prefix("called `Result::unwrap()` on an `Err` value: ")
        .unwrap_or(line)
        .to_string()
}

/// What to do about a runtime failure: a tensor the device could not hold is the batch's size.
fn failure_hint(reason: &str, limit: Option<u64>) -> String {
    let lower = reason.to_lowercase();
    let memory = ["allocate", "out of memory", "outofmemory", "too big"];
    if memory.iter().any(|m| lower.contains(m)) {
        let mib = |b: u64| format!("{:.1} MiB", b as f64 / f64::from(1u32 << 20));
        // CubeCL's message ends with the bytes it was asked for.
        let asked = reason
            .rsplit(' ')
            .next()
            .and_then(|n| n.parse::<u64>().ok())
            .map(|b| format!(" of {}", mib(b)))
            .unwrap_or_default();
        let per_buffer = limit
            .filter(|&b| b < u64::MAX)
            .map(|b| format!(", where one buffer holds at most {}", mib(b)))
            .unwrap_or_default();
        format!(
            "the device could not hold a tensor{asked}{per_buffer}: lower the stage's batch size \
             (pretrain.batch_size, finetune.batch_size, eval.batch_size), model.max_len, or the \
             model's size (model.d_model, model.d_ff, tokenizer.vocab_size). Stages that finished \
             are cached; the next run starts at the one that failed"
        )
    } else {
        "a fault in the GPU runtime, not in the experiment file; `--backend cpu` runs the same \
         experiment. Stages that finished are cached; the next run starts at the one that failed"
            .into()
    }
}

/// The backend `choice` trains on here (`auto` resolved by probing, once per process). Cache keys
/// use it, so `auto` and the backend it picks share their cached stages.
pub fn concrete(choice: BackendChoice, setup: &GpuSetup) -> BackendChoice {
    use std::sync::OnceLock;
    static AUTO: OnceLock<BackendChoice> = OnceLock::new();
    match choice {
        BackendChoice::Auto => *AUTO.get_or_init(|| {
            if probe_cuda(setup).is_ok() {
                BackendChoice::Cuda
            } else if probe_wgpu(setup).is_ok() {
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
        payload_text(payload.as_ref())
            .unwrap_or("the runtime failed to start")
            .to_string()
    })
}

/// A panic's message, as `panic!` and `unwrap` leave it.
fn payload_text(payload: &(dyn std::any::Any + Send)) -> Option<&str> {
    payload
        .downcast_ref::<String>()
        .map(String::as_str)
        .or_else(|| payload.downcast_ref::<&str>().copied())
}

/// Sets CubeCL up once per process, before any GPU use, and returns the autotune level in force.
/// - Autotune results persist under `<cache_dir>/autotune` (CubeCL's default is the `target/` of
///   the nearest Cargo project, else a per-user folder: the same binary started elsewhere tuned
///   again).
/// - The level is `setup.autotune`, else `CUBECL_AUTOTUNE_LEVEL`, else CubeCL's default.
/// - With `cuda` (set up for the CUDA backend, which `auto` probes first), compiled kernels (PTX)
///   persist under `<cache_dir>/kernels/<device name>` when a device answers: PTX built for one
///   architecture need not load on another, and a cache directory may be shared by machines with
///   different GPUs. wgpu's WGSL kernels have no such cache in CubeCL, so a wgpu start leaves the
///   CUDA driver unloaded.
fn configure_cubecl(setup: &GpuSetup, cuda: bool) -> &'static str {
    use cubecl_runtime::config::autotune::AutotuneLevel;
    use cubecl_runtime::config::{cache::CacheConfig, CubeClRuntimeConfig, RuntimeConfig};
    use std::sync::OnceLock;
    static LEVEL: OnceLock<&'static str> = OnceLock::new();
    LEVEL.get_or_init(|| {
        let dir = setup.cache_dir.join("autotune");
        let _ = std::fs::create_dir_all(&dir);
        // As CubeCL reads it (a cubecl.toml above the working directory, then CUBECL_* variables),
        // with the caches moved; `set` must come before anything reads the configuration.
        let mut config = CubeClRuntimeConfig::from_current_dir().override_from_env();
        config.autotune.cache = CacheConfig::File(dir);
        if let Some(level) = setup.autotune {
            config.autotune.level = match level {
                Autotune::Minimal => AutotuneLevel::Minimal,
                Autotune::Balanced => AutotuneLevel::Balanced,
                Autotune::Extensive => AutotuneLevel::Extensive,
                Autotune::Full => AutotuneLevel::Full,
            };
        }
        if let Some(Ok(Ok(name))) = cuda.then(|| catch(cuda_name)) {
            let dir = setup.cache_dir.join("kernels").join(file_safe(&name));
            if std::fs::create_dir_all(&dir).is_ok() {
                config.compilation.cache = Some(CacheConfig::File(dir));
            }
        }
        let level = match config.autotune.level {
            AutotuneLevel::Minimal => Autotune::Minimal,
            AutotuneLevel::Balanced => Autotune::Balanced,
            AutotuneLevel::Extensive => Autotune::Extensive,
            AutotuneLevel::Full => Autotune::Full,
        };
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
        level.name()
    })
}

/// `name` as one path component: letters, digits, `-`, `_` and `.` kept, the rest `_`.
fn file_safe(name: &str) -> String {
    name.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.') {
                c
            } else {
                '_'
            }
        })
        .collect()
}

type Probed = std::sync::OnceLock<Result<DeviceInfo, String>>;

/// Whether CUDA works here, probed once per process.
fn probe_cuda(setup: &GpuSetup) -> Result<DeviceInfo, BackendError> {
    static PROBED: Probed = Probed::new();
    once(&PROBED, || start_cuda(setup), "cuda", CUDA_HINT)
}

/// Whether a wgpu adapter works here, probed once per process (its device is set up once).
fn probe_wgpu(setup: &GpuSetup) -> Result<DeviceInfo, BackendError> {
    static PROBED: Probed = Probed::new();
    once(&PROBED, || start_wgpu(setup), "wgpu", WGPU_HINT)
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

fn start_cuda(setup: &GpuSetup) -> Result<DeviceInfo, String> {
    let level = configure_cubecl(setup, true);
    catch(|| {
        use burn::tensor::Tensor;
        // An explicit dtype: the device's default float type stays unset for `start`.
        let device = Default::default();
        let t = Tensor::<burn::backend::Cuda, 1>::ones([4], (&device, burn::tensor::DType::F32));
        t.sum().into_scalar()
    })?;
    Ok(DeviceInfo {
        backend: format!("cuda (burn Cuda, fusion + autotune {level})"),
        device: catch(cuda_device).unwrap_or_else(|_| "CUDA device 0".into()),
        threads: 0,
        precision: String::new(),
        max_buffer: max_buffer::<cubecl_cuda::CudaRuntime>(),
        pools: Some(Pools::of::<cubecl_cuda::CudaRuntime>()),
        ..DeviceInfo::default()
    })
}

/// Device 0's name as the driver gives it (e.g. "NVIDIA H200"): burn trains on the default
/// device, the first. Panics where the driver library cannot be loaded (run it under `catch`).
fn cuda_name() -> Result<String, cudarc::driver::DriverError> {
    use cudarc::driver::result;
    result::init()?;
    result::device::get_name(result::device::get(0)?)
}

/// Device 0 as the driver describes it, e.g. "NVIDIA H200 (140 GiB, CUDA driver 13.0)". Asked
/// once CUDA has started (the driver is loaded by then).
fn cuda_device() -> String {
    use cudarc::driver::{result, sys};
    let described = || -> Result<String, result::DriverError> {
        let name = cuda_name()?;
        let device = result::device::get(0)?;
        // SAFETY: `device` came from `get`, as both calls require.
        let bytes = unsafe { result::device::total_mem(device)? };
        let mut version = 0;
        // SAFETY: the driver writes one int through the pointer.
        unsafe { sys::cuDriverGetVersion(&mut version) }.result()?;
        Ok(format!(
            "{name} ({:.0} GiB, CUDA driver {}.{})",
            bytes as f64 / f64::from(1u32 << 30),
            version / 1000,
            version % 1000 / 10
        ))
    };
    described().unwrap_or_else(|e| format!("CUDA device 0 (the driver did not describe it: {e})"))
}

fn start_wgpu(setup: &GpuSetup) -> Result<DeviceInfo, String> {
    let level = configure_cubecl(setup, false);
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
        backend: format!("wgpu (burn Wgpu, fusion + autotune {level})"),
        device: adapter,
        threads: 0,
        precision: String::new(),
        max_buffer: max_buffer::<burn::backend::wgpu::WgpuRuntime>(),
        pools: Some(Pools::of::<burn::backend::wgpu::WgpuRuntime>()),
        ..DeviceInfo::default()
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::backend::AutodiffBackend;
    use burn::tensor::FloatDType;

    /// What a job sees of the thread it runs on.
    #[derive(Debug)]
    struct Seen {
        /// Its index in the rayon pool it belongs to, if any.
        index: Option<usize>,
        /// The threads of the pool its parallel work goes to.
        pool_threads: usize,
        name: Option<String>,
        host: bool,
        compute: Option<FloatDType>,
        /// `DeviceInfo::threads`.
        threads: usize,
    }

    struct Look;

    impl Job for Look {
        type Output = Seen;
        fn run<B: AutodiffBackend>(self, _: B::Device, info: DeviceInfo) -> Seen {
            Seen {
                index: rayon::current_thread_index(),
                pool_threads: rayon::current_num_threads(),
                name: std::thread::current().name().map(String::from),
                host: crate::model::mixed::on_host(),
                compute: crate::model::mixed::compute(),
                threads: info.threads,
            }
        }
    }

    /// A CPU job runs on a thread of a pool of its own, as many threads as the report says, with
    /// its device's settings; the calling thread's are left as they were.
    #[test]
    fn a_cpu_job_runs_inside_its_own_pool_with_its_settings() {
        let setup = GpuSetup {
            cache_dir: std::env::temp_dir(),
            autotune: None,
            pad_multiple: None,
        };
        let seen = dispatch(BackendChoice::Cpu, Precision::Bf16Mixed, &setup, Look)
            .unwrap_or_else(|e| panic!("{e}"));
        assert!(seen.index.is_some(), "{seen:?}");
        assert!(
            seen.name
                .as_deref()
                .is_some_and(|n| n.starts_with("xrun-cpu-")),
            "{seen:?}"
        );
        assert_eq!(seen.pool_threads, cpu_threads(), "{seen:?}");
        assert_eq!(seen.threads, cpu_threads(), "{seen:?}");
        assert!(seen.host, "{seen:?}");
        assert_eq!(seen.compute, Some(FloatDType::BF16), "{seen:?}");
        assert!(!crate::model::mixed::on_host());
        assert_eq!(crate::model::mixed::compute(), None);
        assert_eq!(rayon::current_thread_index(), None);
    }
}
