//! The pages, and what they share: number and time formatting, the line chart component.

pub mod compare;
pub mod feedback;
pub mod models;
pub mod playground;
pub mod run;
pub mod runs;

use leptos::prelude::*;

use crate::charts::{LineChart, MARGIN, PALETTE, Series, line_chart};

/// `0.9844`, or `—`.
pub fn metric(v: Option<f64>) -> String {
    v.map_or_else(|| "—".into(), |v| format!("{v:.4}"))
}

/// Milliseconds since the epoch as `YYYY-MM-DD HH:MM` (UTC).
pub fn when(ms: i64) -> String {
    let secs = ms.div_euclid(1000);
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!("{y:04}-{m:02}-{d:02} {:02}:{:02}", rem / 3600, rem % 3600 / 60)
}

/// `3 m 12 s`, from start and end in milliseconds.
pub fn duration(start: i64, end: Option<i64>) -> String {
    let Some(end) = end else { return "—".into() };
    let s = (end - start).max(0) / 1000;
    match s {
        0..60 => format!("{s} s"),
        60..3600 => format!("{} m {} s", s / 60, s % 60),
        _ => format!("{} h {} m", s / 3600, s % 3600 / 60),
    }
}

/// A line chart of one or more series with axis labels and a legend.
#[component]
pub fn Chart(title: String, series: Vec<Series>) -> impl IntoView {
    let LineChart { width, height, lines, x_range, y_range } = line_chart(&series, 640.0, 260.0);
    let has_points = series.iter().any(|s| !s.points.is_empty());
    let legend = series
        .iter()
        .enumerate()
        .map(|(i, s)| {
            let color = PALETTE[i % PALETTE.len()];
            view! { <span class="legend"><i style=format!("background:{color}")></i>{s.label.clone()}</span> }
        })
        .collect_view();
    let paths = lines
        .into_iter()
        .enumerate()
        .map(|(i, points)| {
            let color = PALETTE[i % PALETTE.len()];
            view! { <polyline points=points fill="none" stroke=color stroke-width="1.6"></polyline> }
        })
        .collect_view();
    view! {
        <figure class="chart">
            <figcaption>{title}" "{legend}</figcaption>
            {if has_points {
                view! {
                    <svg viewBox=format!("0 0 {width} {height}") role="img">
                        <rect x=MARGIN y=MARGIN width=width - 2.0 * MARGIN height=height - 2.0 * MARGIN class="plot"></rect>
                        {paths}
                        <text x=MARGIN y=height - 10.0 class="axis">{format!("step {}", x_range.0)}</text>
                        <text x=width - MARGIN y=height - 10.0 class="axis" text-anchor="end">{format!("step {}", x_range.1)}</text>
                        <text x=4.0 y=MARGIN + 4.0 class="axis">{format!("{:.4}", y_range.1)}</text>
                        <text x=4.0 y=height - MARGIN class="axis">{format!("{:.4}", y_range.0)}</text>
                    </svg>
                }
                    .into_any()
            } else {
                view! { <p class="empty">"No points recorded."</p> }.into_any()
            }}
        </figure>
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_and_durations_read_well() {
        assert_eq!(when(0), "1970-01-01 00:00");
        assert_eq!(when(1_795_827_720_000), "2026-11-28 01:02");
        assert_eq!(when(951_782_400_000), "2000-02-29 00:00");
        assert_eq!(duration(0, Some(59_000)), "59 s");
        assert_eq!(duration(0, Some(192_000)), "3 m 12 s");
        assert_eq!(duration(0, Some(7_380_000)), "2 h 3 m");
        assert_eq!(duration(0, None), "—");
        assert_eq!(metric(Some(0.98437)), "0.9844");
    }
}
