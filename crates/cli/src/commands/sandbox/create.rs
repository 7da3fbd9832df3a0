//! `arca sandbox create`: prints the new sandbox's id (with `--json`, one
//! record with the API's `Sandbox` fields: `sandboxID`, `templateID`,
//! `envdVersion`, `envdAccessToken`, ...).

use std::collections::BTreeMap;
use std::process::ExitCode;

use arca_sdk::Client;

use crate::commands::{Ctx, EXIT_NOT_FOUND, block_on, out, out_json, parse_kv};

/// Options of `arca sandbox create`.
#[derive(clap::Args, Debug)]
pub(crate) struct Args {
    /// Template id or alias.
    #[arg(long, short, default_value = "base")]
    template: String,
    /// Seconds the sandbox lives (the server's default, 300, when unset).
    #[arg(long)]
    timeout: Option<u64>,
    /// A label, KEY=VALUE (repeatable).
    #[arg(long = "metadata", short, value_parser = parse_kv)]
    metadata: Vec<(String, String)>,
    /// An environment variable for every process in the sandbox, KEY=VALUE
    /// (repeatable).
    #[arg(long = "env", short, value_parser = parse_kv)]
    env: Vec<(String, String)>,
}

pub(crate) fn run(args: &Args, client: &Client, ctx: &Ctx) -> anyhow::Result<ExitCode> {
    let metadata: BTreeMap<_, _> = args.metadata.iter().cloned().collect();
    let envs: BTreeMap<_, _> = args.env.iter().cloned().collect();
    let r = block_on(client.create(&args.template, args.timeout, &metadata, &envs))?;
    match r {
        Ok(sb) if ctx.json => out_json(&serde_json::to_value(&sb)?)?,
        Ok(sb) => out(&sb.id)?,
        Err(e) if e.is_not_found() => {
            eprintln!(
                "arca: {e}; see the templates this server has (the `base` template is built by `arca up`)"
            );
            return Ok(ExitCode::from(EXIT_NOT_FOUND));
        }
        Err(e) => return Err(super::explain(&e, client)),
    }
    Ok(ExitCode::SUCCESS)
}
