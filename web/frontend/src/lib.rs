//! The dashboard's hydration entry point: the browser calls `hydrate()` once the bundle is
//! loaded (Leptos' `HydrationScripts`); the server-rendered pages become interactive.

use wasm_bindgen::prelude::wasm_bindgen;

#[wasm_bindgen]
pub fn hydrate() {
    leptos::mount::hydrate_body(tuneforge_web::App);
    // A marker for the end-to-end test (and anyone curious) that hydration ran.
    if let Some(body) = leptos::prelude::document().body() {
        let _ = body.set_attribute("data-hydrated", "true");
    }
}
