//! `arca sandbox list`: a table of the team's sandboxes, newest first; with
//! `--json`, one record per sandbox with the API's `ListedSandbox` fields
//! (`sandboxID`, `templateID`, `state`, `startedAt`, `endAt`, `cpuCount`,
//! `memoryMB`, `diskSizeMB`, `envdVersion`, `metadata`; in cluster mode also
//! `nodeID` and `nodeStatus`).

use std::process::ExitCode;

use arca_sdk::Client;

use crate::commands::{Ctx, block_on, out, out_json};

/// Options of `arca sandbox list`.
#[derive(clap::Args, Debug)]
pub(crate) struct Args {}

pub(crate) fn run(_args: &Args, client: &Client, ctx: &Ctx) -> anyhow::Result<ExitCode> {
    let list = block_on(client.list())?.map_err(|e| super::explain(&e, client))?;
    if ctx.json {
        for s in &list {
            out_json(&serde_json::to_value(s)?)?;
        }
        return Ok(ExitCode::SUCCESS);
    }
    if list.is_empty() {
        eprintln!("arca: no sandboxes; make one with `arca sandbox create`");
        return Ok(ExitCode::SUCCESS);
    }
    out(format_args!(
        "{:<22} {:<10} {:<8} {:<20} {:<20} METADATA",
        "ID", "TEMPLATE", "STATE", "STARTED", "ENDS"
    ))?;
    for s in &list {
        let md: Vec<String> = s.metadata.iter().map(|(k, v)| format!("{k}={v}")).collect();
        // Cluster mode: a sandbox whose node is lost says so.
        let state = match s.node_status.as_deref() {
            Some("lost") => format!(
                "{} (node {} lost)",
                s.state,
                s.node_id.as_deref().unwrap_or("?")
            ),
            _ => s.state.clone(),
        };
        out(format_args!(
            "{:<22} {:<10} {:<8} {:<20} {:<20} {}",
            s.id,
            s.alias.as_deref().unwrap_or(&s.template_id),
            state,
            short_time(&s.started_at),
            short_time(&s.end_at),
            md.join(",")
        ))?;
    }
    Ok(ExitCode::SUCCESS)
}

/// `2026-01-01T10:00:00.123456Z` -> `2026-01-01 10:00:00`.
fn short_time(t: &str) -> String {
    let t = t.replacen('T', " ", 1);
    t.get(..19).map_or(t.clone(), str::to_string)
}

#[cfg(test)]
mod tests {
    #[test]
    fn times_are_shortened_to_seconds() {
        assert_eq!(
            super::short_time("2026-01-01T10:00:00.123456Z"),
            "2026-01-01 10:00:00"
        );
        assert_eq!(super::short_time("x"), "x");
    }
}
