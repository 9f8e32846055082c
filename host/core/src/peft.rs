//! Parameter-efficient fine-tuning: which adapters or LoRA updates a model carries, where,
//! and which parameters train. Recorded in `tuneforge.json` so a saved model rebuilds the
//! same structure.

use serde::{Deserialize, Serialize};

use crate::layers::LoraConfig;

/// Where bottleneck adapters sit in a transformer layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AdapterPlacement {
    /// After the attention output projection, before its residual and layer norm.
    Attention,
    /// After the feed-forward output projection, before its residual and layer norm.
    Ffn,
}

/// The extra modules of a model.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(tag = "method", rename_all = "lowercase", deny_unknown_fields)]
pub enum PeftSpec {
    /// No extra modules.
    #[default]
    None,
    /// Bottleneck adapters in layers `first_layer..`.
    Adapter { reduction_factor: usize, placement: Vec<AdapterPlacement>, first_layer: usize },
    /// LoRA on the linear modules named in `target_modules`, in layers `first_layer..`.
    Lora { rank: usize, alpha: f64, dropout: f64, target_modules: Vec<String>, first_layer: usize },
}

impl PeftSpec {
    /// The LoRA settings for module `module` (a dotted name inside a layer, such as
    /// `attention.self.query`) of layer `layer`, if it is targeted. A target matches the
    /// module's name or its last components, as in Hugging Face PEFT (`dense` matches every
    /// `*.dense`).
    pub fn lora_for(&self, layer: usize, module: &str) -> Option<LoraConfig> {
        match self {
            Self::Lora { rank, alpha, dropout, target_modules, first_layer } if layer >= *first_layer => target_modules
                .iter()
                .any(|t| module == t || module.ends_with(&format!(".{t}")))
                .then_some(LoraConfig { rank: *rank, alpha: *alpha, dropout: *dropout }),
            _ => None,
        }
    }

    /// The reduction factor of the adapter at `place` of layer `layer`, if there is one.
    pub fn adapter_for(&self, layer: usize, place: AdapterPlacement) -> Option<usize> {
        match self {
            Self::Adapter { reduction_factor, placement, first_layer } if layer >= *first_layer => {
                placement.contains(&place).then_some(*reduction_factor)
            }
            _ => None,
        }
    }

    pub fn is_none(&self) -> bool {
        matches!(self, Self::None)
    }

    /// True for the parameters this method adds (`*.lora_A.*`, `*.lora_B.*`, `*.adapter.*`).
    pub fn is_peft_param(name: &str) -> bool {
        name.contains(".lora_A.") || name.contains(".lora_B.") || name.contains(".adapter.")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lora_targets_match_like_peft() {
        let spec = PeftSpec::Lora {
            rank: 4,
            alpha: 8.0,
            dropout: 0.0,
            target_modules: vec!["query".into(), "dense".into()],
            first_layer: 1,
        };
        assert!(spec.lora_for(1, "attention.self.query").is_some());
        assert!(spec.lora_for(1, "attention.output.dense").is_some());
        assert!(spec.lora_for(1, "intermediate.dense").is_some());
        assert!(spec.lora_for(1, "attention.self.value").is_none());
        assert!(spec.lora_for(0, "attention.self.query").is_none(), "below first_layer");
        assert!(PeftSpec::is_peft_param("encoder.layer.1.attention.self.query.lora_A.weight"));
        assert!(!PeftSpec::is_peft_param("encoder.layer.1.attention.self.query.weight"));
    }
}
