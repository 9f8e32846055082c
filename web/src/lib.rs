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
async fn bundle_file(req: actix_web::HttpRequest, file: actix_web::web::Path<String>) -> actix_web::HttpResponse {
    match pkg_dir() {
        Some(dir) => bundle_response(dir, &file, &req),
        None => actix_web::HttpResponse::NotFound().finish(),
    }
}

/// `file` of the bundle in `dir`: gzip-compressed when the browser accepts it and `cargo
/// xtask web` left a `.gz` beside the file that is not older than it (the wasm shrinks ~4x),
/// with a (weak) ETag from the file's length and modification time, so a browser revalidates
/// (`Cache-Control: no-cache`) and gets 304 Not Modified instead of the bundle again.
#[cfg(feature = "ssr")]
fn bundle_response(dir: &std::path::Path, file: &str, req: &actix_web::HttpRequest) -> actix_web::HttpResponse {
    use actix_web::HttpResponse;
    use actix_web::http::header;
    let content_type = if file == format!("{BUNDLE}.js") {
        "text/javascript"
    } else if file == format!("{BUNDLE}_bg.wasm") {
        "application/wasm"
    } else {
        return HttpResponse::NotFound().finish();
    };
    let path = dir.join(file);
    let Ok(meta) = std::fs::metadata(&path) else {
        return HttpResponse::NotFound().finish();
    };
    let modified = meta.modified().ok();
    let stamp = modified.and_then(|m| m.duration_since(std::time::UNIX_EPOCH).ok()).map_or(0, |d| d.as_nanos());
    // Weak: the gzip and the plain response are one resource in two encodings.
    let etag = format!("W/\"{:x}-{stamp:x}\"", meta.len());
    let header_has = |name: header::HeaderName, pred: &dyn Fn(&str) -> bool| {
        req.headers().get_all(name).filter_map(|v| v.to_str().ok()).flat_map(|v| v.split(',')).any(|v| pred(v.trim()))
    };
    // The validators and caching rules every answer below carries, 304 included.
    let with_validators = |mut builder: actix_web::HttpResponseBuilder| {
        builder
            .insert_header((header::CACHE_CONTROL, "no-cache"))
            .insert_header((header::ETAG, etag.clone()))
            .insert_header((header::VARY, "Accept-Encoding"));
        builder
    };
    // If-None-Match compares weakly: `W/` on either side does not matter.
    let opaque = etag.trim_start_matches("W/");
    if header_has(header::IF_NONE_MATCH, &|v| v.trim_start_matches("W/") == opaque || v == "*") {
        return with_validators(HttpResponse::NotModified()).finish();
    }
    let mut ok = with_validators(HttpResponse::Ok());
    // `gzip` or `gzip;q=…` with a non-zero quality.
    let accepts_gzip = header_has(header::ACCEPT_ENCODING, &|v| {
        let mut parts = v.split(';').map(str::trim);
        parts.next().is_some_and(|e| e.eq_ignore_ascii_case("gzip"))
            && parts.all(|p| p.strip_prefix("q=").is_none_or(|q| q.parse::<f32>().is_ok_and(|q| q > 0.0)))
    });
    let gz = path.with_file_name(format!("{file}.gz"));
    let fresh_gz = accepts_gzip
        && std::fs::metadata(&gz)
            .ok()
            .and_then(|m| m.modified().ok())
            .is_some_and(|g| modified.is_some_and(|m| g >= m));
    if fresh_gz && let Ok(bytes) = std::fs::read(&gz) {
        return ok.content_type(content_type).insert_header((header::CONTENT_ENCODING, "gzip")).body(bytes);
    }
    match std::fs::read(&path) {
        Ok(bytes) => ok.content_type(content_type).body(bytes),
        Err(_) => HttpResponse::NotFound().finish(),
    }
}

#[cfg(all(test, feature = "ssr"))]
mod tests {
    use actix_web::body::MessageBody;
    use actix_web::http::{StatusCode, header};
    use actix_web::test::TestRequest;

    use super::*;

    fn get(
        dir: &std::path::Path,
        file: &str,
        headers: &[(&str, &str)],
    ) -> (StatusCode, Vec<(String, String)>, Vec<u8>) {
        let mut req = TestRequest::get();
        for &(k, v) in headers {
            req = req.insert_header((k, v));
        }
        let res = bundle_response(dir, file, &req.to_http_request());
        let status = res.status();
        let heads = res.headers().iter().map(|(k, v)| (k.to_string(), v.to_str().unwrap_or("").to_owned())).collect();
        let body = res.into_body().try_into_bytes().map(|b| b.to_vec()).unwrap_or_default();
        (status, heads, body)
    }

    fn header<'a>(heads: &'a [(String, String)], name: &header::HeaderName) -> Option<&'a str> {
        heads.iter().find(|(k, _)| k == name.as_str()).map(|(_, v)| v.as_str())
    }

    #[test]
    fn the_bundle_goes_out_compressed_when_accepted_and_revalidates() -> std::io::Result<()> {
        let dir = tempfile::tempdir()?;
        let wasm = format!("{BUNDLE}_bg.wasm");
        std::fs::write(dir.path().join(&wasm), b"plain wasm")?;
        std::fs::write(dir.path().join(format!("{wasm}.gz")), b"gzipped wasm")?;

        let (status, heads, body) = get(dir.path(), &wasm, &[("accept-encoding", "br, gzip")]);
        assert_eq!(status, StatusCode::OK);
        assert_eq!(body, b"gzipped wasm");
        assert_eq!(header(&heads, &header::CONTENT_ENCODING), Some("gzip"));
        assert_eq!(header(&heads, &header::CONTENT_TYPE), Some("application/wasm"));
        assert_eq!(header(&heads, &header::VARY), Some("Accept-Encoding"));
        let etag = header(&heads, &header::ETAG).expect("an ETag").to_owned();

        // Not accepted (absent, or refused with q=0): the file itself.
        for accept in [&[][..], &[("accept-encoding", "gzip;q=0, identity")][..]] {
            let (status, heads, body) = get(dir.path(), &wasm, accept);
            assert_eq!((status, body.as_slice()), (StatusCode::OK, &b"plain wasm"[..]));
            assert_eq!(header(&heads, &header::CONTENT_ENCODING), None);
        }
        // The browser's copy is current: 304 and no body.
        let (status, _, body) = get(dir.path(), &wasm, &[("if-none-match", &etag), ("accept-encoding", "gzip")]);
        assert_eq!((status, body.len()), (StatusCode::NOT_MODIFIED, 0));
        let strong = etag.trim_start_matches("W/");
        let (status, _, _) = get(dir.path(), &wasm, &[("if-none-match", &format!("\"other\", {strong}"))]);
        assert_eq!(status, StatusCode::NOT_MODIFIED, "a list, and the tag without W/, match too");
        let (status, _, _) = get(dir.path(), &wasm, &[("if-none-match", "\"stale\"")]);
        assert_eq!(status, StatusCode::OK);

        // A .gz older than the file (the file rebuilt since) is not served.
        let old = std::time::SystemTime::now() - std::time::Duration::from_secs(3600);
        std::fs::File::options().write(true).open(dir.path().join(format!("{wasm}.gz")))?.set_modified(old)?;
        let (_, heads, body) = get(dir.path(), &wasm, &[("accept-encoding", "gzip")]);
        assert_eq!((body.as_slice(), header(&heads, &header::CONTENT_ENCODING)), (&b"plain wasm"[..], None));

        // Only the bundle's two files, by exact name.
        for name in ["../secret", "other.js", &format!("{wasm}.gz")] {
            assert_eq!(get(dir.path(), name, &[]).0, StatusCode::NOT_FOUND, "{name}");
        }
        Ok(())
    }
}
