//! Command line: `xrun FILE` (same as `xrun run FILE`), `xrun validate FILE`, `xrun plan FILE`,
//! `xrun report DIR`, `xrun gc`. Errors are printed once, here, and mapped to exit codes: 0 success,
//! 1 a stage failed, 2 invalid input.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};

use crate::config;
use crate::exec::{self, Options};
use crate::plan::Trial;

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
    /// List the trials × stages an experiment needs and which are already cached; trains nothing.
    Plan {
        #[command(flatten)]
        file: FileArgs,
        /// Also print every stage's cache key inputs.
        #[arg(long, short)]
        verbose: bool,
    },
    /// Re-render the report of a run directory from its stored results, without training.
    Report {
        /// A run directory, e.g. reports/clue_tnews.
        dir: PathBuf,
    },
    /// Remove cache entries that no run directory's plan references.
    Gc {
        /// The output folder whose run directories are kept (their plan.json files).
        #[arg(default_value = "reports")]
        output_dir: PathBuf,
        /// The cache to clean; default `<output_dir>/.cache`.
        #[arg(long)]
        cache: Option<PathBuf>,
        /// Only list what would be removed.
        #[arg(long)]
        dry_run: bool,
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
        "plan",
        "gc",
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
        Command::Plan { file, verbose } => plan(&file, verbose),
        Command::Gc {
            output_dir,
            cache,
            dry_run,
        } => {
            let cache = cache.unwrap_or_else(|| output_dir.join(".cache"));
            match crate::exec::gc(&output_dir, &cache, dry_run) {
                Ok(report) => {
                    print!("{report}");
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("error: {e}");
                    ExitCode::from(EXIT_INVALID_INPUT)
                }
            }
        }
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

fn load(args: &FileArgs) -> Result<(config::Experiment, Vec<Trial>), ExitCode> {
    let fail = |e: config::ConfigErrors| {
        eprintln!("{e}");
        ExitCode::from(EXIT_INVALID_INPUT)
    };
    let exp = config::load(&args.file, &args.sets).map_err(fail)?;
    let trials = crate::plan::expand(&exp).map_err(fail)?;
    Ok((exp, trials))
}

fn plan(args: &FileArgs, verbose: bool) -> ExitCode {
    let (exp, trials) = match load(args) {
        Ok(x) => x,
        Err(code) => return code,
    };
    match exec::plan_text(&exp, &trials, verbose) {
        Ok(text) => {
            print!("{text}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(e.exit_code() as u8)
        }
    }
}

fn validate(args: &FileArgs) -> ExitCode {
    let (_, trials) = match load(args) {
        Ok(x) => x,
        Err(code) => return code,
    };
    // Every trial's data is read: a split sweep names different files per trial.
    let mut checked = None;
    for t in &trials {
        match exec::check_data(&t.exp) {
            Ok(data) => checked = checked.or(Some(data)),
            Err(e) => {
                if trials.len() > 1 {
                    eprintln!("error: in trial {}: {e}", t.id);
                } else {
                    eprintln!("error: {e}");
                }
                return ExitCode::from(e.exit_code() as u8);
            }
        }
    }
    let trial_note = if trials.len() > 1 {
        format!("{} trials; first trial: ", trials.len())
    } else {
        String::new()
    };
    match checked.ok_or_else(|| exec::RunError::Input("no trials".into())) {
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
                "{}: valid ({}{}, {}, {} skipped)",
                args.file.display(),
                trial_note,
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
    let (exp, trials) = match load(&args.file) {
        Ok(x) => x,
        Err(code) => return code,
    };
    match exec::run(&exp, &trials, &Options { quiet: args.quiet }) {
        Ok(outcome) => {
            if let Some(acc) = outcome.test_accuracy {
                eprintln!("test accuracy: {:.2}%", acc * 100.0);
            }
            println!("{}", outcome.report.display());
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e}");
            if exp.run_dir().join("study.json").is_file() {
                eprintln!(
                    "what finished before is kept in {}",
                    exp.run_dir().display()
                );
            }
            ExitCode::from(e.exit_code() as u8)
        }
    }
}
