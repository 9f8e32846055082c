//! The symptom-disease association loss.
//!
//! Knowledge base: a CSV of `Disease,Symptom_1,...` rows (the asset `knowledge-base`); a
//! disease's symptoms are the union over its rows. For each example the plugin finds the
//! knowledge base's symptoms in the text (word stems, in any order), and for each disease
//! `d` the share `c_d` of those symptoms that `d` is known to have. The loss is the expected
//! mismatch, `mean over rows of sum_d p_d * (1 - c_d)`, over the mapped diseases other than
//! the gold one (`exclude_gold`), so it moves probability away from diseases the text's
//! symptoms contradict. Rows where no symptom is found, and labels that map to no disease,
//! add nothing.
//!
//! Config: `aliases = "label=KB disease; ..."` for labels whose names differ beyond case and
//! punctuation; `exclude_gold = true|false`; `min_symptoms` (found symptoms a row needs, 1).

use std::collections::{BTreeSet, HashMap};

use tuneforge_plugin_sdk::{
    Loss, LossBatch, LossOutput, PluginError, asset_text, config, export_loss, label_names, log,
};

/// Lowercase alphanumeric words.
fn words(text: &str) -> Vec<String> {
    text.split(|c: char| !c.is_alphanumeric()).filter(|w| !w.is_empty()).map(|w| w.to_lowercase()).collect()
}

/// A crude stem (up to two suffixes off): enough to meet "itching"/"itchy",
/// "joints"/"joint", "continuous"/"continuously".
fn stem(word: &str) -> String {
    let mut w = word.to_string();
    for _ in 0..2 {
        let Some(suffix) = ["ly", "ings", "ing", "ness", "ous", "ed", "es", "s", "y"]
            .into_iter()
            .find(|s| w.len() > s.len() + 3 && w.ends_with(s))
        else {
            break;
        };
        w.truncate(w.len() - suffix.len());
    }
    w
}

const STOP: &[&str] = &["of", "in", "on", "the", "and", "a", "to", "with", "from"];

/// Letters and digits only, lowercase: how names are compared.
fn key(name: &str) -> String {
    name.chars().filter(|c| c.is_alphanumeric()).flat_map(char::to_lowercase).collect()
}

/// The knowledge base: symptom phrases (as stems) and, per disease, its symptom ids.
#[derive(Debug, Clone, Default)]
pub struct KnowledgeBase {
    pub symptoms: Vec<Vec<String>>,
    pub diseases: HashMap<String, (String, BTreeSet<usize>)>,
}

impl KnowledgeBase {
    pub fn parse(csv: &str) -> Result<Self, PluginError> {
        let mut kb = KnowledgeBase::default();
        let mut ids: HashMap<Vec<String>, usize> = HashMap::new();
        for (i, line) in csv.lines().enumerate() {
            if i == 0 && line.to_lowercase().starts_with("disease") {
                continue;
            }
            let mut fields = line.split(',');
            let Some(disease) = fields.next().map(str::trim).filter(|d| !d.is_empty()) else { continue };
            let entry = kb.diseases.entry(key(disease)).or_insert_with(|| (disease.to_string(), BTreeSet::new()));
            for s in fields {
                let phrase: Vec<String> = words(&s.replace('_', " "))
                    .iter()
                    .filter(|w| !STOP.contains(&w.as_str()))
                    .map(|w| stem(w))
                    .collect();
                if phrase.is_empty() {
                    continue;
                }
                let next = ids.len();
                let id = *ids.entry(phrase.clone()).or_insert_with(|| {
                    kb.symptoms.push(phrase);
                    next
                });
                entry.1.insert(id);
            }
        }
        if kb.diseases.is_empty() {
            return Err(PluginError::new("bad-asset", "the knowledge base has no disease rows"));
        }
        Ok(kb)
    }

    /// The ids of the symptoms whose every word stem occurs in `text`.
    pub fn find(&self, text: &str) -> BTreeSet<usize> {
        let stems: BTreeSet<String> = words(text).iter().map(|w| stem(w)).collect();
        (0..self.symptoms.len()).filter(|&i| self.symptoms[i].iter().all(|w| stems.contains(w))).collect()
    }
}

/// Maps each label to a knowledge-base disease, by name or alias.
pub fn map_labels(labels: &[String], kb: &KnowledgeBase, aliases: &str) -> Result<Vec<Option<String>>, PluginError> {
    let mut alias: HashMap<String, String> = HashMap::new();
    for pair in aliases.split(';').map(str::trim).filter(|p| !p.is_empty()) {
        let (label, disease) = pair
            .split_once('=')
            .ok_or_else(|| PluginError::bad_config(format!("alias `{pair}` is not `label=disease`")))?;
        if !kb.diseases.contains_key(&key(disease)) {
            return Err(PluginError::bad_config(format!(
                "alias `{pair}`: no disease `{}` in the knowledge base",
                disease.trim()
            )));
        }
        alias.insert(key(label), key(disease));
    }
    Ok(labels
        .iter()
        .map(|l| {
            let k = alias.get(&key(l)).cloned().unwrap_or_else(|| key(l));
            kb.diseases.contains_key(&k).then_some(k)
        })
        .collect())
}

/// The loss of one batch and its gradient w.r.t. the logits, given per-row mismatch weights
/// `w[r][d]` (0 where a class is not penalised).
pub fn expected_mismatch(rows: usize, classes: usize, logits: &[f32], weights: &[Vec<f32>]) -> (f32, Vec<f32>) {
    let mut grad = vec![0.0f32; rows * classes];
    let mut total = 0.0f64;
    for r in 0..rows {
        let z = &logits[r * classes..(r + 1) * classes];
        let w = &weights[r];
        if w.iter().all(|&x| x == 0.0) {
            continue;
        }
        let max = z.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let e: Vec<f64> = z.iter().map(|&v| ((v - max) as f64).exp()).collect();
        let sum: f64 = e.iter().sum();
        let p: Vec<f64> = e.iter().map(|v| v / sum).collect();
        let l: f64 = p.iter().zip(w).map(|(p, &w)| p * w as f64).sum();
        total += l;
        for d in 0..classes {
            grad[r * classes + d] = (p[d] * (w[d] as f64 - l) / rows as f64) as f32;
        }
    }
    ((total / rows.max(1) as f64) as f32, grad)
}

struct AssociationLoss {
    kb: KnowledgeBase,
    /// Per class: the disease's symptom ids, or `None` when the label maps to none.
    class_symptoms: Vec<Option<BTreeSet<usize>>>,
    exclude_gold: bool,
    min_symptoms: usize,
    cache: HashMap<String, Vec<f32>>,
}

impl AssociationLoss {
    /// `w[d]` for a text: 1 - (share of its found symptoms that disease `d` has).
    fn weights(&mut self, text: &str) -> Vec<f32> {
        if let Some(w) = self.cache.get(text) {
            return w.clone();
        }
        let found = self.kb.find(text);
        let w: Vec<f32> = self
            .class_symptoms
            .iter()
            .map(|known| match known {
                Some(known) if found.len() >= self.min_symptoms.max(1) => {
                    1.0 - found.intersection(known).count() as f32 / found.len() as f32
                }
                _ => 0.0,
            })
            .collect();
        if self.cache.len() < 100_000 {
            self.cache.insert(text.to_string(), w.clone());
        }
        w
    }
}

impl Loss for AssociationLoss {
    fn new() -> Result<Self, PluginError> {
        let c = config();
        c.reject_unknown(&["aliases", "exclude_gold", "min_symptoms"])?;
        let kb = KnowledgeBase::parse(&asset_text("knowledge-base")?)?;
        let labels = label_names();
        let mapped = map_labels(&labels, &kb, &c.string("aliases", ""))?;
        let unmapped: Vec<&str> =
            labels.iter().zip(&mapped).filter(|(_, m)| m.is_none()).map(|(l, _)| l.as_str()).collect();
        if !unmapped.is_empty() {
            log::warn(&format!(
                "labels with no disease in the knowledge base (not penalised): {}",
                unmapped.join(", ")
            ));
        }
        log::info(&format!(
            "{} diseases, {} symptoms; {} of {} labels mapped",
            kb.diseases.len(),
            kb.symptoms.len(),
            labels.len() - unmapped.len(),
            labels.len()
        ));
        let class_symptoms = mapped.into_iter().map(|m| m.map(|k| kb.diseases[&k].1.clone())).collect();
        Ok(Self {
            kb,
            class_symptoms,
            exclude_gold: c.bool("exclude_gold", true)?,
            min_symptoms: c.usize("min_symptoms", 1)?,
            cache: HashMap::new(),
        })
    }

    fn compute(&mut self, batch: &LossBatch) -> Result<LossOutput, PluginError> {
        let (rows, classes) = (batch.rows as usize, batch.classes as usize);
        if classes != self.class_symptoms.len() {
            return Err(PluginError::bad_input(format!(
                "{classes} classes, but the task has {} labels",
                self.class_symptoms.len()
            )));
        }
        if batch.texts.len() != rows || batch.labels.len() != rows || batch.logits.len() != rows * classes {
            return Err(PluginError::bad_input("batch sizes disagree"));
        }
        let mut weights = Vec::with_capacity(rows);
        for r in 0..rows {
            let mut w = self.weights(&batch.texts[r]);
            if self.exclude_gold
                && let Some(g) = w.get_mut(batch.labels[r] as usize)
            {
                *g = 0.0;
            }
            weights.push(w);
        }
        let (value, grad) = expected_mismatch(rows, classes, &batch.logits, &weights);
        Ok(LossOutput { value, grad })
    }
}

export_loss!(AssociationLoss);

#[cfg(test)]
mod tests {
    use super::*;

    const KB: &str = "Disease,Symptom_1,Symptom_2,Symptom_3\n\
        Acne,skin_rash,pus_filled_pimples,blackheads\n\
        Acne,skin_rash, blackheads,\n\
        Common_Cold,continuous_sneezing,chills,high_fever\n\
        GERD,stomach_pain,acidity,chest_pain\n";

    #[test]
    fn symptoms_are_found_by_word_stems_in_any_order() {
        let kb = KnowledgeBase::parse(KB).expect("kb");
        assert_eq!(kb.diseases.len(), 3);
        assert_eq!(kb.diseases["acne"].1.len(), 3, "union of the rows");
        let found = kb.find("I have a rash on my skin, with pus-filled pimples and some blackheads.");
        let names: Vec<String> = found.iter().map(|&i| kb.symptoms[i].join(" ")).collect();
        assert_eq!(names, ["skin rash", "pus fill pimpl", "blackhead"], "stems");
        assert!(kb.find("nothing relevant here").is_empty());
        assert_eq!(kb.find("I keep sneezing continuously and have a high fever").len(), 2);
    }

    #[test]
    fn labels_map_by_name_or_alias() {
        let kb = KnowledgeBase::parse(KB).expect("kb");
        let labels =
            vec!["acne".to_string(), "Common Cold".into(), "gastroesophageal reflux disease".into(), "Flu".into()];
        let m = map_labels(&labels, &kb, "gastroesophageal reflux disease = GERD").expect("maps");
        assert_eq!(m, [Some("acne".into()), Some("commoncold".into()), Some("gerd".into()), None]);
        let err = map_labels(&labels, &kb, "x=Nope").expect_err("unknown disease");
        assert!(err.message.contains("Nope"));
    }

    #[test]
    fn the_gradient_matches_finite_differences() {
        let (rows, classes) = (3, 4);
        let logits: Vec<f32> = (0..rows * classes).map(|i| ((i * 37 % 11) as f32 - 5.0) / 3.0).collect();
        let weights = vec![vec![0.0, 1.0, 0.5, 0.0], vec![0.0; 4], vec![1.0, 0.0, 0.25, 1.0]];
        let (value, grad) = expected_mismatch(rows, classes, &logits, &weights);
        assert!(value > 0.0);
        let h = 1e-3f32;
        for i in 0..logits.len() {
            let mut up = logits.clone();
            up[i] += h;
            let mut down = logits.clone();
            down[i] -= h;
            let numeric = (expected_mismatch(rows, classes, &up, &weights).0
                - expected_mismatch(rows, classes, &down, &weights).0)
                / (2.0 * h);
            assert!((numeric - grad[i]).abs() < 1e-3, "logit {i}: numeric {numeric}, analytic {}", grad[i]);
        }
        assert!(grad[4..8].iter().all(|&g| g == 0.0), "a row with no penalty has no gradient");
    }
}
