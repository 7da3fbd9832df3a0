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
    let cli = Cli::parse();
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
