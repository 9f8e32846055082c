//! A/B tests: a candidate version serves a share of sessions beside production; per-arm
//! predictions, feedback-rated accuracy and latency come from the predictions and feedback
//! tables (each prediction records its arm).

use serde::{Deserialize, Serialize};
use sqlx::Row;
use sqlx::any::AnyRow;

use crate::store::{new_id, now_ms};
use crate::{Result, Stage, Store, StoreError};

/// Rated predictions each arm needs before a verdict.
pub const MIN_RATED: i64 = 30;

/// A test as stored.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AbTest {
    pub id: String,
    pub model_name: String,
    pub production_version: i64,
    pub candidate_version: i64,
    /// The share of sessions the candidate serves, in (0, 1).
    pub share: f64,
    /// Whether the server decides on its own once the verdict is significant: `better`
    /// promotes the candidate, `worse` rolls it back.
    pub auto_decide: bool,
    /// `running`, `promoted`, `rolled_back` or `stopped`.
    pub status: String,
    pub started_ms: i64,
    pub ended_ms: Option<i64>,
    pub verdict: Option<String>,
}

/// How a model's self-deciding A/B tests decide.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelRules {
    pub model_name: String,
    /// Rated predictions each arm needs before the feedback verdict or the error-rate bound.
    pub min_rated: i64,
    /// Roll back when the candidate's held-out accuracy is below production's minus this (a
    /// language model's: when its held-out loss is above production's plus this).
    pub heldout_delta: Option<f64>,
    /// Roll back when the candidate arm's feedback-rated error rate is above this.
    pub max_error_rate: Option<f64>,
}

impl ModelRules {
    /// The rules of a model that has none set: the feedback verdict after 30 ratings per arm.
    pub fn defaults(model: &str) -> Self {
        Self { model_name: model.to_owned(), min_rated: MIN_RATED, heldout_delta: None, max_error_rate: None }
    }
}

/// What one arm has seen since the test started.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ArmStats {
    pub predictions: i64,
    /// Predictions rated by feedback, and how many of those were rated correct.
    pub rated: i64,
    pub correct: i64,
    pub mean_latency_ms: Option<f64>,
}

const COLUMNS: &str = "id, model_name, production_version, candidate_version, share, auto_decide, status, \
                       started_ms, ended_ms, verdict";

fn test_from_row(r: &AnyRow) -> Result<AbTest> {
    Ok(AbTest {
        id: r.try_get("id")?,
        model_name: r.try_get("model_name")?,
        production_version: r.try_get("production_version")?,
        candidate_version: r.try_get("candidate_version")?,
        share: r.try_get("share")?,
        auto_decide: r.try_get::<i64, _>("auto_decide")? != 0,
        status: r.try_get("status")?,
        started_ms: r.try_get("started_ms")?,
        ended_ms: r.try_get("ended_ms")?,
        verdict: r.try_get("verdict")?,
    })
}

impl Store {
    /// Starts a test of `candidate` against the model's production version.
    pub async fn start_ab(
        &self,
        model: &str,
        candidate: i64,
        share: f64,
        auto_decide: bool,
        actor: &str,
    ) -> Result<AbTest> {
        if !(share > 0.0 && share < 1.0) {
            return Err(StoreError::Invalid(format!("share must be between 0 and 1 (exclusive), got {share}")));
        }
        let production = self
            .production(model)
            .await?
            .ok_or_else(|| StoreError::Invalid(format!("model `{model}` has no production version to test against")))?;
        let cand = self.model_version(model, candidate).await?;
        if cand.stage == Stage::Production {
            return Err(StoreError::Invalid(format!("{model}@{candidate} is already in production")));
        }
        if self.running_ab(model).await?.is_some() {
            return Err(StoreError::Invalid(format!("model `{model}` already has a running A/B test; stop it first")));
        }
        let test = AbTest {
            id: new_id(),
            model_name: model.to_owned(),
            production_version: production.version,
            candidate_version: candidate,
            share,
            auto_decide,
            status: "running".into(),
            started_ms: now_ms(),
            ended_ms: None,
            verdict: None,
        };
        sqlx::query(
            "INSERT INTO ab_tests (id, model_name, production_version, candidate_version, share, auto_decide, status, \
             started_ms) VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
        )
        .bind(&test.id)
        .bind(&test.model_name)
        .bind(test.production_version)
        .bind(test.candidate_version)
        .bind(test.share)
        .bind(i64::from(test.auto_decide))
        .bind(&test.status)
        .bind(test.started_ms)
        .execute(&self.pool)
        .await?;
        let detail = format!("v{candidate} against v{} for {:.0}% of sessions", production.version, share * 100.0);
        self.record_event("ab-start", &format!("{model}@{candidate}"), &detail, actor).await?;
        Ok(test)
    }

    /// The model's running test, if any.
    pub async fn running_ab(&self, model: &str) -> Result<Option<AbTest>> {
        let row = sqlx::query(sqlx::AssertSqlSafe(format!(
            "SELECT {COLUMNS} FROM ab_tests WHERE model_name = $1 AND status = 'running'"
        )))
        .bind(model)
        .fetch_optional(&self.pool)
        .await?;
        row.as_ref().map(test_from_row).transpose()
    }

    /// Tests, newest first (of one model, when given).
    pub async fn ab_tests(&self, model: Option<&str>) -> Result<Vec<AbTest>> {
        let rows = sqlx::query(sqlx::AssertSqlSafe(format!(
            "SELECT {COLUMNS} FROM ab_tests WHERE (CAST($1 AS TEXT) IS NULL OR model_name = $1) ORDER BY started_ms DESC, id"
        )))
        .bind(model)
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(test_from_row).collect()
    }

    /// Ends a running test with a status (`promoted`, `rolled_back`, `stopped`) and a verdict.
    pub async fn end_ab(&self, id: &str, status: &str, verdict: &str, actor: &str) -> Result<AbTest> {
        if !["promoted", "rolled_back", "stopped"].contains(&status) {
            return Err(StoreError::Invalid(format!("unknown end status `{status}`")));
        }
        let done = sqlx::query(
            "UPDATE ab_tests SET status = $2, verdict = $3, ended_ms = $4 WHERE id = $1 AND status = 'running'",
        )
        .bind(id)
        .bind(status)
        .bind(verdict)
        .bind(now_ms())
        .execute(&self.pool)
        .await?;
        if done.rows_affected() == 0 {
            return Err(StoreError::NotFound { kind: "running A/B test", id: id.to_owned() });
        }
        let row = sqlx::query(sqlx::AssertSqlSafe(format!("SELECT {COLUMNS} FROM ab_tests WHERE id = $1")))
            .bind(id)
            .fetch_one(&self.pool)
            .await?;
        let test = test_from_row(&row)?;
        let subject = format!("{}@{}", test.model_name, test.candidate_version);
        self.record_event(&format!("ab-{status}"), &subject, verdict, actor).await?;
        Ok(test)
    }

    /// Ends the model's running test as decided: `promote` (the candidate goes to
    /// production), `rollback` (production stays) or `stop`; the verdict so far is noted.
    pub async fn conclude_ab(&self, id: &str, action: &str, actor: &str) -> Result<AbTest> {
        self.conclude_ab_because(id, action, actor, None).await
    }

    /// [`Store::conclude_ab`] with the reason a rule gave.
    pub async fn conclude_ab_because(
        &self,
        id: &str,
        action: &str,
        actor: &str,
        reason: Option<&str>,
    ) -> Result<AbTest> {
        let test = self
            .ab_tests(None)
            .await?
            .into_iter()
            .find(|t| t.id == id && t.status == "running")
            .ok_or_else(|| StoreError::NotFound { kind: "running A/B test", id: id.to_owned() })?;
        let (production, candidate) = self.ab_stats(&test).await?;
        let (so_far, _) = verdict(&production, &candidate, MIN_RATED);
        let note = match reason {
            Some(r) => format!("{action} by {actor}: {r}; verdict so far: {so_far}"),
            None => format!("{action} by {actor}; verdict so far: {so_far}"),
        };
        match action {
            "promote" => {
                self.promote(&test.model_name, test.candidate_version, actor).await?;
                self.end_ab(id, "promoted", &note, actor).await
            }
            "rollback" => self.end_ab(id, "rolled_back", &note, actor).await,
            "stop" => self.end_ab(id, "stopped", &note, actor).await,
            other => Err(StoreError::Invalid(format!("action: `promote`, `rollback` or `stop`, got `{other}`"))),
        }
    }

    /// Applies the model's automatic rule: when its running test decides on its own and the
    /// verdict is significant, `better` promotes the candidate and `worse` rolls it back
    /// (audited as `auto-rule`). Called as feedback arrives; returns the test it ended.
    pub async fn decide_ab(&self, model: &str) -> Result<Option<AbTest>> {
        let Some(test) = self.running_ab(model).await?.filter(|t| t.auto_decide) else { return Ok(None) };
        let rules = self.model_rules(model).await?;
        let (production, candidate) = self.ab_stats(&test).await?;
        let heldout = |v: i64| async move { Ok::<_, StoreError>(self.model_version(model, v).await?.metrics) };
        let mut decision: Option<(&str, String)> = None;
        if let (Some(delta), Some(p), Some(c)) =
            (rules.heldout_delta, heldout(test.production_version).await?, heldout(test.candidate_version).await?)
        {
            // A classifier's held-out accuracy (higher is better), or a language model's
            // held-out loss (lower is better).
            let figure = |key: &str| Some((p[key].as_f64()?, c[key].as_f64()?));
            if let Some((p, c)) = figure("accuracy") {
                if c < p - delta {
                    decision =
                        Some(("rollback", format!("held-out accuracy {c:.4} is below production's {p:.4} - {delta}")));
                }
            } else if let Some((p, c)) = figure("loss")
                && c > p + delta
            {
                decision = Some(("rollback", format!("held-out loss {c:.4} is above production's {p:.4} + {delta}")));
            }
        }
        if decision.is_none()
            && let Some(bound) = rules.max_error_rate
            && candidate.rated >= rules.min_rated
        {
            let error_rate = 1.0 - candidate.correct as f64 / candidate.rated as f64;
            if error_rate > bound {
                decision = Some(("rollback", format!("error rate {error_rate:.4} is above the bound {bound}")));
            }
        }
        if decision.is_none() {
            decision = match verdict(&production, &candidate, rules.min_rated).0 {
                "better" => Some(("promote", "feedback-rated accuracy is significantly better".into())),
                "worse" => Some(("rollback", "feedback-rated accuracy is significantly worse".into())),
                _ => None,
            };
        }
        let Some((action, reason)) = decision else { return Ok(None) };
        // Another request may have decided first; then there is nothing left to do.
        match self.conclude_ab_because(&test.id, action, "auto-rule", Some(&reason)).await {
            Ok(t) => Ok(Some(t)),
            Err(StoreError::NotFound { .. }) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// A model's rules (the defaults when none are set).
    pub async fn model_rules(&self, model: &str) -> Result<ModelRules> {
        let row = sqlx::query(
            "SELECT model_name, min_rated, heldout_delta, max_error_rate FROM model_rules WHERE model_name = $1",
        )
        .bind(model)
        .fetch_optional(&self.pool)
        .await?;
        match row {
            None => Ok(ModelRules::defaults(model)),
            Some(r) => Ok(ModelRules {
                model_name: r.try_get("model_name")?,
                min_rated: r.try_get("min_rated")?,
                heldout_delta: r.try_get("heldout_delta")?,
                max_error_rate: r.try_get("max_error_rate")?,
            }),
        }
    }

    /// Sets a model's rules (audited).
    pub async fn set_model_rules(&self, rules: &ModelRules, actor: &str) -> Result<()> {
        if rules.min_rated < 1 {
            return Err(StoreError::Invalid("min_rated must be at least 1".into()));
        }
        if rules.heldout_delta.is_some_and(|d| !(d.is_finite() && d >= 0.0)) {
            return Err(StoreError::Invalid("heldout_delta must be a number >= 0".into()));
        }
        if rules.max_error_rate.is_some_and(|r| !(0.0..=1.0).contains(&r)) {
            return Err(StoreError::Invalid("max_error_rate must be between 0 and 1".into()));
        }
        let mut tx = self.pool.begin().await?;
        sqlx::query("DELETE FROM model_rules WHERE model_name = $1").bind(&rules.model_name).execute(&mut *tx).await?;
        sqlx::query(
            "INSERT INTO model_rules (model_name, min_rated, heldout_delta, max_error_rate) VALUES ($1, $2, $3, $4)",
        )
        .bind(&rules.model_name)
        .bind(rules.min_rated)
        .bind(rules.heldout_delta)
        .bind(rules.max_error_rate)
        // Optional floats: see `finish_run` on why this statement is not cached.
        .persistent(false)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        let detail = format!(
            "min_rated {}, heldout_delta {:?}, max_error_rate {:?}",
            rules.min_rated, rules.heldout_delta, rules.max_error_rate
        );
        self.record_event("rules", &rules.model_name, &detail, actor).await
    }

    /// Per-arm figures of a test: `(production, candidate)`.
    pub async fn ab_stats(&self, test: &AbTest) -> Result<(ArmStats, ArmStats)> {
        let mut arms = Vec::new();
        for (arm, version) in [("production", test.production_version), ("candidate", test.candidate_version)] {
            let row = sqlx::query(
                "SELECT COUNT(DISTINCT p.id) AS n, AVG(p.latency_ms) AS latency, \
                 COUNT(f.id) AS rated, \
                 COALESCE(SUM(CASE WHEN f.rating = 'correct' THEN 1 ELSE 0 END), 0) AS correct \
                 FROM predictions p LEFT JOIN feedback f ON f.prediction_id = p.id \
                 WHERE p.model_name = $1 AND p.model_version = $2 AND p.arm = $3 AND p.time_ms >= $4",
            )
            .bind(&test.model_name)
            .bind(version)
            .bind(arm)
            .bind(test.started_ms)
            .fetch_one(&self.pool)
            .await?;
            arms.push(ArmStats {
                predictions: row.try_get("n")?,
                rated: row.try_get("rated")?,
                correct: row.try_get::<i64, _>("correct")?,
                mean_latency_ms: row.try_get("latency")?,
            });
        }
        let candidate = arms.pop().unwrap_or_default();
        let production = arms.pop().unwrap_or_default();
        Ok((production, candidate))
    }
}

/// Which arm a session falls in: a stable hash of (test, session) below `share` is the
/// candidate. The same session always gets the same arm for the same test.
pub fn assign_arm(test_id: &str, session: &str, share: f64) -> &'static str {
    // FNV-1a 64, then a SplitMix64 finaliser so nearby keys spread evenly.
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in test_id.bytes().chain([0u8]).chain(session.bytes()) {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h = (h ^ (h >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    h = (h ^ (h >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    h ^= h >> 31;
    let unit = (h >> 11) as f64 / (1u64 << 53) as f64;
    if unit < share { "candidate" } else { "production" }
}

/// Feedback-rated accuracy of an arm with its 95% Wilson interval: `(rate, low, high)`.
pub fn wilson(correct: i64, rated: i64) -> Option<(f64, f64, f64)> {
    if rated <= 0 {
        return None;
    }
    let (n, p, z) = (rated as f64, correct as f64 / rated as f64, 1.96f64);
    let denom = 1.0 + z * z / n;
    let centre = (p + z * z / (2.0 * n)) / denom;
    let half = z * ((p * (1.0 - p) + z * z / (4.0 * n)) / n).sqrt() / denom;
    Some((p, (centre - half).max(0.0), (centre + half).min(1.0)))
}

/// The verdict so far: `better`, `worse` or `undecided` for the candidate, by a two-sided
/// two-proportion z-test at 5% once each arm has `min_rated` rated predictions.
pub fn verdict(production: &ArmStats, candidate: &ArmStats, min_rated: i64) -> (&'static str, Option<f64>) {
    if production.rated < min_rated || candidate.rated < min_rated {
        return ("undecided", None);
    }
    let (n1, n2) = (production.rated as f64, candidate.rated as f64);
    let (p1, p2) = (production.correct as f64 / n1, candidate.correct as f64 / n2);
    let pooled = (production.correct + candidate.correct) as f64 / (n1 + n2);
    let se = (pooled * (1.0 - pooled) * (1.0 / n1 + 1.0 / n2)).sqrt();
    if se == 0.0 {
        return ("undecided", Some(0.0));
    }
    let z = (p2 - p1) / se;
    if z > 1.96 {
        ("better", Some(z))
    } else if z < -1.96 {
        ("worse", Some(z))
    } else {
        ("undecided", Some(z))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sessions_keep_their_arm_and_arms_follow_the_share() {
        let candidate = (0..10_000).filter(|i| assign_arm("t1", &format!("s{i}"), 0.2) == "candidate").count();
        assert!((1_800..=2_200).contains(&candidate), "{candidate} of 10000 at share 0.2");
        for i in 0..100 {
            let s = format!("session-{i}");
            assert_eq!(assign_arm("t1", &s, 0.2), assign_arm("t1", &s, 0.2));
        }
        let moved =
            (0..1000).filter(|i| assign_arm("t1", &i.to_string(), 0.5) != assign_arm("t2", &i.to_string(), 0.5));
        assert!(moved.count() > 300, "another test reshuffles the sessions");
    }

    #[test]
    fn wilson_and_the_verdict_match_hand_values() {
        let (p, lo, hi) = wilson(80, 100).expect("rated");
        assert!((p - 0.8).abs() < 1e-12 && (lo - 0.7112).abs() < 1e-3 && (hi - 0.8666).abs() < 1e-3, "{lo} {hi}");
        assert_eq!(wilson(0, 0), None);
        let arm = |correct, rated| ArmStats { rated, correct, ..Default::default() };
        assert_eq!(verdict(&arm(80, 100), &arm(60, 100), 30).0, "worse");
        assert_eq!(verdict(&arm(60, 100), &arm(80, 100), 30).0, "better");
        assert_eq!(verdict(&arm(80, 100), &arm(78, 100), 30).0, "undecided");
        assert_eq!(verdict(&arm(8, 10), &arm(0, 10), 30).0, "undecided", "too few ratings");
    }
}
