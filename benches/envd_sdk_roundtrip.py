#!/usr/bin/env python3
"""SDK round-trip benchmark for a running arca-envd.

Measures, through the official Python SDK in debug mode:
  - `sandbox.commands.run("true")` round trip (Start stream to the end event),
  - upload / download throughput of 4 MiB and 100 MiB files (`files.write`,
    `files.read(format="bytes")`),
and, in the same process as baselines, fork+exec of /bin/true with `os.posix_spawn` + `waitpid`
and with `subprocess.run`.

Run with the 2.63.0 venv (scripts/setup.sh creates it) against an envd, e.g.:

    tests/compat/run-envd.sh target/x86_64-unknown-linux-musl/release/arca-envd 49950
    E2B_SANDBOX_URL=http://127.0.0.1:49950 .cache/venv/e2b-2.63.0/bin/python \\
        benches/envd_sdk_roundtrip.py
    tests/compat/stop-envd.sh <pid printed by run-envd.sh>

Figures are for comparison within one run on one machine; they are not asserted anywhere.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import time
import urllib.request
import uuid

MIB = 1024 * 1024


def percentile(samples: list[float], p: float) -> float:
    s = sorted(samples)
    k = (len(s) - 1) * p
    lo, hi = int(k), min(int(k) + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def timed(fn, n: int, warmup: int) -> list[float]:
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        out.append((time.perf_counter() - t0) * 1000.0)
    return out


def spawn_true() -> None:
    pid = os.posix_spawn("/bin/true", ["/bin/true"], os.environ)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0


def subprocess_true() -> None:
    subprocess.run(["/bin/true"], check=True)


_CLEAN_HOME = None


def subprocess_login_bash() -> None:
    # What envd runs for every command (`bash -l -c <cmd>`), in an environment like the
    # sandbox user's: an empty home, so only the system login profile runs.
    global _CLEAN_HOME
    if _CLEAN_HOME is None:
        import tempfile

        _CLEAN_HOME = tempfile.mkdtemp(prefix="arca-bench-home-")
    env = {"HOME": _CLEAN_HOME, "PATH": "/usr/local/bin:/usr/bin:/bin", "USER": "user"}
    subprocess.run(["/bin/bash", "-l", "-c", "true"], check=True, env=env)


def raw_start_factory():
    """A Start call of `true` on a kept-alive HTTP/1.1 connection, without the SDK."""
    import http.client
    import json
    import struct
    from urllib.parse import urlparse

    u = urlparse(os.environ["E2B_SANDBOX_URL"])
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=30)
    msg = json.dumps({"process": {"cmd": "/bin/true"}, "stdin": False}).encode()
    body = struct.pack(">BI", 0, len(msg)) + msg

    def call() -> None:
        conn.request("POST", "/process.Process/Start", body,
                     {"Content-Type": "application/connect+json", "Connect-Protocol-Version": "1"})
        data = conn.getresponse().read()
        assert b"exitCode" not in data and b'"end"' in data, data

    return call


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-n", type=int, default=200, help="measured iterations per latency row")
    ap.add_argument("--warmup", type=int, default=20)
    ap.add_argument("--reps-small", type=int, default=10, help="repetitions of the 4 MiB transfer")
    ap.add_argument("--reps-large", type=int, default=3, help="repetitions of the 100 MiB transfer")
    ap.add_argument("--dir", default="/tmp", help="directory inside the sandbox for transfer files")
    ap.add_argument("--user", default="user",
                    help="default user to set through /init (its home should have no slow profile)")
    args = ap.parse_args()

    if not os.environ.get("E2B_SANDBOX_URL"):
        ap.error("set E2B_SANDBOX_URL to the envd base URL, e.g. http://127.0.0.1:49950")
    os.environ.setdefault("E2B_DEBUG", "true")
    os.environ.setdefault("E2B_API_KEY", "e2b_" + "0" * 40)

    from importlib.metadata import version

    from e2b import Sandbox

    # Commands run as the sandbox user, as with a real template (root's profile on a
    # development host can cost 100+ ms per login shell, which is not envd's).
    init = urllib.request.Request(
        os.environ["E2B_SANDBOX_URL"].rstrip("/") + "/init",
        data=('{"defaultUser":"%s"}' % args.user).encode(),
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    with urllib.request.urlopen(init, timeout=10) as resp:
        assert resp.status == 204

    sbx = Sandbox.create()
    assert sbx.commands.run("true").exit_code == 0

    rows: list[tuple[str, float, float, float]] = []

    def latency(name: str, fn) -> None:
        s = timed(fn, args.n, args.warmup)
        rows.append((name, percentile(s, 0.5), percentile(s, 0.9), statistics.fmean(s)))

    latency('sdk commands.run("true")', lambda: sbx.commands.run("true"))
    latency("posix_spawn /bin/true + waitpid", spawn_true)
    latency("subprocess.run([/bin/true])", subprocess_true)
    latency("subprocess.run(bash -l -c true)", subprocess_login_bash)
    latency("raw Connect Start over one TCP conn", raw_start_factory())

    throughput: list[tuple[str, float, float, float]] = []
    path = f"{args.dir.rstrip('/')}/arca-bench-{uuid.uuid4().hex[:8]}.bin"
    try:
        for size_mib, reps in ((4, args.reps_small), (100, args.reps_large)):
            data = os.urandom(size_mib * MIB)
            up, down, raw = [], [], []
            for _ in range(reps):
                t0 = time.perf_counter()
                sbx.files.write(path, data, request_timeout=600)
                up.append(size_mib / (time.perf_counter() - t0))
                t0 = time.perf_counter()
                got = sbx.files.read(path, format="bytes", request_timeout=600)
                down.append(size_mib / (time.perf_counter() - t0))
                assert len(got) == len(data)
                # Same download with urllib, to tell envd's speed from the SDK client's.
                t0 = time.perf_counter()
                with urllib.request.urlopen(sbx.download_url(path), timeout=600) as resp:
                    assert len(resp.read()) == len(data)
                raw.append(size_mib / (time.perf_counter() - t0))
            assert bytes(got) == data
            throughput.append(
                (f"{size_mib} MiB", statistics.median(up), statistics.median(down), statistics.median(raw))
            )
    finally:
        sbx.files.remove(path)

    print(f"\narca-envd at {os.environ['E2B_SANDBOX_URL']}, e2b {version('e2b')}, "
          f"n={args.n} (warmup {args.warmup})\n")
    print(f"{'latency':<36} {'p50 ms':>9} {'p90 ms':>9} {'mean ms':>9}")
    for name, p50, p90, mean in rows:
        print(f"{name:<36} {p50:>9.3f} {p90:>9.3f} {mean:>9.3f}")
    print(f"\n{'transfer (median of reps)':<36} {'up MiB/s':>9} {'down MiB/s':>11} {'urllib down':>12}")
    for name, up_mibs, down_mibs, raw_mibs in throughput:
        print(f"{name:<36} {up_mibs:>9.1f} {down_mibs:>11.1f} {raw_mibs:>12.1f}")


if __name__ == "__main__":
    main()
