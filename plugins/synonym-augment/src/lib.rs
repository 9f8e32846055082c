//! `synonym-augment`: new training examples by replacing words with synonyms from a MyThes
//! thesaurus (the asset `thesaurus`, e.g. Debian's `/usr/share/mythes/th_en_US_v2.dat`).
//!
//! Config: `probability` (0.15) that an eligible word is replaced; `max_replacements` (2)
//! per copy; `copies` (1) new examples per example; `min_word_len` (4). Only single-word
//! synonyms without a qualifier such as "(generic term)" are used; stop words and words
//! with digits are never replaced. The same example and seed always give the same result.

use std::collections::HashMap;

use tuneforge_plugin_sdk::{Augment, Config, Example, PluginError, asset_text, config, export_augment, log};

/// Single-word entries of a MyThes file -> their single-word synonyms.
pub fn parse_mythes(text: &str) -> HashMap<String, Vec<String>> {
    let mut out: HashMap<String, Vec<String>> = HashMap::new();
    let mut lines = text.lines();
    lines.next(); // the encoding line
    let mut current: Option<String> = None;
    let mut remaining = 0usize;
    for line in lines {
        if remaining == 0 {
            let mut parts = line.split('|');
            let word = parts.next().unwrap_or("");
            remaining = parts.next().and_then(|n| n.trim().parse().ok()).unwrap_or(0);
            current = (!word.contains(' ') && word.chars().all(char::is_alphabetic)).then(|| word.to_lowercase());
            continue;
        }
        remaining -= 1;
        let Some(word) = &current else { continue };
        for syn in line.split('|').skip(1) {
            if syn.contains('(') || syn.contains(' ') || !syn.chars().all(char::is_alphabetic) {
                continue;
            }
            let syn = syn.to_lowercase();
            if syn != *word {
                let list = out.entry(word.clone()).or_default();
                if !list.contains(&syn) {
                    list.push(syn);
                }
            }
        }
    }
    out
}

const STOP: &[&str] = &[
    "that", "this", "with", "have", "from", "they", "their", "there", "been", "were", "which", "when", "will", "would",
    "about", "into", "than", "them", "then", "these", "those", "also", "very", "some", "what", "your", "over",
];

/// SplitMix64: a tiny deterministic generator.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// The augmenter: a thesaurus and its settings.
pub struct SynonymAugment {
    pub thesaurus: HashMap<String, Vec<String>>,
    probability: f64,
    max_replacements: usize,
    copies: usize,
    min_word_len: usize,
}

impl SynonymAugment {
    pub fn with(thesaurus: HashMap<String, Vec<String>>, c: &Config) -> Result<Self, PluginError> {
        c.reject_unknown(&["probability", "max_replacements", "copies", "min_word_len"])?;
        let probability = c.f64("probability", 0.15)?;
        if !(0.0..=1.0).contains(&probability) {
            return Err(PluginError::bad_config(format!("`probability` must be in [0, 1], got {probability}")));
        }
        let copies = c.usize("copies", 1)?;
        if copies > 16 {
            return Err(PluginError::bad_config("`copies` is at most 16"));
        }
        Ok(Self {
            thesaurus,
            probability,
            max_replacements: c.usize("max_replacements", 2)?,
            copies,
            min_word_len: c.usize("min_word_len", 4)?,
        })
    }

    /// One augmented text, or `None` when nothing was replaced.
    pub fn rewrite(&self, text: &str, seed: u64) -> Option<String> {
        let mut rng = Rng(seed);
        let mut out = String::with_capacity(text.len() + 16);
        let mut replaced = 0;
        let mut word = String::new();
        let flush = |word: &mut String, out: &mut String, rng: &mut Rng, replaced: &mut usize| {
            if word.is_empty() {
                return;
            }
            let lower = word.to_lowercase();
            let eligible = *replaced < self.max_replacements
                && word.chars().count() >= self.min_word_len
                && !STOP.contains(&lower.as_str());
            let choice =
                eligible.then(|| self.thesaurus.get(&lower)).flatten().filter(|_| rng.unit() < self.probability);
            match choice {
                Some(syns) if !syns.is_empty() => {
                    let syn = &syns[(rng.next() % syns.len() as u64) as usize];
                    if word.chars().next().is_some_and(char::is_uppercase) {
                        let mut cs = syn.chars();
                        if let Some(first) = cs.next() {
                            out.extend(first.to_uppercase());
                            out.push_str(cs.as_str());
                        }
                    } else {
                        out.push_str(syn);
                    }
                    *replaced += 1;
                }
                _ => out.push_str(word),
            }
            word.clear();
        };
        for ch in text.chars() {
            if ch.is_alphabetic() {
                word.push(ch);
            } else {
                flush(&mut word, &mut out, &mut rng, &mut replaced);
                out.push(ch);
            }
        }
        flush(&mut word, &mut out, &mut rng, &mut replaced);
        (replaced > 0).then_some(out)
    }
}

impl Augment for SynonymAugment {
    fn new() -> Result<Self, PluginError> {
        let thesaurus = parse_mythes(&asset_text("thesaurus")?);
        if thesaurus.is_empty() {
            return Err(PluginError::new("bad-asset", "the thesaurus has no single-word entries"));
        }
        log::info(&format!("{} words with synonyms", thesaurus.len()));
        Self::with(thesaurus, &config())
    }

    fn augment(&mut self, example: &Example, seed: u64) -> Result<Vec<Example>, PluginError> {
        let mut out = Vec::new();
        for copy in 0..self.copies as u64 {
            let s = seed ^ copy.wrapping_mul(0xD6E8_FEB8_6659_FD93);
            if let Some(text) = self.rewrite(&example.text, s) {
                out.push(Example { text, label: example.label.clone() });
            }
        }
        Ok(out)
    }
}

export_augment!(SynonymAugment);

#[cfg(test)]
mod tests {
    use super::*;

    const DAT: &str = "UTF-8\nfever|1\n(noun)|febrility|feverishness|pyrexia|symptom (generic term)\n\
        severe|2\n(adj)|terrible|wicked\n(adj)|austere|hard line\nice cream|1\n(noun)|frozen dessert\n";

    fn augmenter(pairs: &[(&str, &str)]) -> SynonymAugment {
        SynonymAugment::with(parse_mythes(DAT), &Config::from_pairs(pairs.iter().copied())).expect("config")
    }

    #[test]
    fn the_thesaurus_keeps_single_unqualified_words() {
        let t = parse_mythes(DAT);
        assert_eq!(t["fever"], ["febrility", "feverishness", "pyrexia"]);
        assert_eq!(t["severe"], ["terrible", "wicked", "austere"]);
        assert!(!t.contains_key("ice cream"));
    }

    #[test]
    fn replacement_is_deterministic_per_seed_and_keeps_the_rest() {
        let a = augmenter(&[("probability", "1.0")]);
        let text = "Severe fever, since Monday.";
        let x = a.rewrite(text, 7).expect("replaced");
        assert_eq!(a.rewrite(text, 7).as_deref(), Some(x.as_str()));
        assert!(x.ends_with(", since Monday."), "{x}");
        assert!(["Terrible", "Wicked", "Austere"].iter().any(|w| x.starts_with(w)), "{x}");
        let outs: std::collections::BTreeSet<String> = (0..20).filter_map(|s| a.rewrite(text, s)).collect();
        assert!(outs.len() > 1, "seeds vary the result");
    }

    #[test]
    fn probability_zero_and_max_replacements_hold() {
        assert_eq!(augmenter(&[("probability", "0")]).rewrite("severe fever", 1), None);
        let a = augmenter(&[("probability", "1"), ("max_replacements", "1")]);
        let out = a.rewrite("severe fever", 3).expect("one");
        assert!(out.ends_with(" fever"), "{out}");
        assert!(SynonymAugment::with(parse_mythes(DAT), &Config::from_pairs([("probability", "2")])).is_err());
    }
}
