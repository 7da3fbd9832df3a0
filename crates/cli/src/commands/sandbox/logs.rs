//! `arca sandbox logs ID`: `<timestamp> <line>` per log line; with `--json`,
//! one record per entry: `timestamp`, `level`, `message`, `fields`.
//!
//! `arca sandbox logs --network ID` prints the sandbox's egress log instead
//! (`GET /sandboxes/{id}/network/logs`, ADR 0005), oldest first, one line
//! per entry: time, verdict, protocol, destination[:port], name, rule and
//! `xN` for N merged repeats. With `--json`, one record per entry with the
//! API's fields (`timestamp`, `protocol`, `destination`, `port`?, `name`?,
//! `verdict`, `rule`, `count`). `--follow` keeps polling every second for
//! new entries until interrupted.

use std::process::ExitCode;
use std::time::Duration;

use arca_proto::network::{EgressLogEntry, Verdict};
use arca_sdk::Client;
use chrono::{DateTime, SecondsFormat, Utc};

use crate::commands::{Ctx, EXIT_NOT_FOUND, block_on, out, out_json};

/// How often `--follow` asks for new entries.
const FOLLOW_EVERY: Duration = Duration::from_secs(1);
/// Egress log entries asked for per request (the API's maximum).
const PAGE: usize = 2000;

/// Options of `arca sandbox logs`.
#[derive(clap::Args, Debug)]
pub(crate) struct Args {
    /// Sandbox id.
    id: String,
    /// Print the egress log (connections and lookups the network policy
    /// allowed or denied) instead of the sandbox's log.
    #[arg(long)]
    network: bool,
    /// With --network: keep printing new entries as they come (polls every
    /// second) until interrupted.
    #[arg(long, short = 'f', requires = "network")]
    follow: bool,
}

pub(crate) fn run(args: &Args, client: &Client, ctx: &Ctx) -> anyhow::Result<ExitCode> {
    if args.network {
        return block_on(network(args, client, ctx))?;
    }
    let logs = match block_on(client.logs(&args.id))? {
        Ok(l) => l,
        Err(e) if e.is_not_found() => return Ok(not_found(&args.id)),
        Err(e) => return Err(super::explain(&e, client)),
    };
    if ctx.json {
        for e in &logs.log_entries {
            out_json(&serde_json::to_value(e)?)?;
        }
    } else if logs.logs.is_empty() {
        for e in &logs.log_entries {
            out(format_args!("{} {} {}", e.timestamp, e.level, e.message))?;
        }
    } else {
        for l in &logs.logs {
            out(format_args!("{} {}", l.timestamp, l.line))?;
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn not_found(id: &str) -> ExitCode {
    eprintln!("arca: sandbox {id} not found; see `arca sandbox list`");
    ExitCode::from(EXIT_NOT_FOUND)
}

/// The egress log, once or (`--follow`) until interrupted.
async fn network(args: &Args, client: &Client, ctx: &Ctx) -> anyhow::Result<ExitCode> {
    let mut cursor = Cursor::default();
    loop {
        let page = match client.network_logs(&args.id, cursor.last, Some(PAGE)).await {
            Ok(p) => p,
            Err(e) if e.is_not_found() && cursor.last.is_some() => {
                eprintln!("arca: sandbox {} ended", args.id);
                return Ok(ExitCode::SUCCESS);
            }
            Err(e) if e.is_not_found() => return Ok(not_found(&args.id)),
            Err(e) => return Err(super::explain(&e, client)),
        };
        let full = page.len() >= PAGE;
        for entry in page {
            if !cursor.is_new(&entry) {
                continue;
            }
            if ctx.json {
                out_json(&serde_json::to_value(&entry)?)?;
            } else {
                out(line(&entry))?;
            }
        }
        if !args.follow {
            return Ok(ExitCode::SUCCESS);
        }
        // A full page may have more behind it: ask again at once.
        if !full {
            tokio::time::sleep(FOLLOW_EVERY).await;
        }
    }
}

/// Where `--follow` is: the newest time printed and the entries printed
/// with exactly that time (the next poll starts there, inclusive).
#[derive(Debug, Default)]
struct Cursor {
    last: Option<DateTime<Utc>>,
    at_last: Vec<EgressLogEntry>,
}

impl Cursor {
    /// Whether `e` was not printed yet; remembers it.
    fn is_new(&mut self, e: &EgressLogEntry) -> bool {
        match self.last {
            Some(t) if e.timestamp < t => false,
            Some(t) if e.timestamp == t => {
                if self.at_last.contains(e) {
                    false
                } else {
                    self.at_last.push(e.clone());
                    true
                }
            }
            _ => {
                self.last = Some(e.timestamp);
                self.at_last = vec![e.clone()];
                true
            }
        }
    }
}

/// `2026-01-01T10:00:00.123Z denied  tcp   198.18.0.2:443  allowed.test  allowOut  x3`.
fn line(e: &EgressLogEntry) -> String {
    let verdict = match e.verdict {
        Verdict::Allowed => "allowed",
        Verdict::Denied => "denied",
    };
    let dest = match e.port {
        Some(p) => format!("{}:{p}", e.destination),
        None => e.destination.clone(),
    };
    let mut s = format!(
        "{} {verdict:<7} {:<5} {dest:<21} {:<30} {}",
        e.timestamp.to_rfc3339_opts(SecondsFormat::Millis, true),
        e.protocol,
        e.name.as_deref().unwrap_or("-"),
        e.rule
    );
    if e.count > 1 {
        s.push_str(&format!(" x{}", e.count));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(ms: i64, name: Option<&str>, count: u32) -> EgressLogEntry {
        EgressLogEntry {
            timestamp: DateTime::from_timestamp_millis(ms).unwrap(),
            protocol: "tcp".into(),
            destination: "198.18.0.2".into(),
            port: Some(443),
            name: name.map(str::to_string),
            verdict: Verdict::Denied,
            rule: "denyOut".into(),
            count,
        }
    }

    #[test]
    fn lines_show_every_field_and_repeats() {
        let l = line(&entry(1_700_000_000_123, Some("a.test"), 3));
        assert!(
            l.starts_with("2023-11-14T22:13:20.123Z denied  tcp   198.18.0.2:443"),
            "{l}"
        );
        assert!(
            l.contains(" a.test ") && l.contains(" denyOut") && l.ends_with(" x3"),
            "{l}"
        );
        let mut e = entry(0, None, 1);
        e.port = None;
        e.protocol = "icmp".into();
        let l = line(&e);
        assert!(l.contains(" icmp  198.18.0.2 ") && l.contains(" - "), "{l}");
        assert!(!l.contains(" x1"), "{l}");
    }

    #[test]
    fn the_cursor_skips_what_was_printed() {
        let mut c = Cursor::default();
        assert_eq!(c.last, None);
        let (a, b, c2) = (
            entry(1000, Some("a"), 1),
            entry(1000, Some("b"), 1),
            entry(2000, None, 1),
        );
        assert!(c.is_new(&a) && c.is_new(&b));
        assert_eq!(c.last, DateTime::from_timestamp_millis(1000));
        // The next poll starts at 1000 again: a and b are not new.
        assert!(!c.is_new(&a) && !c.is_new(&b));
        assert!(c.is_new(&c2));
        assert!(!c.is_new(&a));
        assert!(!c.is_new(&c2));
    }
}
