//! JSON Lines: one object per line with a string text and a string or integer label.
//! Blank lines are allowed.

use serde_json::Value;

use super::{ReadOptions, Sink};
use crate::{DataError, LineError};

pub(super) fn read(text: &str, options: &ReadOptions, sink: &mut Sink<'_>) -> Result<(), DataError> {
    for (i, raw) in text.lines().enumerate() {
        let line = i as u64 + 1;
        if raw.trim().is_empty() {
            continue;
        }
        let object = match serde_json::from_str::<Value>(raw) {
            Ok(Value::Object(map)) => map,
            Ok(other) => {
                sink.reject(sink.error(line, "<json>", format!("expected an object, found {}", kind(&other))))?;
                continue;
            }
            Err(e) => {
                sink.reject(sink.error(line, "<json>", e.to_string()))?;
                continue;
            }
        };
        let field = |name: &str, allow_integer: bool| -> Result<String, LineError> {
            match object.get(name) {
                None => Err(sink.error(line, name, "is missing")),
                Some(Value::String(s)) => Ok(s.clone()),
                Some(Value::Number(n)) if allow_integer && n.is_i64() => Ok(n.to_string()),
                Some(other) => Err(sink.error(line, name, format!("expected a string, found {other}"))),
            }
        };
        let text = field(&options.text_field, false);
        let label = field(&options.label_field, true);
        sink.push(line, text, label)?;
    }
    Ok(())
}

fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}
