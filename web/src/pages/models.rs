//! `/models`: the registry by name with stages, promote and roll back (a confirmation box and
//! the write token), and the audit trail. Plain HTML forms: they work without JavaScript; the
//! server function redirects back here, with the error in the address when one happened.

use leptos::prelude::*;
use leptos::server::ServerAction;
use leptos_router::hooks::use_query_map;

use super::when;
use crate::api::{AbView, ModelItem, Promote, Rollback, StartAb, StopAb, ab_overview, registry};

/// The message of a server function error carried back in `__err` (URL-safe base64 of
/// `Kind|message`).
pub fn error_message(encoded: &str) -> Option<String> {
    let value = |c: u8| match c {
        b'A'..=b'Z' => Some(c - b'A'),
        b'a'..=b'z' => Some(c - b'a' + 26),
        b'0'..=b'9' => Some(c - b'0' + 52),
        b'-' | b'+' => Some(62),
        b'_' | b'/' => Some(63),
        _ => None,
    };
    let (mut out, mut acc, mut bits) = (Vec::new(), 0u32, 0u32);
    for v in encoded.bytes().filter_map(value) {
        acc = (acc << 6) | u32::from(v);
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
        }
    }
    let text = String::from_utf8(out).ok()?;
    Some(text.split_once('|').map_or(text.clone(), |(_, m)| m.to_string()))
}

fn write_fields() -> impl IntoView {
    view! {
        <label class="confirm"><input type="checkbox" name="confirm" value="yes" required/>" I am sure"</label>
        <input type="password" name="token" placeholder="write token" required autocomplete="off"/>
    }
}

fn version_row(m: ModelItem, promote: ServerAction<Promote>) -> impl IntoView {
    let production = m.stage == "production";
    view! {
        <tr class=format!("stage-{}", m.stage)>
            <td>{format!("{}@{}", m.name, m.version)}</td>
            <td><span class=format!("badge {}", m.stage)>{m.stage.clone()}</span></td>
            <td><a href=format!("/runs/{}", m.run_id)>{m.run_id.clone()}</a></td>
            <td class="num">{m.held_out.clone()}</td>
            <td>{when(m.created_ms)}</td>
            <td>
                {(!production).then(|| view! {
                    <ActionForm action=promote attr:class="inline">
                        <input type="hidden" name="name" value=m.name.clone()/>
                        <input type="hidden" name="version" value=m.version/>
                        {write_fields()}
                        <button type="submit">{format!("Promote v{}", m.version)}</button>
                    </ActionForm>
                })}
            </td>
        </tr>
    }
}

fn accuracy(a: Option<(f64, f64, f64)>) -> String {
    a.map_or_else(|| "—".into(), |(p, lo, hi)| format!("{:.1}% [{:.1}, {:.1}]", p * 100.0, lo * 100.0, hi * 100.0))
}

/// A model's A/B tests, and the forms to start or end one.
fn ab_section(
    name: String,
    tests: Vec<AbView>,
    candidates: Vec<i64>,
    start: ServerAction<StartAb>,
    stop: ServerAction<StopAb>,
) -> impl IntoView {
    let running = tests.iter().any(|t| t.status == "running");
    let rows = tests
        .into_iter()
        .take(5)
        .map(|t| {
            let arm = |a: &crate::api::ArmView| format!("v{}: {} predictions, {} rated, accuracy {}", a.version, a.predictions, a.rated, accuracy(a.accuracy));
            let live = t.status == "running";
            let id = t.id.clone();
            view! {
                <tr class=format!("ab-{}", t.status)>
                    <td><span class=format!("badge {}", t.status)>{t.status.clone()}</span><div class="sub">{when(t.started_ms)}</div></td>
                    <td>{format!("{:.0}% of sessions", t.share * 100.0)}<div class="sub">{if t.auto_decide { "decides on its own" } else { "decided by hand" }}</div></td>
                    <td>{arm(&t.production)}</td>
                    <td>{arm(&t.candidate)}</td>
                    <td><b>{t.verdict.clone()}</b><div class="sub">{t.note.clone().unwrap_or_default()}</div></td>
                    <td>{live.then(|| view! {
                        <ActionForm action=stop attr:class="inline ab-stop">
                            <input type="hidden" name="id" value=id.clone()/>
                            <select name="action">
                                <option value="promote">"promote the candidate"</option>
                                <option value="rollback">"roll it back"</option>
                                <option value="stop">"just stop"</option>
                            </select>
                            <input type="password" name="token" placeholder="write token" required autocomplete="off"/>
                            <button type="submit">"End test"</button>
                        </ActionForm>
                    })}</td>
                </tr>
            }
        })
        .collect_view();
    view! {
        <h3>"A/B tests"</h3>
        <table class="ab">
            <thead><tr><th>"Status"</th><th>"Share"</th><th>"Production"</th><th>"Candidate"</th><th>"Verdict"</th><th></th></tr></thead>
            <tbody>{rows}</tbody>
        </table>
        {(!running && !candidates.is_empty()).then(|| view! {
            <ActionForm action=start attr:class="inline ab-start">
                <input type="hidden" name="model" value=name.clone()/>
                "Test version "
                <select name="candidate">
                    {candidates.into_iter().map(|v| view! { <option value=v>{format!("v{v}")}</option> }).collect_view()}
                </select>
                " on "
                <input type="number" name="share" value="0.2" min="0.01" max="0.99" step="0.01"/>
                " of sessions"
                <label class="confirm"><input type="checkbox" name="manual" value="yes"/>" decide by hand"</label>
                <input type="password" name="token" placeholder="write token" required autocomplete="off"/>
                <button type="submit">"Start A/B test"</button>
            </ActionForm>
        })}
    }
}

#[component]
pub fn ModelsPage() -> impl IntoView {
    let promote = ServerAction::<Promote>::new();
    let rollback = ServerAction::<Rollback>::new();
    let start = ServerAction::<StartAb>::new();
    let stop = ServerAction::<StopAb>::new();
    // Hydrated, the forms post in the background: reload the registry after each action.
    let versions =
        move || (promote.version().get(), rollback.version().get(), start.version().get(), stop.version().get());
    let data = Resource::new(versions, |_| registry());
    let tests = Resource::new(versions, |_| ab_overview());
    let query = use_query_map();
    let failure = move || {
        let from_action = [promote.value().get(), rollback.value().get(), start.value().get(), stop.value().get()]
            .into_iter()
            .flatten()
            .find_map(|r| r.err())
            .map(|e| e.to_string().split_once(": ").map_or(e.to_string(), |(_, m)| m.to_string()));
        from_action.or_else(|| query.read().get("__err").and_then(|e| error_message(&e)))
    };
    view! {
        <h1>"Models"</h1>
        {move || failure().map(|m| view! { <p class="error">{format!("The last action failed: {m}")}</p> })}
        <Suspense fallback=|| view! { <p>"Loading…"</p> }>
            {move || Suspend::new(async move {
                match data.await {
                    Err(e) => view! { <p class="error">{e.to_string()}</p> }.into_any(),
                    Ok(r) if r.models.is_empty() => view! {
                        <p class="empty">"No registered models yet. Register a run's best model: "
                            <code>"tuneforge models register RUN_ID --name NAME"</code>" (the demo registers one)."</p>
                    }.into_any(),
                    Ok(r) => {
                        let all_tests = tests.await.unwrap_or_default();
                        let mut names: Vec<String> = r.models.iter().map(|m| m.name.clone()).collect();
                        names.dedup();
                        let groups = names.into_iter().map(|name| {
                            let versions: Vec<ModelItem> = r.models.iter().filter(|m| m.name == name).cloned().collect();
                            let candidates: Vec<i64> = versions.iter().filter(|m| m.stage != "production").map(|m| m.version).collect();
                            let has_production = versions.iter().any(|m| m.stage == "production");
                            let mine: Vec<AbView> = all_tests.iter().filter(|t| t.model == name).cloned().collect();
                            let ab = has_production.then(|| ab_section(name.clone(), mine, candidates, start, stop));
                            view! {
                                <section class="model">
                                    <h2>{name.clone()}</h2>
                                    <table class="models">
                                        <thead><tr><th>"Version"</th><th>"Stage"</th><th>"Run"</th><th>"Held-out"</th><th>"Registered (UTC)"</th><th></th></tr></thead>
                                        <tbody>{versions.into_iter().map(|m| version_row(m, promote)).collect_view()}</tbody>
                                    </table>
                                    <ActionForm action=rollback attr:class="inline rollback">
                                        <input type="hidden" name="name" value=name.clone()/>
                                        {write_fields()}
                                        <button type="submit">"Roll back to the previous production version"</button>
                                    </ActionForm>
                                    {ab}
                                </section>
                            }
                        }).collect_view();
                        let events = r.events.into_iter().map(|e| view! {
                            <tr><td>{when(e.time_ms)}</td><td>{e.kind}</td><td>{e.subject}</td><td>{e.detail}</td><td>{e.actor}</td></tr>
                        }).collect_view();
                        view! {
                            {groups}
                            <h2>"Audit trail"</h2>
                            <table class="events">
                                <thead><tr><th>"When (UTC)"</th><th>"Event"</th><th>"Subject"</th><th>"Detail"</th><th>"Actor"</th></tr></thead>
                                <tbody>{events}</tbody>
                            </table>
                        }.into_any()
                    }
                }
            })}
        </Suspense>
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn errors_come_back_from_the_address() {
        // URL-safe base64 of "ServerError|the write token is wrong".
        let encoded = "U2VydmVyRXJyb3J8dGhlIHdyaXRlIHRva2VuIGlzIHdyb25n";
        assert_eq!(super::error_message(encoded).as_deref(), Some("the write token is wrong"));
    }
}
