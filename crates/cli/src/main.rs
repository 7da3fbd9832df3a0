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
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Start Arca on this machine with the embedded defaults.
    Up(commands::up::Args),
}

fn main() -> ExitCode {
    // The sandbox init runs in a fresh, single-threaded re-exec of this
    // binary: dispatch before anything can start a thread.
    if std::env::args_os().nth(1).is_some_and(|a| a == "__init") {
        let code = arca_runtime::init_main();
        return ExitCode::from(u8::try_from(code).unwrap_or(2));
    }
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("ARCA_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let result = match cli.command {
        Command::Up(args) => commands::up::run(&args),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("arca: {e:#}");
            ExitCode::from(2)
        }
    }
}
