//! `arca keys create [--team T]`: prints a new key. On a home without a
//! team yet it does what the first `arca up` does: makes the team `default`
//! and its first key, and saves that key to `$ARCA_HOME/api_key`.
//! With `--json`: `{"key", "team"}`.

use std::process::ExitCode;

use anyhow::Context as _;

use crate::commands::{Ctx, EXIT_NOT_FOUND, block_on, out, out_json};

/// Options of `arca keys create`.
#[derive(clap::Args, Debug)]
pub(crate) struct Args {
    /// Team (name or id) the key belongs to.
    #[arg(long, default_value = "default")]
    team: String,
}

pub(crate) fn run(args: &Args, at: &super::Where<'_>, ctx: &Ctx) -> anyhow::Result<ExitCode> {
    block_on(create(args, at, ctx))?
}

async fn create(args: &Args, at: &super::Where<'_>, ctx: &Ctx) -> anyhow::Result<ExitCode> {
    let store = super::open(at, true).await?;
    let mut team = args.team.as_str();
    let key = if let Some(first) = store.ensure_bootstrap().await? {
        let path = crate::commands::up::write_key(at.home, &first)?;
        eprintln!(
            "arca: created the team `default` and its first key, also saved to {}",
            path.display()
        );
        if args.team != "default" {
            eprintln!("arca: no team `{team}` exists; the key is for `default`");
            team = "default";
        }
        first
    } else {
        match store.create_key(&args.team).await {
            Ok(k) => k,
            Err(arca_api::ApiError::NotFound(m)) => {
                eprintln!("arca: {m}; see the teams in `arca keys list`");
                return Ok(ExitCode::from(EXIT_NOT_FOUND));
            }
            Err(e) => return Err(e).context("creating the key"),
        }
    };
    if ctx.json {
        out_json(&serde_json::json!({"key": key, "team": team}))?;
    } else {
        out(&key)?;
    }
    Ok(ExitCode::SUCCESS)
}
