//! `arca keys list`: a table of keys (never the keys themselves, only a
//! mask). With `--json`, one record per key: `id`, `teamId`, `team`,
//! `mask`, `createdAt`, `revoked`.

use std::process::ExitCode;

use crate::commands::{Ctx, block_on, out, out_json};

/// Options of `arca keys list`.
#[derive(clap::Args, Debug)]
pub(crate) struct Args {}

pub(crate) fn run(_args: &Args, at: &super::Where<'_>, ctx: &Ctx) -> anyhow::Result<ExitCode> {
    let keys = block_on(async {
        super::open(at, false)
            .await?
            .list_keys()
            .await
            .map_err(anyhow::Error::from)
    })??;
    if ctx.json {
        for k in &keys {
            out_json(&serde_json::json!({
                "id": k.id,
                "teamId": k.team_id,
                "team": k.team,
                "mask": k.mask,
                "createdAt": k.created_at.to_rfc3339(),
                "revoked": k.revoked,
            }))?;
        }
        return Ok(ExitCode::SUCCESS);
    }
    if keys.is_empty() {
        eprintln!("arca: no API keys; make one with `arca keys create`");
        return Ok(ExitCode::SUCCESS);
    }
    out(format_args!(
        "{:<36} {:<12} {:<16} {:<20} STATUS",
        "ID", "TEAM", "KEY", "CREATED"
    ))?;
    for k in &keys {
        out(format_args!(
            "{:<36} {:<12} {:<16} {:<20} {}",
            k.id,
            k.team,
            k.mask,
            k.created_at.format("%Y-%m-%d %H:%M:%S"),
            if k.revoked { "revoked" } else { "active" }
        ))?;
    }
    Ok(ExitCode::SUCCESS)
}
