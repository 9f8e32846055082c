//! Tokenization through the `tokenizers` crate, with tuneforge's own padding and truncation.
//!
//! Some published `tokenizer.json` files (all-MiniLM-L6-v2's among them) switch on fixed
//! padding to 128 and truncation. tuneforge switches the file's padding off, truncates to the
//! experiment's `max_len`, and pads each batch to its longest row instead (dynamic padding).

use std::path::Path;

use tokenizers::{AddedToken, PaddingParams, Tokenizer, TruncationParams};

use crate::DataError;

/// Token ids of one text, without padding.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Encoded {
    pub ids: Vec<u32>,
    pub type_ids: Vec<u32>,
}

impl Encoded {
    pub fn len(&self) -> usize {
        self.ids.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }
}

/// A tokenizer with padding off and truncation at `max_len`.
#[derive(Clone)]
pub struct TextEncoder {
    tokenizer: Tokenizer,
    max_len: usize,
    pad_id: u32,
}

impl std::fmt::Debug for TextEncoder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TextEncoder").field("max_len", &self.max_len).field("pad_id", &self.pad_id).finish()
    }
}

impl TextEncoder {
    /// Loads `tokenizer.json`; the pad id comes from the file's padding settings or its
    /// `[PAD]`/`<pad>` token, else 0.
    pub fn from_file(path: &Path, max_len: usize) -> Result<Self, DataError> {
        let tokenizer = Tokenizer::from_file(path)
            .map_err(|e| DataError::Tokenizer { path: path.to_owned(), message: e.to_string() })?;
        Self::new(tokenizer, max_len).map_err(|e| match e {
            DataError::Encode(message) => DataError::Tokenizer { path: path.to_owned(), message },
            other => other,
        })
    }

    pub fn new(mut tokenizer: Tokenizer, max_len: usize) -> Result<Self, DataError> {
        if max_len < 2 {
            return Err(DataError::Encode(format!("max_len must be at least 2, got {max_len}")));
        }
        let pad_id = tokenizer
            .get_padding()
            .map(|p: &PaddingParams| p.pad_id)
            .or_else(|| tokenizer.token_to_id("[PAD]"))
            .or_else(|| tokenizer.token_to_id("<pad>"))
            .unwrap_or(0);
        tokenizer.with_padding(None);
        tokenizer
            .with_truncation(Some(TruncationParams { max_length: max_len, ..Default::default() }))
            .map_err(|e| DataError::Encode(e.to_string()))?;
        Ok(Self { tokenizer, max_len, pad_id })
    }

    pub fn max_len(&self) -> usize {
        self.max_len
    }

    pub fn pad_id(&self) -> u32 {
        self.pad_id
    }

    pub fn vocab_size(&self) -> usize {
        self.tokenizer.get_vocab_size(true)
    }

    pub fn tokenizer(&self) -> &Tokenizer {
        &self.tokenizer
    }

    /// Adds domain terms as whole tokens (after the existing vocabulary, in order) and returns,
    /// for each, the ids it split into before: the rows to initialise its embedding from.
    /// A term the tokenizer already has as one token is an error.
    pub fn add_terms(&mut self, terms: &[String]) -> Result<Vec<Vec<u32>>, DataError> {
        let mut pieces = Vec::with_capacity(terms.len());
        for term in terms {
            let enc = self.tokenizer.encode(term.as_str(), false).map_err(|e| DataError::Encode(e.to_string()))?;
            let ids = enc.get_ids().to_vec();
            if ids.len() <= 1 && self.tokenizer.token_to_id(term).is_some() {
                return Err(DataError::Encode(format!("`{term}` is already a single token")));
            }
            pieces.push(ids);
        }
        let before = self.tokenizer.get_vocab_size(true);
        let added = self
            .tokenizer
            .add_tokens(terms.iter().map(|t| AddedToken::from(t.clone(), false)))
            .map_err(|e| DataError::Encode(e.to_string()))?;
        if added != terms.len() || self.tokenizer.get_vocab_size(true) != before + terms.len() {
            return Err(DataError::Encode(format!("added {added} of {} terms (duplicates?)", terms.len())));
        }
        Ok(pieces)
    }

    /// The id of a token, if the vocabulary has it.
    pub fn token_id(&self, token: &str) -> Option<u32> {
        self.tokenizer.token_to_id(token)
    }

    /// Encodes texts with special tokens, truncated to `max_len`, unpadded.
    pub fn encode<S: AsRef<str>>(&self, texts: &[S]) -> Result<Vec<Encoded>, DataError> {
        let inputs: Vec<&str> = texts.iter().map(AsRef::as_ref).collect();
        let encodings = self.tokenizer.encode_batch(inputs, true).map_err(|e| DataError::Encode(e.to_string()))?;
        Ok(encodings
            .into_iter()
            .map(|e| Encoded { ids: e.get_ids().to_vec(), type_ids: e.get_type_ids().to_vec() })
            .collect())
    }

    /// The tokenizer as `tokenizer.json` text, with tuneforge's padding and truncation.
    pub fn to_json(&self) -> Result<String, DataError> {
        self.tokenizer.to_string(false).map_err(|e| DataError::Encode(e.to_string()))
    }
}
