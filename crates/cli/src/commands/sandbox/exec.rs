//! `arca sandbox exec ID -- CMD...`: runs a command in a sandbox with
//! `/bin/bash -l -c` (as the E2B SDKs' `commands.run`), streaming its stdout
//! and stderr to ours.
//!
//! Exit code: the command's own; 128 + N when a signal N ended it (255 when
//! the signal is not known); 125 when arca itself failed (no such sandbox,
//! server unreachable, broken stream).

use std::collections::BTreeMap;
use std::process::ExitCode;
use std::time::Duration;

use arca_sdk::{RunOptions, SdkError};

use super::ClientArgs;
use crate::commands::{block_on, parse_kv};

/// Exit code of `arca sandbox exec` when arca itself fails.
pub(crate) const EXIT_ARCA_FAILED: u8 = 125;

/// Options of `arca sandbox exec`.
#[derive(clap::Args, Debug)]
pub(crate) struct Args {
    /// Sandbox id.
    id: String,
    /// Unix user to run as (default: the sandbox's, `user` in `base`).
    #[arg(long, short)]
    user: Option<String>,
    /// Working directory (default: the user's home).
    #[arg(long, short = 'w')]
    cwd: Option<String>,
    /// An environment variable for this command, KEY=VALUE (repeatable).
    #[arg(long = "env", short, value_parser = parse_kv)]
    env: Vec<(String, String)>,
    /// Kill the command after this many seconds (0: never).
    #[arg(long, default_value_t = 0)]
    timeout: u64,
    /// The command. One argument is a shell command line as is (`'ls | wc
    /// -l'`); several are quoted into one (`ls -la /tmp`).
    #[arg(last = true, required = true)]
    cmd: Vec<String>,
}

pub(crate) fn run(args: &Args, client_args: &ClientArgs) -> ExitCode {
    match exec(args, client_args) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("arca: {e:#}");
            ExitCode::from(EXIT_ARCA_FAILED)
        }
    }
}

fn exec(args: &Args, client_args: &ClientArgs) -> anyhow::Result<ExitCode> {
    let client = client_args.client()?;
    let opts = RunOptions {
        envs: args.env.iter().cloned().collect::<BTreeMap<_, _>>(),
        cwd: args.cwd.clone(),
        user: args.user.clone(),
        timeout: (args.timeout > 0).then(|| Duration::from_secs(args.timeout)),
    };
    let cmd = command_line(&args.cmd);
    let result = block_on(async {
        let info = client.get(&args.id).await?;
        let (mut stdout, mut stderr) = (std::io::stdout(), std::io::stderr());
        client
            .run_to(&info.sandbox(), &cmd, &opts, &mut stdout, &mut stderr)
            .await
    })?;
    match result {
        Ok(status) => {
            if !status.exited {
                eprintln!("arca: the command ended: {}", status.status);
            }
            Ok(ExitCode::from(exit_code(&status)))
        }
        // Our stdout went away (`| head`): stop quietly.
        Err(SdkError::Output(e)) if e.kind() == std::io::ErrorKind::BrokenPipe => {
            Ok(ExitCode::SUCCESS)
        }
        Err(e) if e.is_not_found() && matches!(e, SdkError::Status { .. }) => Err(anyhow::anyhow!(
            "sandbox {} not found; see `arca sandbox list`",
            args.id
        )),
        Err(e) => Err(super::explain(&e, &client)),
    }
}

/// The shell command line: one argument as is, several quoted and joined.
fn command_line(cmd: &[String]) -> String {
    if let [one] = cmd {
        return one.clone();
    }
    cmd.iter().map(|a| quote(a)).collect::<Vec<_>>().join(" ")
}

/// Quotes a word for bash when it needs it.
fn quote(a: &str) -> String {
    let plain = !a.is_empty()
        && a.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_./=:,+@%".contains(&b));
    if plain {
        a.to_string()
    } else {
        format!("'{}'", a.replace('\'', r"'\''"))
    }
}

/// The process's exit code as ours.
fn exit_code(s: &arca_sdk::ExitStatus) -> u8 {
    if s.exited {
        return u8::try_from(s.exit_code).unwrap_or(255);
    }
    let signal = s.status.strip_prefix("signal: ").unwrap_or("");
    let n: u8 = match signal {
        "hangup" => 1,
        "interrupt" => 2,
        "quit" => 3,
        "aborted" => 6,
        "killed" => 9,
        "segmentation fault" => 11,
        "broken pipe" => 13,
        "alarm clock" => 14,
        "terminated" => 15,
        _ => return 255,
    };
    128 + n
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_argument_is_a_command_line_several_are_quoted() {
        let v = |a: &[&str]| command_line(&a.iter().map(|s| s.to_string()).collect::<Vec<_>>());
        assert_eq!(v(&["ls | wc -l"]), "ls | wc -l");
        assert_eq!(v(&["ls", "-la", "/tmp"]), "ls -la /tmp");
        assert_eq!(
            v(&["echo", "a b", "it's", "$HOME", ""]),
            r"echo 'a b' 'it'\''s' '$HOME' ''"
        );
    }

    #[test]
    fn exit_codes_pass_through_and_signals_become_128_plus_n() {
        let st = |code, exited, status: &str| arca_sdk::ExitStatus {
            exit_code: code,
            exited,
            status: status.into(),
            error: None,
            pid: 1,
        };
        assert_eq!(exit_code(&st(0, true, "exit status 0")), 0);
        assert_eq!(exit_code(&st(3, true, "exit status 3")), 3);
        assert_eq!(exit_code(&st(-1, false, "signal: killed")), 137);
        assert_eq!(exit_code(&st(-1, false, "signal: terminated")), 143);
        assert_eq!(exit_code(&st(-1, false, "weird")), 255);
    }
}
