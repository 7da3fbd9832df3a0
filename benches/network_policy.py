#!/usr/bin/env python3
"""Network-policy costs (issue 6, ADR 0005) through the official Python SDK against a running
`arca up`, with a fake remote network this script makes itself (tests/e2e/remote_host.py: a
network namespace on 198.18.<k>.0/24 with DNS, HTTP and TLS servers). Nothing is asserted.

- `Sandbox.create()` without egress rules vs with deny-all plus a domain and a CIDR allowed;
- `sbx.update_network()`, alternating two rule sets;
- inside one sandbox, timed by a script that runs there (no SDK round trip in the figures):
  DNS lookups through the node's forwarder (first lookup of an allowed name, which waits for
  the nft commit that admits its address; a repeat; a denied name; a forwarded lookup in a
  sandbox without rules) and HTTP / HTTPS requests by CIDR rule and by name rule (the node's
  Host and SNI checks), on new connections and on an open one (HEAD requests: the remote's
  test server writes a GET's head and body separately, and on a reused connection Nagle plus
  the peer's delayed ACK turn that into a 40 ms stall that says nothing about Arca; for the
  same reason TLS is 1.2: the tickets a TLS 1.3 server sends after the handshake cause the
  same stall on the first request);
- the same DNS query and requests from the host straight to the remote, and from a sandbox
  without rules, as baselines, interleaved with the measured ones (the host is noisy), and the
  time of one `nft` process (a dry run) beside the DNS admission.

Network safety: the only traffic is to 127.0.0.1 (the SDK) and to the remote namespace made
here. Every sandbox gets `dnsServers: [remote.dns]`, its resolvers are checked to be the node
before it sends a query, DNS answers are used only if they fall in the remote's /24, and no name
is ever resolved through the host's resolvers.

    # as root, with the release build:
    ARCA_BIN=target/release/arca python3 tests/e2e/harness.py run -- \\
        .cache/venv/e2b-2.63.0/bin/python benches/network_policy.py -n 50
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import os
import shlex
import statistics
import subprocess
import sys
import textwrap
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "e2e"))

from remote_host import RemoteHost, leftovers, unavailable  # noqa: E402

# Runs inside a sandbox (and on the host for the baselines). argv[1]: a JSON list of steps;
# prints one JSON list of results. Times in ms, perf_counter. It never resolves a name itself:
# DNS queries are hand-made and sent to the one server it is given; connections go to
# addresses.
PROBE = r'''
import json, random, socket, ssl, struct, sys, time

def ms(t0):
    return (time.perf_counter() - t0) * 1000

def query(server, name):
    """One A query over UDP: (rcode, [addresses])."""
    qid = random.randrange(65536)
    q = struct.pack("!HHHHHH", qid, 0x0100, 1, 0, 0, 0)
    for label in name.split("."):
        q += bytes([len(label)]) + label.encode()
    q += b"\0" + struct.pack("!HH", 1, 1)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(5)
        s.connect((server, 53))
        s.send(q)
        while True:
            d = s.recv(4096)
            if d[:2] == q[:2]:
                break
    rcode, an = d[3] & 0xF, struct.unpack("!H", d[6:8])[0]
    pos = 12
    while d[pos]:
        pos += 1 + d[pos]
    pos += 5
    addrs = []
    for _ in range(an):
        while True:
            if d[pos] & 0xC0:
                pos += 2
                break
            if d[pos] == 0:
                pos += 1
                break
            pos += 1 + d[pos]
        rtype, _c, _ttl, n = struct.unpack("!HHIH", d[pos:pos + 10])
        pos += 10
        if rtype == 1:
            addrs.append(socket.inet_ntoa(d[pos:pos + n]))
        pos += n
    return rcode, addrs

def dns(step):
    out = {}
    for _ in range(step.get("repeat", 1)):
        for label, name in step["queries"]:
            t0 = time.perf_counter()
            rcode, addrs = query(step["server"], name)
            r = out.setdefault(label, {"ms": [], "rcode": rcode, "addrs": addrs})
            r["ms"].append(ms(t0))
    return out

class Conn:
    """One HTTP/1.1 connection (TLS 1.2 when `sni` is set, certificate not checked)."""
    def __init__(self, t):
        self.t = t
        raw = socket.create_connection((t["ip"], t["port"]), timeout=10)
        raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if t.get("sni"):
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
            # TLS 1.3 servers send session tickets after the handshake; the remote's test
            # server then holds the response (Nagle) until the peer's delayed ACK, 40 ms.
            ctx.maximum_version = ssl.TLSVersion.TLSv1_2
            raw = ctx.wrap_socket(raw, server_hostname=t["sni"])
        self.s = raw
        self.buf = b""

    def get(self, method="HEAD"):
        self.s.sendall(("%s /b HTTP/1.1\r\nHost: %s\r\n\r\n" % (method, self.t["host"])).encode())
        while b"\r\n\r\n" not in self.buf:
            chunk = self.s.recv(65536)
            if not chunk:
                raise ConnectionError("closed before the response head")
            self.buf += chunk
        head, _, rest = self.buf.partition(b"\r\n\r\n")
        status = int(head.split(b" ", 2)[1])
        length = 0
        for line in head.split(b"\r\n")[1:]:
            k, _, v = line.partition(b":")
            if k.strip().lower() == b"content-length":
                length = int(v)
        if method == "HEAD":
            length = 0
        while len(rest) < length:
            chunk = self.s.recv(65536)
            if not chunk:
                raise ConnectionError("closed in the body")
            rest += chunk
        body, self.buf = rest[:length], rest[length:]
        if status != 200:
            raise RuntimeError("status %d: %r" % (status, body[:200]))
        return body.decode("utf-8", "replace")

    def close(self):
        self.s.close()

def http(step):
    """Per round, for each target in turn: one new connection with one request, and one
    request on a connection kept open; so all targets see the same moments of a noisy host."""
    kept, out = {}, {}
    for t in step["targets"]:
        c = Conn(t)
        body = c.get("GET")  # untimed: what the remote saw (Host, SNI)
        c.get()
        kept[t["label"]] = c
        out[t["label"]] = {"new": [], "reuse": [], "body": body}
    for _ in range(step["n"]):
        for t in step["targets"]:
            o = out[t["label"]]
            t0 = time.perf_counter()
            c = Conn(t)
            c.get()
            o["new"].append(ms(t0))
            c.close()
            t0 = time.perf_counter()
            kept[t["label"]].get()
            o["reuse"].append(ms(t0))
    for c in kept.values():
        c.close()
    return out

steps = json.loads(sys.argv[1])
results = []
for step in steps:
    results.append({"dns": dns, "http": http}[step["op"]](step))
print(json.dumps(results))
'''

PROBE_PATH = "/tmp/np_bench.py"


def row(name: str, samples: list[float]) -> None:
    s = sorted(samples)
    print(f"{name:<70} {s[len(s) // 2]:>9.2f} {s[-1]:>9.2f} {statistics.fmean(s):>9.2f}")


def header(title: str, n: int) -> None:
    print(f"\n{f'{title}, ms (n={n})':<70} {'p50':>9} {'max':>9} {'mean':>9}")


class Bench:
    def __init__(self, remote: RemoteHost, n: int, pause: float):
        self.remote, self.n, self.pause = remote, n, pause
        r = remote
        # Every sandbox's network settings name the remote DNS: the node's forwarder asks it
        # and nothing else.
        self.open = {"dns_servers": [r.dns]}
        deny = {"deny_out": ["0.0.0.0/0"], "dns_servers": [r.dns]}
        self.create_rules = {**deny, "allow_out": ["allowed.test", r.ip3]}
        self.names = {**deny, "allow_out": ["allowed.test", "*.wild.test", r.ip3]}
        self.cidr_only = {**deny, "allow_out": [r.ip3]}
        self.made: list = []

    # --- sandboxes and safety ------------------------------------------------------------------

    def create(self, network: dict):
        from e2b import Sandbox

        assert network.get("dns_servers") == [self.remote.dns], network
        sbx = Sandbox.create(timeout=600, network=network)
        self.made.append(sbx)
        return sbx

    def kill_all(self) -> None:
        for sbx in self.made:
            try:
                sbx.kill()
            except Exception:  # noqa: BLE001 - already gone
                pass
        self.made.clear()

    def api(self, path: str) -> dict:
        req = urllib.request.Request(
            os.environ["E2B_API_URL"] + path, headers={"X-API-Key": os.environ["E2B_API_KEY"]}
        )
        with urllib.request.urlopen(req, timeout=30) as r:
            return json.loads(r.read())

    def resolver(self, sbx) -> str:
        """The sandbox's resolver, once it is known to be the node (its gateway), and the api,
        and the node's state file when $ARCA_HOME is set, hold `dnsServers: [remote.dns]` as the
        forwarder's upstream. Otherwise the benchmark stops before any lookup."""
        conf = sbx.commands.run("cat /etc/resolv.conf").stdout
        words = [line.split() for line in conf.splitlines()]
        servers = [w[1] for w in words if w[:1] == ["nameserver"] and len(w) > 1]
        routes = sbx.commands.run("cat /proc/net/route").stdout.splitlines()[1:]
        gateways = {
            str(ipaddress.IPv4Address(int(f[2], 16).to_bytes(4, "little")))
            for f in (l.split() for l in routes)
            if len(f) > 2 and f[1] == "00000000"
        }
        if len(servers) != 1 or servers[0] not in gateways:
            raise SystemExit(f"network safety: resolvers {servers}, gateways {gateways}: not the node\n{conf}")
        got = (self.api(f"/sandboxes/{sbx.sandbox_id}").get("network") or {}).get("dnsServers")
        if got != [self.remote.dns]:
            raise SystemExit(f"network safety: the api holds dnsServers {got!r}, want [{self.remote.dns!r}]")
        home = os.environ.get("ARCA_HOME")
        if home:
            specs = [
                json.loads(p.read_text()).get("spec") or {}
                for p in Path(home, "sandboxes").glob("*/state.json")
            ]
            spec = next((s for s in specs if s.get("sandbox_id") == sbx.sandbox_id), None)
            got = ((spec or {}).get("network") or {}).get("dnsServers")
            if got != [self.remote.dns]:
                raise SystemExit(f"network safety: the node's spec has dnsServers {got!r}, want [{self.remote.dns}]")
        sbx.files.write(PROBE_PATH, PROBE)
        return servers[0]

    def in_remote(self, addrs: list[str]) -> None:
        net = ipaddress.ip_network(self.remote.cidr)
        if not addrs or any(ipaddress.ip_address(a) not in net for a in addrs):
            raise SystemExit(f"DNS answer {addrs} is not in the remote's {net}: stopping")

    def probe(self, sbx, steps: list[dict]) -> list[dict]:
        if sbx is None:  # the host
            cmd = [sys.executable, "-c", PROBE, json.dumps(steps)]
            out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
        else:
            out = sbx.commands.run(f"python3 {PROBE_PATH} {shlex.quote(json.dumps(steps))}", timeout=300).stdout
        return json.loads(out.strip().splitlines()[-1])

    def targets(self, ip2: str) -> list[dict]:
        r = self.remote
        return [
            {"label": "cidr", "ip": r.ip3, "port": 8080, "host": f"{r.ip3}:8080"},
            {"label": "http", "ip": ip2, "port": 80, "host": "allowed.test"},
            {"label": "https", "ip": ip2, "port": 443, "host": "allowed.test", "sni": "allowed.test"},
        ]

    # --- the measurements ----------------------------------------------------------------------

    def creates(self) -> None:
        # One untimed create of each kind first (the very first create of a node is cold).
        for net in (self.open, self.create_rules):
            self.create(net).kill()
            self.made.clear()
        plain, ruled = [], []
        for i in range(self.n):
            # Alternate which goes first; a pause lets the warm pool refill.
            for net, into in ((self.open, plain), (self.create_rules, ruled))[:: 1 if i % 2 == 0 else -1]:
                time.sleep(self.pause)
                t = time.perf_counter()
                sbx = self.create(net)
                into.append((time.perf_counter() - t) * 1000)
                sbx.kill()
                self.made.remove(sbx)
        header("Sandbox.create()", self.n)
        row("no egress rules (dnsServers only)", plain)
        row("deny 0.0.0.0/0, allow allowed.test and remote .3", ruled)

    def updates(self) -> None:
        sbx = self.create(self.names)
        to_cidr, to_names = [], []
        for _ in range(self.n):
            t = time.perf_counter()
            sbx.update_network(self.cidr_only)
            to_cidr.append((time.perf_counter() - t) * 1000)
            t = time.perf_counter()
            sbx.update_network(self.names)
            to_names.append((time.perf_counter() - t) * 1000)
        header("sbx.update_network(), whole SDK call", self.n)
        row("to deny-all + one CIDR", to_cidr)
        row("to deny-all + two domains + one CIDR", to_names)
        sbx.kill()
        self.made.remove(sbx)

    def inside(self, rounds: int = 5) -> None:
        r, n = self.remote, self.n
        # A sandbox without egress rules (lookups forwarded, connections by the kernel) and one
        # with deny-all, allowed.test, *.wild.test and remote .3.
        opened = self.create(self.open)
        open_server = self.resolver(opened)
        sbx = self.create(self.names)
        server = self.resolver(sbx)

        # DNS: per iteration one query each from the host (straight to the remote DNS), the
        # sandbox without rules, and the sandbox with rules, plus one nft dry run.
        host_dns, fwd, nft = [], [], []
        first, repeat, other, denied = [], [], [], []
        for _ in range(n):
            res = self.probe(None, [{"op": "dns", "server": r.dns, "queries": [["q", "allowed.test"]]}])[0]
            self.in_remote(res["q"]["addrs"])
            host_dns += res["q"]["ms"]
            res = self.probe(opened, [{"op": "dns", "server": open_server, "queries": [["q", "allowed.test"]]}])[0]
            self.in_remote(res["q"]["addrs"])
            fwd += res["q"]["ms"]
            nft += nft_dry_runs(1)
            # Away and back: the CIDR-only set drops every name, so the address of allowed.test
            # is no longer admitted and the next lookup commits it again.
            sbx.update_network(self.cidr_only)
            sbx.update_network(self.names)
            res = self.probe(sbx, [{"op": "dns", "server": server, "queries": [
                ["first", "allowed.test"], ["repeat", "allowed.test"],
                ["other", "a.wild.test"], ["denied", "denied.test"],
            ]}])[0]  # fmt: skip
            for k in ("first", "repeat", "other"):
                if res[k]["rcode"] != 0:
                    raise SystemExit(f"lookup {k} failed: {res[k]}")
                self.in_remote(res[k]["addrs"])
            if res["denied"]["rcode"] != 3:
                raise SystemExit(f"denied.test was not NXDOMAIN: {res['denied']}")
            first += res["first"]["ms"]
            repeat += res["repeat"]["ms"]
            other += res["other"]["ms"]
            denied += res["denied"]["ms"]

        # HTTP: `rounds` rounds, each running host, open sandbox and ruled sandbox in turn, so
        # that a busy moment of the host does not land on one of them only.
        per = max(1, n // rounds)
        host_http, open_http, ruled_http = {}, {}, {}

        def merge(into: dict, got: dict) -> None:
            for label, v in got.items():
                o = into.setdefault(label, {"new": [], "reuse": [], "body": v["body"]})
                o["new"] += v["new"]
                o["reuse"] += v["reuse"]

        for _ in range(rounds):
            merge(host_http, self.probe(None, [{"op": "http", "n": per, "targets": self.targets(r.ip2)}])[0])
            res = self.probe(opened, [
                {"op": "dns", "server": open_server, "queries": [["q", "allowed.test"]]},
                {"op": "http", "n": per, "targets": self.targets(r.ip2)},
            ])  # fmt: skip
            self.in_remote(res[0]["q"]["addrs"])
            merge(open_http, res[1])
            # Right after a lookup, so allowed.test is admitted for all of the requests.
            res = self.probe(sbx, [
                {"op": "dns", "server": server, "queries": [["q", "allowed.test"]]},
                {"op": "http", "n": per, "targets": self.targets(r.ip2)},
            ])  # fmt: skip
            self.in_remote(res[0]["q"]["addrs"])
            merge(ruled_http, res[1])
        for what, got in (("host", host_http), ("open sandbox", open_http), ("ruled sandbox", ruled_http)):
            body = got["https"]["body"]
            if "sni=allowed.test" not in body or "host=allowed.test" not in body:
                raise SystemExit(f"{what}: https did not reach the remote as allowed.test: {body!r}")
            if "host=allowed.test" not in got["http"]["body"]:
                raise SystemExit(f"{what}: http did not reach the remote as allowed.test: {got['http']['body']!r}")

        header("DNS A query (UDP, hand-made), timed where it is sent", n)
        row("baseline: host -> remote DNS directly", host_dns)
        if nft:
            row("baseline: one `nft -c -f -` (dry run, nothing committed)", nft)
        row("sandbox, no rules: forwarded by the node, nothing admitted", fwd)
        row("sandbox, rules: allowed name, first after update (nft commit)", first)
        row("sandbox, rules: same name again (address admitted, no nft)", repeat)
        row("sandbox, rules: other allowed name, same address (no nft)", other)
        row("sandbox, rules: denied name (NXDOMAIN from the node)", denied)

        labels = {
            "cidr": "HTTP to remote .3:8080",
            "http": "HTTP to allowed.test (.2:80)",
            "https": "HTTPS to allowed.test (.2:443, SNI)",
        }
        rules = {
            "cidr": "allowed by CIDR, kernel only",
            "http": "Host check in the node",
            "https": "SNI check in the node",
        }
        titles = {
            "new": "new connection: connect (+ TLS handshake) + HEAD",
            "reuse": "HEAD on an open connection",
        }
        for kind, title in titles.items():
            header(title, per * rounds)
            for label, what in labels.items():
                row(f"{what}: host directly", host_http[label][kind])
                row(f"{what}: sandbox, no rules", open_http[label][kind])
                row(f"{what}: sandbox, {rules[label]}", ruled_http[label][kind])
        self.kill_all()


def nft_dry_runs(n: int) -> list[float]:
    """Time of an `nft` process that checks (never commits) a one-element batch: what every
    admission commit pays at least (ADR 0005 section 8). Empty when nft is not installed."""
    import shutil

    if shutil.which("nft") is None:
        return []
    script = "add table inet np_bench_dry\nadd set inet np_bench_dry x { type ipv4_addr; flags timeout; }\n"
    script += "add element inet np_bench_dry x { 198.18.0.2 timeout 60s }\n"
    took = []
    for _ in range(n):
        t = time.perf_counter()
        subprocess.run(["nft", "-c", "-f", "-"], input=script, text=True, check=True, capture_output=True)
        took.append((time.perf_counter() - t) * 1000)
    return took


LEGEND = """
Legend: all figures in ms. Creates and updates are whole SDK calls against 127.0.0.1. DNS and
HTTP figures are timed by a Python script inside the sandbox (or on the host for the baselines),
so the SDK's round trip is not in them; host, sandbox without rules and sandbox with rules
take turns (per query for DNS, in 5 rounds for HTTP). "no rules" is a sandbox whose only
network setting is dnsServers (the remote DNS): its DNS still goes through the node's forwarder, and its TCP goes
by the kernel path (veth, forward chain, masquerade) without any redirect. "rules" is deny
0.0.0.0/0 with allowed.test, *.wild.test and the remote's .3 allowed: .3 goes by the kernel path
with its allowOut set matched; allowed.test's address is admitted by DNS and its ports 80 and 443
are redirected to the node's HTTP and TLS listeners, which check Host / SNI and open their own
connection to the remote. Requests are HEAD (one GET per connection kind, untimed, checks
what the remote saw); TLS is 1.2 with the certificate unchecked. "first after update": the
sandbox was switched to a rule set without names and back, which drops the admission, so that
lookup waits for the nft commit that admits the address; "same name again" and "other allowed
name, same address" find the address still admitted for over half its time and skip nft. The
`nft -c` row is a dry run of a small batch on the host (checked by the kernel, never
committed): about what one nft process costs.
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-n", type=int, default=30)
    ap.add_argument("--pause", type=float, default=0.3, help="seconds before each create (warm pool refill)")
    args = ap.parse_args()
    for var in ("E2B_API_URL", "E2B_SANDBOX_URL", "E2B_API_KEY"):
        if not os.environ.get(var):
            ap.error(f"set {var} (arca up prints the exports)")
    why = unavailable()
    if why:
        ap.error(f"cannot make the remote network: {why}")
    with RemoteHost() as remote:
        print(f"remote network {remote.cidr} (namespace {remote.name}), DNS {remote.dns}")
        bench = Bench(remote, args.n, args.pause)
        try:
            bench.creates()
            bench.updates()
            bench.inside()
        finally:
            bench.kill_all()
    left = leftovers()
    if left:
        print("left behind (removed now): " + "; ".join(left), file=sys.stderr)
    print("\n" + textwrap.fill(" ".join(LEGEND.split()), 96))


if __name__ == "__main__":
    main()
