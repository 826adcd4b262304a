//! Renders the table of `benches/compare/run.sh` as an SVG: one panel per scenario, bars of
//! requests per second (top row) and p99 latency (bottom row) per server.
//!
//!   chart RESULTS.tsv OUT.svg    (RESULTS.tsv: server, scenario, req/s, p50 ms, p99 ms)

use plotters::prelude::*;

struct Row {
  server: String,
  scenario: String,
  rps: f64,
  p99_ms: f64,
}

fn read(path: &str) -> Result<Vec<Row>, String> {
  let text = std::fs::read_to_string(path).map_err(|err| format!("cannot read {path}: {err}"))?;
  text
    .lines()
    .enumerate()
    .filter(|(_, line)| !line.trim().is_empty() && !line.starts_with('#'))
    .map(|(number, line)| {
      let cells: Vec<&str> = line.split('\t').collect();
      let number = |i: usize| {
        cells
          .get(i)
          .and_then(|c| c.parse::<f64>().ok())
          .ok_or_else(|| {
            format!(
              "{path}:{}: expected server, scenario, req/s, p50, p99 separated by tabs",
              number + 1
            )
          })
      };
      Ok(Row {
        server: cells[0].to_string(),
        scenario: cells.get(1).copied().unwrap_or_default().to_string(),
        rps: number(2)?,
        p99_ms: number(4)?,
      })
    })
    .collect()
}

/// Reads one plotted value off a row.
type Metric = fn(&Row) -> f64;

fn unique(values: impl Iterator<Item = String>) -> Vec<String> {
  let mut seen = Vec::new();
  for value in values {
    if !seen.contains(&value) {
      seen.push(value);
    }
  }
  seen
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
  let args: Vec<String> = std::env::args().collect();
  let [_, input, output] = args.as_slice() else {
    return Err("usage: chart RESULTS.tsv OUT.svg".into());
  };
  let rows = read(input)?;
  let servers = unique(rows.iter().map(|r| r.server.clone()));
  let scenarios = unique(rows.iter().map(|r| r.scenario.clone()));
  let root = SVGBackend::new(output, (360 * scenarios.len() as u32, 640)).into_drawing_area();
  root.fill(&WHITE)?;
  let panels = root.split_evenly((2, scenarios.len()));
  let metrics: [(&str, Metric); 2] = [("req/s", |r| r.rps), ("p99 ms", |r| r.p99_ms)];
  for (m, (label, metric)) in metrics.iter().enumerate() {
    for (s, scenario) in scenarios.iter().enumerate() {
      let panel = &panels[m * scenarios.len() + s];
      let values: Vec<f64> = servers
        .iter()
        .map(|server| {
          rows
            .iter()
            .find(|r| &r.server == server && &r.scenario == scenario)
            .map_or(0.0, metric)
        })
        .collect();
      let top = values.iter().cloned().fold(0.0, f64::max) * 1.15 + f64::EPSILON;
      let mut chart = ChartBuilder::on(panel)
        .caption(format!("{scenario}: {label}"), ("sans-serif", 18))
        .margin(10)
        .x_label_area_size(30)
        .y_label_area_size(55)
        .build_cartesian_2d(0.0..servers.len() as f64, 0.0..top)?;
      chart
        .configure_mesh()
        .disable_x_mesh()
        .x_labels(servers.len() * 2 + 1)
        .x_label_formatter(&|x| {
          let i = x.floor() as usize;
          if (x - i as f64 - 0.5).abs() < 0.01 {
            servers.get(i).cloned().unwrap_or_default()
          } else {
            String::new()
          }
        })
        .draw()?;
      chart.draw_series(values.iter().enumerate().map(|(i, v)| {
        let color = Palette99::pick(i).filled();
        Rectangle::new([(i as f64 + 0.15, 0.0), (i as f64 + 0.85, *v)], color)
      }))?;
    }
  }
  root.present()?;
  Ok(())
}
