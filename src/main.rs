//! The `xrun` binary: everything lives in the library; see `cli`.

fn main() -> std::process::ExitCode {
    tune_allocator();
    xrun::cli::main()
}

/// glibc gives the memory of every training step back to the kernel and faults it in again on the
/// next one (the CPU backend's worker threads allocate from heaps that shrink as soon as they can).
/// Keeping 512 MiB of padding at the top of each heap stops that: on the CPU, bert-mini (batch 32,
/// 48 tokens) spent 3.4 s instead of 0.36 s in the kernel over 11 steps, and its steps took 1.27 s
/// instead of 1.08 s (BENCHMARKS.md). Peak resident memory grows by about 10%. A
/// `MALLOC_TOP_PAD_` in the environment wins.
fn tune_allocator() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    if std::env::var_os("MALLOC_TOP_PAD_").is_none() {
        // SAFETY: mallopt only changes glibc's allocator parameters; it is called before any
        // thread exists.
        unsafe {
            libc::mallopt(libc::M_TOP_PAD, 512 << 20);
        }
    }
}
