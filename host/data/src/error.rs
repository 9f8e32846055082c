//! Errors of dataset reading and encoding: each names the file, line and field at fault.

use std::path::PathBuf;

/// One bad line in an input file.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}:{line}: field `{field}`: {message}", path.display())]
pub struct LineError {
    pub path: PathBuf,
    /// 1-based line number in the file.
    pub line: u64,
    pub field: String,
    pub message: String,
}

#[derive(Debug, thiserror::Error)]
pub enum DataError {
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Line(#[from] LineError),
    #[error("{}: no examples (after skipping {skipped} bad lines)", path.display())]
    Empty { path: PathBuf, skipped: usize },
    #[error("{}: cannot tell the format from the file name; set `format` to csv, jsonl or phrasebank", path.display())]
    UnknownFormat { path: PathBuf },
    #[error("tokenizer {}: {message}", path.display())]
    Tokenizer { path: PathBuf, message: String },
    #[error("tokenizer: {0}")]
    Encode(String),
    #[error("label `{label}` is not one of the model's {n_labels} labels")]
    UnknownLabel { label: String, n_labels: usize },
    #[error("invalid split: {0}")]
    Split(String),
}
