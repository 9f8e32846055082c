//! `/feedback`: the feedback queue — filter by model, label, rating and review state, mark
//! reviewed, and export the corrections as a JSONL dataset that `tuneforge train` reads.

use leptos::prelude::*;
use leptos::server::ServerAction;
use leptos_router::hooks::use_query_map;

use super::models::error_message;
use super::when;
use crate::api::{FeedbackItem, MarkReviewed, feedback_queue};

fn row(f: FeedbackItem, review: ServerAction<MarkReviewed>) -> impl IntoView {
    let right =
        f.corrected_label.clone().unwrap_or_else(|| if f.rating == "correct" { f.output.clone() } else { "—".into() });
    view! {
        <tr class=if f.reviewed { "reviewed" } else { "open" }>
            <td>{when(f.time_ms)}</td>
            <td>{f.model.clone()}</td>
            <td class="text">{f.input.clone()}</td>
            <td>{f.output.clone()}</td>
            <td><span class=format!("badge {}", f.rating)>{f.rating.clone()}</span></td>
            <td>{right}</td>
            <td class="text">{f.comment.clone().unwrap_or_default()}</td>
            <td>
                {if f.reviewed {
                    view! { <span class="sub">"reviewed"</span> }.into_any()
                } else {
                    view! {
                        <ActionForm action=review attr:class="inline">
                            <input type="hidden" name="id" value=f.id.clone()/>
                            <input type="password" name="token" placeholder="write token" required autocomplete="off"/>
                            <button type="submit">"Mark reviewed"</button>
                        </ActionForm>
                    }.into_any()
                }}
            </td>
        </tr>
    }
}

#[component]
pub fn FeedbackPage() -> impl IntoView {
    let review = ServerAction::<MarkReviewed>::new();
    let query = use_query_map();
    let args = move || {
        let q = query.read();
        (q.get("model"), q.get("label"), q.get("rating"), q.get("reviewed"))
    };
    let data = Resource::new(move || (args(), review.version().get()), |((m, l, r, v), _)| feedback_queue(m, l, r, v));
    let get = move |k: &str| query.read().get(k).unwrap_or_default();
    let failure = move || {
        let from_action = review.value().get().and_then(|r| r.err()).map(|e| e.to_string());
        from_action.or_else(|| query.read().get("__err").and_then(|e| error_message(&e)))
    };
    let export = move || {
        let model = get("model");
        if model.is_empty() {
            "/api/v1/feedback/export".to_string()
        } else {
            format!("/api/v1/feedback/export?model={model}")
        }
    };
    view! {
        <h1>"Feedback"</h1>
        {move || failure().map(|m| view! { <p class="error">{format!("That did not work: {m}")}</p> })}
        <form method="get" action="/feedback" class="filters">
            <label>"Model " <input type="search" name="model" value=move || get("model")/></label>
            <label>"Label " <input type="search" name="label" value=move || get("label")/></label>
            <label>"Rating "
                <select name="rating">
                    {["", "correct", "wrong"].into_iter().map(|v| {
                        let selected = get("rating") == v;
                        view! { <option value=v selected=selected>{if v.is_empty() { "any" } else { v }}</option> }
                    }).collect_view()}
                </select>
            </label>
            <label>"Reviewed "
                <select name="reviewed">
                    {[("", "any"), ("no", "not yet"), ("yes", "reviewed")].into_iter().map(|(v, l)| {
                        let selected = get("reviewed") == v;
                        view! { <option value=v selected=selected>{l}</option> }
                    }).collect_view()}
                </select>
            </label>
            <button type="submit">"Apply"</button>
            <a href=export>"Export corrections (JSONL)"</a>
        </form>
        <Suspense fallback=|| view! { <p>"Loading…"</p> }>
            {move || Suspend::new(async move {
                match data.await {
                    Err(e) => view! { <p class="error">{e.to_string()}</p> }.into_any(),
                    Ok(rows) if rows.is_empty() => view! {
                        <p class="empty">"No feedback here yet. Try a model in the "<a href="/playground">"playground"</a>
                            " and tell it whether it was right."</p>
                    }.into_any(),
                    Ok(rows) => view! {
                        <table class="feedback">
                            <thead><tr><th>"When (UTC)"</th><th>"Model"</th><th>"Text"</th><th>"Answer"</th><th>"Rating"</th>
                                <th>"Right label"</th><th>"Comment"</th><th></th></tr></thead>
                            <tbody>{rows.into_iter().map(|f| row(f, review)).collect_view()}</tbody>
                        </table>
                    }.into_any(),
                }
            })}
        </Suspense>
    }
}
