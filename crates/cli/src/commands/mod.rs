//! One module per subcommand, and what they share: the global options
//! ([`Ctx`]), the exit codes, JSON Lines output and a runtime to block on.
//!
//! Exit codes of every command but `arca sandbox exec`: 0 success, 1 not
//! found, 2 error. `--json` output is JSON Lines: one object per line, with
//! the fields each command documents (format version 1; fields may be added,
//! never renamed or removed).

pub(crate) mod bench;
pub(crate) mod cluster;
pub(crate) mod completion;
pub(crate) mod doctor;
pub(crate) mod keys;
pub(crate) mod node;
pub(crate) mod sandbox;
pub(crate) mod template;
pub(crate) mod up;

use std::io::Write as _;
use std::process::ExitCode;

/// Global options, parsed once.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Ctx {
    /// `--json`: JSON Lines on stdout instead of text.
    pub(crate) json: bool,
}

/// Exit code: the thing asked for does not exist.
pub(crate) const EXIT_NOT_FOUND: u8 = 1;
/// Exit code: any other error.
pub(crate) const EXIT_ERROR: u8 = 2;

/// Runs `f` on a fresh single-threaded runtime.
pub(crate) fn block_on<F: std::future::Future>(f: F) -> anyhow::Result<F::Output> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| anyhow::anyhow!("starting the async runtime: {e}"))?;
    Ok(rt.block_on(f))
}

/// Runs a server command's `f` on a multi-threaded runtime.
pub(crate) fn serve<F: std::future::Future<Output = anyhow::Result<ExitCode>>>(
    f: F,
) -> anyhow::Result<ExitCode> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| anyhow::anyhow!("starting the async runtime: {e}"))?
        .block_on(f)
}

/// The API's URL as clients reach it: `given`, else the listen address
/// (127.0.0.1 when it listens on all addresses).
pub(crate) fn public_url(given: Option<&str>, listen: std::net::SocketAddr) -> String {
    if let Some(url) = given {
        return url.to_string();
    }
    let mut addr = listen;
    if addr.ip().is_unspecified() {
        addr.set_ip(std::net::Ipv4Addr::LOCALHOST.into());
    }
    format!("http://{addr}")
}

/// Binds `addr` for `what`; a failure says which flag to change.
pub(crate) async fn listen(
    addr: std::net::SocketAddr,
    what: &str,
) -> anyhow::Result<tokio::net::TcpListener> {
    tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen on {addr} for {what}: {e}"))
}

/// Resolves on Ctrl-C or SIGTERM: how a server command is told to stop.
pub(crate) fn stop_signal() -> anyhow::Result<impl std::future::Future<Output = ()>> {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    Ok(async move {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
    })
}

/// Writes one line of data to stdout.
pub(crate) fn out(line: impl std::fmt::Display) -> std::io::Result<()> {
    let mut o = std::io::stdout().lock();
    writeln!(o, "{line}")?;
    o.flush()
}

/// Writes one JSON Lines record to stdout.
pub(crate) fn out_json(v: &serde_json::Value) -> std::io::Result<()> {
    out(v)
}

/// A closed stdout (`arca sandbox list | head -1`) ends the command quietly
/// and successfully; other results pass through.
pub(crate) fn quiet_pipe(r: anyhow::Result<ExitCode>) -> anyhow::Result<ExitCode> {
    match r {
        Err(e)
            if e.chain().any(|c| {
                c.downcast_ref::<std::io::Error>()
                    .is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
            }) =>
        {
            Ok(ExitCode::SUCCESS)
        }
        r => r,
    }
}

/// Parses `KEY=VALUE` (for `--metadata`, `--env`).
pub(crate) fn parse_kv(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_string(), v.to_string())),
        _ => Err(format!("expected KEY=VALUE, got '{s}'")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_values_split_at_the_first_equals() {
        assert_eq!(parse_kv("a=b=c"), Ok(("a".into(), "b=c".into())));
        assert_eq!(parse_kv("a="), Ok(("a".into(), String::new())));
        assert!(parse_kv("=b").is_err() && parse_kv("ab").is_err());
    }

    #[test]
    fn public_urls_default_to_a_reachable_listen_address() {
        let any = "0.0.0.0:3000".parse().unwrap();
        assert_eq!(public_url(None, any), "http://127.0.0.1:3000");
        assert_eq!(
            public_url(None, "10.0.0.2:3000".parse().unwrap()),
            "http://10.0.0.2:3000"
        );
        assert_eq!(
            public_url(Some("https://api.example"), any),
            "https://api.example"
        );
    }

    #[test]
    fn broken_pipes_end_quietly() {
        let e = anyhow::Error::new(std::io::Error::from(std::io::ErrorKind::BrokenPipe))
            .context("writing");
        assert!(quiet_pipe(Err(e)).is_ok());
        assert!(quiet_pipe(Err(anyhow::anyhow!("other"))).is_err());
    }
}
