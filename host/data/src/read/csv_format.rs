//! CSV with a header row; the text and label columns are named in [`ReadOptions`].

use super::{ReadOptions, Sink};
use crate::DataError;

pub(super) fn read(text: &str, options: &ReadOptions, sink: &mut Sink<'_>) -> Result<(), DataError> {
    let mut reader = csv::ReaderBuilder::new().has_headers(true).flexible(true).from_reader(text.as_bytes());
    let headers = match reader.headers() {
        Ok(h) => h.clone(),
        Err(e) => return Err(sink.error(1, "<header>", e.to_string()).into()),
    };
    let column = |name: &str| headers.iter().position(|h| h.trim() == name);
    let columns = headers.iter().collect::<Vec<_>>().join(", ");
    let text_col = column(&options.text_field).ok_or_else(|| {
        sink.error(1, &options.text_field, format!("no such column in the header (columns: {columns})"))
    })?;
    let label_col = column(&options.label_field).ok_or_else(|| {
        sink.error(1, &options.label_field, format!("no such column in the header (columns: {columns})"))
    })?;
    for record in reader.records() {
        let record = match record {
            Ok(r) => r,
            Err(e) => {
                let line = e.position().map_or(0, |p| p.line());
                sink.reject(sink.error(line, "<record>", e.to_string()))?;
                continue;
            }
        };
        let line = record.position().map_or(0, |p| p.line());
        if record.len() != headers.len() {
            let message = format!("has {} fields, the header has {}", record.len(), headers.len());
            sink.reject(sink.error(line, "<record>", message))?;
            continue;
        }
        let get = |col: usize, field: &str| {
            record.get(col).map(str::to_owned).ok_or_else(|| sink.error(line, field, "is missing"))
        };
        let text = get(text_col, "text");
        let label = get(label_col, "label");
        sink.push(line, text, label)?;
    }
    Ok(())
}
