#!/usr/bin/env python3
"""Per-runtime figures (issue 8, ADR 0007) through the official Python SDK against a running
`arca up`, one runtime after the other in one run: for `ns`, `gvisor` and `vm`,

- create latency: `Sandbox.create(metadata={"arca.runtime": ...})` until it returns, then one
  `commands.run("true")` outside the timing (so each sandbox is known to answer);
- command round trip: `commands.run("true")` in one sandbox of each runtime;
- the same `true` by fork+exec in this process, the baseline of the round-trip ratios.

`ns` creates come from the warm pool while it lasts (so pause between creates, `--pause`);
`gvisor` and `vm` boot on demand. A runtime the node does not offer is reported and skipped.
Nothing is asserted.

    eval "$(arca up --vm-assets DIR ...)"   # or export E2B_API_URL, E2B_SANDBOX_URL, E2B_API_KEY
    .cache/venv/e2b-2.63.0/bin/python benches/runtimes.py -n 10
"""

from __future__ import annotations

import argparse
import os
import statistics
import time


def pct(samples: list[float], p: float) -> float:
    s = sorted(samples)
    return s[min(len(s) - 1, round((len(s) - 1) * p))]


def fork_exec(n: int) -> list[float]:
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        pid = os.posix_spawn("/bin/true", ["/bin/true"], os.environ)
        os.waitpid(pid, 0)
        out.append((time.perf_counter() - t0) * 1000)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-n", type=int, default=10, help="creates per runtime")
    ap.add_argument("--commands", type=int, default=200, help="round trips per runtime")
    ap.add_argument("--pause", type=float, default=0.5, help="seconds between creates")
    ap.add_argument("--runtimes", default="ns,gvisor,vm")
    args = ap.parse_args()
    for var in ("E2B_API_URL", "E2B_API_KEY"):
        if not os.environ.get(var):
            ap.error(f"set {var} (arca up prints the exports)")
    from e2b import Sandbox
    from e2b.exceptions import SandboxException

    base = fork_exec(args.commands)
    base_p50 = pct(base, 0.5)
    print(f"{'':<28} {'p50 ms':>9} {'p99 ms':>9} {'mean ms':>9} {'p50 / fork+exec':>16}")
    print(f"{'fork+exec /bin/true':<28} {base_p50:>9.3f} {pct(base, 0.99):>9.3f} {statistics.fmean(base):>9.3f} {1:>16}")
    results = {}
    for rt in args.runtimes.split(","):
        meta = {"arca.runtime": rt}
        creates: list[float] = []
        made = []
        try:
            for _ in range(args.n):
                time.sleep(args.pause)
                t0 = time.perf_counter()
                sbx = Sandbox.create(metadata=meta, timeout=600)
                creates.append((time.perf_counter() - t0) * 1000)
                made.append(sbx)
                sbx.commands.run("true")
        except SandboxException as e:
            print(f"{rt}: skipped ({e})")
            for s in made:
                s.kill()
            continue
        rtt = []
        s = made[0]
        for _ in range(10):
            s.commands.run("true")
        for _ in range(args.commands):
            t0 = time.perf_counter()
            s.commands.run("true")
            rtt.append((time.perf_counter() - t0) * 1000)
        for s in made:
            s.kill()
        results[rt] = (creates, rtt)
        print(f"{rt + ' create':<28} {pct(creates, 0.5):>9.1f} {pct(creates, 0.99):>9.1f} {statistics.fmean(creates):>9.1f} {'':>16}")
        print(f"{rt + ' command round trip':<28} {pct(rtt, 0.5):>9.3f} {pct(rtt, 0.99):>9.3f} {statistics.fmean(rtt):>9.3f} {pct(rtt, 0.5) / base_p50:>15.1f}x")
    if "ns" in results:
        c_ns, r_ns = (pct(x, 0.5) for x in results["ns"])
        for rt, (c, r) in results.items():
            if rt != "ns":
                print(f"{rt}: create p50 {pct(c, 0.5) / c_ns:.1f}x ns, round trip p50 {pct(r, 0.5) / r_ns:.1f}x ns")


if __name__ == "__main__":
    main()
