//! `arca-envd`: the agent that runs as PID 1 inside every Arca sandbox and
//! speaks E2B's envd protocol (CONTRACT.md sections 3 and 4), so the official
//! E2B SDKs can run commands, drive terminals, move files and watch
//! directories.
//!
//! One HTTP server (HTTP/1.1 and h2c) serves the Connect services
//! `process.Process` and `filesystem.Filesystem` and the plain routes
//! `/files`, `/health`, `/init`, `/envs` and `/metrics`.
//!
//! ```no_run
//! # async fn run() -> std::io::Result<()> {
//! let listener = tokio::net::TcpListener::bind("0.0.0.0:49983").await?;
//! arca_envd::Envd::new(arca_envd::EnvdConfig::default()).serve(listener).await
//! # }
//! ```
#![deny(unsafe_code)]

mod error;
mod files;
mod fsys;
mod http;
mod metrics;
mod paths;
mod process;
mod rpc;
#[allow(unsafe_code)]
mod sys;
mod users;
#[allow(unsafe_code)]
pub mod vminit;
mod watch;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use arca_proto::connect::{Code, ConnectError};
use base64::Engine as _;

use crate::users::{User, UserDb};

/// Version of the E2B envd protocol this agent implements: the reference
/// envd whose behaviour it follows. The SDKs gate features on it (CONTRACT 4.6).
pub const ENVD_VERSION: &str = "0.6.13";

/// Default TCP port of envd.
pub const DEFAULT_PORT: u16 = 49983;

/// Start-up settings of envd.
#[derive(Debug, Clone)]
pub struct EnvdConfig {
    /// `/etc/passwd` to read users from.
    pub passwd: PathBuf,
    /// `/etc/group` to read groups from.
    pub group: PathBuf,
    /// Environment variables every process gets (before `/init`'s and the
    /// request's): `PATH` and the `E2B_*` variables envd was started with.
    pub base_env: BTreeMap<String, String>,
}

impl Default for EnvdConfig {
    fn default() -> Self {
        let mut base_env = BTreeMap::new();
        base_env.insert(
            "PATH".to_string(),
            std::env::var("PATH").unwrap_or_else(|_| {
                "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".to_string()
            }),
        );
        base_env.insert("E2B_SANDBOX".to_string(), "true".to_string());
        for (k, v) in std::env::vars() {
            if k.starts_with("E2B_") {
                base_env.insert(k, v);
            }
        }
        EnvdConfig {
            passwd: PathBuf::from("/etc/passwd"),
            group: PathBuf::from("/etc/group"),
            base_env,
        }
    }
}

/// What the orchestrator set through `POST /init`.
#[derive(Debug, Clone)]
pub(crate) struct InitState {
    /// User-provided sandbox-wide variables; each `/init` replaces them.
    pub(crate) env_vars: BTreeMap<String, String>,
    pub(crate) access_token: Option<String>,
    pub(crate) default_user: String,
    pub(crate) default_workdir: Option<PathBuf>,
    pub(crate) last_timestamp: Option<chrono::DateTime<chrono::Utc>>,
}

pub(crate) struct State {
    pub(crate) users: UserDb,
    pub(crate) base_env: BTreeMap<String, String>,
    pub(crate) init: RwLock<InitState>,
    pub(crate) procs: process::Processes,
    pub(crate) watchers: watch::Watchers,
    pub(crate) cpu: std::sync::Mutex<Option<metrics::CpuSample>>,
}

impl State {
    pub(crate) fn init_state(&self) -> InitState {
        self.init
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// The user a request acts as: the one named in `Authorization: Basic`,
    /// else the default user.
    pub(crate) fn caller(&self, headers: &::http::HeaderMap) -> Result<User, ConnectError> {
        let named = basic_auth_user(headers)?;
        let name = named.unwrap_or_else(|| self.init_state().default_user);
        self.user(&name)
    }

    pub(crate) fn user(&self, name: &str) -> Result<User, ConnectError> {
        self.users.lookup(name).ok_or_else(|| {
            ConnectError::new(
                Code::Unauthenticated,
                format!("user '{name}' does not exist in this sandbox; pass an existing user such as 'root' or 'user'"),
            )
        })
    }

    /// Default working directory, when one was set and exists.
    pub(crate) fn default_workdir(&self) -> Option<PathBuf> {
        self.init_state()
            .default_workdir
            .filter(|p| Path::new(p).is_dir())
    }

    /// Environment for a new process of `user`, per CONTRACT 4.2.
    pub(crate) fn process_env(
        &self,
        user: &User,
        request: &std::collections::HashMap<String, String>,
    ) -> Vec<(String, String)> {
        let mut env: BTreeMap<String, String> = BTreeMap::new();
        if let Some(path) = self.base_env.get("PATH") {
            env.insert("PATH".into(), path.clone());
        }
        env.insert("HOME".into(), user.home.display().to_string());
        env.insert("USER".into(), user.name.clone());
        env.insert("LOGNAME".into(), user.name.clone());
        for (k, v) in &self.base_env {
            if k != "PATH" {
                env.insert(k.clone(), v.clone());
            }
        }
        for (k, v) in self.init_state().env_vars {
            env.insert(k, v);
        }
        for (k, v) in request {
            env.insert(k.clone(), v.clone());
        }
        env.into_iter().collect()
    }
}

/// Parses `Authorization: Basic base64("<user>:")`.
fn basic_auth_user(headers: &::http::HeaderMap) -> Result<Option<String>, ConnectError> {
    let Some(value) = headers.get(::http::header::AUTHORIZATION) else {
        return Ok(None);
    };
    let bad = || {
        ConnectError::new(
            Code::Unauthenticated,
            "malformed Authorization header; expected 'Basic base64(<user>:)'",
        )
    };
    let text = value.to_str().map_err(|_| bad())?;
    let Some(encoded) = text.strip_prefix("Basic ") else {
        return Err(bad());
    };
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(encoded.trim())
        .map_err(|_| bad())?;
    let decoded = String::from_utf8(decoded).map_err(|_| bad())?;
    let user = decoded.split(':').next().unwrap_or("").to_string();
    Ok(if user.is_empty() { None } else { Some(user) })
}

/// The envd agent: cheap to clone, shared by every connection.
#[derive(Clone)]
pub struct Envd {
    state: Arc<State>,
}

impl Envd {
    /// Makes an agent. Until `/init` says otherwise the default user is
    /// `root` and there is no access token.
    pub fn new(config: EnvdConfig) -> Self {
        let state = State {
            users: UserDb::at(&config.passwd, &config.group),
            base_env: config.base_env,
            init: RwLock::new(InitState {
                env_vars: BTreeMap::new(),
                access_token: None,
                default_user: "root".to_string(),
                default_workdir: None,
                last_timestamp: None,
            }),
            procs: process::Processes::new(),
            watchers: watch::Watchers::default(),
            cpu: std::sync::Mutex::new(None),
        };
        Envd {
            state: Arc::new(state),
        }
    }

    /// Serves HTTP/1.1 and h2c on `listener` until the process ends. Also
    /// starts the reaper that collects every exited child (envd is PID 1).
    pub async fn serve(self, listener: tokio::net::TcpListener) -> std::io::Result<()> {
        process::start_reaper(self.state.clone())?;
        http::serve(listener, self.state).await
    }

    /// Sends SIGTERM to every process envd started, waits up to `grace` for
    /// them to exit, then kills what is left. Used on shutdown.
    pub async fn terminate_all(&self, grace: std::time::Duration) {
        self.state.procs.terminate_all(grace).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn basic_auth_carries_the_user_name() {
        let mut h = ::http::HeaderMap::new();
        assert_eq!(basic_auth_user(&h).unwrap(), None);
        h.insert("authorization", "Basic dXNlcjo=".parse().unwrap()); // "user:"
        assert_eq!(basic_auth_user(&h).unwrap(), Some("user".into()));
        h.insert("authorization", "Bearer x".parse().unwrap());
        assert_eq!(
            basic_auth_user(&h).unwrap_err().code(),
            Code::Unauthenticated
        );
        h.insert("authorization", "Basic !!!".parse().unwrap());
        assert_eq!(
            basic_auth_user(&h).unwrap_err().code(),
            Code::Unauthenticated
        );
    }
}
