"""A whole Arca cluster on one machine, for the cluster-mode suite (issue 7, ADR 0006).

- a throw-away PostgreSQL server (scripts/pg.sh) on 127.0.0.1;
- a bridge `<prefix>br` on the host with 10.<x>.<y>.1/24, made by this harness;
- one `arca api` listening on the bridge address, and a second replica on demand;
- one `arca proxy` on 127.0.0.1 (E2B_SANDBOX_URL), routing to the nodes' edges;
- N `arca node`s, each in a network namespace of its own (`<prefix>n<i>`, veth into the
  bridge, 10.<x>.<y>.<10+i>, no default route), started with `nsenter --net` so they share
  the host's mounts and cgroups like any node would. Node 1 reuses the e2e suite's cached base
  template (--base-from); the others pull it from node 1 when they first need it.

Traffic stays on loopback, the bridge and the namespaces made here. Every process is started
and stopped by pid; `Cluster.close()` removes every namespace, link and directory it made and
reports what the nodes left behind (tests/e2e/harness.py's checks, per node).
"""

from __future__ import annotations

import json
import os
import random
import re
import secrets
import shutil
import signal
import string
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "e2e"))
import harness  # noqa: E402

REPO = harness.REPO
NODE_RPC_PORT = 3100
NODE_EDGE_PORT = 3101
HEARTBEAT_S = 1
LOST_AFTER_S = 4


def sh(*cmd: str, check: bool = True) -> str:
    r = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if check and r.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({r.returncode}): {r.stderr.strip()}")
    return r.stdout


def wait_for(what: str, cond, limit_s: float, every: float = 0.1):
    deadline = time.monotonic() + limit_s
    while True:
        v = cond()
        if v:
            return v
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: not within {limit_s} s")
        time.sleep(every)


def free_subnet() -> tuple[int, int]:
    used = sh("sh", "-c", "ip -4 -o addr; ip -4 route", check=False)
    taken = {(int(a), int(b)) for a, b in re.findall(r"\b10\.(\d+)\.(\d+)\.", used)}
    while True:
        x, y = random.randint(150, 199), random.randint(1, 254)
        if (x, y) not in taken:
            return x, y


@dataclass
class Proc:
    """A process this harness started, with its log."""

    name: str
    cmd: list[str]
    log: Path
    env: dict[str, str]
    proc: subprocess.Popen | None = None

    def start(self) -> None:
        assert self.proc is None or self.proc.poll() is not None, f"{self.name} runs"
        with open(self.log, "ab") as f:
            f.write(f"\n=== {' '.join(self.cmd)}\n".encode())
            f.flush()
            self.proc = subprocess.Popen(self.cmd, stdout=f, stderr=f, env=self.env)

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.running():
            self.proc.send_signal(sig)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def kill9(self) -> None:
        assert self.running(), f"{self.name} is not running"
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()

    def tail(self, n: int = 30) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""


@dataclass
class Node:
    index: int
    node_id: str
    netns: str
    ip: str
    # The node's sandboxes as harness.Arca sees them (home, names, cgroups).
    host: harness.Arca
    proc: Proc


@dataclass
class Cluster:
    work: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="arca-cluster-")))
    prefix: str = field(
        default_factory=lambda: "acl" + "".join(random.choices(string.ascii_lowercase, k=3))
    )
    token: str = field(default_factory=lambda: secrets.token_hex(24))
    nodes: list[Node] = field(default_factory=list)
    # Every namespace made here, removed by close() even if a start failed half-way.
    namespaces: list[str] = field(default_factory=list)
    apis: list[Proc] = field(default_factory=list)
    proxy: Proc | None = None
    pg_url: str = ""
    api_port: int = 0
    proxy_port: int = 0
    env: dict[str, str] = field(default_factory=dict)
    # Each node's --max-sandboxes and --warm-pool.
    max_sandboxes: int = 16
    warm_pool: int = 0

    # --- addresses ---------------------------------------------------------------------

    def setup_network(self) -> None:
        self.x, self.y = free_subnet()
        self.bridge = f"{self.prefix}br"
        self.gw = f"10.{self.x}.{self.y}.1"
        sh("ip", "link", "add", self.bridge, "type", "bridge")
        sh("ip", "addr", "add", f"{self.gw}/24", "dev", self.bridge)
        sh("ip", "link", "set", self.bridge, "up")

    def add_netns(self, i: int) -> tuple[str, str]:
        ns = f"{self.prefix}n{i}"
        ip = f"10.{self.x}.{self.y}.{10 + i}"
        host_end, ns_end = f"{self.prefix}v{i}", f"{self.prefix}p{i}"
        sh("ip", "netns", "add", ns)
        self.namespaces.append(ns)
        sh("ip", "link", "add", host_end, "type", "veth", "peer", "name", ns_end)
        sh("ip", "link", "set", host_end, "master", self.bridge)
        sh("ip", "link", "set", host_end, "up")
        sh("ip", "link", "set", ns_end, "netns", ns)
        sh("ip", "-n", ns, "addr", "add", f"{ip}/24", "dev", ns_end)
        sh("ip", "-n", ns, "link", "set", ns_end, "up")
        sh("ip", "-n", ns, "link", "set", "lo", "up")
        return ns, ip

    @property
    def api_url(self) -> str:
        return f"http://{self.gw}:{self.api_port}"

    # --- processes ---------------------------------------------------------------------

    def base_env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("E2B_")}
        env["ARCA_CLUSTER_TOKEN"] = self.token
        env.setdefault("RUST_LOG", "info")
        return env

    def start_pg(self) -> None:
        # The server runs as the postgres user, who must reach its directory.
        os.chmod(self.work, 0o711)
        self.pg_dir = self.work / "pg"
        self.pg_url = sh(str(REPO / "scripts/pg.sh"), "start", str(self.pg_dir)).strip()

    def new_api(self, port: int | None = None) -> Proc:
        port = port or harness.free_port()
        home = self.work / f"api{len(self.apis)}"
        p = Proc(
            f"api{len(self.apis)}",
            [
                str(harness.arca_bin()), "api",
                "--database-url", self.pg_url,
                "--listen", f"{self.gw}:{port}",
                "--home", str(home),
                "--heartbeat-secs", str(HEARTBEAT_S),
                "--node-lost-after", str(LOST_AFTER_S),
            ],
            self.work / f"api{len(self.apis)}.log",
            self.base_env(),
        )  # fmt: skip
        p.port = port  # type: ignore[attr-defined]
        p.home = home  # type: ignore[attr-defined]
        p.start()
        wait_for(f"{p.name} answers", lambda: self.get_health(port), 60)
        self.apis.append(p)
        return p

    def get_health(self, port: int) -> bool:
        try:
            with urllib.request.urlopen(f"http://{self.gw}:{port}/health", timeout=2) as r:
                return r.status == 200
        except (OSError, urllib.error.URLError):
            return False

    def start_node(self, i: int) -> Node:
        ns, ip = self.add_netns(i)
        home = self.work / f"node{i}"
        home.mkdir(parents=True)
        host = harness.Arca(home=home, log=self.work / f"node{i}.log")
        node_id = f"node{i}"
        cmd = [
            "nsenter", f"--net=/run/netns/{ns}",
            str(harness.arca_bin()), "node",
            "--api", self.api_url,
            "--home", str(home),
            "--node-id", node_id,
            "--listen", f"{ip}:{NODE_RPC_PORT}",
            "--edge-listen", f"{ip}:{NODE_EDGE_PORT}",
            "--envd", str(harness.envd_bin()),
            "--net-prefix", host.prefix,
            "--sandbox-cidr", host.cidr,
            "--warm-slots", "2",
            "--warm-pool", str(self.warm_pool),
            "--egress-ports", "0,0,0",
            "--nflog-group", str(host.nflog_group),
            "--max-sandboxes", str(self.max_sandboxes),
        ]  # fmt: skip
        if i == 1:
            cmd += ["--base-from", str(self.base_cache)]
        node = Node(i, node_id, ns, ip, host, Proc(node_id, cmd, host.log, self.base_env()))
        node.proc.start()
        self.nodes.append(node)
        return node

    def restart_node(self, node: Node) -> None:
        node.proc.start()

    def start(self, n_nodes: int = 3) -> dict[str, str]:
        for b, what in [(harness.arca_bin(), "ARCA_BIN"), (harness.envd_bin(), "ARCA_ENVD_BIN")]:
            if not b.is_file():
                raise RuntimeError(f"{b} not found: build it or set {what}")
        self.base_cache = Path(os.environ.get("ARCA_E2E_CACHE") or harness.DEFAULT_CACHE)
        harness.ensure_template_cache(self.base_cache)
        self.start_pg()
        self.setup_network()
        api = self.new_api()
        self.api_port = api.port  # type: ignore[attr-defined]
        for i in range(1, n_nodes + 1):
            self.start_node(i)
        wait_for(
            "every node registered and ready",
            lambda: len([n for n in self.node_infos() if n["status"] == "ready"]) == n_nodes,
            90,
        )
        self.proxy_port = harness.free_port()
        self.proxy = Proc(
            "proxy",
            [
                str(harness.arca_bin()), "proxy",
                "--api", self.api_url,
                "--listen", f"127.0.0.1:{self.proxy_port}",
            ],
            self.work / "proxy.log",
            self.base_env(),
        )  # fmt: skip
        self.proxy.start()
        key = wait_for("api key", lambda: self.read_key(api), 30)
        self.env = {
            "E2B_API_URL": self.api_url,
            "E2B_SANDBOX_URL": f"http://127.0.0.1:{self.proxy_port}",
            "E2B_API_KEY": key,
            "E2B_DOMAIN": "e2b.localhost",
        }
        wait_for("proxy answers", lambda: self.proxy_answers(), 30)
        return self.env

    def read_key(self, api: Proc) -> str | None:
        try:
            return (api.home / "api_key").read_text().strip() or None  # type: ignore[attr-defined]
        except OSError:
            return None

    def proxy_answers(self) -> bool:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{self.proxy_port}/", timeout=2)
        except urllib.error.HTTPError:
            return True
        except (OSError, urllib.error.URLError):
            return False
        return True

    # --- REST --------------------------------------------------------------------------

    def request(
        self, method: str, path: str, body=None, *, port: int | None = None, cluster: bool = False
    ) -> harness.Response:
        data = None if body is None else json.dumps(body).encode()
        h = (
            {"Authorization": f"Bearer {self.token}"}
            if cluster
            else {"X-API-Key": self.env.get("E2B_API_KEY", "")}
        )
        if data is not None:
            h["Content-Type"] = "application/json"
        url = f"http://{self.gw}:{port or self.api_port}{path}"
        req = urllib.request.Request(url, data=data, method=method, headers=h)
        try:
            with urllib.request.urlopen(req, timeout=120) as r:
                return harness.Response(r.status, dict(r.headers), r.read())
        except urllib.error.HTTPError as e:
            return harness.Response(e.code, dict(e.headers), e.read())

    def node_infos(self) -> list[dict]:
        try:
            r = self.request("GET", "/cluster/v1/nodes", cluster=True)
        except (OSError, urllib.error.URLError):
            return []
        return r.json() if r.status == 200 else []

    def listed(self, port: int | None = None) -> list[dict]:
        items: list[dict] = []
        token = None
        while True:
            q = "?limit=100" + (f"&nextToken={urllib.request.quote(token)}" if token else "")
            r = self.request("GET", "/v2/sandboxes" + q, port=port)
            assert r.status == 200, (r.status, r.body)
            items += r.json()
            token = r.headers.get("X-Next-Token") or r.headers.get("x-next-token")
            if not token:
                return items

    def node(self, node_id: str) -> Node:
        return next(n for n in self.nodes if n.node_id == node_id)

    # --- teardown ----------------------------------------------------------------------

    def close(self) -> list[str]:
        """Kills every sandbox through the api, stops everything, cleans the host; returns
        what was left behind."""
        problems: list[str] = []
        live_api = next((a for a in self.apis if a.running()), None)
        if live_api is not None and self.env:
            try:
                for s in self.listed(port=live_api.port):  # type: ignore[attr-defined]
                    self.request("DELETE", f"/sandboxes/{s['sandboxID']}", port=live_api.port)  # type: ignore[attr-defined]
            except Exception as e:  # noqa: BLE001 - report, then clean up anyway
                problems.append(f"killing the sandboxes through the api failed: {e}")
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline and any(
                n.host.handed_out() for n in self.nodes if n.proc.running()
            ):
                time.sleep(0.2)
        for n in self.nodes:
            n.proc.stop()
            problems += [f"{n.node_id}: {p}" for p in n.host.clean_host()]
            problems += [f"{n.node_id}: file {f}" for f in n.host.sandbox_files()]
        if self.proxy:
            self.proxy.stop()
        for a in self.apis:
            a.stop()
        # A node's sandbox veths and nft table live in its namespace and go with it.
        for ns in self.namespaces:
            sh("ip", "netns", "del", ns, check=False)
        if getattr(self, "bridge", None):
            sh("ip", "link", "del", self.bridge, check=False)
        if self.pg_url:
            sh(str(REPO / "scripts/pg.sh"), "stop", str(self.pg_dir), check=False)
        if not problems:
            shutil.rmtree(self.work, ignore_errors=True)
        return problems

    def logs(self) -> str:
        parts = []
        for p in [*self.apis, *([self.proxy] if self.proxy else []), *(n.proc for n in self.nodes)]:
            parts.append(f"--- {p.name} ({p.log})\n{p.tail()}")
        return "\n".join(parts)
