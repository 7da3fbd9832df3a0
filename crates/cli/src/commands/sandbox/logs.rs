//! `arca sandbox logs ID`: `<timestamp> <line>` per log line; with `--json`,
//! one record per entry: `timestamp`, `level`, `message`, `fields`.

use std::process::ExitCode;

use arca_sdk::Client;

use crate::commands::{Ctx, EXIT_NOT_FOUND, block_on, out, out_json};

/// Options of `arca sandbox logs`.
#[derive(clap::Args, Debug)]
pub(crate) struct Args {
    /// Sandbox id.
    id: String,
}

pub(crate) fn run(args: &Args, client: &Client, ctx: &Ctx) -> anyhow::Result<ExitCode> {
    let logs = match block_on(client.logs(&args.id))? {
        Ok(l) => l,
        Err(e) if e.is_not_found() => {
            eprintln!(
                "arca: sandbox {} not found; see `arca sandbox list`",
                args.id
            );
            return Ok(ExitCode::from(EXIT_NOT_FOUND));
        }
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
