//! `/`: the runs list — filter by status and name, sort, pages, progress of running runs.

use leptos::prelude::*;
use leptos_router::hooks::use_query_map;

use super::{duration, metric, when};
use crate::api::{RunItem, list_runs};

fn row(r: RunItem) -> impl IntoView {
    let progress = if r.status == "running" && r.total_steps > 0 {
        format!("{} / {} steps", r.steps, r.total_steps)
    } else {
        format!("{} steps", r.steps)
    };
    let pct = if r.total_steps > 0 { 100 * r.steps / r.total_steps } else { 0 };
    view! {
        <tr class=format!("status-{}", r.status)>
            <td><input type="checkbox" name="id" value=r.id.clone() aria-label="compare"/></td>
            <td><a href=format!("/runs/{}", r.id)>{r.name.clone()}</a><div class="sub">{r.id.clone()}</div></td>
            <td><span class=format!("badge {}", r.status)>{r.status.clone()}</span></td>
            <td class="sub" title=r.model_source.clone()>
                {r.dataset_hash.as_deref().map_or_else(|| "—".to_string(), |h| format!("data {}", &h[..h.len().min(10)]))}
            </td>
            <td>{r.method.clone()}</td>
            <td class="num">{metric(r.accuracy)}</td>
            <td class="num">{metric(r.macro_f1)}</td>
            <td>
                {progress}
                <div class="bar"><div style=format!("width:{pct}%")></div></div>
            </td>
            <td>{when(r.started_ms)}</td>
            <td>{duration(r.started_ms, r.finished_ms)}</td>
        </tr>
    }
}

#[component]
pub fn RunsPage() -> impl IntoView {
    let query = use_query_map();
    let args = move || {
        let q = query.read();
        let page = q.get("page").and_then(|p| p.parse::<i64>().ok()).unwrap_or(1);
        (q.get("status"), q.get("q"), q.get("sort"), q.get("order").as_deref() == Some("asc"), page)
    };
    let data = Resource::new(args, |(status, q, sort, asc, page)| list_runs(status, q, sort, asc, page));
    let current = move || query.read().clone();
    let filtered = move || {
        let q = query.read();
        q.get("status").is_some_and(|s| !s.is_empty()) || q.get("q").is_some_and(|s| !s.trim().is_empty())
    };
    view! {
        <h1>"Runs"</h1>
        <form method="get" action="/" class="filters">
            <label>"Status "
                <select name="status">
                    {["", "running", "succeeded", "failed", "interrupted"].into_iter().map(|s| {
                        let selected = current().get("status").unwrap_or_default() == s;
                        view! { <option value=s selected=selected>{if s.is_empty() { "any" } else { s }}</option> }
                    }).collect_view()}
                </select>
            </label>
            <label>"Name " <input type="search" name="q" value=move || current().get("q").unwrap_or_default()/></label>
            <label>"Sort "
                <select name="sort">
                    {[("started", "started"), ("accuracy", "accuracy"), ("macro_f1", "macro-F1"), ("name", "name")].into_iter().map(|(v, l)| {
                        let selected = current().get("sort").unwrap_or_default() == v;
                        view! { <option value=v selected=selected>{l}</option> }
                    }).collect_view()}
                </select>
            </label>
            <label>"Order "
                <select name="order">
                    <option value="desc">"descending"</option>
                    <option value="asc" selected=move || current().get("order").as_deref() == Some("asc")>"ascending"</option>
                </select>
            </label>
            <button type="submit">"Apply"</button>
        </form>
        <Suspense fallback=|| view! { <p>"Loading…"</p> }>
            {move || Suspend::new(async move {
                match data.await {
                    Err(e) => view! { <p class="error">{e.to_string()}</p> }.into_any(),
                    Ok(page) if page.total == 0 && filtered() => view! {
                        <p class="empty">"No run matches these filters. "<a href="/">"Show all runs"</a></p>
                    }.into_any(),
                    Ok(page) if page.total == 0 => view! {
                        <div class="empty">
                            <p>"No runs yet."</p>
                            <p>"Train one and it appears here: "<code>"tuneforge train --config examples/symptom-triage.toml"</code>
                               " (or run the demo: "<code>"cargo xtask demo"</code>")."</p>
                        </div>
                    }.into_any(),
                    Ok(page) => {
                        // Live progress without JavaScript: a page with running runs reloads itself.
                        let live = page.runs.iter().any(|r| r.status == "running");
                        let q = current();
                        let link = move |p: i64| {
                            let mut q = q.clone();
                            q.replace("page", p.to_string());
                            format!("/?{}", q.to_query_string().trim_start_matches('?'))
                        };
                        let (prev, next) = (link(page.page - 1), link(page.page + 1));
                        view! {
                            {live.then(|| view! { <meta http-equiv="refresh" content="10"/> <p class="sub">"Runs are in progress; this page refreshes every 10 s."</p> })}
                            <form method="get" action="/compare">
                                <table class="runs">
                                    <thead><tr>
                                        <th></th><th>"Run"</th><th>"Status"</th><th>"Dataset"</th><th>"Method"</th><th>"Accuracy"</th>
                                        <th>"Macro-F1"</th><th>"Progress"</th><th>"Started (UTC)"</th><th>"Duration"</th>
                                    </tr></thead>
                                    <tbody>{page.runs.into_iter().map(row).collect_view()}</tbody>
                                </table>
                                <div class="pager">
                                    <button type="submit">"Compare selected"</button>
                                    <span>{format!("{} runs · page {} of {}", page.total, page.page, page.pages)}</span>
                                    {(page.page > 1).then(|| view! { <a href=prev>"← previous"</a> })}
                                    {(page.page < page.pages).then(|| view! { <a href=next>"next →"</a> })}
                                </div>
                            </form>
                        }.into_any()
                    }
                }
            })}
        </Suspense>
    }
}
