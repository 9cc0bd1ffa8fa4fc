//! The `xrun` binary: everything lives in the library; see `cli`.

fn main() -> std::process::ExitCode {
    tune_allocator();
    xrun::cli::main()
}

/// glibc gives the memory of every training step back to the kernel and faults it in again on the
/// next one, in two ways, and both are turned off here (BENCHMARKS.md, "the allocator" and "large
/// tensors on the heap"):
/// - The CPU backend's worker threads allocate from heaps that shrink as soon as they can. Keeping
///   512 MiB of padding at the top of each heap stops that: on the CPU, bert-mini (batch 32, 48
///   tokens) spent 3.4 s instead of 0.36 s in the kernel over 11 steps, and its steps took 1.27 s
///   instead of 1.08 s. Peak resident memory grows by about 10%.
/// - Every allocation above the mmap threshold (128 KiB at first, raised up to 32 MiB as such
///   blocks are freed) gets pages of its own from the kernel and returns them when freed: every
///   tensor of a step, whose first write then faults each page in and zeroes it. Serving blocks of
///   up to 1 GiB from the heaps instead made bert-small's steps (batch 32, 128 tokens) 1.3–1.5×
///   as fast, for 4% more peak resident memory.
/// - A CPU job runs on a thread of its own pool (`train::backend`), and glibc gives each new
///   thread an arena of its own, whose heaps grow to 64 MiB at most: a larger tensor would be
///   mapped and unmapped again at every step. One arena for every thread keeps the job's tensors
///   on the main heap, as when the job ran on the main thread: bert-small's peak resident memory
///   was 1,221 MiB with an arena per thread, 1,142 MiB with one and 1,155 MiB on the main thread.
///
/// A `MALLOC_TOP_PAD_`, `MALLOC_MMAP_THRESHOLD_` or `MALLOC_ARENA_MAX` in the environment wins
/// over its setting here.
fn tune_allocator() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        let settings = [
            ("MALLOC_TOP_PAD_", libc::M_TOP_PAD, 512 << 20),
            ("MALLOC_MMAP_THRESHOLD_", libc::M_MMAP_THRESHOLD, 1 << 30),
            ("MALLOC_ARENA_MAX", libc::M_ARENA_MAX, 1),
        ];
        for (variable, parameter, value) in settings {
            if std::env::var_os(variable).is_none() {
                // SAFETY: mallopt only changes glibc's allocator parameters; it is called before
                // any thread exists.
                unsafe {
                    libc::mallopt(parameter, value);
                }
            }
        }
    }
}
