//! Data parallelism over GPUs with NCCL: one process per GPU, each holding a full replica,
//! each step's micro-batches dealt out by rank, gradients summed with NCCL's all-reduce and
//! divided by the world size, so every replica applies the same update.
//!
//! A group is described by three environment variables that `tuneforge train --gpus N` sets
//! for the processes it launches: `TUNEFORGE_DP_RANK`, `TUNEFORGE_DP_WORLD` and
//! `TUNEFORGE_DP_ID` (NCCL's 128-byte unique id in hex, made by the launcher). Across
//! machines the same holds: start one process per GPU on every machine with a global rank,
//! the world size and the one id made on rank 0 (NCCL then bootstraps over TCP on its own
//! interface choice; `NCCL_SOCKET_IFNAME` picks the network). Rank 0 alone writes the run
//! directory and the store.
//!
//! Without the `nccl` feature only the single-process group exists.

use std::collections::HashMap;

use candle_core::{Device, Tensor};

use crate::{CoreError, Result};

/// Environment variables of a data-parallel group.
pub const ENV_RANK: &str = "TUNEFORGE_DP_RANK";
pub const ENV_WORLD: &str = "TUNEFORGE_DP_WORLD";
pub const ENV_ID: &str = "TUNEFORGE_DP_ID";

/// This process's place in a data-parallel group.
pub struct DataParallel {
    rank: usize,
    world: usize,
    #[cfg(feature = "nccl")]
    comm: Option<nccl::Communicator>,
}

impl std::fmt::Debug for DataParallel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DataParallel").field("rank", &self.rank).field("world", &self.world).finish()
    }
}

impl DataParallel {
    /// A group of one without a communicator: training as usual.
    pub fn single() -> Self {
        Self {
            rank: 0,
            world: 1,
            #[cfg(feature = "nccl")]
            comm: None,
        }
    }

    /// The group this process was launched into (the `TUNEFORGE_DP_*` variables), or a
    /// group of one when they are absent.
    pub fn from_env(device: &Device) -> Result<Self> {
        let Ok(rank) = std::env::var(ENV_RANK) else { return Ok(Self::single()) };
        let bad =
            |name: &str, message: String| CoreError::Config { file: "environment".into(), field: name.into(), message };
        let rank: usize = rank.parse().map_err(|_| bad(ENV_RANK, format!("`{rank}` is not a number")))?;
        let world = std::env::var(ENV_WORLD).map_err(|_| bad(ENV_WORLD, format!("is missing (with {ENV_RANK})")))?;
        let world: usize = world.parse().map_err(|_| bad(ENV_WORLD, format!("`{world}` is not a number")))?;
        if world == 0 || rank >= world {
            return Err(bad(ENV_RANK, format!("rank {rank} is outside a group of {world}")));
        }
        let id = std::env::var(ENV_ID).map_err(|_| bad(ENV_ID, format!("is missing (with {ENV_RANK})")))?;
        Self::join(rank, world, &id, device)
    }

    #[cfg(feature = "nccl")]
    fn join(rank: usize, world: usize, id: &str, device: &Device) -> Result<Self> {
        let comm = nccl::Communicator::join(rank, world, id, device)?;
        Ok(Self { rank, world, comm: Some(comm) })
    }

    #[cfg(not(feature = "nccl"))]
    fn join(rank: usize, world: usize, _id: &str, _device: &Device) -> Result<Self> {
        Err(CoreError::Device {
            device: format!("rank {rank} of {world}"),
            message: "data parallelism needs a build with `--features nccl` (CUDA and NCCL)".into(),
        })
    }

    /// Joins a group with an explicit id (tests, custom launchers).
    pub fn join_group(rank: usize, world: usize, id: &str, device: &Device) -> Result<Self> {
        Self::join(rank, world, id, device)
    }

    pub fn rank(&self) -> usize {
        self.rank
    }

    pub fn world(&self) -> usize {
        self.world
    }

    /// Rank 0: the process that writes files and records.
    pub fn is_primary(&self) -> bool {
        self.rank == 0
    }

    /// True when gradients go through NCCL (a group launched with `--gpus`, even of one).
    pub fn is_distributed(&self) -> bool {
        #[cfg(feature = "nccl")]
        {
            self.comm.is_some()
        }
        #[cfg(not(feature = "nccl"))]
        {
            false
        }
    }

    /// This rank's share of a step's micro-batches: every `world`-th, starting at `rank`.
    pub fn shard<'a, T>(&self, items: &'a [T]) -> Vec<&'a T> {
        items.iter().skip(self.rank).step_by(self.world.max(1)).collect()
    }

    /// Replaces each gradient by its mean over the group (sum, then divide by the world size).
    /// Every rank must call this once per step, with the same names.
    pub fn all_reduce_mean(&self, grads: &mut HashMap<String, Tensor>) -> Result<()> {
        #[cfg(feature = "nccl")]
        if let Some(comm) = &self.comm {
            let mut names: Vec<String> = grads.keys().cloned().collect();
            names.sort();
            for name in names {
                let g = &grads[&name];
                let summed = comm.all_reduce_sum(g).map_err(|e| CoreError::Param {
                    name: name.clone(),
                    message: format!("all-reduce of the gradient failed: {e}"),
                })?;
                grads.insert(name, (summed / self.world as f64)?);
            }
            return Ok(());
        }
        let _ = grads;
        Ok(())
    }

    /// The mean of a scalar over the group (the loss a step reports).
    pub fn mean_scalar(&self, value: f64, device: &Device) -> Result<f64> {
        #[cfg(feature = "nccl")]
        if let Some(comm) = &self.comm {
            let t = Tensor::new(&[value as f32], device)?;
            let sum = comm.all_reduce_sum(&t)?;
            return Ok(sum.to_vec1::<f32>()?[0] as f64 / self.world as f64);
        }
        let _ = device;
        Ok(value)
    }
}

/// A fresh NCCL unique id in hex, for a launcher to hand to every rank.
#[cfg(feature = "nccl")]
pub fn new_group_id() -> Result<String> {
    nccl::new_id()
}

#[cfg(feature = "nccl")]
mod nccl {
    use candle_core::cuda::cudarc::nccl::safe::{Comm, Id, ReduceOp};
    use candle_core::op::BackpropOp;
    use candle_core::{CudaStorage, DType, Device, Storage, Tensor};

    use crate::{CoreError, Result};

    pub(super) struct Communicator {
        comm: Comm,
        device: candle_core::CudaDevice,
    }

    fn err(e: impl std::fmt::Debug) -> CoreError {
        CoreError::Device { device: "nccl".into(), message: format!("{e:?}") }
    }

    pub(super) fn new_id() -> Result<String> {
        let id = Id::new().map_err(err)?;
        Ok(id.internal().iter().map(|b| format!("{:02x}", *b as u8)).collect())
    }

    fn parse_id(hex: &str) -> Result<Id> {
        let bytes: Vec<u8> = (0..hex.len())
            .step_by(2)
            .map(|i| hex.get(i..i + 2).and_then(|h| u8::from_str_radix(h, 16).ok()))
            .collect::<Option<_>>()
            .ok_or_else(|| CoreError::Config {
                file: "environment".into(),
                field: super::ENV_ID.into(),
                message: "is not hex".into(),
            })?;
        let mut internal = [0 as std::ffi::c_char; 128];
        if bytes.len() != internal.len() {
            return Err(CoreError::Config {
                file: "environment".into(),
                field: super::ENV_ID.into(),
                message: format!("holds {} bytes, NCCL ids have 128", bytes.len()),
            });
        }
        for (d, b) in internal.iter_mut().zip(bytes) {
            *d = b as std::ffi::c_char;
        }
        Ok(Id::uninit(internal))
    }

    impl Communicator {
        pub(super) fn join(rank: usize, world: usize, id: &str, device: &Device) -> Result<Self> {
            let Device::Cuda(cuda) = device else {
                return Err(CoreError::Device {
                    device: format!("{device:?}"),
                    message: "NCCL data parallelism runs on CUDA devices".into(),
                });
            };
            let comm = Comm::from_rank(cuda.cuda_stream(), rank, world, parse_id(id)?).map_err(err)?;
            Ok(Self { comm, device: cuda.clone() })
        }

        /// The element-wise sum of `t` over the group (f32).
        pub(super) fn all_reduce_sum(&self, t: &Tensor) -> Result<Tensor> {
            let t = t.to_dtype(DType::F32)?.contiguous()?;
            let n = t.elem_count();
            let (storage, layout) = t.storage_and_layout();
            let Storage::Cuda(cuda) = &*storage else {
                return Err(CoreError::Device {
                    device: "cpu".into(),
                    message: "all-reduce needs a CUDA tensor".into(),
                });
            };
            let src = cuda.as_cuda_slice::<f32>()?;
            let (start, end) = layout.contiguous_offsets().ok_or_else(|| err("non-contiguous gradient"))?;
            let src = src.slice(start..end);
            let mut dst = self.device.alloc_zeros::<f32>(n)?;
            self.comm.all_reduce(&src, &mut dst, &ReduceOp::Sum).map_err(err)?;
            let storage = Storage::Cuda(CudaStorage::wrap_cuda_slice(dst, self.device.clone()));
            Ok(Tensor::from_storage(storage, t.shape().clone(), BackpropOp::none(), false))
        }
    }
}
