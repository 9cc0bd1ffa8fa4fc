//! Charts for the report, drawn with plotters' SVG backend (text stays SVG `<text>`, escaped by
//! plotters; no font files, no scripts).

use plotters::coord::types::RangedCoordf64;
use plotters::prelude::*;

type Series = (String, Vec<(f64, f64)>);
/// A named line of `(x, mean, std)` points.
pub type BarSeries = (String, Vec<(f64, f64, f64)>);

const SIZE: (u32, u32) = (640, 300);

fn err<E: std::fmt::Debug>(e: E) -> String {
    format!("chart: {e:?}")
}

fn bounds(values: impl Iterator<Item = f64> + Clone) -> (f64, f64) {
    let lo = values.clone().fold(f64::INFINITY, f64::min);
    let hi = values.fold(f64::NEG_INFINITY, f64::max);
    if !lo.is_finite() || !hi.is_finite() {
        return (0.0, 1.0);
    }
    let pad = ((hi - lo) * 0.05).max(1e-6);
    (lo - pad, hi + pad)
}

type XyChart<'a, 'b> =
    ChartContext<'a, SVGBackend<'b>, Cartesian2d<RangedCoordf64, RangedCoordf64>>;

/// A numeric x/y chart: axes fitted to `xs` and `ys`, then `draw` adds the series; a legend is drawn
/// when there is more than one.
fn xy_chart(
    title: &str,
    x_desc: &str,
    y_desc: &str,
    xs: Vec<f64>,
    ys: Vec<f64>,
    legend: bool,
    draw: impl FnOnce(&mut XyChart) -> Result<(), String>,
) -> Result<String, String> {
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, SIZE).into_drawing_area();
        root.fill(&WHITE).map_err(err)?;
        let (x0, x1) = bounds(xs.into_iter());
        let (y0, y1) = bounds(ys.into_iter());
        let mut chart = ChartBuilder::on(&root)
            .caption(title, ("sans-serif", 16))
            .margin(12)
            .x_label_area_size(36)
            .y_label_area_size(56)
            .build_cartesian_2d(x0..x1, y0..y1)
            .map_err(err)?;
        chart
            .configure_mesh()
            .x_desc(x_desc)
            .y_desc(y_desc)
            .light_line_style(WHITE.mix(0.0))
            .draw()
            .map_err(err)?;
        draw(&mut chart)?;
        if legend {
            chart
                .configure_series_labels()
                .background_style(WHITE.mix(0.85))
                .border_style(BLACK)
                .draw()
                .map_err(err)?;
        }
        root.present().map_err(err)?;
    }
    Ok(svg)
}

/// Adds one named line in the `i`th palette colour.
fn line<'a, 'b>(
    chart: &mut XyChart<'a, 'b>,
    i: usize,
    name: &str,
    points: impl Iterator<Item = (f64, f64)>,
) -> Result<RGBAColor, String> {
    let color = Palette99::pick(i).to_rgba();
    chart
        .draw_series(LineSeries::new(points, color.stroke_width(2)))
        .map_err(err)?
        .label(name)
        .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], color.stroke_width(2)));
    Ok(color)
}

/// Lines of `(x, y)` points, one per series, with a legend.
pub fn lines(title: &str, x_desc: &str, y_desc: &str, series: &[Series]) -> Result<String, String> {
    let xs = series
        .iter()
        .flat_map(|s| s.1.iter().map(|p| p.0))
        .collect();
    let ys = series
        .iter()
        .flat_map(|s| s.1.iter().map(|p| p.1))
        .collect();
    xy_chart(title, x_desc, y_desc, xs, ys, series.len() > 1, |chart| {
        for (i, (name, points)) in series.iter().enumerate() {
            let color = line(chart, i, name, points.iter().copied())?;
            if points.len() <= 40 {
                chart
                    .draw_series(points.iter().map(|&p| Circle::new(p, 3, color.filled())))
                    .map_err(err)?;
            }
        }
        Ok(())
    })
}

/// A metric against a numeric key: one line per series through the means, with ±std error bars.
/// Each point is `(x, mean, std)`.
pub fn error_bars(
    title: &str,
    x_desc: &str,
    y_desc: &str,
    series: &[BarSeries],
) -> Result<String, String> {
    let xs = series
        .iter()
        .flat_map(|s| s.1.iter().map(|p| p.0))
        .collect();
    let ys = series
        .iter()
        .flat_map(|s| s.1.iter().flat_map(|p| [p.1 - p.2, p.1 + p.2]))
        .collect();
    xy_chart(title, x_desc, y_desc, xs, ys, series.len() > 1, |chart| {
        for (i, (name, points)) in series.iter().enumerate() {
            let color = line(chart, i, name, points.iter().map(|p| (p.0, p.1)))?;
            chart
                .draw_series(points.iter().map(|&(x, m, s)| {
                    ErrorBar::new_vertical(x, m - s, m, m + s, color.filled(), 8)
                }))
                .map_err(err)?;
        }
        Ok(())
    })
}

/// One rectangle per value on a segmented axis, in order. (plotters' `Histogram` groups its data in a
/// hash map, so its SVG changed from one rendering to the next.)
fn bar_rects(
    values: impl Iterator<Item = f64>,
    style: ShapeStyle,
) -> impl Iterator<Item = Rectangle<(SegmentValue<u32>, f64)>> {
    values.enumerate().map(move |(i, v)| {
        let i = i as u32;
        Rectangle::new(
            [
                (SegmentValue::Exact(i), 0.0),
                (SegmentValue::Exact(i + 1), v),
            ],
            style,
        )
    })
}

/// Vertical bars, one per category, labelled under the axis.
pub fn bars(
    title: &str,
    y_desc: &str,
    categories: &[String],
    values: &[f64],
) -> Result<String, String> {
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (SIZE.0, SIZE.1 + 60)).into_drawing_area();
        root.fill(&WHITE).map_err(err)?;
        let n = categories.len().max(1) as u32;
        let top = values.iter().copied().fold(0.0, f64::max).max(1.0) * 1.08;
        let mut chart = ChartBuilder::on(&root)
            .caption(title, ("sans-serif", 16))
            .margin(12)
            .x_label_area_size(if categories.len() > 8 { 96 } else { 30 })
            .y_label_area_size(56)
            .build_cartesian_2d((0u32..n - 1).into_segmented(), 0.0..top)
            .map_err(err)?;
        let every = (categories.len() / 30).max(1);
        chart
            .configure_mesh()
            .disable_x_mesh()
            .y_desc(y_desc)
            .x_labels(categories.len().min(30))
            .x_label_style(if categories.len() > 8 {
                ("sans-serif", 11)
                    .into_font()
                    .transform(FontTransform::Rotate90)
            } else {
                ("sans-serif", 12).into_font()
            })
            .x_label_formatter(&|v| match v {
                SegmentValue::CenterOf(i) if (*i as usize).is_multiple_of(every) => {
                    categories.get(*i as usize).cloned().unwrap_or_default()
                }
                _ => String::new(),
            })
            .draw()
            .map_err(err)?;
        chart
            .draw_series(bar_rects(values.iter().copied(), BLUE.mix(0.6).filled()))
            .map_err(err)?;
        root.present().map_err(err)?;
    }
    Ok(svg)
}

/// Histogram of lengths from `counts[length]`, one bar per length.
pub fn length_histogram(title: &str, counts: &[usize]) -> Result<String, String> {
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, SIZE).into_drawing_area();
        root.fill(&WHITE).map_err(err)?;
        let max_len = (counts.len().max(2) - 1) as u32;
        let top = counts.iter().copied().max().unwrap_or(1).max(1) as f64 * 1.08;
        let mut chart = ChartBuilder::on(&root)
            .caption(title, ("sans-serif", 16))
            .margin(12)
            .x_label_area_size(36)
            .y_label_area_size(56)
            .build_cartesian_2d((0u32..max_len).into_segmented(), 0.0..top)
            .map_err(err)?;
        chart
            .configure_mesh()
            .disable_x_mesh()
            .x_desc("tokens per example ([CLS]/[SEP] included)")
            .y_desc("examples")
            .draw()
            .map_err(err)?;
        chart
            .draw_series(bar_rects(
                counts.iter().map(|&c| c as f64),
                GREEN.mix(0.6).filled(),
            ))
            .map_err(err)?;
        root.present().map_err(err)?;
    }
    Ok(svg)
}
