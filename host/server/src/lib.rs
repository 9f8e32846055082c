//! The tuneforge server: actix-web over the experiment store. JSON endpoints under
//! `/api/v1` (runs, metric series, comparison, the model registry, prediction, feedback, the
//! audit trail), `/metrics` in Prometheus' text format, `/healthz`, and the dashboard
//! (`tuneforge-web`, server-rendered Leptos) at `/`.
//!
//! It binds 127.0.0.1 by default; every write needs `Authorization: Bearer <token>`.
//! It knows HTTP; SQL stays in `tuneforge-store`, models in `tuneforge-core`.

mod auth;
mod batcher;
mod error;
mod prometheus;
mod routes;
mod state;

use std::net::TcpListener;

use actix_web::dev::Server;
use actix_web::{App, HttpServer, web};

pub use auth::{load_or_create_token, token_file};
pub use batcher::BatchPolicy;
pub use error::ApiError;
use state::AppState;
use tuneforge_store::Store;

/// How to start the server.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// `host:port`; port 0 picks a free one.
    pub addr: String,
    /// The experiment store (a SQLite path or URL).
    pub db: String,
    /// The bearer token that writes need.
    pub token: String,
    /// Where the served classifiers compute (`serve --device`).
    pub device: tuneforge_core::DeviceSpec,
    /// How concurrent predictions form micro-batches (`serve --batch-max-texts`,
    /// `--batch-wait-ms`).
    pub batch: BatchPolicy,
}

/// A bound, not yet running server.
pub struct Application {
    port: u16,
    server: Server,
}

impl std::fmt::Debug for Application {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Application").field("port", &self.port).finish()
    }
}

impl Application {
    /// Opens the store, binds the address and prepares the server.
    pub async fn build(config: ServerConfig) -> Result<Self, ApiError> {
        Self::build_with_generator(config, None).await
    }

    /// [`Application::build`], with a decoder (`.gguf`, Hugging Face directory, or a tuned
    /// adapter; `source` names it in answers) behind `POST /api/v1/generate`.
    pub async fn build_with_generator(
        config: ServerConfig,
        generator: Option<(String, std::sync::Arc<tuneforge_core::generate::LanguageModel>)>,
    ) -> Result<Self, ApiError> {
        if config.token.trim().len() < 16 {
            return Err(ApiError::BadRequest("the token must have at least 16 characters".into()));
        }
        let device = config.device.open().map_err(|e| ApiError::BadRequest(e.to_string()))?;
        let store = Store::open(&config.db).await?;
        let listener = TcpListener::bind(&config.addr)
            .map_err(|e| ApiError::Internal(format!("cannot bind {}: {e}", config.addr)))?;
        let port = listener.local_addr().map_err(|e| ApiError::Internal(e.to_string()))?.port();
        let token = config.token.clone();
        let mut app_state = AppState::new(store.clone(), config.token);
        app_state.device = device;
        app_state.batch_policy = config.batch;
        if let Some((name, lm)) = generator {
            let counters = app_state.counters.clone();
            let batcher = batcher::GenerationBatcher::start(lm, config.batch, counters, name.clone(), 0)
                .map_err(|e| ApiError::Internal(format!("cannot start the generation worker: {e}")))?;
            app_state.generator = Some(std::sync::Arc::new(batcher));
            app_state.generator_name = Some(name);
        }
        let state = web::Data::new(app_state);
        let for_dashboard = state.clone();
        let predict = tuneforge_web::api::PredictService(std::sync::Arc::new(move |model: String, text: String| {
            let state = for_dashboard.clone();
            Box::pin(async move { routes::try_recorded(&state, &model, text).await.map_err(|e| e.to_string()) })
        }));
        let server = HttpServer::new(move || {
            let app = App::new()
                .app_data(state.clone())
                .app_data(error::query_config())
                .wrap(actix_web::middleware::from_fn(prometheus::track))
                .configure(routes::configure);
            tuneforge_web::mount(app, store.clone(), token.clone(), predict.clone())
        })
        .listen(listener)
        .map_err(|e| ApiError::Internal(e.to_string()))?
        .run();
        Ok(Self { port, server })
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub async fn run_until_stopped(self) -> std::io::Result<()> {
        self.server.await
    }
}
