//! Reading and writing safetensors files with errors that name the file.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{Device, Tensor};

use crate::{CoreError, Result};

/// Serialises named tensors (made contiguous) into safetensors bytes.
pub(crate) fn to_safetensors_bytes(tensors: &[(String, Tensor)]) -> Result<Vec<u8>> {
    let contiguous =
        tensors.iter().map(|(n, t)| Ok((n.clone(), t.contiguous()?))).collect::<Result<Vec<(String, Tensor)>>>()?;
    safetensors::tensor::serialize(contiguous.iter().map(|(n, t)| (n.as_str(), t)), None)
        .map_err(|e| CoreError::Candle(candle_core::Error::Msg(e.to_string())))
}

/// Loads every tensor of a safetensors buffer read from `path`.
pub(crate) fn from_safetensors_bytes(bytes: &[u8], path: &Path) -> Result<HashMap<String, Tensor>> {
    candle_core::safetensors::load_buffer(bytes, &Device::Cpu)
        .map_err(|e| CoreError::file(path, format!("not a valid safetensors file: {e}")))
}

/// Reads and loads a safetensors file.
pub(crate) fn load_safetensors(path: &Path) -> Result<HashMap<String, Tensor>> {
    let bytes = std::fs::read(path).map_err(CoreError::io(path))?;
    from_safetensors_bytes(&bytes, path)
}
