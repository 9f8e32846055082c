//! `/runs/:id`: one run — status, key figures, gates, plugins (lineage), curves, confusion
//! matrix heat map, per-class recall, and the resolved config.

use leptos::prelude::*;
use leptos_router::hooks::use_params_map;
use serde_json::Value;

use super::{Chart, duration, metric, when};
use crate::api::{RunDetail, get_run};
use crate::charts::heat;

fn figures(summary: &Value) -> Vec<(&'static str, String)> {
    let num = |v: &Value| v.as_f64().map(|x| format!("{x:.4}")).unwrap_or_else(|| "—".into());
    let int = |v: &Value| v.as_u64().map(|x| x.to_string()).unwrap_or_else(|| "—".into());
    vec![
        ("validation loss", num(&summary["validation"]["loss"])),
        ("trainable / total", num(&summary["trainable_ratio"])),
        ("parameters", int(&summary["params_total"])),
        ("training examples", int(&summary["train_examples"])),
        ("validation examples", int(&summary["validation_examples"])),
        ("training seconds", num(&summary["train_seconds"])),
        ("tokens / s", num(&summary["train_tokens_per_s"])),
        ("best step", int(&summary["best_step"])),
    ]
}

fn confusion(summary: &Value) -> impl IntoView + use<> {
    let labels: Vec<String> = summary["labels"]
        .as_array()
        .map(|a| a.iter().filter_map(|l| l.as_str().map(String::from)).collect())
        .unwrap_or_default();
    let matrix: Vec<Vec<u64>> = summary["validation"]["metrics"]["confusion"]
        .as_array()
        .map(|rows| {
            rows.iter()
                .map(|r| r.as_array().map(|c| c.iter().filter_map(Value::as_u64).collect()).unwrap_or_default())
                .collect()
        })
        .unwrap_or_default();
    if matrix.is_empty() || matrix.len() != labels.len() {
        return view! { <p class="empty">"No confusion matrix (the run has no validation report)."</p> }.into_any();
    }
    let header = labels.iter().enumerate().map(|(j, l)| view! { <th title=l.clone()>{j + 1}</th> }).collect_view();
    let rows = matrix
        .into_iter()
        .enumerate()
        .map(|(i, row)| {
            let total = row.iter().sum::<u64>().max(1) as f64;
            let cells = row
                .into_iter()
                .map(|n| {
                    let share = n as f64 / total;
                    let dark = if share > 0.55 { " dark" } else { "" };
                    view! { <td class=format!("cell{dark}") style=format!("background:{}", heat(share))>{(n > 0).then_some(n)}</td> }
                })
                .collect_view();
            view! { <tr><th class="rowlabel">{format!("{} {}", i + 1, labels[i])}</th>{cells}</tr> }
        })
        .collect_view();
    view! {
        <table class="confusion">
            <thead><tr><th>"gold \\ predicted"</th>{header}</tr></thead>
            <tbody>{rows}</tbody>
        </table>
    }
    .into_any()
}

fn recall(summary: &Value) -> impl IntoView + use<> {
    let classes = summary["validation"]["metrics"]["per_class"].as_array().cloned().unwrap_or_default();
    let rows = classes
        .into_iter()
        .map(|c| {
            let r = c["recall"].as_f64().unwrap_or(0.0);
            view! {
                <tr>
                    <td>{c["label"].as_str().unwrap_or("?").to_string()}</td>
                    <td class="num">{format!("{r:.3}")}</td>
                    <td class="num">{format!("{:.3}", c["precision"].as_f64().unwrap_or(0.0))}</td>
                    <td class="num">{c["support"].as_u64().unwrap_or(0)}</td>
                    <td><div class="bar"><div style=format!("width:{:.0}%", r * 100.0)></div></div></td>
                </tr>
            }
        })
        .collect_view();
    view! {
        <table class="recall">
            <thead><tr><th>"Class"</th><th>"Recall"</th><th>"Precision"</th><th>"Support"</th><th></th></tr></thead>
            <tbody>{rows}</tbody>
        </table>
    }
}

fn detail(d: RunDetail) -> impl IntoView {
    let r = d.run;
    let summary = d.summary.unwrap_or(Value::Null);
    let gates = summary["gates"].as_array().cloned().unwrap_or_default();
    let loss: Vec<_> = d.series.iter().filter(|s| s.label == "training loss").cloned().collect();
    let validation: Vec<_> = d.series.iter().filter(|s| s.label.starts_with("validation")).cloned().collect();
    let lr: Vec<_> = d.series.iter().filter(|s| s.label == "learning rate").cloned().collect();
    let plugin_metrics: Vec<(String, f64)> = summary["validation"]["plugin_metrics"]
        .as_object()
        .map(|m| {
            m.iter()
                .filter(|(k, _)| !k.contains(":recall:"))
                .filter_map(|(k, v)| v.as_f64().map(|v| (k.clone(), v)))
                .collect()
        })
        .unwrap_or_default();
    let live = r.status == "running";
    view! {
        // In progress: the browser fetches the page's data again every few seconds (see
        // `RunPage`); without JavaScript the page reloads itself.
        {live.then(|| view! {
            <noscript><meta http-equiv="refresh" content="10"/></noscript>
            <p class="sub live">"In progress: this page follows the run as it trains."</p>
        })}
        <h1>{r.name.clone()} " " <span class=format!("badge {}", r.status)>{r.status.clone()}</span></h1>
        <p class="sub">{r.id.clone()}" · "{r.method.clone()}" · "{r.model_source.clone()}" · started "{when(r.started_ms)}" UTC · "{duration(r.started_ms, r.finished_ms)}</p>
        {r.error.clone().map(|e| view! { <p class="error">{e}</p> })}
        <section class="cards">
            <div class="card"><b>"accuracy"</b><span>{metric(r.accuracy)}</span></div>
            <div class="card"><b>"macro-F1"</b><span>{metric(r.macro_f1)}</span></div>
            {figures(&summary).into_iter().map(|(k, v)| view! { <div class="card"><b>{k}</b><span>{v}</span></div> }).collect_view()}
            {plugin_metrics.into_iter().map(|(k, v)| view! { <div class="card"><b>{k}</b><span>{format!("{v:.4}")}</span></div> }).collect_view()}
        </section>
        <section>
            <h2>"Gates"</h2>
            {if gates.is_empty() {
                view! { <p class="empty">"No gates."</p> }.into_any()
            } else {
                view! { <ul class="gates">{gates.into_iter().map(|g| {
                    let passed = g["passed"].as_bool().unwrap_or(false);
                    view! { <li class=if passed { "pass" } else { "fail" }>
                        {if passed { "passed " } else { "FAILED " }}<b>{g["name"].as_str().unwrap_or("?").to_string()}</b>
                        {format!(": {:.4} (threshold {:.4})", g["value"].as_f64().unwrap_or(f64::NAN), g["threshold"].as_f64().unwrap_or(f64::NAN))}
                    </li> }
                }).collect_view()}</ul> }.into_any()
            }}
        </section>
        <section>
            <h2>"Curves"</h2>
            <div class="charts">
                <Chart title="Training loss".to_string() series=loss/>
                <Chart title="Validation".to_string() series=validation/>
                <Chart title="Learning rate".to_string() series=lr/>
            </div>
        </section>
        <section>
            <h2>"Plugins"</h2>
            {if d.plugins.is_empty() {
                view! { <p class="empty">"This run called no plugins."</p> }.into_any()
            } else {
                view! { <table class="plugins">
                    <thead><tr><th>"Plugin"</th><th>"Version"</th><th>"Kind"</th><th>"API"</th><th>"SHA-256"</th></tr></thead>
                    <tbody>{d.plugins.into_iter().map(|p| view! {
                        <tr><td>{p.name}</td><td>{p.version}</td><td>{p.kind}</td><td>{p.api_version}</td><td><code>{p.sha256}</code></td></tr>
                    }).collect_view()}</tbody>
                </table> }.into_any()
            }}
        </section>
        <section>
            <h2>"Confusion matrix"</h2>
            {confusion(&summary)}
            <h2>"Per-class recall"</h2>
            {recall(&summary)}
        </section>
        <section>
            <h2>"Config"</h2>
            <pre class="config">{d.config}</pre>
        </section>
    }
}

#[component]
pub fn RunPage() -> impl IntoView {
    let params = use_params_map();
    let data = Resource::new(move || params.read().get("id").unwrap_or_default(), get_run);
    // A run in progress is followed in place: its data is fetched again every 3 s until it
    // ends (the effect runs in the browser only; each answer re-arms or stops the timer).
    Effect::new(move |_| {
        let running = data.get().and_then(Result::ok).is_some_and(|d| d.run.status == "running");
        if running && let Ok(timer) = set_interval_with_handle(move || data.refetch(), LIVE_EVERY) {
            on_cleanup(move || timer.clear());
        }
    });
    view! {
        <p><a href="/">"← all runs"</a></p>
        <Transition fallback=|| view! { <p>"Loading…"</p> }>
            {move || Suspend::new(async move {
                match data.await {
                    Ok(d) => detail(d).into_any(),
                    Err(e) => {
                        // Rendered on the server: an unknown run is a 404, not a page that says so.
                        #[cfg(feature = "ssr")]
                        if e.to_string().contains("not found")
                            && let Some(response) = use_context::<leptos_actix::ResponseOptions>()
                        {
                            response.set_status(actix_web::http::StatusCode::NOT_FOUND);
                        }
                        view! { <p class="error">{e.to_string()}</p> }.into_any()
                    }
                }
            })}
        </Transition>
    }
}

/// How often the page of a run in progress fetches its data again.
const LIVE_EVERY: std::time::Duration = std::time::Duration::from_secs(3);
