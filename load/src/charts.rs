//! The `--report`'s charts, drawn as SVG with plotters: the latency histogram, the
//! percentile curve, throughput and errors per second, and the sweep (latency and achieved
//! throughput against offered load). Every target of the invocation is in the same chart,
//! in its own colour (geomatch blue, Redis red, Valkey green), named in the legend
//! ([`display_name`]: geomatch as "geomatch (grpc)"); in a sweep, a target's runs are
//! shades of its colour, darker for higher rates.

use plotters::{
    coord::{Shift, combinators::WithKeyPoints},
    element::DashedPathElement,
    prelude::*,
    style::text_anchor::{HPos, Pos, VPos},
};

use crate::report::RunOutcome;

/// Width of every chart, in pixels.
const WIDTH: u32 = 1000;
/// Height of a one-panel chart, in pixels.
const HEIGHT: u32 = 460;
/// Height of a two-panel chart (throughput, sweep), in pixels.
const HEIGHT_2: u32 = 760;
/// Width of the legend column right of every plot, in pixels.
const LEGEND_WIDTH: u32 = 240;
/// Bins of the latency histogram (equal widths on its log scale).
const BINS: usize = 60;
/// The percentiles marked on the percentile curve (and listed in the report's table).
pub(crate) const MARKED: [(f64, &str); 4] =
    [(0.5, "p50"), (0.9, "p90"), (0.99, "p99"), (0.999, "p99.9")];

/// Target colours: blue (geomatch), red (Redis), green (Valkey), then purple and orange
/// for any other target, in the order they ran.
const PALETTE: [(u8, u8, u8); 5] = [
    (31, 119, 180),
    (214, 39, 40),
    (44, 160, 44),
    (148, 103, 189),
    (255, 127, 14),
];

/// The colour of `target`, the `i`-th target to run: each known target always has its own
/// (the same in every report, whichever targets ran beside it).
fn target_rgb(target: &str, i: usize) -> RGBColor {
    let k = match target {
        "grpc" => 0,
        "redis" => 1,
        "valkey" => 2,
        _ => 3 + i % 2,
    };
    let (r, g, b) = PALETTE[k];
    RGBColor(r, g, b)
}

/// A target as people read it in the report and the legends: the gRPC target is geomatch
/// ("geomatch (grpc)"); the others by their name (`redis`, `valkey`). The table and the JSON
/// lines keep the bare names.
pub(crate) fn display_name(target: &str) -> String {
    match target {
        "grpc" => "geomatch (grpc)".to_string(),
        other => other.to_string(),
    }
}

/// A grey for references (offered load, the ideal diagonal).
const GREY: RGBColor = RGBColor(120, 120, 120);

/// One chart: its file-name part (`FILE-<name>.svg`), title, SVG text and how to read it.
pub(crate) struct Chart {
    /// The chart's name in `FILE-<name>.svg`.
    pub(crate) name: &'static str,
    /// The chart's heading in the HTML report.
    pub(crate) title: &'static str,
    /// One line on how to read it.
    pub(crate) caption: &'static str,
    /// The SVG document.
    pub(crate) svg: String,
}

/// Every chart for these runs: latency, percentiles, throughput, and the sweep when
/// `sweep` (the runs are open loop at several rates per target).
pub(crate) fn all(runs: &[RunOutcome], sweep: bool) -> anyhow::Result<Vec<Chart>> {
    let series = series(runs);
    let mut out = vec![
        Chart {
            name: "latency",
            title: "Latency histogram",
            caption: "Share of successful calls by latency (log scale). A narrow peak far \
                      left is good; a long right tail is the calls that waited.",
            svg: latency_histogram(&series)?,
        },
        Chart {
            name: "percentiles",
            title: "Latency by percentile",
            caption: "Latency (log scale) at each percentile; the x axis stretches the tail \
                      (each step is one more nine). Dots mark p50, p90, p99, p99.9 and max.",
            svg: percentiles(&series)?,
        },
        Chart {
            name: "throughput",
            title: "Throughput and errors per second",
            caption: "Successful operations and failed calls in each second of the run \
                      (in a sweep, the rates one after another); the grey dashes are the \
                      offered load of an open-loop run.",
            svg: throughput(&series)?,
        },
    ];
    if sweep {
        out.push(Chart {
            name: "sweep",
            title: "Latency and throughput against offered load",
            caption: "Top: p50 (solid) and p99 (dashed) latency at each offered rate; the \
                      knee is where they turn upward. Bottom: achieved against offered; \
                      below the grey diagonal the target no longer keeps up.",
            svg: sweep_chart(&series)?,
        });
    }
    Ok(out)
}

/// One run as drawn: its label and colour.
pub(crate) struct Series<'a> {
    /// The run.
    pub(crate) run: &'a RunOutcome,
    /// Its legend label: the target, and the rate when a target has several runs.
    pub(crate) label: String,
    /// Its colour: the target's, shaded by rate in a sweep.
    color: RGBColor,
    /// Its target's own colour (unshaded), for the charts that draw one line per target.
    target_color: RGBColor,
}

impl Series<'_> {
    /// The series' colour for CSS (the report's table).
    pub(crate) fn css_color(&self) -> String {
        let RGBColor(r, g, b) = self.color;
        format!("#{r:02x}{g:02x}{b:02x}")
    }
}

/// The runs as series: targets in the order they ran, each in its own colour.
pub(crate) fn series(runs: &[RunOutcome]) -> Vec<Series<'_>> {
    let targets = targets(runs);
    runs.iter()
        .map(|run| {
            let t = targets.iter().position(|t| *t == run.target).unwrap_or(0);
            let base = target_rgb(&run.target, t);
            let mine: Vec<&RunOutcome> = runs.iter().filter(|o| o.target == run.target).collect();
            let (color, label) = if mine.len() > 1 {
                // Lighter for the lowest rate, darker for the highest.
                let rank = mine
                    .iter()
                    .filter(|o| o.rate.unwrap_or(0.0) < run.rate.unwrap_or(0.0))
                    .count();
                let t = rank as f64 / (mine.len() - 1) as f64;
                let rate = run
                    .rate
                    .map_or(String::from(" closed"), |r| format!(" {}/s", count(r)));
                (
                    shade(base, t),
                    format!("{}{rate}", display_name(&run.target)),
                )
            } else {
                (base, display_name(&run.target))
            };
            Series {
                run,
                label,
                color,
                target_color: base,
            }
        })
        .collect()
}

/// The targets of these runs, in the order they first ran.
pub(crate) fn targets(runs: &[RunOutcome]) -> Vec<&str> {
    let mut out: Vec<&str> = Vec::new();
    for r in runs {
        if !out.contains(&r.target.as_str()) {
            out.push(&r.target);
        }
    }
    out
}

/// `base` from light (`t` = 0: mixed with white) to dark (`t` = 1: mixed with black).
fn shade(base: RGBColor, t: f64) -> RGBColor {
    let light = |c: u8| f64::from(c) + (255.0 - f64::from(c)) * 0.55;
    let dark = |c: u8| f64::from(c) * 0.6;
    let mix = |c: u8| {
        (light(c) + (dark(c) - light(c)) * t)
            .round()
            .clamp(0.0, 255.0) as u8
    };
    RGBColor(mix(base.0), mix(base.1), mix(base.2))
}

/// A number for an axis or a legend: 3 significant figures, k / M for thousands and millions.
pub(crate) fn count(v: f64) -> String {
    let a = v.abs();
    if a >= 1e6 {
        format!("{}M", sig(v / 1e6))
    } else if a >= 1e3 {
        format!("{}k", sig(v / 1e3))
    } else {
        sig(v)
    }
}

/// `v` to 3 significant figures, without trailing zeros.
pub(crate) fn sig(v: f64) -> String {
    if v == 0.0 || !v.is_finite() {
        return "0".into();
    }
    let digits = (2 - v.abs().log10().floor() as i32).clamp(0, 6) as usize;
    let s = format!("{v:.digits$}");
    if s.contains('.') {
        s.trim_end_matches('0').trim_end_matches('.').to_string()
    } else {
        s
    }
}

/// Milliseconds from a histogram value in µs.
fn ms(us: u64) -> f64 {
    us as f64 / 1_000.0
}

/// A log axis range around [lo, hi] (both > 0), widened a little so the extremes do not sit
/// on the frame, and to at least a factor 4.
fn log_range(lo: f64, hi: f64) -> (f64, f64) {
    let (mut lo, mut hi) = (lo.max(1e-3), hi.max(lo.max(1e-3)));
    if hi / lo < 4.0 {
        let grow = (4.0 / (hi / lo)).sqrt();
        lo /= grow;
        hi *= grow;
    }
    (lo / 1.15, hi * 1.15)
}

/// Tick marks for a log axis over [lo, hi]: labelled ticks at 1-2-5 steps (denser on a
/// short range, sparser on a long one), and light grid lines at every 1..9 of a decade.
/// (plotters' own log ticks start at the first power of ten, leaving a range such as
/// 0.2–5 ms with labels from 1 ms only.)
fn log_ticks(lo: f64, hi: f64) -> (Vec<f64>, Vec<f64>) {
    let span = (hi / lo).log10();
    let bold: &[f64] = if span <= 1.3 {
        &[1.0, 1.5, 2.0, 3.0, 4.0, 5.0, 7.0]
    } else if span <= 2.6 {
        &[1.0, 2.0, 5.0]
    } else if span <= 4.0 {
        &[1.0, 3.0]
    } else {
        &[1.0]
    };
    let light: &[f64] = if span <= 4.0 {
        &[1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0]
    } else {
        &[1.0]
    };
    let ticks = |mantissas: &[f64]| {
        let mut out = Vec::new();
        for d in (lo.log10().floor() as i32)..=(hi.log10().ceil() as i32) {
            for m in mantissas {
                // Rounded to the decimal so labels read 0.2, not 0.20000000000000001.
                let v = format!("{}e{d}", m).parse::<f64>().unwrap_or(0.0);
                if (lo..=hi).contains(&v) {
                    out.push(v);
                }
            }
        }
        out
    };
    (ticks(bold), ticks(light))
}

/// A log axis over [lo, hi] with [`log_ticks`].
fn log_axis(lo: f64, hi: f64) -> WithKeyPoints<LogCoord<f64>> {
    let (bold, light) = log_ticks(lo, hi);
    (lo..hi)
        .log_scale()
        .with_key_points(bold)
        .with_light_points(light)
}

/// A legend entry's marker.
enum Key {
    /// A short line.
    Line(ShapeStyle),
    /// A short dashed line.
    Dashed(ShapeStyle),
}

/// A legend: (label, marker) in drawing order.
type Legend = Vec<(String, Key)>;

/// The drawing areas of one panel: the plot, and the legend column on its right (outside
/// the plot, so it never hides a line).
fn with_legend_column<'a>(
    area: &DrawingArea<SVGBackend<'a>, Shift>,
) -> (
    DrawingArea<SVGBackend<'a>, Shift>,
    DrawingArea<SVGBackend<'a>, Shift>,
) {
    let (w, _) = area.dim_in_pixel();
    area.split_horizontally(w.saturating_sub(LEGEND_WIDTH))
}

/// Draws `legend` in the legend column `area`, level with the top of the plot.
fn draw_legend(area: &DrawingArea<SVGBackend<'_>, Shift>, legend: &Legend) -> anyhow::Result<()> {
    if legend.is_empty() {
        return Ok(());
    }
    let e = err("legend");
    let (x0, y0, row) = (4, 62, 24);
    let bottom = y0 + 8 + row * legend.len() as i32;
    area.draw(&Rectangle::new(
        [(x0, y0), (LEGEND_WIDTH as i32 - 8, bottom)],
        BLACK.mix(0.35).stroke_width(1),
    ))
    .map_err(&e)?;
    let font = ("sans-serif", 17)
        .into_text_style(area)
        .pos(Pos::new(HPos::Left, VPos::Center));
    for (i, (label, key)) in legend.iter().enumerate() {
        let y = y0 + 4 + row * i as i32 + row / 2;
        let line = vec![(x0 + 8, y), (x0 + 38, y)];
        match key {
            Key::Line(style) => area.draw(&PathElement::new(line, *style)),
            Key::Dashed(style) => area.draw(&DashedPathElement::new(line, 6, 4, *style)),
        }
        .map_err(&e)?;
        area.draw(&Text::new(label.clone(), (x0 + 46, y), font.clone()))
            .map_err(&e)?;
    }
    Ok(())
}

/// Maps a plotters error (not `Send` for every backend) into anyhow.
fn err<E: std::fmt::Display>(what: &'static str) -> impl Fn(E) -> anyhow::Error {
    move |e| anyhow::anyhow!("drawing the {what} chart: {e}")
}

/// The frame every chart shares: its caption (at `size` points), margins and the room
/// for axis labels.
fn framed<'a, 'b, DB: DrawingBackend>(
    area: &'a DrawingArea<DB, Shift>,
    caption: &str,
    size: u32,
) -> ChartBuilder<'a, 'b, DB> {
    let mut builder = ChartBuilder::on(area);
    builder
        .caption(caption, ("sans-serif", size))
        .margin(15)
        .margin_right(20)
        .x_label_area_size(55)
        .y_label_area_size(85);
    builder
}

/// The latency range of the runs that recorded any call, for a log axis (ms).
fn latency_range<'s, 'r>(series: &'s [Series<'r>]) -> (Vec<&'s Series<'r>>, f64, f64) {
    let drawn: Vec<&Series<'_>> = series
        .iter()
        .filter(|s| !s.run.stats.hist.is_empty())
        .collect();
    let lo = drawn
        .iter()
        .map(|s| ms(s.run.stats.hist.min()))
        .fold(f64::INFINITY, f64::min);
    let hi = drawn
        .iter()
        .map(|s| ms(s.run.stats.hist.max()))
        .fold(0.0, f64::max);
    let (lo, hi) = if drawn.is_empty() {
        (0.1, 10.0)
    } else {
        log_range(lo, hi)
    };
    (drawn, lo, hi)
}

/// The latency histogram: per run, the share of successful calls in each of [`BINS`] bins
/// of equal width on a log scale of milliseconds, as a stepped outline.
pub(crate) fn latency_histogram(series: &[Series<'_>]) -> anyhow::Result<String> {
    let e = err("latency");
    let (drawn, lo, hi) = latency_range(series);
    let step = (hi / lo).ln() / BINS as f64;
    let edge = |i: usize| lo * (step * i as f64).exp();
    let mut outlines = Vec::new();
    let mut top: f64 = 1.0;
    for s in &drawn {
        let h = &s.run.stats.hist;
        let mut bins = [0u64; BINS];
        for v in h.iter_recorded() {
            let x = ms(v.value_iterated_to());
            let i = (((x / lo).ln() / step).floor().max(0.0) as usize).min(BINS - 1);
            bins[i] += v.count_at_value();
        }
        let total = h.len().max(1) as f64;
        let mut pts = vec![(edge(0), 0.0)];
        for (i, &c) in bins.iter().enumerate() {
            let pct = 100.0 * c as f64 / total;
            top = top.max(pct);
            pts.push((edge(i), pct));
            pts.push((edge(i + 1), pct));
        }
        pts.push((edge(BINS), 0.0));
        outlines.push((s, pts));
    }
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (WIDTH, HEIGHT)).into_drawing_area();
        root.fill(&WHITE).map_err(&e)?;
        let (plot, side) = with_legend_column(&root);
        let mut legend = Legend::new();
        let mut chart = framed(&plot, "Latency histogram (successful calls)", 24)
            .build_cartesian_2d(log_axis(lo, hi), 0.0..top * 1.12)
            .map_err(&e)?;
        chart
            .configure_mesh()
            .x_desc("latency (ms, log scale)")
            .y_desc("share of calls per bin (%)")
            .x_label_formatter(&|v| sig(*v))
            .y_label_formatter(&|v| sig(*v))
            .axis_desc_style(("sans-serif", 18))
            .label_style(("sans-serif", 16))
            .max_light_lines(4)
            .draw()
            .map_err(&e)?;
        for (s, pts) in outlines {
            let style = s.color.stroke_width(2);
            chart.draw_series(LineSeries::new(pts, style)).map_err(&e)?;
            legend.push((s.label.clone(), Key::Line(style)));
        }
        draw_legend(&side, &legend)?;
        root.present().map_err(&e)?;
    }
    Ok(svg)
}

/// "Nines" on the percentile axis: x = -log10(1 - q), so 1 is p90, 2 p99, 3 p99.9.
fn nines(q: f64) -> f64 {
    -(1.0 - q).log10()
}

/// A percentile axis label: 0 %, 90 %, 99 %, 99.9 % …
fn percent_label(x: f64) -> String {
    let p = 100.0 * (1.0 - 10f64.powf(-x));
    let digits = (x.ceil() as i32 - 2).clamp(0, 6) as usize;
    format!("{p:.digits$}%")
}

/// The percentile curve: latency (ms, log scale) against the percentile, the tail stretched
/// (one step per nine), up to the largest value recorded; dots on p50, p90, p99, p99.9, max.
pub(crate) fn percentiles(series: &[Series<'_>]) -> anyhow::Result<String> {
    let e = err("percentiles");
    let (drawn, lo, hi) = latency_range(series);
    // A run of n calls says nothing past the (1 - 1/n) quantile: its curve ends there, at
    // its max.
    let span = |s: &Series<'_>| (s.run.stats.hist.len() as f64).log10().clamp(0.3, 6.0);
    let x_max = drawn.iter().map(|s| span(s)).fold(1.0, f64::max).ceil();
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (WIDTH, HEIGHT)).into_drawing_area();
        root.fill(&WHITE).map_err(&e)?;
        let (plot, side) = with_legend_column(&root);
        let mut legend = Legend::new();
        let mut chart = framed(&plot, "Latency by percentile (successful calls)", 24)
            .build_cartesian_2d(0.0..x_max, log_axis(lo, hi))
            .map_err(&e)?;
        chart
            .configure_mesh()
            .x_desc("percentile (each step one more nine)")
            .y_desc("latency (ms, log scale)")
            .x_labels(x_max as usize + 1)
            .x_label_formatter(&|x| percent_label(*x))
            .y_label_formatter(&|v| sig(*v))
            .axis_desc_style(("sans-serif", 18))
            .label_style(("sans-serif", 16))
            .max_light_lines(4)
            .draw()
            .map_err(&e)?;
        for s in &drawn {
            let h = &s.run.stats.hist;
            let end = span(s);
            let mut pts: Vec<(f64, f64)> = (0..=200)
                .map(|i| {
                    let x = end * f64::from(i) / 200.0;
                    (x, ms(h.value_at_quantile(1.0 - 10f64.powf(-x))))
                })
                .collect();
            pts.push((end, ms(h.max())));
            let style = s.color.stroke_width(2);
            chart.draw_series(LineSeries::new(pts, style)).map_err(&e)?;
            legend.push((s.label.clone(), Key::Line(style)));
            let marks = MARKED
                .iter()
                .map(|&(q, _)| (nines(q), ms(h.value_at_quantile(q))))
                .filter(|(x, _)| *x <= end)
                .chain([(end, ms(h.max()))]);
            chart
                .draw_series(marks.map(|p| Circle::new(p, 4, s.color.filled())))
                .map_err(&e)?;
        }
        draw_legend(&side, &legend)?;
        root.present().map_err(&e)?;
    }
    Ok(svg)
}

/// One second of the throughput chart.
#[derive(Debug, Clone, Copy)]
struct Step {
    /// Its start, in seconds from the first run's start.
    at: f64,
    /// Successful operations per second.
    ok: f64,
    /// Failed calls per second.
    errors: f64,
    /// Open loop: the offered operations per second.
    offered: Option<f64>,
}

/// A target's runs one after another, second by second. Calls that ended after a run's
/// --duration (its last answers) are not drawn: they have no whole second.
fn seconds(runs: &[&Series<'_>]) -> Vec<Step> {
    let mut out = Vec::new();
    let mut x0 = 0.0;
    for s in runs {
        let d = s.run.duration.as_secs_f64();
        let n = d.ceil().max(1.0) as usize;
        for i in 0..n {
            // The last second of a run of 2.5 s is half a second long.
            let width = (d - i as f64).clamp(1e-3, 1.0);
            let b = s.run.stats.per_second.get(i).copied().unwrap_or_default();
            out.push(Step {
                at: x0 + i as f64,
                ok: b.ok as f64 / width,
                errors: b.errors as f64 / width,
                offered: s.run.offered(),
            });
        }
        x0 += n as f64;
    }
    out
}

/// The line width of target `i` of `n` in the one-line-per-target charts: the first
/// targets wider, so a later one drawn over the same values leaves them visible.
fn width(i: usize, n: usize) -> u32 {
    2 + 2 * n.saturating_sub(i + 1).min(3) as u32
}

/// Steps from per-second values: (x, y), (x + 1, y) for each second.
fn steps(pts: impl Iterator<Item = (f64, f64)>) -> Vec<(f64, f64)> {
    pts.flat_map(|(x, y)| [(x, y), (x + 1.0, y)]).collect()
}

/// Throughput and errors per second: one stepped line per target (a sweep's runs one after
/// another), the offered load of open-loop runs in grey dashes.
pub(crate) fn throughput(series: &[Series<'_>]) -> anyhow::Result<String> {
    let e = err("throughput");
    let per_target: Vec<(&Series<'_>, Vec<Step>)> = targets_of(series)
        .into_iter()
        .map(|runs| (runs[0], seconds(&runs)))
        .collect();
    let x_max = per_target
        .iter()
        .filter_map(|(_, p)| p.last().map(|l| l.at + 1.0))
        .fold(1.0, f64::max);
    let ok_max = per_target
        .iter()
        .flat_map(|(_, p)| p.iter().map(|v| v.ok.max(v.offered.unwrap_or(0.0))))
        .fold(1.0, f64::max);
    let err_max = per_target
        .iter()
        .flat_map(|(_, p)| p.iter().map(|v| v.errors))
        .fold(1.0, f64::max);
    let sweep = series.len() > per_target.len();
    let x_desc = if sweep {
        "time into the sweep (s; the rates one after another)"
    } else {
        "time into the run (s)"
    };
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (WIDTH, HEIGHT_2)).into_drawing_area();
        root.fill(&WHITE).map_err(&e)?;
        let (top, bottom) = root.split_vertically(HEIGHT_2 * 3 / 5);
        let panels = [
            (
                &top,
                "Throughput per second",
                "successful operations per second",
                ok_max,
                1usize,
            ),
            (
                &bottom,
                "Errors per second",
                "failed calls per second",
                err_max,
                2usize,
            ),
        ];
        for (area, caption, y_desc, y_max, col) in panels {
            let (plot, side) = with_legend_column(area);
            let mut legend = Legend::new();
            let mut chart = framed(&plot, caption, 22)
                .build_cartesian_2d(0.0..x_max, 0.0..y_max * 1.15)
                .map_err(&e)?;
            chart
                .configure_mesh()
                .x_desc(x_desc)
                .y_desc(y_desc)
                .x_label_formatter(&|v| sig(*v))
                .y_label_formatter(&|v| count(*v))
                .axis_desc_style(("sans-serif", 18))
                .label_style(("sans-serif", 16))
                .max_light_lines(4)
                .draw()
                .map_err(&e)?;
            for (i, (s, pts)) in per_target.iter().enumerate() {
                let style = s.target_color.stroke_width(width(i, per_target.len()));
                let line = steps(
                    pts.iter()
                        .map(|p| (p.at, if col == 1 { p.ok } else { p.errors })),
                );
                chart
                    .draw_series(LineSeries::new(line, style))
                    .map_err(&e)?;
                legend.push((display_name(&s.run.target), Key::Line(style)));
            }
            // The offered load, once (every target ran the same rates).
            if col == 1
                && let Some((_, pts)) = per_target.first()
                && pts.iter().any(|p| p.offered.is_some())
            {
                let style = GREY.stroke_width(2);
                let line = steps(pts.iter().map(|p| (p.at, p.offered.unwrap_or(0.0))));
                chart
                    .draw_series(DashedLineSeries::new(line, 6, 4, style))
                    .map_err(&e)?;
                legend.push(("offered".into(), Key::Dashed(style)));
                // Each rate named where it starts.
                let font = ("sans-serif", 15).into_font().color(&GREY);
                let starts = pts.iter().enumerate().filter_map(|(i, p)| {
                    let offered = p.offered?;
                    let new = i == 0 || pts[i - 1].offered != p.offered;
                    new.then(|| {
                        Text::new(
                            format!("{}/s", count(offered)),
                            (p.at + 0.05, offered + y_max * 0.07),
                            font.clone(),
                        )
                    })
                });
                chart.draw_series(starts).map_err(&e)?;
            }
            draw_legend(&side, &legend)?;
        }
        root.present().map_err(&e)?;
    }
    Ok(svg)
}

/// The series grouped by target, in the order the targets ran.
fn targets_of<'s, 'a>(series: &'s [Series<'a>]) -> Vec<Vec<&'s Series<'a>>> {
    let mut out: Vec<Vec<&Series<'a>>> = Vec::new();
    for s in series {
        match out.iter_mut().find(|g| g[0].run.target == s.run.target) {
            Some(g) => g.push(s),
            None => out.push(vec![s]),
        }
    }
    out
}

/// One point of a sweep: a target's run at one offered rate.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct SweepPoint {
    /// Offered load, operations/s.
    pub(crate) offered: f64,
    /// Achieved: successful operations/s.
    pub(crate) achieved: f64,
    /// p50 latency, ms (from the scheduled send time).
    pub(crate) p50_ms: f64,
    /// p99 latency, ms.
    pub(crate) p99_ms: f64,
}

/// The sweep's points: per target (in the order they ran), its open-loop runs by offered
/// load. Runs without successful calls have no latency and are left out.
pub(crate) fn sweep_points<'a>(series: &[Series<'a>]) -> Vec<(&'a str, RGBColor, Vec<SweepPoint>)> {
    targets_of(series)
        .into_iter()
        .map(|runs| {
            let mut pts: Vec<SweepPoint> = runs
                .iter()
                .filter(|s| !s.run.stats.hist.is_empty())
                .filter_map(|s| {
                    Some(SweepPoint {
                        offered: s.run.offered()?,
                        achieved: s.run.ops_per_s(),
                        p50_ms: ms(s.run.stats.hist.value_at_quantile(0.5)),
                        p99_ms: ms(s.run.stats.hist.value_at_quantile(0.99)),
                    })
                })
                .collect();
            pts.sort_by(|a, b| a.offered.total_cmp(&b.offered));
            (runs[0].run.target.as_str(), runs[0].target_color, pts)
        })
        .collect()
}

/// The sweep: top, p50 (solid) and p99 (dashed) latency against offered load; bottom,
/// achieved against offered throughput, with the diagonal where they are equal.
pub(crate) fn sweep_chart(series: &[Series<'_>]) -> anyhow::Result<String> {
    let e = err("sweep");
    let points = sweep_points(series);
    let all = || points.iter().flat_map(|(_, _, p)| p.iter());
    let x_max = all().map(|p| p.offered.max(p.achieved)).fold(1.0, f64::max) * 1.08;
    let lo = all().map(|p| p.p50_ms).fold(f64::INFINITY, f64::min);
    let hi = all().map(|p| p.p99_ms).fold(0.0, f64::max);
    let (lo, hi) = if all().next().is_none() {
        (0.1, 10.0)
    } else {
        log_range(lo, hi)
    };
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (WIDTH, HEIGHT_2)).into_drawing_area();
        root.fill(&WHITE).map_err(&e)?;
        let (top, bottom) = root.split_vertically(HEIGHT_2 / 2);
        let (plot, side) = with_legend_column(&top);
        let mut legend = Legend::new();
        let mut chart = framed(&plot, "Latency against offered load", 22)
            .build_cartesian_2d(0.0..x_max, log_axis(lo, hi))
            .map_err(&e)?;
        chart
            .configure_mesh()
            .x_desc("offered load (operations/s)")
            .y_desc("latency (ms, log scale)")
            .x_label_formatter(&|v| count(*v))
            .y_label_formatter(&|v| sig(*v))
            .axis_desc_style(("sans-serif", 18))
            .label_style(("sans-serif", 16))
            .max_light_lines(4)
            .draw()
            .map_err(&e)?;
        for (i, (target, color, pts)) in points.iter().enumerate() {
            let solid = color.stroke_width(width(i, points.len()));
            chart
                .draw_series(LineSeries::new(
                    pts.iter().map(|p| (p.offered, p.p50_ms)),
                    solid,
                ))
                .map_err(&e)?;
            legend.push((format!("{} p50", display_name(target)), Key::Line(solid)));
            chart
                .draw_series(
                    pts.iter()
                        .map(|p| Circle::new((p.offered, p.p50_ms), 4, color.filled())),
                )
                .map_err(&e)?;
            chart
                .draw_series(DashedLineSeries::new(
                    pts.iter()
                        .map(|p| (p.offered, p.p99_ms))
                        .collect::<Vec<_>>(),
                    7,
                    4,
                    solid,
                ))
                .map_err(&e)?;
            legend.push((format!("{} p99", display_name(target)), Key::Dashed(solid)));
            chart
                .draw_series(
                    pts.iter()
                        .map(|p| TriangleMarker::new((p.offered, p.p99_ms), 6, color.filled())),
                )
                .map_err(&e)?;
        }
        draw_legend(&side, &legend)?;

        let (plot, side) = with_legend_column(&bottom);
        let mut legend = Legend::new();
        let mut chart = framed(&plot, "Achieved against offered throughput", 22)
            .build_cartesian_2d(0.0..x_max, 0.0..x_max)
            .map_err(&e)?;
        chart
            .configure_mesh()
            .x_desc("offered load (operations/s)")
            .y_desc("achieved (successful operations/s)")
            .x_label_formatter(&|v| count(*v))
            .y_label_formatter(&|v| count(*v))
            .axis_desc_style(("sans-serif", 18))
            .label_style(("sans-serif", 16))
            .max_light_lines(4)
            .draw()
            .map_err(&e)?;
        let ideal = GREY.stroke_width(1);
        chart
            .draw_series(DashedLineSeries::new(
                vec![(0.0, 0.0), (x_max, x_max)],
                6,
                4,
                ideal,
            ))
            .map_err(&e)?;
        legend.push(("achieved = offered".into(), Key::Dashed(ideal)));
        for (i, (target, color, pts)) in points.iter().enumerate() {
            let solid = color.stroke_width(width(i, points.len()));
            chart
                .draw_series(LineSeries::new(
                    pts.iter().map(|p| (p.offered, p.achieved)),
                    solid,
                ))
                .map_err(&e)?;
            legend.push((display_name(target), Key::Line(solid)));
            chart
                .draw_series(
                    pts.iter()
                        .map(|p| Circle::new((p.offered, p.achieved), 4, color.filled())),
                )
                .map_err(&e)?;
        }
        draw_legend(&side, &legend)?;
        root.present().map_err(&e)?;
    }
    Ok(svg)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::{report::tests::synthetic, run::run_all};

    /// The texts of an SVG (labels, legends, titles), trimmed.
    pub(crate) fn svg_texts(svg: &str) -> Vec<String> {
        svg.split("</text>")
            .filter_map(|piece| piece.rsplit_once('>').map(|(_, t)| t.trim().to_string()))
            .filter(|t| !t.is_empty())
            .collect()
    }

    #[test]
    fn numbers_read_well() {
        assert_eq!(sig(0.30000000000000004), "0.3");
        assert_eq!(sig(12.345), "12.3");
        assert_eq!(sig(1500.0), "1500");
        assert_eq!(count(40_000.0), "40k");
        assert_eq!(count(1_250_000.0), "1.25M");
        assert_eq!(percent_label(0.0), "0%");
        assert_eq!(percent_label(2.0), "99%");
        assert_eq!(percent_label(3.0), "99.9%");
        assert_eq!(percent_label(2.5), "99.7%");
    }

    #[test]
    fn targets_get_distinct_colours_and_a_sweep_shades_by_rate() {
        let runs = [
            synthetic("grpc", None, 0.2, 100, 2),
            synthetic("redis", None, 0.4, 100, 2),
        ];
        let s = series(&runs);
        assert_ne!(s[0].color, s[1].color);
        assert_eq!(
            (s[0].label.as_str(), s[1].label.as_str()),
            ("geomatch (grpc)", "redis")
        );

        let runs = [
            synthetic("grpc", Some(2000.0), 0.2, 100, 2),
            synthetic("grpc", Some(1000.0), 0.2, 100, 2),
        ];
        let s = series(&runs);
        assert_eq!(s[0].label, "geomatch (grpc) 2k/s");
        assert_eq!(s[0].target_color, s[1].target_color);
        // The higher rate is the darker shade.
        let lum = |c: RGBColor| u32::from(c.0) + u32::from(c.1) + u32::from(c.2);
        assert!(lum(s[0].color) < lum(s[1].color));
    }

    #[test]
    fn geomatch_redis_and_valkey_each_keep_their_own_colour() {
        let runs = [
            synthetic("grpc", None, 0.2, 100, 2),
            synthetic("redis", None, 0.4, 100, 2),
            synthetic("valkey", None, 0.3, 100, 2),
        ];
        let s = series(&runs);
        let colours: Vec<String> = s.iter().map(Series::css_color).collect();
        assert_eq!(colours, ["#1f77b4", "#d62728", "#2ca02c"]);
        let labels: Vec<&str> = s.iter().map(|s| s.label.as_str()).collect();
        assert_eq!(labels, ["geomatch (grpc)", "redis", "valkey"]);
        // Valkey is green even without Redis beside it.
        let runs = [
            synthetic("grpc", None, 0.2, 100, 2),
            synthetic("valkey", None, 0.3, 100, 2),
        ];
        assert_eq!(series(&runs)[1].css_color(), "#2ca02c");
        // Every chart names all three in its legend.
        let runs = [
            synthetic("grpc", Some(1000.0), 0.2, 100, 2),
            synthetic("redis", Some(1000.0), 0.4, 100, 2),
            synthetic("valkey", Some(1000.0), 0.3, 100, 2),
        ];
        for chart in all(&runs, true).unwrap() {
            let texts = svg_texts(&chart.svg);
            for name in ["geomatch (grpc)", "redis", "valkey"] {
                assert!(
                    texts.iter().any(|t| t.starts_with(name)),
                    "{}: no {name} in {texts:?}",
                    chart.name
                );
            }
        }
    }

    #[tokio::test]
    async fn a_sweep_of_two_rates_has_two_points_per_target() {
        let mut calls = Vec::new();
        // A fake target: latency grows with the rate, throughput saturates at 1500/s.
        let runs = run_all(
            &["grpc", "redis"],
            &[Some(1000.0), Some(2000.0)],
            async |target, rate| {
                calls.push((target.to_string(), rate));
                let r = rate.unwrap_or(0.0);
                let base = if target == "grpc" { 0.1 } else { 0.3 } * r / 1000.0;
                Ok(synthetic(target, rate, base, r.min(1500.0) as u64, 2))
            },
        )
        .await
        .unwrap();
        assert_eq!(
            calls,
            [
                ("grpc".to_string(), Some(1000.0)),
                ("grpc".to_string(), Some(2000.0)),
                ("redis".to_string(), Some(1000.0)),
                ("redis".to_string(), Some(2000.0)),
            ]
        );
        let s = series(&runs);
        let points = sweep_points(&s);
        assert_eq!(points.len(), 2);
        for (target, _, pts) in &points {
            assert_eq!(pts.len(), 2, "{target}");
            assert_eq!((pts[0].offered, pts[1].offered), (1000.0, 2000.0));
            assert!(pts[0].p99_ms < pts[1].p99_ms, "{target}: {pts:?}");
            assert!((pts[1].achieved - 1500.0).abs() < 1.0, "{target}: {pts:?}");
        }
        assert_eq!(points[0].0, "grpc");
        assert_eq!(points[1].0, "redis");

        let charts = all(&runs, true).unwrap();
        let names: Vec<&str> = charts.iter().map(|c| c.name).collect();
        assert_eq!(names, ["latency", "percentiles", "throughput", "sweep"]);
        let svg = &charts[3].svg;
        let texts = svg_texts(svg);
        for text in [
            "offered load (operations/s)",
            "latency (ms, log scale)",
            "achieved (successful operations/s)",
            "geomatch (grpc) p50",
            "geomatch (grpc) p99",
            "redis p50",
            "redis p99",
            "geomatch (grpc)",
            "redis",
        ] {
            assert!(
                texts.iter().any(|t| t == text),
                "sweep chart without {text:?}: {texts:?}"
            );
        }
        // A dot per point: p50 (top panel) and achieved (bottom), 2 targets × 2 rates.
        assert_eq!(svg.matches("<circle").count(), 2 * 2 * 2);
    }

    #[test]
    fn runs_without_a_successful_call_still_draw() {
        let mut run = synthetic("grpc", Some(1000.0), 0.2, 0, 2);
        run.stats.hist.reset();
        let charts = all(std::slice::from_ref(&run), true).unwrap();
        assert_eq!(charts.len(), 4);
        assert!(charts.iter().all(|c| c.svg.starts_with("<svg")));
    }
}
