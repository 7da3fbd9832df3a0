"""Pause and resume through the official SDK against a real `arca up`: the frozen kind (every
process stopped in place by the cgroup freezer, memory kept) and the filesystem-only kind (files
kept, processes ended, memory and network slot released; a resume boots the sandbox again)."""

from __future__ import annotations

import time

import pytest
from e2b import FileNotFoundException, Sandbox

from conftest import sdk_version, unique, wait_until

COUNTER = (
    "import time\n"
    "n = 0\n"
    "while True:\n"
    "    n += 1\n"
    "    open('/tmp/counter.tmp', 'w').write(str(n))\n"
    "    __import__('os').replace('/tmp/counter.tmp', '/tmp/counter')\n"
    "    time.sleep(0.05)\n"
)


def read_counter(sbx) -> int:
    """The counter, 0 before its first write."""
    try:
        return int(sbx.files.read("/tmp/counter") or 0)
    except FileNotFoundException:
        return 0


def test_pause_then_connect_keeps_processes_memory_and_files(arca):
    sbx = Sandbox.create(timeout=120)
    try:
        sbx.files.write("/tmp/counter.py", COUNTER)
        sbx.files.write("/home/user/before-pause.txt", "kept")
        boot_id = sbx.files.read("/proc/sys/kernel/random/boot_id")
        sbx.commands.run("python3 /tmp/counter.py", background=True)
        wait_until(lambda: read_counter(sbx) > 5, "the counter to count")
        assert sbx.pause() is True
        assert sbx.pause() is False  # already paused (409)
        assert not sbx.is_running()
        listed = {s.sandbox_id: s.state for s in Sandbox.list().next_items()}
        assert listed[sbx.sandbox_id] == "paused"
        # Paused: nothing runs, so the counter cannot move while we wait.
        time.sleep(2)
        resumed = Sandbox.connect(sbx.sandbox_id, timeout=120)
        assert resumed.sandbox_id == sbx.sandbox_id
        # It goes on from where it was: the count lives in the process's memory.
        before = read_counter(resumed)
        assert before > 5
        wait_until(lambda: read_counter(resumed) > before, "the counter to go on")
        assert resumed.files.read("/home/user/before-pause.txt") == "kept"
        assert resumed.files.read("/proc/sys/kernel/random/boot_id") == boot_id
        assert resumed.is_running()
        assert "counter.py" in resumed.commands.run("ps -eo args").stdout
    finally:
        sbx.kill()


def test_nothing_runs_while_paused(arca):
    sbx = Sandbox.create(timeout=120)
    try:
        sbx.files.write("/tmp/counter.py", COUNTER)
        sbx.commands.run("python3 /tmp/counter.py", background=True)
        wait_until(lambda: read_counter(sbx) > 3, "the counter to count")
        at_pause = read_counter(sbx)
        sbx.pause()
        time.sleep(3)
        sbx = Sandbox.connect(sbx.sandbox_id, timeout=120)
        at_resume = read_counter(sbx)
        # About 20 ticks a second while it runs: 3 s unpaused would be about 60 more.
        assert at_resume - at_pause < 15, (at_pause, at_resume)
        wait_until(lambda: read_counter(sbx) > at_resume + 5, "the counter to run again")
    finally:
        sbx.kill()


def test_twenty_pause_resume_cycles_stay_correct(arca):
    sbx = Sandbox.create(timeout=300)
    try:
        sbx.commands.run("echo 0 > /tmp/cycles")
        for i in range(20):
            assert sbx.pause() is True, i
            sbx = Sandbox.connect(sbx.sandbox_id, timeout=300)
            out = sbx.commands.run(f"echo {i + 1} > /tmp/cycles && cat /tmp/cycles").stdout
            assert out.strip() == str(i + 1)
        assert sbx.files.read("/tmp/cycles").strip() == "20"
    finally:
        sbx.kill()


def test_auto_pause_at_timeout_then_connect(arca):
    sbx = Sandbox.create(timeout=3, lifecycle={"on_timeout": "pause"})
    try:
        sbx.files.write("/tmp/kept.txt", "still here")
        info = sbx.get_info()
        assert info.lifecycle is None or getattr(info.lifecycle, "on_timeout", "pause") == "pause"
        wait_until(
            lambda: Sandbox.get_info(sbx.sandbox_id).state == "paused",
            "the sandbox to pause at its deadline",
            limit_s=20,
        )
        resumed = Sandbox.connect(sbx.sandbox_id, timeout=60)
        assert resumed.files.read("/tmp/kept.txt") == "still here"
        assert Sandbox.get_info(sbx.sandbox_id).state == "running"
    finally:
        Sandbox.kill(sbx.sandbox_id)


def test_list_shows_running_and_paused_together(arca):
    a = Sandbox.create(timeout=120, metadata={"lifecycle": unique()})
    b = Sandbox.create(timeout=120)
    try:
        b.pause()
        items = Sandbox.list().next_items()
        listed = {s.sandbox_id: s.state for s in items}
        assert listed[a.sandbox_id] == "running"
        assert listed[b.sandbox_id] == "paused"
        # In order (newest first by default), paused or not: b was created after a.
        ids = [s.sandbox_id for s in items]
        assert ids.index(b.sandbox_id) < ids.index(a.sandbox_id), ids
    finally:
        a.kill()
        b.kill()


def test_a_paused_sandbox_can_be_killed(arca):
    sbx = Sandbox.create(timeout=120)
    sbx.commands.run("sleep 1000", background=True)
    sbx.pause()
    assert Sandbox.kill(sbx.sandbox_id) is True
    with pytest.raises(Exception):
        Sandbox.connect(sbx.sandbox_id, timeout=30)


def through_proxy(sandbox_id: str, port: int, path: str = "/") -> tuple[int, bytes]:
    """A GET to a sandbox's port through the edge, routed by E2B's headers."""
    import os
    import urllib.error
    import urllib.request

    req = urllib.request.Request(
        os.environ["E2B_SANDBOX_URL"] + path,
        headers={"E2b-Sandbox-Id": sandbox_id, "E2b-Sandbox-Port": str(port)},
    )
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def test_auto_resume_wakes_a_paused_sandbox_on_inbound_traffic(arca):
    sbx = Sandbox.create(timeout=4, lifecycle={"on_timeout": "pause", "auto_resume": True})
    try:
        sbx.files.write("/tmp/www/index.html", "hello from a woken sandbox")
        sbx.commands.run(
            "cd /tmp/www && python3 -m http.server 8123 --bind 127.0.0.1", background=True
        )
        wait_until(lambda: through_proxy(sbx.sandbox_id, 8123)[0] == 200, "the server to answer")
        wait_until(
            lambda: Sandbox.get_info(sbx.sandbox_id).state == "paused",
            "the sandbox to pause at its deadline",
            limit_s=20,
        )
        # The request itself wakes it and gets its answer.
        # The SDK's health probe does not wake it (it must learn the sandbox is gone).
        assert through_proxy(sbx.sandbox_id, 49983, "/health")[0] == 502
        assert Sandbox.get_info(sbx.sandbox_id).state == "paused"
        status, body = through_proxy(sbx.sandbox_id, 8123, "/index.html")
        assert (status, body) == (200, b"hello from a woken sandbox")
        wait_until(
            lambda: Sandbox.get_info(sbx.sandbox_id).state == "running",
            "the record to follow the resume",
        )
    finally:
        Sandbox.kill(sbx.sandbox_id)


def test_without_auto_resume_a_paused_sandbox_is_not_woken_by_traffic(arca):
    sbx = Sandbox.create(timeout=3, lifecycle={"on_timeout": "pause"})
    try:
        wait_until(
            lambda: Sandbox.get_info(sbx.sandbox_id).state == "paused",
            "the sandbox to pause at its deadline",
            limit_s=20,
        )
        status, body = through_proxy(sbx.sandbox_id, 49983, "/health")
        assert status == 502, (status, body)
        assert Sandbox.get_info(sbx.sandbox_id).state == "paused"
    finally:
        Sandbox.kill(sbx.sandbox_id)


def host_processes_of(sandbox_id: str) -> list[int]:
    """Host pids of the processes a sandbox's envd started (they carry its id)."""
    import os

    marker = f"E2B_SANDBOX_ID={sandbox_id}".encode()
    found = []
    for p in os.listdir("/proc"):
        if not p.isdigit():
            continue
        try:
            with open(f"/proc/{p}/environ", "rb") as f:
                if marker in f.read().split(b"\0"):
                    found.append(int(p))
        except OSError:
            pass
    return found


def pause_files_only(sbx) -> bool:
    """`pause` keeping files only, in each SDK generation's words."""
    if sdk_version() >= (2, 50):
        return sbx.pause(mode="filesystem")
    return sbx.pause(keep_memory=False)


def test_filesystem_pause_keeps_files_ends_processes_and_changes_the_boot_id(arca):
    sbx = Sandbox.create(timeout=120, envs={"FROM_CREATE": "still set"})
    try:
        sbx.files.write("/home/user/notes.txt", "kept on disk")
        sbx.commands.run("mkdir -p /opt/data && echo 42 > /opt/data/answer", user="root")
        sbx.files.write("/tmp/counter.py", COUNTER)
        sbx.commands.run("python3 /tmp/counter.py", background=True)
        wait_until(lambda: read_counter(sbx) > 3, "the counter to count")
        boot_id = sbx.files.read("/proc/sys/kernel/random/boot_id")
        assert host_processes_of(sbx.sandbox_id) != []
        assert pause_files_only(sbx) is True
        assert pause_files_only(sbx) is False  # already paused (409)
        info = Sandbox.get_info(sbx.sandbox_id)
        assert info.state == "paused"
        if hasattr(info, "pause_mode"):
            assert str(getattr(info.pause_mode, "value", info.pause_mode)) == "filesystem"
        # Its processes are gone from the host (so is their memory).
        assert host_processes_of(sbx.sandbox_id) == []
        resumed = Sandbox.connect(sbx.sandbox_id, timeout=120)
        assert resumed.sandbox_id == sbx.sandbox_id
        assert resumed.files.read("/home/user/notes.txt") == "kept on disk"
        assert resumed.commands.run("cat /opt/data/answer").stdout.strip() == "42"
        # A fresh boot: new boot id, the counter process is not back.
        assert resumed.files.read("/proc/sys/kernel/random/boot_id") != boot_id
        assert "counter.py" not in resumed.commands.run("ps -eo args").stdout
        assert resumed.commands.run("echo $FROM_CREATE").stdout.strip() == "still set"
        assert resumed.commands.run("hostname").stdout.strip() == sbx.sandbox_id
        # It works as before: new processes, new files, another pause.
        resumed.files.write("/home/user/after.txt", "after")
        assert resumed.pause() is True
        again = Sandbox.connect(sbx.sandbox_id, timeout=120)
        assert again.files.read("/home/user/after.txt") == "after"
    finally:
        Sandbox.kill(sbx.sandbox_id)


def test_filesystem_auto_pause_at_timeout_then_connect(arca):
    if sdk_version() >= (2, 50):
        lifecycle = {"on_timeout": {"action": "pause", "mode": "filesystem"}}
    else:
        lifecycle = {"on_timeout": {"action": "pause", "keep_memory": False}}
    sbx = Sandbox.create(timeout=3, lifecycle=lifecycle)
    try:
        sbx.files.write("/home/user/kept.txt", "through an automatic pause")
        sbx.commands.run("sleep 1000", background=True)
        wait_until(
            lambda: Sandbox.get_info(sbx.sandbox_id).state == "paused",
            "the sandbox to pause at its deadline",
            limit_s=20,
        )
        resumed = Sandbox.connect(sbx.sandbox_id, timeout=60)
        assert resumed.files.read("/home/user/kept.txt") == "through an automatic pause"
        assert "sleep 1000" not in resumed.commands.run("ps -eo args").stdout
    finally:
        Sandbox.kill(sbx.sandbox_id)


def test_a_sandbox_paused_to_disk_can_be_killed(arca):
    sbx = Sandbox.create(timeout=120)
    pause_files_only(sbx)
    assert Sandbox.kill(sbx.sandbox_id) is True
    assert Sandbox.kill(sbx.sandbox_id) is False
    with pytest.raises(Exception):
        Sandbox.connect(sbx.sandbox_id, timeout=30)
