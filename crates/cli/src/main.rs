//! `arca`: the command that runs and drives Arca.
//!
//! Exit codes: 0 success, 1 not found, 2 error.
#![forbid(unsafe_code)]

mod commands;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// Self-hosted, E2B-compatible sandboxes for AI agents.
#[derive(Parser, Debug)]
#[command(name = "arca", version)]
struct Cli {
    /// Print data as JSON Lines (one object per line) where a command
    /// supports it.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Start Arca on this machine with the embedded defaults.
    Up(commands::up::Args),
    /// Cluster mode: the E2B REST API over a shared database, placing
    /// sandboxes on registered nodes (no node of its own).
    Api(commands::cluster::ApiArgs),
    /// Cluster mode: the sandbox proxy, routing to the nodes' edges.
    Proxy(commands::cluster::ProxyArgs),
    /// Cluster mode: a node that runs sandboxes for an `arca api`.
    Node(commands::node::Args),
    /// Create, list, run commands in, and kill sandboxes (needs `arca up`).
    Sandbox(commands::sandbox::Args),
    /// Build templates from Dockerfiles, list and delete them (needs `arca up`).
    Template(commands::template::Args),
    /// Create, list and revoke API keys in $ARCA_HOME's database.
    Keys(commands::keys::Args),
    /// Check what this host has for running sandboxes, with fixes.
    Doctor(commands::doctor::Args),
    /// Print a shell completion script.
    Completion(commands::completion::Args),
    /// Measure create latency, command round trips, throughput and memory
    /// against baselines run in the same process.
    Bench(commands::bench::Args),
}

/// The entry point of a hidden helper subcommand (its exit status).
type Helper = fn() -> i32;

fn main() -> ExitCode {
    // The sandbox init runs in a fresh, single-threaded re-exec of this
    // binary: dispatch before anything can start a thread.
    let helpers: [(&str, Helper); 5] = [
        ("__init", arca_runtime::init_main),
        ("__restore", arca_runtime::restore_main),
        ("__gvisor", arca_runtime::gvisor_main),
        ("__vm", arca_runtime::vm_main),
        ("__apply", arca_runtime::apply_main),
    ];
    if let Some(arg) = std::env::args_os().nth(1) {
        if let Some((_, helper)) = helpers.iter().find(|(name, _)| arg == *name) {
            return ExitCode::from(u8::try_from(helper()).unwrap_or(2));
        }
    }
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("ARCA_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let ctx = commands::Ctx { json: cli.json };
    let result = match cli.command {
        Command::Up(args) => commands::up::run(&args),
        Command::Api(args) => commands::cluster::run_api(&args),
        Command::Proxy(args) => commands::cluster::run_proxy(&args),
        Command::Node(args) => commands::node::run(&args),
        Command::Sandbox(args) => commands::sandbox::run(&args, &ctx),
        Command::Template(args) => commands::template::run(&args, &ctx),
        Command::Keys(args) => commands::keys::run(&args, &ctx),
        Command::Doctor(args) => commands::doctor::run(&args, &ctx),
        Command::Completion(args) => {
            commands::completion::run(&args, <Cli as clap::CommandFactory>::command())
        }
        Command::Bench(args) => commands::bench::run(&args),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("arca: {e:#}");
            ExitCode::from(2)
        }
    }
}
