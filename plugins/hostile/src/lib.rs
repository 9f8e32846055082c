//! A loss plugin that misbehaves on purpose. `mode` in its config picks how: the sandbox
//! tests in `tests/plugins_hostile.rs` run every mode and expect a clear error each time.

use tuneforge_plugin_sdk::{Loss, LossBatch, LossOutput, PluginError, asset, config, export_loss};

struct Hostile {
    mode: String,
    target: String,
}

fn denied(what: &str, e: impl std::fmt::Display) -> PluginError {
    PluginError::new("denied", format!("{what}: {e}"))
}

#[inline(never)]
fn recurse(depth: u64) -> u64 {
    let frame = std::hint::black_box([depth; 16]);
    if depth == u64::MAX {
        return 0;
    }
    recurse(depth + 1).wrapping_add(frame[(depth % 16) as usize])
}

impl Loss for Hostile {
    fn new() -> Result<Self, PluginError> {
        let c = config();
        Ok(Self { mode: c.string("mode", "ok"), target: c.string("target", "") })
    }

    fn compute(&mut self, batch: &LossBatch) -> Result<LossOutput, PluginError> {
        let n = batch.logits.len();
        let ok = |value: f32| Ok(LossOutput { value, grad: vec![0.0; n] });
        match self.mode.as_str() {
            "ok" => ok(0.0),
            "loop" => {
                let mut i: u64 = 0;
                loop {
                    i = std::hint::black_box(i.wrapping_add(1));
                }
            }
            "memory" => {
                let mut hoard: Vec<Vec<u8>> = Vec::new();
                loop {
                    hoard.push(vec![1u8; 1 << 20]);
                    std::hint::black_box(&hoard);
                }
            }
            "recursion" => ok(recurse(0) as f32),
            "panic" => panic!("hostile plugin panicked on purpose"),
            "wrong-length" => Ok(LossOutput { value: 0.0, grad: vec![0.0; n.saturating_sub(1)] }),
            "nan" => {
                let mut grad = vec![0.0; n];
                if let Some(g) = grad.last_mut() {
                    *g = f32::NAN;
                }
                Ok(LossOutput { value: 0.0, grad })
            }
            "error" => Err(PluginError::new("refused", "this plugin always fails")),
            "asset" => asset(&self.target).map(|b| LossOutput { value: b.len() as f32, grad: vec![0.0; n] }),
            "open-file" => match std::fs::read(&self.target) {
                Ok(bytes) => ok(bytes.len() as f32),
                Err(e) => Err(denied("open", e)),
            },
            "list-dir" => match std::fs::read_dir(&self.target) {
                Ok(entries) => ok(entries.count() as f32),
                Err(e) => Err(denied("read_dir", e)),
            },
            "socket" => match std::net::TcpStream::connect(self.target.as_str()) {
                Ok(_) => ok(1.0),
                Err(e) => Err(denied("connect", e)),
            },
            "env" => match std::env::var(&self.target) {
                Ok(v) => ok(v.len() as f32),
                Err(e) => Err(denied("env", e)),
            },
            "args" => match std::env::args().count() {
                0 => Err(denied("args", "none")),
                k => ok(k as f32),
            },
            other => Err(PluginError::bad_config(format!("unknown mode `{other}`"))),
        }
    }
}

export_loss!(Hostile);
