#!/usr/bin/env python3
"""Pause, resume, fork and snapshot latency through the official Python SDK against a running
`arca up`, for a sandbox whose process holds 10 MiB and 256 MiB of touched memory: `sbx.pause()`
(frozen, and filesystem-only), `Sandbox.connect()` of the paused sandbox, and the first command
after it; the memory a pause to disk gives back; `fork()` with count 1 and 10;
`create_snapshot()` and a create from it. Beside them, a `commands.run("true")` round trip on a
running sandbox from the same run. Nothing is asserted.

    eval "$(arca up ...)"   # or export E2B_API_URL, E2B_SANDBOX_URL, E2B_API_KEY
    .cache/venv/e2b-2.63.0/bin/python benches/pause_resume.py -n 10
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

HOLD = (
    "import time\n"
    "b = bytearray({size})\n"
    "for i in range(0, len(b), 4096):\n"
    "    b[i] = 1\n"
    "open('/tmp/held', 'w').write('ok')\n"
    "time.sleep(100000)\n"
)


def row(name: str, samples: list[float]) -> None:
    s = sorted(samples)
    print(f"{name:<52} {s[len(s) // 2]:>9.2f} {s[-1]:>9.2f} {statistics.fmean(s):>9.2f}")


def sandbox_state(sandbox_id: str) -> tuple[str, dict] | None:
    """(directory name, state file) of a sandbox in $ARCA_HOME (set by `harness.py run`)."""
    import glob
    import json

    for f in glob.glob(os.path.join(os.environ.get("ARCA_HOME", "/var/lib/arca"), "sandboxes/*/state.json")):
        try:
            st = json.load(open(f))
        except (OSError, ValueError):
            continue
        if (st.get("spec") or {}).get("sandbox_id") == sandbox_id:
            return os.path.basename(os.path.dirname(f)), st
    return None


def on_disk(sandbox_id: str) -> bool:
    """Whether nothing of the sandbox runs any more (its state names no process)."""
    found = sandbox_state(sandbox_id)
    return found is not None and found[1].get("on_disk") and found[1].get("pid") is None


def cgroup_memory_mib(sandbox_id: str) -> float:
    """Memory charged to a sandbox's cgroup now, MiB: what a pause that removes the cgroup gives
    back. (The host's MemAvailable is no use on this machine kind: a VM whose free memory does not
    show a process's exit at once.)"""
    import glob

    found = sandbox_state(sandbox_id)
    if found is None:
        return 0.0
    for f in glob.glob(f"/sys/fs/cgroup/memory/*/{found[0]}/memory.usage_in_bytes") + glob.glob(
        f"/sys/fs/cgroup/*/{found[0]}/memory.current"
    ):
        return int(open(f).read()) / (1 << 20)
    return 0.0


def holding(mib: int):
    """A sandbox whose python process holds `mib` MiB of touched memory."""
    from e2b import Sandbox

    sbx = Sandbox.create(timeout=600)
    sbx.files.write("/tmp/hold.py", HOLD.format(size=mib << 20))
    sbx.commands.run("python3 /tmp/hold.py", background=True)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if sbx.files.read("/tmp/held") == "ok":
                break
        except Exception:  # noqa: BLE001 - not written yet
            pass
        time.sleep(0.1)
    return sbx


def filesystem_pause(n: int) -> None:
    from e2b import Sandbox

    print(f"\n{'filesystem-only pause, ms (n=%d)' % n:<52} {'p50':>9} {'max':>9} {'mean':>9}")
    for mib in (10, 256):
        pause, resume, first, freed = [], [], [], []
        for _ in range(n):
            sbx = holding(mib)
            try:
                held = cgroup_memory_mib(sbx.sandbox_id)
                t = time.perf_counter()
                sbx.pause(keep_memory=False)
                pause.append((time.perf_counter() - t) * 1000)
                # Its cgroup is gone with the pause: all it held is given back.
                freed.append(held if on_disk(sbx.sandbox_id) else 0.0)
                t = time.perf_counter()
                sbx = Sandbox.connect(sbx.sandbox_id, timeout=600)
                resume.append((time.perf_counter() - t) * 1000)
                t = time.perf_counter()
                sbx.commands.run("true")
                first.append((time.perf_counter() - t) * 1000)
            finally:
                sbx.kill()
        row(f"{mib} MiB held: pause(keep_memory=False)", pause)
        row(f"{mib} MiB held: connect() (boots on the kept disk)", resume)
        row(f"{mib} MiB held: first commands.run('true') after", first)
        row(f"{mib} MiB held: memory released (its cgroup's), MiB", freed)


def to_disk(n: int) -> None:
    """Against `arca up --pause-to-disk-after 0`: every pause goes on to disk at once (with CRIU,
    processes and memory saved). Measures the pause call, the time until nothing of the sandbox
    runs on the host (checkpoint and release), connect (restore), the first command after it, and
    the memory given back (what the sandbox's cgroup held, which goes)."""
    from e2b import Sandbox

    print(f"\n{'pause to disk (--pause-to-disk-after 0), ms (n=%d)' % n:<52} {'p50':>9} {'max':>9} {'mean':>9}")
    for mib in (10, 256):
        pause, gone, resume, first, freed = [], [], [], [], []
        for _ in range(n):
            # A fresh sandbox each time: CRIU cannot save a restored one again.
            sbx = holding(mib)
            try:
                held = cgroup_memory_mib(sbx.sandbox_id)
                t = time.perf_counter()
                sbx.pause()
                pause.append((time.perf_counter() - t) * 1000)
                while not on_disk(sbx.sandbox_id):
                    time.sleep(0.002)
                gone.append((time.perf_counter() - t) * 1000)
                freed.append(held)
                t = time.perf_counter()
                sbx = Sandbox.connect(sbx.sandbox_id, timeout=600)
                resume.append((time.perf_counter() - t) * 1000)
                t = time.perf_counter()
                sbx.commands.run("true")
                first.append((time.perf_counter() - t) * 1000)
                sbx.commands.run("pgrep -f hold.py")  # its process came back
            finally:
                sbx.kill()
        row(f"{mib} MiB held: pause()", pause)
        row(f"{mib} MiB held: until nothing runs on the host", gone)
        row(f"{mib} MiB held: connect() (restore)", resume)
        row(f"{mib} MiB held: first commands.run('true') after", first)
        row(f"{mib} MiB held: memory released (its cgroup's), MiB", freed)


def fork_and_snapshot(n: int) -> None:
    from e2b import Sandbox

    print(f"\n{'fork and snapshot, ms (n=%d)' % n:<52} {'p50':>9} {'max':>9} {'mean':>9}")
    src = Sandbox.create(timeout=600)
    try:
        src.commands.run("head -c 50000000 /dev/urandom > /home/user/data.bin")
        for count in (1, 10):
            took = []
            for _ in range(n if count == 1 else max(1, n // 3)):
                t = time.perf_counter()
                forks = src.fork(count=count, timeout=120)
                took.append((time.perf_counter() - t) * 1000)
                for f in forks:
                    if isinstance(f, Exception):
                        raise f
                    f.kill()
            row(f"fork(count={count}) of a sandbox with 50 MB written", took)
        snap, create = [], []
        for _ in range(n):
            t = time.perf_counter()
            info = src.create_snapshot()
            snap.append((time.perf_counter() - t) * 1000)
            t = time.perf_counter()
            s = Sandbox.create(info.snapshot_id, timeout=60)
            create.append((time.perf_counter() - t) * 1000)
            s.kill()
            Sandbox.delete_snapshot(info.snapshot_id)
        row("create_snapshot() of the same sandbox", snap)
        row("Sandbox.create(snapshot) (first, cold)", create)
    finally:
        src.kill()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-n", type=int, default=10)
    ap.add_argument(
        "--to-disk",
        action="store_true",
        help="only the pause-to-disk figures; run arca up with --pause-to-disk-after 0",
    )
    args = ap.parse_args()
    for var in ("E2B_API_URL", "E2B_SANDBOX_URL", "E2B_API_KEY"):
        if not os.environ.get(var):
            ap.error(f"set {var} (arca up prints the exports)")
    from e2b import Sandbox

    if args.to_disk:
        to_disk(args.n)
        return
    print(f"\n{'frozen pause, ms (n=%d)' % args.n:<52} {'p50':>9} {'max':>9} {'mean':>9}")
    for mib in (10, 256):
        sbx = holding(mib)
        try:
            rt, pause, resume, first = [], [], [], []
            for _ in range(args.n):
                t = time.perf_counter()
                sbx.commands.run("true")
                rt.append((time.perf_counter() - t) * 1000)
                t = time.perf_counter()
                sbx.pause()
                pause.append((time.perf_counter() - t) * 1000)
                t = time.perf_counter()
                sbx = Sandbox.connect(sbx.sandbox_id, timeout=600)
                resume.append((time.perf_counter() - t) * 1000)
                t = time.perf_counter()
                sbx.commands.run("true")
                first.append((time.perf_counter() - t) * 1000)
            row(f"{mib} MiB held: commands.run('true'), running", rt)
            row(f"{mib} MiB held: pause()", pause)
            row(f"{mib} MiB held: connect() of the paused sandbox", resume)
            row(f"{mib} MiB held: first commands.run('true') after", first)
        finally:
            sbx.kill()
    filesystem_pause(args.n)
    fork_and_snapshot(args.n)


if __name__ == "__main__":
    main()
