//! Runs [`Call`]s on the CPU through `cuda/emulate.h` (feature `emulate`, for tests): the
//! driver `cuda/emulate_main.cpp` is built once per process with the system's C++ compiler
//! (`CXX`, else `c++`), buffers go through files.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

pub use half::bf16;

use super::{Arg, Call};

/// The emulator binary, built once for these sources (cached in the temporary directory
/// under a hash of them, so test processes share it). Panics when it cannot be built: the
/// tests need a C++20 compiler, which the Rust toolchain's linker already is.
fn binary() -> &'static PathBuf {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        use std::hash::{Hash, Hasher};
        let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("cuda");
        let mut hash = std::collections::hash_map::DefaultHasher::new();
        for file in ["kernels.cu", "emulate.h", "emulate_main.cpp"] {
            std::fs::read(src.join(file)).expect("the kernel sources").hash(&mut hash);
        }
        let dir = std::env::temp_dir().join(format!("tuneforge-emulate-{:016x}", hash.finish()));
        let bin = dir.join("emulate");
        if bin.exists() {
            return bin;
        }
        std::fs::create_dir_all(&dir).expect("temporary directory");
        let partial = dir.join(format!("emulate.{}", std::process::id()));
        let cxx = std::env::var("CXX").unwrap_or_else(|_| "c++".into());
        let out = std::process::Command::new(&cxx)
            .args(["-std=c++20", "-O1", "-pthread", "-x", "c++"])
            .arg(src.join("emulate_main.cpp"))
            .arg("-o")
            .arg(&partial)
            .output()
            .unwrap_or_else(|e| panic!("running the C++ compiler `{cxx}`: {e}"));
        assert!(out.status.success(), "building the kernel emulator:\n{}", String::from_utf8_lossy(&out.stderr));
        std::fs::rename(&partial, &bin).expect("placing the kernel emulator");
        bin
    })
}

/// A storage type the emulated kernels take.
pub trait Elem: Copy {
    const NAME: &'static str;
    fn to_bytes(v: &[Self]) -> Vec<u8>;
    fn from_bytes(b: &[u8]) -> Vec<Self>;
}

macro_rules! elem {
    ($t:ty, $name:literal, $n:literal) => {
        impl Elem for $t {
            const NAME: &'static str = $name;
            fn to_bytes(v: &[Self]) -> Vec<u8> {
                v.iter().flat_map(|x| x.to_le_bytes()).collect()
            }
            fn from_bytes(b: &[u8]) -> Vec<Self> {
                b.chunks_exact($n).map(|c| <$t>::from_le_bytes(c.try_into().unwrap_or([0; $n]))).collect()
            }
        }
    };
}
elem!(u32, "u32", 4);
elem!(f32, "f32", 4);
elem!(f64, "f64", 8);
elem!(half::bf16, "bf16", 2);

/// Runs `call` on `inputs` (all of one type); returns the output, as long as `inputs[0]`.
pub fn run<T: Elem>(call: &Call, inputs: &[&[T]]) -> Vec<T> {
    let out = vec![0xffu8; T::to_bytes(inputs[0]).len()];
    T::from_bytes(&run_bytes(call, T::NAME, out, inputs.iter().map(|x| T::to_bytes(x)).collect()))
}

/// Runs `call` with `dst` as its output, updated in place; the inputs are of one type `I`,
/// which may differ from `dst`'s (`call.named_by` says which names the kernel).
pub fn run_in_place<D: Elem, I: Elem>(call: &Call, dst: &mut [D], inputs: &[&[I]]) {
    let name = match call.named_by {
        Arg::Out => D::NAME,
        _ => I::NAME,
    };
    let out = run_bytes(call, name, D::to_bytes(dst), inputs.iter().map(|x| I::to_bytes(x)).collect());
    dst.copy_from_slice(&D::from_bytes(&out));
}

/// Runs `<call.kernel>_<dtype>` on buffers (little-endian bytes, [`Elem::to_bytes`]): `out`
/// (its initial contents; returned as the kernel left it) and the inputs, of any types.
pub fn run_bytes(call: &Call, dtype: &str, out: Vec<u8>, inputs: Vec<Vec<u8>>) -> Vec<u8> {
    static RUNS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let run = RUNS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let dir = binary().with_extension(format!("run-{}-{run}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("run directory");
    let out_index = inputs.len();
    for (i, x) in inputs.iter().enumerate() {
        std::fs::write(dir.join(format!("{i}.bin")), x).expect("input buffer");
    }
    std::fs::write(dir.join(format!("{out_index}.bin")), out).expect("output");
    let args: Vec<String> = call
        .args
        .iter()
        .map(|a| match a {
            Arg::In(i) => format!("in:{i}"),
            Arg::Out => format!("out:{out_index}"),
            Arg::Null => "null".into(),
            Arg::I32(v) => format!("i32:{v}"),
            Arg::I64(v) => format!("i64:{v}"),
            Arg::U64(v) => format!("u64:{v}"),
            Arg::F64(v) => format!("f64:{v:e}"),
        })
        .collect();
    let status = std::process::Command::new(binary())
        .arg(format!("{}_{dtype}", call.kernel))
        .args([call.grid.to_string(), call.block.0.to_string(), call.block.1.to_string()])
        .arg(&dir)
        .args(&args)
        .output()
        .expect("running the kernel emulator");
    assert!(status.status.success(), "{}: {}", call.kernel, String::from_utf8_lossy(&status.stderr));
    let out = std::fs::read(dir.join(format!("{out_index}.bin"))).expect("output buffer");
    let _ = std::fs::remove_dir_all(&dir);
    out
}
