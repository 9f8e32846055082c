//! `/compare?id=A&id=B`: 2–5 runs — overlaid curves, the hyper-parameters that differ, the
//! final metrics.

use leptos::prelude::*;
use leptos_router::hooks::use_query_map;

use super::{Chart, metric};
use crate::api::compare_runs;

#[component]
pub fn ComparePage() -> impl IntoView {
    let query = use_query_map();
    let ids = move || query.read().get_all("id").unwrap_or_default();
    let data = Resource::new(ids, compare_runs);
    view! {
        <h1>"Compare runs"</h1>
        <Suspense fallback=|| view! { <p>"Loading…"</p> }>
            {move || Suspend::new(async move {
                match data.await {
                    Err(e) => view! { <p class="error">{e.to_string()}</p> }.into_any(),
                    Ok(c) if c.runs.len() < 2 => view! {
                        <p class="empty">"Pick two to five runs on the "<a href="/">"runs list"</a>" and press “Compare selected”."</p>
                    }.into_any(),
                    Ok(c) => {
                        let header = c.runs.iter().map(|r| view! { <th><a href=format!("/runs/{}", r.id)>{r.name.clone()}</a><div class="sub">{r.id.clone()}</div></th> }).collect_view();
                        let header2 = header.clone();
                        view! {
                            <div class="charts">
                                <Chart title="Training loss".to_string() series=c.loss/>
                                <Chart title=c.validation_title.clone() series=c.validation/>
                            </div>
                            <h2>"Final metrics"</h2>
                            <table class="compare">
                                <thead><tr><th></th>{header}</tr></thead>
                                <tbody>
                                    <tr><th>"status"</th>{c.runs.iter().map(|r| view! { <td>{r.status.clone()}</td> }).collect_view()}</tr>
                                    <tr><th>"accuracy"</th>{c.runs.iter().map(|r| view! { <td class="num">{metric(r.accuracy)}</td> }).collect_view()}</tr>
                                    <tr><th>"macro-F1"</th>{c.runs.iter().map(|r| view! { <td class="num">{metric(r.macro_f1)}</td> }).collect_view()}</tr>
                                    <tr><th>"steps"</th>{c.runs.iter().map(|r| view! { <td class="num">{r.steps}</td> }).collect_view()}</tr>
                                </tbody>
                            </table>
                            <h2>"Hyper-parameters that differ"</h2>
                            {if c.differences.is_empty() {
                                view! { <p class="empty">"The configs agree on everything but their paths."</p> }.into_any()
                            } else {
                                view! { <table class="compare diff">
                                    <thead><tr><th>"key"</th>{header2}</tr></thead>
                                    <tbody>{c.differences.into_iter().map(|(k, vs)| view! {
                                        <tr><th><code>{k}</code></th>{vs.into_iter().map(|v| view! { <td><code>{v}</code></td> }).collect_view()}</tr>
                                    }).collect_view()}</tbody>
                                </table> }.into_any()
                            }}
                        }.into_any()
                    }
                }
            })}
        </Suspense>
    }
}
