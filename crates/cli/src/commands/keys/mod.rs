//! `arca keys ...`: teams' API keys, straight in the database of
//! `$ARCA_HOME` or the one `--database-url` names (a cluster's; works
//! beside running servers, and without them; never touches sandboxes).

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
    /// A cluster's database (as `arca api --database-url`) instead of
    /// `$ARCA_HOME/arca.db`.
    #[arg(long, global = true, env = "ARCA_DATABASE_URL")]
    database_url: Option<String>,
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
    let at = Where {
        home: &args.home,
        url: args.database_url.as_deref(),
    };
    super::quiet_pipe(match &args.command {
        Command::Create(a) => create::run(a, &at, ctx),
        Command::List(a) => list::run(a, &at, ctx),
        Command::Revoke(a) => revoke::run(a, &at, ctx),
    })
}

/// Where the keys are: `home`'s SQLite file, or the database at `url`.
pub(crate) struct Where<'a> {
    pub(crate) home: &'a Path,
    url: Option<&'a str>,
}

fn database(home: &Path) -> PathBuf {
    home.join("arca.db")
}

/// Opens the key store; unless `create`, a SQLite file must exist.
async fn open(at: &Where<'_>, create: bool) -> anyhow::Result<KeyStore> {
    if let Some(url) = at.url {
        return arca_api::keys_only(url)
            .await
            .context("opening the database of --database-url");
    }
    let home = at.home;
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
