//! `/playground`: pick a served model, type a text, see the label and every probability (or a
//! language model's answer); then rate the answer (correct or wrong), give the right label (or
//! write the better answer) and a comment — stored as feedback that the next fine-tune can
//! use. Plain forms; each step is a page of its own.

use leptos::prelude::*;
use leptos::server::ServerAction;
use leptos_router::hooks::use_query_map;

use super::models::error_message;
use crate::api::{GiveFeedback, PredictionView, TryModel, prediction, served_models};

fn answer(p: PredictionView, feedback: ServerAction<GiveFeedback>) -> impl IntoView {
    let shown = if p.generated {
        view! { <blockquote class="generated">{p.label.clone()}</blockquote> }.into_any()
    } else {
        let bars = p
            .probabilities
            .iter()
            .take(10)
            .map(|(l, v)| {
                view! {
                    <tr><td>{l.clone()}</td><td class="num">{format!("{v:.3}")}</td>
                    <td class="wide"><div class="bar"><div style=format!("width:{:.1}%", v * 100.0)></div></div></td></tr>
                }
            })
            .collect_view();
        view! {
            <p class="label">"→ "<b>{p.label.clone()}</b></p>
            <table class="probs"><tbody>{bars}</tbody></table>
        }
        .into_any()
    };
    // A label is chosen from the model's; an answer is written out.
    let correction = if p.generated {
        view! {
            <label><input type="radio" name="rating" value="wrong"/>" wrong — a better answer is:"</label>
            <textarea name="corrected_label" rows="4" maxlength="20000" placeholder="the answer it should have given (optional)"></textarea>
        }
        .into_any()
    } else {
        let labels: Vec<String> = p.probabilities.iter().map(|(l, _)| l.clone()).collect();
        view! {
            <label><input type="radio" name="rating" value="wrong"/>" wrong — the right label is "</label>
            <select name="corrected_label">
                <option value="">"(choose)"</option>
                {labels.into_iter().map(|l| view! { <option value=l.clone()>{l.clone()}</option> }).collect_view()}
            </select>
        }
        .into_any()
    };
    view! {
        <section class="answer">
            <p class="sub">{format!("{}@{} answered", p.model, p.version)}</p>
            <blockquote>{p.input.clone()}</blockquote>
            {shown}
        </section>
        <section>
            <h2>"Was it right?"</h2>
            <ActionForm action=feedback attr:class="feedback">
                <input type="hidden" name="prediction_id" value=p.id.clone()/>
                <label><input type="radio" name="rating" value="correct" required/>" correct"</label>
                {correction}
                <input type="text" name="comment" placeholder="comment (optional)" maxlength="10000"/>
                <input type="password" name="token" placeholder="write token" required autocomplete="off"/>
                <button type="submit">"Send feedback"</button>
            </ActionForm>
        </section>
    }
}

#[component]
pub fn PlaygroundPage() -> impl IntoView {
    let try_it = ServerAction::<TryModel>::new();
    let feedback = ServerAction::<GiveFeedback>::new();
    let query = use_query_map();
    let models = Resource::new(|| (), |_| served_models());
    let shown = Resource::new(
        move || query.read().get("prediction"),
        |id| async move {
            match id {
                Some(id) => prediction(id).await.map(Some),
                None => Ok(None),
            }
        },
    );
    let failure = move || query.read().get("__err").and_then(|e| error_message(&e));
    view! {
        <h1>"Playground"</h1>
        {move || failure().map(|m| view! { <p class="error">{format!("That did not work: {m}")}</p> })}
        <Suspense fallback=|| view! { <p>"Loading…"</p> }>
            {move || Suspend::new(async move {
                let served = models.await.unwrap_or_default();
                if served.is_empty() {
                    return view! { <p class="empty">"No model is in production yet: register and promote one on the "
                        <a href="/models">"Models"</a>" page (the demo does)."</p> }.into_any();
                }
                let current = shown.await;
                view! {
                    <ActionForm action=try_it attr:class="try">
                        <label>"Model "
                            <select name="model">
                                {served.into_iter().map(|(n, v)| view! { <option value=n.clone()>{format!("{n} (v{v})")}</option> }).collect_view()}
                            </select>
                        </label>
                        <textarea name="text" rows="3" required placeholder="Type a text to classify (or a question for a language model)"></textarea>
                        <input type="password" name="token" placeholder="write token" required autocomplete="off"/>
                        <button type="submit">"Try it"</button>
                    </ActionForm>
                    {match current {
                        Ok(Some(p)) => answer(p, feedback).into_any(),
                        Ok(None) => ().into_any(),
                        Err(e) => view! { <p class="error">{e.to_string()}</p> }.into_any(),
                    }}
                }.into_any()
            })}
        </Suspense>
    }
}
