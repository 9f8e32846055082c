//! `cargo xtask test`: the whole test suite as CI runs it — format checks, the guest plugins'
//! unit tests, then every test of the workspace under cargo-nextest (installed when missing),
//! with a throwaway PostgreSQL server for the store's tests.

use crate::process::{available, cargo, run as run_cmd};
use crate::workspace_root;

pub fn run(args: &[String]) -> anyhow::Result<()> {
    let root = workspace_root();
    if !available("cargo", &["nextest", "--version"]) {
        run_cmd(cargo().args(["install", "cargo-nextest", "--locked"]))?;
    }
    if !available("python3", &["-m", "pip", "--version"]) {
        eprintln!("warning: python3 with pip is missing; the test that fetches the all-MiniLM-L6-v2 wheel will fail");
    }
    crate::plugins::ensure_target()?;
    // The dashboard's end-to-end test checks that the pages hydrate.
    crate::web::build()?;
    let plugins = root.join("plugins/Cargo.toml");
    if available("cargo", &["fmt", "--version"]) {
        run_cmd(cargo().args(["fmt", "--all", "--check"]).current_dir(&root))?;
        run_cmd(cargo().args(["fmt", "--all", "--check", "--manifest-path"]).arg(&plugins))?;
        run_cmd(cargo().args(["fmt", "--check", "--manifest-path"]).arg(root.join("web/frontend/Cargo.toml")))?;
    }
    // The guest crates' own unit tests, natively, one plugin at a time (kind features).
    let target = crate::target_dir().join("plugins");
    for src in crate::plugins::shipped()? {
        let name = src.file_name().map(|f| f.to_string_lossy().into_owned()).unwrap_or_default();
        run_cmd(
            cargo()
                .args(["test", "-q", "--manifest-path"])
                .arg(&plugins)
                .args(["-p", &name, "--target-dir"])
                .arg(&target),
        )?;
    }
    // The store's tests also run on PostgreSQL: a throwaway server unless one is given.
    let _server;
    let pg_url = match std::env::var("TUNEFORGE_TEST_PG") {
        Ok(url) if !url.is_empty() => url,
        _ => {
            let server = crate::postgres::TestPostgres::start()?;
            eprintln!("PostgreSQL for the store tests at {}", server.url);
            let url = server.url.clone();
            _server = server;
            url
        }
    };
    run_cmd(
        cargo()
            .args(["nextest", "run", "--workspace", "--no-fail-fast"])
            .args(args)
            .env("TUNEFORGE_TEST_PG", pg_url)
            .current_dir(&root),
    )
}
