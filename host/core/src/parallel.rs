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
//! Without the `nccl` feature only the single-process group exists, and the in-process
//! group (ranks as threads, [`DataParallel::in_process`]) that checks the data-parallel
//! arithmetic on the CPU.

use std::collections::HashMap;
use std::sync::{Arc, Condvar, Mutex};

use candle_core::{DType, Device, Tensor};

use crate::{CoreError, Result};

/// Environment variables of a data-parallel group.
pub const ENV_RANK: &str = "TUNEFORGE_DP_RANK";
pub const ENV_WORLD: &str = "TUNEFORGE_DP_WORLD";
pub const ENV_ID: &str = "TUNEFORGE_DP_ID";

/// This process's place in a data-parallel group.
pub struct DataParallel {
    rank: usize,
    world: usize,
    backend: Backend,
}

/// How the ranks exchange gradients.
enum Backend {
    /// A group of one: nothing to exchange.
    Alone,
    /// NCCL's all-reduce between processes, one GPU each.
    #[cfg(feature = "nccl")]
    Nccl(nccl::Communicator),
    /// Ranks that are threads of one process, summing through shared memory (the CPU
    /// check of the data-parallel arithmetic: sharding, token weighting, averaging).
    InProcess(Member),
}

impl std::fmt::Debug for DataParallel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DataParallel").field("rank", &self.rank).field("world", &self.world).finish()
    }
}

impl DataParallel {
    /// A group of one without a communicator: training as usual.
    pub fn single() -> Self {
        Self { rank: 0, world: 1, backend: Backend::Alone }
    }

    /// `world` ranks in this process that all-reduce through shared memory (on any device;
    /// the values pass through the host). For checking that a data-parallel run computes
    /// what one process computes, without GPUs: hand each [`InProcessRank`] to its own thread,
    /// which joins with `DataParallel::from`; every rank must reach each all-reduce. A rank
    /// that is dropped (its thread failed or returned) makes the all-reduces of the others
    /// fail, naming it, instead of waiting forever.
    pub fn in_process(world: usize) -> Vec<InProcessRank> {
        let world = world.max(1);
        let hub = Arc::new(Hub {
            world,
            state: Mutex::new(HubState { slots: vec![Vec::new(); world], arrived: 0, round: 0, gone: None }),
            turn: Condvar::new(),
        });
        (0..world).map(|rank| InProcessRank { world, member: Member { rank, hub: hub.clone() } }).collect()
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

    /// `group` when given, else the group of the environment ([`DataParallel::from_env`]),
    /// kept in `slot`.
    pub fn given_or_from_env<'a>(
        group: Option<&'a Self>,
        slot: &'a mut Option<Self>,
        device: &Device,
    ) -> Result<&'a Self> {
        match group {
            Some(g) => Ok(g),
            None => Ok(slot.insert(Self::from_env(device)?)),
        }
    }

    #[cfg(feature = "nccl")]
    fn join(rank: usize, world: usize, id: &str, device: &Device) -> Result<Self> {
        let comm = nccl::Communicator::join(rank, world, id, device)?;
        Ok(Self { rank, world, backend: Backend::Nccl(comm) })
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

    /// True when gradients are exchanged (a group launched with `--gpus`, even of one, or
    /// an in-process group).
    pub fn is_distributed(&self) -> bool {
        !matches!(self.backend, Backend::Alone)
    }

    /// This rank's share of a step's micro-batches: every `world`-th, starting at `rank`.
    pub fn shard<'a, T>(&self, items: &'a [T]) -> Vec<&'a T> {
        items.iter().skip(self.rank).step_by(self.world.max(1)).collect()
    }

    /// The element-wise sum of `t` over the group, in f32 (`t` itself alone).
    fn all_reduce_sum(&self, t: &Tensor) -> Result<Tensor> {
        match &self.backend {
            Backend::Alone => Ok(t.to_dtype(DType::F32)?),
            #[cfg(feature = "nccl")]
            Backend::Nccl(comm) => comm.all_reduce_sum(t),
            Backend::InProcess(member) => {
                let values = t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
                let sum = member.hub.sum(self.rank, values)?;
                Ok(Tensor::from_vec(sum, t.shape(), t.device())?)
            }
        }
    }

    /// Replaces each gradient by its mean over the group (sum, then divide by the world size),
    /// in one exchange: the gradients, sorted by name, travel as one flat f32 buffer. Every
    /// rank must call this once per step, with the same names and shapes.
    pub fn all_reduce_mean(&self, grads: &mut HashMap<String, Tensor>) -> Result<()> {
        if !self.is_distributed() || grads.is_empty() {
            return Ok(());
        }
        let mut names: Vec<String> = grads.keys().cloned().collect();
        names.sort();
        let flat =
            names.iter().map(|n| Ok(grads[n].flatten_all()?.to_dtype(DType::F32)?)).collect::<Result<Vec<_>>>()?;
        let summed = self.all_reduce_sum(&Tensor::cat(&flat, 0)?).map_err(|e| CoreError::Param {
            name: names.join(", "),
            message: format!("all-reduce of the gradients failed: {e}"),
        })?;
        let mean = (summed / self.world as f64)?;
        let mut at = 0;
        for name in names {
            let g = &grads[&name];
            let n = g.elem_count();
            let part = mean.narrow(0, at, n)?.reshape(g.shape())?.to_dtype(g.dtype())?;
            at += n;
            grads.insert(name, part);
        }
        Ok(())
    }

    /// The sum of a scalar over the group.
    pub fn sum_scalar(&self, value: f64, device: &Device) -> Result<f64> {
        if !self.is_distributed() {
            return Ok(value);
        }
        let sum = self.all_reduce_sum(&Tensor::new(&[value as f32], device)?)?;
        Ok(sum.to_vec1::<f32>()?[0] as f64)
    }

    /// The mean of a scalar over the group (the loss a step reports).
    pub fn mean_scalar(&self, value: f64, device: &Device) -> Result<f64> {
        Ok(self.sum_scalar(value, device)? / self.world as f64)
    }
}

/// One rank of an in-process group ([`DataParallel::in_process`]), to move to its thread.
pub struct InProcessRank {
    world: usize,
    member: Member,
}

impl std::fmt::Debug for InProcessRank {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InProcessRank").field("rank", &self.member.rank).field("world", &self.world).finish()
    }
}

impl From<InProcessRank> for DataParallel {
    fn from(r: InProcessRank) -> Self {
        Self { rank: r.member.rank, world: r.world, backend: Backend::InProcess(r.member) }
    }
}

/// A rank's hold on its group's [`Hub`]; dropping it tells the other ranks it is gone.
struct Member {
    rank: usize,
    hub: Arc<Hub>,
}

impl Drop for Member {
    fn drop(&mut self) {
        let mut state = self.hub.lock();
        state.gone.get_or_insert(self.rank);
        self.hub.turn.notify_all();
    }
}

/// The meeting point of an in-process group: each rank leaves its values in its slot, all
/// meet, each sums every slot, all meet again before the slots are reused.
struct Hub {
    world: usize,
    state: Mutex<HubState>,
    turn: Condvar,
}

struct HubState {
    slots: Vec<Vec<f32>>,
    /// Ranks waiting at the current meeting, and how many meetings have completed.
    arrived: usize,
    round: u64,
    /// The first rank that left the group.
    gone: Option<usize>,
}

impl Hub {
    fn lock(&self) -> std::sync::MutexGuard<'_, HubState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn left(rank: usize, gone: usize) -> CoreError {
        CoreError::Device {
            device: format!("rank {rank}"),
            message: format!("rank {gone} left the in-process group before this all-reduce"),
        }
    }

    /// Waits until every rank has arrived (or one has left: an error).
    fn meet<'a>(
        &'a self,
        mut state: std::sync::MutexGuard<'a, HubState>,
        rank: usize,
    ) -> Result<std::sync::MutexGuard<'a, HubState>> {
        if let Some(gone) = state.gone {
            return Err(Self::left(rank, gone));
        }
        state.arrived += 1;
        if state.arrived == self.world {
            state.arrived = 0;
            state.round += 1;
            self.turn.notify_all();
            return Ok(state);
        }
        let round = state.round;
        while state.round == round {
            if let Some(gone) = state.gone {
                return Err(Self::left(rank, gone));
            }
            state = self.turn.wait(state).unwrap_or_else(|e| e.into_inner());
        }
        Ok(state)
    }

    fn sum(&self, rank: usize, values: Vec<f32>) -> Result<Vec<f32>> {
        let mut state = self.lock();
        state.slots[rank] = values;
        let state = self.meet(state, rank)?;
        let n = state.slots[rank].len();
        let sum = if state.slots.iter().any(|s| s.len() != n) {
            let sizes: Vec<usize> = state.slots.iter().map(Vec::len).collect();
            Err(CoreError::Device {
                device: format!("rank {rank}"),
                message: format!("the ranks all-reduce different sizes: {sizes:?}"),
            })
        } else {
            Ok((0..n).map(|i| state.slots.iter().map(|s| s[i]).sum()).collect())
        };
        // Nobody overwrites a slot before every rank has read them all.
        drop(self.meet(state, rank)?);
        sum
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

#[cfg(test)]
mod tests {
    use std::sync::mpsc;
    use std::time::Duration;

    use super::*;

    /// Runs `f` on each rank of an in-process group of `world`, each in its thread; the
    /// results by rank, or a panic when any rank is still waiting after 20 s.
    fn on_ranks<T: Send + 'static>(
        world: usize,
        f: impl Fn(DataParallel) -> Result<T> + Send + Sync + 'static,
    ) -> Vec<Result<T>> {
        let f = Arc::new(f);
        let (tx, rx) = mpsc::channel();
        for (i, rank) in DataParallel::in_process(world).into_iter().enumerate() {
            let (tx, f) = (tx.clone(), f.clone());
            std::thread::spawn(move || {
                let _ = tx.send((i, f(DataParallel::from(rank))));
            });
        }
        let mut out: Vec<Option<Result<T>>> = (0..world).map(|_| None).collect();
        for _ in 0..world {
            let (i, r) = rx.recv_timeout(Duration::from_secs(20)).expect("a rank still waits after 20 s");
            out[i] = Some(r);
        }
        out.into_iter().map(|r| r.expect("every rank answers")).collect()
    }

    #[test]
    fn in_process_ranks_sum_and_average() {
        let results = on_ranks(3, |dp| {
            let mut total = 0.0;
            // Several rounds: slots are not overwritten before every rank has read them.
            for round in 0..5 {
                total += dp.sum_scalar((dp.rank + 1) as f64 * 10f64.powi(round), &Device::Cpu)?;
            }
            let mut grads = HashMap::from([("w".to_owned(), Tensor::new(&[dp.rank as f32, 1.0], &Device::Cpu)?)]);
            dp.all_reduce_mean(&mut grads)?;
            Ok((total, grads["w"].to_vec1::<f32>()?))
        });
        for r in results {
            let (total, mean) = r.expect("no rank fails");
            assert_eq!(total, 6.0 * 11111.0);
            assert_eq!(mean, [1.0, 1.0]);
        }
    }

    /// A rank that fails before an all-reduce (its thread returns, dropping its group)
    /// makes the others' all-reduce an error naming it, not a wait forever.
    #[test]
    fn a_rank_that_leaves_fails_the_others_all_reduce() {
        let results = on_ranks(3, |dp| {
            if dp.rank == 1 {
                return Err(CoreError::Param { name: "batch".into(), message: "rank 1 failed".into() });
            }
            dp.sum_scalar(1.0, &Device::Cpu)
        });
        for (rank, r) in results.iter().enumerate() {
            let e = r.as_ref().expect_err("no rank completes the all-reduce").to_string();
            let want = if rank == 1 { "rank 1 failed" } else { "rank 1 left" };
            assert!(e.contains(want), "rank {rank}: {e}");
        }
    }
}
