//! `arca sandbox kill ID...`: kills each sandbox, going on past failures.
//! Exit code: 0 all killed, 1 some did not exist, 2 some other failure.
//! With `--json`, one record per id: `{"sandboxID", "killed", "error"?}`.

use std::process::ExitCode;

use arca_sdk::Client;

use crate::commands::{Ctx, EXIT_ERROR, EXIT_NOT_FOUND, block_on, out_json};

/// Options of `arca sandbox kill`.
#[derive(clap::Args, Debug)]
pub(crate) struct Args {
    /// Sandbox ids.
    #[arg(required = true)]
    ids: Vec<String>,
}

pub(crate) fn run(args: &Args, client: &Client, ctx: &Ctx) -> anyhow::Result<ExitCode> {
    let results = block_on(async {
        let mut r = Vec::new();
        for id in &args.ids {
            r.push((id, client.kill(id).await));
        }
        r
    })?;
    let mut code = 0;
    for (id, r) in results {
        let (killed, error) = match r {
            Ok(true) => (true, None),
            Ok(false) => {
                code = code.max(EXIT_NOT_FOUND);
                (false, Some(format!("sandbox {id} not found")))
            }
            Err(e) => {
                code = EXIT_ERROR;
                (false, Some(format!("{:#}", super::explain(&e, client))))
            }
        };
        if ctx.json {
            let mut v = serde_json::json!({"sandboxID": id, "killed": killed});
            if let Some(e) = &error {
                v["error"] = e.as_str().into();
            }
            out_json(&v)?;
        } else if let Some(e) = error {
            eprintln!("arca: {e}");
        } else {
            eprintln!("arca: killed {id}");
        }
    }
    if code == EXIT_NOT_FOUND && !ctx.json {
        eprintln!("arca: see `arca sandbox list` for the sandboxes there are");
    }
    Ok(ExitCode::from(code))
}
