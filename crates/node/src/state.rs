//! The state file of one sandbox, `$ARCA_HOME/sandboxes/<id>/state.json`:
//! written before any resource is made and after each step, so a restarted
//! node knows what to reattach and what to reap.

use std::path::{Path, PathBuf};

use arca_proto::node::SandboxSpec;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

/// How far a sandbox got.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum Phase {
    /// Resources are being made; a node that finds this reaps it.
    Creating,
    /// envd was started (`pid`) and the sandbox was handed out.
    Running,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct StateFile {
    pub(crate) phase: Phase,
    /// What the sandbox was created as; none while it is booting (or warm).
    pub(crate) spec: Option<SandboxSpec>,
    pub(crate) started_at: DateTime<Utc>,
    pub(crate) end_at: DateTime<Utc>,
    /// Host pid of the sandbox's PID 1 (envd).
    pub(crate) pid: Option<i32>,
    /// Its start time in clock ticks since boot (`/proc/<pid>/stat` field
    /// 22), so a recycled pid is never mistaken for it.
    pub(crate) pid_start: Option<u64>,
    pub(crate) slot_index: Option<u32>,
    /// Frozen by a pause (the freezer keeps it so across a node restart).
    #[serde(default)]
    pub(crate) paused: bool,
    /// Paused by its deadline (auto-resume may wake it).
    #[serde(default)]
    pub(crate) paused_at_deadline: bool,
    /// The pause keeps files only: processes, cgroup and slot are gone (or
    /// going: any `pid` and `slot_index` still named are a pause or resume
    /// a crash interrupted, which a restarted node removes).
    #[serde(default)]
    pub(crate) on_disk: bool,
    /// With `on_disk`: its processes and memory are saved in
    /// `checkpoint/` (CRIU), and a resume restores them.
    #[serde(default)]
    pub(crate) checkpoint: bool,
    /// Its processes were restored by CRIU (from a checkpoint or as a
    /// fork): CRIU leaves them non-dumpable, so they cannot be saved again.
    #[serde(default)]
    pub(crate) restored: bool,
}

impl StateFile {
    /// A sandbox whose resources are being made now: a node that finds it
    /// so after a restart reaps it.
    pub(crate) fn creating() -> StateFile {
        StateFile {
            phase: Phase::Creating,
            spec: None,
            started_at: chrono::Utc::now(),
            end_at: chrono::Utc::now(),
            pid: None,
            pid_start: None,
            slot_index: None,
            paused: false,
            paused_at_deadline: false,
            on_disk: false,
            checkpoint: false,
            restored: false,
        }
    }

    pub(crate) fn path(dir: &Path) -> PathBuf {
        dir.join("state.json")
    }

    /// Writes atomically (temp file, rename), so a crash of the node never
    /// leaves a torn file. No fsync: what the file describes (processes,
    /// mounts, cgroups, network namespaces) does not outlive a crash of the
    /// machine either, and a crash of the process keeps the page cache.
    pub(crate) fn save(&self, dir: &Path) -> std::io::Result<()> {
        let tmp = dir.join("state.json.tmp");
        std::fs::write(
            &tmp,
            serde_json::to_vec_pretty(self).map_err(std::io::Error::other)?,
        )?;
        std::fs::rename(&tmp, Self::path(dir))
    }

    pub(crate) fn load(dir: &Path) -> std::io::Result<StateFile> {
        let bytes = std::fs::read(Self::path(dir))?;
        serde_json::from_slice(&bytes).map_err(std::io::Error::other)
    }
}

/// Start time of a process, from `/proc/<pid>/stat`.
pub(crate) fn process_start(pid: i32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = stat.rsplit_once(')')?.1;
    // Fields after the command: state is field 3, starttime field 22.
    rest.split_whitespace().nth(19)?.parse().ok()
}

/// Whether `pid` is still the process that was started at `start`.
pub(crate) fn same_process(pid: i32, start: u64) -> bool {
    process_start(pid) == Some(start)
        && std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .ok()
            .and_then(|s| {
                s.rsplit_once(')')
                    .map(|(_, r)| r.trim_start().starts_with('Z'))
            })
            == Some(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_process_start_is_readable_and_stable() {
        let me = i32::try_from(std::process::id()).unwrap();
        let a = process_start(me).unwrap();
        assert_eq!(process_start(me), Some(a));
        assert!(same_process(me, a));
        assert!(!same_process(me, a + 1));
    }
}
