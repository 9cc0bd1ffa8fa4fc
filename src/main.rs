//! The `xrun` binary: everything lives in the library; see `cli`.

fn main() -> std::process::ExitCode {
    xrun::cli::main()
}
