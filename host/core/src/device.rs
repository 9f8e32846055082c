//! Where tensors live and in which precision they are computed: `cpu`, `cuda` or `cuda:N`
//! (from `--device` and `[run] device`), opened with an error that says what is missing
//! instead of a panic, and `[train] precision` (`f32`, or `bf16` mixed precision on CUDA).
//!
//! CUDA is a cargo feature (`cuda`, off by default). cudarc panics instead of returning an
//! error in some start-up failures (no usable driver, a broken install), so opening a CUDA
//! device runs under `catch_unwind` and any failure becomes [`CoreError::Device`].

use std::fmt;
use std::str::FromStr;

use candle_core::{DType, Device};
use serde::{Deserialize, Serialize};

use crate::{CoreError, Result};

/// A device as users name it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DeviceSpec {
    #[default]
    Cpu,
    /// A CUDA GPU by ordinal.
    Cuda(usize),
}

impl FromStr for DeviceSpec {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<Self, Self::Err> {
        let s = s.trim();
        match s {
            "cpu" => return Ok(Self::Cpu),
            "cuda" | "gpu" => return Ok(Self::Cuda(0)),
            _ => {}
        }
        if let Some(n) = s.strip_prefix("cuda:") {
            return n
                .parse::<usize>()
                .map(Self::Cuda)
                .map_err(|_| format!("`{s}`: the GPU ordinal after `cuda:` must be a number (cuda:0, cuda:1, …)"));
        }
        Err(format!("`{s}` is not a device: use `cpu`, `cuda` or `cuda:N`"))
    }
}

impl fmt::Display for DeviceSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Cpu => f.write_str("cpu"),
            Self::Cuda(n) => write!(f, "cuda:{n}"),
        }
    }
}

impl Serialize for DeviceSpec {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for DeviceSpec {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// True when this build can use CUDA (the `cuda` feature).
pub const CUDA_BUILT: bool = cfg!(feature = "cuda");

impl DeviceSpec {
    pub fn is_cuda(&self) -> bool {
        matches!(self, Self::Cuda(_))
    }

    /// The candle device, or an error that says why it cannot be used.
    pub fn open(&self) -> Result<Device> {
        match *self {
            Self::Cpu => Ok(Device::Cpu),
            Self::Cuda(n) => open_cuda(n),
        }
    }
}

#[cfg(not(feature = "cuda"))]
fn open_cuda(n: usize) -> Result<Device> {
    Err(CoreError::Device {
        device: format!("cuda:{n}"),
        message: "this tuneforge was built without CUDA; rebuild it with `--features cuda` \
                  (e.g. `cargo build --release -p tuneforge-cli --features cuda`) on a machine with the CUDA toolkit"
            .into(),
    })
}

#[cfg(feature = "cuda")]
fn open_cuda(n: usize) -> Result<Device> {
    let device = format!("cuda:{n}");
    let hint = "check that the NVIDIA driver is installed and the GPU is visible (`nvidia-smi` lists it, \
                CUDA_VISIBLE_DEVICES allows it)";
    // cudarc panics in some start-up failures; silence the default hook's report meanwhile.
    let previous = std::panic::take_hook();
    std::panic::set_hook(Box::new(|_| {}));
    let opened = std::panic::catch_unwind(|| Device::new_cuda(n));
    std::panic::set_hook(previous);
    match opened {
        Ok(Ok(d)) => Ok(d),
        Ok(Err(e)) => {
            // candle's CUDA errors carry a backtrace after the first line; the cause is enough.
            let cause = e.to_string().lines().next().unwrap_or_default().to_owned();
            Err(CoreError::Device { device, message: format!("CUDA could not start: {cause}; {hint}") })
        }
        Err(panic) => {
            let what = panic
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| panic.downcast_ref::<&str>().map(|s| (*s).to_owned()))
                .unwrap_or_else(|| "unknown failure".into());
            Err(CoreError::Device { device, message: format!("CUDA failed to start ({what}); {hint}") })
        }
    }
}

/// Samples the memory in use on a device from a background thread until stopped: on a GPU
/// the device's used memory (total − free, so the caching allocator's pool counts), on the
/// CPU the process's resident set. [`MemoryWatch::stop`] returns the peak bytes in use.
#[derive(Debug)]
pub struct MemoryWatch {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    handle: Option<std::thread::JoinHandle<u64>>,
}

/// Bytes in use now on `device` (see [`MemoryWatch`]).
pub fn memory_in_use(device: &Device) -> Result<u64> {
    match device {
        #[cfg(feature = "cuda")]
        Device::Cuda(d) => {
            let (free, total) = d.cuda_stream().context().mem_get_info().map_err(|e| CoreError::Device {
                device: "cuda".into(),
                message: format!("cannot read the memory in use: {e:?}"),
            })?;
            Ok((total - free) as u64)
        }
        _ => Ok(resident_bytes()),
    }
}

fn resident_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1).and_then(|v| v.parse::<u64>().ok()))
        })
        .map_or(0, |kib| kib * 1024)
}

impl MemoryWatch {
    pub fn start(device: &Device) -> Result<Self> {
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (flag, device) = (stop.clone(), device.clone());
        let handle = std::thread::spawn(move || {
            let mut peak = 0u64;
            while !flag.load(std::sync::atomic::Ordering::Relaxed) {
                peak = peak.max(memory_in_use(&device).unwrap_or(0));
                std::thread::sleep(std::time::Duration::from_micros(500));
            }
            peak.max(memory_in_use(&device).unwrap_or(0))
        });
        Ok(Self { stop, handle: Some(handle) })
    }

    /// Stops watching: the peak bytes in use.
    pub fn stop(mut self) -> u64 {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        self.handle.take().and_then(|h| h.join().ok()).unwrap_or(0)
    }
}

/// The arithmetic precision of training.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    /// Everything in f32.
    #[default]
    F32,
    /// Mixed precision: matrix products and activations in bfloat16, with f32 master
    /// weights, optimizer state, normalisation statistics, softmax and loss (CUDA only).
    Bf16,
}

impl Precision {
    /// The dtype activations are computed in, when it differs from the parameters' f32.
    pub fn compute_dtype(self) -> Option<DType> {
        match self {
            Self::F32 => None,
            Self::Bf16 => Some(DType::BF16),
        }
    }

    /// Refuses bf16 on a CPU (candle's CPU bf16 products are far slower than f32 there).
    pub fn check(self, device: &DeviceSpec) -> std::result::Result<(), String> {
        match (self, device) {
            (Self::Bf16, DeviceSpec::Cpu) => {
                Err("\"bf16\" mixed precision needs a CUDA device (`[run] device = \"cuda\"` or `--device cuda`)"
                    .into())
            }
            _ => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_prints_devices() {
        assert_eq!("cpu".parse::<DeviceSpec>(), Ok(DeviceSpec::Cpu));
        assert_eq!("cuda".parse::<DeviceSpec>(), Ok(DeviceSpec::Cuda(0)));
        assert_eq!(" cuda:3 ".parse::<DeviceSpec>(), Ok(DeviceSpec::Cuda(3)));
        assert_eq!(DeviceSpec::Cuda(2).to_string(), "cuda:2");
        let err = "cuda:x".parse::<DeviceSpec>().expect_err("not a device");
        assert!(err.contains("ordinal"), "{err}");
        let err = "tpu".parse::<DeviceSpec>().expect_err("not a device");
        assert!(err.contains("`tpu` is not a device"), "{err}");
    }

    #[test]
    fn opening_a_gpu_without_cuda_is_an_error_not_a_panic() {
        if CUDA_BUILT {
            return;
        }
        let err = DeviceSpec::Cuda(0).open().expect_err("no CUDA in this build").to_string();
        assert!(err.contains("cuda:0") && err.contains("--features cuda"), "{err}");
        assert!(DeviceSpec::Cpu.open().is_ok());
    }

    #[test]
    fn bf16_needs_cuda() {
        assert!(Precision::Bf16.check(&DeviceSpec::Cpu).expect_err("bf16 on a CPU").contains("CUDA"));
        assert!(Precision::Bf16.check(&DeviceSpec::Cuda(0)).is_ok());
        assert!(Precision::F32.check(&DeviceSpec::Cpu).is_ok());
        assert_eq!(Precision::Bf16.compute_dtype(), Some(DType::BF16));
    }
}
