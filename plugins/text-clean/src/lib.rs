//! `text-clean`: the seed's cleaning, configurable.
//!
//! Config: `normalize` = `nfkc` (default), `nfc` or `none`; `collapse_whitespace` (true):
//! runs of whitespace become one space and the ends are trimmed; `remove_punctuation`
//! (false): punctuation becomes a space; `lowercase` (false); `strip_control` (true):
//! control characters are dropped.

use tuneforge_plugin_sdk::{Cleaner, Config, PluginError, config, export_cleaner};
use unicode_normalization::UnicodeNormalization;

#[derive(Debug, Clone, Copy, PartialEq)]
enum Form {
    Nfkc,
    Nfc,
    None,
}

/// The cleaner's settings.
#[derive(Debug, Clone)]
pub struct TextClean {
    form: Form,
    collapse_whitespace: bool,
    remove_punctuation: bool,
    lowercase: bool,
    strip_control: bool,
}

impl TextClean {
    pub fn from_config(c: &Config) -> Result<Self, PluginError> {
        c.reject_unknown(&["normalize", "collapse_whitespace", "remove_punctuation", "lowercase", "strip_control"])?;
        let form = match c.string("normalize", "nfkc").as_str() {
            "nfkc" => Form::Nfkc,
            "nfc" => Form::Nfc,
            "none" => Form::None,
            other => return Err(PluginError::bad_config(format!("`normalize` is nfkc, nfc or none, got `{other}`"))),
        };
        Ok(Self {
            form,
            collapse_whitespace: c.bool("collapse_whitespace", true)?,
            remove_punctuation: c.bool("remove_punctuation", false)?,
            lowercase: c.bool("lowercase", false)?,
            strip_control: c.bool("strip_control", true)?,
        })
    }

    pub fn apply(&self, text: &str) -> String {
        let normalized: String = match self.form {
            Form::Nfkc => text.nfkc().collect(),
            Form::Nfc => text.nfc().collect(),
            Form::None => text.to_string(),
        };
        let mut out = String::with_capacity(normalized.len());
        for ch in normalized.chars() {
            if self.strip_control && ch.is_control() && !ch.is_whitespace() {
                continue;
            }
            if self.remove_punctuation && (ch.is_ascii_punctuation() || is_unicode_punctuation(ch)) {
                out.push(' ');
                continue;
            }
            if self.lowercase {
                out.extend(ch.to_lowercase());
            } else {
                out.push(ch);
            }
        }
        if self.collapse_whitespace { out.split_whitespace().collect::<Vec<_>>().join(" ") } else { out }
    }
}

fn is_unicode_punctuation(ch: char) -> bool {
    matches!(ch, '\u{2010}'..='\u{2027}' | '\u{2030}'..='\u{205E}' | '\u{00A1}' | '\u{00BF}' | '\u{00AB}' | '\u{00BB}')
}

impl Cleaner for TextClean {
    fn new() -> Result<Self, PluginError> {
        Self::from_config(&config())
    }

    fn clean(&mut self, text: &str) -> Result<String, PluginError> {
        Ok(self.apply(text))
    }
}

export_cleaner!(TextClean);

#[cfg(test)]
mod tests {
    use super::*;

    fn cleaner(pairs: &[(&str, &str)]) -> TextClean {
        TextClean::from_config(&Config::from_pairs(pairs.iter().copied())).expect("config")
    }

    #[test]
    fn defaults_normalise_and_collapse_whitespace_only() {
        let c = cleaner(&[]);
        assert_eq!(
            c.apply("  Operating\u{00A0}profit\t rose \u{FB01}ve\n percent. "),
            "Operating profit rose five percent."
        );
        assert_eq!(c.apply("bell\u{0007}y"), "belly");
    }

    #[test]
    fn punctuation_and_case_are_options() {
        let c = cleaner(&[("remove_punctuation", "true"), ("lowercase", "true")]);
        assert_eq!(c.apply("Sales fell -- \u{201C}sharply\u{201D}, EUR 5.2m!"), "sales fell sharply eur 5 2m");
    }

    #[test]
    fn bad_settings_are_named() {
        let err = TextClean::from_config(&Config::from_pairs([("normalize", "nfd")])).expect_err("bad form");
        assert!(err.message.contains("normalize"));
        let err = TextClean::from_config(&Config::from_pairs([("lower_case", "true")])).expect_err("typo");
        assert!(err.message.contains("lower_case"));
    }
}
