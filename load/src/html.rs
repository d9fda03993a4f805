//! The `--report FILE.html`: one self-contained HTML page (the run's parameters, a table
//! of results, and the charts as inline SVG: no script, nothing fetched), and each chart
//! beside it as `FILE-<chart>.svg`.

use std::{
    fmt::Write as _,
    path::{Path, PathBuf},
    time::SystemTime,
};

use anyhow::Context as _;

use crate::{
    charts::{self, Chart, MARKED, display_name},
    cli::Args,
    report::RunOutcome,
};

/// Escapes text for HTML.
fn esc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// Where chart `name` of the report at `html` goes: `FILE-<name>.svg` beside it (FILE is
/// the report's name without its `.html`).
pub(crate) fn chart_path(html: &Path, name: &str) -> PathBuf {
    let stem = match html.extension().and_then(|e| e.to_str()) {
        Some("html" | "htm") => html.file_stem(),
        _ => html.file_name(),
    }
    .map_or_else(|| "report".into(), |s| s.to_string_lossy().into_owned());
    html.with_file_name(format!("{stem}-{name}.svg"))
}

/// Refuses a `--report` path whose folder does not exist (before a long run, not after).
pub(crate) fn check_path(html: &Path) -> anyhow::Result<()> {
    let dir = match html.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    if !dir.is_dir() {
        anyhow::bail!("--report {}: no folder {}", html.display(), dir.display());
    }
    Ok(())
}

/// Writes the report to `html` and its charts beside it; returns the files written.
pub(crate) fn write(
    html: &Path,
    args: &Args,
    addresses: &[(&str, String)],
    runs: &[RunOutcome],
) -> anyhow::Result<Vec<PathBuf>> {
    let charts = charts::all(runs, !args.sweep.is_empty())?;
    let page = render(args, addresses, runs, &charts, html, SystemTime::now());
    std::fs::write(html, page).with_context(|| format!("writing {}", html.display()))?;
    let mut written = vec![html.to_path_buf()];
    for c in &charts {
        let path = chart_path(html, c.name);
        std::fs::write(&path, &c.svg).with_context(|| format!("writing {}", path.display()))?;
        written.push(path);
    }
    Ok(written)
}

/// A run's mode as the table prints it: "closed" or "open 5000/s".
fn mode(rate: Option<f64>) -> String {
    rate.map_or("closed".to_string(), |r| format!("open {r}/s"))
}

/// The report page: parameters, results table, charts (inline SVG), errors.
pub(crate) fn render(
    args: &Args,
    addresses: &[(&str, String)],
    runs: &[RunOutcome],
    charts: &[Chart],
    html: &Path,
    generated: SystemTime,
) -> String {
    let scenario = args.scenario.name();
    let mut p = String::new();
    let _ = write!(
        p,
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n\
         <title>geomatch-load: {scenario}</title>\n<style>\n{STYLE}</style>\n</head>\n<body>\n\
         <h1>geomatch-load: {scenario}</h1>\n"
    );

    // Parameters.
    let targets: Vec<String> = charts::targets(runs)
        .iter()
        .map(|t| {
            let at = addresses
                .iter()
                .find(|(name, _)| name == t)
                .map_or(String::new(), |(_, a)| format!(" at {a}"));
            format!("{}{at}", display_name(t))
        })
        .collect();
    let loop_kind = if !args.sweep.is_empty() {
        let rates: Vec<String> = args.sweep.iter().map(|r| format!("{r}")).collect();
        format!(
            "open-loop sweep: {} requests/s, each for {}",
            rates.join(", "),
            humantime::format_duration(args.duration)
        )
    } else if let Some(r) = args.rate {
        format!("open loop: {r} requests/s on a fixed schedule")
    } else {
        "closed loop: each caller sends its next call when the last is answered".to_string()
    };
    let callers = if args.rate.is_some() || !args.sweep.is_empty() {
        format!("at most {} calls in flight", args.concurrency)
    } else {
        format!("{} concurrent callers", args.concurrency)
    };
    let params: [(&str, String); 9] = [
        ("scenario", scenario.to_string()),
        ("targets", targets.join(", ")),
        ("mode", loop_kind),
        ("callers", callers),
        (
            "connections",
            format!("{} HTTP/2 connections", args.connections),
        ),
        (
            "duration",
            format!("{} per run", humantime::format_duration(args.duration)),
        ),
        (
            "population",
            format!(
                "{} users, seed {}{}",
                args.users,
                args.seed,
                if args.skip_load {
                    " (not loaded: --skip-load)"
                } else {
                    ""
                }
            ),
        ),
        ("runs", runs.len().to_string()),
        (
            "generated",
            humantime::format_rfc3339_seconds(generated).to_string(),
        ),
    ];
    p.push_str("<h2>Parameters</h2>\n<table class=\"params\">\n");
    for (k, v) in &params {
        let _ = writeln!(p, "<tr><th>{}</th><td>{}</td></tr>", esc(k), esc(v));
    }
    p.push_str("</table>\n");

    // Results: one row per run.
    p.push_str(
        "<h2>Results</h2>\n<p class=\"note\">Latencies in milliseconds, of the successful \
         calls (open loop: from each call's scheduled send time, so a stall is counted). \
         Server CPU: the target's user + system CPU time over the run per successful \
         operation (with its pid: --server-pid, --redis-pid, --valkey-pid).</p>\n\
         <table class=\"results\">\n<tr><th>target</th><th>mode</th><th>ops/s</th>",
    );
    for (_, name) in MARKED {
        let _ = write!(p, "<th>{name} ms</th>");
    }
    p.push_str("<th>max ms</th><th>errors</th><th>unexpected</th><th>server CPU µs/op</th></tr>\n");
    let series = charts::series(runs);
    for s in &series {
        let r = s.run;
        let h = &r.stats.hist;
        let ms = |us: u64| format!("{:.3}", us as f64 / 1_000.0);
        let _ = write!(
            p,
            "<tr><td><span class=\"key\" style=\"background:{}\"></span>{}</td><td>{}</td><td>{:.0}</td>",
            s.css_color(),
            esc(&display_name(&r.target)),
            esc(&mode(r.rate)),
            r.ops_per_s()
        );
        for (q, _) in MARKED {
            let _ = write!(p, "<td>{}</td>", ms(h.value_at_quantile(q)));
        }
        let cpu = r
            .server_cpu_us_per_op
            .map_or("—".to_string(), |c| format!("{c:.2}"));
        let _ = writeln!(
            p,
            "<td>{}</td><td>{}</td><td>{}</td><td>{cpu}</td></tr>",
            ms(h.max()),
            r.stats.errors,
            r.stats.misses
        );
    }
    p.push_str("</table>\n");

    // Charts.
    for c in charts {
        let file = chart_path(html, c.name);
        let file = file
            .file_name()
            .map_or_else(String::new, |f| f.to_string_lossy().into_owned());
        let _ = write!(
            p,
            "<h2>{}</h2>\n<p class=\"note\">{} <span class=\"file\">(also {})</span></p>\n\
             <figure>\n{}\n</figure>\n",
            esc(c.title),
            esc(c.caption),
            esc(&file),
            c.svg.trim()
        );
    }

    // Errors, word for word.
    let errors: Vec<(&str, &String)> = runs
        .iter()
        .flat_map(|r| r.stats.first_errors.iter().map(|e| (r.target.as_str(), e)))
        .collect();
    if !errors.is_empty() {
        p.push_str("<h2>First errors</h2>\n<ul class=\"errors\">\n");
        for (t, e) in errors {
            let _ = writeln!(p, "<li><b>{}</b>: {}</li>", esc(&display_name(t)), esc(e));
        }
        p.push_str("</ul>\n");
    }
    p.push_str("</body>\n</html>\n");
    p
}

/// The page's style sheet (inline: the report fetches nothing).
const STYLE: &str = "body { font-family: sans-serif; margin: 2em auto; max-width: 1040px; color: #222; }
h1 { font-size: 1.6em; }
h2 { font-size: 1.25em; margin-top: 1.6em; border-bottom: 1px solid #ddd; }
table { border-collapse: collapse; }
th, td { padding: 0.25em 0.8em; border: 1px solid #ddd; text-align: left; }
table.results td { text-align: right; font-variant-numeric: tabular-nums; }
table.results td:first-child, table.results td:nth-child(2) { text-align: left; white-space: nowrap; }
.params th { background: #f4f4f4; }
.note { color: #555; }
.file { color: #888; font-size: 0.9em; }
.key { display: inline-block; width: 0.9em; height: 0.9em; margin-right: 0.4em; vertical-align: middle; }
figure { margin: 0; }
figure svg { max-width: 100%; height: auto; }
";

#[cfg(test)]
mod tests {
    use clap::Parser as _;

    use super::*;
    use crate::{charts::tests::svg_texts, report::tests::synthetic};

    #[test]
    fn chart_files_go_beside_the_report() {
        let p = |s: &str| chart_path(Path::new(s), "latency");
        assert_eq!(
            p("/tmp/x/report.html"),
            Path::new("/tmp/x/report-latency.svg")
        );
        assert_eq!(p("out"), Path::new("out-latency.svg"));
        assert_eq!(p("run.1.htm"), Path::new("run.1-latency.svg"));
        assert!(check_path(Path::new("/no/such/folder/r.html")).is_err());
        assert!(check_path(Path::new("r.html")).is_ok());
    }

    #[test]
    fn sweep_and_report_flags_parse() {
        let a = Args::try_parse_from(["geomatch-load", "--sweep", "5000,10000"]).unwrap();
        assert_eq!(a.rates().unwrap(), [Some(5000.0), Some(10000.0)]);
        let a = Args::try_parse_from(["geomatch-load", "--rate", "100"]).unwrap();
        assert_eq!(a.rates().unwrap(), [Some(100.0)]);
        let a = Args::try_parse_from(["geomatch-load"]).unwrap();
        assert_eq!(a.rates().unwrap(), [None]);
        assert!(Args::try_parse_from(["geomatch-load", "--sweep", "1", "--rate", "2"]).is_err());
        let a = Args::try_parse_from(["geomatch-load", "--sweep", "1000,-5"]).unwrap();
        assert!(a.rates().is_err());
    }

    /// Every axis label of the three charts, with its unit.
    const AXES: [&str; 6] = [
        "latency (ms, log scale)",
        "share of calls per bin (%)",
        "percentile (each step one more nine)",
        "successful operations per second",
        "failed calls per second",
        "time into the run (s)",
    ];

    #[test]
    fn the_report_is_html_with_every_chart_inline_and_beside_it() {
        let dir = std::env::temp_dir().join(format!("geomatch-load-report-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let html = dir.join("report.html");
        let args = Args::try_parse_from([
            "geomatch-load",
            "--grpc",
            "127.0.0.1:50400",
            "--redis",
            "redis://127.0.0.1:6400",
            "--valkey",
            "redis://127.0.0.1:6401",
            "--scenario",
            "search-dense-1km",
            "--concurrency",
            "32",
            "--duration",
            "3s",
            "--report",
            html.to_str().unwrap(),
        ])
        .unwrap();
        let mut runs = [
            synthetic("grpc", None, 0.2, 500, 3),
            synthetic("redis", None, 0.5, 300, 3),
            synthetic("valkey", None, 0.4, 350, 3),
        ];
        runs[2].server_cpu_us_per_op = None;
        let addresses = [
            ("grpc", "127.0.0.1:50400".to_string()),
            ("redis", "redis://127.0.0.1:6400".to_string()),
            ("valkey", "redis://127.0.0.1:6401".to_string()),
        ];
        let written = write(&html, &args, &addresses, &runs).unwrap();
        let names: Vec<String> = written
            .iter()
            .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
            .collect();
        assert_eq!(
            names,
            [
                "report.html",
                "report-latency.svg",
                "report-percentiles.svg",
                "report-throughput.svg"
            ]
        );
        let page = std::fs::read_to_string(&html).unwrap();
        assert!(page.starts_with("<!DOCTYPE html>"));
        // Self-contained: no script, nothing loaded (the only URL is SVG's namespace).
        for fetch in [
            "<script", "<link", "<img", "src=", "href=", "url(", "@import",
        ] {
            assert!(!page.contains(fetch), "report with {fetch:?}");
        }
        assert_eq!(page.matches("<svg").count(), 3);
        let texts = svg_texts(&page);
        for axis in AXES {
            assert!(
                texts.iter().any(|t| t == axis),
                "report without the axis {axis:?}"
            );
        }
        for text in [
            // Parameters.
            "search-dense-1km",
            "geomatch (grpc) at 127.0.0.1:50400",
            "redis at redis://127.0.0.1:6400",
            "valkey at redis://127.0.0.1:6401",
            "32 concurrent callers",
            "3s per run",
            // The percentile table.
            "<th>p50 ms</th><th>p90 ms</th><th>p99 ms</th><th>p99.9 ms</th><th>max ms</th>",
            // Server CPU per operation, "—" without the target's pid.
            "<th>server CPU µs/op</th>",
            "<td>20.00</td></tr>",
            "<td>50.00</td></tr>",
            "<td>—</td></tr>",
            // Errors, word for word.
            "<li><b>geomatch (grpc)</b>: Unavailable: down</li>",
            "<li><b>valkey</b>: Unavailable: down</li>",
        ]
        .into_iter()
        .chain(AXES)
        {
            assert!(page.contains(text), "report without {text:?}");
        }
        for f in &written[1..] {
            let svg = std::fs::read_to_string(f).unwrap();
            assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"));
            assert!(page.contains(svg.trim()), "{} not inline", f.display());
            // Every target in every chart's legend.
            let texts = svg_texts(&svg);
            for target in ["geomatch (grpc)", "redis", "valkey"] {
                assert!(
                    texts.iter().any(|t| t == target),
                    "{}: {texts:?}",
                    f.display()
                );
            }
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
