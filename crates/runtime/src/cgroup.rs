//! cgroups v1 and v2 behind one interface.
//!
//! Hosts differ: pure v2 (one `cgroup2` mount with the controllers), or
//! hybrid (each controller its own v1 hierarchy, plus a v2 tree that may have
//! no controllers but still offers `cgroup.kill` and `cgroup.freeze`). Each
//! controller Arca needs (cpu, memory, pids, freezer) is taken from v2 when
//! v2 has it, else from its v1 hierarchy. A sandbox's cgroup is the set of
//! directories `<hierarchy>/arca/<sandbox id>` it has to join.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// A failed cgroup operation, with the file touched.
#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    /// A controller Arca needs is neither in v2 nor mounted as v1.
    #[error(
        "cgroup controller '{0}' is not available; mount it (v1) or enable it in cgroup.subtree_control (v2), and see `arca doctor`"
    )]
    MissingController(&'static str),
    /// Reading or writing a cgroup file failed.
    #[error("cgroup file {path}")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// What went wrong.
        #[source]
        source: io::Error,
    },
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> CgroupError + '_ {
    move |source| CgroupError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Resource limits of one sandbox.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// CPUs: a CFS quota of this many cores per 100 ms period.
    pub cpus: u32,
    /// Memory limit in MiB (swap is not allowed on top).
    pub memory_mib: u64,
    /// Largest number of processes and threads.
    pub pids: u64,
}

/// CFS period used for CPU quotas, in microseconds.
const CPU_PERIOD_US: u64 = 100_000;

/// Where each controller lives on this host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layout {
    /// The v2 mount, if any.
    pub v2: Option<PathBuf>,
    /// Controllers enabled in the v2 root.
    pub v2_controllers: Vec<String>,
    /// v1 hierarchies: mount point and its controllers.
    pub v1: Vec<(PathBuf, Vec<String>)>,
    /// Directory under each hierarchy that holds the sandboxes' cgroups
    /// (`arca` by default; tests and side-by-side instances use their own).
    pub parent: String,
}

/// The controllers a sandbox needs.
const NEEDED: [&str; 4] = ["cpu", "memory", "pids", "freezer"];

impl Layout {
    /// Parses `/proc/self/mountinfo`; `read_controllers` gives the content
    /// of a v2 mount's `cgroup.controllers` (a parameter so tests need no
    /// real cgroupfs).
    pub fn parse(mountinfo: &str, read_controllers: impl Fn(&Path) -> String) -> Layout {
        let mut layout = Layout {
            v2: None,
            v2_controllers: Vec::new(),
            v1: Vec::new(),
            parent: "arca".to_string(),
        };
        for line in mountinfo.lines() {
            let Some((pre, post)) = line.split_once(" - ") else {
                continue;
            };
            let mount_point = pre.split_whitespace().nth(4).unwrap_or("");
            let mut post = post.split_whitespace();
            let fstype = post.next().unwrap_or("");
            let _source = post.next();
            let super_opts = post.next().unwrap_or("");
            match fstype {
                "cgroup2" if layout.v2.is_none() => {
                    let p = PathBuf::from(mount_point);
                    layout.v2_controllers = read_controllers(&p)
                        .split_whitespace()
                        .map(str::to_string)
                        .collect();
                    layout.v2 = Some(p);
                }
                "cgroup" => {
                    let ctrls: Vec<String> = super_opts
                        .split(',')
                        .filter(|o| NEEDED.contains(o) || *o == "cpuacct")
                        .map(str::to_string)
                        .collect();
                    if !ctrls.is_empty() {
                        layout.v1.push((PathBuf::from(mount_point), ctrls));
                    }
                }
                _ => {}
            }
        }
        layout
    }

    /// This host's layout.
    pub fn detect() -> Result<Layout, CgroupError> {
        let path = Path::new("/proc/self/mountinfo");
        let text = fs::read_to_string(path).map_err(io_err(path))?;
        Ok(Layout::parse(&text, |p| {
            fs::read_to_string(p.join("cgroup.controllers")).unwrap_or_default()
        }))
    }

    /// The same layout with sandbox cgroups under `parent` instead.
    pub fn with_parent(mut self, parent: &str) -> Layout {
        self.parent = parent.to_string();
        self
    }

    fn v1_mount(&self, controller: &str) -> Option<&Path> {
        self.v1
            .iter()
            .find(|(_, c)| c.iter().any(|x| x == controller))
            .map(|(p, _)| p.as_path())
    }

    /// Where a controller lives: `Some(true)` v2, `Some(false)` v1.
    fn uses_v2(&self, controller: &'static str) -> Result<bool, CgroupError> {
        if self.v2.is_some()
            && (self.v2_controllers.iter().any(|c| c == controller)
                // v2 freezes through cgroup.freeze, not a controller.
                || (controller == "freezer" && self.v1_mount("freezer").is_none()))
        {
            return Ok(true);
        }
        if self.v1_mount(controller).is_some() {
            return Ok(false);
        }
        Err(CgroupError::MissingController(controller))
    }

    /// `criu restore --cgroup-root` values that put a restored sandbox into
    /// the cgroup `name` of this layout (one per controller Arca uses, so
    /// the host's other hierarchies are left as they are).
    pub fn criu_cgroup_roots(&self, name: &str) -> Vec<String> {
        let at = format!("/{}/{name}", self.parent);
        let mut out: Vec<String> = self
            .v1
            .iter()
            .flat_map(|(_, ctrls)| ctrls.iter().map(|c| format!("{c}:{at}")))
            .collect();
        if self.v2.is_some() {
            out.push(format!(":{at}"));
        }
        out
    }

    /// Checks that every controller a sandbox needs is available.
    pub fn check(&self) -> Result<(), CgroupError> {
        for c in NEEDED {
            self.uses_v2(c)?;
        }
        Ok(())
    }

    /// Creates the cgroup of sandbox `name` under `arca/` with `limits`.
    pub fn create(&self, name: &str, limits: Limits) -> Result<Cgroup, CgroupError> {
        let mut dirs: Vec<PathBuf> = Vec::new();
        let mut cg = Cgroup {
            dirs: Vec::new(),
            v2: None,
            memory: (PathBuf::new(), false),
            cpu: (PathBuf::new(), false),
            pids: PathBuf::new(),
            freezer: (PathBuf::new(), false),
        };
        if let Some(v2) = &self.v2 {
            // Even without controllers, a v2 cgroup gives cgroup.kill and
            // cgroup.freeze, and makes the sandbox's cgroup namespace root.
            let parent = v2.join(&self.parent);
            mkdir(&parent)?;
            let wanted: Vec<&str> = ["cpu", "memory", "pids"]
                .into_iter()
                .filter(|c| self.v2_controllers.iter().any(|x| x == c))
                .collect();
            if !wanted.is_empty() {
                let enable: String = wanted.iter().map(|c| format!("+{c} ")).collect();
                for dir in [v2.as_path(), parent.as_path()] {
                    let f = dir.join("cgroup.subtree_control");
                    fs::write(&f, enable.trim()).map_err(io_err(&f))?;
                }
            }
            let dir = parent.join(name);
            mkdir(&dir)?;
            dirs.push(dir.clone());
            cg.v2 = Some(dir);
        }
        for (controller, slot) in [("memory", 0), ("cpu", 1), ("pids", 2), ("freezer", 3)] {
            let dir = if self.uses_v2(controller)? {
                cg.v2
                    .clone()
                    .ok_or(CgroupError::MissingController(controller))?
            } else {
                let mount = self
                    .v1_mount(controller)
                    .ok_or(CgroupError::MissingController(controller))?;
                let parent = mount.join(&self.parent);
                mkdir(&parent)?;
                let dir = parent.join(name);
                mkdir(&dir)?;
                if !dirs.contains(&dir) {
                    dirs.push(dir.clone());
                }
                dir
            };
            let v2 = Some(&dir) == cg.v2.as_ref();
            match slot {
                0 => cg.memory = (dir, v2),
                1 => cg.cpu = (dir, v2),
                2 => cg.pids = dir,
                _ => cg.freezer = (dir, v2),
            }
        }
        // v1 cpuacct is often separate from cpu; join it for CPU usage.
        if let (Some(mount), false) = (self.v1_mount("cpuacct"), cg.cpu.1) {
            let dir = mount.join(&self.parent).join(name);
            if !dirs.contains(&dir) {
                mkdir(&mount.join(&self.parent))?;
                mkdir(&dir)?;
                dirs.push(dir);
            }
        }
        cg.dirs = dirs;
        if let Err(e) = cg.set_limits(limits) {
            let _ = cg.remove();
            return Err(e);
        }
        Ok(cg)
    }

    /// Reopens the cgroup of a sandbox created earlier (node restart).
    pub fn open(&self, name: &str) -> Result<Cgroup, CgroupError> {
        let mut cg = Cgroup {
            dirs: Vec::new(),
            v2: self.v2.as_ref().map(|v| v.join(&self.parent).join(name)),
            memory: (PathBuf::new(), false),
            cpu: (PathBuf::new(), false),
            pids: PathBuf::new(),
            freezer: (PathBuf::new(), false),
        };
        if let Some(d) = &cg.v2 {
            cg.dirs.push(d.clone());
        }
        for (controller, slot) in [("memory", 0), ("cpu", 1), ("pids", 2), ("freezer", 3)] {
            let (dir, v2) = if self.uses_v2(controller)? {
                (
                    cg.v2
                        .clone()
                        .ok_or(CgroupError::MissingController(controller))?,
                    true,
                )
            } else {
                let mount = self
                    .v1_mount(controller)
                    .ok_or(CgroupError::MissingController(controller))?;
                (mount.join(&self.parent).join(name), false)
            };
            if !cg.dirs.contains(&dir) {
                cg.dirs.push(dir.clone());
            }
            match slot {
                0 => cg.memory = (dir, v2),
                1 => cg.cpu = (dir, v2),
                2 => cg.pids = dir,
                _ => cg.freezer = (dir, v2),
            }
        }
        if let (Some(mount), false) = (self.v1_mount("cpuacct"), cg.cpu.1) {
            let dir = mount.join(&self.parent).join(name);
            if !cg.dirs.contains(&dir) {
                cg.dirs.push(dir);
            }
        }
        Ok(cg)
    }

    /// Names of every sandbox cgroup under `arca/` (for reaping leftovers).
    pub fn sandbox_names(&self) -> Vec<String> {
        let mut roots: Vec<PathBuf> = self.v1.iter().map(|(p, _)| p.join(&self.parent)).collect();
        if let Some(v2) = &self.v2 {
            roots.push(v2.join(&self.parent));
        }
        let mut names: Vec<String> = roots
            .iter()
            .filter_map(|r| fs::read_dir(r).ok())
            .flatten()
            .filter_map(Result::ok)
            .filter(|e| e.path().is_dir())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names.dedup();
        names
    }
}

fn mkdir(dir: &Path) -> Result<(), CgroupError> {
    match fs::create_dir(dir) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(()),
        Err(e) => Err(io_err(dir)(e)),
    }
}

fn write(path: &Path, value: &str) -> Result<(), CgroupError> {
    fs::write(path, value).map_err(io_err(path))
}

/// One sandbox's cgroup: one directory per hierarchy it belongs to.
#[derive(Debug, Clone)]
pub struct Cgroup {
    dirs: Vec<PathBuf>,
    v2: Option<PathBuf>,
    memory: (PathBuf, bool),
    cpu: (PathBuf, bool),
    pids: PathBuf,
    freezer: (PathBuf, bool),
}

impl Cgroup {
    /// Every directory a process must join (`cgroup.procs` in each).
    pub fn dirs(&self) -> &[PathBuf] {
        &self.dirs
    }

    /// The directory whose freezer stops the sandbox (`freezer.state` on
    /// v1, `cgroup.freeze` on v2): CRIU's `--freeze-cgroup`.
    pub fn freezer_dir(&self) -> &Path {
        &self.freezer.0
    }

    /// Sets cpu, memory and pids limits (at creation, and when a warm
    /// sandbox is claimed with its real limits).
    pub fn set_limits(&self, l: Limits) -> Result<(), CgroupError> {
        let mem = l.memory_mib.saturating_mul(1 << 20);
        let (mdir, mv2) = &self.memory;
        if *mv2 {
            write(&mdir.join("memory.max"), &mem.to_string())?;
            let swap = mdir.join("memory.swap.max");
            if swap.exists() {
                write(&swap, "0")?;
            }
        } else {
            // With swap accounting, memory.limit may not exceed memsw.limit and
            // memsw may not go below memory: raise memsw first, lower it last.
            let memsw = mdir.join("memory.memsw.limit_in_bytes");
            let has_memsw = memsw.exists();
            if has_memsw {
                let _ = fs::write(&memsw, mem.to_string());
            }
            write(&mdir.join("memory.limit_in_bytes"), &mem.to_string())?;
            if has_memsw {
                write(&memsw, &mem.to_string())?;
            }
        }
        let quota = u64::from(l.cpus.max(1)) * CPU_PERIOD_US;
        let (cdir, cv2) = &self.cpu;
        if *cv2 {
            write(&cdir.join("cpu.max"), &format!("{quota} {CPU_PERIOD_US}"))?;
        } else {
            write(&cdir.join("cpu.cfs_period_us"), &CPU_PERIOD_US.to_string())?;
            write(&cdir.join("cpu.cfs_quota_us"), &quota.to_string())?;
        }
        write(&self.pids.join("pids.max"), &l.pids.to_string())?;
        Ok(())
    }

    /// Process ids in the cgroup.
    pub fn procs(&self) -> Vec<i32> {
        let Some(dir) = self.dirs.first() else {
            return Vec::new();
        };
        fs::read_to_string(dir.join("cgroup.procs"))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.trim().parse().ok())
            .collect()
    }

    /// Freezes (`true`) or thaws every process; returns once the kernel
    /// reports the new state.
    pub fn set_frozen(&self, frozen: bool) -> Result<(), CgroupError> {
        let (dir, v2) = &self.freezer;
        let (file, settled) = if *v2 {
            let file = dir.join("cgroup.freeze");
            write(&file, if frozen { "1" } else { "0" })?;
            let want = if frozen { "frozen 1" } else { "frozen 0" };
            let settled = wait_for(|| {
                fs::read_to_string(dir.join("cgroup.events"))
                    .is_ok_and(|t| t.lines().any(|l| l.trim() == want))
            });
            (file, settled)
        } else {
            let state = dir.join("freezer.state");
            write(&state, if frozen { "FROZEN" } else { "THAWED" })?;
            let want = if frozen { "FROZEN" } else { "THAWED" };
            let settled = wait_for(|| fs::read_to_string(&state).is_ok_and(|t| t.trim() == want));
            (state, settled)
        };
        if !settled {
            // A task stuck in the kernel keeps a freeze from finishing: the
            // caller must not act as if nothing ran, and nothing stays
            // half-frozen.
            if frozen {
                let _ = write(&file, if *v2 { "0" } else { "THAWED" });
            }
            return Err(CgroupError::Io {
                path: file,
                source: io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!(
                        "the cgroup did not become {} within a second",
                        if frozen { "frozen" } else { "thawed" }
                    ),
                ),
            });
        }
        Ok(())
    }

    /// Kills every process in the cgroup and waits until it is empty (up to
    /// a few seconds).
    pub fn kill_all(&self) -> Result<(), CgroupError> {
        let kill_file = self.v2.as_ref().map(|d| d.join("cgroup.kill"));
        if let Some(k) = kill_file.filter(|k| k.exists()) {
            write(&k, "1")?;
            // A v1 freezer (hybrid hosts) holds SIGKILL back from frozen
            // tasks until they thaw: a paused sandbox dies only then.
            if !self.freezer.1 {
                let _ = self.set_frozen(false);
            }
        } else {
            // Freeze first so nothing forks while we kill.
            let _ = self.set_frozen(true);
            for pid in self.procs() {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
            let _ = self.set_frozen(false);
        }
        wait_for(|| self.procs().is_empty());
        Ok(())
    }

    /// Removes the cgroup's directories (its processes must be gone).
    pub fn remove(&self) -> Result<(), CgroupError> {
        let mut last = Ok(());
        for d in &self.dirs {
            let mut result = fs::remove_dir(d);
            // A cgroup stays busy until its last task is reaped, which can
            // lag behind the kill by a moment.
            for _ in 0..300 {
                match &result {
                    Err(e) if e.raw_os_error() == Some(nix::libc::EBUSY) => {
                        std::thread::sleep(Duration::from_millis(10));
                        result = fs::remove_dir(d);
                    }
                    _ => break,
                }
            }
            match result {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => last = Err(io_err(d)(e)),
            }
        }
        last
    }

    /// Bytes of memory in use.
    pub fn memory_used(&self) -> u64 {
        let (dir, v2) = &self.memory;
        let file = if *v2 {
            "memory.current"
        } else {
            "memory.usage_in_bytes"
        };
        read_u64(&dir.join(file))
    }

    /// Page cache bytes.
    pub fn memory_cache(&self) -> u64 {
        let (dir, v2) = &self.memory;
        let key = if *v2 { "file " } else { "cache " };
        fs::read_to_string(dir.join("memory.stat"))
            .unwrap_or_default()
            .lines()
            .find_map(|l| l.strip_prefix(key))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0)
    }

    /// CPU time used so far, in microseconds.
    pub fn cpu_usage_us(&self) -> u64 {
        let (dir, v2) = &self.cpu;
        if *v2 {
            return fs::read_to_string(dir.join("cpu.stat"))
                .unwrap_or_default()
                .lines()
                .find_map(|l| l.strip_prefix("usage_usec "))
                .and_then(|v| v.trim().parse().ok())
                .unwrap_or(0);
        }
        let acct = self
            .dirs
            .iter()
            .map(|d| d.join("cpuacct.usage"))
            .find(|p| p.exists());
        acct.map_or(0, |p| read_u64(&p) / 1000)
    }

    /// Whether the memory limit killed a process (v1 `under_oom`/v2 events).
    pub fn oom_kills(&self) -> u64 {
        let (dir, v2) = &self.memory;
        let (file, key) = if *v2 {
            ("memory.events", "oom_kill ")
        } else {
            ("memory.oom_control", "oom_kill ")
        };
        fs::read_to_string(dir.join(file))
            .unwrap_or_default()
            .lines()
            .find_map(|l| l.strip_prefix(key))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0)
    }
}

fn read_u64(p: &Path) -> u64 {
    fs::read_to_string(p)
        .ok()
        .and_then(|t| t.trim().parse().ok())
        .unwrap_or(0)
}

/// Polls `done` for about a second; whether it became true.
fn wait_for(mut done: impl FnMut() -> bool) -> bool {
    for _ in 0..500 {
        if done() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    done()
}

#[cfg(test)]
mod tests {
    use super::*;

    const HYBRID: &str = "\
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
32 31 0:29 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu
33 31 0:30 / /sys/fs/cgroup/cpuacct rw,relatime - cgroup cgroup rw,cpuacct
35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
37 31 0:34 / /sys/fs/cgroup/freezer rw,relatime - cgroup cgroup rw,freezer
39 31 0:36 / /sys/fs/cgroup/pids rw,relatime - cgroup cgroup rw,pids
40 31 0:37 / /sys/fs/cgroup/systemd rw,relatime - cgroup cgroup rw,name=systemd
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
";
    const PURE_V2: &str = "35 23 0:30 / /sys/fs/cgroup rw,nosuid - cgroup2 cgroup2 rw,nsdelegate\n";

    #[test]
    fn hybrid_hosts_take_controllers_from_v1_and_keep_v2_for_kill() {
        let l = Layout::parse(HYBRID, |_| "hugetlb\n".to_string());
        assert_eq!(l.v2.as_deref(), Some(Path::new("/sys/fs/cgroup/unified")));
        assert!(!l.uses_v2("memory").unwrap());
        assert!(!l.uses_v2("freezer").unwrap());
        assert_eq!(
            l.v1_mount("cpuacct"),
            Some(Path::new("/sys/fs/cgroup/cpuacct"))
        );
        l.check().unwrap();
    }

    #[test]
    fn pure_v2_hosts_use_v2_for_everything() {
        let l = Layout::parse(PURE_V2, |_| "cpuset cpu io memory pids\n".to_string());
        for c in NEEDED {
            assert!(l.uses_v2(c).unwrap(), "{c}");
        }
    }

    #[test]
    fn a_missing_controller_is_named_with_a_hint() {
        let l = Layout::parse(PURE_V2, |_| "cpu memory\n".to_string());
        let err = l.check().unwrap_err();
        assert!(matches!(err, CgroupError::MissingController("pids")));
        assert!(err.to_string().contains("arca doctor"));
    }

    #[test]
    fn limits_are_written_to_v1_files_under_a_fake_root() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path();
        let mountinfo: String = ["cpu,cpuacct", "memory", "pids", "freezer"]
            .iter()
            .enumerate()
            .map(|(i, c)| {
                let dir = root.join(c);
                fs::create_dir_all(&dir).unwrap();
                format!(
                    "{i} 1 0:{i} / {} rw - cgroup cgroup rw,{c}\n",
                    dir.display()
                )
            })
            .collect();
        let l = Layout::parse(&mountinfo, |_| String::new());
        let cg = l
            .create(
                "sbx1",
                Limits {
                    cpus: 2,
                    memory_mib: 512,
                    pids: 100,
                },
            )
            .unwrap();
        let read = |p: PathBuf| fs::read_to_string(p).unwrap();
        assert_eq!(
            read(root.join("memory/arca/sbx1/memory.limit_in_bytes")),
            (512u64 << 20).to_string()
        );
        assert_eq!(
            read(root.join("cpu,cpuacct/arca/sbx1/cpu.cfs_quota_us")),
            "200000"
        );
        assert_eq!(read(root.join("pids/arca/sbx1/pids.max")), "100");
        assert_eq!(cg.dirs().len(), 4);
        assert_eq!(l.sandbox_names(), vec!["sbx1".to_string()]);
    }
}
