//! `tooltrain plot`: render the metric curves of a run (`metrics.jsonl`, one flat JSON
//! object a line such as `{"step": 3, "loss": 2.1, "lr": 1e-5}`) to a PNG: a grid of small
//! charts, one per metric, each with a title, axes and tick labels.
//!
//! - Keys may vary from line to line; a key missing on a line (or not a finite number
//!   there: `null`, a string) is skipped for that line.
//! - The x axis is `--x` (default `step`); lines without a numeric x are skipped. When no
//!   line has the x key, the x axis is the record's ordinal (0, 1, ...).
//! - A line that is not a JSON object is an error naming the file and its line number.
//! - Text uses DejaVu Sans embedded in the binary (`assets/DejaVuSans-subset.ttf`,
//!   licence beside it) through plotters' `ab_glyph` backend: no system font libraries.
//! - The PNG is written to a temporary sibling file, then renamed over `--out`.

use anyhow::{anyhow, bail, Context, Result};
use plotters::prelude::*;
use plotters::style::FontStyle;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// DejaVu Sans, subset to ASCII and a few symbols (see `assets/README.md`).
const FONT: &[u8] = include_bytes!("../assets/DejaVuSans-subset.ttf");

/// Line colours (matplotlib's `tab10`), one per panel in turn.
pub const COLORS: [RGBColor; 10] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
    RGBColor(127, 127, 127),
    RGBColor(188, 189, 34),
    RGBColor(23, 190, 207),
];

#[derive(clap::Args, Debug)]
pub struct Args {
    /// The run's metrics file (JSON lines of flat objects).
    #[arg(long, value_name = "FILE")]
    pub metrics: PathBuf,
    /// The PNG to write; default: the metrics file with extension `.png`.
    #[arg(long, value_name = "FILE")]
    pub out: Option<PathBuf>,
    /// Metrics to plot, comma-separated, one panel each in this order; default: every
    /// numeric key except the x key, in order of first appearance.
    #[arg(long, value_delimiter = ',', value_name = "KEY,...")]
    pub keys: Vec<String>,
    /// The key of the x axis.
    #[arg(long, default_value = "step", value_name = "KEY")]
    pub x: String,
    /// Panels per row.
    #[arg(long, default_value_t = 3)]
    pub columns: usize,
    /// Size of one panel in pixels, `WIDTHxHEIGHT`.
    #[arg(long, default_value = "480x320", value_parser = parse_size)]
    pub panel: (u32, u32),
}

fn parse_size(s: &str) -> std::result::Result<(u32, u32), String> {
    let (w, h) = s
        .split_once('x')
        .ok_or_else(|| format!("expected WIDTHxHEIGHT, got {s:?}"))?;
    let p = |v: &str| v.trim().parse::<u32>().map_err(|e| format!("{v:?}: {e}"));
    let (w, h) = (p(w)?, p(h)?);
    if !(100..=4000).contains(&w) || !(80..=4000).contains(&h) {
        return Err(format!(
            "panel size {w}x{h} out of range (100..=4000 x 80..=4000)"
        ));
    }
    Ok((w, h))
}

/// The numeric series of a metrics file.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Metrics {
    /// Numeric keys (x key excluded) in order of first appearance.
    pub keys: Vec<String>,
    /// key -> (x, y) points in file order.
    pub series: BTreeMap<String, Vec<(f64, f64)>>,
    /// Label of the x axis: the x key, or `record` when no line has it.
    pub x_label: String,
}

fn number(v: &serde_json::Value) -> Option<f64> {
    v.as_f64().filter(|f| f.is_finite())
}

/// Parses metrics JSONL text; `origin` names the file in errors.
pub fn parse_metrics(text: &str, origin: &str, x_key: &str) -> Result<Metrics> {
    let mut rows: Vec<serde_json::Map<String, serde_json::Value>> = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let v: serde_json::Value = serde_json::from_str(line)
            .map_err(|e| anyhow!("{origin}:{}: not valid JSON: {e}", i + 1))?;
        match v {
            serde_json::Value::Object(m) => rows.push(m),
            other => bail!(
                "{origin}:{}: expected a JSON object, got {}",
                i + 1,
                match other {
                    serde_json::Value::Array(_) => "an array",
                    serde_json::Value::String(_) => "a string",
                    serde_json::Value::Number(_) => "a number",
                    serde_json::Value::Bool(_) => "a boolean",
                    _ => "null",
                }
            ),
        }
    }
    let has_x = rows.iter().any(|r| r.get(x_key).and_then(number).is_some());
    let mut out = Metrics {
        x_label: if has_x {
            x_key.to_string()
        } else {
            "record".to_string()
        },
        ..Metrics::default()
    };
    for (ordinal, row) in rows.iter().enumerate() {
        let x = if has_x {
            match row.get(x_key).and_then(number) {
                Some(x) => x,
                None => continue,
            }
        } else {
            ordinal as f64
        };
        for (k, v) in row {
            if k == x_key {
                continue;
            }
            if let Some(y) = number(v) {
                if !out.series.contains_key(k) {
                    out.keys.push(k.clone());
                }
                out.series.entry(k.clone()).or_default().push((x, y));
            }
        }
    }
    Ok(out)
}

/// The largest magnitude an axis reaches: spans and paddings up to 4x this stay finite
/// (an infinite axis range makes the tick search of the plotting library loop forever).
const AXIS_LIMIT: f64 = f64::MAX / 8.0;

/// `lo..hi` covering `vals`, padded by `pad` of the span (a flat series gets a unit
/// or 10% margin); always finite, values beyond [`AXIS_LIMIT`] are clipped.
fn range(vals: impl Iterator<Item = f64>, pad: f64) -> (f64, f64) {
    let (mut lo, mut hi) = (f64::INFINITY, f64::NEG_INFINITY);
    for v in vals {
        lo = lo.min(v);
        hi = hi.max(v);
    }
    if !lo.is_finite() || !hi.is_finite() {
        return (0.0, 1.0);
    }
    let (lo, hi) = (
        lo.clamp(-AXIS_LIMIT, AXIS_LIMIT),
        hi.clamp(-AXIS_LIMIT, AXIS_LIMIT),
    );
    if hi - lo <= f64::EPSILON * lo.abs().max(1.0) {
        let m = if lo == 0.0 { 1.0 } else { lo.abs() * 0.1 };
        return (lo - m, hi + m);
    }
    let p = (hi - lo) * pad;
    (lo - p, hi + p)
}

/// A tick formatter for axis values spanning `lo..hi`: enough decimals to tell ticks
/// apart, scientific notation for very large or very small magnitudes.
fn tick_format(lo: f64, hi: f64) -> impl Fn(&f64) -> String {
    let step = ((hi - lo) / 6.0).abs().max(f64::MIN_POSITIVE);
    let mag = lo.abs().max(hi.abs());
    let sci = !(1e-3..1e6).contains(&mag);
    let decimals = (-step.log10()).ceil().clamp(0.0, 10.0) as usize;
    let sci_digits = ((mag / step).log10().ceil().clamp(1.0, 6.0)) as usize;
    move |v: &f64| {
        if *v == 0.0 {
            "0".to_string()
        } else if sci {
            format!("{:.*e}", sci_digits.saturating_sub(1), v)
        } else {
            format!("{:.*}", decimals, v)
        }
    }
}

fn register_fonts() -> Result<()> {
    static DONE: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    let ok = DONE.get_or_init(|| {
        ["sans-serif", "serif", "monospace"].iter().all(|fam| {
            plotters::style::register_font(fam, FontStyle::Normal, FONT).is_ok()
                && plotters::style::register_font(fam, FontStyle::Bold, FONT).is_ok()
        })
    });
    if *ok {
        Ok(())
    } else {
        bail!("the embedded font could not be loaded")
    }
}

/// Layout of the grid.
#[derive(Debug, Clone, Copy)]
pub struct Layout {
    pub columns: usize,
    pub panel: (u32, u32),
}

impl Default for Layout {
    fn default() -> Self {
        Layout {
            columns: 3,
            panel: (480, 320),
        }
    }
}

/// Draws one panel per key of `keys` into a PNG at `out` (atomically).
pub fn render(m: &Metrics, keys: &[String], out: &Path, layout: Layout) -> Result<()> {
    register_fonts()?;
    if keys.is_empty() {
        bail!("nothing to plot");
    }
    let cols = layout.columns.clamp(1, keys.len());
    let rows = keys.len().div_ceil(cols);
    let size = (layout.panel.0 * cols as u32, layout.panel.1 * rows as u32);
    let dir = match out.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let name = out
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .ok_or_else(|| anyhow!("{}: not a file path", out.display()))?;
    // The extension tells the encoder the format.
    let tmp = dir.join(format!(".{name}.{}.tmp.png", std::process::id()));
    let res = draw(m, keys, &tmp, size, rows, cols).and_then(|()| {
        std::fs::rename(&tmp, out).with_context(|| format!("{}: cannot write", out.display()))
    });
    if res.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    res
}

fn draw(
    m: &Metrics,
    keys: &[String],
    path: &Path,
    size: (u32, u32),
    rows: usize,
    cols: usize,
) -> Result<()> {
    let err = |e: &dyn std::fmt::Display| anyhow!("{}: drawing failed: {e}", path.display());
    let root = BitMapBackend::new(path, size).into_drawing_area();
    root.fill(&WHITE).map_err(|e| err(&e))?;
    let panels = root.split_evenly((rows, cols));
    for (i, (key, area)) in keys.iter().zip(panels.iter()).enumerate() {
        let pts = m.series.get(key).map(Vec::as_slice).unwrap_or_default();
        let color = COLORS[i % COLORS.len()];
        let (x0, x1) = range(pts.iter().map(|p| p.0), 0.02);
        let (y0, y1) = range(pts.iter().map(|p| p.1), 0.06);
        let mut chart = ChartBuilder::on(area)
            .caption(key, ("sans-serif", 18).into_font())
            .margin(10)
            .x_label_area_size(38)
            .y_label_area_size(62)
            .build_cartesian_2d(x0..x1, y0..y1)
            .map_err(|e| err(&e))?;
        let fx = tick_format(x0, x1);
        let fy = tick_format(y0, y1);
        chart
            .configure_mesh()
            .x_desc(m.x_label.as_str())
            .x_labels(6)
            .y_labels(6)
            .x_label_formatter(&fx)
            .y_label_formatter(&fy)
            .label_style(("sans-serif", 12))
            .axis_desc_style(("sans-serif", 13))
            .light_line_style(RGBColor(238, 238, 238))
            .bold_line_style(RGBColor(215, 215, 215))
            .draw()
            .map_err(|e| err(&e))?;
        chart
            .draw_series(LineSeries::new(pts.iter().copied(), color.stroke_width(2)))
            .map_err(|e| err(&e))?;
        if pts.len() <= 60 {
            chart
                .draw_series(pts.iter().map(|&p| Circle::new(p, 3, color.filled())))
                .map_err(|e| err(&e))?;
        }
    }
    root.present().map_err(|e| err(&e))?;
    Ok(())
}

pub fn run(args: Args) -> Result<()> {
    let text = std::fs::read_to_string(&args.metrics)
        .with_context(|| format!("{}: cannot read", args.metrics.display()))?;
    let origin = args.metrics.display().to_string();
    let m = parse_metrics(&text, &origin, &args.x)?;
    let keys: Vec<String> = if args.keys.is_empty() {
        m.keys.clone()
    } else {
        let keys: Vec<String> = args
            .keys
            .iter()
            .map(|k| k.trim().to_string())
            .filter(|k| !k.is_empty())
            .collect();
        for k in &keys {
            if !m.series.contains_key(k) {
                bail!(
                    "{origin}: no numeric values of key {k:?} (keys with numbers: {})",
                    m.keys.join(", ")
                );
            }
        }
        keys
    };
    if keys.is_empty() {
        bail!(
            "{origin}: no numeric metrics to plot besides the x key {:?}",
            args.x
        );
    }
    let out = args
        .out
        .clone()
        .unwrap_or_else(|| args.metrics.with_extension("png"));
    render(
        &m,
        &keys,
        &out,
        Layout {
            columns: args.columns,
            panel: args.panel,
        },
    )?;
    eprintln!(
        "wrote {} ({} panels: {})",
        out.display(),
        keys.len(),
        keys.join(", ")
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_varying_keys_and_skips_missing_values() {
        let text = "{\"step\": 1, \"loss\": 2.0, \"lr\": 1e-5}\n\n{\"step\": 2, \"loss\": 1.5, \"val_loss\": 1.8, \"note\": \"x\"}\n{\"loss\": 9.0}\n{\"step\": 3, \"loss\": null, \"val_loss\": 1.6}\n";
        let m = parse_metrics(text, "m.jsonl", "step").unwrap();
        assert_eq!(m.keys, ["loss", "lr", "val_loss"]);
        assert_eq!(m.series["loss"], [(1.0, 2.0), (2.0, 1.5)]);
        assert_eq!(m.series["val_loss"], [(2.0, 1.8), (3.0, 1.6)]);
        assert_eq!(m.x_label, "step");
        // Without the x key anywhere, the ordinal is the x.
        let m = parse_metrics("{\"a\": 1}\n{\"a\": 3}\n", "m", "step").unwrap();
        assert_eq!(m.series["a"], [(0.0, 1.0), (1.0, 3.0)]);
        assert_eq!(m.x_label, "record");
    }

    #[test]
    fn malformed_lines_name_their_number() {
        let e = parse_metrics(
            "{\"step\": 1}\n{\"step\": 2,\n",
            "run/metrics.jsonl",
            "step",
        )
        .unwrap_err()
        .to_string();
        assert!(e.starts_with("run/metrics.jsonl:2:"), "{e}");
        let e = parse_metrics("{}\n\n[1, 2]\n", "m", "step")
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("m:3:") && e.contains("array"), "{e}");
    }

    #[test]
    fn tick_labels_are_readable() {
        let f = tick_format(0.0, 100.0);
        assert_eq!(f(&20.0), "20");
        let f = tick_format(2.1, 2.4);
        assert_eq!(f(&2.25), "2.25");
        let f = tick_format(1e-6, 1e-5);
        assert!(f(&5e-6).contains('e'), "{}", f(&5e-6));
        assert_eq!(range([3.0, 3.0].into_iter(), 0.1), (2.7, 3.3));
    }

    #[test]
    fn extreme_values_give_finite_axes_and_render() {
        for (lo, hi) in [
            (0.0, 1.75e308),
            (-f64::MAX, f64::MAX),
            (1e-320, 2e-320),
            (5.0, 5.0),
        ] {
            let (a, b) = range([lo, hi].into_iter(), 0.06);
            assert!(
                a.is_finite() && b.is_finite() && a < b,
                "{lo} {hi}: {a} {b}"
            );
            assert!((b - a).is_finite(), "{lo} {hi}");
        }
        // Rendering finishes (it used to loop forever on a loss near f64::MAX).
        let m = parse_metrics(
            "{\"step\": 1, \"loss\": 1.75e308}\n{\"step\": 2, \"loss\": 0}\n",
            "m",
            "step",
        )
        .unwrap();
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("c.png");
        let (tx, rx) = std::sync::mpsc::channel();
        let o = out.clone();
        std::thread::spawn(move || {
            let _ = tx.send(
                render(&m, &["loss".to_string()], &o, Layout::default()).map_err(|e| e.to_string()),
            );
        });
        let r = rx
            .recv_timeout(std::time::Duration::from_secs(60))
            .expect("render hangs");
        r.unwrap();
        assert!(out.exists());
    }
}
