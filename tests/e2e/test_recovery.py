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


def criu_usable() -> str | None:
    """Why CRIU cannot be used here, or None when it can (what `arca up` checks too)."""
    import shutil
    import subprocess

    criu = "/usr/local/sbin/criu" if os.path.exists("/usr/local/sbin/criu") else shutil.which("criu")
    if not criu:
        return "no criu installed (scripts/build-criu.sh builds it; scripts/setup.sh runs that)"
    out = subprocess.run([criu, "--version"], capture_output=True, text=True).stdout
    version = next((l.split()[1] for l in out.splitlines() if l.startswith("Version:")), "0")
    if tuple(int(x) for x in version.split(".")[:2]) < (4, 2):
        return f"criu {version} is older than 4.2"
    if subprocess.run([criu, "check"], capture_output=True).returncode != 0:
        return "`criu check` fails on this host"
    return None


def test_frozen_sandboxes_beyond_max_frozen_move_to_disk(arca):
    """`--max-frozen 1`: pausing a second sandbox with its memory moves the one paused longest to
    disk; with CRIU its processes and memory are saved and come back on connect (same pids, same
    boot id, a counter going on from its value), without CRIU only its files; the newer one stays
    frozen."""
    from test_lifecycle import COUNTER, host_processes_of, read_counter

    no_criu = criu_usable()
    os.environ.update(arca.restart("--max-frozen", "1"))
    a = Sandbox.create(timeout=600)
    b = Sandbox.create(timeout=600)
    try:
        a.files.write("/home/user/a.txt", "a's file")
        a.files.write("/tmp/counter.py", COUNTER)
        a.commands.run("python3 /tmp/counter.py", background=True)
        wait_until(lambda: read_counter(a) > 3, "the counter to count")
        boot_id = a.files.read("/proc/sys/kernel/random/boot_id")
        pid_a = int(a.commands.run(BACKGROUND).stdout)
        pid_b = int(b.commands.run(BACKGROUND).stdout)
        assert a.pause() is True
        assert b.pause() is True

        def mode(s):
            return arca.api("GET", f"/sandboxes/{s.sandbox_id}").json().get("pauseMode")

        # Moved: nothing of it runs on the host any more.
        wait_until(lambda: host_processes_of(a.sandbox_id) == [], "the older pause to move to disk")
        assert mode(b) == "full"
        assert host_processes_of(b.sandbox_id) != []
        a2 = Sandbox.connect(a.sandbox_id, timeout=120)
        assert a2.files.read("/home/user/a.txt") == "a's file"
        if no_criu is None:
            assert mode(a) is None  # running again
            assert a2.files.read("/proc/sys/kernel/random/boot_id") == boot_id
            r = a2.commands.run(f"cat /proc/{pid_a}/cmdline | tr '\\0' ' '")
            assert r.stdout == "sleep 1000 ", r.stdout
            # The counter's count lived in its memory: it goes on from there.
            value = read_counter(a2)
            assert value > 3
            wait_until(lambda: read_counter(a2) > value, "the restored counter to go on")
        else:
            print(f"CRIU path skipped: {no_criu}")
            assert "sleep 1000" not in a2.commands.run("ps -eo args").stdout
        b2 = Sandbox.connect(b.sandbox_id, timeout=120)
        r = b2.commands.run(f"cat /proc/{pid_b}/cmdline | tr '\\0' ' '")
        assert r.stdout == "sleep 1000 ", r.stdout
    finally:
        Sandbox.kill(a.sandbox_id)
        Sandbox.kill(b.sandbox_id)
        os.environ.update(arca.restart())


def test_a_checkpointed_sandbox_survives_a_restart_and_resumes(arca):
    """With CRIU: a sandbox moved to disk (`--pause-to-disk-after 0`) holds nothing on the host; after
    `kill -9` and a restart of `arca up` it is still paused, and connect restores its processes."""
    from test_lifecycle import host_processes_of

    no_criu = criu_usable()
    if no_criu is not None:
        pytest.skip(f"CRIU path: {no_criu}")
    os.environ.update(arca.restart("--pause-to-disk-after", "0"))
    sbx = Sandbox.create(timeout=600)
    try:
        pid = int(sbx.commands.run(BACKGROUND).stdout)
        sbx.files.write("/home/user/kept.txt", "with its processes")
        assert sbx.pause() is True
        wait_until(lambda: host_processes_of(sbx.sandbox_id) == [], "the pause to move to disk")
        info = arca.api("GET", f"/sandboxes/{sbx.sandbox_id}").json()
        assert (info["state"], info.get("pauseMode")) == ("paused", "full")
        arca.kill9()
        os.environ.update(arca.start())
        assert Sandbox.get_info(sbx.sandbox_id).state == "paused"
        again = Sandbox.connect(sbx.sandbox_id, timeout=120)
        r = again.commands.run(f"cat /proc/{pid}/cmdline | tr '\\0' ' '")
        assert r.stdout == "sleep 1000 ", r.stdout
        assert again.files.read("/home/user/kept.txt") == "with its processes"
        # Paused again, a restored sandbox stays frozen (CRIU cannot save it a second time), so
        # its processes are still there at the next connect.
        assert again.pause() is True
        import time

        time.sleep(1)  # several rounds of the node's eviction check
        assert host_processes_of(sbx.sandbox_id) != []
        third = Sandbox.connect(sbx.sandbox_id, timeout=120)
        r = third.commands.run(f"cat /proc/{pid}/cmdline | tr '\\0' ' '")
        assert r.stdout == "sleep 1000 ", r.stdout
    finally:
        Sandbox.kill(sbx.sandbox_id)
        os.environ.update(arca.restart())


def test_a_checkpoint_that_cannot_be_restored_resumes_on_its_files(arca):
    """With CRIU: images that cannot be restored (here: its memory pages deleted, as a crash in the
    middle of the dump would leave them) do not strand the sandbox: connect boots it on its files
    (a filesystem-only resume), and it pauses and resumes as usual after that."""
    import glob
    import time

    from test_lifecycle import host_processes_of

    no_criu = criu_usable()
    if no_criu is not None:
        pytest.skip(f"CRIU path: {no_criu}")
    os.environ.update(arca.restart("--pause-to-disk-after", "0"))
    sbx = Sandbox.create(timeout=600)
    try:
        sbx.commands.run(BACKGROUND)
        sbx.files.write("/home/user/kept.txt", "files survive")
        boot_id = sbx.files.read("/proc/sys/kernel/random/boot_id")
        assert sbx.pause() is True
        wait_until(lambda: host_processes_of(sbx.sandbox_id) == [], "the pause to move to disk")
        d = arca.handed_out()[sbx.sandbox_id]
        pages = glob.glob(str(arca.home / "sandboxes" / d / "checkpoint" / "pages-*.img"))
        assert pages, "no CRIU images were written"
        for p in pages:
            os.remove(p)
        again = Sandbox.connect(sbx.sandbox_id, timeout=120)
        assert again.files.read("/home/user/kept.txt") == "files survive"
        assert again.files.read("/proc/sys/kernel/random/boot_id") != boot_id
        assert "sleep 1000" not in again.commands.run("ps -eo args").stdout
        assert not (arca.home / "sandboxes" / d / "checkpoint").exists()
        # A fresh boot: CRIU can save it again.
        again.commands.run(BACKGROUND)
        assert again.pause() is True
        wait_until(lambda: host_processes_of(sbx.sandbox_id) == [], "the second pause to move to disk")
        third = Sandbox.connect(sbx.sandbox_id, timeout=120)
        assert "sleep 1000" in third.commands.run("ps -eo args").stdout
    finally:
        Sandbox.kill(sbx.sandbox_id)
        os.environ.update(arca.restart())


def test_frozen_sandboxes_move_to_disk_when_the_host_is_short_of_memory(arca):
    """`--min-free-memory-pct 100` makes the host always short of memory: frozen sandboxes move to
    disk one after the other, the longest paused first, and come back on connect (with CRIU with
    their processes, without it with their files)."""
    from test_lifecycle import host_processes_of

    no_criu = criu_usable()
    os.environ.update(arca.restart("--min-free-memory-pct", "100"))
    a = Sandbox.create(timeout=600)
    b = Sandbox.create(timeout=600)
    try:
        pids = {s.sandbox_id: int(s.commands.run(BACKGROUND).stdout) for s in (a, b)}
        a.files.write("/home/user/a.txt", "a")
        assert a.pause() is True
        wait_until(lambda: host_processes_of(a.sandbox_id) == [], "the first pause to move to disk")
        assert host_processes_of(b.sandbox_id) != []  # running: not a candidate
        assert b.pause() is True
        wait_until(lambda: host_processes_of(b.sandbox_id) == [], "the second pause to move to disk")
        for s in (a, b):
            again = Sandbox.connect(s.sandbox_id, timeout=120)
            ps = again.commands.run("ps -eo pid,args").stdout
            if no_criu is None:
                assert f"{pids[s.sandbox_id]} sleep 1000" in " ".join(ps.split()), ps
            else:
                assert "sleep 1000" not in ps
        assert Sandbox.connect(a.sandbox_id, timeout=60).files.read("/home/user/a.txt") == "a"
    finally:
        Sandbox.kill(a.sandbox_id)
        Sandbox.kill(b.sandbox_id)
        os.environ.update(arca.restart())
