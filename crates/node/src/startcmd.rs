//! A template's start command (kept running in every sandbox of it) and
//! ready command (polled until it exits 0 before the sandbox counts as
//! started).

use std::net::Ipv4Addr;
use std::time::Duration;

use crate::Node;
use crate::envd::{RunCommand, Stream};
use crate::templates::TemplateBuild;

/// How long a ready command may keep failing before the start fails.
pub(crate) const READY_WITHIN: Duration = Duration::from_secs(120);
/// Longest a single run of the ready command may take.
const READY_RUN_LIMIT: Duration = Duration::from_secs(30);

/// A line of a start or ready command's output, for a build log.
pub(crate) type LineSink<'a> = &'a (dyn Fn(&str) + Send + Sync);

impl Node {
    /// Starts `build`'s start command in the sandbox at `ip` (left running)
    /// and waits for its ready command. Without either it does nothing.
    pub(crate) async fn start_template_process(
        &self,
        ip: Ipv4Addr,
        build: &TemplateBuild,
        log: Option<LineSink<'_>>,
    ) -> Result<(), String> {
        let envd = &self.inner.envd;
        let env = build.process_env();
        let user = build.default_user();
        let cwd = build.workdir.as_deref();
        if let Some(start) = &build.start_cmd {
            let argv = TemplateBuild::shell_argv(start);
            envd.start_detached(
                ip,
                None,
                &RunCommand {
                    user,
                    argv: &argv,
                    env: &env,
                    cwd,
                    timeout: Duration::ZERO,
                },
            )
            .await
            .map_err(|e| format!("starting the start command '{start}': {e}"))?;
            if let Some(log) = log {
                log(&format!("start command started: {start}"));
            }
        }
        match &build.ready_cmd {
            Some(ready) => self.wait_ready_cmd(ip, build, ready, log).await,
            None => Ok(()),
        }
    }

    /// Polls `ready` until it exits 0.
    async fn wait_ready_cmd(
        &self,
        ip: Ipv4Addr,
        build: &TemplateBuild,
        ready: &str,
        log: Option<LineSink<'_>>,
    ) -> Result<(), String> {
        let envd = &self.inner.envd;
        let env = build.process_env();
        let user = build.default_user();
        let cwd = build.workdir.as_deref();
        let argv = TemplateBuild::shell_argv(ready);
        let deadline = tokio::time::Instant::now() + READY_WITHIN;
        let mut pause = Duration::from_millis(10);
        let mut last;
        loop {
            let mut output = Vec::new();
            let code = envd
                .run(
                    ip,
                    None,
                    &RunCommand {
                        user,
                        argv: &argv,
                        env: &env,
                        cwd,
                        timeout: READY_RUN_LIMIT,
                    },
                    |_: Stream, line: &str| {
                        if output.len() < 20 {
                            output.push(line.to_string());
                        }
                    },
                )
                .await;
            match code {
                Ok(0) => {
                    if let Some(log) = log {
                        log(&format!("ready command passed: {ready}"));
                    }
                    return Ok(());
                }
                Ok(c) => last = format!("exit code {c}: {}", output.join(" | ")),
                Err(e) => last = e,
            }
            if tokio::time::Instant::now() + pause >= deadline {
                return Err(format!(
                    "the ready command '{ready}' did not succeed within {}s (last: {last})",
                    READY_WITHIN.as_secs()
                ));
            }
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(Duration::from_millis(250));
        }
    }

    /// For a build: runs the start command with its output in the build log
    /// and waits for the ready command; fails at once when the start
    /// command exits with an error first.
    pub(crate) async fn check_template_start(
        &self,
        ip: Ipv4Addr,
        build: &TemplateBuild,
        log: LineSink<'_>,
    ) -> Result<(), String> {
        let Some(start) = &build.start_cmd else {
            return match &build.ready_cmd {
                Some(ready) => self.wait_ready_cmd(ip, build, ready, Some(log)).await,
                None => Ok(()),
            };
        };
        let env = build.process_env();
        let argv = TemplateBuild::shell_argv(start);
        let cmd = RunCommand {
            user: build.default_user(),
            argv: &argv,
            env: &env,
            cwd: build.workdir.as_deref(),
            timeout: Duration::ZERO,
        };
        log(&format!("start command: {start}"));
        let started = self
            .inner
            .envd
            .run(ip, None, &cmd, |_: Stream, line: &str| log(line));
        tokio::pin!(started);
        let ready = async {
            match &build.ready_cmd {
                Some(ready) => self.wait_ready_cmd(ip, build, ready, Some(log)).await,
                // Without a ready command, a start command that fails at once
                // still fails the build.
                None => {
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    Ok(())
                }
            }
        };
        tokio::pin!(ready);
        tokio::select! {
            r = &mut ready => r,
            code = &mut started => match code {
                Ok(0) => ready.await,
                Ok(c) => Err(format!("the start command '{start}' exited with code {c}")),
                Err(e) => Err(format!("the start command '{start}' failed: {e}")),
            },
        }
    }
}
