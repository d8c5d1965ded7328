//! The Pass@k curve figure: Pass@k against k (log2 axis), one line per dataset (left panel)
//! and per modality (right panel), the overall curve in black in both, and each group's greedy
//! Acc@1 marked with a cross at k = 1 so the gap to sampled support is visible. PNG and SVG.

use std::path::Path;
use std::sync::OnceLock;

use plotters::chart::MeshStyle;
use plotters::coord::Shift;
use plotters::prelude::*;

use crate::error::{EvalError, Result};
use crate::metrics::{GroupMetrics, Metrics};

/// DejaVu Sans (Bitstream Vera licence, see `assets/DejaVuSans-LICENSE.txt`): plotters lays out
/// text with a registered font even for SVG, and no system font may be relied upon.
static FONT: &[u8] = include_bytes!("../assets/DejaVuSans.ttf");

/// Tableau 10: distinguishable, colour-blind friendlier than plotters' default palette.
pub(crate) const COLOURS: [(u8, u8, u8); 10] = [
    (31, 119, 180),
    (255, 127, 14),
    (44, 160, 44),
    (214, 39, 40),
    (148, 103, 189),
    (140, 86, 75),
    (227, 119, 194),
    (127, 127, 127),
    (188, 189, 34),
    (23, 190, 207),
];

/// Figure size in pixels (both panels).
pub const FIGURE_SIZE: (u32, u32) = (1400, 620);

/// The house style of every chart's axes: label fonts and a faint grid of major lines only.
pub(crate) fn axis_style<'m, 'a, 'b, X: Ranged, Y: Ranged, DB: DrawingBackend>(mesh: &'m mut MeshStyle<'a, 'b, X, Y, DB>) -> &'m mut MeshStyle<'a, 'b, X, Y, DB> {
    mesh.label_style(("sans-serif", 15)).axis_desc_style(("sans-serif", 16)).light_line_style(WHITE.mix(0.0)).bold_line_style(BLACK.mix(0.12))
}

/// Draws a chart's legend at `position` in the house style.
pub(crate) fn legend<'a, DB: DrawingBackend + 'a, CT: CoordTranslate>(chart: &mut ChartContext<'a, DB, CT>, position: SeriesLabelPosition) -> std::result::Result<(), String> {
    chart
        .configure_series_labels()
        .position(position)
        .label_font(("sans-serif", 14))
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK.mix(0.3))
        .draw()
        .map_err(|e| e.to_string())
}

/// Registers the embedded font as plotters' `sans-serif`, once per process.
pub(crate) fn ensure_font() -> Result<()> {
    static REGISTERED: OnceLock<bool> = OnceLock::new();
    let ok = *REGISTERED.get_or_init(|| plotters::style::register_font("sans-serif", FontStyle::Normal, FONT).is_ok());
    if ok { Ok(()) } else { Err(EvalError::Data("the embedded DejaVu Sans font failed to load".into())) }
}

/// One curve: its label, Pass@k points and greedy Acc@1, in percent.
pub(crate) struct Curve {
    label: String,
    points: Vec<(f64, f64)>,
    acc_at_1: f64,
    colour: RGBColor,
    overall: bool,
}

pub(crate) fn curve(name: &str, g: &GroupMetrics, colour: RGBColor, overall: bool) -> Curve {
    Curve {
        label: format!("{name} ({} items, Acc@1 {:.1}%)", g.items, 100.0 * g.acc_at_1),
        points: g.pass_at_k.iter().map(|(&k, &p)| (k as f64, 100.0 * p)).collect(),
        acc_at_1: 100.0 * g.acc_at_1,
        colour,
        overall,
    }
}

fn curves(metrics: &Metrics, groups: &std::collections::BTreeMap<String, GroupMetrics>) -> Vec<Curve> {
    let mut out = vec![curve("overall", &metrics.overall, BLACK, true)];
    for (i, (name, g)) in groups.iter().enumerate() {
        let (r, gr, b) = COLOURS[i % COLOURS.len()];
        out.push(curve(name, g, RGBColor(r, gr, b), false));
    }
    out
}

/// Draws one panel; plotters' error type is generic over the backend, so it is stringified here.
pub(crate) fn panel<DB: DrawingBackend>(area: &DrawingArea<DB, Shift>, title: &str, curves: &[Curve], k_max: f64) -> std::result::Result<(), String> {
    let mut chart = ChartBuilder::on(area)
        .caption(title, ("sans-serif", 24))
        .margin(14)
        .x_label_area_size(44)
        .y_label_area_size(56)
        .build_cartesian_2d((0.85f64..k_max * 1.15).log_scale().base(2.0), 0f64..100f64)
        .map_err(|e| e.to_string())?;
    let ticks = (k_max.log2().round() as usize) + 1;
    axis_style(chart.configure_mesh().x_desc("k (samples drawn, log2 scale)").y_desc("Pass@k (%)").x_labels(ticks).y_labels(11).x_label_formatter(&|x| format!("{x:.0}")).y_label_formatter(&|y| format!("{y:.0}")))
        .draw()
        .map_err(|e| e.to_string())?;
    for c in curves {
        let width = if c.overall { 3 } else { 2 };
        let style = ShapeStyle::from(&c.colour).stroke_width(width);
        let colour = c.colour;
        chart
            .draw_series(LineSeries::new(c.points.iter().copied(), style).point_size(3))
            .map_err(|e| e.to_string())?
            .label(c.label.clone())
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 22, y)], ShapeStyle::from(&colour).stroke_width(width)));
        chart
            .draw_series(std::iter::once(Cross::new((1.0, c.acc_at_1), 7, ShapeStyle::from(&c.colour).stroke_width(3))))
            .map_err(|e| e.to_string())?;
    }
    // The marker's meaning, as a legend entry of its own.
    chart
        .draw_series(std::iter::empty::<Cross<(f64, f64), i32>>())
        .map_err(|e| e.to_string())?
        .label("greedy Acc@1 (drawn at k = 1)")
        .legend(|(x, y)| Cross::new((x + 11, y), 6, ShapeStyle::from(&BLACK).stroke_width(2)));
    legend(&mut chart, SeriesLabelPosition::LowerRight)
}

fn draw<DB: DrawingBackend>(root: DrawingArea<DB, Shift>, metrics: &Metrics) -> std::result::Result<(), String> {
    root.fill(&WHITE).map_err(|e| e.to_string())?;
    let k_max = metrics.all_ks().last().copied().unwrap_or(1).max(2) as f64;
    let (left, right) = root.split_horizontally(FIGURE_SIZE.0 / 2);
    panel(&left, "Pass@k by dataset", &curves(metrics, &metrics.by_dataset), k_max)?;
    panel(&right, "Pass@k by modality", &curves(metrics, &metrics.by_modality), k_max)?;
    root.present().map_err(|e| e.to_string())
}

/// Draws the Pass@k figure to `stem.png` and `stem.svg`.
pub fn plot_pass_at_k(metrics: &Metrics, stem: &Path) -> Result<()> {
    ensure_font()?;
    if metrics.all_ks().is_empty() {
        return Err(EvalError::Data("no Pass@k values to plot (items have no samples)".into()));
    }
    let png = stem.with_extension("png");
    draw(BitMapBackend::new(&png, FIGURE_SIZE).into_drawing_area(), metrics)
        .map_err(|problem| EvalError::Plot { path: png.clone(), problem })?;
    let svg = stem.with_extension("svg");
    draw(SVGBackend::new(&svg, FIGURE_SIZE).into_drawing_area(), metrics).map_err(|problem| EvalError::Plot { path: svg.clone(), problem })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::compute_metrics;
    use crate::samples::{ItemSamples, Judged};

    #[test]
    fn writes_png_and_svg() -> Result<()> {
        let j = |c: bool| Judged { text: String::new(), prediction: "A".into(), correct: c, format_ok: true };
        let items: Vec<ItemSamples> = (0..6)
            .map(|i| ItemSamples {
                id: i.to_string(),
                dataset: format!("ds{}", i % 2),
                modality: format!("mod{}", i % 3),
                answer_label: None,
                answer: "a".into(),
                greedy: j(i % 2 == 0),
                samples: (0..16).map(|s| j(s < i * 2)).collect(),
            })
            .collect();
        let dir = tempfile::tempdir().map_err(|e| EvalError::io("tempdir", e))?;
        plot_pass_at_k(&compute_metrics(&items)?, &dir.path().join("passk"))?;
        let png = std::fs::read(dir.path().join("passk.png")).map_err(|e| EvalError::io("png", e))?;
        assert!(png.starts_with(b"\x89PNG"));
        let svg = std::fs::read_to_string(dir.path().join("passk.svg")).map_err(|e| EvalError::io("svg", e))?;
        assert!(svg.contains("<svg") && svg.contains("Pass@k by modality"));
        Ok(())
    }
}
