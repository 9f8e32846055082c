//! The frozen-prefix activation cache. When the embeddings and the first `k` layers have
//! nothing to train and the data does not change between epochs, their output for an
//! example is the same every epoch: compute it once (in inference mode, so without dropout
//! in the frozen part), keep each example's real-token rows, and start every later forward
//! and backward pass at layer `k`. This removes the frozen part's whole cost from training.

use candle_core::{D, DType, Tensor};
use tuneforge_data::{BatchPlan, BatchPlanConfig, Encoded, EncodedBatch};

use crate::classifier::FrozenPrefix;
use crate::{ClassifierModel, Result};

/// Per-example hidden states after the first `layers` layers (real tokens only).
#[derive(Debug)]
pub struct PrefixCache {
    layers: usize,
    hidden: usize,
    rows: Vec<Vec<f32>>,
}

impl PrefixCache {
    /// Bytes the cache would take for these examples.
    pub fn estimate_bytes(encoded: &[Encoded], hidden: usize) -> usize {
        encoded.iter().map(|e| e.len() * hidden * 4).sum()
    }

    /// Runs the frozen prefix of `model` over every example once.
    pub fn build(model: &ClassifierModel, encoded: &[Encoded], layers: usize, batch_size: usize) -> Result<Self> {
        let hidden = model.backbone_config().hidden_size();
        let pad = model.text_encoder().pad_id();
        let plan = BatchPlan::new(
            encoded.iter().map(Encoded::len).collect(),
            BatchPlanConfig { batch_size, shuffle: false, group_by_length: true, seed: 0 },
        );
        let mut rows = vec![Vec::new(); encoded.len()];
        for indices in plan.epoch(0) {
            let batch = EncodedBatch::collate(encoded, &indices, None, pad);
            let h = model.prefix_hidden(&batch, layers)?.to_dtype(DType::F32)?;
            let h = h.flatten_to(D::Minus2)?.to_vec2::<f32>()?;
            for (r, &i) in indices.iter().enumerate() {
                let start = r * batch.seq_len;
                rows[i] = h[start..start + encoded[i].len()].concat();
            }
        }
        Ok(Self { layers, hidden, rows })
    }

    pub fn layers(&self) -> usize {
        self.layers
    }

    /// The cached hidden states of a batch, padded with zeros to its length.
    pub fn collate(&self, batch: &EncodedBatch) -> Result<FrozenPrefix> {
        let (b, l, h) = (batch.batch_size, batch.seq_len, self.hidden);
        let mut data = vec![0f32; b * l * h];
        for (r, &i) in batch.indices.iter().enumerate() {
            let row = &self.rows[i];
            data[r * l * h..r * l * h + row.len()].copy_from_slice(row);
        }
        let hidden = Tensor::from_vec(data, (b, l, h), &candle_core::Device::Cpu)?;
        Ok(FrozenPrefix { layers: self.layers, hidden })
    }
}
