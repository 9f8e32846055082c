//! One module per subcommand.

pub mod ab;
pub mod eval;
pub mod export;
pub mod generate;
pub mod models;
pub mod plugin;
pub mod predict;
pub mod quantize;
pub mod retrain;
pub mod runs;
pub mod serve;
pub mod sweep;
pub mod train;

use tuneforge_core::GateResult;

/// Where the experiment store is.
#[derive(Debug, Clone, clap::Args)]
pub struct DbArgs {
    /// The experiment store: a SQLite file or URL (default: $TUNEFORGE_DB, else
    /// tuneforge.db in the user's data directory).
    #[arg(long, value_name = "PATH|URL")]
    db: Option<String>,
}

impl DbArgs {
    pub fn url(&self) -> String {
        self.db.clone().unwrap_or_else(|| tuneforge_store::default_db_path().display().to_string())
    }
}

/// How a training command reports and records its runs (`train`, `sweep`).
#[derive(Debug, Clone, clap::Args)]
pub struct RecordArgs {
    /// Print the result as JSON on stdout.
    #[arg(long)]
    pub json: bool,
    /// No progress output.
    #[arg(long, short)]
    pub quiet: bool,
    #[command(flatten)]
    pub db: DbArgs,
    /// Do not record the run(s) in the experiment store.
    #[arg(long, conflicts_with = "db")]
    pub no_db: bool,
}

impl RecordArgs {
    /// The store to record in, unless `--no-db`.
    pub fn store(&self) -> Option<String> {
        (!self.no_db).then(|| self.db.url())
    }
}

/// `--device cpu|cuda|cuda:N`: where a command's model computes.
#[derive(Debug, Clone, clap::Args)]
pub struct DeviceArgs {
    /// Where the model computes: cpu, cuda or cuda:N (CUDA needs a tuneforge built with
    /// `--features cuda` and an NVIDIA GPU).
    #[arg(long, value_name = "DEVICE", default_value = "cpu", value_parser = |s: &str| s.parse::<tuneforge_core::DeviceSpec>())]
    pub device: tuneforge_core::DeviceSpec,
}

impl DeviceArgs {
    /// Opens the device: an error that says what is missing, never a panic.
    pub fn open(&self) -> anyhow::Result<candle_core::Device> {
        Ok(self.device.open()?)
    }
}

/// How a command ended when it did not fail.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Success,
    GateFailed,
}

/// Prints gate results to stderr and tells whether all passed.
pub fn report_gates(gates: &[GateResult]) -> Outcome {
    for g in gates {
        eprintln!("{g}");
    }
    if gates.iter().all(|g| g.passed) {
        Outcome::Success
    } else {
        let failed: Vec<&str> = gates.iter().filter(|g| !g.passed).map(|g| g.name.as_str()).collect();
        eprintln!("error: {} gate(s) failed: {}", failed.len(), failed.join(", "));
        Outcome::GateFailed
    }
}
