//! `--plot FILE.svg`: latency or bandwidth against size, log-log, with earlier `--json`
//! results overlaid.

use std::path::Path;

use plotters::prelude::*;

use crate::output::{Metric, Record};
use crate::{err, Result};

fn value(r: &Record, m: Metric) -> f64 {
    match m {
        Metric::Latency => r.usec_per_xfer,
        Metric::Bandwidth | Metric::BiBandwidth => r.mb_per_sec,
    }
}

/// Reads a `--json` output file (one record per line; other lines are skipped).
pub fn load_jsonl(p: &Path) -> Result<Vec<Record>> {
    let text = std::fs::read_to_string(p)
        .map_err(|e| err(format!("cannot read baseline {}: {e}", p.display())))?;
    let v: Vec<Record> = text
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    if v.is_empty() {
        return Err(err(format!(
            "baseline {} has no efa-bench --json records",
            p.display()
        )));
    }
    Ok(v)
}

pub fn draw(
    out: &Path,
    metric: Metric,
    current: &[Record],
    baselines: &[(String, Vec<Record>)],
) -> Result<()> {
    let mut series: Vec<(String, Vec<(f64, f64)>)> = Vec::new();
    let pts = |rs: &[Record]| -> Vec<(f64, f64)> {
        rs.iter()
            .filter(|r| r.bytes > 0 && value(r, metric) > 0.0)
            .map(|r| (r.bytes as f64, value(r, metric)))
            .collect()
    };
    if let Some(r) = current.first() {
        series.push((
            format!("{} {} (this run)", r.prov.bench, r.prov.provider),
            pts(current),
        ));
    }
    for (name, rs) in baselines {
        let prov = rs
            .first()
            .map(|r| r.prov.provider.clone())
            .unwrap_or_default();
        series.push((format!("{name} ({prov})"), pts(rs)));
    }
    let all: Vec<(f64, f64)> = series.iter().flat_map(|s| s.1.iter().copied()).collect();
    if all.is_empty() {
        return Err(err("nothing to plot (no sizes above 0 bytes)"));
    }
    let (mut x0, mut x1, mut y0, mut y1) = (f64::MAX, f64::MIN, f64::MAX, f64::MIN);
    for &(x, y) in &all {
        x0 = x0.min(x);
        x1 = x1.max(x);
        y0 = y0.min(y);
        y1 = y1.max(y);
    }
    let (x0, x1) = (x0 / 1.5, (x1 * 1.5).max(x0 * 2.0));
    let (y0, y1) = (y0 / 1.5, (y1 * 1.5).max(y0 * 2.0));
    let ylabel = match metric {
        Metric::Latency => "latency (usec/xfer)",
        Metric::Bandwidth | Metric::BiBandwidth => "bandwidth (MB/s)",
    };
    let root = SVGBackend::new(out, (900, 600)).into_drawing_area();
    let e = |e: DrawingAreaErrorKind<_>| err(format!("plot {}: {e:?}", out.display()));
    root.fill(&WHITE).map_err(e)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(format!("efa-bench: {ylabel} vs size"), ("sans-serif", 22))
        .margin(15)
        .x_label_area_size(45)
        .y_label_area_size(70)
        .build_cartesian_2d((x0..x1).log_scale(), (y0..y1).log_scale())
        .map_err(e)?;
    chart
        .configure_mesh()
        .x_desc("message size (bytes)")
        .y_desc(ylabel)
        .x_label_formatter(&|x| crate::output::size_str(*x as u64))
        .draw()
        .map_err(e)?;
    for (i, (name, p)) in series.iter().enumerate() {
        let color = Palette99::pick(i).to_rgba();
        chart
            .draw_series(LineSeries::new(p.iter().copied(), color.stroke_width(2)))
            .map_err(e)?
            .label(name.clone())
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color));
        chart
            .draw_series(p.iter().map(|&pt| Circle::new(pt, 3, color.filled())))
            .map_err(e)?;
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .position(SeriesLabelPosition::UpperLeft)
        .draw()
        .map_err(e)?;
    root.present().map_err(e)?;
    Ok(())
}
