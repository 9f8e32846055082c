//! The one `bindgen!` site: Rust bindings for the five worlds of `wit/`, and the host side of
//! the `host` interface. Generated types do not leave this crate; `instance.rs` converts them.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;

use wasmtime::StoreLimits;
use wasmtime::component::ResourceTable;
use wasmtime_wasi::p2::pipe::MemoryOutputPipe;
use wasmtime_wasi::{WasiCtx, WasiCtxView, WasiView};

pub(crate) mod loss {
    wasmtime::component::bindgen!({ path: "../../wit", world: "loss" });
}
pub(crate) mod metric {
    wasmtime::component::bindgen!({
        path: "../../wit",
        world: "metric",
        with: { "tuneforge:plugin/host": super::loss::tuneforge::plugin::host,
                "tuneforge:plugin/types": super::loss::tuneforge::plugin::types },
    });
}
pub(crate) mod augment {
    wasmtime::component::bindgen!({
        path: "../../wit",
        world: "augment",
        with: { "tuneforge:plugin/host": super::loss::tuneforge::plugin::host,
                "tuneforge:plugin/types": super::loss::tuneforge::plugin::types },
    });
}
pub(crate) mod cleaner {
    wasmtime::component::bindgen!({
        path: "../../wit",
        world: "cleaner",
        with: { "tuneforge:plugin/host": super::loss::tuneforge::plugin::host,
                "tuneforge:plugin/types": super::loss::tuneforge::plugin::types },
    });
}
pub(crate) mod features {
    wasmtime::component::bindgen!({
        path: "../../wit",
        world: "features",
        with: { "tuneforge:plugin/host": super::loss::tuneforge::plugin::host,
                "tuneforge:plugin/types": super::loss::tuneforge::plugin::types },
    });
}

pub(crate) use loss::tuneforge::plugin::host as host_api;
pub(crate) use loss::tuneforge::plugin::types as types_api;

/// Most log lines one instance may write, and the longest line kept.
const MAX_LOG_LINES: u32 = 1_000;
const MAX_LOG_LINE: usize = 4_096;

/// A file granted to a plugin under an asset name.
#[derive(Debug, Clone)]
pub(crate) struct Grant {
    pub path: PathBuf,
    pub max_bytes: u64,
}

/// What one store holds: the (empty) WASI context, the plugin's configuration and grants.
pub(crate) struct HostState {
    pub wasi: WasiCtx,
    pub table: ResourceTable,
    pub limits: StoreLimits,
    pub plugin: String,
    pub config: Vec<(String, String)>,
    pub labels: Vec<String>,
    pub declared: BTreeSet<String>,
    pub grants: BTreeMap<String, Grant>,
    pub log_lines: u32,
    pub stderr: MemoryOutputPipe,
}

impl WasiView for HostState {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView { ctx: &mut self.wasi, table: &mut self.table }
    }
}

impl types_api::Host for HostState {}

impl host_api::Host for HostState {
    fn log(&mut self, level: host_api::LogLevel, message: String) {
        self.log_lines += 1;
        if self.log_lines > MAX_LOG_LINES {
            if self.log_lines == MAX_LOG_LINES + 1 {
                tracing::warn!(plugin = %self.plugin, "log limit of {MAX_LOG_LINES} lines reached; dropping the rest");
            }
            return;
        }
        let mut line = message;
        if line.len() > MAX_LOG_LINE {
            let mut cut = MAX_LOG_LINE;
            while !line.is_char_boundary(cut) {
                cut -= 1;
            }
            line.truncate(cut);
            line.push('…');
        }
        let plugin = &self.plugin;
        match level {
            host_api::LogLevel::Debug => tracing::debug!(plugin = %plugin, "{line}"),
            host_api::LogLevel::Info => tracing::info!(plugin = %plugin, "{line}"),
            host_api::LogLevel::Warn => tracing::warn!(plugin = %plugin, "{line}"),
            host_api::LogLevel::Error => tracing::error!(plugin = %plugin, "{line}"),
        }
    }

    fn config(&mut self) -> Vec<(String, String)> {
        self.config.clone()
    }

    fn label_names(&mut self) -> Vec<String> {
        self.labels.clone()
    }

    fn asset(&mut self, name: String) -> Result<Vec<u8>, String> {
        if !self.declared.contains(&name) {
            tracing::warn!(plugin = %self.plugin, asset = %name, "refused an undeclared asset");
            return Err(format!("asset `{name}` is not declared in the plugin's manifest"));
        }
        let Some(grant) = self.grants.get(&name) else {
            return Err(format!(
                "asset `{name}` is declared but the experiment grants no file for it (add it under [plugins.assets])"
            ));
        };
        let meta = std::fs::metadata(&grant.path).map_err(|e| format!("asset `{name}`: {e}"))?;
        if meta.len() > grant.max_bytes {
            return Err(format!(
                "asset `{name}` is {} bytes, more than the {} the manifest allows",
                meta.len(),
                grant.max_bytes
            ));
        }
        let bytes = std::fs::read(&grant.path).map_err(|e| format!("asset `{name}`: {e}"))?;
        tracing::debug!(plugin = %self.plugin, asset = %name, bytes = bytes.len(), "read a granted asset");
        Ok(bytes)
    }
}
