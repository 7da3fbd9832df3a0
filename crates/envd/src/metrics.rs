//! `GET /metrics`: resource use of the sandbox as envd sees it.

use std::path::Path;

/// Cumulative CPU jiffies from `/proc/stat`: (busy, total).
#[derive(Debug, Clone, Copy)]
pub(crate) struct CpuSample {
    busy: u64,
    total: u64,
}

pub(crate) fn cpu_sample(proc_stat: &str) -> Option<CpuSample> {
    let line = proc_stat.lines().find(|l| l.starts_with("cpu "))?;
    let v: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    if v.len() < 4 {
        return None;
    }
    let total: u64 = v.iter().take(8).sum();
    // idle + iowait are not busy.
    let idle = v[3] + v.get(4).copied().unwrap_or(0);
    Some(CpuSample {
        busy: total.saturating_sub(idle),
        total,
    })
}

/// Percentage of CPU in use between two samples.
pub(crate) fn cpu_pct(prev: CpuSample, now: CpuSample) -> f64 {
    let total = now.total.saturating_sub(prev.total);
    if total == 0 {
        return 0.0;
    }
    let busy = now.busy.saturating_sub(prev.busy);
    #[allow(clippy::cast_precision_loss)]
    let pct = busy as f64 * 100.0 / total as f64;
    pct
}

/// (total, used, cache) memory in bytes from `/proc/meminfo`.
pub(crate) fn memory(meminfo: &str) -> (u64, u64, u64) {
    let field = |name: &str| {
        meminfo
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|rest| {
                rest.trim()
                    .trim_end_matches("kB")
                    .trim()
                    .parse::<u64>()
                    .ok()
            })
            .unwrap_or(0)
            * 1024
    };
    let total = field("MemTotal:");
    let available = field("MemAvailable:");
    let cache = field("Cached:");
    (total, total.saturating_sub(available), cache)
}

/// (total, used) bytes of the file system holding `path`.
pub(crate) fn disk(path: &Path) -> (u64, u64) {
    match nix::sys::statvfs::statvfs(path) {
        Ok(s) => {
            let frag = s.fragment_size();
            let total = s.blocks() * frag;
            let free = s.blocks_free() * frag;
            (total, total.saturating_sub(free))
        }
        Err(_) => (0, 0),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_percentage_comes_from_jiffy_deltas() {
        let a = cpu_sample("cpu  100 0 100 800 0 0 0 0 0 0\ncpu0 1 2 3 4\n").unwrap();
        let b = cpu_sample("cpu  150 0 150 900 0 0 0 0 0 0\n").unwrap();
        assert!((cpu_pct(a, b) - 50.0).abs() < 1e-9);
        assert_eq!(cpu_pct(a, a), 0.0);
    }

    #[test]
    fn memory_uses_available_not_free() {
        let (t, u, c) = memory(
            "MemTotal:       1000 kB\nMemFree:  100 kB\nMemAvailable:    600 kB\nCached: 200 kB\n",
        );
        assert_eq!((t, u, c), (1_024_000, 409_600, 204_800));
    }
}
