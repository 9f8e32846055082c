//! The sandbox against a plugin that misbehaves on purpose (`plugins/hostile`): each attack
//! ends in a clear error that names the plugin, the function and the cause, within a bounded
//! time, with the host alive and a training run's recorded data intact.

use std::path::Path;
use std::time::{Duration, Instant};

use tuneforge_core::{ExperimentConfig, RunOptions, train_experiment_with};
use tuneforge_plugin_runtime::{Limits, PluginError, PluginRuntime, PluginSetup, RuntimeHooks};
use tuneforge_tests::{installed, installed_with_limits};

const ROWS: usize = 2;
const CLASSES: usize = 3;

fn setup(mode: &str, target: &str) -> PluginSetup {
    PluginSetup {
        config: vec![("mode".into(), mode.into()), ("target".into(), target.into())],
        labels: vec!["a".into(), "b".into(), "c".into()],
        assets: Default::default(),
    }
}

fn call(dir: &Path, setup: PluginSetup) -> (Result<f32, PluginError>, Duration) {
    let runtime = PluginRuntime::new().expect("runtime");
    let mut p = runtime.load(dir, setup).expect("loads");
    let started = Instant::now();
    let texts = vec!["x".to_string(), "y".to_string()];
    let r = p.compute_loss(ROWS, CLASSES, &[0.0; ROWS * CLASSES], &[0, 1], &texts).map(|a| a.value);
    (r, started.elapsed())
}

/// Runs `mode` and returns the error text, checking that it names the plugin and function.
fn fails(mode: &str, target: &str, limits: Limits) -> String {
    let home = tempfile::tempdir().expect("tempdir");
    let dir = installed_with_limits("hostile", home.path(), limits);
    let (r, took) = call(&dir, setup(mode, target));
    let err = r.expect_err(mode).to_string();
    assert!(err.contains("plugin `hostile`, function `compute`"), "{mode}: {err}");
    assert!(took < Duration::from_secs(30), "{mode} took {took:?}");
    err
}

#[test]
fn a_well_behaved_call_works_first() {
    let home = tempfile::tempdir().expect("tempdir");
    let dir = installed_with_limits("hostile", home.path(), Limits::default());
    let (r, _) = call(&dir, setup("ok", ""));
    assert_eq!(r.expect("ok mode"), 0.0);
}

#[test]
fn an_infinite_loop_runs_out_of_fuel() {
    let err = fails("loop", "", Limits { fuel_per_call: 50_000_000, ..Limits::default() });
    assert!(err.contains("ran out of fuel"), "{err}");
}

#[test]
fn an_infinite_loop_with_ample_fuel_hits_the_deadline() {
    let started = Instant::now();
    let err = fails("loop", "", Limits { fuel_per_call: u64::MAX / 4, timeout_ms: 300, ..Limits::default() });
    assert!(err.contains("exceeded its time limit of 300 ms"), "{err}");
    assert!(started.elapsed() < Duration::from_secs(20));
}

#[test]
fn unbounded_memory_growth_hits_the_memory_limit() {
    let err = fails("memory", "", Limits { memory_mib: 24, ..Limits::default() });
    assert!(err.contains("memory limit of 24 MiB"), "{err}");
}

#[test]
fn deep_recursion_overflows_the_stack_not_the_host() {
    let err = fails("recursion", "", Limits::default());
    assert!(err.contains("stack overflow") || err.contains("overflowed its stack"), "{err}");
}

#[test]
fn a_panic_is_an_error_quoting_the_panic_message() {
    let err = fails("panic", "", Limits::default());
    assert!(err.contains("trapped") && err.contains("hostile plugin panicked on purpose"), "{err}");
}

#[test]
fn malformed_gradients_are_refused() {
    let err = fails("wrong-length", "", Limits::default());
    assert!(err.contains("gradient of 5 values for a 2x3 batch"), "{err}");
    let err = fails("nan", "", Limits::default());
    assert!(err.contains("non-finite gradient (NaN at row 1, class 2)"), "{err}");
}

#[test]
fn the_plugins_own_error_is_passed_on() {
    let err = fails("error", "", Limits::default());
    assert!(err.contains("returned an error [refused]: this plugin always fails"), "{err}");
}

#[test]
fn assets_are_read_only_when_declared_and_granted() {
    let home = tempfile::tempdir().expect("tempdir");
    let dir = installed_with_limits("hostile", home.path(), Limits::default());
    let file = home.path().join("granted.txt");
    std::fs::write(&file, b"twelve bytes").expect("write");
    let mut s = setup("asset", "granted");
    s.assets.insert("granted".into(), file.clone());
    let (r, _) = call(&dir, s);
    assert_eq!(r.expect("granted asset"), 12.0);

    let err = fails("asset", "granted", Limits::default());
    assert!(err.contains("declared but the experiment grants no file"), "{err}");
    for name in ["secret", "../../../../etc/passwd", "/etc/passwd", "granted/../../x"] {
        let err = fails("asset", name, Limits::default());
        assert!(err.contains("not declared in the plugin's manifest"), "{name}: {err}");
    }

    let mut s = setup("ok", "");
    s.assets.insert("extra".into(), file);
    let err = PluginRuntime::new().expect("runtime").load(&dir, s).expect_err("undeclared grant").to_string();
    assert!(err.contains("grants asset `extra`, which the manifest does not declare"), "{err}");
}

#[test]
fn files_directories_sockets_environment_and_arguments_are_out_of_reach() {
    let secret = std::env::temp_dir().join("tuneforge-hostile-secret.txt");
    std::fs::write(&secret, b"secret").expect("write");
    for (mode, target) in [
        ("open-file", secret.to_str().expect("utf-8")),
        ("open-file", "/etc/passwd"),
        ("list-dir", "/"),
        ("list-dir", "."),
    ] {
        let err = fails(mode, target, Limits::default());
        assert!(err.contains("[denied]: "), "{mode} {target}: {err}");
    }

    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    listener.set_nonblocking(true).expect("nonblocking");
    let addr = listener.local_addr().expect("addr").to_string();
    let err = fails("socket", &addr, Limits::default());
    assert!(err.contains("[denied]: connect"), "{err}");
    assert!(listener.accept().is_err(), "the plugin reached the listener");

    for var in ["PATH", "HOME", "CARGO_MANIFEST_DIR"] {
        let err = fails("env", var, Limits::default());
        assert!(err.contains("[denied]: env"), "{var}: {err}");
    }
    let err = fails("args", "", Limits::default());
    assert!(err.contains("[denied]: args"), "{err}");
}

#[test]
fn after_a_trap_the_instance_is_rebuilt_and_other_plugins_keep_working() {
    let home = tempfile::tempdir().expect("tempdir");
    let dir = installed_with_limits("hostile", home.path(), Limits::default());
    let runtime = PluginRuntime::new().expect("runtime");
    let texts = vec!["x".to_string(), "y".to_string()];
    let mut bad = runtime.load(&dir, setup("panic", "")).expect("loads");
    let mut good = runtime.load(&dir, setup("ok", "")).expect("loads");
    for _ in 0..3 {
        assert!(bad.compute_loss(ROWS, CLASSES, &[0.0; 6], &[0, 1], &texts).is_err());
        assert_eq!(good.compute_loss(ROWS, CLASSES, &[0.0; 6], &[0, 1], &texts).expect("ok").value, 0.0);
    }
    assert_eq!(bad.calls(), 3);
}

fn run_with(mode: &str, on_error: &str) -> (tempfile::TempDir, tuneforge_core::Result<tuneforge_core::TrainOutcome>) {
    let root = tempfile::tempdir().expect("tempdir");
    let home = root.path().join("plugins");
    installed("hostile", &home);
    let extra = format!(
        "[[plugins]]\nname = \"hostile\"\nweight = 0.5\non_error = \"{on_error}\"\n[plugins.config]\nmode = \"{mode}\"\n"
    );
    let text = tuneforge_core::testing::write_tiny_task(root.path(), &extra).expect("task");
    let cfg = ExperimentConfig::from_toml(&text, "hostile.toml", &["train.epochs=2".into()]).expect("config");
    let factory = RuntimeHooks::new(home).expect("runtime");
    let out = train_experiment_with(cfg, &RunOptions::default(), &factory, &mut |_| {});
    (root, out)
}

#[test]
fn a_failing_loss_plugin_stops_the_run_with_its_name_and_keeps_the_run_directory() {
    let (root, out) = run_with("panic", "stop");
    let err = out.expect_err("stops").to_string();
    assert!(err.contains("plugin `hostile`, function `compute`") && err.contains("panicked on purpose"), "{err}");
    let runs: Vec<_> = std::fs::read_dir(root.path().join("runs")).expect("runs").flatten().collect();
    assert_eq!(runs.len(), 1);
    let config = std::fs::read_to_string(runs[0].path().join("config.toml")).expect("config kept");
    assert!(config.contains("hostile"));
}

#[test]
fn with_on_error_skip_the_run_completes_and_counts_the_skipped_calls() {
    let (_root, out) = run_with("nan", "skip");
    let out = out.expect("completes");
    assert_eq!(out.summary.status, "completed");
    assert_eq!(out.summary.plugin_calls_skipped.get("hostile"), Some(&out.summary.steps));
    let lineage = &out.summary.plugins[0];
    assert_eq!(
        (lineage.name.as_str(), lineage.kind.as_str(), lineage.api_version.as_str()),
        ("hostile", "loss", "0.1.0")
    );
    assert_eq!(lineage.sha256.len(), 64);
}

/// Compiled components are kept on disk, and code from the cache keeps the sandbox: the
/// first runtime over an empty cache directory compiles the hostile loop and stores it; a
/// second one loads it from there and still stops it by fuel.
#[test]
fn cached_compiled_code_keeps_the_fuel_limit() {
    let home = tempfile::tempdir().expect("tempdir");
    let cache = tempfile::tempdir().expect("cache");
    let dir = installed_with_limits("hostile", home.path(), Limits { fuel_per_call: 50_000_000, ..Limits::default() });
    assert!(walk(cache.path()).is_empty());
    let mut stored = Vec::new();
    for round in 0..2 {
        let runtime = PluginRuntime::with_code_cache(Some(cache.path())).expect("runtime");
        let mut p = runtime.load(&dir, setup("loop", "")).expect("loads");
        let texts = vec!["x".to_string(), "y".to_string()];
        let err =
            p.compute_loss(ROWS, CLASSES, &[0.0; ROWS * CLASSES], &[0, 1], &texts).expect_err("loops").to_string();
        assert!(err.contains("ran out of fuel"), "round {round}: {err}");
        stored = walk(cache.path());
        assert!(!stored.is_empty(), "round {round}: the compiled component is cached");
    }
    assert_eq!(stored.len(), walk(cache.path()).len(), "the second runtime added nothing: it found the first's code");
}

/// The files under `d`, recursively.
fn walk(d: &Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(d).into_iter().flatten().flatten() {
        let p = e.path();
        if p.is_dir() { out.extend(walk(&p)) } else { out.push(p) }
    }
    out
}
