//! SVG charts as data: line charts of metric series and a confusion-matrix heat map. Pure
//! functions, so they are tested without a browser.

/// A named series of `(step, value)` points.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Series {
    pub label: String,
    pub points: Vec<(i64, f64)>,
}

/// The drawable parts of a line chart in a `width` x `height` box with a margin.
#[derive(Debug, Clone, PartialEq)]
pub struct LineChart {
    pub width: f64,
    pub height: f64,
    /// One `points` attribute per series (`x,y x,y ...`).
    pub lines: Vec<String>,
    pub x_range: (i64, i64),
    pub y_range: (f64, f64),
}

pub const MARGIN: f64 = 36.0;

/// Scales the series into a shared box. Non-finite values are skipped.
pub fn line_chart(series: &[Series], width: f64, height: f64) -> LineChart {
    let finite = || series.iter().flat_map(|s| s.points.iter()).filter(|(_, v)| v.is_finite());
    let (x0, x1) = finite().fold((i64::MAX, i64::MIN), |(a, b), (x, _)| (a.min(*x), b.max(*x)));
    let (y0, y1) = finite().fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), (_, y)| (a.min(*y), b.max(*y)));
    if x0 > x1 {
        return LineChart {
            width,
            height,
            lines: vec![String::new(); series.len()],
            x_range: (0, 0),
            y_range: (0.0, 0.0),
        };
    }
    let (y0, y1) = if (y1 - y0).abs() < 1e-12 { (y0 - 0.5, y1 + 0.5) } else { (y0, y1) };
    let span_x = (x1 - x0).max(1) as f64;
    let (w, h) = (width - 2.0 * MARGIN, height - 2.0 * MARGIN);
    let lines = series
        .iter()
        .map(|s| {
            s.points
                .iter()
                .filter(|(_, v)| v.is_finite())
                .map(|(x, y)| {
                    let px = MARGIN + (x - x0) as f64 / span_x * w;
                    let py = MARGIN + (1.0 - (y - y0) / (y1 - y0)) * h;
                    format!("{px:.1},{py:.1}")
                })
                .collect::<Vec<_>>()
                .join(" ")
        })
        .collect();
    LineChart { width, height, lines, x_range: (x0, x1), y_range: (y0, y1) }
}

/// A heat-map colour for a share in [0, 1]: white to deep blue.
pub fn heat(share: f64) -> String {
    let s = share.clamp(0.0, 1.0);
    let mix = |from: f64, to: f64| (from + (to - from) * s).round() as u8;
    format!("rgb({},{},{})", mix(255.0, 33.0), mix(255.0, 102.0), mix(255.0, 172.0))
}

/// Line colours, one per series.
pub const PALETTE: [&str; 6] = ["#2166ac", "#b2182b", "#1b7837", "#762a83", "#e08214", "#4d4d4d"];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn series_share_one_box_and_extremes_touch_its_edges() {
        let a = Series { label: "a".into(), points: vec![(0, 1.0), (10, 0.0)] };
        let b = Series { label: "b".into(), points: vec![(5, 0.5), (20, f64::NAN)] };
        let c = line_chart(&[a, b], 200.0, 100.0);
        assert_eq!(c.x_range, (0, 10), "NaN points are skipped");
        assert_eq!(c.lines[0], format!("{:.1},{:.1} {:.1},{:.1}", MARGIN, MARGIN, 200.0 - MARGIN, 100.0 - MARGIN));
        assert_eq!(c.lines[1], format!("{:.1},{:.1}", MARGIN + 0.5 * (200.0 - 2.0 * MARGIN), 50.0));
    }

    #[test]
    fn empty_and_flat_series_do_not_divide_by_zero() {
        assert!(line_chart(&[], 100.0, 100.0).lines.is_empty());
        let flat = Series { label: "f".into(), points: vec![(1, 2.0), (1, 2.0)] };
        let c = line_chart(&[flat], 100.0, 100.0);
        assert!(!c.lines[0].contains("NaN") && !c.lines[0].contains("inf"), "{}", c.lines[0]);
    }

    #[test]
    fn heat_goes_from_white_to_blue() {
        assert_eq!(heat(0.0), "rgb(255,255,255)");
        assert_eq!(heat(1.0), "rgb(33,102,172)");
        assert_eq!(heat(7.0), heat(1.0));
    }
}
