//! Readers: one file in, validated [`Example`]s out, or an error naming file, line and field.
//!
//! Formats: CSV with a header (configurable text and label columns), JSONL with one object
//! per line, and Financial PhraseBank's `sentence@label` lines. Files are decoded as UTF-8
//! when they are valid UTF-8 and as Latin-1 otherwise (PhraseBank ships Latin-1), unless an
//! encoding is forced.

mod at_label;
mod csv_format;
mod jsonl;

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::{DataError, Example, LineError};

/// The file formats tuneforge reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DataFormat {
    Csv,
    Jsonl,
    Phrasebank,
}

impl DataFormat {
    /// The format implied by a file name: `.csv`, `.jsonl`/`.json`, `.txt` (PhraseBank).
    pub fn from_path(path: &Path) -> Option<Self> {
        let ext = path.extension()?.to_str()?.to_ascii_lowercase();
        match ext.as_str() {
            "csv" => Some(Self::Csv),
            "jsonl" | "ndjson" | "json" => Some(Self::Jsonl),
            "txt" => Some(Self::Phrasebank),
            _ => None,
        }
    }

    pub fn parse(name: &str) -> Option<Self> {
        match name {
            "csv" => Some(Self::Csv),
            "jsonl" => Some(Self::Jsonl),
            "phrasebank" => Some(Self::Phrasebank),
            _ => None,
        }
    }
}

/// What to do with a bad line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OnError {
    /// Stop at the first bad line with its error.
    #[default]
    Fail,
    /// Skip bad lines and count them in the [`ReadReport`].
    Skip,
}

/// The text encoding of an input file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum TextEncoding {
    /// UTF-8 when the bytes are valid UTF-8, Latin-1 otherwise.
    #[default]
    Auto,
    /// `utf8` or `utf-8`.
    #[serde(alias = "utf-8")]
    Utf8,
    /// `latin1` or `latin-1`.
    #[serde(alias = "latin-1")]
    Latin1,
}

#[derive(Debug, Clone)]
pub struct ReadOptions {
    /// `None`: from the file name.
    pub format: Option<DataFormat>,
    pub text_field: String,
    pub label_field: String,
    pub on_error: OnError,
    pub encoding: TextEncoding,
}

impl Default for ReadOptions {
    fn default() -> Self {
        Self {
            format: None,
            text_field: "text".to_owned(),
            label_field: "label".to_owned(),
            on_error: OnError::Fail,
            encoding: TextEncoding::Auto,
        }
    }
}

/// The examples of a file and the lines that were skipped.
#[derive(Debug, Clone)]
pub struct ReadReport {
    pub path: PathBuf,
    pub format: DataFormat,
    pub examples: Vec<Example>,
    pub skipped: Vec<LineError>,
    /// True when the file was not valid UTF-8 and was read as Latin-1.
    pub decoded_latin1: bool,
}

/// Collects examples and bad lines according to [`OnError`].
struct Sink<'a> {
    path: &'a Path,
    on_error: OnError,
    examples: Vec<Example>,
    skipped: Vec<LineError>,
}

impl<'a> Sink<'a> {
    fn new(path: &'a Path, on_error: OnError) -> Self {
        Self { path, on_error, examples: Vec::new(), skipped: Vec::new() }
    }

    fn error(&self, line: u64, field: &str, message: impl Into<String>) -> LineError {
        LineError { path: self.path.to_owned(), line, field: field.to_owned(), message: message.into() }
    }

    /// Validates and keeps one example, or records/raises the error.
    fn push(
        &mut self,
        line: u64,
        text: Result<String, LineError>,
        label: Result<String, LineError>,
    ) -> Result<(), DataError> {
        let checked = text.and_then(|text| {
            let label = label?;
            if text.trim().is_empty() {
                return Err(self.error(line, "text", "is empty"));
            }
            if label.trim().is_empty() {
                return Err(self.error(line, "label", "is empty"));
            }
            Ok(Example { text, label: label.trim().to_owned(), line })
        });
        match checked {
            Ok(example) => self.examples.push(example),
            Err(err) => self.reject(err)?,
        }
        Ok(())
    }

    fn reject(&mut self, err: LineError) -> Result<(), DataError> {
        match self.on_error {
            OnError::Fail => Err(err.into()),
            OnError::Skip => {
                self.skipped.push(err);
                Ok(())
            }
        }
    }
}

/// Reads and validates every line of `path`.
pub fn read_examples(path: &Path, options: &ReadOptions) -> Result<ReadReport, DataError> {
    let format = match options.format {
        Some(f) => f,
        None => DataFormat::from_path(path).ok_or_else(|| DataError::UnknownFormat { path: path.to_owned() })?,
    };
    let bytes = std::fs::read(path).map_err(|source| DataError::Io { path: path.to_owned(), source })?;
    let (text, decoded_latin1) = decode(&bytes, options.encoding, path)?;
    let mut sink = Sink::new(path, options.on_error);
    match format {
        DataFormat::Csv => csv_format::read(&text, options, &mut sink)?,
        DataFormat::Jsonl => jsonl::read(&text, options, &mut sink)?,
        DataFormat::Phrasebank => at_label::read(&text, &mut sink)?,
    }
    let Sink { examples, skipped, .. } = sink;
    if examples.is_empty() {
        return Err(DataError::Empty { path: path.to_owned(), skipped: skipped.len() });
    }
    Ok(ReadReport { path: path.to_owned(), format, examples, skipped, decoded_latin1 })
}

fn decode(bytes: &[u8], encoding: TextEncoding, path: &Path) -> Result<(String, bool), DataError> {
    let bytes = bytes.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(bytes);
    let latin1 = |b: &[u8]| b.iter().map(|&c| char::from(c)).collect::<String>();
    match encoding {
        TextEncoding::Latin1 => Ok((latin1(bytes), true)),
        TextEncoding::Auto => match std::str::from_utf8(bytes) {
            Ok(s) => Ok((s.to_owned(), false)),
            Err(_) => Ok((latin1(bytes), true)),
        },
        TextEncoding::Utf8 => match std::str::from_utf8(bytes) {
            Ok(s) => Ok((s.to_owned(), false)),
            Err(e) => {
                let line = 1 + bytes[..e.valid_up_to()].iter().filter(|&&c| c == b'\n').count() as u64;
                Err(LineError {
                    path: path.to_owned(),
                    line,
                    field: "<encoding>".to_owned(),
                    message: "is not valid UTF-8 (set encoding = \"latin-1\" or \"auto\")".to_owned(),
                }
                .into())
            }
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn file(name: &str, content: &[u8]) -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join(name);
        std::fs::File::create(&path).and_then(|mut f| f.write_all(content)).expect("write");
        (dir, path)
    }

    fn err_of(name: &str, content: &[u8]) -> String {
        let (_dir, path) = file(name, content);
        match read_examples(&path, &ReadOptions::default()) {
            Ok(r) => panic!("expected an error, read {} examples", r.examples.len()),
            Err(e) => e.to_string().replace(&path.display().to_string(), "FILE"),
        }
    }

    #[test]
    fn csv_reads_quoted_fields_and_other_column_names() {
        let (_dir, path) =
            file("d.csv", b"id,disease,description\n1,Acne,\"rash, pimples\"\n2,Flu,\"fever\nand cough\"\n");
        let opts =
            ReadOptions { text_field: "description".into(), label_field: "disease".into(), ..Default::default() };
        let r = read_examples(&path, &opts).expect("read");
        assert_eq!(r.examples.len(), 2);
        assert_eq!(r.examples[0].text, "rash, pimples");
        assert_eq!(r.examples[1].text, "fever\nand cough");
        assert_eq!(r.examples[1].line, 3);
    }

    #[test]
    fn csv_errors_name_file_line_and_field() {
        assert_eq!(err_of("d.csv", b"label,text\nA,ok\nB,\n"), "FILE:3: field `text`: is empty");
        assert_eq!(
            err_of("d.csv", b"label,body\nA,ok\n"),
            "FILE:1: field `text`: no such column in the header (columns: label, body)"
        );
        assert_eq!(
            err_of("d.csv", b"label,text\nA,ok\nB,x,extra\n"),
            "FILE:3: field `<record>`: has 3 fields, the header has 2"
        );
    }

    #[test]
    fn jsonl_errors_name_file_line_and_field() {
        assert_eq!(
            err_of("d.jsonl", b"{\"text\":\"a\",\"label\":\"x\"}\n\n{\"text\":3,\"label\":\"y\"}\n"),
            "FILE:3: field `text`: expected a string, found 3"
        );
        assert_eq!(err_of("d.jsonl", b"{\"text\":\"a\"}\n"), "FILE:1: field `label`: is missing");
        let e = err_of("d.jsonl", b"{\"text\":\"a\",\"label\":\"x\"}\n{\"text\": \"b\",\n");
        assert!(e.starts_with("FILE:2: field `<json>`: "), "{e}");
    }

    #[test]
    fn jsonl_accepts_integer_labels_and_blank_lines() {
        let (_dir, path) = file("d.jsonl", b"{\"text\":\"a\",\"label\":1}\n\n{\"text\":\"b\",\"label\":\"neg\"}\n");
        let r = read_examples(&path, &ReadOptions::default()).expect("read");
        assert_eq!(r.examples[0].label, "1");
        assert_eq!(r.examples[1].line, 3);
    }

    #[test]
    fn phrasebank_reads_latin1_and_splits_at_the_last_at_sign() {
        let (_dir, path) = file("s.txt", b"Sales rose 5 % @ year end .@positive\nProfit fell \xe4 bit .@negative\n");
        let r = read_examples(&path, &ReadOptions::default()).expect("read");
        assert!(r.decoded_latin1);
        assert_eq!(r.examples[0].text, "Sales rose 5 % @ year end .");
        assert_eq!(r.examples[1].text, "Profit fell \u{e4} bit .");
        assert_eq!(r.examples[1].label, "negative");
        assert_eq!(
            err_of("s.txt", b"good line@positive\nno label here\n"),
            "FILE:2: field `label`: no `@label` at the end of the line"
        );
    }

    #[test]
    fn skip_mode_counts_bad_lines() {
        let (_dir, path) = file("s.txt", b"a@pos\nbroken\nb@neg\n@neg\n");
        let opts = ReadOptions { on_error: OnError::Skip, ..Default::default() };
        let r = read_examples(&path, &opts).expect("read");
        assert_eq!(r.examples.len(), 2);
        assert_eq!(r.skipped.iter().map(|e| e.line).collect::<Vec<_>>(), [2, 4]);
    }

    #[test]
    fn forced_utf8_names_the_line_with_invalid_bytes() {
        let (_dir, path) = file("s.txt", b"a@pos\nb\xff@neg\n");
        let opts = ReadOptions { encoding: TextEncoding::Utf8, ..Default::default() };
        let e = read_examples(&path, &opts).expect_err("invalid utf-8").to_string();
        assert!(
            e.ends_with(":2: field `<encoding>`: is not valid UTF-8 (set encoding = \"latin-1\" or \"auto\")"),
            "{e}"
        );
    }

    #[test]
    fn unknown_extension_and_empty_files_are_errors() {
        assert!(err_of("d.parquet", b"x").contains("cannot tell the format"));
        assert_eq!(err_of("d.csv", b"label,text\n"), "FILE: no examples (after skipping 0 bad lines)");
    }
}
