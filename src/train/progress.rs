//! Progress of a training stage: an indicatif bar on a terminal, a log line after the first step
//! and every tenth of the budget otherwise (batch jobs, CI), nothing with `--quiet`.

use std::io::IsTerminal;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

pub struct Progress {
    bar: ProgressBar,
    /// Stage name when logging plain lines instead of drawing a bar.
    plain: Option<String>,
    total: usize,
}

impl Progress {
    pub fn new(stage: &str, quiet: bool) -> Self {
        let hidden = Self {
            bar: ProgressBar::hidden(),
            plain: None,
            total: 0,
        };
        if quiet {
            return hidden;
        }
        if !std::io::stderr().is_terminal() {
            return Self {
                plain: Some(stage.to_string()),
                ..hidden
            };
        }
        let bar = ProgressBar::with_draw_target(Some(0), ProgressDrawTarget::stderr());
        let style = ProgressStyle::with_template(
            "{prefix:>9} [{bar:30}] {pos}/{len} steps, {elapsed} elapsed, ETA {eta} — {msg}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> ");
        bar.set_style(style);
        bar.set_prefix(stage.to_string());
        Self {
            bar,
            plain: None,
            total: 0,
        }
    }

    /// Until the first step ends the bar says what takes the time, and its clock keeps moving: on
    /// a GPU the first step compiles and autotunes every kernel (minutes with a cold autotune
    /// cache), on the CPU it is an ordinary step.
    pub fn start(&mut self, total: usize) {
        self.total = total;
        self.bar.set_length(total as u64);
        self.bar
            .set_message("first step: compiling kernels (on a GPU also autotuning them, once)");
        self.bar
            .enable_steady_tick(std::time::Duration::from_millis(500));
    }

    pub fn step(&self, step: usize, epoch: usize, loss: f64) {
        self.bar.set_position(step as u64);
        self.bar
            .set_message(format!("epoch {epoch} loss {loss:.4}"));
        if let Some(stage) = &self.plain {
            let every = (self.total / 10).max(1);
            // The first step too: its time is the compilation and autotuning on a GPU.
            if step == 1 || step.is_multiple_of(every) || step == self.total {
                eprintln!(
                    "{stage}: step {step}/{} (epoch {epoch}), loss {loss:.4}, {:.0} s",
                    self.total,
                    self.bar.elapsed().as_secs_f64()
                );
            }
        }
    }

    pub fn finish(&self) {
        self.bar.finish_and_clear();
    }
}
