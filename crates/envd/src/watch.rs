//! Directory watches (`WatchDir` streams and the polled `CreateWatcher`
//! family) on inotify, with the event kinds and order of CONTRACT 3.4.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};

use arca_proto::connect::{Code, ConnectError};
use arca_proto::filesystem::{
    CreateWatcherRequest, CreateWatcherResponse, EventType, FilesystemEvent,
    GetWatcherEventsRequest, GetWatcherEventsResponse, RemoveWatcherRequest, RemoveWatcherResponse,
    WatchDirRequest, WatchDirResponse, watch_dir_response,
};
use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify, WatchDescriptor};
use rand::Rng as _;
use tokio::io::unix::AsyncFd;

use crate::fsys::entry_info;
use crate::rpc::{CallCtx, Sink};
use crate::{State, paths, sys};

/// Events kept for a polled watcher between two `GetWatcherEvents` calls;
/// the oldest are dropped beyond this.
const BUFFERED_EVENTS_MAX: usize = 10_000;

/// File system types on which watches are refused unless the client allows
/// network mounts: NFS, SMB, CIFS, SMB2 and FUSE.
const NETWORK_FS_MAGICS: [u64; 5] = [0x6969, 0x517B, 0xFF53_4D42, 0xFE53_4D42, 0x6573_5546];

fn watch_flags() -> AddWatchFlags {
    AddWatchFlags::IN_CREATE
        | AddWatchFlags::IN_MODIFY
        | AddWatchFlags::IN_ATTRIB
        | AddWatchFlags::IN_DELETE
        | AddWatchFlags::IN_MOVED_FROM
        | AddWatchFlags::IN_MOVED_TO
        | AddWatchFlags::IN_DONT_FOLLOW
}

/// The event kinds one inotify record stands for, in the contract's order
/// (CREATE, RENAME, CHMOD, WRITE, REMOVE).
pub(crate) fn kinds(mask: AddWatchFlags) -> Vec<EventType> {
    let mut out = Vec::new();
    if mask.intersects(AddWatchFlags::IN_CREATE | AddWatchFlags::IN_MOVED_TO) {
        out.push(EventType::Create);
    }
    if mask.contains(AddWatchFlags::IN_MOVED_FROM) {
        out.push(EventType::Rename);
    }
    if mask.contains(AddWatchFlags::IN_ATTRIB) {
        out.push(EventType::Chmod);
    }
    if mask.contains(AddWatchFlags::IN_MODIFY) {
        out.push(EventType::Write);
    }
    if mask.contains(AddWatchFlags::IN_DELETE) {
        out.push(EventType::Remove);
    }
    out
}

/// Drops an event that repeats the one just before it (same name, same
/// kind), as inotify itself does for unread duplicates: a file written in
/// several chunks is one WRITE.
pub(crate) fn coalesce(events: Vec<(String, EventType)>) -> Vec<(String, EventType)> {
    let mut out: Vec<(String, EventType)> = Vec::with_capacity(events.len());
    for ev in events {
        if out.last() != Some(&ev) {
            out.push(ev);
        }
    }
    out
}

/// One inotify instance over a directory (and its subdirectories).
struct Watch {
    fd: AsyncFd<sys::PolledInotify>,
    root: PathBuf,
    dirs: HashMap<WatchDescriptor, PathBuf>,
    recursive: bool,
    include_entry: bool,
    state: Arc<State>,
    /// Events synthesised for a new directory's existing contents.
    pending: Vec<(String, EventType)>,
}

impl Watch {
    fn open(
        state: Arc<State>,
        root: PathBuf,
        recursive: bool,
        include_entry: bool,
        allow_network_mounts: bool,
    ) -> Result<Watch, ConnectError> {
        let meta =
            std::fs::metadata(&root).map_err(|e| crate::error::io_error(&e, "watch", &root))?;
        if !meta.is_dir() {
            return Err(ConnectError::new(
                Code::InvalidArgument,
                format!(
                    "{} is not a directory; only directories can be watched",
                    root.display()
                ),
            ));
        }
        if !allow_network_mounts {
            if let Ok(fs) = nix::sys::statfs::statfs(&root) {
                // f_type is signed on glibc and unsigned on musl.
                #[allow(clippy::cast_sign_loss, clippy::unnecessary_cast)]
                let magic = fs.filesystem_type().0 as u64;
                if NETWORK_FS_MAGICS.contains(&magic) {
                    return Err(ConnectError::new(
                        Code::FailedPrecondition,
                        format!(
                            "{} is on a network file system; pass allow_network_mounts to watch it",
                            root.display()
                        ),
                    ));
                }
            }
        }
        let inotify =
            Inotify::init(InitFlags::IN_NONBLOCK | InitFlags::IN_CLOEXEC).map_err(|e| {
                ConnectError::new(
                    Code::ResourceExhausted,
                    format!("cannot create a watch: {e}"),
                )
            })?;
        let fd = sys::poll_inotify(inotify)
            .map_err(|e| ConnectError::new(Code::Internal, format!("cannot poll a watch: {e}")))?;
        let mut w = Watch {
            fd,
            root,
            dirs: HashMap::new(),
            recursive,
            include_entry,
            state,
            pending: Vec::new(),
        };
        w.add_tree(PathBuf::new(), false)?;
        Ok(w)
    }

    /// Watches `rel` (relative to the root) and, when recursive, every
    /// directory below it. With `synthesize`, reports what already exists.
    fn add_tree(&mut self, rel: PathBuf, synthesize: bool) -> Result<(), ConnectError> {
        let abs = self.root.join(&rel);
        let wd = self
            .fd
            .get_ref()
            .get()
            .add_watch(&abs, watch_flags())
            .map_err(|e| {
                ConnectError::new(
                    Code::Internal,
                    format!("cannot watch {}: {e}", abs.display()),
                )
            })?;
        self.dirs.insert(wd, rel.clone());
        let mut children: Vec<_> = match std::fs::read_dir(&abs) {
            Ok(rd) => rd.filter_map(Result::ok).collect(),
            Err(_) => return Ok(()),
        };
        children.sort_by_key(std::fs::DirEntry::file_name);
        for child in children {
            let child_rel = rel.join(child.file_name());
            let Ok(ft) = child.file_type() else { continue };
            if synthesize {
                self.pending.push((display(&child_rel), EventType::Create));
                if ft.is_file() && child.metadata().is_ok_and(|m| m.len() > 0) {
                    self.pending.push((display(&child_rel), EventType::Write));
                }
            }
            if self.recursive && ft.is_dir() {
                // A directory that vanished meanwhile is simply not watched.
                let _ = self.add_tree(child_rel, synthesize);
            }
        }
        Ok(())
    }

    fn to_event(&self, (name, kind): (String, EventType)) -> FilesystemEvent {
        let entry = if self.include_entry
            && matches!(
                kind,
                EventType::Create | EventType::Write | EventType::Chmod
            ) {
            entry_info(&self.root.join(&name), &self.state.users.names()).ok()
        } else {
            None
        };
        FilesystemEvent {
            name,
            r#type: kind.into(),
            entry,
        }
    }

    /// Waits for the next batch of events.
    async fn next_batch(&mut self) -> Result<Vec<FilesystemEvent>, ConnectError> {
        loop {
            if !self.pending.is_empty() {
                let batch = coalesce(std::mem::take(&mut self.pending));
                return Ok(batch.into_iter().map(|e| self.to_event(e)).collect());
            }
            let mut guard = self
                .fd
                .readable()
                .await
                .map_err(|e| ConnectError::new(Code::Internal, format!("watch failed: {e}")))?;
            let records = match guard.try_io(|fd| {
                fd.get_ref()
                    .get()
                    .read_events()
                    .map_err(std::io::Error::from)
            }) {
                Ok(Ok(r)) => r,
                Ok(Err(e)) => {
                    return Err(ConnectError::new(
                        Code::Internal,
                        format!("watch failed: {e}"),
                    ));
                }
                Err(_would_block) => continue,
            };
            drop(guard);
            let mut raw = Vec::new();
            for rec in records {
                if rec.mask.contains(AddWatchFlags::IN_IGNORED) {
                    self.dirs.remove(&rec.wd);
                    continue;
                }
                let Some(dir) = self.dirs.get(&rec.wd).cloned() else {
                    continue;
                };
                let Some(name) = rec.name.as_deref() else {
                    continue;
                };
                let rel = dir.join(name);
                for kind in kinds(rec.mask) {
                    raw.push((display(&rel), kind));
                }
                let new_dir = rec.mask.contains(AddWatchFlags::IN_ISDIR)
                    && rec
                        .mask
                        .intersects(AddWatchFlags::IN_CREATE | AddWatchFlags::IN_MOVED_TO);
                if self.recursive && new_dir {
                    // Watch it right away, then report what was written into
                    // it before the watch was in place.
                    let _ = self.add_tree(rel, true);
                    raw.append(&mut self.pending);
                }
            }
            let batch = coalesce(raw);
            if !batch.is_empty() {
                return Ok(batch.into_iter().map(|e| self.to_event(e)).collect());
            }
        }
    }
}

fn display(p: &Path) -> String {
    p.as_os_str().to_string_lossy().into_owned()
}

fn open_watch(
    state: &Arc<State>,
    ctx: &CallCtx,
    path: &str,
    recursive: bool,
    include_entry: bool,
    allow_network_mounts: bool,
) -> Result<Watch, ConnectError> {
    let root = paths::resolve(path, &ctx.user, state.default_workdir().as_deref())?;
    Watch::open(
        state.clone(),
        root,
        recursive,
        include_entry,
        allow_network_mounts,
    )
}

/// `WatchDir`: `start` at once, then events, keepalives when idle.
pub(crate) async fn watch_dir(
    state: Arc<State>,
    ctx: CallCtx,
    req: WatchDirRequest,
    sink: Sink<WatchDirResponse>,
) -> Result<(), ConnectError> {
    let mut w = open_watch(
        &state,
        &ctx,
        &req.path,
        req.recursive,
        req.include_entry,
        req.allow_network_mounts,
    )?;
    let msg = |e| WatchDirResponse { event: Some(e) };
    if sink
        .send(&msg(watch_dir_response::Event::Start(
            watch_dir_response::StartEvent {},
        )))
        .await
        .is_err()
    {
        return Ok(());
    }
    loop {
        tokio::select! {
            batch = w.next_batch() => {
                for ev in batch? {
                    if sink.send(&msg(watch_dir_response::Event::Filesystem(ev))).await.is_err() {
                        return Ok(());
                    }
                }
            }
            () = tokio::time::sleep(ctx.keepalive) => {
                let ka = msg(watch_dir_response::Event::Keepalive(watch_dir_response::KeepAlive {}));
                if sink.send(&ka).await.is_err() {
                    return Ok(());
                }
            }
            () = sink.closed() => return Ok(()),
        }
    }
}

struct Buffered {
    events: Mutex<Vec<FilesystemEvent>>,
    task: tokio::task::JoinHandle<()>,
}

/// Watchers polled with `GetWatcherEvents`, by id.
#[derive(Default)]
pub(crate) struct Watchers {
    map: Mutex<HashMap<String, Arc<Buffered>>>,
}

/// `CreateWatcher`: the watch is in place when the call returns.
pub(crate) async fn create_watcher(
    state: Arc<State>,
    ctx: CallCtx,
    req: CreateWatcherRequest,
) -> Result<CreateWatcherResponse, ConnectError> {
    let mut w = open_watch(
        &state,
        &ctx,
        &req.path,
        req.recursive,
        req.include_entry,
        req.allow_network_mounts,
    )?;
    let id: String = format!(
        "w{}",
        rand::rng()
            .sample_iter(rand::distr::Alphanumeric)
            .take(16)
            .map(|c| char::from(c).to_ascii_lowercase())
            .collect::<String>()
    );
    let (tx, rx) = tokio::sync::oneshot::channel::<Arc<Buffered>>();
    let task = tokio::spawn(async move {
        let Ok(me) = rx.await else { return };
        while let Ok(batch) = w.next_batch().await {
            let mut events = me.events.lock().unwrap_or_else(PoisonError::into_inner);
            events.extend(batch);
            let excess = events.len().saturating_sub(BUFFERED_EVENTS_MAX);
            events.drain(..excess);
        }
    });
    let buffered = Arc::new(Buffered {
        events: Mutex::new(Vec::new()),
        task,
    });
    let _ = tx.send(buffered.clone());
    state
        .watchers
        .map
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .insert(id.clone(), buffered);
    Ok(CreateWatcherResponse { watcher_id: id })
}

fn watcher(state: &State, id: &str) -> Result<Arc<Buffered>, ConnectError> {
    state
        .watchers
        .map
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .get(id)
        .cloned()
        .ok_or_else(|| ConnectError::new(Code::NotFound, format!("watcher '{id}' not found")))
}

/// `GetWatcherEvents`: returns and clears the buffer.
pub(crate) async fn get_watcher_events(
    state: Arc<State>,
    _ctx: CallCtx,
    req: GetWatcherEventsRequest,
) -> Result<GetWatcherEventsResponse, ConnectError> {
    let w = watcher(&state, &req.watcher_id)?;
    let events = std::mem::take(&mut *w.events.lock().unwrap_or_else(PoisonError::into_inner));
    Ok(GetWatcherEventsResponse { events })
}

/// `RemoveWatcher`.
pub(crate) async fn remove_watcher(
    state: Arc<State>,
    _ctx: CallCtx,
    req: RemoveWatcherRequest,
) -> Result<RemoveWatcherResponse, ConnectError> {
    let w = state
        .watchers
        .map
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .remove(&req.watcher_id)
        .ok_or_else(|| {
            ConnectError::new(
                Code::NotFound,
                format!("watcher '{}' not found", req.watcher_id),
            )
        })?;
    w.task.abort();
    Ok(RemoveWatcherResponse {})
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_record_maps_to_kinds_in_contract_order() {
        let m = AddWatchFlags::IN_MODIFY | AddWatchFlags::IN_ATTRIB | AddWatchFlags::IN_CREATE;
        assert_eq!(
            kinds(m),
            [EventType::Create, EventType::Chmod, EventType::Write]
        );
        assert_eq!(kinds(AddWatchFlags::IN_MOVED_FROM), [EventType::Rename]);
        assert_eq!(kinds(AddWatchFlags::IN_MOVED_TO), [EventType::Create]);
        assert_eq!(kinds(AddWatchFlags::IN_DELETE), [EventType::Remove]);
    }

    #[test]
    fn repeated_events_coalesce_but_distinct_ones_stay_in_order() {
        let e = |n: &str, k| (n.to_string(), k);
        let got = coalesce(vec![
            e("a", EventType::Create),
            e("a", EventType::Chmod),
            e("a", EventType::Write),
            e("a", EventType::Write),
            e("b", EventType::Write),
            e("a", EventType::Write),
        ]);
        assert_eq!(
            got,
            vec![
                e("a", EventType::Create),
                e("a", EventType::Chmod),
                e("a", EventType::Write),
                e("b", EventType::Write),
                e("a", EventType::Write),
            ]
        );
    }
}
