//! The status page: the snapshot `metrics::recent` gathers, as a page a person reads (HTML rendered here: no script, no external asset,
//! readable as text; it refreshes itself every 10 s) and as JSON for scripts.

use std::fmt::Write;

use crate::metrics::recent::{
    Certificate, Counts, DestinationState, DestinationStatus, EXPIRY_WARNING_DAYS, Failure,
    HISTORY_MINUTES, ListenerStatus, RECENT_MINUTES, Snapshot,
};

fn plural(n: u32) -> &'static str {
    if n == 1 { "" } else { "s" }
}

/// Seconds between the page's own refreshes.
pub const REFRESH_SECONDS: u32 = 10;

/// The snapshot as JSON (pretty-printed: people read it with curl too).
pub fn json(s: &Snapshot) -> String {
    serde_json::to_string_pretty(s)
        .unwrap_or_else(|e| format!("{{\"error\":\"cannot render the status: {e}\"}}"))
}

/// Text made safe for HTML element content and attribute values.
pub fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
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

fn uptime(seconds: u64) -> String {
    let (d, h, m) = (
        seconds / 86_400,
        seconds % 86_400 / 3600,
        seconds % 3600 / 60,
    );
    match (d, h) {
        (0, 0) => format!("{m} min {} s", seconds % 60),
        (0, _) => format!("{h} h {m:02} min"),
        _ => format!("{d} d {h} h"),
    }
}

fn ms(value: Option<f64>) -> String {
    value.map_or("–".into(), |v| format!("≤{v} ms"))
}

const STYLE: &str = "body{font-family:system-ui,sans-serif;margin:1.5em;color:#111}\
h1{font-size:1.4em;margin-bottom:.2em}h2{font-size:1.1em;margin-top:1.6em}\
table{border-collapse:collapse;font-size:.95em}th,td{border:1px solid #ccc;padding:.25em .6em;text-align:left;\
vertical-align:top}th{background:#f3f3f3}td.n{text-align:right}\
.bad{color:#a00}.good{color:#070}.warn{color:#a60}.bad b,.warn b{font-weight:700}\
td.wide{min-width:11em}small{display:block;color:#444;font-size:.85em;max-width:22em;overflow-wrap:anywhere}\
pre{background:#f7f7f7;border:1px solid #ddd;padding:.8em;overflow:auto}\
p.meta{color:#555;margin-top:0}";

/// A table: header cells, then rows of already-escaped cells (`<td>` with its class included).
fn table(out: &mut String, headers: &[&str], rows: &[Vec<String>], empty: &str) {
    if rows.is_empty() {
        let _ = writeln!(out, "<p>{}</p>", escape(empty));
        return;
    }
    out.push_str("<table>\n<tr>");
    for h in headers {
        let _ = write!(out, "<th>{}</th>", escape(h));
    }
    out.push_str("</tr>\n");
    for row in rows {
        out.push_str("<tr>");
        for cell in row {
            out.push_str(cell);
        }
        out.push_str("</tr>\n");
    }
    out.push_str("</table>\n");
}

fn td(text: &str) -> String {
    format!("<td>{}</td>", escape(text))
}

fn num(n: impl std::fmt::Display) -> String {
    format!("<td class=\"n\">{n}</td>")
}

fn errors(c: &Counts) -> String {
    if c.errors == 0 {
        num(0)
    } else {
        format!("<td class=\"n bad\">{}</td>", c.errors)
    }
}

fn listener_row(l: &ListenerStatus) -> Vec<String> {
    vec![
        td(&l.name),
        td(&l.mode),
        td(&l.bind),
        td(&l.tls),
        td(l.certificate_expires.as_deref().unwrap_or("–")),
        num(l.connections),
        num(l.last_5m.requests),
        errors(&l.last_5m),
        num(l.last_60m.requests),
        errors(&l.last_60m),
    ]
}

fn failure(f: &Failure) -> String {
    format!(
        "<td class=\"bad wide\"><b>{}</b><small>{}</small></td>",
        escape(&f.hop),
        escape(&f.error)
    )
}

fn destination_row(d: &DestinationStatus) -> Vec<String> {
    let (state, last_failure) = match &d.state {
        DestinationState::Up => ("<td class=\"good\">up</td>".to_owned(), td("–")),
        DestinationState::Idle => (td("idle"), td("–")),
        DestinationState::Connecting {
            failures,
            last_failure,
        } => (
            match failures {
                0 => td("connecting"),
                n => format!(
                    "<td class=\"warn wide\"><b>connecting</b><small>again, after {n} failed \
                     connect{}</small></td>",
                    plural(*n)
                ),
            },
            last_failure.as_ref().map_or_else(|| td("–"), failure),
        ),
        DestinationState::BackingOff {
            since,
            failures,
            retry_in_seconds,
            last_failure,
        } => (
            format!(
                "<td class=\"bad wide\"><b>backing off</b><small>since {}; {failures} failed \
                 connect{} in a row; {}</small></td>",
                escape(since),
                plural(*failures),
                match retry_in_seconds {
                    0 => "the next request tries again".to_owned(),
                    s => format!("next attempt in {s} s"),
                }
            ),
            failure(last_failure),
        ),
    };
    vec![
        td(&d.name),
        td(&d.route),
        state,
        last_failure,
        num(d.connections),
        num(d.streams_in_flight),
        match d.last_5m.errors {
            0 => num(format!("{} / 0", d.last_5m.requests)),
            e => format!(
                "<td class=\"n\">{} / <span class=\"bad\">{e}</span></td>",
                d.last_5m.requests
            ),
        },
        num(format!(
            "{} / {}",
            ms(d.latency_ms_p50),
            ms(d.latency_ms_p99)
        )),
    ]
}

fn certificate_row(c: &Certificate) -> Vec<String> {
    let left = if c.days_left < 0 {
        "<td class=\"n bad\">expired</td>".to_owned()
    } else if c.expiring_soon {
        format!(
            "<td class=\"n warn\">⚠ {} day{} (under {EXPIRY_WARNING_DAYS})</td>",
            c.days_left,
            if c.days_left == 1 { "" } else { "s" }
        )
    } else {
        num(c.days_left)
    };
    vec![
        td(&c.holder),
        td(&c.kind),
        td(&c.name),
        td(&c.expires),
        left,
    ]
}

/// The status page.
pub fn html(s: &Snapshot) -> String {
    let mut out = String::with_capacity(8192);
    let _ = write!(
        out,
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n\
         <meta http-equiv=\"refresh\" content=\"{REFRESH_SECONDS}\">\n\
         <title>pushrelay status</title>\n<style>{STYLE}</style>\n</head>\n<body>\n\
         <h1>pushrelay {}</h1>\n\
         <p class=\"meta\">As of {} (refreshes every {REFRESH_SECONDS} s; \
         <a href=\"/status.json\">JSON</a>, <a href=\"/metrics\">metrics</a>)</p>\n",
        escape(&s.version),
        escape(&s.now),
    );
    let _ = writeln!(
        out,
        "<p>Up {} (since {}), {} worker thread{}.</p>",
        uptime(s.uptime_seconds),
        escape(&s.started),
        s.workers,
        if s.workers == 1 { "" } else { "s" }
    );
    let _ = write!(
        out,
        "<p>Configuration: {}; loaded {}.",
        escape(&s.config.origin),
        escape(s.config.loaded.as_deref().unwrap_or("–"))
    );
    match &s.config.last_reload {
        None => out.push_str(" No reload since.</p>\n"),
        Some(r) if r.error.is_none() => {
            let _ = writeln!(
                out,
                " Last reload at {}: <span class=\"good\">applied</span>.</p>",
                escape(&r.at)
            );
        }
        Some(r) => {
            let _ = writeln!(
                out,
                " Last reload at {}: <span class=\"bad\">refused</span> ({}); the running \
                 configuration stays.</p>",
                escape(&r.at),
                escape(r.error.as_deref().unwrap_or(""))
            );
        }
    }

    let recent = format!("{RECENT_MINUTES} min");
    let hour = format!("{HISTORY_MINUTES} min");
    out.push_str("<h2>Listeners</h2>\n");
    let rows: Vec<Vec<String>> = s.listeners.iter().map(listener_row).collect();
    table(
        &mut out,
        &[
            "listener",
            "mode",
            "bind",
            "TLS",
            "certificate expires",
            "client connections",
            &format!("requests {recent}"),
            &format!("errors {recent}"),
            &format!("requests {hour}"),
            &format!("errors {hour}"),
        ],
        &rows,
        "No listener.",
    );
    out.push_str(
        "<p class=\"meta\">Over the last 5 and 60 minutes; errors are answers with a 4xx or 5xx \
         status, pushrelay's own and the origin's.</p>\n",
    );

    out.push_str("<h2>Destinations</h2>\n");
    let rows: Vec<Vec<String>> = s.destinations.iter().map(destination_row).collect();
    table(
        &mut out,
        &[
            "destination",
            "route",
            "state",
            "last failure",
            "upstream connections",
            "streams in flight",
            &format!("requests / errors {recent}"),
            &format!("latency p50 / p99 {recent}"),
        ],
        &rows,
        "No destination is allowed: every request is refused.",
    );

    let _ = writeln!(
        out,
        "<h2>Relay errors</h2>\n<p class=\"meta\">Requests pushrelay answered itself, by reason.</p>"
    );
    let rows: Vec<Vec<String>> = s
        .relay_errors
        .iter()
        .map(|r| vec![td(&r.reason), num(r.last_5m), num(r.last_60m)])
        .collect();
    table(
        &mut out,
        &["reason", &format!("last {recent}"), &format!("last {hour}")],
        &rows,
        &format!("None in the {hour}."),
    );

    let _ = writeln!(
        out,
        "<h2>Certificates</h2>\n<p class=\"meta\">Soonest expiry first; those within \
         {EXPIRY_WARNING_DAYS} days are flagged ⚠.</p>"
    );
    let rows: Vec<Vec<String>> = s.certificates.iter().map(certificate_row).collect();
    table(
        &mut out,
        &["held by", "kind", "name", "expires", "days left"],
        &rows,
        "No certificate.",
    );

    let _ = writeln!(
        out,
        "<h2>Effective configuration</h2>\n<p class=\"meta\">Secrets masked, as \
         <code>pushrelay check</code> prints it.</p>\n<pre>{}</pre>\n</body>\n</html>",
        escape(&s.config.effective)
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::recent::*;
    use std::time::SystemTime;

    fn snapshot() -> Snapshot {
        let book = Book::new();
        let t = book.traffic("apns", "api.push.apple.com:443");
        t.record(200, std::time::Duration::from_millis(3));
        book.traffic("apns", "api.sandbox.push.apple.com:443")
            .record(502, std::time::Duration::from_millis(1));
        book.relay_error("RelayProxyAuthenticationRequired");
        book.config_origin("/etc/pushrelay/<config>.yaml");
        book.config_loaded(
            "upstream:\n  proxy: http://relay:***@proxy:3128\n".into(),
            false,
        );
        let now = SystemTime::now();
        book.certificate(
            "apns",
            "served",
            "api.push.apple.com",
            unix_seconds(now) + 5 * 86_400,
        );
        let about = About {
            version: "0.1.0".into(),
            workers: 1,
            listeners: vec![ListenerAbout {
                name: "apns".into(),
                mode: "pre-proxy".into(),
                bind: "127.0.0.1:8443".into(),
                tls: "minted from CA certs/ca.pem".into(),
            }],
        };
        let live = Live {
            connections: Default::default(),
            destinations: vec![
                DestinationLive {
                    name: "api.push.apple.com:443".into(),
                    route: "direct to 127.0.0.1:9443".into(),
                    connections: 1,
                    streams_in_flight: 0,
                    state: DestinationState::Up,
                },
                DestinationLive {
                    name: "api.sandbox.push.apple.com:443".into(),
                    route: "via proxy http://relay:***@proxy:3128".into(),
                    connections: 0,
                    streams_in_flight: 0,
                    state: DestinationState::BackingOff {
                        since: "2026-12-01 20:00:00 UTC".into(),
                        failures: 3,
                        retry_in_seconds: 4,
                        last_failure: Failure {
                            hop: "proxy answered 407 Proxy Authentication Required".into(),
                            error: "proxy 127.0.0.1:3128 refused CONNECT <host>".into(),
                        },
                    },
                },
                DestinationLive {
                    name: "api.development.push.apple.com:443".into(),
                    route: "direct to api.development.push.apple.com:443".into(),
                    connections: 0,
                    streams_in_flight: 0,
                    state: DestinationState::Connecting {
                        failures: 2,
                        last_failure: Some(Failure {
                            hop: "tcp".into(),
                            error: "TCP connect failed".into(),
                        }),
                    },
                },
            ],
        };
        book.snapshot(&about, &live, now)
    }

    /// The page says what a reader needs in words, escapes what it shows, and needs nothing
    /// from elsewhere.
    #[test]
    fn page_shows_each_section_in_words() {
        let page = html(&snapshot());
        for text in [
            "pushrelay 0.1.0",
            "1 worker thread.",
            "/etc/pushrelay/&lt;config&gt;.yaml",
            "No reload since.",
            "<td>pre-proxy</td>",
            "<td>minted from CA certs/ca.pem</td>",
            "<td class=\"good\">up</td>",
            "<b>backing off</b><small>since 2026-12-01 20:00:00 UTC; 3 failed connects in a row; \
             next attempt in 4 s</small>",
            "<b>connecting</b><small>again, after 2 failed connects</small>",
            "<b>tcp</b><small>TCP connect failed</small>",
            "<b>proxy answered 407 Proxy Authentication Required</b><small>proxy 127.0.0.1:3128 \
             refused CONNECT &lt;host&gt;</small>",
            "<td>RelayProxyAuthenticationRequired</td>",
            "⚠ 5 days (under 30)",
            "proxy: http://relay:***@proxy:3128",
            "<meta http-equiv=\"refresh\" content=\"10\">",
        ] {
            assert!(page.contains(text), "{text:?} missing from\n{page}");
        }
        for outside in ["<script", "<link", " src=", "href=\"http", "url("] {
            assert!(!page.contains(outside), "{outside:?} in\n{page}");
        }
    }

    #[test]
    fn json_carries_the_same_data() {
        let text = json(&snapshot());
        let v: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(v["version"], "0.1.0");
        assert_eq!(v["destinations"][0]["state"], "up");
        assert_eq!(v["destinations"][1]["state"], "backing_off");
        assert_eq!(
            v["destinations"][1]["last_failure"]["hop"],
            "proxy answered 407 Proxy Authentication Required"
        );
        assert_eq!(v["destinations"][1]["retry_in_seconds"], 4);
        assert_eq!(v["destinations"][1]["last_5m"]["errors"], 1);
        assert_eq!(v["listeners"][0]["last_5m"]["requests"], 2);
        assert_eq!(v["certificates"][0]["expiring_soon"], true);
        assert_eq!(v["relay_errors"][0]["last_60m"], 1);
    }

    #[test]
    fn uptime_reads_as_a_duration() {
        assert_eq!(uptime(75), "1 min 15 s");
        assert_eq!(uptime(3 * 3600 + 120), "3 h 02 min");
        assert_eq!(uptime(2 * 86_400 + 3600), "2 d 1 h");
        assert_eq!(
            escape("<a href=\"x\">&'"),
            "&lt;a href=&quot;x&quot;&gt;&amp;&#39;"
        );
    }
}
