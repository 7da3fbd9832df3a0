"""Every P0 flow of the official Python SDK against `arca up` (issue 3), in real sandboxes."""

from __future__ import annotations

import os
import subprocess
import sys
from datetime import timedelta

import pytest
from e2b import (
    AuthenticationException,
    CommandExitException,
    FileType,
    FilesystemEventType,
    NotFoundException,
    PtySize,
    Sandbox,
    SandboxException,
    SandboxQuery,
    SandboxState,
)

from conftest import unique, wait_until

BAD_KEY = "e2b_" + "0" * 40


# --- create, get_info ------------------------------------------------------------------------


def test_create_with_metadata_envs_and_timeout(arca):
    tag = unique()
    sbx = Sandbox.create(metadata={"e2e": tag, "who": "create"}, envs={"E2E_VAR": tag}, timeout=90)
    try:
        assert sbx.sandbox_id.isalnum() and sbx.sandbox_id == sbx.sandbox_id.lower()
        # envs reach every process, also those of another user.
        assert sbx.commands.run("echo $E2E_VAR").stdout == f"{tag}\n"
        assert sbx.commands.run("echo $E2E_VAR", user="root").stdout == f"{tag}\n"
        assert sbx.commands.run("echo $E2B_SANDBOX_ID").stdout == f"{sbx.sandbox_id}\n"

        info = sbx.get_info()
        assert info.sandbox_id == sbx.sandbox_id
        assert info.template_id == "base" or info.name == "base"
        assert info.metadata == {"e2e": tag, "who": "create"}
        assert info.state == SandboxState.RUNNING
        assert info.cpu_count >= 1 and info.memory_mb >= 128
        assert tuple(int(x) for x in info.envd_version.split(".")) >= (0, 6, 4)
        # The lifetime asked for is what the record says (a relation, not a clock reading).
        life = info.end_at - info.started_at
        assert timedelta(seconds=88) <= life <= timedelta(seconds=92), life
        assert sbx.is_running()
    finally:
        assert sbx.kill() is True


def test_default_user_home_and_sudo(sandbox):
    r = sandbox.commands.run("id -un; pwd; sudo -n id -u")
    assert r.stdout.split() == ["user", "/home/user", "0"]


def test_hostname_is_the_sandbox_id(sandbox):
    # The name a user sees in their prompt and logs, as a cold-started sandbox has it.
    r = sandbox.commands.run("hostname; cat /etc/hostname; getent hosts $(hostname) | wc -l")
    assert r.stdout.split() == [sandbox.sandbox_id, sandbox.sandbox_id, "1"]


# --- commands ---------------------------------------------------------------------------------


def test_commands_output_exit_code_and_background(sandbox):
    r = sandbox.commands.run("echo out; echo err >&2; python3 -c 'print(6*7)'")
    assert (r.stdout, r.stderr, r.exit_code) == ("out\n42\n", "err\n", 0)

    with pytest.raises(CommandExitException) as ei:
        sandbox.commands.run("exit 3")
    assert ei.value.exit_code == 3

    h = sandbox.commands.run("sleep 0.3; echo done-bg", background=True)
    assert h.pid > 0
    assert h.wait().stdout == "done-bg\n"

    long = sandbox.commands.run("sleep 600", background=True)
    assert long.pid in [p.pid for p in sandbox.commands.list()]
    assert sandbox.commands.kill(long.pid) is True
    wait_until(
        lambda: long.pid not in [p.pid for p in sandbox.commands.list()], "killed command gone"
    )


def test_commands_stdin_and_cwd_and_env(sandbox):
    h = sandbox.commands.run("head -n1", background=True, stdin=True)
    sandbox.commands.send_stdin(h.pid, "typed line\n")
    assert h.wait().stdout == "typed line\n"
    r = sandbox.commands.run("pwd; echo $X", cwd="/tmp", envs={"X": "per-command"})
    assert r.stdout == "/tmp\nper-command\n"


# --- files ------------------------------------------------------------------------------------


def test_files_round_trip(sandbox):
    d = f"/home/user/f-{unique()}"
    assert sandbox.files.make_dir(d) is True
    sandbox.files.write(f"{d}/a.txt", "hello files")
    blob = os.urandom(1 << 20)
    sandbox.files.write(f"{d}/b.bin", blob)
    assert sandbox.files.read(f"{d}/a.txt") == "hello files"
    assert bytes(sandbox.files.read(f"{d}/b.bin", format="bytes")) == blob
    names = {e.name: e for e in sandbox.files.list(d)}
    assert set(names) == {"a.txt", "b.bin"}
    assert names["b.bin"].type == FileType.FILE
    # Written as the default user, seen by commands.
    assert sandbox.commands.run(f"stat -c %U:%s {d}/b.bin").stdout == f"user:{1 << 20}\n"
    sandbox.files.rename(f"{d}/a.txt", f"{d}/c.txt")
    assert sandbox.files.exists(f"{d}/c.txt") and not sandbox.files.exists(f"{d}/a.txt")
    sandbox.files.remove(d)
    assert not sandbox.files.exists(d)
    with pytest.raises(NotFoundException):
        sandbox.files.read(f"{d}/c.txt")


def test_files_written_by_command_are_read_by_sdk(sandbox):
    sandbox.commands.run("printf 'made by bash' > /tmp/by-cmd; chmod 600 /tmp/by-cmd", user="root")
    assert sandbox.files.read("/tmp/by-cmd", user="root") == "made by bash"


# --- PTY and watch ----------------------------------------------------------------------------


def test_pty(sandbox):
    buf = bytearray()
    h = sandbox.pty.create(PtySize(rows=24, cols=80))
    sandbox.pty.send_stdin(h.pid, b'echo "pty-$((40+2)) $(tput cols)x$(tput lines)"; exit 0\n')
    h.wait(on_pty=buf.extend)
    assert b"pty-42 80x24" in buf


def test_watch_dir(sandbox):
    d = f"/home/user/w-{unique()}"
    sandbox.files.make_dir(d)
    w = sandbox.files.watch_dir(d)
    try:
        sandbox.files.write(f"{d}/new.txt", "x")
        sandbox.commands.run(f"rm {d}/new.txt")
        seen: list = []

        def got_both():
            seen.extend(w.get_new_events())
            kinds = {(e.name, e.type) for e in seen}
            return ("new.txt", FilesystemEventType.CREATE) in kinds and (
                "new.txt",
                FilesystemEventType.REMOVE,
            ) in kinds

        wait_until(got_both, f"create and remove events in {d}")
    finally:
        w.stop()


# --- list -------------------------------------------------------------------------------------


def test_list_metadata_state_and_paging(arca):
    tag = unique()
    made = [Sandbox.create(metadata={"e2e-list": tag, "n": str(i)}, timeout=120) for i in range(3)]
    other = Sandbox.create(metadata={"e2e-list": "someone-else"}, timeout=120)
    try:
        want = {s.sandbox_id for s in made}
        q = SandboxQuery(metadata={"e2e-list": tag})
        first = Sandbox.list(query=q).next_items()
        assert {s.sandbox_id for s in first} == want
        assert all(s.state == SandboxState.RUNNING for s in first)
        assert {s.metadata["n"] for s in first} == {"0", "1", "2"}

        # Two metadata pairs must both match.
        both = Sandbox.list(query=SandboxQuery(metadata={"e2e-list": tag, "n": "1"})).next_items()
        assert [s.sandbox_id for s in both] == [made[1].sandbox_id]

        running = SandboxQuery(metadata={"e2e-list": tag}, state=[SandboxState.RUNNING])
        assert {s.sandbox_id for s in Sandbox.list(query=running).next_items()} == want
        paused = SandboxQuery(metadata={"e2e-list": tag}, state=[SandboxState.PAUSED])
        assert Sandbox.list(query=paused).next_items() == []

        # Paging: limit 1 means three pages of one, newest first, then no next token.
        pages = []
        p = Sandbox.list(query=q, limit=1)
        while p.has_next:
            pages.append([s.sandbox_id for s in p.next_items()])
            assert len(pages) <= 4, "paging does not end"
        assert [len(x) for x in pages] == [1, 1, 1]
        assert [x[0] for x in pages] == [s.sandbox_id for s in reversed(made)]
    finally:
        for s in made + [other]:
            s.kill()


# --- connect from another process ------------------------------------------------------------

CONNECT_SCRIPT = """
import sys
from e2b import Sandbox
s = Sandbox.connect(sys.argv[1])
print(s.commands.run("cat /tmp/marker").stdout, end="")
s.files.write("/tmp/from-second", "second process")
"""


def test_connect_from_second_process(sandbox):
    sandbox.files.write("/tmp/marker", "first process\n")
    out = subprocess.run(
        [sys.executable, "-c", CONNECT_SCRIPT, sandbox.sandbox_id],
        capture_output=True,
        text=True,
        timeout=120,
        env=os.environ.copy(),
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout == "first process\n"
    assert sandbox.files.read("/tmp/from-second") == "second process"


# --- timeouts, kill, auth ---------------------------------------------------------------------


def test_set_timeout_then_expiry(arca):
    sbx = Sandbox.create(timeout=120)
    sbx.commands.run("true")
    before = sbx.get_info().end_at
    sbx.set_timeout(600)
    assert sbx.get_info().end_at > before
    sbx.set_timeout(2)
    end_at = sbx.get_info().end_at
    assert end_at < before

    def gone():
        try:
            Sandbox.get_info(sbx.sandbox_id)
            return False
        except NotFoundException:
            return True

    # Expiry is enforced within about a second of endAt; allow a generous bound.
    wait_until(gone, "the sandbox expired", limit_s=20, every_s=0.25)
    assert sbx.sandbox_id not in [s.sandbox_id for s in Sandbox.list().next_items()]
    with pytest.raises(SandboxException) as ei:
        sbx.commands.run("echo still here")
    msg = str(ei.value).lower()
    assert "killed" in msg or "end of life" in msg or "not found" in msg, msg
    assert sbx.kill() is False


def test_kill_and_kill_unknown(arca):
    sbx = Sandbox.create(timeout=60)
    assert Sandbox.kill(sbx.sandbox_id) is True
    with pytest.raises(NotFoundException):
        Sandbox.get_info(sbx.sandbox_id)
    assert Sandbox.kill(sbx.sandbox_id) is False
    assert Sandbox.kill("i" + "0" * 20) is False


def test_connect_to_unknown_sandbox_raises_not_found(arca):
    with pytest.raises(NotFoundException):
        Sandbox.connect("i" + "1" * 20)


def test_wrong_api_key(arca):
    before = len(arca.list_sandboxes())
    with pytest.raises(AuthenticationException):
        Sandbox.create(api_key=BAD_KEY, timeout=30)
    with pytest.raises(AuthenticationException):
        Sandbox.list(api_key=BAD_KEY).next_items()
    # Nothing was made by the refused create.
    assert len(arca.list_sandboxes()) == before


def test_sandbox_killed_while_command_runs_reports_end_of_life(arca):
    sbx = Sandbox.create(timeout=120)
    h = sbx.commands.run("sleep 600", background=True)
    Sandbox.kill(sbx.sandbox_id)
    # The proxy resets the open stream; the SDK probes and reports the end of the sandbox.
    with pytest.raises(SandboxException) as ei:
        h.wait()
    msg = str(ei.value).lower()
    assert "killed" in msg or "end of life" in msg or "not found" in msg, msg
