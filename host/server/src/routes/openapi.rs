//! `GET /api/v1/openapi.json`: the API described in OpenAPI 3.0.

use actix_web::HttpResponse;
use serde_json::{Value, json};

fn op(summary: &str, write: bool, params: Value, body: Option<&str>) -> Value {
    let mut o = json!({
        "summary": summary,
        "parameters": params,
        "responses": {
            "200": {"description": "OK", "content": {"application/json": {}}},
            "400": {"$ref": "#/components/responses/Error"},
            "404": {"$ref": "#/components/responses/Error"}
        }
    });
    if write {
        o["security"] = json!([{"bearer": []}]);
        o["responses"]["401"] = json!({"$ref": "#/components/responses/Error"});
    }
    if let Some(schema) = body {
        o["requestBody"] = json!({"required": true, "content": {"application/json": {"schema": {"$ref": format!("#/components/schemas/{schema}")}}}});
    }
    o
}

fn q(name: &str, kind: &str, required: bool) -> Value {
    json!({"name": name, "in": "query", "required": required, "schema": {"type": kind}})
}

fn p(name: &str) -> Value {
    json!({"name": name, "in": "path", "required": true, "schema": {"type": "string"}})
}

pub async fn document() -> HttpResponse {
    let s = |props: Value, required: Value| json!({"type": "object", "additionalProperties": false, "properties": props, "required": required});
    let doc = json!({
        "openapi": "3.0.3",
        "info": {"title": "tuneforge", "version": env!("CARGO_PKG_VERSION")},
        "paths": {
            "/api/v1/runs": {"get": op("List runs", false, json!([q("status", "string", false), q("name", "string", false), q("sort", "string", false), q("order", "string", false), q("limit", "integer", false), q("offset", "integer", false)]), None)},
            "/api/v1/runs/{id}": {"get": op("One run with its config, summary, artifacts and plugins (lineage)", false, json!([p("id")]), None)},
            "/api/v1/runs/{id}/series": {"get": op("A metric series, downsampled", false, json!([p("id"), q("key", "string", true), q("max_points", "integer", false)]), None)},
            "/api/v1/compare": {"get": op("Runs side by side", false, json!([q("ids", "string", true)]), None)},
            "/api/v1/models": {
                "get": op("Model versions", false, json!([q("name", "string", false)]), None),
                "post": op("Register a run's best model", true, json!([]), Some("Register"))
            },
            "/api/v1/models/{name}/promote": {"post": op("Promote a version to production", true, json!([p("name")]), Some("Promote"))},
            "/api/v1/models/{name}/rollback": {"post": op("Roll back to the previous production version", true, json!([p("name")]), None)},
            "/api/v1/events": {"get": op("The audit trail", false, json!([q("subject", "string", false), q("limit", "integer", false)]), None)},
            "/api/v1/predict": {"post": op("Classify texts with a registered model", true, json!([]), Some("Predict"))},
            "/api/v1/generate": {"post": op("Generate text with a registered language model (recorded; production, the session's A/B arm or a version) or the server's decoder (serve --generator)", true, json!([]), Some("Generate"))},
            "/api/v1/feedback": {
                "get": op("Feedback, newest first", false, json!([q("model", "string", false), q("limit", "integer", false)]), None),
                "post": op("Rate or correct a prediction", true, json!([]), Some("Feedback"))
            },
            "/api/v1/feedback/export": {"get": {"summary": "Corrections as a JSONL dataset (text, label)", "parameters": [q("model", "string", false), q("reviewed", "boolean", false)], "responses": {"200": {"description": "JSON lines", "content": {"application/x-ndjson": {}}}, "400": {"$ref": "#/components/responses/Error"}}}},
            "/api/v1/ab": {
                "get": op("A/B tests with per-arm figures and the verdict so far", false, json!([q("model", "string", false)]), None),
                "post": op("Start an A/B test of a candidate version", true, json!([]), Some("AbStart"))
            },
            "/api/v1/ab/{id}/stop": {"post": op("End a running A/B test: promote, rollback or stop", true, json!([p("id")]), Some("AbStop"))},
            "/healthz": {"get": op("Liveness and store access", false, json!([]), None)},
            "/metrics": {"get": {"summary": "Prometheus metrics", "responses": {"200": {"description": "text format", "content": {"text/plain": {}}}}}}
        },
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
            "responses": {"Error": {"description": "An error", "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}},
            "schemas": {
                "Error": s(json!({"error": {"type": "string"}}), json!(["error"])),
                "Register": s(json!({"name": {"type": "string"}, "run_id": {"type": "string"}, "actor": {"type": "string"}}), json!(["name", "run_id"])),
                "Promote": s(json!({"version": {"type": "integer"}, "actor": {"type": "string"}}), json!(["version"])),
                "AbStart": s(json!({"model": {"type": "string"}, "candidate": {"type": "integer"}, "share": {"type": "number"}, "auto": {"type": "boolean"}, "actor": {"type": "string"}}), json!(["model", "candidate", "share"])),
                "AbStop": s(json!({"action": {"type": "string", "enum": ["promote", "rollback", "stop"]}, "actor": {"type": "string"}}), json!(["action"])),
                "Predict": s(json!({"model": {"type": "string"}, "version": {"type": "integer"}, "text": {"type": "string"}, "texts": {"type": "array", "items": {"type": "string"}}, "session": {"type": "string"}}), json!(["model"])),
                "Generate": s(json!({"model": {"type": "string", "description": "a registered language model; without it, the server's --generator"}, "version": {"type": "integer"}, "session": {"type": "string"}, "prompt": {"type": "string"}, "messages": {"type": "array", "items": s(json!({"role": {"type": "string", "enum": ["system", "user", "assistant"]}, "content": {"type": "string"}}), json!(["role", "content"]))}, "raw": {"type": "boolean"}, "max_tokens": {"type": "integer", "minimum": 1, "maximum": 1024}, "temperature": {"type": "number", "minimum": 0}, "top_k": {"type": "integer", "minimum": 1}, "top_p": {"type": "number", "exclusiveMinimum": 0, "maximum": 1}, "repetition_penalty": {"type": "number", "exclusiveMinimum": 0}, "seed": {"type": "integer", "minimum": 0}, "stop": {"description": "the text ends before the first of these (at most 4)", "oneOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"}, "maxItems": 4}]}, "stream": {"type": "boolean", "description": "server-sent events: data: {text} per piece, then data: {done, counts}"}}), json!([])),
                "Feedback": s(json!({"prediction_id": {"type": "string"}, "rating": {"type": "string", "enum": ["correct", "wrong"]}, "corrected_label": {"type": "string", "description": "the right label, or a language model's better answer"}, "comment": {"type": "string"}, "author": {"type": "string"}}), json!(["prediction_id", "rating"]))
            }
        }
    });
    HttpResponse::Ok().json(doc)
}
