//! `finance-features`: numeric features of a financial sentence, for fusion with the text
//! embedding (`[model] fusion = "concat"`).
//!
//! From the record's `text` it reads the numbers and the words around them: percentages and
//! whether the sentence says they went up or down, "from X to Y" changes, the largest amount
//! (in millions when the text says `mn`/`million`, thousands for `k`/`thousand`), direction
//! words (rose, increased, grew / fell, decreased, declined, ...), and profit versus loss
//! words. Features are plain numbers; the host standardises them with training statistics.

use tuneforge_plugin_sdk::{Features, PluginError, export_features};

pub const NAMES: [&str; 12] = [
    "percent_mentions",
    "signed_percent",
    "up_words",
    "down_words",
    "direction",
    "profit_words",
    "loss_words",
    "from_to_sign",
    "from_to_ratio_log",
    "amount_log10",
    "numbers",
    "negations",
];

const UP: &[&str] = &[
    "rose",
    "rise",
    "rises",
    "risen",
    "rising",
    "increase",
    "increased",
    "increases",
    "increasing",
    "grew",
    "grow",
    "grows",
    "growth",
    "up",
    "higher",
    "gain",
    "gained",
    "gains",
    "improved",
    "improve",
    "improvement",
    "jumped",
    "surged",
    "climbed",
    "doubled",
    "record",
    "strong",
    "stronger",
    "boost",
    "boosted",
    "expand",
    "expanded",
    "up",
];
const DOWN: &[&str] = &[
    "fell",
    "fall",
    "falls",
    "fallen",
    "falling",
    "decrease",
    "decreased",
    "decreases",
    "declined",
    "decline",
    "declines",
    "down",
    "lower",
    "drop",
    "dropped",
    "drops",
    "dropping",
    "weak",
    "weaker",
    "cut",
    "cuts",
    "reduced",
    "reduce",
    "slumped",
    "plunged",
    "shrank",
    "contracted",
    "worse",
    "deteriorated",
    "lost",
    "layoffs",
    "down",
];
const PROFIT: &[&str] = &["profit", "profits", "profitable", "earnings", "income", "surplus", "dividend"];
const LOSS: &[&str] = &["loss", "losses", "deficit", "impairment", "writedown", "bankruptcy", "negative"];
const NEGATION: &[&str] = &["not", "no", "without", "never", "n't"];

#[derive(Debug, Clone, PartialEq)]
enum Token {
    Word(String),
    Number(f64),
    Percent,
}

fn tokens(text: &str) -> Vec<Token> {
    let mut out = Vec::new();
    let chars: Vec<char> = text.chars().collect();
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        if c.is_ascii_digit() {
            let start = i;
            while i < chars.len()
                && (chars[i].is_ascii_digit()
                    || ((chars[i] == '.' || chars[i] == ',') && i + 1 < chars.len() && chars[i + 1].is_ascii_digit()))
            {
                i += 1;
            }
            let raw: String = chars[start..i].iter().collect();
            // "1,234" is a thousands separator; "1,5" a decimal comma (common in the corpus).
            let normalized = if raw.matches(',').count() == 1 && raw.split(',').nth(1).is_some_and(|d| d.len() != 3) {
                raw.replace(',', ".")
            } else {
                raw.replace(',', "")
            };
            if let Ok(v) = normalized.parse::<f64>() {
                out.push(Token::Number(v));
            }
            continue;
        }
        if c == '%' {
            out.push(Token::Percent);
        } else if c.is_alphabetic() || c == '\'' {
            let start = i;
            while i < chars.len() && (chars[i].is_alphabetic() || chars[i] == '\'') {
                i += 1;
            }
            let w: String = chars[start..i].iter().collect::<String>().to_lowercase();
            if w == "percent" || w == "pct" {
                out.push(Token::Percent);
            } else {
                out.push(Token::Word(w));
            }
            continue;
        }
        i += 1;
    }
    out
}

fn is_word(t: Option<&Token>, set: &[&str]) -> bool {
    matches!(t, Some(Token::Word(w)) if set.contains(&w.as_str()))
}

/// The features of a text, in the order of [`NAMES`].
pub fn features_of(text: &str) -> Vec<f32> {
    let t = tokens(text);
    let count = |set: &[&str]| t.iter().filter(|x| is_word(Some(x), set)).count() as f32;
    let (up, down) = (count(UP), count(DOWN));
    let mut percents = Vec::new();
    let mut amounts = Vec::new();
    let mut from: Option<f64> = None;
    let mut to: Option<f64> = None;
    let mut numbers = 0.0f32;
    for (i, tok) in t.iter().enumerate() {
        let Token::Number(v) = tok else { continue };
        numbers += 1.0;
        if matches!(t.get(i + 1), Some(Token::Percent)) {
            // The direction nearest to the percentage, within four tokens before it.
            let window = &t[i.saturating_sub(4)..i];
            let sign = if window.iter().rev().any(|x| is_word(Some(x), DOWN)) {
                -1.0
            } else if window.iter().rev().any(|x| is_word(Some(x), UP)) {
                1.0
            } else {
                0.0
            };
            percents.push(sign * v);
        } else {
            let scale = match t.get(i + 1) {
                Some(Token::Word(w)) if w == "mn" || w == "million" || w == "m" || w == "mln" => 1e6,
                Some(Token::Word(w)) if w == "bn" || w == "billion" => 1e9,
                Some(Token::Word(w)) if w == "k" || w == "thousand" => 1e3,
                _ => 1.0,
            };
            let years = (1900.0..=2100.0).contains(v) && v.fract() == 0.0 && scale == 1.0;
            if !years {
                amounts.push(v * scale);
            }
        }
        let prev = |k: usize| if i >= k { t.get(i - k) } else { None };
        let after = |w: &str| {
            matches!(prev(1), Some(Token::Word(x)) if x == w) || matches!(prev(2), Some(Token::Word(x)) if x == w)
        };
        if after("from") && from.is_none() {
            from = Some(*v);
        } else if after("to") && to.is_none() {
            to = Some(*v);
        }
    }
    let signed_percent = percents.iter().copied().find(|p| *p != 0.0).unwrap_or(0.0);
    let (from_to_sign, from_to_ratio) = match (from, to) {
        (Some(a), Some(b)) if a > 0.0 && b > 0.0 => ((b - a).signum(), (b / a).ln()),
        _ => (0.0, 0.0),
    };
    let amount = amounts.iter().copied().fold(0.0f64, f64::max);
    vec![
        percents.len() as f32,
        signed_percent.clamp(-1000.0, 1000.0) as f32,
        up,
        down,
        up - down,
        count(PROFIT),
        count(LOSS),
        from_to_sign as f32,
        from_to_ratio.clamp(-10.0, 10.0) as f32,
        (1.0 + amount).log10() as f32,
        numbers,
        count(NEGATION),
    ]
}

struct FinanceFeatures;

impl Features for FinanceFeatures {
    fn new() -> Result<Self, PluginError> {
        Ok(Self)
    }

    fn describe(&self) -> Vec<String> {
        NAMES.iter().map(|s| s.to_string()).collect()
    }

    fn extract(&mut self, record_json: &str) -> Result<Vec<f32>, PluginError> {
        let record: serde_json::Value = serde_json::from_str(record_json)
            .map_err(|e| PluginError::bad_input(format!("record is not JSON: {e}")))?;
        let text = record
            .get("text")
            .and_then(|t| t.as_str())
            .ok_or_else(|| PluginError::bad_input("record has no string `text`"))?;
        Ok(features_of(text))
    }
}

export_features!(FinanceFeatures);

#[cfg(test)]
mod tests {
    use super::*;

    fn f(text: &str, name: &str) -> f32 {
        let i = NAMES.iter().position(|n| *n == name).expect("feature");
        features_of(text)[i]
    }

    #[test]
    fn percentages_take_the_sign_of_their_direction() {
        let up = "Operating profit rose by 12.5 % to EUR 13.1 mn from EUR 8.7 mn in the corresponding period.";
        assert_eq!(f(up, "percent_mentions"), 1.0);
        assert_eq!(f(up, "signed_percent"), 12.5);
        assert_eq!(f(up, "from_to_sign"), 1.0);
        assert!((f(up, "from_to_ratio_log") - (13.1f32 / 8.7).ln()).abs() < 1e-4);
        assert!((f(up, "amount_log10") - (1.0 + 13.1e6f64).log10() as f32).abs() < 1e-4);
        assert_eq!(f(up, "profit_words"), 1.0);
        let down = "Net sales decreased by 5,2 percent to EUR 40.5 million, and the company swung to a loss.";
        assert_eq!(f(down, "signed_percent"), -5.2);
        assert_eq!(f(down, "loss_words"), 1.0);
        assert!(f(down, "direction") < 0.0);
    }

    #[test]
    fn neutral_sentences_have_no_direction_and_years_are_not_amounts() {
        let s = "The company was founded in 1998 and is headquartered in Helsinki.";
        assert_eq!(f(s, "direction"), 0.0);
        assert_eq!(f(s, "amount_log10"), 0.0);
        assert_eq!(f(s, "numbers"), 1.0);
        assert_eq!(features_of("").len(), NAMES.len());
        assert_eq!(f("1,234 units", "amount_log10"), (1.0f64 + 1234.0).log10() as f32);
    }
}
