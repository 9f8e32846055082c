//! Progress display for training: an indicatif bar on a terminal, periodic lines otherwise.

use indicatif::{ProgressBar, ProgressStyle};
use tuneforge_core::TrainEvent;

pub struct TrainProgress {
    bar: Option<ProgressBar>,
    quiet: bool,
    last_line_step: u64,
}

impl TrainProgress {
    pub fn new(quiet: bool) -> Self {
        Self { bar: None, quiet, last_line_step: 0 }
    }

    fn say(&self, line: String) {
        if self.quiet {
            return;
        }
        match &self.bar {
            Some(bar) if !bar.is_hidden() => bar.println(line),
            _ => eprintln!("{line}"),
        }
    }

    pub fn on_event(&mut self, event: TrainEvent<'_>) {
        match event {
            TrainEvent::Started {
                run,
                start_step,
                total_steps,
                n_train,
                n_validation,
                n_trainable,
                n_params,
                plugins,
            } => {
                self.say(format!("run {}", run.root().display()));
                self.say(format!(
                    "{n_train} training and {n_validation} validation examples; {n_trainable} of {n_params} parameters train ({:.1}%)",
                    100.0 * n_trainable as f64 / n_params.max(1) as f64
                ));
                if start_step > 0 {
                    self.say(format!("resuming at step {start_step} of {total_steps}"));
                }
                for p in plugins {
                    self.say(format!(
                        "plugin {} {} ({}, API {}) sha256 {}",
                        p.name,
                        p.version,
                        p.kind,
                        p.api_version,
                        &p.sha256[..12.min(p.sha256.len())]
                    ));
                }
                if !self.quiet {
                    let bar = ProgressBar::new(total_steps);
                    bar.set_style(
                        ProgressStyle::with_template(
                            "{bar:30.cyan/blue} {pos}/{len} steps [{elapsed_precise}<{eta_precise}] {msg}",
                        )
                        .unwrap_or_else(|_| ProgressStyle::default_bar()),
                    );
                    bar.set_position(start_step);
                    self.bar = Some(bar);
                }
            }
            TrainEvent::Step { step, total_steps, loss, lr, tokens_per_s } => {
                if let Some(bar) = &self.bar {
                    bar.set_position(step);
                    bar.set_message(format!("loss {loss:.4} lr {lr:.2e} {tokens_per_s:.0} tok/s"));
                    // Without a terminal the bar is hidden: log about twenty lines per run.
                    if bar.is_hidden()
                        && !self.quiet
                        && (step - self.last_line_step >= total_steps.div_ceil(20) || step == total_steps)
                    {
                        self.last_line_step = step;
                        eprintln!("step {step}/{total_steps} loss {loss:.4} lr {lr:.2e} {tokens_per_s:.0} tok/s");
                    }
                }
            }
            TrainEvent::Evaluated { step, report, improved } => {
                let mark = if improved { " (best so far, saved)" } else { "" };
                self.say(format!(
                    "eval at step {step}: accuracy {:.4} macro-F1 {:.4} loss {:.4}{mark}",
                    report.accuracy, report.macro_f1, report.loss
                ));
            }
            TrainEvent::LmEvaluated { step, loss, perplexity, improved } => {
                let mark = if improved { " (best so far, saved)" } else { "" };
                self.say(format!("eval at step {step}: validation loss {loss:.4}, perplexity {perplexity:.2}{mark}"));
            }
            TrainEvent::Checkpointed { .. } => {}
        }
    }

    pub fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
    }
}
