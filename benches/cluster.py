#!/usr/bin/env python3
"""Cluster-mode figures (issue 7, ADR 0006), on one machine: PostgreSQL, `arca api`, `arca
proxy` and nodes in network namespaces of their own (tests/cluster/cluster.py). Nothing is
asserted.

- create latency through the api (warm pool 2 per node, as `arca up`'s default) (`Sandbox.create()` with the official Python SDK, one at a
  time, then `commands.run("true")` once so every sandbox is known to answer), p50/p99, with 1
  node and with 3 nodes; each node reuses or pulls the base template before timing starts; the
  same loop against `arca up` in the same run is the baseline (ratio of p50s);
- placement spread: sandboxes per node after the 3-node run;
- time from `kill -9` of a node to its sandboxes being listed with `nodeStatus: "lost"`
  (heartbeat 1 s, lost after 4 s: the harness's settings), several times.

Traffic stays on loopback, the harness's bridge and its namespaces.

    # as root, with the release build:
    ARCA_BIN=target/release/arca .cache/venv/e2b-2.63.0/bin/python benches/cluster.py -n 60
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "cluster"))
from cluster import Cluster, wait_for  # noqa: E402


def pct(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(p / 100 * (len(xs) - 1))))]


def creates(n: int) -> list[float]:
    from e2b import Sandbox

    # Warm up: the first create on a node may pull the base template.
    times = []
    made = []
    for i in range(n):
        t0 = time.perf_counter()
        sbx = Sandbox.create(timeout=600)
        times.append((time.perf_counter() - t0) * 1000)
        made.append(sbx)
        sbx.commands.run("true")
    for s in made:
        s.kill()
    return times


def run(nodes: int, n: int) -> dict:
    c = Cluster(max_sandboxes=2 * n, warm_pool=2)
    try:
        os.environ.update(c.start(n_nodes=nodes))
        from e2b import Sandbox

        # Every node gets the base template before timing (pulls are one-off costs).
        warm = [Sandbox.create(timeout=600) for _ in range(nodes * 3)]
        for s in warm:
            s.kill()
        times = creates(n)
        # Spread: keep n sandboxes alive and count them per node.
        alive = [Sandbox.create(timeout=600) for _ in range(n)]
        spread: dict[str, int] = {}
        for s in c.listed():
            spread[s["nodeID"]] = spread.get(s["nodeID"], 0) + 1
        lost_s = []
        if nodes > 1:
            for _ in range(3):
                victim = c.nodes[-1]
                on_it = [s["sandboxID"] for s in c.listed() if s["nodeID"] == victim.node_id]
                victim.proc.kill9()
                t0 = time.monotonic()
                wait_for(
                    "reported lost",
                    lambda on_it=on_it: all(
                        s.get("nodeStatus") == "lost"
                        for s in c.listed()
                        if s["sandboxID"] in on_it
                    ),
                    60,
                    every=0.05,
                )
                lost_s.append(time.monotonic() - t0)
                c.restart_node(victim)
                wait_for(
                    "back",
                    lambda: any(
                        x["node_id"] == victim.node_id and x["status"] == "ready"
                        for x in c.node_infos()
                    ),
                    60,
                )
        for s in alive:
            s.kill()
        return {"times": times, "spread": spread, "lost_s": lost_s}
    finally:
        problems = c.close()
        for p in problems:
            print(f"[bench] left behind: {p}", file=sys.stderr)


def baseline(n: int) -> list[float]:
    """The same creates against `arca up` (api, proxy and node in one process)."""
    import harness

    arca = harness.new_instance()
    try:
        env = arca.start()
        saved = {k: os.environ.get(k) for k in env}
        os.environ.update(env)
        try:
            from e2b import Sandbox

            for s in [Sandbox.create(timeout=600) for _ in range(3)]:
                s.kill()
            return creates(n)
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
    finally:
        for p in harness.finish(arca):
            print(f"[bench] arca up left behind: {p}", file=sys.stderr)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("-n", type=int, default=60, help="creates per configuration")
    args = ap.parse_args()
    base = baseline(args.n)
    print(
        f"baseline arca up: create p50 {statistics.median(base):.1f} ms, "
        f"p99 {pct(base, 99):.1f} ms, max {max(base):.1f} ms (n={len(base)})"
    )
    for nodes in (1, 3):
        r = run(nodes, args.n)
        t = r["times"]
        print(
            f"{nodes} node(s): create p50 {statistics.median(t):.1f} ms, p99 {pct(t, 99):.1f} ms, "
            f"max {max(t):.1f} ms (n={len(t)}); p50 {statistics.median(t) / statistics.median(base):.2f}x arca up"
        )
        print(f"  spread of {args.n} live sandboxes: {dict(sorted(r['spread'].items()))}")
        if r["lost_s"]:
            print("  kill -9 -> reported lost: " + ", ".join(f"{x:.2f} s" for x in r["lost_s"]))


if __name__ == "__main__":
    main()
