//! The run's timeline as a PNG (plotters): throughput per second above, latency
//! percentiles per second below.
//!
//! Text needs a TrueType font. plotters' `ab_glyph` backend is pure Rust, so the
//! build needs no fontconfig; the font is read at run time from the usual
//! Debian paths (`fonts-dejavu-core`) or `CHART_FONT`. Without one the chart is
//! still drawn, without its labels.

use std::path::{Path, PathBuf};

use plotters::prelude::*;
use plotters::style::FontStyle;

use super::stats::{Report, Tick};

const WIDTH: u32 = 1200;
const HEIGHT: u32 = 800;

/// Where a sans-serif TrueType font usually is on Debian and Ubuntu.
const FONT_PATHS: [&str; 3] = [
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/truetype/liberation/LiberationSans-Regular.ttf",
    "/usr/share/fonts/truetype/noto/NotoSans-Regular.ttf",
];

/// Registers a font for the charts' text, once; false when none was found.
fn font_ready() -> bool {
    static READY: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *READY.get_or_init(|| {
        let candidates =
            std::env::var_os("CHART_FONT").map(PathBuf::from).into_iter().chain(FONT_PATHS.iter().map(PathBuf::from));
        for path in candidates {
            if let Ok(bytes) = std::fs::read(&path) {
                // plotters keeps registered fonts for the life of the process.
                let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
                if plotters::style::register_font("sans-serif", FontStyle::Normal, bytes).is_ok() {
                    return true;
                }
            }
        }
        false
    })
}

/// Draws `report`'s timeline into `path` (PNG); `title` heads the chart.
pub fn draw(report: &Report, title: &str, path: &Path) -> anyhow::Result<()> {
    let labels = font_ready();
    if !labels {
        eprintln!(
            "chart: no TrueType font found (install fonts-dejavu-core or set CHART_FONT); drawing without labels"
        );
    }
    render(BitMapBackend::new(path, (WIDTH, HEIGHT)).into_drawing_area(), report, title, labels)
}

fn render<DB: DrawingBackend>(
    root: DrawingArea<DB, plotters::coord::Shift>,
    report: &Report,
    title: &str,
    labels: bool,
) -> anyhow::Result<()>
where
    DB::ErrorType: 'static,
{
    root.fill(&WHITE).map_err(plot_error)?;
    let area = if labels { root.titled(title, ("sans-serif", 24)).map_err(plot_error)? } else { root.clone() };
    let (upper, lower) = area.split_vertically(HEIGHT * 45 / 100);

    let seconds = report.timeline.len().max(1) as f64;
    let peak_rps = report.timeline.iter().map(|t| t.completed).max().unwrap_or(0).max(1) as f64;
    let peak_ms = report.timeline.iter().map(|t| t.p99_ms).fold(0.0_f64, f64::max).max(0.1);
    let axis = |n: u32| if labels { n } else { 0 };

    let mut throughput = ChartBuilder::on(&upper)
        .margin(12)
        .x_label_area_size(axis(30))
        .y_label_area_size(axis(70))
        .build_cartesian_2d(0.0..seconds, 0.0..peak_rps * 1.1)
        .map_err(plot_error)?;
    let mut mesh = throughput.configure_mesh();
    mesh.y_desc("completed / s");
    if !labels {
        mesh.disable_x_axis().disable_y_axis();
    }
    mesh.draw().map_err(plot_error)?;
    let points = report.timeline.iter().map(|t| (t.second as f64 + 0.5, t.completed as f64));
    throughput.draw_series(LineSeries::new(points, BLUE.stroke_width(2))).map_err(plot_error)?;

    let mut latency = ChartBuilder::on(&lower)
        .margin(12)
        .x_label_area_size(axis(40))
        .y_label_area_size(axis(70))
        .build_cartesian_2d(0.0..seconds, 0.0..peak_ms * 1.1)
        .map_err(plot_error)?;
    let mut mesh = latency.configure_mesh();
    mesh.x_desc("seconds since the start").y_desc("latency (ms)");
    if !labels {
        mesh.disable_x_axis().disable_y_axis();
    }
    mesh.draw().map_err(plot_error)?;
    let series: [Series; 3] = [("p50", P50, |t| t.p50_ms), ("p95", P95, |t| t.p95_ms), ("p99", P99, |t| t.p99_ms)];
    for (name, color, value) in series {
        let points = report.timeline.iter().map(move |t| (t.second as f64 + 0.5, value(t)));
        let drawn = latency.draw_series(LineSeries::new(points, color.stroke_width(2))).map_err(plot_error)?;
        if labels {
            drawn.label(name).legend(move |(x, y)| PathElement::new([(x, y), (x + 20, y)], color.stroke_width(2)));
        }
    }
    if labels {
        latency
            .configure_series_labels()
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .draw()
            .map_err(plot_error)?;
    }
    root.present().map_err(plot_error)?;
    Ok(())
}

/// A latency line: its legend, colour and value per second.
type Series = (&'static str, RGBColor, fn(&Tick) -> f64);

const P50: RGBColor = RGBColor(0, 150, 0);
const P95: RGBColor = RGBColor(255, 140, 0);
const P99: RGBColor = RGBColor(220, 0, 0);

fn plot_error<E: std::error::Error + Send + Sync + 'static>(error: DrawingAreaErrorKind<E>) -> anyhow::Error {
    anyhow::anyhow!("drawing the chart: {error}")
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::load::stats::Stats;

    fn report() -> Report {
        let mut stats = Stats::default();
        for second in 0..10 {
            for n in 1..=(second * 10 + 5) {
                stats.record(second, Duration::from_micros(n as u64 * 100), "SOLD_OUT");
            }
        }
        stats.report(Duration::from_secs(10))
    }

    #[test]
    fn the_chart_draws_throughput_and_every_percentile() -> anyhow::Result<()> {
        let mut pixels = vec![0_u8; (WIDTH * HEIGHT * 3) as usize];
        {
            let root = BitMapBackend::with_buffer(&mut pixels, (WIDTH, HEIGHT)).into_drawing_area();
            render(root, &report(), "test run", font_ready())?;
        }
        let count = |color: RGBColor| pixels.chunks_exact(3).filter(|p| *p == [color.0, color.1, color.2]).count();
        for (name, color) in [("throughput", BLUE), ("p50", P50), ("p95", P95), ("p99", P99)] {
            assert!(count(color) > 100, "the {name} line is missing ({} pixels)", count(color));
        }
        Ok(())
    }

    #[test]
    fn the_chart_is_written_as_a_png() -> anyhow::Result<()> {
        let path = std::env::temp_dir().join(format!("flashsale-chart-{}.png", std::process::id()));
        draw(&report(), "test run", &path)?;
        let bytes = std::fs::read(&path)?;
        std::fs::remove_file(&path)?;
        assert!(bytes.starts_with(b"\x89PNG\r\n\x1a\n"), "not a PNG");
        // The IHDR chunk: width and height, big-endian, right after its header.
        let dimension = |at: usize| bytes.get(at..at + 4).map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]));
        assert_eq!((dimension(16), dimension(20)), (Some(WIDTH), Some(HEIGHT)));
        Ok(())
    }
}
