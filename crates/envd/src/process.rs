//! The `process.Process` service (CONTRACT 3.3) and envd's PID 1 duties.
//!
//! Children are started with [`crate::sys::spawn`] and never waited for
//! through std or tokio: one reaper collects every exit with `waitpid(-1)`,
//! hands the statuses of envd's own children to their process records and
//! simply reaps orphans that the kernel re-parented to envd.

use std::collections::{HashMap, VecDeque};
use std::os::fd::{AsFd, OwnedFd};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use arca_proto::connect::{Code, ConnectError};
use arca_proto::process::{
    CloseStdinRequest, CloseStdinResponse, ConnectRequest, ConnectResponse, ListRequest,
    ListResponse, ProcessConfig, ProcessEvent, ProcessInfo, ProcessInput, ProcessSelector,
    SendInputRequest, SendInputResponse, SendSignalRequest, SendSignalResponse, Signal,
    StartRequest, StartResponse, StreamInputRequest, StreamInputResponse, UpdateRequest,
    UpdateResponse, process_event, process_input, process_selector, stream_input_request,
};
use nix::fcntl::OFlag;
use nix::sys::signal::{self, Signal as NixSignal};
use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};
use nix::unistd::Pid;
use tokio::io::unix::AsyncFd;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::unix::pipe;
use tokio::sync::{Notify, mpsc, oneshot, watch};

use crate::rpc::{CallCtx, Incoming, Sink};
use crate::{State, paths, sys};

/// Largest data event for stdout/stderr (reference chunking).
const PIPE_CHUNK: usize = 32 * 1024;
/// Largest data event for a terminal.
const PTY_CHUNK: usize = 16 * 1024;
/// How long an ended process can still be attached to with `Connect`.
const ENDED_RETENTION: Duration = Duration::from_secs(30);
/// Upper bound on waiting for a SIGKILLed process to be reaped.
const KILL_REAP_WAIT: Duration = Duration::from_secs(5);

/// Something that happened to a process, for its subscribers.
#[derive(Clone)]
enum Event {
    Data(process_event::data_event::Output),
    End(process_event::EndEvent),
}

enum Input {
    /// stdin is `/dev/null`.
    None,
    /// A pipe to the process's stdin; `None` once closed.
    Pipe(tokio::sync::Mutex<Option<pipe::Sender>>),
    /// The terminal's master side.
    Pty(Arc<AsyncFd<OwnedFd>>),
}

/// A process envd started.
struct Proc {
    pid: u32,
    config: ProcessConfig,
    tag: Option<String>,
    input: Input,
    /// Live subscribers; the end event is set once, under this lock.
    subs: Mutex<Subscribers>,
    /// Set by SendSignal and timeouts: stop reading output once it exits.
    stop_output: Notify,
    stopped: std::sync::atomic::AtomicBool,
    done: watch::Sender<bool>,
}

#[derive(Default)]
struct Subscribers {
    senders: Vec<mpsc::Sender<Event>>,
    end: Option<process_event::EndEvent>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Proc {
    /// Subscribes to live events; `Err` carries the end event of a process
    /// that has already ended.
    fn subscribe(&self) -> Result<mpsc::Receiver<Event>, process_event::EndEvent> {
        let mut subs = lock(&self.subs);
        if let Some(end) = &subs.end {
            return Err(end.clone());
        }
        let (tx, rx) = mpsc::channel(64);
        subs.senders.push(tx);
        Ok(rx)
    }

    async fn publish(&self, ev: Event) {
        let senders = lock(&self.subs).senders.clone();
        let mut gone = false;
        for s in &senders {
            gone |= s.send(ev.clone()).await.is_err();
        }
        if gone {
            lock(&self.subs).senders.retain(|s| !s.is_closed());
        }
    }

    async fn finish(&self, end: process_event::EndEvent) {
        let senders = {
            let mut subs = lock(&self.subs);
            subs.end = Some(end.clone());
            std::mem::take(&mut subs.senders)
        };
        for s in senders {
            let _ = s.send(Event::End(end.clone())).await;
        }
        let _ = self.done.send(true);
    }

    fn stop_output(&self) {
        self.stopped
            .store(true, std::sync::atomic::Ordering::SeqCst);
        self.stop_output.notify_waiters();
    }

    fn info(&self) -> ProcessInfo {
        ProcessInfo {
            config: Some(self.config.clone()),
            pid: self.pid,
            tag: self.tag.clone(),
        }
    }
}

#[derive(Default)]
struct Table {
    running: HashMap<u32, Arc<Proc>>,
    ended: VecDeque<(Instant, Arc<Proc>)>,
    /// Exit waiters by pid, filled while the table is locked around spawn so
    /// the reaper can never see an exit before its waiter exists.
    waiters: HashMap<i32, oneshot::Sender<WaitStatus>>,
}

impl Table {
    fn prune(&mut self) {
        while let Some((at, _)) = self.ended.front() {
            if at.elapsed() > ENDED_RETENTION {
                self.ended.pop_front();
            } else {
                break;
            }
        }
    }
}

/// Every process envd started, running or recently ended.
pub(crate) struct Processes {
    table: Mutex<Table>,
}

impl Processes {
    pub(crate) fn new() -> Self {
        Processes {
            table: Mutex::new(Table::default()),
        }
    }

    fn find(&self, sel: Option<&ProcessSelector>) -> Result<Arc<Proc>, ConnectError> {
        let mut t = lock(&self.table);
        t.prune();
        let sel = sel.and_then(|s| s.selector.as_ref()).ok_or_else(|| {
            ConnectError::new(
                Code::InvalidArgument,
                "no process selector (pid or tag) given",
            )
        })?;
        let found = match sel {
            process_selector::Selector::Pid(pid) => t.running.get(pid).cloned().or_else(|| {
                t.ended
                    .iter()
                    .rev()
                    .find(|(_, p)| p.pid == *pid)
                    .map(|(_, p)| p.clone())
            }),
            process_selector::Selector::Tag(tag) => t
                .running
                .values()
                .find(|p| p.tag.as_deref() == Some(tag))
                .cloned()
                .or_else(|| {
                    t.ended
                        .iter()
                        .rev()
                        .find(|(_, p)| p.tag.as_deref() == Some(tag))
                        .map(|(_, p)| p.clone())
                }),
        };
        found.ok_or_else(|| {
            let what = match sel {
                process_selector::Selector::Pid(pid) => format!("pid {pid}"),
                process_selector::Selector::Tag(tag) => format!("tag '{tag}'"),
            };
            ConnectError::new(Code::NotFound, format!("process with {what} not found"))
        })
    }

    fn find_running(&self, sel: Option<&ProcessSelector>) -> Result<Arc<Proc>, ConnectError> {
        let p = self.find(sel)?;
        if lock(&p.subs).end.is_some() {
            return Err(ConnectError::new(
                Code::NotFound,
                format!("process with pid {} has already exited", p.pid),
            ));
        }
        Ok(p)
    }

    /// Called by the reaper for every collected child.
    fn reaped(&self, status: WaitStatus) {
        let Some(pid) = status.pid() else { return };
        if let Some(tx) = lock(&self.table).waiters.remove(&pid.as_raw()) {
            let _ = tx.send(status);
        }
    }

    pub(crate) async fn terminate_all(&self, grace: Duration) {
        let procs: Vec<Arc<Proc>> = lock(&self.table).running.values().cloned().collect();
        for p in &procs {
            let _ = signal::killpg(pid(p.pid), NixSignal::SIGTERM);
        }
        let deadline = tokio::time::Instant::now() + grace;
        for p in &procs {
            let mut done = p.done.subscribe();
            let waited = tokio::time::timeout_at(deadline, done.wait_for(|d| *d))
                .await
                .is_ok();
            if !waited {
                let _ = signal::killpg(pid(p.pid), NixSignal::SIGKILL);
            }
        }
    }
}

fn pid(p: u32) -> Pid {
    Pid::from_raw(i32::try_from(p).unwrap_or(i32::MAX))
}

/// Starts the task that reaps every child of envd. Call once, before the
/// first process is started.
pub(crate) fn start_reaper(state: Arc<State>) -> std::io::Result<()> {
    if std::process::id() != 1 {
        // Outside a sandbox, orphans of our processes still come back to us.
        let _ = nix::sys::prctl::set_child_subreaper(true);
    }
    let mut sigchld = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::child())?;
    tokio::spawn(async move {
        loop {
            reap_all(&state);
            // A lost wakeup cannot strand an exit for long: poll as well.
            let _ = tokio::time::timeout(Duration::from_secs(1), sigchld.recv()).await;
        }
    });
    Ok(())
}

fn reap_all(state: &State) {
    loop {
        match waitpid(None, Some(WaitPidFlag::WNOHANG)) {
            Ok(WaitStatus::StillAlive) | Err(_) => return,
            Ok(status) => state.procs.reaped(status),
        }
    }
}

fn signal_name(sig: NixSignal) -> &'static str {
    // The wording of Go's os.ProcessState, which the SDKs show to users.
    match sig {
        NixSignal::SIGKILL => "killed",
        NixSignal::SIGTERM => "terminated",
        NixSignal::SIGINT => "interrupt",
        NixSignal::SIGHUP => "hangup",
        NixSignal::SIGQUIT => "quit",
        NixSignal::SIGABRT => "aborted",
        NixSignal::SIGSEGV => "segmentation fault",
        NixSignal::SIGBUS => "bus error",
        NixSignal::SIGFPE => "floating point exception",
        NixSignal::SIGILL => "illegal instruction",
        NixSignal::SIGPIPE => "broken pipe",
        NixSignal::SIGALRM => "alarm clock",
        NixSignal::SIGUSR1 => "user defined signal 1",
        NixSignal::SIGUSR2 => "user defined signal 2",
        NixSignal::SIGTRAP => "trace/breakpoint trap",
        NixSignal::SIGXCPU => "CPU time limit exceeded",
        NixSignal::SIGXFSZ => "file size limit exceeded",
        _ => sig.as_str(),
    }
}

/// The end event for a wait status.
fn end_event(status: &WaitStatus) -> process_event::EndEvent {
    match status {
        WaitStatus::Exited(_, code) => {
            let text = format!("exit status {code}");
            process_event::EndEvent {
                exit_code: *code,
                exited: true,
                error: (*code != 0).then(|| text.clone()),
                status: text,
            }
        }
        WaitStatus::Signaled(_, sig, _) => {
            let text = format!("signal: {}", signal_name(*sig));
            process_event::EndEvent {
                exit_code: -1,
                exited: false,
                error: Some(text.clone()),
                status: text,
            }
        }
        other => process_event::EndEvent {
            exit_code: -1,
            exited: false,
            status: format!("{other:?}"),
            error: Some(format!("{other:?}")),
        },
    }
}

fn event_msg(ev: process_event::Event) -> ProcessEvent {
    ProcessEvent { event: Some(ev) }
}

fn pipe_pair() -> Result<(OwnedFd, OwnedFd), ConnectError> {
    nix::unistd::pipe2(OFlag::O_CLOEXEC)
        .map_err(|e| ConnectError::new(Code::Internal, format!("cannot create a pipe: {e}")))
}

fn pty_size(req: &StartRequest) -> (u16, u16) {
    let size = req.pty.as_ref().and_then(|p| p.size);
    let clamp = |v: u32, d: u16| {
        if v == 0 {
            d
        } else {
            u16::try_from(v).unwrap_or(u16::MAX)
        }
    };
    size.map_or((80, 24), |s| (clamp(s.cols, 80), clamp(s.rows, 24)))
}

/// Stdio of a new process and what envd keeps of it.
struct Plumbing {
    child: (OwnedFd, OwnedFd, OwnedFd),
    input: Input,
    outputs: Vec<(OutputKind, OwnedFd)>,
}

#[derive(Clone, Copy)]
enum OutputKind {
    Stdout,
    Stderr,
    Pty,
}

fn plumbing(req: &StartRequest) -> Result<Plumbing, ConnectError> {
    let internal = |what: &str, e: nix::Error| {
        ConnectError::new(Code::Internal, format!("cannot {what}: {e}"))
    };
    if req.pty.is_some() {
        let (cols, rows) = pty_size(req);
        let ws = nix::pty::Winsize {
            ws_row: rows,
            ws_col: cols,
            ws_xpixel: 0,
            ws_ypixel: 0,
        };
        let pty = nix::pty::openpty(Some(&ws), None).map_err(|e| internal("open a terminal", e))?;
        for fd in [&pty.master, &pty.slave] {
            nix::fcntl::fcntl(
                fd,
                nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::FD_CLOEXEC),
            )
            .map_err(|e| internal("set up a terminal", e))?;
        }
        nix::fcntl::fcntl(
            &pty.master,
            nix::fcntl::FcntlArg::F_SETFL(OFlag::O_NONBLOCK),
        )
        .map_err(|e| internal("set up a terminal", e))?;
        let dup = |fd: &OwnedFd| {
            fd.try_clone().map_err(|e| {
                ConnectError::new(Code::Internal, format!("cannot set up a terminal: {e}"))
            })
        };
        let slave = (dup(&pty.slave)?, dup(&pty.slave)?, pty.slave);
        let master_out = dup(&pty.master)?;
        let master = sys::poll_fd(pty.master).map_err(|e| {
            ConnectError::new(Code::Internal, format!("cannot poll a terminal: {e}"))
        })?;
        return Ok(Plumbing {
            child: slave,
            input: Input::Pty(Arc::new(master)),
            outputs: vec![(OutputKind::Pty, master_out)],
        });
    }
    let (stdin_child, input) = if req.stdin == Some(false) {
        let null = std::fs::File::open("/dev/null").map_err(|e| {
            ConnectError::new(Code::Internal, format!("cannot open /dev/null: {e}"))
        })?;
        (OwnedFd::from(null), Input::None)
    } else {
        let (r, w) = pipe_pair()?;
        let sender = pipe::Sender::from_owned_fd(w)
            .map_err(|e| ConnectError::new(Code::Internal, format!("cannot set up stdin: {e}")))?;
        (r, Input::Pipe(tokio::sync::Mutex::new(Some(sender))))
    };
    let (out_r, out_w) = pipe_pair()?;
    let (err_r, err_w) = pipe_pair()?;
    Ok(Plumbing {
        child: (stdin_child, out_w, err_w),
        input,
        outputs: vec![(OutputKind::Stdout, out_r), (OutputKind::Stderr, err_r)],
    })
}

fn output(kind: OutputKind, data: Vec<u8>) -> process_event::data_event::Output {
    use process_event::data_event::Output;
    match kind {
        OutputKind::Stdout => Output::Stdout(data),
        OutputKind::Stderr => Output::Stderr(data),
        OutputKind::Pty => Output::Pty(data),
    }
}

/// Reads one output until EOF (or EIO on a terminal) and publishes it.
async fn pump(proc_: Arc<Proc>, kind: OutputKind, fd: OwnedFd) {
    match kind {
        OutputKind::Pty => {
            let Ok(fd) = sys::poll_fd(fd) else { return };
            let mut buf = vec![0u8; PTY_CHUNK];
            loop {
                let Ok(mut guard) = fd.readable().await else {
                    return;
                };
                match guard.try_io(|inner| {
                    nix::unistd::read(inner.get_ref().as_fd(), &mut buf)
                        .map_err(std::io::Error::from)
                }) {
                    Ok(Ok(0)) | Ok(Err(_)) => return, // EOF, or EIO once the child side closed
                    Ok(Ok(n)) => {
                        proc_
                            .publish(Event::Data(output(kind, buf[..n].to_vec())))
                            .await
                    }
                    Err(_would_block) => {}
                }
            }
        }
        OutputKind::Stdout | OutputKind::Stderr => {
            let Ok(mut rx) = pipe::Receiver::from_owned_fd(fd) else {
                return;
            };
            let mut buf = vec![0u8; PIPE_CHUNK];
            loop {
                match rx.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => {
                        proc_
                            .publish(Event::Data(output(kind, buf[..n].to_vec())))
                            .await
                    }
                }
            }
        }
    }
}

/// Follows one process from spawn to its end event.
async fn supervise(
    state: Arc<State>,
    proc_: Arc<Proc>,
    exit: oneshot::Receiver<WaitStatus>,
    outputs: Vec<(OutputKind, OwnedFd)>,
) {
    let mut readers = tokio::task::JoinSet::new();
    for (kind, fd) in outputs {
        readers.spawn(pump(proc_.clone(), kind, fd));
    }
    let status = exit.await.unwrap_or(WaitStatus::StillAlive);
    // Output is complete when every pipe reached EOF, like a shell pipeline,
    // unless the process was signalled by a client or timed out.
    if !proc_.stopped.load(std::sync::atomic::Ordering::SeqCst) {
        let stop = proc_.stop_output.notified();
        tokio::pin!(stop);
        tokio::select! {
            () = async { while readers.join_next().await.is_some() {} } => {}
            () = &mut stop => {}
        }
    }
    readers.abort_all();
    if let Input::Pipe(stdin) = &proc_.input {
        stdin.lock().await.take();
    }
    proc_.finish(end_event(&status)).await;
    let mut t = lock(&state.procs.table);
    t.running.remove(&proc_.pid);
    t.ended.push_back((Instant::now(), proc_.clone()));
    t.prune();
}

fn resolve_cwd(state: &State, ctx: &CallCtx, cwd: Option<&str>) -> Result<PathBuf, ConnectError> {
    let dir = match cwd {
        Some(c) if !c.is_empty() => paths::resolve(c, &ctx.user, None)?,
        _ => state
            .default_workdir()
            .unwrap_or_else(|| ctx.user.home.clone()),
    };
    if dir.is_dir() {
        return Ok(dir);
    }
    if cwd.is_some_and(|c| !c.is_empty()) {
        return Err(ConnectError::new(
            Code::InvalidArgument,
            format!("cwd '{}' does not exist", dir.display()),
        ));
    }
    Ok(PathBuf::from("/"))
}

fn spawn_proc(
    state: &Arc<State>,
    ctx: &CallCtx,
    req: StartRequest,
) -> Result<(Arc<Proc>, mpsc::Receiver<Event>), ConnectError> {
    let config = req.process.clone().ok_or_else(|| {
        ConnectError::new(Code::InvalidArgument, "StartRequest has no process config")
    })?;
    if config.cmd.is_empty() {
        return Err(ConnectError::new(
            Code::InvalidArgument,
            "process cmd is empty",
        ));
    }
    let cwd = resolve_cwd(state, ctx, config.cwd.as_deref())?;
    let env = state.process_env(&ctx.user, &config.envs);
    let Plumbing {
        child,
        input,
        outputs,
    } = plumbing(&req)?;
    let is_pty = matches!(input, Input::Pty(_));
    let (done, _) = watch::channel(false);
    let (exit_tx, exit_rx) = oneshot::channel();

    // The table stays locked from fork to registration, so the reaper can
    // only look for this pid's waiter after it exists.
    let mut table = lock(&state.procs.table);
    let spawned = sys::spawn(sys::SpawnSpec {
        program: &config.cmd,
        args: &config.args,
        env: &env,
        cwd: &cwd,
        uid: ctx.user.uid,
        gid: ctx.user.gid,
        groups: &ctx.user.groups,
        stdin: child.0,
        stdout: child.1,
        stderr: child.2,
        controlling_tty: is_pty,
    });
    let pid = spawned.map_err(|e| {
        ConnectError::new(
            Code::InvalidArgument,
            format!("cannot start '{}': {e}", config.cmd),
        )
    })?;
    table
        .waiters
        .insert(i32::try_from(pid).unwrap_or(i32::MAX), exit_tx);
    let proc_ = Arc::new(Proc {
        pid,
        config,
        tag: req.tag.clone(),
        input,
        subs: Mutex::new(Subscribers::default()),
        stop_output: Notify::new(),
        stopped: std::sync::atomic::AtomicBool::new(false),
        done,
    });
    let rx = proc_
        .subscribe()
        .map_err(|_| ConnectError::new(Code::Internal, "process ended before it started"))?;
    table.running.insert(pid, proc_.clone());
    drop(table);
    tokio::spawn(supervise(state.clone(), proc_.clone(), exit_rx, outputs));
    Ok((proc_, rx))
}

/// Forwards a process's events to a stream until its end event.
async fn follow<M>(
    sink: &Sink<M>,
    wrap: impl Fn(ProcessEvent) -> M,
    mut events: mpsc::Receiver<Event>,
    keepalive: Duration,
) where
    M: arca_proto::connect::Message,
{
    loop {
        let ev = tokio::select! {
            ev = events.recv() => ev,
            () = tokio::time::sleep(keepalive) => {
                let ka = event_msg(process_event::Event::Keepalive(process_event::KeepAlive {}));
                if sink.send(&wrap(ka)).await.is_err() { return; }
                continue;
            }
            () = sink.closed() => return,
        };
        let Some(ev) = ev else { return };
        let (msg, last) = match ev {
            Event::Data(out) => (
                process_event::Event::Data(process_event::DataEvent { output: Some(out) }),
                false,
            ),
            Event::End(end) => (process_event::Event::End(end), true),
        };
        if sink.send(&wrap(event_msg(msg))).await.is_err() || last {
            return;
        }
    }
}

/// `Start`: spawn, stream `start`, output, keepalives, `end`.
pub(crate) async fn start(
    state: Arc<State>,
    ctx: CallCtx,
    req: StartRequest,
    sink: Sink<StartResponse>,
) -> Result<(), ConnectError> {
    let (proc_, events) = spawn_proc(&state, &ctx, req)?;
    if let Some(lifetime) = ctx.timeout {
        // The call's deadline is the process's lifetime (CONTRACT 4.3),
        // whether or not the client is still listening.
        let p = proc_.clone();
        tokio::spawn(async move {
            let mut done = p.done.subscribe();
            if tokio::time::timeout(lifetime, done.wait_for(|d| *d))
                .await
                .is_err()
            {
                p.stop_output();
                let _ = signal::killpg(pid(p.pid), NixSignal::SIGKILL);
                let _ = signal::kill(pid(p.pid), NixSignal::SIGKILL);
            }
        });
    }
    let wrap = |e| StartResponse { event: Some(e) };
    let start = event_msg(process_event::Event::Start(process_event::StartEvent {
        pid: proc_.pid,
    }));
    if sink.send(&wrap(start)).await.is_err() {
        return Ok(());
    }
    follow(&sink, wrap, events, ctx.keepalive).await;
    Ok(())
}

/// `Connect`: attach to a running (or just ended) process.
pub(crate) async fn connect(
    state: Arc<State>,
    ctx: CallCtx,
    req: ConnectRequest,
    sink: Sink<ConnectResponse>,
) -> Result<(), ConnectError> {
    let proc_ = state.procs.find(req.process.as_ref())?;
    let wrap = |e| ConnectResponse { event: Some(e) };
    let start = event_msg(process_event::Event::Start(process_event::StartEvent {
        pid: proc_.pid,
    }));
    match proc_.subscribe() {
        Ok(events) => {
            if sink.send(&wrap(start)).await.is_ok() {
                follow(&sink, wrap, events, ctx.keepalive).await;
            }
        }
        Err(end) => {
            if sink.send(&wrap(start)).await.is_ok() {
                let _ = sink
                    .send(&wrap(event_msg(process_event::Event::End(end))))
                    .await;
            }
        }
    }
    Ok(())
}

/// `List`: every running process.
pub(crate) async fn list(
    state: Arc<State>,
    _ctx: CallCtx,
    _req: ListRequest,
) -> Result<ListResponse, ConnectError> {
    let t = lock(&state.procs.table);
    let mut processes: Vec<ProcessInfo> = t.running.values().map(|p| p.info()).collect();
    processes.sort_by_key(|p| p.pid);
    Ok(ListResponse { processes })
}

async fn write_input(proc_: &Proc, input: ProcessInput) -> Result<(), ConnectError> {
    let Some(input) = input.input else {
        return Ok(());
    };
    match (input, &proc_.input) {
        (process_input::Input::Stdin(data), Input::Pipe(stdin)) => {
            let mut guard = stdin.lock().await;
            let Some(w) = guard.as_mut() else {
                return Err(ConnectError::new(
                    Code::Internal,
                    format!("stdin of process {} is closed", proc_.pid),
                ));
            };
            w.write_all(&data).await.map_err(|e| {
                ConnectError::new(
                    Code::Internal,
                    format!("cannot write to stdin of process {}: {e}", proc_.pid),
                )
            })
        }
        (process_input::Input::Stdin(_), Input::None) => Err(ConnectError::new(
            Code::Internal,
            format!(
                "process {} was started without stdin; start it with stdin enabled to send input",
                proc_.pid
            ),
        )),
        (process_input::Input::Stdin(_), Input::Pty(_)) => Err(ConnectError::new(
            Code::Internal,
            format!(
                "process {} runs in a terminal; send its input as pty input",
                proc_.pid
            ),
        )),
        (process_input::Input::Pty(data), Input::Pty(master)) => {
            let mut rest: &[u8] = &data;
            while !rest.is_empty() {
                let mut guard = master.writable().await.map_err(|e| {
                    ConnectError::new(
                        Code::Internal,
                        format!("terminal of process {}: {e}", proc_.pid),
                    )
                })?;
                match guard.try_io(|fd| {
                    nix::unistd::write(fd.get_ref(), rest).map_err(std::io::Error::from)
                }) {
                    Ok(Ok(n)) => rest = &rest[n..],
                    Ok(Err(e)) => {
                        return Err(ConnectError::new(
                            Code::Internal,
                            format!("cannot write to the terminal of process {}: {e}", proc_.pid),
                        ));
                    }
                    Err(_would_block) => {}
                }
            }
            Ok(())
        }
        (process_input::Input::Pty(_), _) => Err(ConnectError::new(
            Code::Internal,
            format!(
                "process {} has no terminal; send its input as stdin",
                proc_.pid
            ),
        )),
    }
}

/// `SendInput`.
pub(crate) async fn send_input(
    state: Arc<State>,
    _ctx: CallCtx,
    req: SendInputRequest,
) -> Result<SendInputResponse, ConnectError> {
    let proc_ = state.procs.find_running(req.process.as_ref())?;
    write_input(&proc_, req.input.unwrap_or_default()).await?;
    Ok(SendInputResponse {})
}

/// `StreamInput`: `start` selects the process, then `data` in order.
pub(crate) async fn stream_input(
    state: Arc<State>,
    _ctx: CallCtx,
    mut incoming: Incoming<StreamInputRequest>,
) -> Result<StreamInputResponse, ConnectError> {
    let mut target: Option<Arc<Proc>> = None;
    while let Some(msg) = incoming.recv().await {
        match msg?.event {
            Some(stream_input_request::Event::Start(s)) => {
                target = Some(state.procs.find_running(s.process.as_ref())?);
            }
            Some(stream_input_request::Event::Data(d)) => {
                let Some(p) = &target else {
                    return Err(ConnectError::new(
                        Code::FailedPrecondition,
                        "StreamInput: the first message must be 'start' with a process selector",
                    ));
                };
                write_input(p, d.input.unwrap_or_default()).await?;
            }
            Some(stream_input_request::Event::Keepalive(_)) | None => {}
        }
    }
    Ok(StreamInputResponse {})
}

/// `SendSignal`: SIGKILL or SIGTERM to the process itself.
pub(crate) async fn send_signal(
    state: Arc<State>,
    _ctx: CallCtx,
    req: SendSignalRequest,
) -> Result<SendSignalResponse, ConnectError> {
    let sig = match Signal::try_from(req.signal) {
        Ok(Signal::Sigkill) => NixSignal::SIGKILL,
        Ok(Signal::Sigterm) => NixSignal::SIGTERM,
        _ => {
            return Err(ConnectError::new(
                Code::Unimplemented,
                format!(
                    "signal {} is not supported; use SIGNAL_SIGKILL or SIGNAL_SIGTERM",
                    req.signal
                ),
            ));
        }
    };
    let proc_ = state.procs.find_running(req.process.as_ref())?;
    proc_.stop_output();
    signal::kill(pid(proc_.pid), sig).map_err(|e| {
        ConnectError::new(
            Code::Internal,
            format!("cannot signal process {}: {e}", proc_.pid),
        )
    })?;
    if sig == NixSignal::SIGKILL {
        // A client that checks right after the call must find the pid gone.
        let mut done = proc_.done.subscribe();
        let _ = tokio::time::timeout(KILL_REAP_WAIT, done.wait_for(|d| *d)).await;
    }
    Ok(SendSignalResponse {})
}

/// `CloseStdin`: EOF on the process's stdin pipe.
pub(crate) async fn close_stdin(
    state: Arc<State>,
    _ctx: CallCtx,
    req: CloseStdinRequest,
) -> Result<CloseStdinResponse, ConnectError> {
    let proc_ = state.procs.find_running(req.process.as_ref())?;
    match &proc_.input {
        Input::Pipe(stdin) => {
            stdin.lock().await.take();
            Ok(CloseStdinResponse {})
        }
        Input::None => Ok(CloseStdinResponse {}),
        Input::Pty(_) => Err(ConnectError::new(
            Code::FailedPrecondition,
            format!(
                "process {} runs in a terminal, which has no stdin to close; send Ctrl-D (\\x04) as pty input instead",
                proc_.pid
            ),
        )),
    }
}

/// `Update`: resize a process's terminal.
pub(crate) async fn update(
    state: Arc<State>,
    _ctx: CallCtx,
    req: UpdateRequest,
) -> Result<UpdateResponse, ConnectError> {
    let proc_ = state.procs.find_running(req.process.as_ref())?;
    let Input::Pty(master) = &proc_.input else {
        return Err(ConnectError::new(
            Code::Internal,
            format!("process {} has no terminal to resize", proc_.pid),
        ));
    };
    if let Some(size) = req.pty.and_then(|p| p.size) {
        let cols = u16::try_from(size.cols).unwrap_or(u16::MAX);
        let rows = u16::try_from(size.rows).unwrap_or(u16::MAX);
        sys::set_window_size(master.get_ref().as_fd(), cols, rows).map_err(|e| {
            ConnectError::new(Code::Internal, format!("cannot resize terminal: {e}"))
        })?;
    }
    Ok(UpdateResponse {})
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn end_events_follow_go_wording() {
        let p = Pid::from_raw(5);
        let ok = end_event(&WaitStatus::Exited(p, 0));
        assert_eq!(
            (ok.exit_code, ok.exited, ok.status.as_str()),
            (0, true, "exit status 0")
        );
        assert_eq!(ok.error, None);
        let bad = end_event(&WaitStatus::Exited(p, 3));
        assert_eq!(bad.error.as_deref(), Some("exit status 3"));
        let killed = end_event(&WaitStatus::Signaled(p, NixSignal::SIGKILL, false));
        assert_eq!((killed.exit_code, killed.exited), (-1, false));
        assert_eq!(killed.status, "signal: killed");
        let term = end_event(&WaitStatus::Signaled(p, NixSignal::SIGTERM, false));
        assert_eq!(term.status, "signal: terminated");
    }

    #[test]
    fn pty_size_defaults_when_missing_or_zero() {
        let mut req = StartRequest::default();
        assert_eq!(pty_size(&req), (80, 24));
        req.pty = Some(arca_proto::process::Pty {
            size: Some(arca_proto::process::pty::Size { cols: 120, rows: 0 }),
        });
        assert_eq!(pty_size(&req), (120, 24));
    }
}
