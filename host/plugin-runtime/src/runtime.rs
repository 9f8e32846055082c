//! The engine, the sandbox and calls under limits.
//!
//! One [`PluginRuntime`] per process: one wasmtime `Engine` (component model, fuel and epoch
//! interruption on), a thread that advances the epoch, one `Linker` with WASI (no preopened
//! directories, no network, no environment, no arguments, stdin closed, stderr captured in a
//! bounded buffer) and the `host` interface, and a cache of compiled components by SHA-256.
//!
//! A [`PluginInstance`] owns one store. Each call gets fresh fuel and a fresh deadline; a trap
//! poisons the instance, which is rebuilt (fresh memory) before the next call.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use wasmtime::component::{Component, HasSelf, Linker};
use wasmtime::{Config, Engine, Store, StoreLimitsBuilder, Trap};
use wasmtime_wasi::WasiCtxBuilder;
use wasmtime_wasi::p2::pipe::MemoryOutputPipe;

use crate::PluginError;
use crate::bindings::{self, Grant, HostState};
use crate::manifest::{InstalledPlugin, Limits, PluginKind};

/// How often the epoch advances: the granularity of time limits.
const EPOCH_TICK: Duration = Duration::from_millis(5);
/// Captured stderr (panic messages) per instance.
const STDERR_CAPACITY: usize = 16 * 1024;

/// The process's plugin engine.
#[derive(Clone)]
pub struct PluginRuntime {
    inner: Arc<Inner>,
}

struct Inner {
    engine: Engine,
    linker: Linker<HostState>,
    components: Mutex<HashMap<String, Component>>,
    stop: Arc<AtomicBool>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

impl std::fmt::Debug for PluginRuntime {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PluginRuntime").finish_non_exhaustive()
    }
}

/// Where compiled components are kept: `compiled-plugins/` in tuneforge's cache directory,
/// unless `TUNEFORGE_PLUGIN_CACHE=off`.
fn default_code_cache_dir() -> Option<PathBuf> {
    if std::env::var("TUNEFORGE_PLUGIN_CACHE").is_ok_and(|v| v == "off") {
        return None;
    }
    std::path::absolute(tuneforge_core::cache_dir().join("compiled-plugins")).ok()
}

/// wasmtime's cache of compiled components in `dir`: a component compiles once, not in
/// every process that loads it. Entries are keyed by the component's bytes and the engine's
/// configuration (fuel, epochs, stack), so a changed plugin or setting compiles again. The
/// directory holds native code that wasmtime loads: it must be as trusted as the tuneforge
/// binary (it is the user's own cache). A cache that cannot be set up is skipped (logged).
fn code_cache(dir: &Path) -> Option<wasmtime::Cache> {
    let mut config = wasmtime::CacheConfig::new();
    config.with_directory(dir);
    match wasmtime::Cache::new(config) {
        Ok(cache) => Some(cache),
        Err(e) => {
            tracing::warn!("plugins compile without a cache: {e:#}");
            None
        }
    }
}

impl PluginRuntime {
    /// A runtime whose compiled components are cached in tuneforge's cache directory.
    pub fn new() -> Result<Self, PluginError> {
        Self::with_code_cache(default_code_cache_dir().as_deref())
    }

    /// A runtime that keeps compiled components in `code_cache_dir` (an absolute path), or
    /// compiles them in every process (`None`).
    pub fn with_code_cache(code_cache_dir: Option<&Path>) -> Result<Self, PluginError> {
        let mut config = Config::new();
        config.wasm_component_model(true);
        config.consume_fuel(true);
        config.epoch_interruption(true);
        config.max_wasm_stack(1 << 20);
        config.cache(code_cache_dir.and_then(code_cache));
        let engine = Engine::new(&config).map_err(|e| PluginError::Engine(format!("{e:#}")))?;
        let mut linker = Linker::<HostState>::new(&engine);
        wasmtime_wasi::p2::add_to_linker_sync(&mut linker).map_err(|e| PluginError::Engine(format!("{e:#}")))?;
        bindings::host_api::add_to_linker::<HostState, HasSelf<HostState>>(&mut linker, |s| s)
            .map_err(|e| PluginError::Engine(format!("{e:#}")))?;
        let stop = Arc::new(AtomicBool::new(false));
        let ticker_engine = engine.clone();
        let ticker_stop = stop.clone();
        std::thread::Builder::new()
            .name("tuneforge-plugin-epoch".into())
            .spawn(move || {
                while !ticker_stop.load(Ordering::Relaxed) {
                    std::thread::sleep(EPOCH_TICK);
                    ticker_engine.increment_epoch();
                }
            })
            .map_err(|e| PluginError::Engine(format!("cannot start the epoch thread: {e}")))?;
        Ok(Self { inner: Arc::new(Inner { engine, linker, components: Mutex::default(), stop }) })
    }

    /// Compiles (or finds in the cache) the component with this hash.
    fn component(&self, name: &str, sha256: &str, bytes: &[u8]) -> Result<Component, PluginError> {
        if let Some(c) = self.inner.components.lock().map_err(|_| poisoned())?.get(sha256) {
            return Ok(c.clone());
        }
        let c = Component::new(&self.inner.engine, bytes).map_err(|e| PluginError::Load {
            plugin: name.into(),
            message: format!("is not a valid WebAssembly component: {e:#}"),
        })?;
        self.inner.components.lock().map_err(|_| poisoned())?.insert(sha256.to_string(), c.clone());
        Ok(c)
    }

    /// Loads an installed plugin for a run: verifies it, checks that it is the kind the caller
    /// expects (when it says) and that every granted asset is declared, and instantiates it.
    pub fn load(&self, path: &Path, setup: PluginSetup) -> Result<PluginInstance, PluginError> {
        let (installed, bytes) = InstalledPlugin::open(path)?;
        let name = installed.manifest.name.clone();
        for asset in setup.assets.keys() {
            if !installed.manifest.assets.contains_key(asset) {
                return Err(PluginError::Load {
                    plugin: name,
                    message: format!(
                        "the experiment grants asset `{asset}`, which the manifest does not declare (declared: {})",
                        declared_list(&installed)
                    ),
                });
            }
        }
        let component = self.component(&name, &installed.sha256, &bytes)?;
        let pre = self.inner.linker.instantiate_pre(&component).map_err(|e| PluginError::Load {
            plugin: name.clone(),
            message: format!("imports something this host does not provide: {e:#}"),
        })?;
        let pre = match installed.manifest.kind {
            PluginKind::Loss => KindPre::Loss(bindings::loss::LossPre::new(pre).map_err(|e| world_err(&name, e))?),
            PluginKind::Metric => {
                KindPre::Metric(bindings::metric::MetricPre::new(pre).map_err(|e| world_err(&name, e))?)
            }
            PluginKind::Augment => {
                KindPre::Augment(bindings::augment::AugmentPre::new(pre).map_err(|e| world_err(&name, e))?)
            }
            PluginKind::Cleaner => {
                KindPre::Cleaner(bindings::cleaner::CleanerPre::new(pre).map_err(|e| world_err(&name, e))?)
            }
            PluginKind::Features => {
                KindPre::Features(bindings::features::FeaturesPre::new(pre).map_err(|e| world_err(&name, e))?)
            }
        };
        let grants = setup
            .assets
            .into_iter()
            .map(|(k, path)| {
                let max_bytes = installed.manifest.assets.get(&k).map_or(0, |a| a.max_mib * 1024 * 1024);
                (k, Grant { path, max_bytes })
            })
            .collect();
        let mut instance = PluginInstance {
            engine: self.inner.engine.clone(),
            installed,
            pre,
            config: setup.config,
            labels: setup.labels,
            grants,
            live: None,
            calls: 0,
        };
        instance.ensure_live("instantiate")?;
        Ok(instance)
    }
}

fn poisoned() -> PluginError {
    PluginError::Engine("the component cache lock was poisoned".into())
}

fn declared_list(p: &InstalledPlugin) -> String {
    if p.manifest.assets.is_empty() {
        "none".into()
    } else {
        p.manifest.assets.keys().cloned().collect::<Vec<_>>().join(", ")
    }
}

fn world_err(name: &str, e: wasmtime::Error) -> PluginError {
    PluginError::Load { plugin: name.into(), message: format!("does not export what its kind's world requires: {e:#}") }
}

/// What a run hands a plugin: its configuration, the task's labels and the granted files.
#[derive(Debug, Clone, Default)]
pub struct PluginSetup {
    pub config: Vec<(String, String)>,
    pub labels: Vec<String>,
    /// Asset name -> file.
    pub assets: BTreeMap<String, std::path::PathBuf>,
}

pub(crate) enum KindPre {
    Loss(bindings::loss::LossPre<HostState>),
    Metric(bindings::metric::MetricPre<HostState>),
    Augment(bindings::augment::AugmentPre<HostState>),
    Cleaner(bindings::cleaner::CleanerPre<HostState>),
    Features(bindings::features::FeaturesPre<HostState>),
}

pub(crate) enum KindBindings {
    Loss(bindings::loss::Loss),
    Metric(bindings::metric::Metric),
    Augment(bindings::augment::Augment),
    Cleaner(bindings::cleaner::Cleaner),
    Features(bindings::features::Features),
}

pub(crate) struct Live {
    pub store: Store<HostState>,
    pub bindings: KindBindings,
}

/// A loaded plugin with its own store. Not shared between threads at the same time.
pub struct PluginInstance {
    engine: Engine,
    installed: InstalledPlugin,
    pre: KindPre,
    config: Vec<(String, String)>,
    labels: Vec<String>,
    grants: BTreeMap<String, Grant>,
    live: Option<Live>,
    calls: u64,
}

impl std::fmt::Debug for PluginInstance {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PluginInstance").field("plugin", &self.installed.manifest.name).finish_non_exhaustive()
    }
}

impl PluginInstance {
    pub fn name(&self) -> &str {
        &self.installed.manifest.name
    }

    pub fn kind(&self) -> PluginKind {
        self.installed.manifest.kind
    }

    pub fn installed(&self) -> &InstalledPlugin {
        &self.installed
    }

    pub fn limits(&self) -> Limits {
        self.installed.manifest.limits
    }

    /// Calls made so far.
    pub fn calls(&self) -> u64 {
        self.calls
    }

    fn new_store(&self) -> Store<HostState> {
        let limits = self.limits();
        let stderr = MemoryOutputPipe::new(STDERR_CAPACITY);
        // Nothing is inherited: no environment, arguments, directories or network; stdin is
        // closed and stdout discarded.
        let wasi = WasiCtxBuilder::new().stderr(stderr.clone()).allow_tcp(false).allow_udp(false).build();
        let state = HostState {
            wasi,
            table: Default::default(),
            limits: StoreLimitsBuilder::new()
                .memory_size(usize::try_from(limits.memory_mib * 1024 * 1024).unwrap_or(usize::MAX))
                .instances(16)
                .tables(16)
                .memories(4)
                .table_elements(100_000)
                .trap_on_grow_failure(true)
                .build(),
            plugin: self.installed.manifest.name.clone(),
            config: self.config.clone(),
            labels: self.labels.clone(),
            declared: self.installed.manifest.assets.keys().cloned().collect::<BTreeSet<_>>(),
            grants: self.grants.clone(),
            log_lines: 0,
            stderr,
        };
        let mut store = Store::new(&self.engine, state);
        store.limiter(|s| &mut s.limits);
        store.epoch_deadline_trap();
        store
    }

    fn arm(&self, store: &mut Store<HostState>) -> Result<(), PluginError> {
        let limits = self.limits();
        store.set_fuel(limits.fuel_per_call).map_err(|e| PluginError::Engine(format!("{e:#}")))?;
        let ticks = limits.timeout_ms.div_ceil(EPOCH_TICK.as_millis() as u64).max(1);
        store.set_epoch_deadline(ticks);
        Ok(())
    }

    fn ensure_live(&mut self, function: &str) -> Result<(), PluginError> {
        if self.live.is_some() {
            return Ok(());
        }
        let mut store = self.new_store();
        self.arm(&mut store)?;
        let result = match &self.pre {
            KindPre::Loss(p) => p.instantiate(&mut store).map(KindBindings::Loss),
            KindPre::Metric(p) => p.instantiate(&mut store).map(KindBindings::Metric),
            KindPre::Augment(p) => p.instantiate(&mut store).map(KindBindings::Augment),
            KindPre::Cleaner(p) => p.instantiate(&mut store).map(KindBindings::Cleaner),
            KindPre::Features(p) => p.instantiate(&mut store).map(KindBindings::Features),
        };
        match result {
            Ok(bindings) => {
                self.live = Some(Live { store, bindings });
                Ok(())
            }
            Err(e) => Err(self.call_error(function, &store, e)),
        }
    }

    /// Runs `f` on the live instance under fresh limits. A trap drops the instance.
    pub(crate) fn call<R>(
        &mut self,
        function: &str,
        f: impl FnOnce(&KindBindings, &mut Store<HostState>) -> wasmtime::Result<R>,
    ) -> Result<R, PluginError> {
        self.ensure_live(function)?;
        self.calls += 1;
        let Some(mut live) = self.live.take() else {
            return Err(PluginError::Engine("instance missing after instantiation".into()));
        };
        self.arm(&mut live.store)?;
        match f(&live.bindings, &mut live.store) {
            Ok(r) => {
                self.live = Some(live);
                Ok(r)
            }
            Err(e) => Err(self.call_error(function, &live.store, e)),
        }
    }

    /// Turns a wasmtime error into one that names the plugin, the function and the cause.
    fn call_error(&self, function: &str, store: &Store<HostState>, e: wasmtime::Error) -> PluginError {
        let limits = self.limits();
        let text = format!("{e:#}");
        let memory =
            text.contains("forcing trap when growing memory") || text.contains("forcing a memory growth failure");
        let cause = match e.downcast_ref::<Trap>() {
            _ if memory => format!("exceeded its memory limit of {} MiB", limits.memory_mib),
            Some(Trap::OutOfFuel) => format!("ran out of fuel (limit {} per call)", limits.fuel_per_call),
            Some(Trap::Interrupt) => format!("exceeded its time limit of {} ms per call", limits.timeout_ms),
            Some(Trap::StackOverflow) => "overflowed its stack (too deep a recursion)".to_string(),
            Some(Trap::MemoryOutOfBounds) => {
                "trapped: out-of-bounds memory access (what a guest stack overflow looks like)".to_string()
            }
            Some(trap) => format!("trapped: {trap}"),
            None => format!("failed: {}", tail(&text, 600)),
        };
        let stderr = String::from_utf8_lossy(&store.data().stderr.contents()).trim().to_string();
        let cause = if stderr.is_empty() { cause } else { format!("{cause}; it wrote: {}", tail(&stderr, 600)) };
        PluginError::Call { plugin: self.name().to_string(), function: function.to_string(), cause }
    }
}

fn one_line(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

fn tail(s: &str, max: usize) -> String {
    let s = one_line(s);
    if s.len() <= max {
        return s;
    }
    let mut start = s.len() - max;
    while !s.is_char_boundary(start) {
        start += 1;
    }
    format!("…{}", &s[start..])
}
