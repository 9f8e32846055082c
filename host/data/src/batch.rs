//! Batching: which examples go together (length-grouped, shuffled by seed and epoch) and
//! how a batch is padded (to its longest row).

use rand::{SeedableRng, rngs::StdRng, seq::SliceRandom};

use crate::Encoded;

/// How an epoch's batches are formed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchPlanConfig {
    pub batch_size: usize,
    /// Shuffle the examples each epoch (training). Off: file order (evaluation).
    pub shuffle: bool,
    /// Put examples of similar length together, which cuts padding.
    pub group_by_length: bool,
    pub seed: u64,
}

/// Examples per group sorted by length before they are cut into batches, as a multiple of
/// the batch size: large enough to cut padding, small enough to keep batches random.
const GROUP_BATCHES: usize = 50;

/// The batches of every epoch for a dataset of known lengths.
#[derive(Debug, Clone)]
pub struct BatchPlan {
    lengths: Vec<usize>,
    config: BatchPlanConfig,
}

impl BatchPlan {
    pub fn new(lengths: Vec<usize>, config: BatchPlanConfig) -> Self {
        let batch_size = config.batch_size.max(1);
        Self { lengths, config: BatchPlanConfig { batch_size, ..config } }
    }

    pub fn batches_per_epoch(&self) -> usize {
        self.lengths.len().div_ceil(self.config.batch_size)
    }

    /// The example indices of each batch of `epoch`; the same for the same seed and epoch.
    pub fn epoch(&self, epoch: u64) -> Vec<Vec<usize>> {
        let mut rng = StdRng::seed_from_u64(self.config.seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ epoch);
        let mut order: Vec<usize> = (0..self.lengths.len()).collect();
        if self.config.shuffle {
            order.shuffle(&mut rng);
        }
        let bs = self.config.batch_size;
        if self.config.group_by_length {
            for group in order.chunks_mut(bs * GROUP_BATCHES) {
                group.sort_by_key(|&i| std::cmp::Reverse(self.lengths[i]));
            }
        }
        let mut batches: Vec<Vec<usize>> = order.chunks(bs).map(<[usize]>::to_vec).collect();
        if self.config.shuffle && self.config.group_by_length {
            batches.shuffle(&mut rng);
        }
        batches
    }
}

/// A padded batch, row-major `[batch_size, seq_len]`.
#[derive(Debug, Clone, PartialEq)]
pub struct EncodedBatch {
    pub ids: Vec<u32>,
    pub type_ids: Vec<u32>,
    /// 1.0 for real tokens, 0.0 for padding.
    pub mask: Vec<f32>,
    /// Class ids, one per row (empty when the batch has no labels).
    pub labels: Vec<u32>,
    pub batch_size: usize,
    pub seq_len: usize,
    /// Real (non-pad) tokens, special tokens included.
    pub n_tokens: usize,
    /// Indices of the rows in the dataset.
    pub indices: Vec<usize>,
    /// Numeric features per row, row-major `[batch_size, n]` (empty without features).
    pub features: Vec<f32>,
}

impl EncodedBatch {
    /// Pads `rows` (with their `labels`, if any) to the longest row with `pad_id`.
    pub fn collate(encoded: &[Encoded], indices: &[usize], labels: Option<&[u32]>, pad_id: u32) -> Self {
        let seq_len = indices.iter().map(|&i| encoded[i].len()).max().unwrap_or(0).max(1);
        let batch_size = indices.len();
        let mut ids = vec![pad_id; batch_size * seq_len];
        let mut type_ids = vec![0; batch_size * seq_len];
        let mut mask = vec![0.0; batch_size * seq_len];
        let mut n_tokens = 0;
        for (row, &i) in indices.iter().enumerate() {
            let e = &encoded[i];
            let start = row * seq_len;
            ids[start..start + e.len()].copy_from_slice(&e.ids);
            type_ids[start..start + e.len()].copy_from_slice(&e.type_ids);
            mask[start..start + e.len()].fill(1.0);
            n_tokens += e.len();
        }
        let labels = labels.map(|l| indices.iter().map(|&i| l[i]).collect()).unwrap_or_default();
        Self {
            ids,
            type_ids,
            mask,
            labels,
            batch_size,
            seq_len,
            n_tokens,
            indices: indices.to_vec(),
            features: Vec::new(),
        }
    }

    /// Attaches each row's features from `per_example` (indexed like the dataset).
    pub fn with_features(mut self, per_example: &[Vec<f32>]) -> Self {
        self.features = self.indices.iter().flat_map(|&i| per_example[i].iter().copied()).collect();
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn enc(len: usize) -> Encoded {
        Encoded { ids: (1..=len as u32).collect(), type_ids: vec![0; len] }
    }

    #[test]
    fn collate_pads_to_the_longest_row() {
        let rows = vec![enc(3), enc(1), enc(2)];
        let b = EncodedBatch::collate(&rows, &[0, 1], Some(&[5, 6, 7]), 0);
        assert_eq!((b.batch_size, b.seq_len, b.n_tokens), (2, 3, 4));
        assert_eq!(b.ids, [1, 2, 3, 1, 0, 0]);
        assert_eq!(b.mask, [1.0, 1.0, 1.0, 1.0, 0.0, 0.0]);
        assert_eq!(b.labels, [5, 6]);
    }

    #[test]
    fn epochs_cover_every_example_once_and_depend_on_seed_and_epoch() {
        let lengths: Vec<usize> = (0..1000).map(|i| (i * 37) % 100 + 1).collect();
        let cfg = BatchPlanConfig { batch_size: 8, shuffle: true, group_by_length: true, seed: 3 };
        let plan = BatchPlan::new(lengths.clone(), cfg);
        let e0 = plan.epoch(0);
        let mut all: Vec<usize> = e0.iter().flatten().copied().collect();
        all.sort_unstable();
        assert_eq!(all, (0..1000).collect::<Vec<_>>());
        assert_eq!(e0.len(), plan.batches_per_epoch());
        assert_eq!(e0, plan.epoch(0));
        assert_ne!(e0, plan.epoch(1));
        // Grouping by length cuts padding compared with a random order.
        let padding = |batches: &[Vec<usize>]| -> usize {
            batches
                .iter()
                .map(|b| {
                    let max = b.iter().map(|&i| lengths[i]).max().unwrap_or(0);
                    b.iter().map(|&i| max - lengths[i]).sum::<usize>()
                })
                .sum()
        };
        let random = BatchPlan::new(lengths.clone(), BatchPlanConfig { group_by_length: false, ..cfg }).epoch(0);
        assert!(padding(&e0) * 4 < padding(&random), "{} vs {}", padding(&e0), padding(&random));
    }

    #[test]
    fn unshuffled_plan_keeps_file_order() {
        let plan = BatchPlan::new(
            vec![1; 5],
            BatchPlanConfig { batch_size: 2, shuffle: false, group_by_length: false, seed: 0 },
        );
        assert_eq!(plan.epoch(0), vec![vec![0, 1], vec![2, 3], vec![4]]);
    }
}
