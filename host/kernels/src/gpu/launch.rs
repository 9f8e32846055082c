//! Launches a [`Call`] on candle's CUDA storages (feature `cuda`). The PTX is `build.rs`'s,
//! loaded once per device as the module `tuneforge`.

#![allow(unsafe_code)]

use candle_core::cuda_backend::cudarc::driver::{CudaSlice, CudaView, DeviceRepr, LaunchConfig, PushKernelArg};
use candle_core::cuda_backend::{CudaDType, CudaStorageSlice as S, WrapErr, kernel_name};
use candle_core::{CudaDevice, CudaStorage, Layout, Shape, WithDType};

use super::{Arg, Call};

const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/kernels.ptx"));

/// Runs `call` on `inputs` (contiguous, all of one float type) and returns its output, of
/// the first input's shape.
pub fn run(call: &Call, inputs: &[(&CudaStorage, &Layout)]) -> candle_core::Result<(CudaStorage, Shape)> {
    let Some(&(first, layout)) = inputs.first() else { candle_core::bail!("{}: no inputs", call.kernel) };
    let dev = first.device.clone();
    let slice = match &first.slice {
        S::F32(_) => S::F32(launch::<f32>(&dev, call, inputs)?),
        S::F64(_) => S::F64(launch::<f64>(&dev, call, inputs)?),
        S::F16(_) => S::F16(launch::<half::f16>(&dev, call, inputs)?),
        S::BF16(_) => S::BF16(launch::<half::bf16>(&dev, call, inputs)?),
        _ => candle_core::bail!("{}: only f32, f64, f16 and bf16 tensors", call.kernel),
    };
    Ok((CudaStorage { slice, device: dev }, layout.shape().clone()))
}

fn launch<T: DeviceRepr + WithDType + CudaDType>(
    dev: &CudaDevice,
    call: &Call,
    inputs: &[(&CudaStorage, &Layout)],
) -> candle_core::Result<CudaSlice<T>> {
    let views = inputs
        .iter()
        .map(|(s, l)| -> candle_core::Result<CudaView<'_, T>> {
            match l.contiguous_offsets() {
                Some((a, b)) => Ok(s.as_cuda_slice::<T>()?.slice(a..b)),
                None => candle_core::bail!("{}: inputs must be contiguous", call.kernel),
            }
        })
        .collect::<candle_core::Result<Vec<_>>>()?;
    let n = views.first().map_or(0, |v| v.len());
    // SAFETY: every kernel writes each element of its output before the buffer is read.
    // (CUDA refuses empty allocations: an empty tensor gets one element it never reads.)
    let mut out = unsafe { dev.alloc::<T>(n.max(1))? };
    if n == 0 {
        return Ok(out);
    }
    let func = dev.get_or_load_custom_func(&kernel_name::<T>(call.kernel), "tuneforge", PTX)?;
    // The builder keeps references to its arguments: the scalars live here until the launch.
    let scalars: Vec<Scalar> = call.args.iter().filter_map(Scalar::of).collect();
    let null = 0u64;
    let mut builder = func.builder();
    let (mut out_arg, mut next) = (Some(&mut out), scalars.iter());
    for arg in &call.args {
        match arg {
            Arg::In(i) => match views.get(*i) {
                Some(v) => builder.arg(v),
                None => candle_core::bail!("{}: input {i} missing", call.kernel),
            },
            Arg::Out => match out_arg.take() {
                Some(o) => builder.arg(o),
                None => candle_core::bail!("{}: one output only", call.kernel),
            },
            Arg::Null => builder.arg(&null),
            _ => match next.next() {
                Some(Scalar::I32(v)) => builder.arg(v),
                Some(Scalar::I64(v)) => builder.arg(v),
                Some(Scalar::U64(v)) => builder.arg(v),
                Some(Scalar::F64(v)) => builder.arg(v),
                None => candle_core::bail!("{}: scalar arguments out of step", call.kernel),
            },
        };
    }
    let cfg =
        LaunchConfig { grid_dim: (call.grid, 1, 1), block_dim: (call.block.0, call.block.1, 1), shared_mem_bytes: 0 };
    // SAFETY: the argument list matches the kernel's parameters (`Call`'s constructors, the
    // same lists the emulated tests run), every pointer covers what the kernel indexes.
    unsafe { builder.launch(cfg) }.w()?;
    drop(builder);
    Ok(out)
}

enum Scalar {
    I32(i32),
    I64(i64),
    U64(u64),
    F64(f64),
}

impl Scalar {
    fn of(arg: &Arg) -> Option<Self> {
        match *arg {
            Arg::I32(v) => Some(Self::I32(v)),
            Arg::I64(v) => Some(Self::I64(v)),
            Arg::U64(v) => Some(Self::U64(v)),
            Arg::F64(v) => Some(Self::F64(v)),
            Arg::In(_) | Arg::Out | Arg::Null => None,
        }
    }
}
