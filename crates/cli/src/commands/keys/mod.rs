//! `arca keys ...`: teams' API keys, straight in the database of
//! `$ARCA_HOME` (works beside a running `arca up`, and without one; never
//! touches sandboxes).

pub(crate) mod create;
pub(crate) mod list;
pub(crate) mod revoke;

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context as _;
use arca_api::KeyStore;

use super::Ctx;
use super::up::DEFAULT_HOME;

/// `arca keys`.
#[derive(clap::Args, Debug)]
pub(crate) struct Args {
    /// Arca's state directory (holds arca.db).
    #[arg(long, global = true, env = "ARCA_HOME", default_value = DEFAULT_HOME)]
    home: PathBuf,
    #[command(subcommand)]
    command: Command,
}

#[derive(clap::Subcommand, Debug)]
enum Command {
    /// Create an API key and print it (the only time it is shown).
    Create(create::Args),
    /// List API keys (masked), revoked ones included.
    List(list::Args),
    /// Revoke API keys by id.
    Revoke(revoke::Args),
}

pub(crate) fn run(args: &Args, ctx: &Ctx) -> anyhow::Result<ExitCode> {
    super::quiet_pipe(match &args.command {
        Command::Create(a) => create::run(a, &args.home, ctx),
        Command::List(a) => list::run(a, &args.home, ctx),
        Command::Revoke(a) => revoke::run(a, &args.home, ctx),
    })
}

fn database(home: &Path) -> PathBuf {
    home.join("arca.db")
}

/// Opens the key store of `home`; unless `create`, the database must exist.
async fn open(home: &Path, create: bool) -> anyhow::Result<KeyStore> {
    let db = database(home);
    if !create && !db.is_file() {
        anyhow::bail!(
            "no Arca database at {}; pass --home (or ARCA_HOME) of your `arca up`, or create a key with `arca keys create`",
            db.display()
        );
    }
    arca_api::keys_only(&format!("sqlite:{}", db.display()))
        .await
        .with_context(|| {
            format!(
                "opening {} (are you root? `arca up` keeps it under {DEFAULT_HOME} by default)",
                db.display()
            )
        })
}
