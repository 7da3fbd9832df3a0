//! A sandbox's egress log (ADR 0005 section 4): a bounded ring of
//! [`EgressLogEntry`]s in memory, mirrored to `egress.jsonl` in the
//! sandbox dir so it survives a node restart.
//!
//! Repeats of the same (protocol, destination, port, name, verdict, rule)
//! within 1 s of an entry are merged into its `count`; only the last
//! [`MERGE_WINDOW`] entries are candidates, so recording is O(1).
//!
//! # The file
//!
//! One JSON entry per line. A new entry is appended at once (so a crash
//! loses nothing but later repeat counts). An entry stays *open* for
//! merging while it is among the last [`MERGE_WINDOW`] entries and no later
//! record is more than 1 s newer; when it closes (or on
//! [`flush`](EgressLog::flush), or when the log is dropped) and its count
//! grew after it was written, it is appended once more with the final
//! count. Loading therefore lets a line replace an earlier one among the
//! last few loaded that has the same tuple **and** timestamp. A closed
//! entry is never merged into again, so at most two lines exist per entry.
//!
//! At 1 MiB the file is renamed to `egress.jsonl.1` (replacing the old
//! one) and a new one is started: at most two files. At typical line
//! sizes (about 200 bytes) the rotated file alone holds more than the 2000
//! entries the ring keeps; entries with long names and rewritten counts
//! can make a reload return fewer. I/O errors are logged and otherwise
//! ignored: the ring is authoritative.

use std::collections::VecDeque;
use std::fs::{self, File, OpenOptions};
use std::io::{BufRead as _, BufReader, Write as _};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, PoisonError};

use arca_net::PacketSummary;
use arca_proto::network::{EgressLogEntry, Verdict};
use chrono::{DateTime, TimeDelta, Utc};

/// Entries kept per sandbox.
pub(crate) const DEFAULT_CAPACITY: usize = 2000;
/// Size at which `egress.jsonl` is rotated.
pub(crate) const ROTATE_BYTES: u64 = 1 << 20;
/// How many of the newest entries a record may merge into.
const MERGE_WINDOW: usize = 8;
/// Repeats closer than this are merged.
const MERGE_WITHIN: TimeDelta = TimeDelta::seconds(1);

/// A sandbox's egress log. Cheap to call from any thread (one short
/// mutex section per call, no I/O beyond one appended line).
#[derive(Debug)]
pub(crate) struct EgressLog {
    inner: Mutex<Inner>,
}

#[derive(Debug)]
struct Inner {
    ring: VecDeque<EgressLogEntry>,
    /// For the newest `open.len()` entries of `ring`, still open for
    /// merging: the count the file has for each (0: not written).
    open: VecDeque<u32>,
    capacity: usize,
    mirror: Mirror,
}

/// The `egress.jsonl` side.
#[derive(Debug)]
struct Mirror {
    path: PathBuf,
    rotate_bytes: u64,
    /// Opened on first write; `None` again after an error.
    file: Option<File>,
    /// Bytes in the current file.
    len: u64,
    /// An error was logged since the last successful write (so a missing
    /// dir does not log on every packet).
    failing: bool,
    /// Whether a write may (re)open the file; false while dropping.
    may_create: bool,
}

/// Whether `b` is a repeat of `a` (same tuple; time not checked).
fn same_tuple(a: &EgressLogEntry, b: &EgressLogEntry) -> bool {
    a.protocol == b.protocol
        && a.destination == b.destination
        && a.port == b.port
        && a.name == b.name
        && a.verdict == b.verdict
        && a.rule == b.rule
}

fn within(a: DateTime<Utc>, b: DateTime<Utc>) -> bool {
    (a - b).abs() <= MERGE_WITHIN
}

/// `<path>.1`.
fn rotated_path(path: &Path) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(".1");
    PathBuf::from(s)
}

impl EgressLog {
    /// Opens the log mirrored at `path` (`<sandbox dir>/egress.jsonl`),
    /// keeping at most `capacity` entries, and loads what `path.1` and
    /// `path` hold (the newest `capacity`; unreadable lines skipped).
    pub(crate) fn open(path: &Path, capacity: usize) -> EgressLog {
        Self::open_with(path, capacity, ROTATE_BYTES)
    }

    fn open_with(path: &Path, capacity: usize, rotate_bytes: u64) -> EgressLog {
        let capacity = capacity.max(1);
        let mut ring = VecDeque::with_capacity(capacity.min(DEFAULT_CAPACITY) + 1);
        let mut skipped = 0usize;
        for p in [rotated_path(path), path.to_owned()] {
            skipped += load(&p, &mut ring, capacity);
        }
        if skipped > 0 {
            tracing::warn!(path = %path.display(), skipped, "egress log: skipped unreadable lines");
        }
        EgressLog {
            inner: Mutex::new(Inner {
                ring,
                open: VecDeque::new(),
                capacity,
                mirror: Mirror {
                    path: path.to_owned(),
                    rotate_bytes,
                    file: None,
                    len: 0,
                    failing: false,
                    may_create: true,
                },
            }),
        }
    }

    /// Adds an attempt: merged into a recent entry with the same tuple
    /// whose timestamp is within 1 s (its count grows, its timestamp stays
    /// the first), else appended (the oldest entry goes when full).
    pub(crate) fn record(&self, entry: EgressLogEntry) {
        let mut inner = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
        inner.record(entry);
    }

    /// Entries with `timestamp >= since` (all without `since`), oldest
    /// first, at most `limit` of them: the oldest ones, so a caller can page
    /// forward by passing the last timestamp it saw.
    pub(crate) fn entries(
        &self,
        since: Option<DateTime<Utc>>,
        limit: usize,
    ) -> Vec<EgressLogEntry> {
        let inner = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
        inner
            .ring
            .iter()
            .filter(|e| since.is_none_or(|s| e.timestamp >= s))
            .take(limit)
            .cloned()
            .collect()
    }

    /// How many entries the ring holds.
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        let inner = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
        inner.ring.len()
    }

    /// Closes all open entries, writing final counts to the file (for
    /// pause, stop, shutdown; also done on drop). Later repeats start new
    /// entries.
    pub(crate) fn flush(&self) {
        let mut inner = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
        inner.close_all();
    }
}

impl Drop for EgressLog {
    /// Writes final counts, but only through a file already open: dropping
    /// the log never creates `egress.jsonl` (the sandbox dir may be going
    /// away).
    fn drop(&mut self) {
        let inner = self.inner.get_mut().unwrap_or_else(PoisonError::into_inner);
        if inner.mirror.file.is_some() {
            inner.mirror.may_create = false;
            inner.close_all();
        }
    }
}

impl Inner {
    fn record(&mut self, entry: EgressLogEntry) {
        // Close open entries the new one is more than 1 s past, oldest
        // first (so the file keeps the ring's order).
        while let Some(idx) = self.first_open() {
            if entry.timestamp - self.ring[idx].timestamp > MERGE_WITHIN {
                self.close_oldest_open();
            } else {
                break;
            }
        }
        // The newest open entry with the same tuple decides.
        let first_open = self.first_open().unwrap_or(self.ring.len());
        if let Some(idx) = (first_open..self.ring.len())
            .rev()
            .find(|&i| same_tuple(&self.ring[i], &entry))
        {
            let e = &mut self.ring[idx];
            if within(e.timestamp, entry.timestamp) {
                e.count = e.count.saturating_add(entry.count.max(1));
                return;
            }
        }
        let written = if self.mirror.append(&entry) {
            entry.count
        } else {
            0
        };
        self.ring.push_back(entry);
        self.open.push_back(written);
        if self.open.len() > MERGE_WINDOW {
            self.close_oldest_open();
        }
        while self.ring.len() > self.capacity {
            self.ring.pop_front();
        }
        // Only with a capacity below the merge window: forget open state
        // of entries that left the ring (their first line is written).
        while self.open.len() > self.ring.len() {
            self.open.pop_front();
        }
    }

    fn close_all(&mut self) {
        while !self.open.is_empty() {
            self.close_oldest_open();
        }
        if let Some(f) = self.mirror.file.as_mut() {
            let _ = f.flush();
        }
    }

    /// Index in `ring` of the oldest open entry.
    fn first_open(&self) -> Option<usize> {
        (!self.open.is_empty()).then(|| self.ring.len() - self.open.len())
    }

    /// Closes the oldest open entry: appends it again if the file does not
    /// have its final count.
    fn close_oldest_open(&mut self) {
        let Some(idx) = self.first_open() else {
            return;
        };
        let written = self.open.pop_front().unwrap_or(0);
        if self.ring[idx].count != written {
            let entry = self.ring[idx].clone();
            self.mirror.append(&entry);
        }
    }
}

impl Mirror {
    /// Appends one line, rotating first if it would pass the limit.
    /// Returns whether it was written; failures are logged.
    fn append(&mut self, entry: &EgressLogEntry) -> bool {
        let mut line = match serde_json::to_vec(entry) {
            Ok(l) => l,
            Err(e) => {
                tracing::warn!(error = %e, "egress log: could not serialize an entry");
                return false;
            }
        };
        line.push(b'\n');
        match self.try_append(&line) {
            Ok(()) => {
                self.failing = false;
                true
            }
            Err(e) => {
                if !self.failing {
                    tracing::warn!(
                        path = %self.path.display(),
                        error = %e,
                        "egress log: could not write the mirror file (the in-memory log goes on)"
                    );
                    self.failing = true;
                }
                self.file = None;
                false
            }
        }
    }

    fn try_append(&mut self, line: &[u8]) -> std::io::Result<()> {
        if self.file.is_none() {
            if !self.may_create {
                return Err(std::io::Error::other("the log is being dropped"));
            }
            self.open_file()?;
        }
        let line_len = u64::try_from(line.len()).unwrap_or(u64::MAX);
        if self.len > 0 && self.len.saturating_add(line_len) > self.rotate_bytes {
            self.file = None;
            fs::rename(&self.path, rotated_path(&self.path))?;
            self.open_file()?;
        }
        let Some(file) = self.file.as_mut() else {
            return Err(std::io::Error::other("mirror file not open"));
        };
        file.write_all(line)?;
        self.len = self.len.saturating_add(line_len);
        Ok(())
    }

    /// Opens (or creates) the file for appending. If a crash left a partial
    /// last line, ends it, so the next line stays readable.
    fn open_file(&mut self) -> std::io::Result<()> {
        let mut file = OpenOptions::new()
            .create(true)
            .append(true)
            .read(true)
            .open(&self.path)?;
        let len = file.metadata()?.len();
        let mut len_after = len;
        if len > 0 {
            use std::io::{Read as _, Seek as _, SeekFrom};
            let mut last = [0u8; 1];
            file.seek(SeekFrom::End(-1))?;
            file.read_exact(&mut last)?;
            if last[0] != b'\n' {
                file.write_all(b"\n")?;
                len_after += 1;
            }
        }
        self.len = len_after;
        self.file = Some(file);
        Ok(())
    }
}

/// Appends the entries of the file at `path` to `ring` (keeping the newest
/// `capacity`); a line equal in tuple and timestamp to one of the last
/// [`MERGE_WINDOW`] entries replaces it (a final count written at close).
/// Returns how many lines could not be read. A missing file is empty.
fn load(path: &Path, ring: &mut VecDeque<EgressLogEntry>, capacity: usize) -> usize {
    let file = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return 0,
        Err(e) => {
            tracing::warn!(path = %path.display(), error = %e, "egress log: could not read");
            return 0;
        }
    };
    let mut skipped = 0;
    for line in BufReader::new(file).split(b'\n') {
        let line = match line {
            Ok(l) => l,
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "egress log: read error");
                break;
            }
        };
        if line.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        let Ok(entry) = serde_json::from_slice::<EgressLogEntry>(&line) else {
            skipped += 1;
            continue;
        };
        let start = ring.len().saturating_sub(MERGE_WINDOW);
        if let Some(idx) = (start..ring.len())
            .rev()
            .find(|&i| ring[i].timestamp == entry.timestamp && same_tuple(&ring[i], &entry))
        {
            let old = &mut ring[idx];
            old.count = old.count.max(entry.count);
            continue;
        }
        ring.push_back(entry);
        if ring.len() > capacity {
            ring.pop_front();
        }
    }
    skipped
}

/// The log entry for a packet the kernel logged with prefix
/// `"<sandbox id> <letter>"`; `prefix_rest` is the part after the id:
/// `A` allowed by `allowOut`, `D` denied by `denyOut`, `P` allowed by
/// default (no rule matched). `None` for any other letter.
pub(crate) fn entry_from_nflog(
    prefix_rest: &str,
    summary: &PacketSummary,
    timestamp: DateTime<Utc>,
) -> Option<EgressLogEntry> {
    let (verdict, rule) = match prefix_rest.trim() {
        "A" => (Verdict::Allowed, "allowOut"),
        "D" => (Verdict::Denied, "denyOut"),
        "P" => (Verdict::Allowed, "default"),
        _ => return None,
    };
    Some(EgressLogEntry {
        timestamp,
        protocol: summary.protocol.to_owned(),
        destination: summary.destination.to_string(),
        port: summary.port,
        name: None,
        verdict,
        rule: rule.to_owned(),
        count: 1,
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use std::net::Ipv4Addr;

    use super::*;

    fn t0() -> DateTime<Utc> {
        DateTime::parse_from_rfc3339("2025-01-02T03:04:05.000Z")
            .unwrap()
            .with_timezone(&Utc)
    }

    fn entry(ms: i64, port: u16) -> EgressLogEntry {
        EgressLogEntry {
            timestamp: t0() + TimeDelta::milliseconds(ms),
            protocol: "tcp".into(),
            destination: "198.18.0.2".into(),
            port: Some(port),
            name: None,
            verdict: Verdict::Denied,
            rule: "denyOut".into(),
            count: 1,
        }
    }

    fn lines(path: &Path) -> usize {
        fs::read_to_string(path).map_or(0, |s| s.lines().count())
    }

    #[test]
    fn merges_within_one_second_not_after() {
        let dir = tempfile::tempdir().unwrap();
        let log = EgressLog::open(&dir.path().join("egress.jsonl"), 2000);
        log.record(entry(0, 80));
        log.record(entry(400, 80));
        log.record(entry(1000, 80));
        // Another tuple in between does not stop merging.
        log.record(entry(1000, 81));
        log.record(entry(900, 80));
        let e = log.entries(None, 100);
        assert_eq!(e.len(), 2);
        assert_eq!(e[0].count, 4);
        assert_eq!(e[0].timestamp, t0());
        assert_eq!(e[1].port, Some(81));

        // 1.001 s after the first: a new entry.
        log.record(entry(1001, 80));
        let e = log.entries(None, 100);
        assert_eq!(e.len(), 3);
        assert_eq!(e[2].timestamp, t0() + TimeDelta::milliseconds(1001));
        assert_eq!(e[2].count, 1);

        // Any differing field is another tuple.
        let mut named = entry(1001, 80);
        named.name = Some("x.test".into());
        log.record(named);
        let mut allowed = entry(1001, 80);
        allowed.verdict = Verdict::Allowed;
        log.record(allowed);
        assert_eq!(log.len(), 5);
    }

    #[test]
    fn only_the_last_few_entries_are_merge_candidates() {
        let dir = tempfile::tempdir().unwrap();
        let log = EgressLog::open(&dir.path().join("egress.jsonl"), 2000);
        log.record(entry(0, 1));
        for port in 2..=u16::try_from(MERGE_WINDOW + 1).unwrap() {
            log.record(entry(0, port));
        }
        // Port 1 fell out of the window: a new entry.
        log.record(entry(10, 1));
        assert_eq!(log.len(), MERGE_WINDOW + 2);
    }

    #[test]
    fn keeps_exactly_capacity() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("egress.jsonl");
        let log = EgressLog::open(&path, 2000);
        for i in 0..3000u16 {
            log.record(entry(i64::from(i), i));
        }
        let e = log.entries(None, usize::MAX);
        assert_eq!(e.len(), 2000);
        assert_eq!(e[0].port, Some(1000));
        assert_eq!(e[1999].port, Some(2999));
        drop(log);
        let log = EgressLog::open(&path, 2000);
        assert_eq!(log.entries(None, usize::MAX), e);
    }

    #[test]
    fn entries_since_and_limit() {
        let dir = tempfile::tempdir().unwrap();
        let log = EgressLog::open(&dir.path().join("egress.jsonl"), 2000);
        for i in 0..10u16 {
            log.record(entry(i64::from(i) * 2000, i));
        }
        let ports = |v: Vec<EgressLogEntry>| v.iter().map(|e| e.port.unwrap()).collect::<Vec<_>>();
        assert_eq!(ports(log.entries(None, 3)), [0, 1, 2]);
        let since = t0() + TimeDelta::milliseconds(14_000);
        assert_eq!(ports(log.entries(Some(since), 100)), [7, 8, 9]);
        assert_eq!(ports(log.entries(Some(since), 2)), [7, 8]);
        assert!(log.entries(None, 0).is_empty());
    }

    #[test]
    fn reopen_gives_the_same_entries_with_final_counts() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("egress.jsonl");
        let log = EgressLog::open(&path, 2000);
        for i in 0..50u16 {
            // Three repeats each: counts 3.
            for r in 0..3 {
                log.record(entry(i64::from(i) * 1500 + r * 100, i % 7));
            }
        }
        let before = log.entries(None, usize::MAX);
        assert_eq!(before.len(), 50);
        assert!(before.iter().all(|e| e.count == 3));

        // Without a flush (as after a crash) every entry is on disk; all
        // but the still-open ones have their final count.
        let crashed = EgressLog::open(&path, 2000);
        let seen = crashed.entries(None, usize::MAX);
        assert_eq!(seen.len(), 50);
        assert!(seen[..50 - MERGE_WINDOW].iter().all(|e| e.count == 3));
        drop(crashed);

        drop(log);
        // At most two lines per entry.
        assert!(lines(&path) <= 100);
        let reopened = EgressLog::open(&path, 2000);
        assert_eq!(reopened.entries(None, usize::MAX), before);

        // And recording goes on after a reload.
        reopened.record(entry(1_000_000, 1));
        drop(reopened);
        let again = EgressLog::open(&path, 2000);
        assert_eq!(again.len(), 51);
    }

    #[test]
    fn rotates_at_the_limit_and_keeps_two_files() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("egress.jsonl");
        let limit = 4096;
        let log = EgressLog::open_with(&path, 2000, limit);
        for i in 0..500u16 {
            log.record(entry(i64::from(i) * 2000, i));
        }
        drop(log);
        let mut files: Vec<String> = fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        files.sort();
        assert_eq!(files, ["egress.jsonl", "egress.jsonl.1"]);
        for f in &files {
            let size = fs::metadata(dir.path().join(f)).unwrap().len();
            assert!(size <= limit, "{f}: {size} bytes");
        }
        // Reload holds the newest entries of both files, in order.
        let log = EgressLog::open_with(&path, 2000, limit);
        let e = log.entries(None, usize::MAX);
        let total = lines(&path) + lines(&rotated_path(&path));
        assert_eq!(e.len(), total);
        assert_eq!(e.last().unwrap().port, Some(499));
        assert!(
            e.windows(2)
                .all(|w| w[0].port.unwrap() + 1 == w[1].port.unwrap())
        );
    }

    #[test]
    fn corrupt_and_partial_lines_are_skipped() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("egress.jsonl");
        let good = |i: u16| serde_json::to_string(&entry(i64::from(i) * 2000, i)).unwrap();
        fs::write(
            &path,
            format!(
                "{}\nnot json\n\n{{\"timestamp\":1}}\n{}\n{}",
                good(1),
                good(2),
                &good(3)[..20]
            ),
        )
        .unwrap();
        fs::write(rotated_path(&path), format!("{}\n\u{0}garbage\n", good(0))).unwrap();
        let log = EgressLog::open(&path, 2000);
        let ports: Vec<u16> = log
            .entries(None, 100)
            .iter()
            .map(|e| e.port.unwrap())
            .collect();
        assert_eq!(ports, [0, 1, 2]);

        // The partial last line is ended before the next append, so the new
        // entry is readable.
        log.record(entry(100_000, 9));
        drop(log);
        let log = EgressLog::open(&path, 2000);
        let ports: Vec<u16> = log
            .entries(None, 100)
            .iter()
            .map(|e| e.port.unwrap())
            .collect();
        assert_eq!(ports, [0, 1, 2, 9]);
    }

    #[test]
    fn drop_never_recreates_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let sandbox = dir.path().join("sbx");
        fs::create_dir(&sandbox).unwrap();
        let path = sandbox.join("egress.jsonl");
        // Nothing written yet (no file open): drop writes nothing.
        let log = EgressLog::open(&path, 2000);
        drop(log);
        assert!(!path.exists());
        // Written, then the file removed (teardown): drop does not bring
        // it back.
        let log = EgressLog::open(&path, 2000);
        log.record(entry(0, 1));
        log.record(entry(10, 1));
        fs::remove_file(&path).unwrap();
        drop(log);
        assert!(!path.exists());
    }

    #[test]
    fn io_errors_do_not_stop_the_ring() {
        let dir = tempfile::tempdir().unwrap();
        let log = EgressLog::open(&dir.path().join("missing/egress.jsonl"), 10);
        for i in 0..20u16 {
            log.record(entry(i64::from(i) * 2000, i));
        }
        assert_eq!(log.len(), 10);
        log.flush();
    }

    #[test]
    fn nflog_prefix_letters() {
        let s = PacketSummary {
            protocol: "udp",
            destination: Ipv4Addr::new(8, 8, 4, 4),
            port: Some(53),
        };
        let e = entry_from_nflog("A", &s, t0()).unwrap();
        assert_eq!((e.verdict, e.rule.as_str()), (Verdict::Allowed, "allowOut"));
        assert_eq!(e.protocol, "udp");
        assert_eq!(e.destination, "8.8.4.4");
        assert_eq!(e.port, Some(53));
        assert_eq!(e.count, 1);
        assert_eq!(e.timestamp, t0());
        let e = entry_from_nflog("D", &s, t0()).unwrap();
        assert_eq!((e.verdict, e.rule.as_str()), (Verdict::Denied, "denyOut"));
        let e = entry_from_nflog(" P ", &s, t0()).unwrap();
        assert_eq!((e.verdict, e.rule.as_str()), (Verdict::Allowed, "default"));
        assert!(entry_from_nflog("X", &s, t0()).is_none());
        assert!(entry_from_nflog("", &s, t0()).is_none());
    }
}
