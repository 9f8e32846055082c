//! Server functions: what the pages read from the experiment store, as plain serialisable
//! data (the store's own types stay on the server).

use leptos::prelude::*;
use serde::{Deserialize, Serialize};

use crate::charts::Series;

/// Where the server functions answer (outside the REST API's `/api/v1`).
pub const PREFIX: &str = "/dashboard/api";
/// Rows per page of the runs list.
pub const PER_PAGE: i64 = 50;
/// Points per chart line.
#[cfg(feature = "ssr")]
const MAX_POINTS: i64 = 400;

/// A run as a row of the list.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunItem {
    pub id: String,
    pub name: String,
    pub status: String,
    pub method: String,
    pub model_source: String,
    /// SHA-256 of the training examples (`None` until the run has read its data).
    pub dataset_hash: Option<String>,
    pub accuracy: Option<f64>,
    pub macro_f1: Option<f64>,
    pub steps: i64,
    pub total_steps: i64,
    pub started_ms: i64,
    pub finished_ms: Option<i64>,
    pub error: Option<String>,
}

/// One page of the runs list.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunsPage {
    pub runs: Vec<RunItem>,
    pub total: i64,
    pub page: i64,
    pub pages: i64,
}

/// A plugin a run called.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PluginItem {
    pub name: String,
    pub version: String,
    pub kind: String,
    pub sha256: String,
    pub api_version: String,
}

/// Everything the run page shows.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunDetail {
    pub run: RunItem,
    pub config: String,
    pub summary: Option<serde_json::Value>,
    pub plugins: Vec<PluginItem>,
    /// Training loss, then the validation metrics, each downsampled.
    pub series: Vec<Series>,
}

/// Runs side by side.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Comparison {
    pub runs: Vec<RunItem>,
    /// Training loss of each run.
    pub loss: Vec<Series>,
    /// Each run's validation curve: accuracy, or for instruction tuning (no run has an
    /// accuracy) validation loss, as `validation_title` says.
    pub validation: Vec<Series>,
    pub validation_title: String,
    /// Hyper-parameters that differ: key, then one value per run (`—` when unset).
    pub differences: Vec<(String, Vec<String>)>,
}

#[cfg(feature = "ssr")]
mod server {
    use super::*;
    use tuneforge_store::{RunFilter, RunRow, RunSort, RunStatus, Store};

    pub fn store() -> Result<Store, ServerFnError> {
        use_context::<Store>().ok_or_else(|| ServerFnError::new("the dashboard has no experiment store"))
    }

    /// The validation curves a comparison shows: accuracy when a run has it, else (only
    /// instruction tuning runs) validation loss; with the chart's title.
    pub fn validation_curves(accuracy: Vec<Series>, loss: Vec<Series>) -> (Vec<Series>, &'static str) {
        if accuracy.iter().any(|s| !s.points.is_empty()) {
            (accuracy, "Validation accuracy")
        } else {
            (loss, "Validation loss")
        }
    }

    /// A registered version's held-out figures as the registry shows them.
    pub fn held_out(metrics: Option<&serde_json::Value>) -> String {
        let get = |k: &str| metrics.and_then(|m| m[k].as_f64());
        match (get("accuracy"), get("loss"), get("perplexity")) {
            (Some(a), _, _) => format!("accuracy {a:.4}"),
            (None, Some(l), Some(p)) => format!("loss {l:.4}, perplexity {p:.2}"),
            _ => "—".into(),
        }
    }

    pub fn err(e: impl std::fmt::Display) -> ServerFnError {
        ServerFnError::new(e.to_string())
    }

    pub fn item(r: RunRow) -> RunItem {
        RunItem {
            id: r.id,
            name: r.name,
            status: r.status.as_str().to_string(),
            method: r.method,
            model_source: r.model_source,
            dataset_hash: r.dataset_hash,
            accuracy: r.accuracy,
            macro_f1: r.macro_f1,
            steps: r.steps,
            total_steps: r.total_steps,
            started_ms: r.started_ms,
            finished_ms: r.finished_ms,
            error: r.error,
        }
    }

    pub fn filter(status: Option<String>, q: Option<String>, sort: Option<String>, asc: bool, page: i64) -> RunFilter {
        let sort = match sort.as_deref() {
            Some("accuracy") => RunSort::Accuracy,
            Some("macro_f1") => RunSort::MacroF1,
            Some("name") => RunSort::Name,
            _ => RunSort::Started,
        };
        RunFilter {
            status: status.as_deref().and_then(RunStatus::parse),
            name: q.filter(|s| !s.trim().is_empty()),
            sort,
            ascending: asc,
            limit: PER_PAGE,
            offset: (page.max(1) - 1) * PER_PAGE,
        }
    }

    pub async fn series(store: &Store, id: &str, key: &str, label: &str) -> Result<Series, ServerFnError> {
        let points = store.metric_series(id, key, MAX_POINTS).await.map_err(err)?;
        Ok(Series { label: label.to_string(), points: points.into_iter().map(|p| (p.step, p.value)).collect() })
    }

    /// `section.key` -> value text, for every leaf of a TOML document.
    pub fn flatten(config: &str) -> Vec<(String, String)> {
        fn walk(prefix: &str, v: &toml::Value, out: &mut Vec<(String, String)>) {
            match v {
                toml::Value::Table(t) => {
                    for (k, v) in t {
                        let key = if prefix.is_empty() { k.clone() } else { format!("{prefix}.{k}") };
                        walk(&key, v, out);
                    }
                }
                other => out.push((prefix.to_string(), other.to_string())),
            }
        }
        let mut out = Vec::new();
        if let Ok(t) = config.parse::<toml::Table>() {
            walk("", &toml::Value::Table(t), &mut out);
        }
        out
    }

    /// Keys whose values differ between the configs (paths, which always differ, left out).
    pub fn differences(configs: &[String]) -> Vec<(String, Vec<String>)> {
        let flat: Vec<std::collections::BTreeMap<String, String>> =
            configs.iter().map(|c| flatten(c).into_iter().collect()).collect();
        let keys: std::collections::BTreeSet<&String> = flat.iter().flat_map(|m| m.keys()).collect();
        keys.into_iter()
            .filter(|k| !k.ends_with("output_dir"))
            .filter_map(|k| {
                let values: Vec<String> =
                    flat.iter().map(|m| m.get(k).cloned().unwrap_or_else(|| "—".into())).collect();
                values.iter().any(|v| *v != values[0]).then(|| (k.clone(), values))
            })
            .collect()
    }
}

/// A page of runs, filtered by status and name and sorted.
#[server(prefix = "/dashboard/api", endpoint = "list_runs")]
pub async fn list_runs(
    status: Option<String>,
    q: Option<String>,
    sort: Option<String>,
    asc: bool,
    page: i64,
) -> Result<RunsPage, ServerFnError> {
    let store = server::store()?;
    let page = page.max(1);
    let (rows, total) = store.list_runs(&server::filter(status, q, sort, asc, page)).await.map_err(server::err)?;
    Ok(RunsPage {
        runs: rows.into_iter().map(server::item).collect(),
        total,
        page,
        pages: ((total + PER_PAGE - 1) / PER_PAGE).max(1),
    })
}

/// One run with its curves and plugins.
#[server(prefix = "/dashboard/api", endpoint = "get_run")]
pub async fn get_run(id: String) -> Result<RunDetail, ServerFnError> {
    let store = server::store()?;
    let row = store.get_run(&id).await.map_err(server::err)?;
    let config = row.config.clone().unwrap_or_default();
    let summary = row.summary.clone();
    let plugins = store
        .run_plugins(&id)
        .await
        .map_err(server::err)?
        .into_iter()
        .map(|p| PluginItem {
            name: p.name,
            version: p.version,
            kind: p.kind,
            sha256: p.sha256,
            api_version: p.api_version,
        })
        .collect();
    let keys = store.metric_keys(&id).await.map_err(server::err)?;
    let mut series = Vec::new();
    for (key, label) in [
        ("train/loss", "training loss"),
        ("val/accuracy", "validation accuracy"),
        ("val/macro_f1", "validation macro-F1"),
        // Instruction tuning (causal-LM runs) reports loss and perplexity instead.
        ("val/loss", "validation loss"),
        ("val/perplexity", "validation perplexity"),
        ("train/lr", "learning rate"),
    ] {
        if keys.iter().any(|k| k == key) {
            series.push(server::series(&store, &id, key, label).await?);
        }
    }
    Ok(RunDetail { run: server::item(row), config, summary, plugins, series })
}

/// Runs side by side: curves, differing hyper-parameters, final metrics.
#[server(prefix = "/dashboard/api", endpoint = "compare_runs")]
pub async fn compare_runs(ids: Vec<String>) -> Result<Comparison, ServerFnError> {
    let store = server::store()?;
    let (mut runs, mut loss, mut accuracy, mut val_loss, mut configs) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for id in ids.iter().take(5) {
        let row = store.get_run(id).await.map_err(server::err)?;
        configs.push(row.config.clone().unwrap_or_default());
        loss.push(server::series(&store, id, "train/loss", &row.name).await?);
        accuracy.push(server::series(&store, id, "val/accuracy", &row.name).await?);
        val_loss.push(server::series(&store, id, "val/loss", &row.name).await?);
        runs.push(server::item(row));
    }
    let (validation, validation_title) = server::validation_curves(accuracy, val_loss);
    Ok(Comparison {
        runs,
        loss,
        validation,
        validation_title: validation_title.into(),
        differences: server::differences(&configs),
    })
}

#[cfg(all(test, feature = "ssr"))]
mod tests {
    use super::server::*;

    #[test]
    fn comparisons_show_accuracy_or_else_validation_loss() {
        let series = |points: Vec<(i64, f64)>| crate::charts::Series { label: "r".into(), points };
        let (shown, title) =
            validation_curves(vec![series(vec![(1, 0.5)]), series(vec![])], vec![series(vec![(1, 2.0)])]);
        assert_eq!((shown[0].points.clone(), title), (vec![(1, 0.5)], "Validation accuracy"));
        let (shown, title) = validation_curves(vec![series(vec![])], vec![series(vec![(1, 2.0)])]);
        assert_eq!((shown[0].points.clone(), title), (vec![(1, 2.0)], "Validation loss"));
    }

    #[test]
    fn held_out_figures_read_for_classifiers_and_language_models() {
        let m = |v: serde_json::Value| held_out(Some(&v));
        assert_eq!(m(serde_json::json!({"accuracy": 0.91, "macro_f1": 0.9})), "accuracy 0.9100");
        assert_eq!(m(serde_json::json!({"loss": 1.10812, "perplexity": 3.0287})), "loss 1.1081, perplexity 3.03");
        assert_eq!(held_out(None), "—");
    }

    #[test]
    fn differing_hyper_parameters_are_found_and_paths_ignored() {
        let a = "[experiment]\noutput_dir = \"/a\"\n[train]\nlr = 0.1\nepochs = 3\n".to_string();
        let b =
            "[experiment]\noutput_dir = \"/b\"\n[train]\nlr = 0.2\nepochs = 3\n[peft]\nmethod = \"lora\"\n".to_string();
        let d = differences(&[a, b]);
        assert_eq!(
            d,
            [
                ("peft.method".to_string(), vec!["—".to_string(), "\"lora\"".to_string()]),
                ("train.lr".to_string(), vec!["0.1".to_string(), "0.2".to_string()]),
            ]
        );
    }
}

/// The write token the dashboard checks before promoting or rolling back (the server's).
#[derive(Debug, Clone)]
pub struct WriteToken(pub String);

/// A registered model version.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelItem {
    pub name: String,
    pub version: i64,
    pub run_id: String,
    pub stage: String,
    /// Its held-out figures: a classifier's accuracy, a language model's loss and perplexity.
    pub held_out: String,
    pub created_ms: i64,
    pub promoted_ms: Option<i64>,
}

/// One line of the audit trail.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EventItem {
    pub kind: String,
    pub subject: String,
    pub detail: String,
    pub actor: String,
    pub time_ms: i64,
}

/// The registry and its audit trail.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RegistryView {
    pub models: Vec<ModelItem>,
    pub events: Vec<EventItem>,
}

#[cfg(feature = "ssr")]
fn check_token(token: &str) -> Result<(), ServerFnError> {
    let expected = use_context::<WriteToken>().ok_or_else(|| ServerFnError::new("writes are disabled"))?;
    let (a, b) = (token.trim().as_bytes(), expected.0.as_bytes());
    let same = a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0;
    if same { Ok(()) } else { Err(ServerFnError::new("the write token is wrong")) }
}

#[cfg(feature = "ssr")]
fn check_write(token: &str, confirm: Option<&str>) -> Result<(), ServerFnError> {
    check_token(token)?;
    if confirm != Some("yes") {
        return Err(ServerFnError::new("tick “I am sure” to confirm"));
    }
    Ok(())
}

/// Every model version, newest first per name, and the latest audit events.
#[server(prefix = "/dashboard/api", endpoint = "registry")]
pub async fn registry() -> Result<RegistryView, ServerFnError> {
    let store = server::store()?;
    let models = store
        .list_models(None)
        .await
        .map_err(server::err)?
        .into_iter()
        .map(|m| ModelItem {
            held_out: server::held_out(m.metrics.as_ref()),
            name: m.name,
            version: m.version,
            run_id: m.run_id,
            stage: m.stage.as_str().to_string(),
            created_ms: m.created_ms,
            promoted_ms: m.promoted_ms,
        })
        .collect();
    let events = store
        .events(None, 50)
        .await
        .map_err(server::err)?
        .into_iter()
        .map(|e| EventItem { kind: e.kind, subject: e.subject, detail: e.detail, actor: e.actor, time_ms: e.time_ms })
        .collect();
    Ok(RegistryView { models, events })
}

/// Promotes a version to production (the previous one is archived); needs the token.
#[server(prefix = "/dashboard/api", endpoint = "promote")]
pub async fn promote(name: String, version: i64, token: String, confirm: Option<String>) -> Result<(), ServerFnError> {
    check_write(&token, confirm.as_deref())?;
    server::store()?.promote(&name, version, "dashboard").await.map_err(server::err)?;
    Ok(())
}

/// Rolls a model back to its previous production version; needs the token.
#[server(prefix = "/dashboard/api", endpoint = "rollback")]
pub async fn rollback(name: String, token: String, confirm: Option<String>) -> Result<(), ServerFnError> {
    check_write(&token, confirm.as_deref())?;
    server::store()?.rollback(&name, "dashboard").await.map_err(server::err)?;
    Ok(())
}

/// How the dashboard asks the server for a recorded prediction: `(model, text)` to the new
/// prediction's id. The server owns the loaded models; the dashboard only calls this.
pub type PredictFuture = std::pin::Pin<Box<dyn std::future::Future<Output = Result<String, String>> + Send>>;

/// The server's prediction service, in the reactive context.
#[derive(Clone)]
pub struct PredictService(pub std::sync::Arc<dyn Fn(String, String) -> PredictFuture + Send + Sync>);

impl std::fmt::Debug for PredictService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PredictService")
    }
}

/// A prediction as the playground shows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PredictionView {
    pub id: String,
    pub model: String,
    pub version: i64,
    pub input: String,
    /// A classifier's label, or a language model's answer.
    pub label: String,
    /// Labels and probabilities, most likely first (none for a language model).
    pub probabilities: Vec<(String, f64)>,
    /// Whether a language model wrote the answer (its correction is a text, not a label).
    pub generated: bool,
}

/// A feedback row of the queue.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FeedbackItem {
    pub id: String,
    pub model: String,
    pub input: String,
    pub output: String,
    pub rating: String,
    pub corrected_label: Option<String>,
    pub comment: Option<String>,
    pub reviewed: bool,
    pub time_ms: i64,
}

/// Models with a production version, for the playground's picker.
#[server(prefix = "/dashboard/api", endpoint = "served_models")]
pub async fn served_models() -> Result<Vec<(String, i64)>, ServerFnError> {
    let models = server::store()?.list_models(None).await.map_err(server::err)?;
    Ok(models.into_iter().filter(|m| m.stage.as_str() == "production").map(|m| (m.name, m.version)).collect())
}

/// Puts a text to a model's production version (a classifier labels it, a language model
/// answers it), records the prediction, and sends the browser to it.
#[server(prefix = "/dashboard/api", endpoint = "try_model")]
pub async fn try_model(model: String, text: String, token: String) -> Result<(), ServerFnError> {
    check_token(&token)?;
    if text.trim().is_empty() || text.len() > 20_000 {
        return Err(ServerFnError::new("type a text (at most 20000 bytes)"));
    }
    let service = use_context::<PredictService>().ok_or_else(|| ServerFnError::new("prediction is not available"))?;
    let id = (service.0)(model, text).await.map_err(ServerFnError::new)?;
    leptos_actix::redirect(&format!("/playground?prediction={id}"));
    Ok(())
}

/// A recorded prediction.
#[server(prefix = "/dashboard/api", endpoint = "prediction")]
pub async fn prediction(id: String) -> Result<PredictionView, ServerFnError> {
    let (row, probs) = server::store()?.prediction(&id).await.map_err(server::err)?;
    let mut probabilities: Vec<(String, f64)> = probs
        .as_object()
        .map(|m| m.iter().filter_map(|(k, v)| v.as_f64().map(|p| (k.clone(), p))).collect())
        .unwrap_or_default();
    probabilities.sort_by(|a, b| b.1.total_cmp(&a.1));
    Ok(PredictionView {
        id: row.id,
        model: row.model_name,
        version: row.model_version,
        input: row.input,
        label: row.output,
        generated: probs.get("messages").is_some_and(|m| m.is_array()),
        probabilities,
    })
}

/// Rates (and corrects) a prediction; the browser goes to the feedback queue.
#[server(prefix = "/dashboard/api", endpoint = "give_feedback")]
pub async fn give_feedback(
    prediction_id: String,
    rating: String,
    corrected_label: Option<String>,
    comment: Option<String>,
    token: String,
) -> Result<(), ServerFnError> {
    check_token(&token)?;
    let store = server::store()?;
    let (row, _) = store.prediction(&prediction_id).await.map_err(server::err)?;
    let corrected_label = corrected_label.filter(|l| !l.trim().is_empty());
    let comment = comment.filter(|c| !c.trim().is_empty());
    if comment.as_ref().is_some_and(|c| c.len() > 10_000) {
        return Err(ServerFnError::new("the comment is longer than 10000 bytes"));
    }
    if corrected_label.as_ref().is_some_and(|c| c.len() > 20_000) {
        return Err(ServerFnError::new("the correction is longer than 20000 bytes"));
    }
    store
        .record_feedback(&tuneforge_store::NewFeedback {
            prediction_id,
            rating,
            corrected_label,
            comment,
            author: Some("dashboard".into()),
        })
        .await
        .map_err(server::err)?;
    // The model's A/B rule may decide now; the feedback is recorded either way.
    if row.arm.is_some()
        && let Err(e) = store.decide_ab(&row.model_name).await
    {
        leptos::logging::warn!("automatic A/B decision for {}: {e}", row.model_name);
    }
    leptos_actix::redirect(&format!("/feedback?model={}", row.model_name));
    Ok(())
}

/// The feedback queue, filtered.
#[server(prefix = "/dashboard/api", endpoint = "feedback_queue")]
pub async fn feedback_queue(
    model: Option<String>,
    label: Option<String>,
    rating: Option<String>,
    reviewed: Option<String>,
) -> Result<Vec<FeedbackItem>, ServerFnError> {
    let nonempty = |s: Option<String>| s.filter(|s| !s.trim().is_empty());
    let filter = tuneforge_store::FeedbackFilter {
        model: nonempty(model),
        label: nonempty(label),
        rating: nonempty(rating),
        reviewed: match reviewed.as_deref() {
            Some("yes") => Some(true),
            Some("no") => Some(false),
            _ => None,
        },
        limit: 500,
    };
    let rows = server::store()?.feedback(&filter).await.map_err(server::err)?;
    Ok(rows
        .into_iter()
        .map(|f| FeedbackItem {
            id: f.id,
            model: f.model_name,
            input: f.input,
            output: f.output,
            rating: f.rating,
            corrected_label: f.corrected_label,
            comment: f.comment,
            reviewed: f.reviewed,
            time_ms: f.time_ms,
        })
        .collect())
}

/// Marks feedback reviewed; needs the token.
#[server(prefix = "/dashboard/api", endpoint = "mark_reviewed")]
pub async fn mark_reviewed(id: String, token: String) -> Result<(), ServerFnError> {
    check_token(&token)?;
    server::store()?.mark_feedback_reviewed(&id, "dashboard").await.map_err(server::err)
}

/// One arm of an A/B test, as the dashboard shows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ArmView {
    pub version: i64,
    pub predictions: i64,
    pub rated: i64,
    /// Feedback-rated accuracy and its 95% interval.
    pub accuracy: Option<(f64, f64, f64)>,
    pub mean_latency_ms: Option<f64>,
}

/// An A/B test with both arms and the verdict so far.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AbView {
    pub id: String,
    pub model: String,
    pub share: f64,
    pub auto_decide: bool,
    pub status: String,
    pub started_ms: i64,
    pub note: Option<String>,
    pub production: ArmView,
    pub candidate: ArmView,
    pub verdict: String,
}

/// Every A/B test, newest first.
#[server(prefix = "/dashboard/api", endpoint = "ab_overview")]
pub async fn ab_overview() -> Result<Vec<AbView>, ServerFnError> {
    let store = server::store()?;
    let mut out = Vec::new();
    for t in store.ab_tests(None).await.map_err(server::err)? {
        let (p, c) = store.ab_stats(&t).await.map_err(server::err)?;
        let arm = |version: i64, a: &tuneforge_store::ArmStats| ArmView {
            version,
            predictions: a.predictions,
            rated: a.rated,
            accuracy: tuneforge_store::wilson(a.correct, a.rated),
            mean_latency_ms: a.mean_latency_ms,
        };
        out.push(AbView {
            verdict: tuneforge_store::verdict(&p, &c, tuneforge_store::MIN_RATED).0.to_string(),
            production: arm(t.production_version, &p),
            candidate: arm(t.candidate_version, &c),
            id: t.id,
            model: t.model_name,
            share: t.share,
            auto_decide: t.auto_decide,
            status: t.status,
            started_ms: t.started_ms,
            note: t.verdict,
        });
    }
    Ok(out)
}

/// Starts an A/B test of a candidate version; needs the token.
#[server(prefix = "/dashboard/api", endpoint = "start_ab")]
pub async fn start_ab(
    model: String,
    candidate: i64,
    share: f64,
    manual: Option<String>,
    token: String,
) -> Result<(), ServerFnError> {
    check_token(&token)?;
    let auto = manual.as_deref() != Some("yes");
    server::store()?.start_ab(&model, candidate, share, auto, "dashboard").await.map_err(server::err)?;
    Ok(())
}

/// Ends a running A/B test: `promote`, `rollback` or `stop`; needs the token.
#[server(prefix = "/dashboard/api", endpoint = "stop_ab")]
pub async fn stop_ab(id: String, action: String, token: String) -> Result<(), ServerFnError> {
    check_token(&token)?;
    server::store()?.conclude_ab(&id, &action, "dashboard").await.map_err(server::err)?;
    Ok(())
}
