//! Financial PhraseBank: `sentence@label` per line; the label follows the last `@`.

use super::Sink;
use crate::DataError;

pub(super) fn read(text: &str, sink: &mut Sink<'_>) -> Result<(), DataError> {
    for (i, raw) in text.lines().enumerate() {
        let line = i as u64 + 1;
        if raw.trim().is_empty() {
            continue;
        }
        let (text, label) = match raw.rsplit_once('@') {
            Some((t, l)) => (Ok(t.trim().to_owned()), Ok(l.trim().to_owned())),
            None => {
                sink.reject(sink.error(line, "label", "no `@label` at the end of the line"))?;
                continue;
            }
        };
        sink.push(line, text, label)?;
    }
    Ok(())
}
