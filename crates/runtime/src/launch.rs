//! The node's side of starting a sandbox: run `arca __init` with the
//! config on its stdin and read the sandbox's PID 1 from its stdout.

use std::io::{Read, Write};
use std::path::Path;
use std::process::{Command, Stdio};

use crate::RuntimeError;
use crate::config::InitConfig;

/// Starts a sandbox by re-executing `init_exe __init` (normally the `arca`
/// binary itself). Blocking: call it from a blocking thread. Returns the host
/// pid of the sandbox's PID 1 (envd), which is not a child of the caller.
pub fn launch(init_exe: &Path, config: &InitConfig) -> Result<i32, RuntimeError> {
    run_helper(init_exe, "__init", config)
}

/// Runs `exe <command>` (a hidden subcommand of the `arca` binary) with
/// `config` as JSON on its stdin, and reads `{"pid": N}` or
/// `{"error": "..."}` from its stdout.
pub(crate) fn run_helper(
    init_exe: &Path,
    command: &str,
    config: &impl serde::Serialize,
) -> Result<i32, RuntimeError> {
    let json = serde_json::to_vec(config).map_err(|e| RuntimeError::Init(e.to_string()))?;
    let mut child = Command::new(init_exe)
        .arg(command)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .env_clear()
        .spawn()
        .map_err(|source| RuntimeError::Spawn {
            exe: init_exe.to_path_buf(),
            source,
        })?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin
            .write_all(&json)
            .map_err(|e| RuntimeError::Init(format!("sending the init config: {e}")))?;
    }
    let mut out = String::new();
    if let Some(mut stdout) = child.stdout.take() {
        let _ = stdout.read_to_string(&mut out);
    }
    let status = child
        .wait()
        .map_err(|e| RuntimeError::Init(format!("waiting for init: {e}")))?;
    let line: serde_json::Value = serde_json::from_str(out.trim()).map_err(|_| {
        RuntimeError::Init(format!(
            "init exited with {status} and printed no result: {out:?}"
        ))
    })?;
    if let Some(pid) = line.get("pid").and_then(serde_json::Value::as_i64) {
        return i32::try_from(pid).map_err(|_| RuntimeError::Init(format!("bad pid {pid}")));
    }
    Err(RuntimeError::Init(
        line.get("error")
            .and_then(|e| e.as_str())
            .unwrap_or("init failed without a message")
            .to_string(),
    ))
}

/// The body of a helper subcommand (`arca __gvisor`, `arca __vm`): reads
/// its JSON config from stdin, runs `run`, prints `{"pid": N}` or
/// `{"error": "..."}` for [`run_helper`] and returns the exit status.
pub(crate) fn helper_main<T: serde::de::DeserializeOwned>(
    run: impl FnOnce(&T) -> Result<i32, String>,
) -> i32 {
    let mut input = String::new();
    let result = std::io::stdin()
        .read_to_string(&mut input)
        .map_err(|e| format!("reading the config: {e}"))
        .and_then(|_| serde_json::from_str::<T>(&input).map_err(|e| format!("bad config: {e}")))
        .and_then(|cfg| run(&cfg));
    let (line, code) = match result {
        Ok(pid) => (serde_json::json!({ "pid": pid }), 0),
        Err(e) => (serde_json::json!({ "error": e }), 1),
    };
    let mut out = std::io::stdout();
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
    code
}

/// Moves the calling process into the cgroup directories `dirs`.
pub(crate) fn join_cgroups(dirs: &[std::path::PathBuf]) -> Result<(), String> {
    let me = std::process::id().to_string();
    for dir in dirs {
        std::fs::write(dir.join("cgroup.procs"), &me)
            .map_err(|e| format!("joining cgroup {}: {e}", dir.display()))?;
    }
    Ok(())
}

/// Moves the calling process into a mount namespace of its own whose
/// mounts propagate nowhere.
pub(crate) fn private_mounts() -> Result<(), String> {
    use nix::mount::{MsFlags, mount};
    nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNS)
        .map_err(|e| format!("unshare mount namespace: {e}"))?;
    mount(
        None::<&str>,
        "/",
        None::<&str>,
        MsFlags::MS_REC | MsFlags::MS_PRIVATE,
        None::<&str>,
    )
    .map_err(|e| format!("making mounts private: {e}"))
}
