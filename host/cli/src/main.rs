//! The `tuneforge` binary: parses the command line and wires the host crates together.
//! It holds no training, data or model logic of its own.

mod commands;
mod progress;
mod recorder;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// Exit status when a gate fails (errors exit with 1, usage errors with 2).
const EXIT_GATE_FAILED: u8 = 3;

/// Fine-tune pretrained transformers into domain experts.
#[derive(Debug, Parser)]
#[command(name = "tuneforge", version, about, long_about = None, propagate_version = true)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Fine-tune a model as an experiment file says; writes a run directory.
    Train(commands::train::TrainArgs),
    /// A grid search: one run per combination of values for some keys of an experiment
    /// file, each recorded like `train`, then ranked by the metric that picks the best model.
    Sweep(commands::sweep::SweepArgs),
    /// Evaluate a trained model on a labelled file.
    Eval(commands::eval::EvalArgs),
    /// Classify texts with a trained model.
    Predict(commands::predict::PredictArgs),
    /// Export a LoRA model for Hugging Face PEFT, or with LoRA merged into the weights.
    Export(commands::export::ExportArgs),
    /// Generate text with a decoder language model (GGUF or Hugging Face), streamed.
    Generate(commands::generate::GenerateArgs),
    /// Chat with a decoder language model on the terminal.
    Chat(commands::generate::ChatArgs),
    /// Quantize a trained model's weights to int8 for faster, smaller serving.
    Quantize(commands::quantize::QuantizeArgs),
    /// Runs recorded in the experiment store: list, show, compare.
    #[command(subcommand)]
    Runs(commands::runs::RunsCommand),
    /// The model registry: register a run's model, promote, roll back, list, audit trail.
    #[command(subcommand)]
    Models(commands::models::ModelsCommand),
    /// Serve the REST API and Prometheus metrics over the experiment store.
    Serve(commands::serve::ServeArgs),
    /// A candidate from user feedback: retrain on the original data plus corrections,
    /// register it if its gates pass, and start an A/B test against production.
    Retrain(commands::retrain::RetrainArgs),
    /// A/B tests of a candidate version against production: start, status, stop.
    #[command(subcommand)]
    Ab(commands::ab::AbCommand),
    /// WebAssembly plugins: scaffold, build and install, check, list.
    #[command(subcommand)]
    Plugin(commands::plugin::PluginCommand),
    /// Print a shell completion script, e.g. `tuneforge completions bash >
    /// ~/.local/share/bash-completion/completions/tuneforge`.
    Completions {
        /// bash, zsh, fish, elvish or powershell.
        shell: clap_complete::Shell,
    },
}

fn main() -> ExitCode {
    tuneforge_kernels::tune_allocator();
    tuneforge_kernels::tune_threads();
    let filter = tracing_subscriber::EnvFilter::try_from_env("TUNEFORGE_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn,tuneforge_core=info"));
    tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_target(false).init();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Train(args) => commands::train::run(args),
        Command::Sweep(args) => commands::sweep::run(args),
        Command::Eval(args) => commands::eval::run(args),
        Command::Predict(args) => commands::predict::run(args),
        Command::Export(args) => commands::export::run(args),
        Command::Quantize(args) => commands::quantize::run(args),
        Command::Generate(args) => commands::generate::generate(args),
        Command::Chat(args) => commands::generate::chat(args),
        Command::Runs(cmd) => commands::runs::run(cmd),
        Command::Models(cmd) => commands::models::run(cmd),
        Command::Serve(args) => commands::serve::run(args),
        Command::Plugin(cmd) => commands::plugin::run(cmd),
        Command::Ab(cmd) => commands::ab::run(cmd),
        Command::Retrain(args) => commands::retrain::run(args),
        Command::Completions { shell } => {
            use clap::CommandFactory;
            clap_complete::generate(shell, &mut Cli::command(), "tuneforge", &mut std::io::stdout());
            Ok(commands::Outcome::Success)
        }
    };
    match result {
        Ok(commands::Outcome::Success) => ExitCode::SUCCESS,
        Ok(commands::Outcome::GateFailed) => ExitCode::from(EXIT_GATE_FAILED),
        Err(e) => {
            eprintln!("error: {}", describe(&e));
            ExitCode::FAILURE
        }
    }
}

/// The error and its causes, `: `-separated, leaving out a cause that the message already
/// quotes (our errors print their I/O or database cause and also expose it as `source`).
fn describe(e: &anyhow::Error) -> String {
    let mut message = e.to_string();
    for cause in e.chain().skip(1) {
        let cause = cause.to_string();
        if !message.contains(&cause) {
            message.push_str(": ");
            message.push_str(&cause);
        }
    }
    message
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    #[test]
    fn an_error_quoting_its_cause_prints_it_once() {
        let io = std::io::Error::new(std::io::ErrorKind::NotFound, "No such file or directory");
        let e = anyhow::Error::new(tuneforge_core::CoreError::Io { path: "data.csv".into(), source: io })
            .context("reading the data");
        assert_eq!(super::describe(&e), "reading the data: data.csv: No such file or directory");
    }

    /// clap checks the whole command tree (duplicate names, conflicts) only when a command is
    /// used; check every subcommand up front.
    #[test]
    fn the_command_line_is_well_formed() {
        super::Cli::command().debug_assert();
    }
}
