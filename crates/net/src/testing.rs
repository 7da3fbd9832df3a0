//! Test helpers: a [`Cmd`] that records what the pool would run.

use std::collections::HashMap;
use std::sync::{Mutex, MutexGuard, PoisonError};

use crate::cmd::{BoxFuture, Cmd, CmdError, Invocation};

/// One recorded call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Recorded {
    /// [`Cmd::run`].
    Run(Invocation),
    /// [`Cmd::set_sysctl`].
    Sysctl {
        /// Dotted key.
        key: String,
        /// Value written.
        value: String,
    },
}

/// A [`Cmd`] that runs nothing: it records every call and answers with
/// empty stdout, or with what [`respond`](Self::respond) /
/// [`fail`](Self::fail) set up for that command line.
#[derive(Debug, Default)]
pub struct RecordingRunner {
    log: Mutex<Vec<Recorded>>,
    answers: Mutex<HashMap<String, Result<String, String>>>,
}

impl RecordingRunner {
    /// An empty recorder.
    pub fn new() -> Self {
        Self::default()
    }

    /// From now on, `command_line` (as [`Invocation::command_line`]) prints `stdout`.
    pub fn respond(&self, command_line: &str, stdout: &str) {
        lock(&self.answers).insert(command_line.to_owned(), Ok(stdout.to_owned()));
    }

    /// From now on, `command_line` exits with status 1 and `stderr`.
    pub fn fail(&self, command_line: &str, stderr: &str) {
        lock(&self.answers).insert(command_line.to_owned(), Err(stderr.to_owned()));
    }

    /// Every call so far.
    pub fn recorded(&self) -> Vec<Recorded> {
        lock(&self.log).clone()
    }

    /// Every call so far, one line each: the [`Invocation`]'s `Display`
    /// (stdin lines joined in brackets) or `sysctl key=value`.
    pub fn lines(&self) -> Vec<String> {
        lock(&self.log)
            .iter()
            .map(|r| match r {
                Recorded::Run(inv) => inv.to_string(),
                Recorded::Sysctl { key, value } => format!("sysctl {key}={value}"),
            })
            .collect()
    }

    /// Forgets the calls recorded so far.
    pub fn clear(&self) {
        lock(&self.log).clear();
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Cmd for RecordingRunner {
    fn run<'a>(&'a self, invocation: &'a Invocation) -> BoxFuture<'a, Result<String, CmdError>> {
        lock(&self.log).push(Recorded::Run(invocation.clone()));
        let answer = lock(&self.answers)
            .get(&invocation.command_line())
            .cloned()
            .unwrap_or_else(|| Ok(String::new()));
        let result = answer.map_err(|stderr| CmdError::Failed {
            command: invocation.to_string(),
            status: "exit status: 1".to_owned(),
            stderr,
        });
        Box::pin(async move {
            // Yield once, as a real process would, so interleavings show up.
            tokio::task::yield_now().await;
            result
        })
    }

    fn set_sysctl<'a>(
        &'a self,
        key: &'a str,
        value: &'a str,
    ) -> BoxFuture<'a, Result<(), CmdError>> {
        lock(&self.log).push(Recorded::Sysctl {
            key: key.to_owned(),
            value: value.to_owned(),
        });
        Box::pin(async { Ok(()) })
    }
}
