//! The seam to the kernel: every change goes through `ip` (iproute2) or
//! `nft` (nftables) run by a [`Cmd`], plus one sysctl write. The real runner
//! spawns the programs; tests use `testing::RecordingRunner`.
//!
//! Shelling out costs about 1 ms per process, small next to the kernel's
//! own 10-30 ms per netns, and keeps netlink crates out of the build. The
//! pool batches the per-slot steps (`ip -batch -`) to two processes.

use std::fmt;
use std::future::Future;
use std::io;
use std::path::PathBuf;
use std::pin::Pin;
use std::process::Stdio;

use tokio::io::AsyncWriteExt as _;

/// A boxed future, so [`Cmd`] can be used as `dyn Cmd`.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// The programs the pool runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Program {
    /// `ip` from iproute2.
    Ip,
    /// `nft` from nftables.
    Nft,
}

impl Program {
    /// The program's name, as looked up in `PATH`.
    pub fn name(self) -> &'static str {
        match self {
            Self::Ip => "ip",
            Self::Nft => "nft",
        }
    }

    /// The Debian package providing it.
    pub fn package(self) -> &'static str {
        match self {
            Self::Ip => "iproute2",
            Self::Nft => "nftables",
        }
    }
}

/// One run of a program: arguments and what to feed on stdin.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Invocation {
    /// Which program.
    pub program: Program,
    /// Its arguments, without the program name.
    pub args: Vec<String>,
    /// Written to its stdin, which is then closed (`ip -batch -`, `nft -f -`).
    pub stdin: Option<String>,
}

impl Invocation {
    pub(crate) fn new(program: Program, args: &[&str]) -> Self {
        Self {
            program,
            args: args.iter().map(|&a| a.to_owned()).collect(),
            stdin: None,
        }
    }

    pub(crate) fn with_stdin(mut self, stdin: String) -> Self {
        self.stdin = Some(stdin);
        self
    }

    /// The command line without stdin: `ip -n arca-0 -batch -`.
    pub fn command_line(&self) -> String {
        let mut s = self.program.name().to_owned();
        for a in &self.args {
            s.push(' ');
            s.push_str(a);
        }
        s
    }
}

/// The command line, then stdin's lines joined with `; ` in brackets, so a
/// failed batch is readable on one line of an error chain.
impl fmt::Display for Invocation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.command_line())?;
        if let Some(stdin) = &self.stdin {
            let lines: Vec<&str> = stdin
                .lines()
                .map(str::trim)
                .filter(|l| !l.is_empty())
                .collect();
            write!(f, " [{}]", lines.join("; "))?;
        }
        Ok(())
    }
}

/// Why running a command did not succeed.
#[derive(Debug, thiserror::Error)]
pub enum CmdError {
    /// The program is not installed (or not in `PATH`).
    #[error(
        "`{program}` not found: install {package} (iproute2 and nftables are both needed), or run scripts/setup.sh"
    )]
    NotFound {
        /// Program name.
        program: &'static str,
        /// Debian package to install.
        package: &'static str,
        /// The spawn error.
        #[source]
        source: io::Error,
    },
    /// Spawning or talking to the process failed.
    #[error("could not run `{command}`")]
    Spawn {
        /// The invocation, as displayed.
        command: String,
        /// What went wrong.
        #[source]
        source: io::Error,
    },
    /// The program ran and exited unsuccessfully.
    #[error("`{command}` failed ({status}): {stderr}")]
    Failed {
        /// The invocation, as displayed.
        command: String,
        /// Exit status as displayed (`exit status: 2`).
        status: String,
        /// Its stderr, trimmed.
        stderr: String,
    },
    /// The kernel refused a netlink request (nf_tables set elements, sent
    /// without `nft`).
    #[error("the kernel refused `{request}`")]
    Netlink {
        /// The request, as the equivalent `nft` commands.
        request: String,
        /// The kernel's errno, with the refused command.
        #[source]
        source: io::Error,
    },
    /// Writing `/proc/sys/...` failed.
    #[error("could not set sysctl {key}")]
    Sysctl {
        /// Dotted key (`net.ipv4.ip_forward`).
        key: String,
        /// The write error.
        #[source]
        source: io::Error,
    },
}

impl CmdError {
    /// Stderr of a failed command, empty for other errors.
    pub fn stderr(&self) -> &str {
        match self {
            Self::Failed { stderr, .. } => stderr,
            _ => "",
        }
    }
}

/// Runs `ip` and `nft` and writes sysctls: the pool's only way to touch the
/// host. Implementations must be usable from any thread.
pub trait Cmd: Send + Sync + fmt::Debug + 'static {
    /// Runs `invocation` to completion; its stdout on exit status 0,
    /// [`CmdError::Failed`] otherwise.
    fn run<'a>(&'a self, invocation: &'a Invocation) -> BoxFuture<'a, Result<String, CmdError>>;

    /// Sets the sysctl `key` (dotted, `net.ipv4.ip_forward`) to `value`.
    fn set_sysctl<'a>(
        &'a self,
        key: &'a str,
        value: &'a str,
    ) -> BoxFuture<'a, Result<(), CmdError>>;
}

/// The real [`Cmd`]: spawns the programs with `LC_ALL=C` (the pool reads
/// their error messages) and writes sysctls under `/proc/sys`.
#[derive(Debug, Clone)]
pub struct SystemRunner {
    ip: PathBuf,
    nft: PathBuf,
    proc_sys: PathBuf,
}

impl Default for SystemRunner {
    fn default() -> Self {
        Self {
            ip: PathBuf::from("ip"),
            nft: PathBuf::from("nft"),
            proc_sys: PathBuf::from("/proc/sys"),
        }
    }
}

impl SystemRunner {
    /// `ip` and `nft` from `PATH`, sysctls in `/proc/sys`.
    pub fn new() -> Self {
        Self::default()
    }

    /// Uses `path` for the program (a path or a name looked up in `PATH`).
    pub fn program(mut self, program: Program, path: impl Into<PathBuf>) -> Self {
        match program {
            Program::Ip => self.ip = path.into(),
            Program::Nft => self.nft = path.into(),
        }
        self
    }

    /// Writes sysctls below `dir` instead of `/proc/sys`.
    pub fn proc_sys(mut self, dir: impl Into<PathBuf>) -> Self {
        self.proc_sys = dir.into();
        self
    }

    async fn run_inner(&self, inv: &Invocation) -> Result<String, CmdError> {
        let path = match inv.program {
            Program::Ip => &self.ip,
            Program::Nft => &self.nft,
        };
        let spawn_error = |source: io::Error| {
            if source.kind() == io::ErrorKind::NotFound {
                CmdError::NotFound {
                    program: inv.program.name(),
                    package: inv.program.package(),
                    source,
                }
            } else {
                CmdError::Spawn {
                    command: inv.to_string(),
                    source,
                }
            }
        };
        let mut child = tokio::process::Command::new(path)
            .args(&inv.args)
            .env("LC_ALL", "C")
            .stdin(if inv.stdin.is_some() {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(spawn_error)?;
        if let (Some(input), Some(mut pipe)) = (&inv.stdin, child.stdin.take()) {
            // A program that exits early closes the pipe: its exit status
            // and stderr say why, so a write error here is not the story.
            let _ = pipe.write_all(input.as_bytes()).await;
            drop(pipe);
        }
        let out = child
            .wait_with_output()
            .await
            .map_err(|source| CmdError::Spawn {
                command: inv.to_string(),
                source,
            })?;
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).into_owned())
        } else {
            Err(CmdError::Failed {
                command: inv.to_string(),
                status: out.status.to_string(),
                stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
            })
        }
    }
}

impl Cmd for SystemRunner {
    fn run<'a>(&'a self, invocation: &'a Invocation) -> BoxFuture<'a, Result<String, CmdError>> {
        Box::pin(self.run_inner(invocation))
    }

    fn set_sysctl<'a>(
        &'a self,
        key: &'a str,
        value: &'a str,
    ) -> BoxFuture<'a, Result<(), CmdError>> {
        Box::pin(async move {
            let path = self.proc_sys.join(key.replace('.', "/"));
            tokio::fs::write(&path, value)
                .await
                .map_err(|source| CmdError::Sysctl {
                    key: key.to_owned(),
                    source,
                })
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn invocations_display_stdin_on_one_line() {
        let inv = Invocation::new(Program::Ip, &["-n", "arca-0", "-batch", "-"])
            .with_stdin("link set lo up\n\nroute add default via 10.0.0.1\n".into());
        assert_eq!(inv.command_line(), "ip -n arca-0 -batch -");
        assert_eq!(
            inv.to_string(),
            "ip -n arca-0 -batch - [link set lo up; route add default via 10.0.0.1]"
        );
    }

    #[tokio::test]
    async fn a_missing_program_gets_an_operator_hint() {
        let runner = SystemRunner::new().program(Program::Nft, "/nonexistent/nft");
        let err = runner
            .run(&Invocation::new(Program::Nft, &["list", "tables"]))
            .await
            .unwrap_err();
        assert!(
            matches!(err, CmdError::NotFound { program: "nft", .. }),
            "{err:?}"
        );
        let msg = err.to_string();
        assert!(msg.contains("install nftables"), "{msg}");
        assert!(msg.contains("scripts/setup.sh"), "{msg}");
    }

    #[tokio::test]
    async fn exit_status_and_stderr_are_reported() {
        // `sh` stands in for `ip`: the runner does not care what the program is.
        let runner = SystemRunner::new().program(Program::Ip, "sh");
        let ok = Invocation::new(Program::Ip, &["-c", "cat; echo out"]).with_stdin("in\n".into());
        assert_eq!(runner.run(&ok).await.unwrap(), "in\nout\n");
        let bad = Invocation::new(Program::Ip, &["-c", "echo oops >&2; exit 3"]);
        let err = runner.run(&bad).await.unwrap_err();
        assert_eq!(err.stderr(), "oops");
        assert!(err.to_string().contains("exit status: 3"), "{err}");
    }

    #[tokio::test]
    async fn sysctls_are_written_below_the_configured_root() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("net/ipv4")).unwrap();
        let runner = SystemRunner::new().proc_sys(dir.path());
        runner.set_sysctl("net.ipv4.ip_forward", "1").await.unwrap();
        let got = std::fs::read_to_string(dir.path().join("net/ipv4/ip_forward")).unwrap();
        assert_eq!(got, "1");
    }
}
