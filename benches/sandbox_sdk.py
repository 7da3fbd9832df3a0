#!/usr/bin/env python3
"""Sandbox benchmark through the official Python SDK against a running `arca up`.

Measures `Sandbox.create()` + the first `commands.run("true")`, and the command round trip
through the proxy, beside a fork+exec baseline taken in the same process. Figures compare within
one run on one machine; nothing is asserted.

    eval "$(arca up ...)"   # or export E2B_API_URL, E2B_SANDBOX_URL, E2B_API_KEY
    .cache/venv/e2b-2.63.0/bin/python benches/sandbox_sdk.py -n 50
"""

from __future__ import annotations

import argparse
import os
import statistics
import time


def pct(samples: list[float], p: float) -> float:
    s = sorted(samples)
    return s[min(len(s) - 1, round((len(s) - 1) * p))]


def row(name: str, samples: list[float]) -> None:
    print(f"{name:<48} {pct(samples, 0.5):>9.3f} {pct(samples, 0.99):>9.3f} {statistics.fmean(samples):>9.3f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-n", type=int, default=50)
    ap.add_argument("--pause", type=float, default=0.3, help="seconds between creates (warm pool refill)")
    args = ap.parse_args()
    for var in ("E2B_API_URL", "E2B_SANDBOX_URL", "E2B_API_KEY"):
        if not os.environ.get(var):
            ap.error(f"set {var} (arca up prints the exports)")

    from e2b import Sandbox

    fork = []
    for _ in range(args.n):
        t = time.perf_counter()
        pid = os.posix_spawn("/bin/true", ["/bin/true"], os.environ)
        os.waitpid(pid, 0)
        fork.append((time.perf_counter() - t) * 1000)

    create, first, both = [], [], []
    for _ in range(args.n):
        time.sleep(args.pause)
        t0 = time.perf_counter()
        sbx = Sandbox.create()
        t1 = time.perf_counter()
        sbx.commands.run("true")
        t2 = time.perf_counter()
        create.append((t1 - t0) * 1000)
        first.append((t2 - t1) * 1000)
        both.append((t2 - t0) * 1000)
        sbx.kill()

    sbx = Sandbox.create()
    rt = []
    for _ in range(args.n):
        t = time.perf_counter()
        sbx.commands.run("true")
        rt.append((time.perf_counter() - t) * 1000)
    sbx.kill()

    print(f"\n{'python SDK, ms (n=%d)' % args.n:<48} {'p50':>9} {'p99':>9} {'mean':>9}")
    row("baseline: posix_spawn /bin/true + waitpid", fork)
    row("Sandbox.create()", create)
    row("first commands.run('true')", first)
    row("create + first command", both)
    row("commands.run('true') round trip (proxy)", rt)


if __name__ == "__main__":
    main()
