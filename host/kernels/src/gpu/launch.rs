//! Launches a [`Call`] on candle's CUDA storages (feature `cuda`). The PTX is `build.rs`'s,
//! loaded once per device as the module `tuneforge`.

#![allow(unsafe_code)]

use std::ops::Range;

use candle_core::cuda_backend::cudarc::driver::{CudaView, CudaViewMut, LaunchArgs, LaunchConfig, PushKernelArg};
use candle_core::cuda_backend::{CudaStorageSlice as S, WrapErr};
use candle_core::{CudaDevice, CudaStorage, Layout, Shape};
use half::{bf16, f16};

use super::{Arg, Call};

const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/kernels.ptx"));

/// Runs `call` on `inputs` (contiguous) and returns its output: a new buffer of the first
/// input's shape and type.
pub fn run(call: &Call, inputs: &[(&CudaStorage, &Layout)]) -> candle_core::Result<(CudaStorage, Shape)> {
    let Some(&(_, layout)) = inputs.first() else { candle_core::bail!("{}: no inputs", call.kernel) };
    run_to(call, inputs, layout.shape())
}

/// [`run`] with an output of shape `shape` (the first input's type).
pub fn run_to(
    call: &Call,
    inputs: &[(&CudaStorage, &Layout)],
    shape: &Shape,
) -> candle_core::Result<(CudaStorage, Shape)> {
    let Some(&(first, _)) = inputs.first() else { candle_core::bail!("{}: no inputs", call.kernel) };
    let dev = first.device.clone();
    let n = shape.elem_count();
    // SAFETY: every kernel writes each element of its output before the buffer is read.
    // (CUDA refuses empty allocations: an empty tensor gets one element it never reads.)
    let mut slice = unsafe {
        match &first.slice {
            S::F32(_) => S::F32(dev.alloc::<f32>(n.max(1))?),
            S::F64(_) => S::F64(dev.alloc::<f64>(n.max(1))?),
            S::F16(_) => S::F16(dev.alloc::<f16>(n.max(1))?),
            S::BF16(_) => S::BF16(dev.alloc::<bf16>(n.max(1))?),
            _ => candle_core::bail!("{}: only f32, f64, f16 and bf16 tensors", call.kernel),
        }
    };
    if n > 0 {
        launch(&dev, call, inputs, &mut slice, 0..n)?;
    }
    Ok((CudaStorage { slice, device: dev }, shape.clone()))
}

/// Runs `call` with `dst` (contiguous, its elements in `dst_layout`) as the output, updated in
/// place; the inputs may be of other float types than `dst` (the call says which names the
/// kernel).
pub fn run_in_place(
    call: &Call,
    dst: &mut CudaStorage,
    dst_layout: &Layout,
    inputs: &[(&CudaStorage, &Layout)],
) -> candle_core::Result<()> {
    let Some((a, b)) = dst_layout.contiguous_offsets() else {
        candle_core::bail!("{}: the destination must be contiguous", call.kernel)
    };
    if a == b {
        return Ok(());
    }
    let dev = dst.device.clone();
    launch(&dev, call, inputs, &mut dst.slice, a..b)
}

/// A kernel operand: a typed device pointer (u32 for indices).
enum View<'a> {
    U32(CudaView<'a, u32>),
    F32(CudaView<'a, f32>),
    F64(CudaView<'a, f64>),
    F16(CudaView<'a, f16>),
    BF16(CudaView<'a, bf16>),
}

enum ViewMut<'a> {
    F32(CudaViewMut<'a, f32>),
    F64(CudaViewMut<'a, f64>),
    F16(CudaViewMut<'a, f16>),
    BF16(CudaViewMut<'a, bf16>),
}

/// The suffix of a kernel's entry point for a storage of this type.
fn dtype_name(s: &S) -> Option<&'static str> {
    match s {
        S::F32(_) => Some("f32"),
        S::F64(_) => Some("f64"),
        S::F16(_) => Some("f16"),
        S::BF16(_) => Some("bf16"),
        _ => None,
    }
}

fn view<'a>(kernel: &str, s: &'a CudaStorage, l: &Layout) -> candle_core::Result<View<'a>> {
    let Some((a, b)) = l.contiguous_offsets() else { candle_core::bail!("{kernel}: inputs must be contiguous") };
    Ok(match &s.slice {
        S::U32(x) => View::U32(x.slice(a..b)),
        S::F32(x) => View::F32(x.slice(a..b)),
        S::F64(x) => View::F64(x.slice(a..b)),
        S::F16(x) => View::F16(x.slice(a..b)),
        S::BF16(x) => View::BF16(x.slice(a..b)),
        _ => candle_core::bail!("{kernel}: only u32, f32, f64, f16 and bf16 inputs"),
    })
}

fn view_mut<'a>(kernel: &str, s: &'a mut S, range: Range<usize>) -> candle_core::Result<ViewMut<'a>> {
    Ok(match s {
        S::F32(x) => ViewMut::F32(x.slice_mut(range)),
        S::F64(x) => ViewMut::F64(x.slice_mut(range)),
        S::F16(x) => ViewMut::F16(x.slice_mut(range)),
        S::BF16(x) => ViewMut::BF16(x.slice_mut(range)),
        _ => candle_core::bail!("{kernel}: only f32, f64, f16 and bf16 tensors"),
    })
}

fn push<'a, 'b: 'a, 'c: 'b>(builder: &mut LaunchArgs<'a>, v: &'b View<'c>) {
    match v {
        View::U32(x) => builder.arg(x),
        View::F32(x) => builder.arg(x),
        View::F64(x) => builder.arg(x),
        View::F16(x) => builder.arg(x),
        View::BF16(x) => builder.arg(x),
    };
}

fn push_mut<'a, 'b: 'a, 'c: 'b>(builder: &mut LaunchArgs<'a>, v: &'b mut ViewMut<'c>) {
    match v {
        ViewMut::F32(x) => builder.arg(x),
        ViewMut::F64(x) => builder.arg(x),
        ViewMut::F16(x) => builder.arg(x),
        ViewMut::BF16(x) => builder.arg(x),
    };
}

/// Launches `call` with `out[range]` as its output.
fn launch(
    dev: &CudaDevice,
    call: &Call,
    inputs: &[(&CudaStorage, &Layout)],
    out: &mut S,
    range: Range<usize>,
) -> candle_core::Result<()> {
    let kernel = call.kernel;
    let dtype = match call.named_by {
        Arg::In(i) => inputs.get(i).and_then(|(s, _)| dtype_name(&s.slice)),
        Arg::Out => dtype_name(out),
        _ => None,
    };
    let Some(dtype) = dtype else { candle_core::bail!("{kernel}: no float operand names the kernel") };
    let views = inputs.iter().map(|(s, l)| view(kernel, s, l)).collect::<candle_core::Result<Vec<_>>>()?;
    let mut out_view = view_mut(kernel, out, range)?;
    let func = dev.get_or_load_custom_func(&format!("{kernel}_{dtype}"), "tuneforge", PTX)?;
    // The builder keeps references to its arguments: the scalars live here until the launch.
    let scalars: Vec<Scalar> = call.args.iter().filter_map(Scalar::of).collect();
    let null = 0u64;
    let mut builder = func.builder();
    let (mut out_arg, mut next) = (Some(&mut out_view), scalars.iter());
    for arg in &call.args {
        match arg {
            Arg::In(i) => match views.get(*i) {
                Some(v) => push(&mut builder, v),
                None => candle_core::bail!("{kernel}: input {i} missing"),
            },
            Arg::Out => match out_arg.take() {
                Some(o) => push_mut(&mut builder, o),
                None => candle_core::bail!("{kernel}: one output only"),
            },
            Arg::Null => {
                builder.arg(&null);
            }
            _ => {
                match next.next() {
                    Some(Scalar::I32(v)) => builder.arg(v),
                    Some(Scalar::I64(v)) => builder.arg(v),
                    Some(Scalar::U64(v)) => builder.arg(v),
                    Some(Scalar::F64(v)) => builder.arg(v),
                    None => candle_core::bail!("{kernel}: scalar arguments out of step"),
                };
            }
        }
    }
    let cfg =
        LaunchConfig { grid_dim: (call.grid, 1, 1), block_dim: (call.block.0, call.block.1, 1), shared_mem_bytes: 0 };
    // SAFETY: the argument list matches the kernel's parameters (`Call`'s constructors, the
    // same lists the emulated tests run), every pointer covers what the kernel indexes.
    unsafe { builder.launch(cfg) }.w()?;
    drop(builder);
    Ok(())
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
