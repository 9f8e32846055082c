//! Content hash of a dataset: the same examples in the same order give the same hash,
//! whatever file format they were read from.

use sha2::{Digest, Sha256};

use crate::Example;

/// Hex SHA-256 over `label \x1f text \x1e` for every example, in order.
pub fn dataset_hash(examples: &[Example]) -> String {
    let mut hasher = Sha256::new();
    for ex in examples {
        hasher.update(ex.label.as_bytes());
        hasher.update([0x1f]);
        hasher.update(ex.text.as_bytes());
        hasher.update([0x1e]);
    }
    hex::encode(hasher.finalize())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hash_depends_on_content_and_order_not_line_numbers() {
        let a = Example::new("fever and cough", "flu");
        let mut b = Example::new("itchy rash", "acne");
        let h1 = dataset_hash(&[a.clone(), b.clone()]);
        b.line = 17;
        assert_eq!(h1, dataset_hash(&[a.clone(), b.clone()]));
        assert_ne!(h1, dataset_hash(&[b.clone(), a.clone()]));
        // The separator keeps "ab"+"c" apart from "a"+"bc".
        assert_ne!(dataset_hash(&[Example::new("c", "ab")]), dataset_hash(&[Example::new("bc", "a")]));
    }
}
