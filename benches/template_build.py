#!/usr/bin/env python3
"""Template benchmark against a running `arca up`: build time of a small Dockerfile (five
steps, no start command) cold (`--no-cache`) and fully cached through `arca template build`, start-to-ready of sandboxes of a
template with a start and a ready command through the official Python SDK, and the layer store's
size beside the sum of every template's full stack (what separate images would take).

Nothing is downloaded: the Dockerfile starts from the base template. Figures compare within one
run on one machine; nothing is asserted.

    eval "$(arca up ...)"   # or export E2B_API_URL, E2B_SANDBOX_URL, E2B_API_KEY
    ARCA_HOME=/var/lib/arca .cache/venv/e2b-2.63.0/bin/python benches/template_build.py -n 5
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import tempfile
import time
import uuid
from pathlib import Path

DOCKERFILE = """\
FROM e2bdev/base
ENV APP=/opt/app
WORKDIR /opt/app
COPY app.py .
RUN python3 app.py > built.txt
RUN echo "two" > two.txt && chmod 0644 two.txt
"""


def row(name: str, samples: list[float], unit: str = "ms") -> None:
    s = sorted(samples)
    p50 = s[len(s) // 2]
    print(f"{name:<52} {p50:>10.1f} {max(s):>10.1f} {statistics.fmean(s):>10.1f} {unit}")


def timed_build(arca: str, ctx: Path, name: str, no_cache: bool) -> float:
    args = [arca, "template", "build", str(ctx), "--name", name]
    if no_cache:
        args.append("--no-cache")
    t = time.perf_counter()
    r = subprocess.run(args, capture_output=True, text=True)
    elapsed = (time.perf_counter() - t) * 1000
    if r.returncode != 0:
        raise SystemExit(f"build failed:\n{r.stdout}\n{r.stderr}")
    return elapsed


def du(path: Path) -> int:
    out = subprocess.run(["du", "-sb", "-L", str(path)], capture_output=True, text=True).stdout
    return int(out.split()[0]) if out else 0


def layer_sizes(home: Path) -> tuple[int, int, int]:
    """(store bytes, sum over templates of their stacks, templates)."""
    layers = home / "layers" / "layers"
    size = {}
    for d in layers.iterdir() if layers.is_dir() else []:
        try:
            size[d.name] = json.loads((d / "meta.json").read_text())["size_bytes"]
        except (OSError, KeyError, ValueError):
            size[d.name] = du(d / "diff")
    stacks, n = 0, 0
    for rec in (home / "templates").glob("*/*.json"):
        build = json.loads(rec.read_text())
        stacks += sum(size.get(layer, 0) for layer in build["layers"])
        n += 1
    return sum(size.values()), stacks, n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-n", type=int, default=5)
    ap.add_argument("--arca", default=os.environ.get("ARCA_BIN", "arca"))
    args = ap.parse_args()
    for var in ("E2B_API_URL", "E2B_SANDBOX_URL", "E2B_API_KEY", "ARCA_HOME"):
        if not os.environ.get(var):
            ap.error(f"set {var} (arca up prints the exports; ARCA_HOME is its --home)")
    from e2b import Sandbox, Template

    ctx = Path(tempfile.mkdtemp(prefix="arca-bench-ctx-"))
    (ctx / "Dockerfile").write_text(DOCKERFILE)
    (ctx / "app.py").write_text("print(sum(range(1000)))\n")
    name = "bench-" + uuid.uuid4().hex[:8]

    cold = [timed_build(args.arca, ctx, name, True) for _ in range(args.n)]
    cached = [timed_build(args.arca, ctx, name, False) for _ in range(args.n)]

    ready_name = "bench-ready-" + uuid.uuid4().hex[:8]
    t = (
        Template()
        .from_template("base")
        .set_start_cmd(
            "python3 -m http.server 8000 --bind 127.0.0.1",
            "curl -sf http://127.0.0.1:8000/ >/dev/null",
        )
    )
    Template.build(t, ready_name)
    first, warm = [], []
    for i in range(args.n + 1):
        time.sleep(0.5)
        t0 = time.perf_counter()
        sbx = Sandbox.create(template=ready_name)
        ms = (time.perf_counter() - t0) * 1000
        sbx.kill()
        (first if i == 0 else warm).append(ms)

    store, stacks, n = layer_sizes(Path(os.environ["ARCA_HOME"]))
    print(f"\n{'templates (n=%d)' % args.n:<52} {'p50':>10} {'max':>10} {'mean':>10}")
    row("Dockerfile build, cold (--no-cache)", cold)
    row("Dockerfile build, fully cached", cached)
    row("create with start+ready cmd, first (no warm)", first)
    row("create with start+ready cmd, warm pool", warm)
    print(
        f"\nlayer store: {store / 2**20:.0f} MiB for {n} template builds whose stacks sum to "
        f"{stacks / 2**20:.0f} MiB ({stacks / max(store, 1):.1f}x shared)"
    )
    for tmpl in (name, ready_name):
        subprocess.run([args.arca, "template", "delete", tmpl], capture_output=True)


if __name__ == "__main__":
    main()
