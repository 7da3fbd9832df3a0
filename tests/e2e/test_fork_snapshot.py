"""Fork and snapshots through the official SDK against a real `arca up`: both start from a copy of
a sandbox's files taken at one moment while the source goes on."""

from __future__ import annotations

import pytest
from e2b import Sandbox

from conftest import unique, wait_until
from test_lifecycle import COUNTER, read_counter
from test_recovery import criu_usable


def test_fork_of_a_running_sandbox_with_count_three_diverges_independently(arca):
    no_criu = criu_usable()
    memory = no_criu is None
    if not memory:
        print(f"forks carry files only: {no_criu}")
    src = Sandbox.create(timeout=120, envs={"FROM_SOURCE": "yes"})
    forks = []
    try:
        src.files.write("/home/user/shared.txt", "written before the fork")
        src.commands.run("mkdir -p /opt/app && echo v1 > /opt/app/version", user="root")
        pid = int(src.commands.run("nohup sleep 1000 >/dev/null 2>&1 & echo $!").stdout)
        src.files.write("/tmp/counter.py", COUNTER)
        src.commands.run("python3 /tmp/counter.py", background=True)
        wait_until(lambda: read_counter(src) > 3, "the source's counter to count")
        before = Sandbox.get_info(src.sandbox_id)
        results = src.fork(count=3, timeout=120)
        assert len(results) == 3
        for r in results:
            assert not isinstance(r, Exception), r
        forks = results
        ids = {f.sandbox_id for f in forks}
        assert len(ids) == 3 and src.sandbox_id not in ids
        for i, f in enumerate(forks):
            assert f.files.read("/home/user/shared.txt") == "written before the fork"
            assert f.commands.run("cat /opt/app/version").stdout.strip() == "v1"
            assert f.commands.run("echo $FROM_SOURCE").stdout.strip() == "yes"
            assert f.commands.run("hostname").stdout.strip() == f.sandbox_id
            f.files.write("/home/user/mine.txt", f"fork {i}")
            if memory:
                # With CRIU the fork has the source's processes, pids and memory: the counter
                # goes on in the fork from the value it had, on its own.
                r = f.commands.run(f"cat /proc/{pid}/cmdline | tr '\\0' ' '")
                assert r.stdout == "sleep 1000 ", r.stdout
                value = read_counter(f)
                assert value > 3
                wait_until(lambda: read_counter(f) > value, "the fork's counter to go on")
            else:
                assert "sleep 1000" not in f.commands.run("ps -eo args").stdout
        # Each fork has its own files from here on, and so has the source.
        src.files.write("/home/user/shared.txt", "changed in the source")
        for i, f in enumerate(forks):
            assert f.files.read("/home/user/mine.txt") == f"fork {i}"
            assert f.files.read("/home/user/shared.txt") == "written before the fork"
        assert not src.files.exists("/home/user/mine.txt")
        # The source kept running with its id and deadline; its processes go on.
        after = Sandbox.get_info(src.sandbox_id)
        assert after.state == "running"
        assert after.end_at == before.end_at
        assert "sleep 1000" in src.commands.run("ps -eo args").stdout
        listed = {s.sandbox_id for s in Sandbox.list().next_items()}
        assert ids | {src.sandbox_id} <= listed
        # Killing the source leaves the forks running.
        src.kill()
        for f in forks:
            assert f.commands.run("echo alive").stdout.strip() == "alive"
    finally:
        for f in forks:
            Sandbox.kill(f.sandbox_id)
        Sandbox.kill(src.sandbox_id)


def test_fork_of_an_unknown_sandbox_is_not_found(arca):
    with pytest.raises(Exception) as e:
        Sandbox.fork("doesnotexist0000000000", count=1)
    assert "not found" in str(e.value).lower()


def test_snapshot_then_create_from_it(arca):
    src = Sandbox.create(timeout=120, metadata={"snap": unique()})
    made = []
    snap = None
    try:
        src.files.write("/home/user/project/main.py", "print('from the snapshot')\n")
        src.commands.run("apt-get --version > /dev/null; echo ok > /etc/marker", user="root")
        snap = src.create_snapshot()
        assert snap.snapshot_id
        # The source goes on and can change without touching the snapshot.
        assert src.commands.run("echo running").stdout.strip() == "running"
        src.files.write("/home/user/project/main.py", "print('changed later')\n")
        for _ in range(2):
            s = Sandbox.create(snap.snapshot_id, timeout=120)
            made.append(s)
            out = s.commands.run("python3 /home/user/project/main.py").stdout.strip()
            assert out == "from the snapshot"
            assert s.files.read("/etc/marker").strip() == "ok"
            assert s.commands.run("hostname").stdout.strip() == s.sandbox_id
        # Independent copies.
        made[0].files.write("/home/user/project/main.py", "print('first copy')\n")
        assert (
            made[1].commands.run("python3 /home/user/project/main.py").stdout.strip()
            == "from the snapshot"
        )
        listed = [x.snapshot_id for x in Sandbox.list_snapshots(sandbox_id=src.sandbox_id).next_items()]
        assert snap.snapshot_id in listed
        # The snapshot outlives its source.
        src.kill()
        after = Sandbox.create(snap.snapshot_id, timeout=60)
        made.append(after)
        assert after.files.read("/etc/marker").strip() == "ok"
    finally:
        for s in made:
            Sandbox.kill(s.sandbox_id)
        Sandbox.kill(src.sandbox_id)
        if snap is not None:
            Sandbox.delete_snapshot(snap.snapshot_id)
    assert Sandbox.delete_snapshot(snap.snapshot_id) is False
    with pytest.raises(Exception):
        Sandbox.create(snap.snapshot_id, timeout=30)


def test_snapshot_of_a_paused_sandbox(arca):
    src = Sandbox.create(timeout=120)
    snap = None
    try:
        src.files.write("/home/user/paused.txt", "taken while paused")
        src.pause()
        snap = Sandbox.create_snapshot(src.sandbox_id)
        assert Sandbox.get_info(src.sandbox_id).state == "paused"
        s = Sandbox.create(snap.snapshot_id, timeout=60)
        try:
            assert s.files.read("/home/user/paused.txt") == "taken while paused"
        finally:
            s.kill()
    finally:
        Sandbox.kill(src.sandbox_id)
        if snap is not None:
            Sandbox.delete_snapshot(snap.snapshot_id)
