"""`sandbox.commands` through the official SDK against arca-envd (process.Process service)."""

from __future__ import annotations

import random
import time

import pytest
from e2b import (
    AuthenticationException,
    CommandExitException,
    InvalidArgumentException,
    NotFoundException,
    SandboxException,
    TimeoutException,
)

from conftest import SANDBOX_ENV


def unique_sleep() -> str:
    """`sleep` with a unique fractional duration, so pgrep can find exactly this process."""
    return f"sleep 30.{random.randrange(10**5, 10**6)}"


def wait_until(predicate, what: str, limit_s: float = 10.0) -> None:
    """Poll `predicate` until true; bounded so a missing behaviour fails instead of hanging."""
    deadline = time.monotonic() + limit_s
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"gave up waiting for: {what}")
        time.sleep(0.05)


def process_exists(sandbox, pid: int) -> bool:
    r = sandbox.commands.run(f"kill -0 {pid} 2>/dev/null && echo alive || echo gone", user="root")
    return r.stdout == "alive\n"


def pgrep_count(sandbox, cmdline: str) -> int:
    # "[s]leep ..." matches "sleep ..." but not pgrep's own bash, whose argv holds "[s]leep".
    pattern = "[" + cmdline[0] + "]" + cmdline[1:].replace(".", r"\.")
    r = sandbox.commands.run(f"pgrep -f -x '{pattern}' | wc -l", user="root")
    return int(r.stdout.strip())


# --- foreground -------------------------------------------------------------------------------


def test_foreground_stdout_stderr_and_exit_code(sandbox):
    r = sandbox.commands.run("echo hello; echo oops >&2")
    assert r.stdout == "hello\n"
    assert r.stderr == "oops\n"
    assert r.exit_code == 0
    assert not r.error


def test_output_callbacks_receive_output(sandbox):
    out, err = [], []
    r = sandbox.commands.run(
        "echo one; echo two >&2", on_stdout=out.append, on_stderr=err.append
    )
    assert "".join(out) == r.stdout == "one\n"
    assert "".join(err) == r.stderr == "two\n"


def test_nonzero_exit_raises_command_exit_exception(sandbox):
    with pytest.raises(CommandExitException) as ei:
        sandbox.commands.run("echo partial; echo broken >&2; exit 3")
    e = ei.value
    assert e.exit_code == 3
    assert e.stdout == "partial\n"
    assert e.stderr == "broken\n"
    assert e.error == "exit status 3"


def test_large_multibyte_output_is_passed_through_unchanged(sandbox):
    # 80 000 bytes of two-byte UTF-8: crosses every chunk boundary envd may use.
    r = sandbox.commands.run("for i in $(seq 40000); do printf 'ž'; done")
    assert r.stdout == "ž" * 40000


def test_invalid_utf8_becomes_replacement_character(sandbox):
    r = sandbox.commands.run(r"printf 'a\377b'")
    assert r.stdout == "a\ufffdb"


def test_command_waits_for_background_child_holding_stdout(sandbox):
    r = sandbox.commands.run("(sleep 0.5; echo late) & echo early")
    assert r.stdout == "early\nlate\n"


def test_stdin_is_closed_by_default(sandbox):
    r = sandbox.commands.run("cat; echo done", timeout=20)
    assert r.stdout == "done\n"


# --- background, kill, list, connect ----------------------------------------------------------


def test_background_then_wait(sandbox):
    h = sandbox.commands.run("echo bg; echo bgerr >&2", background=True)
    assert h.pid > 0
    r = h.wait()
    assert (r.stdout, r.stderr, r.exit_code) == ("bg\n", "bgerr\n", 0)


def test_background_nonzero_exit_raises_on_wait(sandbox):
    h = sandbox.commands.run("exit 7", background=True)
    with pytest.raises(CommandExitException) as ei:
        h.wait()
    assert ei.value.exit_code == 7


def test_background_kill_returns_true_and_process_is_gone(sandbox):
    h = sandbox.commands.run(unique_sleep(), background=True)
    assert process_exists(sandbox, h.pid)
    assert h.kill() is True
    with pytest.raises(CommandExitException) as ei:
        h.wait()
    assert ei.value.exit_code == -1
    # SendSignal reaps promptly (CONTRACT 3.3): no polling here.
    assert not process_exists(sandbox, h.pid)
    assert h.pid not in [p.pid for p in sandbox.commands.list()]


def test_kill_by_pid_through_commands(sandbox):
    h = sandbox.commands.run(unique_sleep(), background=True)
    assert sandbox.commands.kill(h.pid) is True
    with pytest.raises(CommandExitException):
        h.wait()


def test_kill_unknown_pid_returns_false(sandbox):
    assert sandbox.commands.kill(999_999) is False


def test_list_shows_running_background_command(sandbox):
    cmd = unique_sleep()
    h = sandbox.commands.run(cmd, background=True, envs={"ARCA_LISTED": "1"}, cwd="/tmp")
    try:
        procs = {p.pid: p for p in sandbox.commands.list()}
        assert h.pid in procs
        p = procs[h.pid]
        assert p.cmd == "/bin/bash"
        assert p.args == ["-l", "-c", cmd]
        assert p.envs == {"ARCA_LISTED": "1"}
        assert p.cwd == "/tmp"
        assert p.tag is None
    finally:
        h.kill()
    assert h.pid not in [p.pid for p in sandbox.commands.list()]


def test_connect_receives_later_output(sandbox):
    h = sandbox.commands.run("cat", background=True, stdin=True)
    attached = sandbox.commands.connect(h.pid)
    assert attached.pid == h.pid
    sandbox.commands.send_stdin(h.pid, "after connect\n")
    sandbox.commands.close_stdin(h.pid)
    r = attached.wait()
    assert r.stdout == "after connect\n"
    assert r.exit_code == 0
    assert h.wait().stdout == "after connect\n"


def test_connect_unknown_pid_raises_not_found(sandbox):
    with pytest.raises(NotFoundException):
        sandbox.commands.connect(999_999)


def test_disconnect_keeps_process_running(sandbox):
    h = sandbox.commands.run("cat", background=True, stdin=True)
    h.disconnect()
    assert process_exists(sandbox, h.pid)
    again = sandbox.commands.connect(h.pid)
    sandbox.commands.send_stdin(h.pid, "still here\n")
    sandbox.commands.close_stdin(h.pid)
    assert again.wait().stdout == "still here\n"


# --- stdin ------------------------------------------------------------------------------------


def test_send_stdin_and_close_stdin(sandbox):
    h = sandbox.commands.run("cat", background=True, stdin=True)
    h.send_stdin("line one\n")
    sandbox.commands.send_stdin(h.pid, b"bytes two\n")
    h.close_stdin()
    r = h.wait()
    assert r.stdout == "line one\nbytes two\n"
    assert r.exit_code == 0


def test_send_stdin_to_unknown_pid_raises_not_found(sandbox):
    with pytest.raises(NotFoundException):
        sandbox.commands.send_stdin(999_999, "x")


def test_stream_input(sandbox):
    if not hasattr(sandbox.commands, "stream_input"):
        pytest.skip("commands.stream_input (StreamInput RPC) does not exist in this SDK version")
    h = sandbox.commands.run("cat", background=True, stdin=True)
    sandbox.commands.stream_input(h.pid, ["al", b"pha\n", "beta\n"])
    sandbox.commands.close_stdin(h.pid)
    assert h.wait().stdout == "alpha\nbeta\n"


# --- environment, cwd, users ------------------------------------------------------------------


def test_envs_per_command_override_sandbox_wide_envs(sandbox):
    r = sandbox.commands.run(
        'echo "$ARCA_ONLY_HERE|$ARCA_SANDBOX_WIDE|$ARCA_OVERRIDDEN|$E2B_SANDBOX"',
        envs={"ARCA_ONLY_HERE": "yes", "ARCA_OVERRIDDEN": "per-command"},
    )
    assert r.stdout == f"yes|{SANDBOX_ENV['ARCA_SANDBOX_WIDE']}|per-command|true\n"
    # Per-command variables do not leak into later commands.
    r = sandbox.commands.run('echo "[$ARCA_ONLY_HERE]|$ARCA_OVERRIDDEN"')
    assert r.stdout == f"[]|{SANDBOX_ENV['ARCA_OVERRIDDEN']}\n"


def test_cwd_absolute_relative_and_tilde(sandbox, workdir):
    assert sandbox.commands.run("pwd", cwd="/tmp").stdout == "/tmp\n"
    rel = workdir.removeprefix("/home/user/")
    assert sandbox.commands.run("pwd", cwd=rel).stdout == f"{workdir}\n"
    assert sandbox.commands.run("pwd", cwd="~").stdout == "/home/user\n"


def test_missing_cwd_raises_invalid_argument(sandbox):
    with pytest.raises(InvalidArgumentException):
        sandbox.commands.run("pwd", cwd="/does/not/exist")


def test_pwd_defaults_to_default_workdir(sandbox):
    assert sandbox.commands.run("pwd").stdout == "/home/user\n"


def test_default_user_after_init_is_user(sandbox):
    r = sandbox.commands.run("whoami; id -u; id -g")
    assert r.stdout == "user\n1000\n1000\n"


@pytest.mark.parametrize(
    ("user", "expected"),
    [
        ("root", "root 0 /root root root\n"),
        ("user", "user 1000 /home/user user user\n"),
    ],
)
def test_explicit_user_identity_and_home(sandbox, user, expected):
    r = sandbox.commands.run('echo "$(whoami) $(id -u) $HOME $USER $LOGNAME"', user=user)
    assert r.stdout == expected


def test_unknown_user_raises_authentication_error(sandbox):
    with pytest.raises(AuthenticationException):
        sandbox.commands.run("whoami", user="nosuchuser")


def test_files_created_by_command_belong_to_the_user(sandbox, workdir):
    r = sandbox.commands.run(f"touch {workdir}/by-cmd && stat -c '%U:%G %u' {workdir}/by-cmd")
    assert r.stdout == "user:user 1000\n"


# --- timeouts ---------------------------------------------------------------------------------


def test_timeout_raises_and_kills_foreground_process(sandbox):
    cmd = unique_sleep()
    with pytest.raises(TimeoutException):
        sandbox.commands.run(cmd, timeout=1)
    wait_until(lambda: pgrep_count(sandbox, cmd) == 0, f"'{cmd}' killed after its timeout")


def test_timeout_kills_background_process(sandbox):
    h = sandbox.commands.run(unique_sleep(), background=True, timeout=1)
    with pytest.raises(TimeoutException):
        h.wait()
    wait_until(
        lambda: h.pid not in [p.pid for p in sandbox.commands.list()],
        "process removed from commands.list() after its timeout",
    )
    wait_until(lambda: not process_exists(sandbox, h.pid), "process gone after its timeout")


# --- stdin edge cases and many parallel streams -----------------------------------------------


def test_send_stdin_without_stdin_pipe_fails(sandbox):
    h = sandbox.commands.run("sleep 30", background=True)  # stdin=False: /dev/null
    try:
        with pytest.raises(SandboxException) as ei:
            sandbox.commands.send_stdin(h.pid, "x")
        assert not isinstance(ei.value, NotFoundException)
    finally:
        h.kill()


def test_large_stdin(sandbox):
    h = sandbox.commands.run("wc -c", background=True, stdin=True)
    chunk = b"z" * 65536
    for _ in range(16):
        h.send_stdin(chunk)
    h.close_stdin()
    assert h.wait().stdout.strip() == str(16 * 65536)


def test_many_concurrent_streams(sandbox):
    # Over HTTP/1.1 every open stream holds its own connection (CONTRACT 1.5).
    handles = [sandbox.commands.run("cat", background=True, stdin=True) for _ in range(24)]
    for i, h in enumerate(handles):
        h.send_stdin(f"stream {i}\n")
        h.close_stdin()
    assert [h.wait().stdout for h in handles] == [f"stream {i}\n" for i in range(24)]
