//! Command line: `xrun FILE` (same as `xrun run FILE`), `xrun validate FILE`. Errors are printed once,
//! here, and mapped to exit codes: 0 success, 1 a stage failed, 2 invalid input.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};

use crate::config;
use crate::exec::{self, Options};

#[derive(Parser, Debug)]
#[command(
    name = "xrun",
    version,
    about = "Declarative experiment runner: one TOML file, corpus to report."
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run every stage of an experiment and render its report (the default command).
    Run(RunArgs),
    /// Check an experiment file and read its data without training; lists every error at once.
    Validate(FileArgs),
    /// Re-render the report of a run directory from its stored results, without training.
    Report {
        /// A run directory, e.g. reports/clue_tnews.
        dir: PathBuf,
    },
}

#[derive(Args, Debug)]
pub struct FileArgs {
    /// The experiment file (TOML).
    pub file: PathBuf,
    /// Override a key, e.g. `--set pretrain.objective=ar --set model.layers=2`.
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub sets: Vec<String>,
}

#[derive(Args, Debug)]
pub struct RunArgs {
    #[command(flatten)]
    pub file: FileArgs,
    /// No progress bars or log lines; errors are still printed.
    #[arg(long, short)]
    pub quiet: bool,
}

/// Exit codes, as documented in the README.
pub const EXIT_STAGE_FAILED: u8 = 1;
pub const EXIT_INVALID_INPUT: u8 = 2;

/// `xrun FILE …` means `xrun run FILE …`.
pub fn normalize_args(mut args: Vec<String>) -> Vec<String> {
    let known = [
        "run",
        "validate",
        "report",
        "help",
        "-h",
        "--help",
        "-V",
        "--version",
    ];
    if let Some(first) = args.get(1) {
        if !known.contains(&first.as_str()) {
            args.insert(1, "run".into());
        }
    }
    args
}

pub fn main() -> ExitCode {
    let cli = Cli::parse_from(normalize_args(std::env::args().collect()));
    match cli.command {
        Command::Run(args) => run(&args),
        Command::Validate(args) => validate(&args),
        Command::Report { dir } => match crate::report::rerender(&dir) {
            Ok(path) => {
                println!("{}", path.display());
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("error: {e}");
                ExitCode::from(EXIT_INVALID_INPUT)
            }
        },
    }
}

fn load(args: &FileArgs) -> Result<config::Experiment, ExitCode> {
    config::load(&args.file, &args.sets).map_err(|e| {
        eprintln!("{e}");
        ExitCode::from(EXIT_INVALID_INPUT)
    })
}

fn validate(args: &FileArgs) -> ExitCode {
    let exp = match load(args) {
        Ok(exp) => exp,
        Err(code) => return code,
    };
    match exec::check_data(&exp) {
        Ok(data) => {
            let skipped: usize = [&data.corpus, &data.dev, &data.test]
                .into_iter()
                .flatten()
                .chain(std::iter::once(&data.train))
                .map(|s| s.skipped.len())
                .sum();
            let plural =
                |n: usize, what: &str| format!("{n} {what}{}", if n == 1 { "" } else { "s" });
            println!(
                "{}: valid ({}, {}, {} skipped)",
                args.file.display(),
                plural(data.train.examples.len(), "train example"),
                plural(data.labels.len(), "label"),
                plural(skipped, "line")
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(e.exit_code() as u8)
        }
    }
}

fn run(args: &RunArgs) -> ExitCode {
    let exp = match load(&args.file) {
        Ok(exp) => exp,
        Err(code) => return code,
    };
    match exec::run(&exp, &Options { quiet: args.quiet }) {
        Ok(outcome) => {
            if let Some(acc) = outcome.test_accuracy {
                eprintln!("test accuracy: {:.2}%", acc * 100.0);
            }
            println!("{}", outcome.report.display());
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e}");
            if e.exit_code() == 1 && exp.run_dir().join("summary.json").is_file() {
                eprintln!(
                    "what finished before is kept in {}",
                    exp.run_dir().display()
                );
            }
            ExitCode::from(e.exit_code() as u8)
        }
    }
}
