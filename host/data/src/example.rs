//! One labelled text, as read from a file.

use serde::{Deserialize, Serialize};

/// A text with its label and where it came from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Example {
    pub text: String,
    pub label: String,
    /// 1-based line of the file the example was read from (0 when built in memory).
    #[serde(default)]
    pub line: u64,
}

impl Example {
    pub fn new(text: impl Into<String>, label: impl Into<String>) -> Self {
        Self { text: text.into(), label: label.into(), line: 0 }
    }
}
