//! A throwaway PostgreSQL server for the store tests: `initdb` into a temporary directory
//! (as the `postgres` user when running as root, which PostgreSQL refuses), started on a free
//! loopback port with trust authentication, stopped and removed on drop.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, bail};

pub struct TestPostgres {
    dir: PathBuf,
    bin: PathBuf,
    as_postgres: bool,
    pub url: String,
}

/// The directory with `initdb` and `pg_ctl` (Debian: `/usr/lib/postgresql/<major>/bin`).
fn bin_dir() -> Option<PathBuf> {
    let mut dirs: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .flatten()
        .map(|e| e.path().join("bin"))
        .filter(|p| p.join("initdb").is_file() && p.join("pg_ctl").is_file())
        .collect();
    dirs.sort();
    dirs.pop()
}

fn is_root() -> bool {
    Command::new("id").arg("-u").output().is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
}

fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

impl TestPostgres {
    pub fn start() -> anyhow::Result<Self> {
        let Some(bin) = bin_dir() else {
            bail!(
                "PostgreSQL is needed for the store tests and was not found under /usr/lib/postgresql \
                 (Debian: apt-get install postgresql)"
            );
        };
        let as_postgres = is_root();
        let dir = std::env::temp_dir().join(format!("tuneforge-pg-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let mut pg = Self { dir, bin, as_postgres, url: String::new() };
        if as_postgres {
            let status = Command::new("chown").args(["-R", "postgres:postgres"]).arg(&pg.dir).status()?;
            if !status.success() {
                bail!("cannot hand {} to the postgres user", pg.dir.display());
            }
        }
        let data = pg.dir.join("data");
        pg.run("initdb", &["-D", path_str(&data)?, "-U", "tuneforge", "--auth=trust", "--no-sync", "-E", "UTF8"])?;
        let port = free_port()?;
        let options = format!(
            "-p {port} -k {} -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=200",
            path_str(&pg.dir)?
        );
        let log = pg.dir.join("server.log");
        pg.run("pg_ctl", &["-D", path_str(&data)?, "-o", &options, "-l", path_str(&log)?, "-w", "start"])?;
        pg.url = format!("postgres://tuneforge@127.0.0.1:{port}/postgres");
        Ok(pg)
    }

    fn run(&self, tool: &str, args: &[&str]) -> anyhow::Result<()> {
        let exe = self.bin.join(tool);
        let mut cmd = if self.as_postgres {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(&exe);
            c
        } else {
            Command::new(&exe)
        };
        let out = cmd.args(args).current_dir(&self.dir).output().with_context(|| format!("running {tool}"))?;
        if !out.status.success() {
            bail!("{tool} failed: {}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        }
        Ok(())
    }
}

fn path_str(p: &Path) -> anyhow::Result<&str> {
    p.to_str().context("a non-UTF-8 temporary path")
}

impl Drop for TestPostgres {
    fn drop(&mut self) {
        if let Ok(data) = path_str(&self.dir.join("data")) {
            let _ = self.run("pg_ctl", &["-D", data, "-m", "immediate", "-w", "stop"]);
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
