//! `arca up`: start Arca on this machine.
//!
//! Until the control plane and sandboxes land (issue 3), this starts one
//! `arca-envd` on the loopback-reachable envd port and prints the
//! environment for the E2B SDKs' envd-only (debug) mode.

use std::path::PathBuf;
use std::process::{Command, ExitCode};

use anyhow::{Context, bail};

/// Options of `arca up`.
#[derive(clap::Args, Debug)]
pub(crate) struct Args {
    /// The `arca-envd` binary; default: next to `arca`.
    #[arg(long, env = "ARCA_ENVD_BIN")]
    envd: Option<PathBuf>,
    /// Port envd listens on.
    #[arg(long, default_value_t = 49983)]
    envd_port: u16,
}

fn envd_binary(args: &Args) -> anyhow::Result<PathBuf> {
    if let Some(p) = &args.envd {
        return Ok(p.clone());
    }
    let me = std::env::current_exe().context("cannot find the arca binary's own path")?;
    let beside = me.with_file_name("arca-envd");
    if beside.is_file() {
        return Ok(beside);
    }
    bail!(
        "arca-envd not found next to {}; build it with `cargo build -p arca-envd` or pass --envd PATH",
        me.display()
    )
}

pub(crate) fn run(args: &Args) -> anyhow::Result<ExitCode> {
    let envd = envd_binary(args)?;
    eprintln!(
        "arca: starting {} on port {} (sandboxes are not available yet: envd-only mode)",
        envd.display(),
        args.envd_port
    );
    eprintln!("arca: point the E2B SDKs at it with:");
    eprintln!("  export E2B_DEBUG=true E2B_API_KEY=e2b_0000000000000000000000000000000000000000");
    if args.envd_port != 49983 {
        eprintln!(
            "  export E2B_SANDBOX_URL=http://127.0.0.1:{}",
            args.envd_port
        );
    }
    let status = Command::new(&envd)
        .args(["--port", &args.envd_port.to_string()])
        .status()
        .with_context(|| format!("cannot run {}", envd.display()))?;
    Ok(if status.success() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(2)
    })
}
