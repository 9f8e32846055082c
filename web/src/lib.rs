//! The tuneforge dashboard: Leptos components rendered on the server (`leptos_actix`) and
//! mounted by `tuneforge serve` at `/`. Pages read the experiment store through server
//! functions (`api.rs`); every page is complete HTML without JavaScript, and Leptos escapes
//! every text it renders.
//!
//! What exists: the runs list (filter, sort, pages), a run (config, summary, gates, plugins,
//! curves, confusion matrix, per-class recall), the comparison of runs, and the registry
//! (promote and roll back with a confirmation and the write token; the audit trail), the
//! playground (classify a text, rate and correct the answer) and the feedback queue (filter,
//! mark reviewed, export as JSONL).

pub mod api;
pub mod charts;
mod pages;

use leptos::prelude::*;
use leptos_router::components::{Route, Router, Routes};
use leptos_router::{SsrMode, path};

/// The stylesheet, inlined into every page (no asset pipeline).
pub const CSS: &str = include_str!("../style.css");

/// The name of the browser bundle's files (`pkg/tuneforge_web.js`, `_bg.wasm`).
pub const BUNDLE: &str = "tuneforge_web";

/// Where the browser bundle is: `$TUNEFORGE_WEB_PKG`, else `site/pkg` beside one of the
/// directories above the running program (`cargo xtask web` writes `<target>/site/pkg`).
/// Without it the pages are served as plain HTML, which works too.
#[cfg(feature = "ssr")]
pub fn pkg_dir() -> Option<&'static std::path::Path> {
    static DIR: std::sync::OnceLock<Option<std::path::PathBuf>> = std::sync::OnceLock::new();
    DIR.get_or_init(|| {
        let has_bundle = |d: &std::path::Path| d.join(format!("{BUNDLE}.js")).is_file();
        if let Some(d) = std::env::var_os("TUNEFORGE_WEB_PKG").map(std::path::PathBuf::from) {
            return has_bundle(&d).then_some(d);
        }
        let exe = std::env::current_exe().ok()?;
        exe.ancestors().skip(1).take(4).map(|a| a.join("site/pkg")).find(|d| has_bundle(d))
    })
    .as_deref()
}

/// The HTML document around the app (with the hydration scripts when the bundle exists).
pub fn shell() -> impl IntoView {
    #[cfg(feature = "ssr")]
    let hydration = pkg_dir().map(|_| {
        let options = leptos::config::LeptosOptions::builder().output_name(BUNDLE).build();
        view! { <HydrationScripts options=options/> }
    });
    #[cfg(not(feature = "ssr"))]
    let hydration: Option<()> = None;
    view! {
        <!DOCTYPE html>
        <html lang="en">
            <head>
                <meta charset="utf-8"/>
                <meta name="viewport" content="width=device-width, initial-scale=1"/>
                <title>"tuneforge"</title>
                <style>{CSS}</style>
                {hydration}
            </head>
            <body>
                <App/>
            </body>
        </html>
    }
}

/// The dashboard's routes.
#[component]
pub fn App() -> impl IntoView {
    view! {
        <Router>
            <header class="top">
                <a class="brand" href="/">"tuneforge"</a>
                <nav>
                    <a href="/">"Runs"</a>
                    <a href="/compare">"Compare"</a>
                    <a href="/models">"Models"</a>
                    <a href="/playground">"Playground"</a>
                    <a href="/feedback">"Feedback"</a>
                </nav>
            </header>
            <main>
                <Routes fallback=|| view! { <p class="empty">"No such page."</p> }>
                    <Route path=path!("/") view=pages::runs::RunsPage ssr=SsrMode::Async/>
                    <Route path=path!("/runs/:id") view=pages::run::RunPage ssr=SsrMode::Async/>
                    <Route path=path!("/compare") view=pages::compare::ComparePage ssr=SsrMode::Async/>
                    <Route path=path!("/models") view=pages::models::ModelsPage ssr=SsrMode::Async/>
                    <Route path=path!("/playground") view=pages::playground::PlaygroundPage ssr=SsrMode::Async/>
                    <Route path=path!("/feedback") view=pages::feedback::FeedbackPage ssr=SsrMode::Async/>
                </Routes>
            </main>
        </Router>
    }
}

/// Mounts the dashboard on an actix app: the pages and their server functions, with the store
/// in the reactive context.
#[cfg(feature = "ssr")]
pub fn mount<T>(
    app: actix_web::App<T>,
    store: tuneforge_store::Store,
    token: String,
    predict: api::PredictService,
) -> actix_web::App<T>
where
    T: actix_web::dev::ServiceFactory<
            actix_web::dev::ServiceRequest,
            Config = (),
            Error = actix_web::Error,
            InitError = (),
        >,
{
    use leptos_actix::{LeptosRoutes, generate_route_list, handle_server_fns_with_context};
    let routes = generate_route_list(App);
    let context = move || {
        provide_context(store.clone());
        provide_context(api::WriteToken(token.clone()));
        provide_context(predict.clone());
    };
    app.route(&format!("{}/{{tail:.*}}", api::PREFIX), handle_server_fns_with_context(context.clone()))
        .route("/pkg/{file}", actix_web::web::get().to(bundle_file))
        .leptos_routes_with_context(routes, context, shell)
}

/// The browser bundle's files, by exact name only.
#[cfg(feature = "ssr")]
async fn bundle_file(file: actix_web::web::Path<String>) -> actix_web::HttpResponse {
    use actix_web::HttpResponse;
    let js = format!("{BUNDLE}.js");
    let wasm = format!("{BUNDLE}_bg.wasm");
    let content_type = if *file == js {
        "text/javascript"
    } else if *file == wasm {
        "application/wasm"
    } else {
        return HttpResponse::NotFound().finish();
    };
    match pkg_dir().map(|d| std::fs::read(d.join(file.as_str()))) {
        Some(Ok(bytes)) => HttpResponse::Ok().content_type(content_type).body(bytes),
        _ => HttpResponse::NotFound().finish(),
    }
}
