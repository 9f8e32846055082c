//! Datasets for tuneforge: reading labelled text from CSV, JSONL and the `sentence@label`
//! format of Financial PhraseBank, validating every line, label vocabularies, stratified
//! splits, tokenization with dynamic padding, length-grouped batches and content hashes.
//!
//! This crate knows files and token ids. It must not know tensors, models or SQL: the
//! training core turns [`EncodedBatch`]es into tensors.

mod batch;
mod error;
mod example;
mod hash;
mod labels;
mod read;
mod split;
mod tokenize;

pub use batch::{BatchPlan, BatchPlanConfig, EncodedBatch};
pub use error::{DataError, LineError};
pub use example::Example;
pub use hash::dataset_hash;
pub use labels::LabelVocab;
pub use read::{DataFormat, OnError, ReadOptions, ReadReport, TextEncoding, read_examples};
pub use split::stratified_split;
pub use tokenize::{Encoded, TextEncoder};
