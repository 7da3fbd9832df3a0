//! `arca sandbox ...`: sandboxes through the REST API and envd, as any E2B
//! client does (the server must be running: `arca up`).

pub(crate) mod create;
pub(crate) mod exec;
pub(crate) mod kill;
pub(crate) mod list;
pub(crate) mod logs;

use std::path::PathBuf;
use std::process::ExitCode;

use arca_sdk::{Client, SdkError};

use super::Ctx;
use super::up::DEFAULT_HOME;

/// `arca sandbox`.
#[derive(clap::Args, Debug)]
pub(crate) struct Args {
    #[command(flatten)]
    client: ClientArgs,
    #[command(subcommand)]
    command: Command,
}

#[derive(clap::Subcommand, Debug)]
enum Command {
    /// Create a sandbox and print its id.
    Create(create::Args),
    /// List running and paused sandboxes.
    List(list::Args),
    /// Run a command in a sandbox; exits with the command's exit code
    /// (125 when arca itself fails).
    Exec(exec::Args),
    /// Print a sandbox's logs, or with --network its egress log.
    Logs(logs::Args),
    /// Kill sandboxes.
    Kill(kill::Args),
}

/// Where the API is and how to authenticate, as the E2B SDKs take it.
#[derive(clap::Args, Debug)]
pub(crate) struct ClientArgs {
    /// Control-plane URL.
    #[arg(long, global = true, env = "E2B_API_URL", default_value = arca_sdk::DEFAULT_API_URL)]
    api_url: String,
    /// API key; default: the key `arca up` saved in $ARCA_HOME/api_key.
    #[arg(long, global = true, env = "E2B_API_KEY", hide_env_values = true)]
    api_key: Option<String>,
    /// Sandbox proxy URL (envd traffic).
    #[arg(long, global = true, env = "E2B_SANDBOX_URL", default_value = arca_sdk::DEFAULT_SANDBOX_URL)]
    sandbox_url: String,
    /// Arca's state directory, read for the API key only.
    #[arg(long, global = true, env = "ARCA_HOME", default_value = DEFAULT_HOME)]
    home: PathBuf,
}

impl ClientArgs {
    pub(crate) fn client(&self) -> anyhow::Result<Client> {
        Client::resolve(
            Some(&self.api_url),
            self.api_key.as_deref().filter(|k| !k.is_empty()),
            Some(&self.sandbox_url),
            Some(&self.home),
        )
        .map_err(|e| anyhow::anyhow!("{e}"))
    }
}

pub(crate) fn run(args: &Args, ctx: &Ctx) -> anyhow::Result<ExitCode> {
    let client = || args.client.client();
    super::quiet_pipe(match &args.command {
        // Keeps 125 for its own failures: never returns an error.
        Command::Exec(a) => Ok(exec::run(a, &args.client)),
        Command::Create(a) => create::run(a, &client()?, ctx),
        Command::List(a) => list::run(a, &client()?, ctx),
        Command::Logs(a) => logs::run(a, &client()?, ctx),
        Command::Kill(a) => kill::run(a, &client()?, ctx),
    })
}

/// An SDK error for the user, with the next step.
pub(crate) fn explain(e: &SdkError, client: &Client) -> anyhow::Error {
    let hint = match e {
        SdkError::Transport { url, .. } if url.starts_with(client.api_url()) => format!(
            "; is Arca running? start it with `sudo arca up`, or point --api-url / E2B_API_URL at it (now {})",
            client.api_url()
        ),
        SdkError::Transport { .. } => format!(
            "; is the sandbox proxy at {} up? check --sandbox-url / E2B_SANDBOX_URL",
            client.sandbox_url()
        ),
        SdkError::Status { status: 401, .. } => {
            "; the API key was refused: set E2B_API_KEY to a valid key (`arca keys list`, `arca keys create`)".to_string()
        }
        SdkError::Status { status: 502, .. } => {
            "; the sandbox is gone or not reachable: see `arca sandbox list`".to_string()
        }
        _ => String::new(),
    };
    anyhow::anyhow!("{e}{hint}")
}
