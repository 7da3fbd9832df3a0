"""Leaks (issue 3): 200 create/kill cycles leave no mount, netns, veth, cgroup, process or file
behind; the test counts them on the host before and after."""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

from e2b import Sandbox

from conftest import wait_until, wait_until_or_false
from harness import WARM_POOL, WARM_SLOTS

CYCLES = 200
WORKERS = 4


def fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def test_create_kill_cycles_leave_nothing(arca):
    # Start from a quiet node: no sandboxes handed out, the warm pools full.
    assert arca.list_sandboxes() == []

    def booting() -> bool:
        """A sandbox init is still setting a sandbox up (only envd runs in a booted one)."""
        for pid in arca.cgroup_processes():
            try:
                if not open(f"/proc/{pid}/cmdline").read().startswith("/run/arca/envd"):
                    return True
            except OSError:
                pass
        return False

    def quiet():
        c = arca.counts()
        full = len(arca.warm()) == WARM_POOL and not arca.handed_out() and not booting()
        return c if full and c["netns"] == WARM_SLOTS + WARM_POOL else None

    baseline = wait_until(quiet, "the warm pools refilled", limit_s=60)
    assert baseline["mounts"] == 0, baseline
    assert baseline["sandbox_dirs"] == WARM_POOL, baseline
    fds_before = fds(arca.proc.pid)

    def cycle(i: int) -> None:
        if i % 20 == 0:
            # Every 20th through the SDK with a command, so sandboxes really start.
            sbx = Sandbox.create(timeout=60)
            assert sbx.commands.run("echo $E2B_SANDBOX_ID").stdout == f"{sbx.sandbox_id}\n"
            assert sbx.kill() is True
            return
        r = arca.api("POST", "/v2/sandboxes", {"templateID": "base", "timeout": 60})
        assert r.status == 201, (r.status, r.body)
        sid = r.json()["sandboxID"]
        d = arca.api("DELETE", f"/sandboxes/{sid}")
        assert d.status == 204, (d.status, d.body)

    with ThreadPoolExecutor(WORKERS) as pool:
        list(pool.map(cycle, range(CYCLES)))

    assert arca.list_sandboxes() == []
    # Teardown and slot recycling run in the background: wait for the counts to settle.
    last = {}

    def settled():
        last["counts"] = arca.counts()
        return quiet() == baseline

    if not wait_until_or_false(settled, limit_s=60):
        assert last["counts"] == baseline
    assert arca.proc.poll() is None
    # arca up itself keeps no descriptor per sandbox it ever had.
    assert fds(arca.proc.pid) <= fds_before + 16
