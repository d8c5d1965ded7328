//! The figures of `medrl plot`, drawn from a run's logs (`run_log`): reward and accuracy per RL
//! step, throughput, staleness, Acc@1 / Pass@K per phase and the support map. PNG only; the
//! font, palette and Pass@k panel are those of the evaluation figure (`plot`).

use std::path::Path;

use plotters::coord::Shift;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};

use crate::error::{EvalError, Result};
use crate::metrics::Metrics;
use crate::plot::{COLOURS, Curve, axis_style, curve, ensure_font, legend, panel};
use crate::run_log::{PhaseEval, StepPoint, SupportSnapshot};

/// Size of a one-panel figure in pixels.
pub const SINGLE_SIZE: (u32, u32) = (1000, 600);
/// Size of a two-panel figure in pixels.
pub const DOUBLE_SIZE: (u32, u32) = (1400, 620);

/// One line of a line chart.
#[derive(Debug, Clone, PartialEq)]
pub struct Series {
    /// Legend text.
    pub label: String,
    /// (x, y) points; non-finite ones are left out.
    pub points: Vec<(f64, f64)>,
}

/// One set of bars: a value per category (a non-finite one is drawn as "n/a").
struct Bars {
    label: String,
    colour: RGBColor,
    values: Vec<f64>,
}

type Drawn = std::result::Result<(), String>;

fn palette(i: usize) -> RGBColor {
    let (r, g, b) = COLOURS[i % COLOURS.len()];
    RGBColor(r, g, b)
}

/// Draws to `path` with a bitmap of `size`, turning plotters' errors into [`EvalError::Plot`].
fn render(path: &Path, size: (u32, u32), draw: impl FnOnce(DrawingArea<BitMapBackend<'_>, Shift>) -> Drawn) -> Result<()> {
    ensure_font()?;
    let root = BitMapBackend::new(path, size).into_drawing_area();
    draw(root).map_err(|problem| EvalError::Plot { path: path.to_path_buf(), problem })
}

/// An axis label: whole numbers without decimals (steps, counts), others to two places at most.
fn tick(v: &f64) -> String {
    if (v - v.round()).abs() < 1e-9 { format!("{v:.0}") } else { format!("{v:.2}").trim_end_matches('0').to_owned() }
}

/// A range around `lo..hi` that is never empty; `from_zero` keeps 0 in it.
fn span(lo: f64, hi: f64, from_zero: bool) -> (f64, f64) {
    let (mut lo, mut hi) = if lo.is_finite() && hi.is_finite() { (lo, hi) } else { (0.0, 1.0) };
    if from_zero {
        lo = lo.min(0.0);
        hi = hi.max(0.0);
    }
    if hi - lo < 1e-9 {
        return (lo - 0.5, hi + 0.5);
    }
    let pad = if from_zero { 0.0 } else { 0.02 * (hi - lo) };
    (lo - pad, hi + 0.08 * (hi - lo))
}

/// A line chart, one line per series, to `path` (PNG). Nothing to draw is an error.
pub fn line_chart(path: &Path, title: &str, x_desc: &str, y_desc: &str, series: &[Series]) -> Result<()> {
    let series: Vec<Series> = series
        .iter()
        .map(|s| Series { label: s.label.clone(), points: s.points.iter().copied().filter(|(x, y)| x.is_finite() && y.is_finite()).collect() })
        .filter(|s| !s.points.is_empty())
        .collect();
    if series.is_empty() {
        return Err(EvalError::Data(format!("{}: no points to plot", path.display())));
    }
    let points = || series.iter().flat_map(|s| s.points.iter());
    let fold = |f: fn(f64, f64) -> f64, init: f64, pick: fn(&(f64, f64)) -> f64| points().map(pick).fold(init, f);
    let x = span(fold(f64::min, f64::INFINITY, |p| p.0), fold(f64::max, f64::NEG_INFINITY, |p| p.0), false);
    let y = span(fold(f64::min, f64::INFINITY, |p| p.1), fold(f64::max, f64::NEG_INFINITY, |p| p.1), true);
    render(path, SINGLE_SIZE, |root| {
        root.fill(&WHITE).map_err(|e| e.to_string())?;
        let mut chart = ChartBuilder::on(&root)
            .caption(title, ("sans-serif", 24))
            .margin(14)
            .x_label_area_size(44)
            .y_label_area_size(64)
            .build_cartesian_2d(x.0..x.1, y.0..y.1)
            .map_err(|e| e.to_string())?;
        axis_style(chart.configure_mesh().x_desc(x_desc).y_desc(y_desc).x_label_formatter(&tick).y_label_formatter(&tick))
            .draw()
            .map_err(|e| e.to_string())?;
        for (i, s) in series.iter().enumerate() {
            let colour = palette(i);
            // Markers only while they stay readable.
            let marker = if s.points.len() <= 60 { 3 } else { 0 };
            chart
                .draw_series(LineSeries::new(s.points.iter().copied(), ShapeStyle::from(&colour).stroke_width(2)).point_size(marker))
                .map_err(|e| e.to_string())?
                .label(s.label.clone())
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 22, y)], ShapeStyle::from(&colour).stroke_width(2)));
        }
        legend(&mut chart, SeriesLabelPosition::UpperLeft)?;
        root.present().map_err(|e| e.to_string())
    })
}

/// Width of one category on a bar chart's x axis: integer coordinates, because plotters formats
/// custom tick positions (the category names) only on integer axes.
const SLOT: i32 = 1000;

/// Bars per category on `area`: side by side, or stacked (`stacked`), with a legend.
fn bar_panel<DB: DrawingBackend>(area: &DrawingArea<DB, Shift>, title: &str, y_desc: &str, categories: &[String], bars: &[Bars], stacked: bool) -> Drawn {
    let n = categories.len();
    let top = (0..n)
        .map(|i| {
            let values = bars.iter().map(|b| b.values.get(i).copied().filter(|v| v.is_finite()).unwrap_or(0.0));
            if stacked { values.sum::<f64>() } else { values.fold(0.0, f64::max) }
        })
        .fold(0.0, f64::max);
    // Head room for the legend and the value labels.
    let y_max = if top > 0.0 { top * 1.25 } else { 1.0 };
    let ticks: Vec<i32> = (0..n as i32).map(|i| i * SLOT).collect();
    let mut chart = ChartBuilder::on(area)
        .caption(title, ("sans-serif", 24))
        .margin(14)
        .x_label_area_size(44)
        .y_label_area_size(64)
        .build_cartesian_2d((-SLOT / 2..n as i32 * SLOT - SLOT / 2).with_key_points(ticks), 0f64..y_max)
        .map_err(|e| e.to_string())?;
    let name = |x: &i32| if x.rem_euclid(SLOT) == 0 { categories.get((x / SLOT) as usize).cloned().unwrap_or_default() } else { String::new() };
    axis_style(chart.configure_mesh().disable_x_mesh().y_desc(y_desc).x_label_formatter(&name).y_label_formatter(&tick))
        .draw()
        .map_err(|e| e.to_string())?;
    let mut base = vec![0.0; n];
    let full = SLOT * 4 / 5;
    let width = if stacked { full } else { full / bars.len().max(1) as i32 };
    for (j, b) in bars.iter().enumerate() {
        let mut rects = Vec::with_capacity(n);
        let mut labels = Vec::new();
        for (i, &v) in b.values.iter().enumerate().take(n) {
            let start = i as i32 * SLOT - full / 2;
            let left = if stacked { start } else { start + j as i32 * width };
            let known = v.is_finite();
            let v = if known { v } else { 0.0 };
            let (lo, hi) = if stacked { (base[i], base[i] + v) } else { (0.0, v) };
            base[i] = hi;
            rects.push(Rectangle::new([(left, lo), (left + width, hi)], b.colour.filled()));
            if !stacked {
                let above = ("sans-serif", 13).into_font().color(&BLACK).pos(Pos::new(HPos::Center, VPos::Bottom));
                let label = if known { format!("{v:.1}") } else { "n/a".to_owned() };
                labels.push(Text::new(label, (left + width / 2, hi + 0.01 * y_max), above));
            }
        }
        let colour = b.colour;
        chart
            .draw_series(rects)
            .map_err(|e| e.to_string())?
            .label(b.label.clone())
            .legend(move |(x, y)| Rectangle::new([(x, y - 6), (x + 14, y + 6)], colour.filled()));
        chart.draw_series(labels).map_err(|e| e.to_string())?;
    }
    legend(&mut chart, SeriesLabelPosition::UpperRight)
}

/// `reward.png`: mean total reward and mean accuracy of each RL step.
pub fn plot_reward(steps: &[StepPoint], path: &Path) -> Result<()> {
    let series = [
        Series { label: "mean reward".into(), points: steps.iter().map(|s| (s.step as f64, s.mean_reward)).collect() },
        Series { label: "mean accuracy".into(), points: steps.iter().map(|s| (s.step as f64, s.mean_accuracy)).collect() },
    ];
    line_chart(path, "Rollout reward per RL step", "RL step", "reward / accuracy", &series)
}

/// `throughput.png`: completion tokens per second of wall time between step ends, and per
/// second of the step itself (taking groups to the optimizer step's end).
pub fn plot_throughput(steps: &[StepPoint], path: &Path) -> Result<()> {
    let wall = steps
        .windows(2)
        .filter(|w| w[1].time > w[0].time)
        .map(|w| (w[1].step as f64, w[1].tokens / (w[1].time - w[0].time)))
        .collect();
    let compute = steps.iter().filter(|s| s.step_seconds > 0.0).map(|s| (s.step as f64, s.tokens / s.step_seconds)).collect();
    let series = [
        Series { label: "tokens / wall second (between step ends)".into(), points: wall },
        Series { label: "tokens / step second".into(), points: compute },
    ];
    line_chart(path, "Completion tokens per second", "RL step", "tokens / s", &series)
}

/// `staleness.png`: mean and max policy staleness (versions) of each step's trained groups.
pub fn plot_staleness(steps: &[StepPoint], path: &Path) -> Result<()> {
    let with = || steps.iter().filter_map(|s| s.staleness.map(|st| (s.step as f64, st)));
    let series = [
        Series { label: "mean staleness".into(), points: with().map(|(x, st)| (x, st.0)).collect() },
        Series { label: "max staleness".into(), points: with().map(|(x, st)| (x, st.1)).collect() },
    ];
    line_chart(path, "Policy staleness of trained groups", "RL step", "versions behind the learner", &series)
}

/// `acc_passk.png`: greedy Acc@1 and Pass@K per phase (left) and, for phases with their
/// `metrics.json`, the Pass@k curves (right, with each phase's Acc@1 marked at k = 1).
pub fn plot_acc_passk(phases: &[PhaseEval], curves: &[(String, Metrics)], path: &Path) -> Result<()> {
    if phases.is_empty() && curves.is_empty() {
        return Err(EvalError::Data(format!("{}: no evaluation to plot", path.display())));
    }
    let categories: Vec<String> = phases.iter().map(|p| p.phase.clone()).collect();
    let same_k = phases.windows(2).all(|w| w[0].k == w[1].k);
    let k_label = match phases.first() {
        Some(p) if same_k => format!("Pass@{}", p.k),
        _ => "Pass@K (K per phase)".to_owned(),
    };
    let bars = [
        Bars { label: "greedy Acc@1".into(), colour: palette(0), values: phases.iter().map(|p| 100.0 * p.acc_at_1).collect() },
        Bars { label: k_label, colour: palette(1), values: phases.iter().map(|p| 100.0 * p.pass_at_k).collect() },
    ];
    let curve_list: Vec<Curve> = curves.iter().enumerate().map(|(i, (phase, m))| curve(phase, &m.overall, palette(i), false)).collect();
    let k_max = curves.iter().flat_map(|(_, m)| m.all_ks()).max().unwrap_or(1).max(2) as f64;
    let size = if phases.is_empty() || curves.is_empty() { SINGLE_SIZE } else { DOUBLE_SIZE };
    render(path, size, |root| {
        root.fill(&WHITE).map_err(|e| e.to_string())?;
        let title = "Acc@1 and Pass@K per phase";
        match (phases.is_empty(), curve_list.is_empty()) {
            (false, false) => {
                let (left, right) = root.split_horizontally(size.0 / 2);
                bar_panel(&left, title, "%", &categories, &bars, false)?;
                panel(&right, "Pass@k by phase", &curve_list, k_max)?;
            }
            (false, true) => bar_panel(&root, title, "%", &categories, &bars, false)?,
            _ => panel(&root, "Pass@k by phase", &curve_list, k_max)?,
        }
        root.present().map_err(|e| e.to_string())
    })
}

/// Colour of a support class: red for no support, green for learnable, blue for saturated.
fn class_colour(class: &str, i: usize) -> RGBColor {
    match class {
        "unseen" => RGBColor(190, 190, 190),
        "zero" => RGBColor(214, 39, 40),
        "partial" => RGBColor(44, 160, 44),
        "saturated" => RGBColor(31, 119, 180),
        _ => palette(i + 4),
    }
}

/// `support.png`: prompts per modality by support class, stacked (left), and each modality's
/// mean last pass rate (right), from one coordinator snapshot.
pub fn plot_support(snapshot: &SupportSnapshot, path: &Path) -> Result<()> {
    if snapshot.modalities.is_empty() {
        return Err(EvalError::Data(format!("{}: the support snapshot has no modality", path.display())));
    }
    let categories: Vec<String> = snapshot.modalities.iter().map(|m| m.modality.clone()).collect();
    let stacks: Vec<Bars> = snapshot
        .classes
        .iter()
        .enumerate()
        .map(|(c, class)| Bars {
            label: class.clone(),
            colour: class_colour(class, c),
            values: snapshot.modalities.iter().map(|m| m.counts.get(c).copied().unwrap_or(0) as f64).collect(),
        })
        .collect();
    let rates = [Bars {
        label: "mean pass rate (%), observed prompts".into(),
        colour: palette(4),
        // NaN draws as "n/a": no prompt of the modality was observed yet.
        values: snapshot.modalities.iter().map(|m| m.mean_pass_rate.map_or(f64::NAN, |r| 100.0 * r)).collect(),
    }];
    render(path, DOUBLE_SIZE, |root| {
        root.fill(&WHITE).map_err(|e| e.to_string())?;
        let (left, right) = root.split_horizontally(DOUBLE_SIZE.0 / 2);
        bar_panel(&left, &format!("Prompts by support class (after epoch {})", snapshot.epoch), "prompts", &categories, &stacks, true)?;
        bar_panel(&right, "Mean pass rate per modality", "%", &categories, &rates, false)?;
        root.present().map_err(|e| e.to_string())
    })
}
