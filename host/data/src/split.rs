//! Stratified train/validation split: every label keeps its share on both sides.

use std::collections::BTreeMap;

use rand::{SeedableRng, rngs::StdRng, seq::SliceRandom};

use crate::{DataError, Example};

/// Splits `examples` so that about `fraction` of each label's examples go to validation.
///
/// Deterministic for a seed. A label with at least two examples gets at least one on each side;
/// a label with one example stays in training. Both halves keep the input order.
pub fn stratified_split(
    examples: Vec<Example>,
    fraction: f64,
    seed: u64,
) -> Result<(Vec<Example>, Vec<Example>), DataError> {
    if !(0.0..1.0).contains(&fraction) || fraction.is_nan() {
        return Err(DataError::Split(format!("validation fraction must be in [0, 1), got {fraction}")));
    }
    let mut by_label: BTreeMap<&str, Vec<usize>> = BTreeMap::new();
    for (i, ex) in examples.iter().enumerate() {
        by_label.entry(ex.label.as_str()).or_default().push(i);
    }
    let mut rng = StdRng::seed_from_u64(seed);
    let mut in_validation = vec![false; examples.len()];
    for indices in by_label.values_mut() {
        let n = indices.len();
        let mut take = (n as f64 * fraction).round() as usize;
        if fraction > 0.0 && n >= 2 {
            take = take.clamp(1, n - 1);
        } else if n < 2 {
            take = 0;
        }
        indices.shuffle(&mut rng);
        for &i in &indices[..take] {
            in_validation[i] = true;
        }
    }
    let (mut train, mut validation) = (Vec::new(), Vec::new());
    for (ex, val) in examples.into_iter().zip(in_validation) {
        if val { validation.push(ex) } else { train.push(ex) }
    }
    Ok((train, validation))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data() -> Vec<Example> {
        let mut v = Vec::new();
        for i in 0..50 {
            v.push(Example::new(format!("a{i}"), "a"));
        }
        for i in 0..10 {
            v.push(Example::new(format!("b{i}"), "b"));
        }
        v.push(Example::new("c0", "c"));
        v
    }

    #[test]
    fn split_is_stratified_and_deterministic() {
        let (train, val) = stratified_split(data(), 0.2, 7).expect("split");
        let count = |v: &[Example], l: &str| v.iter().filter(|e| e.label == l).count();
        assert_eq!((count(&val, "a"), count(&val, "b"), count(&val, "c")), (10, 2, 0));
        assert_eq!(train.len() + val.len(), 61);
        let (_, val2) = stratified_split(data(), 0.2, 7).expect("split");
        assert_eq!(val, val2);
        let (_, val3) = stratified_split(data(), 0.2, 8).expect("split");
        assert_ne!(val, val3);
    }

    #[test]
    fn bad_fraction_is_an_error() {
        assert!(stratified_split(data(), 1.0, 0).is_err());
        assert!(stratified_split(data(), -0.1, 0).is_err());
    }
}
