//! Named parameters: a builder that model code asks for tensors by name (as with candle's
//! `VarBuilder`), and the store it leaves behind.
//!
//! A parameter comes from loaded weights when they hold its name, or is initialised from the
//! builder's seeded generator (so tiny random models are reproducible). Whether it is
//! trainable is decided by a predicate on its full name: trainable ones are candle `Var`s
//! (gradients flow to them), frozen ones are plain tensors (no gradient is even computed).

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, MutexGuard};

use candle_core::{DType, Device, Tensor, Var};
use rand::{Rng, SeedableRng, rngs::StdRng};
use rand_distr_lite::normal;

use tuneforge_kernels::Int8Matrix;

use crate::{CoreError, Result};

/// How a parameter that is not in the loaded weights starts.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Init {
    Zeros,
    Ones,
    /// Normal with mean 0 and this standard deviation.
    Normal(f64),
    /// Uniform on `[-bound, bound]`.
    Uniform(f64),
}

type TrainablePredicate = Box<dyn Fn(&str) -> bool + Send + Sync>;

struct BuilderState {
    loaded: HashMap<String, Tensor>,
    /// When true, every parameter except those asked for with [`ParamBuilder::get_new`] must
    /// be in `loaded`.
    require_loaded: bool,
    /// When true, even parameters asked for with [`ParamBuilder::get_new`] must be loaded.
    strict: bool,
    params: BTreeMap<String, Param>,
    /// int8 matrices of a quantized model, by the name of the weight they stand for.
    int8: HashMap<String, Arc<Int8Matrix>>,
    rng: StdRng,
    trainable: TrainablePredicate,
}

/// A parameter: its current value and, when trainable, the `Var` behind it.
#[derive(Clone)]
pub struct Param {
    pub tensor: Tensor,
    pub var: Option<Var>,
}

/// Hands out parameters by dotted name; `pp` descends one level.
#[derive(Clone)]
pub struct ParamBuilder {
    state: Arc<Mutex<BuilderState>>,
    prefix: String,
    dtype: DType,
    device: Device,
}

impl std::fmt::Debug for ParamBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ParamBuilder").field("prefix", &self.prefix).field("dtype", &self.dtype).finish()
    }
}

impl ParamBuilder {
    /// A builder that initialises every parameter from `seed`.
    pub fn random(seed: u64, dtype: DType, device: &Device) -> Self {
        Self::with_loaded(HashMap::new(), false, seed, dtype, device)
    }

    /// A builder over loaded weights; with `require_loaded`, a missing name is an error.
    pub fn with_loaded(
        loaded: HashMap<String, Tensor>,
        require_loaded: bool,
        seed: u64,
        dtype: DType,
        device: &Device,
    ) -> Self {
        let state = BuilderState {
            loaded,
            require_loaded,
            strict: false,
            params: BTreeMap::new(),
            int8: HashMap::new(),
            rng: StdRng::seed_from_u64(seed),
            trainable: Box::new(|_| true),
        };
        Self { state: Arc::new(Mutex::new(state)), prefix: String::new(), dtype, device: device.clone() }
    }

    /// Sets which full parameter names are trainable (default: all).
    pub fn set_trainable(&self, predicate: impl Fn(&str) -> bool + Send + Sync + 'static) {
        self.lock().trainable = Box::new(predicate);
    }

    /// Requires every parameter, new ones included, to be in the loaded weights (for loading
    /// a saved model, where a missing tensor means a damaged or mismatched file).
    pub fn set_strict(&self) {
        let mut state = self.lock();
        state.strict = true;
        state.require_loaded = true;
    }

    /// Hands int8 matrices (a quantized model's weights) to the layers that ask for them.
    pub fn set_int8(&self, matrices: HashMap<String, Arc<Int8Matrix>>) {
        self.lock().int8 = matrices;
    }

    /// The int8 matrix standing for parameter `name`, if the model is quantized there;
    /// its shape must be `shape`.
    pub fn get_int8(&self, name: &str, shape: &[usize]) -> Result<Option<Arc<Int8Matrix>>> {
        let full = self.full_name(name);
        let state = self.lock();
        let Some(m) = state.int8.get(&full) else { return Ok(None) };
        if [m.rows(), m.cols()] != shape {
            return Err(CoreError::Param {
                name: full,
                message: format!(
                    "has shape [{}, {}] in the weights file, the model expects {shape:?}",
                    m.rows(),
                    m.cols()
                ),
            });
        }
        Ok(Some(m.clone()))
    }

    pub fn pp(&self, name: impl std::fmt::Display) -> Self {
        let prefix = if self.prefix.is_empty() { name.to_string() } else { format!("{}.{name}", self.prefix) };
        Self { prefix, ..self.clone() }
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// A parameter that pretrained weights must provide (when loading them).
    pub fn get(&self, shape: &[usize], name: &str, init: Init) -> Result<Tensor> {
        self.get_inner(shape, name, init, false)
    }

    /// A parameter that pretrained weights usually lack (a new head): initialised when absent.
    pub fn get_new(&self, shape: &[usize], name: &str, init: Init) -> Result<Tensor> {
        self.get_inner(shape, name, init, true)
    }

    fn full_name(&self, name: &str) -> String {
        if self.prefix.is_empty() { name.to_owned() } else { format!("{}.{name}", self.prefix) }
    }

    fn get_inner(&self, shape: &[usize], name: &str, init: Init, is_new: bool) -> Result<Tensor> {
        let full = self.full_name(name);
        let mut state = self.lock();
        if let Some(p) = state.params.get(&full) {
            return Ok(p.tensor.clone());
        }
        let value = match state.loaded.get(&full) {
            Some(t) => {
                if t.dims() != shape {
                    return Err(CoreError::Param {
                        name: full,
                        message: format!("has shape {:?} in the weights file, the model expects {shape:?}", t.dims()),
                    });
                }
                t.to_dtype(self.dtype)?.to_device(&self.device)?
            }
            None if state.require_loaded && (!is_new || state.strict) => {
                return Err(CoreError::Param { name: full, message: "is missing from the weights file".into() });
            }
            None => init_tensor(&mut state.rng, shape, init, self.dtype, &self.device)?,
        };
        let param = if (state.trainable)(&full) {
            let var = Var::from_tensor(&value)?;
            Param { tensor: var.as_tensor().clone(), var: Some(var) }
        } else {
            Param { tensor: value.detach(), var: None }
        };
        let tensor = param.tensor.clone();
        state.params.insert(full, param);
        Ok(tensor)
    }

    /// Ends building: the parameters that were asked for, and the names of loaded tensors
    /// that no layer used.
    pub fn finish(self) -> (ParamStore, Vec<String>) {
        let state = self.lock();
        let mut unused: Vec<String> = state.loaded.keys().filter(|k| !state.params.contains_key(*k)).cloned().collect();
        unused.sort();
        (ParamStore { params: state.params.clone() }, unused)
    }

    fn lock(&self) -> MutexGuard<'_, BuilderState> {
        // A poisoned lock only means another thread panicked while building; the map is
        // still consistent because every insert is a single call.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

fn init_tensor(rng: &mut StdRng, shape: &[usize], init: Init, dtype: DType, device: &Device) -> Result<Tensor> {
    let n: usize = shape.iter().product();
    let t = match init {
        Init::Zeros => Tensor::zeros(shape, dtype, device)?,
        Init::Ones => Tensor::ones(shape, dtype, device)?,
        Init::Normal(std) => {
            let values: Vec<f64> = (0..n).map(|_| normal(rng) * std).collect();
            Tensor::from_vec(values, shape, device)?.to_dtype(dtype)?
        }
        Init::Uniform(bound) => {
            let values: Vec<f64> = (0..n).map(|_| (rng.random::<f64>() * 2.0 - 1.0) * bound).collect();
            Tensor::from_vec(values, shape, device)?.to_dtype(dtype)?
        }
    };
    Ok(t)
}

/// The parameters of a built model, by full name.
#[derive(Clone, Default)]
pub struct ParamStore {
    params: BTreeMap<String, Param>,
}

impl std::fmt::Debug for ParamStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ParamStore")
            .field("n_params", &self.n_params())
            .field("n_trainable", &self.n_trainable())
            .finish()
    }
}

impl ParamStore {
    /// Trainable parameters in name order.
    pub fn trainable(&self) -> Vec<(String, Var)> {
        self.params.iter().filter_map(|(n, p)| p.var.clone().map(|v| (n.clone(), v))).collect()
    }

    /// Every parameter's current value in name order.
    pub fn tensors(&self) -> Vec<(String, Tensor)> {
        self.params.iter().map(|(n, p)| (n.clone(), p.tensor.clone())).collect()
    }

    pub fn get(&self, name: &str) -> Option<&Param> {
        self.params.get(name)
    }

    pub fn n_params(&self) -> usize {
        self.params.values().map(|p| p.tensor.elem_count()).sum()
    }

    pub fn n_trainable(&self) -> usize {
        self.params.values().filter(|p| p.var.is_some()).map(|p| p.tensor.elem_count()).sum()
    }

    /// Trainable parameters over all parameters.
    pub fn trainable_ratio(&self) -> f64 {
        let total = self.n_params();
        if total == 0 { 0.0 } else { self.n_trainable() as f64 / total as f64 }
    }

    /// Overwrites trainable parameters with `values` (e.g. from a checkpoint). Every trainable
    /// parameter must be present with its shape.
    pub fn load_trainable(&self, values: &HashMap<String, Tensor>) -> Result<()> {
        for (name, var) in self.trainable() {
            let v = values.get(&name).ok_or_else(|| CoreError::Param {
                name: name.clone(),
                message: "is missing from the checkpoint".into(),
            })?;
            if v.dims() != var.dims() {
                return Err(CoreError::Param {
                    name,
                    message: format!("has shape {:?} in the checkpoint, the model has {:?}", v.dims(), var.dims()),
                });
            }
            var.set(&v.to_dtype(var.dtype())?)?;
        }
        Ok(())
    }
}

/// A standard normal sample by Box–Muller, so that initialisation depends only on the seed.
mod rand_distr_lite {
    use rand::Rng;

    pub(super) fn normal(rng: &mut impl Rng) -> f64 {
        let u1: f64 = rng.random::<f64>().max(f64::MIN_POSITIVE);
        let u2: f64 = rng.random::<f64>();
        (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_seed_same_parameters_and_trainable_split() -> Result<()> {
        let build = |seed| -> Result<ParamStore> {
            let pb = ParamBuilder::random(seed, DType::F32, &Device::Cpu);
            pb.set_trainable(|n| n.starts_with("head"));
            pb.pp("body").get(&[4, 3], "weight", Init::Normal(0.02))?;
            pb.pp("head").get(&[2], "bias", Init::Zeros)?;
            Ok(pb.finish().0)
        };
        let a = build(1)?;
        let b = build(1)?;
        let c = build(2)?;
        let w = |s: &ParamStore| s.get("body.weight").map(|p| p.tensor.to_vec2::<f32>());
        assert_eq!(w(&a).transpose()?, w(&b).transpose()?);
        assert_ne!(w(&a).transpose()?, w(&c).transpose()?);
        assert_eq!((a.n_params(), a.n_trainable()), (14, 2));
        assert_eq!(a.trainable().len(), 1);
        Ok(())
    }

    #[test]
    fn loaded_weights_are_checked_by_name_and_shape() {
        let mut loaded = HashMap::new();
        loaded.insert("a".to_owned(), Tensor::zeros(&[2, 2], DType::F32, &Device::Cpu).expect("t"));
        let pb = ParamBuilder::with_loaded(loaded, true, 0, DType::F32, &Device::Cpu);
        let e = pb.get(&[3, 2], "a", Init::Zeros).expect_err("shape");
        assert_eq!(e.to_string(), "tensor `a`: has shape [2, 2] in the weights file, the model expects [3, 2]");
        let e = pb.get(&[2], "b", Init::Zeros).expect_err("missing");
        assert_eq!(e.to_string(), "tensor `b`: is missing from the weights file");
        assert!(pb.get_new(&[2], "head", Init::Zeros).is_ok());
    }
}
