//! `arca keys revoke ID...`: revokes keys by id (from `arca keys list`),
//! going on past failures. Exit code: 0 all revoked, 1 some did not exist,
//! 2 some other failure. With `--json`: `{"id", "revoked", "error"?}` each.

use std::process::ExitCode;

use crate::commands::{Ctx, EXIT_ERROR, EXIT_NOT_FOUND, block_on, out_json};

/// Options of `arca keys revoke`.
#[derive(clap::Args, Debug)]
pub(crate) struct Args {
    /// Key ids (the ID column of `arca keys list`).
    #[arg(required = true)]
    ids: Vec<String>,
}

pub(crate) fn run(args: &Args, at: &super::Where<'_>, ctx: &Ctx) -> anyhow::Result<ExitCode> {
    let results = block_on(async {
        let store = super::open(at, false).await?;
        let mut r = Vec::new();
        for id in &args.ids {
            r.push((id, store.revoke_key(id).await));
        }
        Ok::<_, anyhow::Error>(r)
    })??;
    let mut code = 0;
    for (id, r) in results {
        let error = match r {
            Ok(()) => None,
            Err(arca_api::ApiError::NotFound(_)) => {
                code = code.max(EXIT_NOT_FOUND);
                Some(format!("API key {id} not found; see `arca keys list`"))
            }
            Err(e) => {
                code = EXIT_ERROR;
                Some(format!(
                    "revoking API key {id}: {:#}",
                    anyhow::Error::from(e)
                ))
            }
        };
        if ctx.json {
            let mut v = serde_json::json!({"id": id, "revoked": error.is_none()});
            if let Some(e) = &error {
                v["error"] = e.as_str().into();
            }
            out_json(&v)?;
        } else if let Some(e) = error {
            eprintln!("arca: {e}");
        } else {
            eprintln!("arca: revoked {id}");
        }
    }
    Ok(ExitCode::from(code))
}
