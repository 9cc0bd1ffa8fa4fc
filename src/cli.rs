//! Command line: `xrun FILE` (same as `xrun run FILE`), `xrun validate FILE`, `xrun plan FILE`,
//! `xrun submit FILE --slurm`, `xrun status FILE`, `xrun report FILE|DIR`, `xrun gc`. Errors are printed once, here, and mapped to exit codes: 0 success,
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
    /// Submit an experiment's trials to a cluster: shared stages as jobs, trials as job arrays.
    Submit(SubmitArgs),
    /// Each trial's state: done, running, queued, failed (with its job and log), not submitted.
    Status(FileArgs),
    /// Render the report again from stored results, without training. Given an experiment file,
    /// merge the study from its trial folders (partial, and marked so, while trials still run).
    Report {
        /// A run directory (e.g. reports/clue_tnews) or an experiment file.
        path: PathBuf,
        /// With an experiment file: override a key, as for `xrun run`.
        #[arg(long = "set", value_name = "KEY=VALUE")]
        sets: Vec<String>,
        /// With an experiment file: the backend, as for `xrun run`.
        #[arg(long, value_enum)]
        backend: Option<config::experiment::BackendChoice>,
        /// With an experiment file: the precision, as for `xrun run`.
        #[arg(long, value_enum)]
        precision: Option<config::experiment::Precision>,
    },
    /// Write a trial's model as a Hugging Face directory (config.json, model.safetensors, the
    /// tokenizer and a model card) that transformers loads.
    Export {
        /// A trial folder (reports/NAME/trials/ID) or a run directory with `--trial`.
        run_dir: PathBuf,
        /// The trial to export, when the run directory has several.
        #[arg(long)]
        trial: Option<String>,
        /// The format: `hf` (Hugging Face transformers).
        #[arg(long, value_parser = ["hf"], default_value = "hf")]
        format: String,
        /// The directory to write.
        #[arg(long)]
        out: PathBuf,
        /// Which model: the fine-tuned classifier (auto, when there is one), the pretraining LM
        /// head, or the backbone alone.
        #[arg(long, value_enum, default_value = "auto")]
        head: crate::hf::WhichHead,
    },
    /// Train named model shapes for a fixed number of steps and print one JSON line per shape:
    /// time to first step, step time, tokens/s with and without padding, peak memory.
    Bench(crate::bench::BenchArgs),
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
    /// Train on this backend: `--set experiment.backend=…` in short.
    #[arg(long, value_enum)]
    pub backend: Option<config::experiment::BackendChoice>,
    /// Train in this precision (f32, bf16-mixed, bf16, f16): `--set experiment.precision=…` in
    /// short.
    #[arg(long, value_enum)]
    pub precision: Option<config::experiment::Precision>,
    /// The GPU autotune effort: `--set experiment.autotune=…` in short.
    #[arg(long, value_enum)]
    pub autotune: Option<config::experiment::Autotune>,
}

impl FileArgs {
    /// The `--set` overrides, with `--backend`, `--precision` and `--autotune` among them (last,
    /// so they win).
    pub fn overrides(&self) -> Vec<String> {
        let mut sets = self.sets.clone();
        if let Some(b) = self.backend {
            sets.push(format!("experiment.backend=\"{}\"", b.name()));
        }
        if let Some(p) = self.precision {
            sets.push(format!("experiment.precision=\"{}\"", p.name()));
        }
        if let Some(a) = self.autotune {
            sets.push(format!("experiment.autotune=\"{}\"", a.name()));
        }
        sets
    }
}

#[derive(Args, Debug)]
pub struct RunArgs {
    #[command(flatten)]
    pub file: FileArgs,
    /// No progress bars or log lines; errors are still printed.
    #[arg(long, short)]
    pub quiet: bool,
    /// Run only this trial (an id from `xrun plan`), beside other processes running the rest.
    #[arg(long, conflicts_with = "shard")]
    pub trial: Option<String>,
    /// Run trials INDEX, INDEX+COUNT, … of the plan (from 0), beside the other shards.
    #[arg(long, value_name = "INDEX/COUNT")]
    pub shard: Option<String>,
    /// Stop each trial after this shared stage (a cluster stage job).
    #[arg(long, value_enum)]
    pub until: Option<exec::Until>,
    /// Run up to N trials at once, each in its own process (logs in `<run dir>/logs/`): the
    /// sweep's job graph run on this machine, shared stages first. Trials that already have a
    /// result are not run again. 1 (the default) runs every trial in this process.
    #[arg(long, short = 'j', value_name = "N", default_value_t = 1,
          value_parser = clap::value_parser!(u32).range(1..),
          conflicts_with_all = ["trial", "shard", "until"])]
    pub jobs: u32,
}

#[derive(Args, Debug)]
pub struct SubmitArgs {
    #[command(flatten)]
    pub file: FileArgs,
    /// Submit to Slurm (the one scheduler xrun submits to; see `--shard` for others).
    #[arg(long, required = true)]
    pub slurm: bool,
    /// Print the job graph and the sbatch scripts; submit nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Submit again only the trials whose jobs ended without a result.
    #[arg(long)]
    pub retry_failed: bool,
    /// sbatch --partition (overrides cluster.slurm.partition).
    #[arg(long)]
    pub partition: Option<String>,
    /// sbatch --gres, e.g. gpu:1.
    #[arg(long)]
    pub gres: Option<String>,
    /// sbatch --time, e.g. 02:00:00.
    #[arg(long)]
    pub time: Option<String>,
    /// sbatch --cpus-per-task.
    #[arg(long)]
    pub cpus_per_task: Option<u32>,
    /// sbatch --mem, e.g. 16G.
    #[arg(long)]
    pub mem: Option<String>,
    /// sbatch --account.
    #[arg(long)]
    pub account: Option<String>,
    /// sbatch --qos.
    #[arg(long)]
    pub qos: Option<String>,
    /// Any other sbatch option, e.g. `--sbatch=--constraint=a100` (repeatable).
    #[arg(long = "sbatch", value_name = "OPTION", allow_hyphen_values = true)]
    pub sbatch: Vec<String>,
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
        "export",
        "bench",
        "submit",
        "status",
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
        Command::Export {
            run_dir,
            trial,
            format: _,
            out,
            head,
        } => {
            let args = crate::hf::ExportArgs {
                run_dir,
                trial,
                out,
                head,
            };
            match crate::hf::export(&args) {
                Ok(line) => {
                    println!("{line}");
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("error: {e}");
                    ExitCode::from(EXIT_INVALID_INPUT)
                }
            }
        }
        Command::Bench(args) => match crate::bench::run(&args) {
            Ok(figures) => {
                for f in figures {
                    println!("{}", serde_json::to_string(&f).unwrap_or_default());
                }
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("error: {e}");
                ExitCode::from(EXIT_INVALID_INPUT)
            }
        },
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
        Command::Report {
            path,
            sets,
            backend,
            precision,
        } if path.is_file() => merged_report(&FileArgs {
            file: path,
            sets,
            backend,
            precision,
            autotune: None,
        }),
        Command::Report { path, .. } => match crate::report::rerender(&path) {
            Ok(path) => {
                println!("{}", path.display());
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("error: {e}");
                ExitCode::from(EXIT_INVALID_INPUT)
            }
        },
        Command::Submit(args) => submit(&args),
        Command::Status(args) => status(&args),
    }
}

/// Prints a command's text, or its error with the exit code it maps to.
fn finish(result: Result<String, exec::RunError>) -> ExitCode {
    match result {
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

fn merged_report(args: &FileArgs) -> ExitCode {
    let (exp, trials) = match load(args) {
        Ok(x) => x,
        Err(code) => return code,
    };
    finish(exec::keys(&trials).and_then(|keys| {
        let m = exec::merge_study(&exp, &trials, &keys)?;
        if m.finished() < m.statuses.len() {
            eprintln!(
                "partial report: {} of {} trials have finished",
                m.finished(),
                m.statuses.len()
            );
        }
        Ok(format!("{}\n", m.report.display()))
    }))
}

fn status(args: &FileArgs) -> ExitCode {
    let (exp, trials) = match load(args) {
        Ok(x) => x,
        Err(code) => return code,
    };
    finish(
        exec::keys(&trials)
            .and_then(|keys| crate::cluster::slurm::status_text(&exp, &trials, &keys)),
    )
}

fn submit(args: &SubmitArgs) -> ExitCode {
    let (exp, trials) = match load(&args.file) {
        Ok(x) => x,
        Err(code) => return code,
    };
    let mut settings = exp.raw.cluster.slurm.clone();
    let cli = [
        (&mut settings.partition, &args.partition),
        (&mut settings.gres, &args.gres),
        (&mut settings.time, &args.time),
        (&mut settings.mem, &args.mem),
        (&mut settings.account, &args.account),
        (&mut settings.qos, &args.qos),
    ];
    for (slot, value) in cli {
        if value.is_some() {
            slot.clone_from(value);
        }
    }
    if args.cpus_per_task.is_some() {
        settings.cpus_per_task = args.cpus_per_task;
    }
    settings.options.extend(args.sbatch.iter().cloned());
    let sets = args.file.overrides();
    let opts = crate::cluster::slurm::SubmitOptions {
        file: &args.file.file,
        sets: &sets,
        settings,
        dry_run: args.dry_run,
        retry_failed: args.retry_failed,
    };
    finish(
        exec::keys(&trials)
            .and_then(|keys| crate::cluster::slurm::submit(&exp, &trials, &keys, &opts)),
    )
}

fn load(args: &FileArgs) -> Result<(config::Experiment, Vec<Trial>), ExitCode> {
    let fail = |e: config::ConfigErrors| {
        eprintln!("{e}");
        ExitCode::from(EXIT_INVALID_INPUT)
    };
    let exp = config::load(&args.file, &args.overrides()).map_err(fail)?;
    let trials = crate::plan::expand(&exp).map_err(fail)?;
    Ok((exp, trials))
}

fn plan(args: &FileArgs, verbose: bool) -> ExitCode {
    let (exp, trials) = match load(args) {
        Ok(x) => x,
        Err(code) => return code,
    };
    finish(exec::plan_text(&exp, &trials, verbose))
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
    let select = match (&args.trial, &args.shard) {
        (Some(id), _) => exec::Select::Trial(id.clone()),
        (None, Some(s)) => match exec::Select::shard(s) {
            Ok(s) => s,
            Err(e) => {
                eprintln!("error: {e}");
                return ExitCode::from(EXIT_INVALID_INPUT);
            }
        },
        (None, None) => exec::Select::All,
    };
    let opts = Options {
        quiet: args.quiet,
        select,
        until: args.until,
    };
    let result = if args.jobs > 1 {
        let sets = args.file.overrides();
        let local = crate::cluster::local::LocalOptions {
            file: &args.file.file,
            sets: &sets,
            jobs: args.jobs as usize,
            quiet: args.quiet,
        };
        exec::keys(&trials)
            .and_then(|keys| crate::cluster::local::run(&exp, &trials, &keys, &local))
    } else {
        exec::run(&exp, &trials, &opts)
    };
    match result {
        Ok(outcome) => {
            if let Some((name, value)) = outcome.test_score {
                eprintln!("test {name}: {:.2}%", value * 100.0);
            }
            // A stage job (`--until`) writes no report.
            if args.until.is_none() {
                println!("{}", outcome.report.display());
            }
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
