"""Recovery (issue 3): `kill -9` of `arca up` while sandboxes run, then a restart with the same
home and ports. Running sandboxes come back with the same ids and their processes alive; a
sandbox whose PID 1 died while the node was down is reaped; the api and the node agree."""

from __future__ import annotations

import os
import pytest
from e2b import NotFoundException, Sandbox, SandboxQuery

from conftest import unique, wait_until

BACKGROUND = "nohup sleep 1000 >/dev/null 2>&1 & echo $!"


def test_kill9_and_restart(arca):
    tag = unique()
    sbxs = [Sandbox.create(metadata={"e2e-rec": tag}, timeout=600) for _ in range(4)]
    survivors, doomed = sbxs[:3], sbxs[3]
    try:
        pids = {}
        for s in sbxs:
            pids[s.sandbox_id] = int(s.commands.run(BACKGROUND).stdout)
            s.files.write("/home/user/before-restart", s.sandbox_id)
        records = {r["sandboxID"]: r for r in arca.list_sandboxes()}
        assert set(records) >= {s.sandbox_id for s in sbxs}

        arca.kill9()
        # With the node down, sandboxes keep running on the host.
        assert {s.sandbox_id for s in sbxs} <= (arca.node_sandboxes() or set())
        # One sandbox's PID 1 dies while nobody watches: it must be reaped on restart.
        procs = arca.cgroup_file(doomed.sandbox_id, "cgroup.procs")
        for pid in procs.read_text().split():
            try:
                os.kill(int(pid), 9)
            except ProcessLookupError:
                pass  # a short-lived process ended between the read and the kill

        os.environ.update(arca.start())

        q = SandboxQuery(metadata={"e2e-rec": tag})
        listed = {i.sandbox_id for i in Sandbox.list(query=q).next_items()}
        assert listed == {s.sandbox_id for s in survivors}
        with pytest.raises(NotFoundException):
            Sandbox.get_info(doomed.sandbox_id)
        for s in survivors:
            # Same records (metadata, end) as before the crash.
            rec = arca.api("GET", f"/sandboxes/{s.sandbox_id}").json()
            for k in ("templateID", "metadata", "startedAt", "endAt"):
                assert rec[k] == records[s.sandbox_id][k], k
            # The background process is the same one, and files are kept.
            pid = pids[s.sandbox_id]
            r = s.commands.run(f"cat /proc/{pid}/cmdline | tr '\\0' ' '; cat before-restart")
            assert r.stdout == f"sleep 1000 {s.sandbox_id}", r.stdout
            # A new connection from the SDK works too.
            again = Sandbox.connect(s.sandbox_id)
            assert again.commands.run("echo back").stdout == "back\n"

        # Api and node agree: every listed sandbox is on the host and nothing else is.
        api_ids = {r["sandboxID"] for r in arca.list_sandboxes()}
        wait_until(lambda: arca.node_sandboxes() == api_ids, "the reaped sandbox's files and cgroup gone")
    finally:
        for s in sbxs:
            s.kill()
    # Killing reattached sandboxes cleans up as usual.
    wait_until(
        lambda: arca.node_sandboxes() is not None and not ({s.sandbox_id for s in sbxs} & arca.node_sandboxes()),
        "reattached sandboxes gone",
    )


def test_a_paused_sandbox_survives_a_restart_and_resumes(arca):
    """Issue 5: a paused sandbox stays paused across `kill -9` of `arca up`; connect then resumes
    it with its processes."""
    sbx = Sandbox.create(timeout=600)
    try:
        pid = int(sbx.commands.run(BACKGROUND).stdout)
        assert sbx.pause() is True
        arca.kill9()
        os.environ.update(arca.start())
        assert Sandbox.get_info(sbx.sandbox_id).state == "paused"
        assert not sbx.is_running()
        again = Sandbox.connect(sbx.sandbox_id, timeout=120)
        r = again.commands.run(f"cat /proc/{pid}/cmdline | tr '\\0' ' '")
        assert r.stdout == "sleep 1000 ", r.stdout
    finally:
        Sandbox.kill(sbx.sandbox_id)


def test_a_deadline_passing_while_the_node_is_down_pauses_on_restart(arca):
    """autoPause: the deadline passes while `arca up` is down; after the restart the sandbox is
    paused (the record follows the node) and connect resumes it with its processes."""
    import time

    sbx = Sandbox.create(timeout=4, lifecycle={"on_timeout": "pause"})
    try:
        pid = int(sbx.commands.run(BACKGROUND).stdout)
        arca.kill9()
        time.sleep(5)
        os.environ.update(arca.start())
        wait_until(
            lambda: Sandbox.get_info(sbx.sandbox_id).state == "paused",
            "the sandbox to be paused after the restart",
        )
        again = Sandbox.connect(sbx.sandbox_id, timeout=120)
        r = again.commands.run(f"cat /proc/{pid}/cmdline | tr '\\0' ' '")
        assert r.stdout == "sleep 1000 ", r.stdout
    finally:
        Sandbox.kill(sbx.sandbox_id)


def test_a_sandbox_paused_to_disk_survives_a_restart_and_resumes(arca):
    """Issue 5: a filesystem-only pause holds nothing but files; after `kill -9` and a restart the
    sandbox is still paused and connect boots it on its kept disk."""
    sbx = Sandbox.create(timeout=600)
    try:
        sbx.files.write("/home/user/kept.txt", "across a restart")
        assert Sandbox.pause(sbx.sandbox_id, keep_memory=False) is True
        arca.kill9()
        os.environ.update(arca.start())
        info = arca.api("GET", f"/sandboxes/{sbx.sandbox_id}").json()
        assert (info["state"], info.get("pauseMode")) == ("paused", "filesystem")
        again = Sandbox.connect(sbx.sandbox_id, timeout=120)
        assert again.files.read("/home/user/kept.txt") == "across a restart"
    finally:
        Sandbox.kill(sbx.sandbox_id)


def test_frozen_sandboxes_beyond_max_frozen_move_to_disk(arca):
    """`--max-frozen 1`: pausing a second sandbox with its memory moves the one paused longest to
    disk (files kept, processes ended); the newer one keeps its processes."""
    arca.stop()
    arca.extra_args = ["--max-frozen", "1"]
    os.environ.update(arca.start())
    a = Sandbox.create(timeout=600)
    b = Sandbox.create(timeout=600)
    try:
        a.files.write("/home/user/a.txt", "a's file")
        pid_b = int(b.commands.run(BACKGROUND).stdout)
        a.commands.run(BACKGROUND)
        assert a.pause() is True
        assert b.pause() is True

        def mode(s):
            return arca.api("GET", f"/sandboxes/{s.sandbox_id}").json().get("pauseMode")

        wait_until(lambda: mode(a) == "filesystem", "the older pause to move to disk")
        assert mode(b) == "full"
        a2 = Sandbox.connect(a.sandbox_id, timeout=120)
        assert a2.files.read("/home/user/a.txt") == "a's file"
        assert "sleep 1000" not in a2.commands.run("ps -eo args").stdout
        b2 = Sandbox.connect(b.sandbox_id, timeout=120)
        r = b2.commands.run(f"cat /proc/{pid_b}/cmdline | tr '\\0' ' '")
        assert r.stdout == "sleep 1000 ", r.stdout
    finally:
        Sandbox.kill(a.sandbox_id)
        Sandbox.kill(b.sandbox_id)
        arca.stop()
        arca.extra_args = []
        os.environ.update(arca.start())
