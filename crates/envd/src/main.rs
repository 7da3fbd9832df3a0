//! `arca-envd`: the agent that runs as PID 1 in every Arca sandbox.

use std::net::{Ipv4Addr, SocketAddr};
use std::time::Duration;

use clap::Parser;
use tokio::signal::unix::{SignalKind, signal};

/// E2B-compatible envd: commands, terminals, files and watches over Connect.
#[derive(Parser, Debug)]
#[command(name = "arca-envd", version)]
struct Args {
    /// TCP port to listen on (all IPv4 addresses).
    #[arg(long, default_value_t = arca_envd::DEFAULT_PORT)]
    port: u16,
    /// Log filter, such as `info` or `arca_envd=debug`.
    #[arg(long, default_value = "warn", env = "ARCA_ENVD_LOG")]
    log_level: String,
    /// Seconds processes get to exit after SIGTERM when envd shuts down.
    #[arg(long, default_value_t = 5)]
    shutdown_grace_secs: u64,
}

fn main() -> std::process::ExitCode {
    // PID 1 of a VM (the initramfs' /init): boot the guest first. The kernel
    // hands init its unknown command-line words as arguments: ignore them.
    let vm = arca_envd::vminit::is_vm_init();
    let args = if vm {
        arca_envd::vminit::boot();
        Args::parse_from(["arca-envd"])
    } else {
        Args::parse()
    };
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new(&args.log_level))
        .with_writer(std::io::stderr)
        .init();
    // New files are 0644 and directories 0755, whoever envd runs as.
    nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o022));
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("arca-envd: cannot start the async runtime: {e}");
            return std::process::ExitCode::from(2);
        }
    };
    let result = runtime.block_on(run(args));
    if vm {
        // A VM's init must not exit (the kernel would panic): power off.
        if let Err(e) = &result {
            eprintln!("arca-envd: {e}");
        }
        arca_envd::vminit::power_off();
    }
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("arca-envd: {e}");
            std::process::ExitCode::from(2)
        }
    }
}

async fn run(args: Args) -> std::io::Result<()> {
    let addr = SocketAddr::from((Ipv4Addr::UNSPECIFIED, args.port));
    let listener = tokio::net::TcpListener::bind(addr).await.map_err(|e| {
        std::io::Error::new(
            e.kind(),
            format!("cannot listen on {addr}: {e}; is another envd running? pick another --port"),
        )
    })?;
    let envd = arca_envd::Envd::new(arca_envd::EnvdConfig::default());
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let mut hup = signal(SignalKind::hangup())?;
    let server = tokio::spawn(envd.clone().serve(listener));
    tokio::select! {
        r = server => return r.map_err(std::io::Error::other)?,
        _ = term.recv() => {}
        _ = int.recv() => {}
        _ = hup.recv() => {}
    }
    // PID 1 duty: pass the termination on to every process, then exit.
    envd.terminate_all(Duration::from_secs(args.shutdown_grace_secs))
        .await;
    Ok(())
}
