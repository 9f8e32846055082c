//! The label vocabulary: label names in a fixed (sorted) order, mapped to class ids.

use std::collections::BTreeSet;

use serde::{Deserialize, Serialize};

use crate::{DataError, Example};

/// Label names sorted lexicographically; the class id is the index.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LabelVocab {
    labels: Vec<String>,
}

impl LabelVocab {
    /// The sorted, de-duplicated labels of `examples`.
    pub fn from_examples(examples: &[Example]) -> Self {
        let set: BTreeSet<&str> = examples.iter().map(|e| e.label.as_str()).collect();
        Self { labels: set.into_iter().map(str::to_owned).collect() }
    }

    pub fn from_labels(labels: Vec<String>) -> Self {
        Self { labels }
    }

    pub fn len(&self) -> usize {
        self.labels.len()
    }

    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }

    pub fn labels(&self) -> &[String] {
        &self.labels
    }

    pub fn name(&self, id: usize) -> Option<&str> {
        self.labels.get(id).map(String::as_str)
    }

    pub fn id(&self, label: &str) -> Option<usize> {
        self.labels.iter().position(|l| l == label)
    }

    /// The class id of `label`, or an error naming it.
    pub fn require_id(&self, label: &str) -> Result<usize, DataError> {
        self.id(label).ok_or_else(|| DataError::UnknownLabel { label: label.to_owned(), n_labels: self.labels.len() })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_are_sorted_and_unique() {
        let ex = vec![Example::new("a", "b"), Example::new("c", "a"), Example::new("d", "b")];
        let vocab = LabelVocab::from_examples(&ex);
        assert_eq!(vocab.labels(), ["a", "b"]);
        assert_eq!(vocab.id("b"), Some(1));
        assert!(vocab.require_id("zzz").is_err());
    }
}
