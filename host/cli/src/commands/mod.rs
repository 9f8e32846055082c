//! One module per subcommand.

pub mod eval;
pub mod export;
pub mod predict;
pub mod train;

use tuneforge_core::GateResult;

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
