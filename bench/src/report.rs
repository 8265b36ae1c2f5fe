//! Result tables, the targets, `docs/benchmarks.md` and the soak chart.

use std::fmt::Write as _;

use crate::systems::{System, PEERS, SYSTEMS};

/// One cell per system, indexed like `SYSTEMS`; None where the system does not support the workload.
pub type Cells = [Option<Cell>; SYSTEMS.len()];

pub fn no_cells() -> Cells {
    std::array::from_fn(|_| None)
}

pub struct Cell {
    pub value: f64,
    /// Extra figures shown next to the value (latency percentiles, rates).
    pub detail: String,
}

pub struct Line {
    pub label: String,
    pub clients: Option<usize>,
    pub cells: Cells,
}

pub struct Section {
    pub title: String,
    pub note: String,
    /// What the value column holds, e.g. "msgs/s" or "p50 ms".
    pub unit: String,
    pub lines: Vec<Line>,
    /// A table of the section's own (header, rows), shown instead of the per-system one: for a
    /// workload whose peers are not among `SYSTEMS`.
    pub table: Option<(Vec<String>, Vec<Vec<String>>)>,
}

impl Section {
    pub fn new(title: &str, unit: &str, note: &str) -> Self {
        Section {
            title: title.into(),
            note: note.into(),
            unit: unit.into(),
            lines: Vec::new(),
            table: None,
        }
    }

    pub fn add(&mut self, label: &str, clients: Option<usize>, cells: Cells) {
        self.lines.push(Line {
            label: label.into(),
            clients,
            cells,
        });
    }

    pub fn value(&self, label: &str, clients: Option<usize>, system: System) -> Option<f64> {
        let index = SYSTEMS.iter().position(|s| *s == system)?;
        self.lines
            .iter()
            .find(|line| line.label == label && line.clients == clients)
            .and_then(|line| line.cells[index].as_ref())
            .map(|cell| cell.value)
    }
}

pub fn only(system: System, cell: Cell) -> Cells {
    let mut cells = no_cells();
    let index = SYSTEMS
        .iter()
        .position(|s| *s == system)
        .expect("known system");
    cells[index] = Some(cell);
    cells
}

pub struct Target {
    pub name: String,
    pub measured: String,
    pub goal: String,
    pub pass: bool,
}

/// One value per interval, per system.
pub type Series = Vec<(System, Vec<f64>)>;

pub struct Soak {
    pub interval_secs: f64,
    pub hold_start: f64,
    pub hold_end: f64,
    pub duration: f64,
    /// Per system (SYSTEMS order): messages per second in each interval.
    pub rates: Series,
    /// Per system: the mean time of one read-and-ack in each interval.
    pub read_ms: Series,
}

pub struct Machine {
    pub cores: String,
    pub memory: String,
    pub cpu: String,
    pub postgres: String,
    pub settings: String,
    pub date: String,
    pub command: String,
    pub elapsed: String,
}

pub fn format_value(value: f64) -> String {
    if !value.is_finite() {
        return "-".into();
    }
    if value.abs() >= 100.0 {
        let digits = format!("{:.0}", value);
        let (sign, digits) = digits
            .strip_prefix('-')
            .map_or(("", digits.as_str()), |d| ("-", d));
        let mut grouped = String::new();
        for (i, c) in digits.chars().enumerate() {
            if i > 0 && (digits.len() - i) % 3 == 0 {
                grouped.push(',');
            }
            grouped.push(c);
        }
        format!("{sign}{grouped}")
    } else if value.abs() >= 10.0 {
        format!("{value:.1}")
    } else {
        format!("{value:.2}")
    }
}

fn cell_text(cell: &Option<Cell>) -> String {
    match cell {
        None => "n/a".into(),
        Some(cell) if cell.detail.is_empty() => format_value(cell.value),
        Some(cell) => format!("{} ({})", format_value(cell.value), cell.detail),
    }
}

fn index_of(system: System) -> Option<usize> {
    SYSTEMS.iter().position(|s| *s == system)
}

fn ratio_text(line: &Line, peer: System) -> String {
    let peer_index = index_of(peer).expect("known system");
    match (&line.cells[0], &line.cells[peer_index]) {
        (Some(ours), Some(theirs)) if theirs.value != 0.0 => {
            format!("{:.2}", ours.value / theirs.value)
        }
        _ => "n/a".into(),
    }
}

fn section_rows(section: &Section) -> (Vec<String>, Vec<Vec<String>>) {
    if let Some(table) = &section.table {
        return table.clone();
    }
    // A system that none of the section's rows measures gets no column: pgmq takes part in a few
    // workloads only.
    let present: Vec<bool> = (0..SYSTEMS.len())
        .map(|i| section.lines.iter().any(|line| line.cells[i].is_some()))
        .collect();
    let shown =
        |system: &System| index_of(*system).is_some_and(|i| present[i] || *system != System::Pgmq);
    let mut header = vec!["workload".to_string(), "clients".to_string()];
    header.extend(
        SYSTEMS
            .iter()
            .filter(|s| shown(s))
            .map(|s| format!("{} {}", s.name(), section.unit)),
    );
    header.extend(
        PEERS
            .iter()
            .filter(|p| shown(p))
            .map(|p| format!("bussig/{}", p.name())),
    );
    let rows = section
        .lines
        .iter()
        .map(|line| {
            let mut row = vec![
                line.label.clone(),
                line.clients.map_or("-".into(), |c| c.to_string()),
            ];
            row.extend(
                SYSTEMS
                    .iter()
                    .zip(&line.cells)
                    .filter(|(s, _)| shown(s))
                    .map(|(_, cell)| cell_text(cell)),
            );
            row.extend(
                PEERS
                    .iter()
                    .filter(|p| shown(p))
                    .map(|p| ratio_text(line, *p)),
            );
            row
        })
        .collect();
    (header, rows)
}

fn text_table(header: &[String], rows: &[Vec<String>]) -> String {
    let widths: Vec<usize> = (0..header.len())
        .map(|i| {
            rows.iter()
                .map(|r| r[i].chars().count())
                .chain([header[i].chars().count()])
                .max()
                .unwrap_or(0)
        })
        .collect();
    let line = |cells: &[String]| {
        cells
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect::<Vec<_>>()
            .join("  ")
            .trim_end()
            .to_string()
    };
    let mut out = line(header) + "\n";
    out += &(widths
        .iter()
        .map(|w| "-".repeat(*w))
        .collect::<Vec<_>>()
        .join("  ")
        + "\n");
    for row in rows {
        out += &(line(row) + "\n");
    }
    out
}

fn markdown_table(header: &[String], rows: &[Vec<String>]) -> String {
    let mut out = format!("| {} |\n", header.join(" | "));
    out += &format!("|{}\n", header.iter().map(|_| "---|").collect::<String>());
    for row in rows {
        out += &format!(
            "| {} |\n",
            row.iter()
                .map(|c| c.replace('|', "\\|"))
                .collect::<Vec<_>>()
                .join(" | ")
        );
    }
    out
}

fn target_rows(targets: &[Target]) -> (Vec<String>, Vec<Vec<String>>) {
    let header = ["target", "measured", "goal", "result"]
        .map(String::from)
        .to_vec();
    let rows = targets
        .iter()
        .map(|t| {
            vec![
                t.name.clone(),
                t.measured.clone(),
                t.goal.clone(),
                if t.pass { "PASS" } else { "MISS" }.into(),
            ]
        })
        .collect();
    (header, rows)
}

pub fn print_section(section: &Section) {
    let (header, rows) = section_rows(section);
    println!("\n== {} ==", section.title);
    println!("{}", text_table(&header, &rows));
}

pub fn print_targets(targets: &[Target]) {
    let (header, rows) = target_rows(targets);
    println!("\n== Targets ==");
    println!("{}", text_table(&header, &rows));
    let passed = targets.iter().filter(|t| t.pass).count();
    println!("{passed} of {} targets met", targets.len());
}

pub fn markdown(
    machine: &Machine,
    sections: &[Section],
    targets: &[Target],
    chart_file: &str,
) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "# Benchmarks\n");
    let _ = writeln!(
        out,
        "Generated by `{}` on {}; every number below comes from that run (it took {}). \
         bussig, PgQ, pgmq and a hand-written SKIP LOCKED queue ran in the same throw-away cluster, one after \
         the other (the sends of sections 1 and 2 taking turns), with the same ~100-byte JSON payload. Each section says how its workload is driven; \
         `bench/` holds the scripts and the load generator.\n",
        machine.command, machine.date, machine.elapsed
    );
    if let Ok(warning) = std::env::var("BENCH_WARNING") {
        let _ = writeln!(out, "**Warning:** {warning}\n");
    }
    let _ = writeln!(out, "## Machine\n");
    let _ = writeln!(out, "- CPU: {} ({} cores)", machine.cpu, machine.cores);
    let _ = writeln!(out, "- Memory: {}", machine.memory);
    let _ = writeln!(out, "- {}", machine.postgres);
    let _ = writeln!(
        out,
        "\nSettings added to a fresh `initdb`:\n\n```\n{}\n```\n",
        machine.settings.trim_end()
    );
    let _ = writeln!(out, "## Targets\n");
    let (header, rows) = target_rows(targets);
    out += &markdown_table(&header, &rows);
    let passed = targets.iter().filter(|t| t.pass).count();
    let _ = writeln!(
        out,
        "\n{passed} of {} targets met. Where a target is missed, [performance.md](performance.md) says \
         what limits it.\n",
        targets.len()
    );
    let _ = writeln!(out, "## Results\n");
    let _ = writeln!(
        out,
        "Ratios are bussig's value divided by the peer's on the same row; n/a where a system has no such \
         operation.\n"
    );
    for section in sections {
        let _ = writeln!(out, "### {}\n", section.title);
        if !section.note.is_empty() {
            let _ = writeln!(out, "{}\n", section.note);
        }
        let (header, rows) = section_rows(section);
        out += &markdown_table(&header, &rows);
        out += "\n";
        if section.title.starts_with("8.") {
            let _ = writeln!(out, "![Soak throughput per interval]({chart_file})\n");
        }
    }
    out
}

/// A round axis step that splits `peak` into about five parts.
fn axis_step(peak: f64) -> f64 {
    let rough = (peak / 5.0).max(f64::MIN_POSITIVE);
    let magnitude = 10f64.powf(rough.log10().floor());
    [1.0, 2.0, 5.0, 10.0]
        .iter()
        .map(|m| m * magnitude)
        .find(|s| *s >= rough)
        .unwrap_or(10.0 * magnitude)
}

/// Two panels over the soak's time: messages consumed per second, and the mean time of one
/// read-and-ack, one line per system, with the held transaction shaded.
pub fn soak_svg(soak: &Soak) -> String {
    let (width, left, right, panel_h, gap, top) = (900.0, 70.0, 150.0, 220.0, 70.0, 40.0);
    let height = top + 2.0 * panel_h + gap + 50.0;
    let plot_w = width - left - right;
    let x = |t: f64| left + plot_w * t / soak.duration;
    let colors = ["#d62728", "#1f77b4", "#2ca02c"];
    let mut svg = String::new();
    let _ = writeln!(
        svg,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" viewBox="0 0 {width} {height}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(svg, r#"<rect width="100%" height="100%" fill="white"/>"#);
    let panels: [(&str, &Series); 2] = [
        ("messages consumed per second", &soak.rates),
        ("mean ms per read-and-ack", &soak.read_ms),
    ];
    for (panel, (title, series)) in panels.iter().enumerate() {
        let top = top + panel as f64 * (panel_h + gap);
        let peak = series
            .iter()
            .flat_map(|(_, v)| v.iter().copied())
            .filter(|v| v.is_finite())
            .fold(0.0, f64::max);
        let step = axis_step(peak * 1.05);
        let ceiling = (peak * 1.05 / step).ceil().max(1.0) * step;
        let y = |v: f64| top + panel_h * (1.0 - v / ceiling);
        let _ = writeln!(
            svg,
            r#"<text x="{:.1}" y="{:.1}" text-anchor="middle" font-size="14">Soak: {title}, per {}-second interval</text>"#,
            left + plot_w / 2.0,
            top - 12.0,
            soak.interval_secs
        );
        let _ = writeln!(
            svg,
            r##"<rect x="{:.1}" y="{top}" width="{:.1}" height="{panel_h}" fill="#eeeeee"/><text x="{:.1}" y="{:.1}" text-anchor="middle" fill="#555">transaction held open</text>"##,
            x(soak.hold_start),
            x(soak.hold_end) - x(soak.hold_start),
            (x(soak.hold_start) + x(soak.hold_end)) / 2.0,
            top + 14.0
        );
        let mut v = 0.0;
        while v <= ceiling + step / 2.0 {
            let _ = writeln!(
                svg,
                r##"<line x1="{left}" x2="{:.1}" y1="{:.1}" y2="{:.1}" stroke="#ccc"/><text x="{:.1}" y="{:.1}" text-anchor="end">{}</text>"##,
                left + plot_w,
                y(v),
                y(v),
                left - 6.0,
                y(v) + 4.0,
                format_value(v)
            );
            v += step;
        }
        for i in 0..=10 {
            let t = soak.duration * i as f64 / 10.0;
            let _ = writeln!(
                svg,
                r#"<text x="{:.1}" y="{:.1}" text-anchor="middle">{:.0}</text>"#,
                x(t),
                top + panel_h + 18.0,
                t
            );
        }
        let _ = writeln!(
            svg,
            r#"<text x="{:.1}" y="{:.1}" text-anchor="middle">seconds</text><rect x="{left}" y="{top}" width="{plot_w}" height="{panel_h}" fill="none" stroke="black"/>"#,
            left + plot_w / 2.0,
            top + panel_h + 34.0
        );
        for (index, (system, values)) in series.iter().enumerate() {
            let color = colors[index % colors.len()];
            let points: Vec<String> = values
                .iter()
                .enumerate()
                .filter(|(_, v)| v.is_finite())
                .map(|(i, v)| {
                    format!(
                        "{:.1},{:.1}",
                        x((i as f64 + 0.5) * soak.interval_secs),
                        y(*v)
                    )
                })
                .collect();
            let _ = writeln!(
                svg,
                r#"<polyline fill="none" stroke="{color}" stroke-width="2" points="{}"/>"#,
                points.join(" ")
            );
            let ly = top + 20.0 + 20.0 * index as f64;
            let _ = writeln!(
                svg,
                r#"<line x1="{:.1}" x2="{:.1}" y1="{ly}" y2="{ly}" stroke="{color}" stroke-width="2"/><text x="{:.1}" y="{:.1}">{}</text>"#,
                left + plot_w + 12.0,
                left + plot_w + 36.0,
                left + plot_w + 42.0,
                ly + 4.0,
                system.name()
            );
        }
    }
    svg += "</svg>\n";
    svg
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cell(value: f64) -> Option<Cell> {
        Some(Cell {
            value,
            detail: String::new(),
        })
    }

    #[test]
    fn pgmq_columns_only_where_pgmq_ran() {
        let mut with = Section::new("10. Fresh", "msgs/s", "");
        with.add("consume", Some(2), [cell(2.0), cell(1.0), None, cell(4.0)]);
        let mut without = Section::new("5. Head of line", "p50 ms", "");
        without.add("read", Some(1), [cell(1.0), cell(1.0), None, None]);
        let machine = Machine {
            cores: "2".into(),
            memory: "1 GiB".into(),
            cpu: "cpu".into(),
            postgres: "PostgreSQL 15".into(),
            settings: String::new(),
            date: "today".into(),
            command: "make bench".into(),
            elapsed: "1 minute".into(),
        };
        let text = markdown(&machine, &[without, with], &[], "chart.svg");
        let fresh = text.split("### 10. Fresh").nth(1).expect("section 10");
        assert!(fresh.contains("| pgmq msgs/s |"), "{fresh}");
        assert!(fresh.contains("| 2.00 | n/a | 0.50 |"), "{fresh}");
        let head = text.split("### 5. Head of line").nth(1).expect("section 5");
        let head = head.split("###").next().unwrap_or_default();
        assert!(!head.contains("pgmq"), "{head}");
        assert!(head.contains("PgQ p50 ms"), "{head}");
    }
}
