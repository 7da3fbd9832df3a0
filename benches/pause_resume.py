#!/usr/bin/env python3
"""Pause and resume latency through the official Python SDK against a running `arca up`, for a
sandbox whose process holds 10 MiB and 256 MiB of touched memory: `sbx.pause()`,
`Sandbox.connect()` of the paused sandbox, and the first command after it. Beside them, a
`commands.run("true")` round trip on a running sandbox from the same run. Nothing is asserted.

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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-n", type=int, default=10)
    args = ap.parse_args()
    for var in ("E2B_API_URL", "E2B_SANDBOX_URL", "E2B_API_KEY"):
        if not os.environ.get(var):
            ap.error(f"set {var} (arca up prints the exports)")
    from e2b import Sandbox

    print(f"\n{'frozen pause, ms (n=%d)' % args.n:<52} {'p50':>9} {'max':>9} {'mean':>9}")
    for mib in (10, 256):
        sbx = Sandbox.create(timeout=600)
        try:
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


if __name__ == "__main__":
    main()
