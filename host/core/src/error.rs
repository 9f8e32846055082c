//! Errors of the training core.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum CoreError {
    #[error("{0}")]
    Candle(#[from] candle_core::Error),
    #[error(transparent)]
    Data(#[from] tuneforge_data::DataError),
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{}: {message}", path.display())]
    File { path: PathBuf, message: String },
    #[error("{file}: {field}: {message}")]
    Config { file: String, field: String, message: String },
    #[error("model source `{source_spec}`: {message}")]
    Source { source_spec: String, message: String },
    #[error("tensor `{name}`: {message}")]
    Param { name: String, message: String },
    #[error("checkpoint {}: {message}", path.display())]
    Checkpoint { path: PathBuf, message: String },
    /// A plugin failed; the message names the plugin, the function and the cause.
    #[error("{message}")]
    Plugin { message: String },
    #[error("device `{device}`: {message}")]
    Device { device: String, message: String },
    #[error("training diverged at step {step}: loss is {loss}")]
    Diverged { step: u64, loss: f32 },
}

impl CoreError {
    pub(crate) fn io(path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> Self {
        let path = path.into();
        move |source| Self::Io { path, source }
    }

    pub fn file(path: impl Into<PathBuf>, message: impl Into<String>) -> Self {
        Self::File { path: path.into(), message: message.into() }
    }
}
