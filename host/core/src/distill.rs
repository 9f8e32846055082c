//! Knowledge distillation: a student learns from a trained teacher's softened outputs as well
//! as from the labels (Hinton et al. 2015). The teacher runs once over the (static) training
//! texts before training; its softened probabilities are cached per example.

use std::path::Path;

use candle_core::{D, Device, Tensor};

use crate::experiment::{DistillSection, StudentInit};
use crate::export::model_dir_of;
use crate::peft::PeftSpec;
use crate::{ClassifierModel, CoreError, Result};

/// `T² · mean over rows of KL(p ‖ softmax(student / T))`, with `p` the teacher's softened
/// probabilities `[rows, classes]` (a constant). Differentiable in `student`.
pub fn distill_loss(student: &Tensor, teacher_probs: &Tensor, temperature: f64) -> Result<Tensor> {
    let rows = student.dim(0)?;
    let z = (student / temperature)?;
    // log-softmax with a detached max: z - (m + log Σ exp(z - m)).
    let m = z.max_keepdim(D::Minus1)?.detach();
    let shifted = z.broadcast_sub(&m)?;
    let log_q = shifted.broadcast_sub(&shifted.exp()?.sum_keepdim(D::Minus1)?.log()?)?;
    // Σ p log p is constant; keep it so the value is the KL divergence itself.
    let p = teacher_probs.to_dtype(student.dtype())?;
    let p_log_p = (p.clamp(1e-30, 1.0)?.log()? * &p)?;
    let kl = (p_log_p - (&p * log_q)?)?.sum_all()?;
    Ok(((kl / rows.max(1) as f64)? * (temperature * temperature))?)
}

/// The teacher's targets for one batch, with the loss mix.
#[derive(Debug, Clone)]
pub struct TeacherTargets {
    /// `softmax(teacher_logits / T)`, `[rows, classes]` in the student's label order.
    pub probs: Tensor,
    pub temperature: f64,
    pub alpha: f64,
}

/// A loaded teacher's cached outputs over the training set.
#[derive(Debug)]
pub struct Teacher {
    /// `[n_examples, classes]`, softened, in the student's label order.
    probs: Tensor,
    pub temperature: f64,
    pub alpha: f64,
    pub dir: std::path::PathBuf,
    pub seconds: f64,
}

impl Teacher {
    /// Loads the teacher of `d`, checks its labels cover `labels`, and runs it once over
    /// `texts` (the training split, after cleaning and augmentation).
    pub fn prepare<S: AsRef<str>>(
        d: &DistillSection,
        labels: &[String],
        texts: &[S],
        batch_size: usize,
    ) -> Result<Self> {
        let started = std::time::Instant::now();
        let dir = model_dir_of(&d.teacher);
        let teacher = ClassifierModel::load(&dir)?;
        if teacher.meta().fusion.is_some() {
            return Err(CoreError::file(
                &dir,
                "the teacher fuses plugin features; distilling from it is not supported",
            ));
        }
        let columns = labels
            .iter()
            .map(|l| {
                teacher.labels().iter().position(|t| t == l).ok_or_else(|| {
                    CoreError::file(
                        &dir,
                        format!("the teacher has no label `{l}` (its labels: {:?})", teacher.labels()),
                    )
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let logits = teacher.logits_for(texts, None, batch_size)?;
        let idx = Tensor::from_vec(columns.iter().map(|c| *c as u32).collect::<Vec<_>>(), columns.len(), &Device::Cpu)?;
        let probs = candle_nn::ops::softmax_last_dim(&(logits.index_select(&idx, 1)? / d.temperature)?)?;
        Ok(Self { probs, temperature: d.temperature, alpha: d.alpha, dir, seconds: started.elapsed().as_secs_f64() })
    }

    /// The targets of the examples at `indices`.
    pub fn targets(&self, indices: &[usize]) -> Result<TeacherTargets> {
        let idx = Tensor::from_vec(indices.iter().map(|i| *i as u32).collect::<Vec<_>>(), indices.len(), &Device::Cpu)?;
        Ok(TeacherTargets {
            probs: self.probs.index_select(&idx, 0)?,
            temperature: self.temperature,
            alpha: self.alpha,
        })
    }
}

/// Where the student starts and which layers it keeps: `(base directory, layers)`.
pub fn student_base(d: &DistillSection, base_dir: &Path) -> Result<(std::path::PathBuf, Option<Vec<usize>>)> {
    let dir = match d.student_init {
        StudentInit::Base => base_dir.to_path_buf(),
        StudentInit::Teacher => {
            let dir = model_dir_of(&d.teacher);
            let meta = crate::classifier::read_meta(&dir)?;
            if meta.peft != PeftSpec::None || !meta.extra_tokens.is_empty() || meta.quantization.is_some() {
                return Err(CoreError::Config {
                    file: "experiment".into(),
                    field: "distill.student_init".into(),
                    message: format!(
                        "is \"teacher\", but {} carries adapters, LoRA, added tokens or int8 weights; merge LoRA \
                         with `tuneforge export --merged`, or set student_init = \"base\"",
                        dir.display()
                    ),
                });
            }
            dir
        }
    };
    // The layers to choose from are those of the model the student starts from.
    let base_layers = crate::bert::BertConfig::read(&dir.join("config.json"))?.num_hidden_layers;
    let layers = d.student_layers.map(|n| {
        if n > base_layers {
            Err(CoreError::Config {
                file: "experiment".into(),
                field: "distill.student_layers".into(),
                message: format!("is {n}, but the model has only {base_layers} layers"),
            })
        } else {
            Ok(DistillSection::layers_to_keep(n, base_layers))
        }
    });
    Ok((dir, layers.transpose()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The loss against a value worked out by hand.
    #[test]
    fn distillation_loss_matches_a_hand_computed_value() -> Result<()> {
        // One row, two classes: student logits (0, ln 3) at T = 1 give q = (1/4, 3/4);
        // teacher p = (1/2, 1/2): KL = 1/2 ln(2) + 1/2 ln(2/3) = 1/2 ln(4/3).
        let s = Tensor::new(&[[0.0f64, 3f64.ln()]], &Device::Cpu)?;
        let p = Tensor::new(&[[0.5f64, 0.5]], &Device::Cpu)?;
        let v = distill_loss(&s, &p, 1.0)?.to_scalar::<f64>()?;
        assert!((v - 0.5 * (4.0f64 / 3.0).ln()).abs() < 1e-12, "{v}");
        // T = 2 softens the student to (0, ln 3 / 2) -> q = (1/(1+√3), √3/(1+√3)), times T² = 4.
        let q0 = 1.0 / (1.0 + 3f64.sqrt());
        let expected = 4.0 * (0.5 * (0.5 / q0).ln() + 0.5 * (0.5 / (1.0 - q0)).ln());
        let v = distill_loss(&s, &p, 2.0)?.to_scalar::<f64>()?;
        assert!((v - expected).abs() < 1e-12, "{v} vs {expected}");
        // Equal distributions: zero, whatever the temperature.
        let v = distill_loss(&Tensor::new(&[[1.0f64, 1.0]], &Device::Cpu)?, &p, 3.0)?.to_scalar::<f64>()?;
        assert!(v.abs() < 1e-12);
        Ok(())
    }

    #[test]
    fn the_gradient_is_t_times_q_minus_p() -> Result<()> {
        // d/ds [T² KL(p ‖ softmax(s/T))] = T (q - p) per row (divided by the row count).
        let var = candle_core::Var::new(&[[0.3f64, -1.2, 2.0]], &Device::Cpu)?;
        let p = Tensor::new(&[[0.2f64, 0.3, 0.5]], &Device::Cpu)?;
        let t = 1.7;
        let g = distill_loss(var.as_tensor(), &p, t)?.backward()?;
        let grad = g.get(var.as_tensor()).expect("grad").to_vec2::<f64>()?;
        let q = candle_nn::ops::softmax_last_dim(&(var.as_tensor() / t)?)?.to_vec2::<f64>()?;
        for c in 0..3 {
            let expected = t * (q[0][c] - [0.2, 0.3, 0.5][c]);
            assert!((grad[0][c] - expected).abs() < 1e-10, "class {c}: {} vs {expected}", grad[0][c]);
        }
        Ok(())
    }

    #[test]
    fn students_keep_evenly_spaced_layers_ending_at_the_last() {
        assert_eq!(DistillSection::layers_to_keep(3, 6), vec![1, 3, 5]);
        assert_eq!(DistillSection::layers_to_keep(2, 6), vec![2, 5]);
        assert_eq!(DistillSection::layers_to_keep(6, 6), vec![0, 1, 2, 3, 4, 5]);
        assert_eq!(DistillSection::layers_to_keep(1, 2), vec![1]);
    }
}
