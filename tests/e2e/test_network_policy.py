"""Network policy (issue 6, ADR 0005 section 7): egress rules by CIDR and by domain, enforced in
the root netns and judged from inside sandboxes against a fake remote network (`remote`,
tests/e2e/remote_host.py); live replacement, the egress log, ingress tokens and host masks, and a
`kill -9` of `arca up`.

Network safety: sandboxes here talk only to the remote host's addresses (198.18.<k>.0/24, a
namespace the suite made) and to the node. Every sandbox gets `dnsServers: [remote.dns]`, and no
sandbox resolves a name before `dns_guard` has seen that its resolvers are the node's forwarder
(an address of the pool) or the remote DNS itself.

Refusals are expected to be fast (a TCP reset, an ICMP error, NXDOMAIN, a 403): each refusal probe
gets a short timeout and must end well before it. Successes get generous time (a noisy machine).
"""

from __future__ import annotations

import inspect
import ipaddress
import json
import os
import re
import shlex
import subprocess
import time
import urllib.error
import urllib.request

import pytest
from e2b import CommandExitException, Sandbox, SandboxException, Template

from conftest import unique, wait_until
from harness import arca_bin

# A success may take this long (s); a refusal probe gives up after REFUSE_TIMEOUT_S and must
# have ended (refused, not timed out) within REFUSED_WITHIN_S.
OK_TIMEOUT_S = 30
REFUSE_TIMEOUT_S = 8
REFUSED_WITHIN_S = 4.0
# A live update that removes a destination cuts an open stream to it within this (ADR: 1 s).
CUT_WITHIN_S = 2.0
# The egress log keeps this many entries per sandbox.
LOG_RING = 2000


# --- the SDK's spelling of network settings ----------------------------------------------------


def _sdk_keys(type_name: str) -> set[str]:
    try:
        from e2b.sandbox import sandbox_api

        return set(getattr(sandbox_api, type_name).__annotations__)
    except (ImportError, AttributeError):
        return set()


# e2b 2.45.1 has no `dns_servers` (create nor update): then sandboxes are created and updated
# with raw REST calls, so that no sandbox is ever left with the host's resolvers.
SDK_CREATE_KEYS = _sdk_keys("SandboxNetworkOpts")
SDK_UPDATE_KEYS = _sdk_keys("SandboxNetworkUpdate")

WIRE = {
    "allow_out": "allowOut",
    "deny_out": "denyOut",
    "dns_servers": "dnsServers",
    "allow_public_traffic": "allowPublicTraffic",
    "mask_request_host": "maskRequestHost",
}


def wire(network: dict) -> dict:
    return {WIRE.get(k, k): v for k, v in network.items()}


# --- what runs inside the sandboxes ------------------------------------------------------------

# Runs probes at once and prints one JSON object: name -> {"ok", "elapsed", "error"?, ...}.
PROBE = r'''
import concurrent.futures, errno, http.client, json, os, socket, struct, subprocess, sys, time

os.environ["RES_OPTIONS"] = "timeout:2 attempts:1"

def error_name(e):
    if isinstance(e, (socket.timeout, subprocess.TimeoutExpired)):
        return "timeout"
    if isinstance(e, socket.gaierror):
        return "gaierror:%d" % e.errno
    n = getattr(e, "errno", None)
    if n:
        return errno.errorcode.get(n, str(n))
    return type(e).__name__

def curl(p):
    t = p["timeout"]
    cmd = ["curl", "-sS", "-k", "--max-time", str(t), "-o", "-", "-w", "\n@@%{http_code}"] + p["args"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=t + 15)
    body, sep, code = r.stdout.rpartition("\n@@")
    if not sep:
        body, code = r.stdout, "0"
    code = int(code) if code.isdigit() else 0
    out = {"ok": r.returncode == 0 and 200 <= code < 300, "rc": r.returncode, "code": code,
           "body": body[-2000:], "stderr": r.stderr.strip()[-300:]}
    if r.returncode == 28:
        out["error"] = "timeout"
    return out

def tcp(p):
    with socket.create_connection((p["ip"], p["port"]), timeout=p["timeout"]) as s:
        msg = b"probe %f\n" % time.time()
        s.sendall(msg)
        got = b""
        while len(got) < len(msg):
            chunk = s.recv(4096)
            if not chunk:
                break
            got += chunk
    return {"ok": got == msg}

def udp(p):
    deadline = time.monotonic() + p["timeout"]
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.connect((p["ip"], p["port"]))
        msg = b"udp probe"
        while True:
            s.send(msg)
            s.settimeout(max(0.05, min(1.0, deadline - time.monotonic())))
            try:
                return {"ok": s.recv(4096) == msg}
            except socket.timeout:
                if time.monotonic() >= deadline:
                    raise

def icmp(p):
    try:
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM, socket.IPPROTO_ICMP)
    except OSError as e:
        return {"ok": False, "unsupported": True, "error": error_name(e)}
    deadline = time.monotonic() + p["timeout"]
    with s:
        s.connect((p["ip"], 0))
        seq = 0
        while True:
            seq += 1
            s.send(struct.pack("!BBHHH", 8, 0, 0, 0, seq) + b"arca-probe")
            s.settimeout(max(0.05, min(1.0, deadline - time.monotonic())))
            try:
                got = s.recv(4096)
                if got[:1] == b"\0":
                    return {"ok": True}
            except socket.timeout:
                if time.monotonic() >= deadline:
                    raise

def lookup(p):
    infos = socket.getaddrinfo(p["name"], None, socket.AF_INET, socket.SOCK_STREAM)
    return {"ok": True, "addrs": sorted({i[4][0] for i in infos})}

def keepalive(p):
    c = http.client.HTTPConnection(p["host"], p.get("port", 80), timeout=p["timeout"])
    c.connect()
    c.auto_open = 0  # a closed connection is not silently replaced by a new one
    out = []
    for h in p["hosts"]:
        try:
            c.putrequest("GET", "/", skip_host=True)
            c.putheader("Host", h)
            c.endheaders()
            r = c.getresponse()
            out.append({"status": r.status, "body": r.read().decode("utf-8", "replace")})
        except Exception as e:
            out.append({"error": error_name(e)})
            break
    c.close()
    ok = len(out) == len(p["hosts"]) and all(o.get("status") == 200 for o in out)
    return {"ok": ok, "responses": out}

KINDS = {"curl": curl, "tcp": tcp, "udp": udp, "icmp": icmp, "lookup": lookup, "keepalive": keepalive}

def run(item):
    name, p = item
    t0 = time.monotonic()
    try:
        r = KINDS[p["kind"]](p)
    except Exception as e:
        r = {"ok": False, "error": error_name(e), "detail": repr(e)[:300]}
    r["elapsed"] = round(time.monotonic() - t0, 3)
    return name, r

probes = json.loads(sys.argv[1])
with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, len(probes))) as ex:
    results = dict(ex.map(run, probes.items()))
print(json.dumps(results))
'''

# One TCP connection to argv[1]:argv[2]; a line every 100 ms, each echo checked; one line per
# round to argv[3]: "<unix time> ok <n>" or, once, "<unix time> err <what>" and the end.
STREAM = r'''
import socket, sys, time
ip, port, path = sys.argv[1], int(sys.argv[2]), sys.argv[3]
f = open(path, "a", buffering=1)
try:
    s = socket.create_connection((ip, port), timeout=10)
    s.settimeout(5)
    f.write("%.3f connected\n" % time.time())
    i = 0
    while True:
        msg = b"%d\n" % i
        s.sendall(msg)
        got = b""
        while not got.endswith(b"\n"):
            chunk = s.recv(100)
            if not chunk:
                raise ConnectionError("closed by the peer")
            got += chunk
        if got != msg:
            raise ValueError("echo %r for %r" % (got, msg))
        f.write("%.3f ok %d\n" % (time.time(), i))
        i += 1
        time.sleep(0.1)
except Exception as e:
    f.write("%.3f err %s %s\n" % (time.time(), type(e).__name__, getattr(e, "errno", "")))
'''

# New connections to argv[1]:argv[2] every 200 ms (1 s connect limit), forever; one line each to
# argv[3]: "<unix time> ok" or "<unix time> fail <what>".
ATTEMPTS = r'''
import socket, sys, time
ip, port, path = sys.argv[1], int(sys.argv[2]), sys.argv[3]
f = open(path, "a", buffering=1)
while True:
    try:
        with socket.create_connection((ip, port), timeout=1) as s:
            s.sendall(b"x\n")
            s.settimeout(1)
            ok = s.recv(10) == b"x\n"
        f.write("%.3f %s\n" % (time.time(), "ok" if ok else "fail echo"))
    except Exception as e:
        f.write("%.3f fail %s %s\n" % (time.time(), type(e).__name__, getattr(e, "errno", "")))
    time.sleep(0.2)
'''

# An HTTP server on 0.0.0.0:8000 answering what it saw: the Host and a traffic token header.
HOST_ECHO = r'''
import http.server, socketserver
class H(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def do_GET(self):
        body = ("host=%s\ntoken=%s\n" % (self.headers.get("Host", ""),
                self.headers.get("e2b-traffic-access-token", ""))).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *args):
        pass
class S(http.server.ThreadingHTTPServer):
    def server_bind(self):
        # Not HTTPServer's, which resolves the address's name (a DNS query).
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = self.server_address[:2]
S(("0.0.0.0", 8000), H).serve_forever()
'''

BACKGROUND_SLEEP = "nohup sleep 1000 >/dev/null 2>&1 & echo $!"


# --- probes ------------------------------------------------------------------------------------


def curl(url: str, *extra: str, ok: bool = True) -> dict:
    return {"kind": "curl", "args": [*extra, url], "timeout": OK_TIMEOUT_S if ok else REFUSE_TIMEOUT_S}


def tcp(ip: str, port: int, ok: bool = True) -> dict:
    return {"kind": "tcp", "ip": ip, "port": port, "timeout": OK_TIMEOUT_S if ok else REFUSE_TIMEOUT_S}


def udp(ip: str, port: int, ok: bool = True) -> dict:
    return {"kind": "udp", "ip": ip, "port": port, "timeout": OK_TIMEOUT_S if ok else REFUSE_TIMEOUT_S}


def icmp(ip: str, ok: bool = True) -> dict:
    return {"kind": "icmp", "ip": ip, "timeout": OK_TIMEOUT_S if ok else REFUSE_TIMEOUT_S}


def lookup(name: str, ok: bool = True) -> dict:
    return {"kind": "lookup", "name": name, "timeout": OK_TIMEOUT_S if ok else REFUSE_TIMEOUT_S}


def keepalive(host: str, hosts: list[str], port: int = 80) -> dict:
    return {"kind": "keepalive", "host": host, "port": port, "hosts": hosts, "timeout": OK_TIMEOUT_S}


def sh(sbx, cmd: str, timeout: float = 60) -> tuple[int, str]:
    """Runs `cmd` as root with stderr folded into stdout; never raises on exit codes."""
    try:
        r = sbx.commands.run("exec 2>&1; " + cmd, user="root", timeout=timeout)
        return r.exit_code, r.stdout
    except CommandExitException as e:
        return e.exit_code, e.stdout


def probe(sbx, probes: dict[str, dict], timeout: float = 180) -> dict[str, dict]:
    """Runs the probes in the sandbox, all at once; returns their results by name."""
    r = sbx.commands.run(
        "python3 /tmp/np_probe.py " + shlex.quote(json.dumps(probes)), user="root", timeout=timeout
    )
    return json.loads(r.stdout.strip().splitlines()[-1])


def refused_fast(r: dict) -> bool:
    """Failed, and promptly (a reset, an ICMP error, NXDOMAIN, a 403), not by timing out."""
    return not r["ok"] and r.get("error") != "timeout" and r["elapsed"] < REFUSED_WITHIN_S


def icmp_unsupported(results: dict) -> bool:
    return any(r.get("unsupported") for r in results.values())


def expect(results: dict, ok: list[str] = (), refused: list[str] = (), what: str = "") -> None:
    """Asserts at once that the `ok` probes succeeded and the `refused` ones were refused fast
    (ICMP probes are left out when the sandbox cannot open ping sockets)."""
    skip_icmp = icmp_unsupported(results)
    wrong = {}
    for n in ok:
        if skip_icmp and n.startswith("icmp"):
            continue
        if not results[n]["ok"]:
            wrong[n] = ("expected to work", results[n])
    for n in refused:
        if skip_icmp and n.startswith("icmp"):
            continue
        if not refused_fast(results[n]):
            wrong[n] = ("expected a fast refusal", results[n])
    assert not wrong, f"{what}:\n" + "\n".join(f"  {k}: {v[0]}: {v[1]}" for k, v in wrong.items())


def nxdomain(r: dict) -> bool:
    """A lookup that failed with "no such name" (EAI_NONAME), promptly."""
    return r.get("error") == "gaierror:-2" and r["elapsed"] < REFUSED_WITHIN_S


def curl_refused(r: dict) -> bool:
    """curl got no answer from the server: no name (6), refused or reset connection (7), TLS
    handshake cut (35), empty reply (52), reset while reading (56); promptly."""
    return r.get("rc") in (6, 7, 35, 52, 56) and refused_fast(r)


# --- sandboxes ---------------------------------------------------------------------------------


def detail(arca, sbx) -> dict:
    r = arca.api("GET", f"/sandboxes/{sbx.sandbox_id}")
    assert r.status == 200, (r.status, r.body)
    return r.json()


def dns_guard(arca, remote, sbx) -> None:
    """Network safety, before the sandbox resolves any name: its resolvers must be the node's
    DNS forwarder (an address of the pool, ADR 0005 section 2) or the remote DNS, and both the
    api's record and the node's state file must hold `dnsServers: [remote.dns]` as the
    forwarder's upstream. Otherwise a lookup could leave this host, so the test stops here."""
    _, conf = sh(sbx, "cat /etc/resolv.conf")
    servers = re.findall(r"^\s*nameserver\s+(\S+)", conf, re.M)
    pool = ipaddress.ip_network(arca.cidr)

    def safe(s: str) -> bool:
        try:
            ip = ipaddress.ip_address(s)
        except ValueError:
            return False
        return s == remote.dns or (ip.version == 4 and ip in pool)

    if not servers or not all(safe(s) for s in servers):
        pytest.fail(
            f"network safety: the sandbox's resolvers are {servers or 'none'} (want the node's "
            f"forwarder in {arca.cidr}); no name is resolved from it.\n{conf}"
        )
    got = (detail(arca, sbx).get("network") or {}).get("dnsServers")
    if got != [remote.dns]:
        pytest.fail(f"network safety: the api holds dnsServers {got!r}, want [{remote.dns!r}]")
    spec = arca.sandbox_dirs()[arca.handed_out()[sbx.sandbox_id]]["spec"]
    got = (spec.get("network") or {}).get("dnsServers")
    if got != [remote.dns]:
        pytest.fail(
            f"network safety: the node's spec (state.json) has network.dnsServers {got!r}, "
            f"want [{remote.dns!r}]"
        )


@pytest.fixture
def make(arca, remote):
    """Creates sandboxes with `dnsServers: [remote.dns]` (always) and the probe script; kills
    them at the end."""
    made: list[str] = []

    def create(network: dict | None = None, allow_internet_access: bool | None = None, **kw):
        net = dict(network or {})
        net.setdefault("dns_servers", [remote.dns])
        if set(net) <= SDK_CREATE_KEYS:
            opts = {} if allow_internet_access is None else {"allow_internet_access": allow_internet_access}
            sbx = Sandbox.create(timeout=600, network=net, **opts, **kw)
        else:
            body = {"templateID": kw.get("template", "base"), "timeout": 600, "network": wire(net)}
            if allow_internet_access is not None:
                body["allow_internet_access"] = allow_internet_access
            r = arca.api("POST", "/v2/sandboxes", body)
            assert r.status == 201, (r.status, r.body)
            made.append(r.json()["sandboxID"])
            sbx = Sandbox.connect(r.json()["sandboxID"])
        if sbx.sandbox_id not in made:
            made.append(sbx.sandbox_id)
        sbx.files.write("/tmp/np_probe.py", PROBE)
        return sbx

    yield create
    for sid in made:
        try:
            Sandbox.kill(sid)
        except Exception:  # noqa: BLE001 - already gone, or the api is down: the session cleans
            pass


def update_network(arca, remote, sbx, network: dict, allow_internet_access: bool | None = None):
    """`Sandbox.update_network` (replace; `dnsServers` always [remote.dns]), or the same PUT by
    hand when this SDK cannot send `dns_servers`."""
    net = dict(network)
    net.setdefault("dns_servers", [remote.dns])
    if allow_internet_access is not None:
        net["allow_internet_access"] = allow_internet_access
    if set(net) <= SDK_UPDATE_KEYS:
        sbx.update_network(net)
        return
    body = wire(net)
    r = arca.api("PUT", f"/sandboxes/{sbx.sandbox_id}/network", body)
    assert r.status == 204, (r.status, r.body)


def envd_process(arca, sbx) -> tuple[int, int]:
    """Host pid and start time of the sandbox's envd, from its state file."""
    st = arca.sandbox_dirs()[arca.handed_out()[sbx.sandbox_id]]
    return st["pid"], st["pid_start"]


def slot_index(arca, sbx) -> int:
    st = arca.sandbox_dirs()[arca.handed_out()[sbx.sandbox_id]]
    assert st.get("slot_index") is not None, st
    return st["slot_index"]


def slot_objects(arca, index: int) -> list[str]:
    """The per-slot nft objects (chains e<i>, n<i>; sets a<i>, d<i>, x<i>) and the map elements
    for the slot's veth, as `nft list table` shows them."""
    listing = subprocess.run(
        ["nft", "list", "table", "inet", arca.prefix], capture_output=True, text=True
    ).stdout
    found = re.findall(rf"^\s*((?:chain [en]|set [adx]){index}) {{", listing, re.M)
    if f'"{arca.prefix}{index}h"' in listing:
        found.append(f'map element "{arca.prefix}{index}h"')
    return found


def grew(remote, before: dict, kind: str, key: str) -> int:
    """How many more `kind` events (dns, http, https, sni) for `key` the remote saw since
    `before` (a `remote.seen()`; the remote host is shared by the session)."""
    return remote.seen()[kind].get(key, 0) - before[kind].get(key, 0)


def read_lines(sbx, path: str) -> list[list[str]]:
    _, out = sh(sbx, f"cat {path}")
    return [line.split() for line in out.splitlines() if line.strip()]


def through_proxy(sandbox_id: str, port: int, path: str = "/", headers: dict | None = None):
    """A request to a sandbox port through Arca's proxy on 127.0.0.1 (recipe A headers)."""
    h = {"E2b-Sandbox-Id": sandbox_id, "E2b-Sandbox-Port": str(port), **(headers or {})}
    req = urllib.request.Request(os.environ["E2B_SANDBOX_URL"] + path, headers=h)
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


# --- 1. deny all -------------------------------------------------------------------------------


def test_deny_all_refuses_tcp_udp_and_icmp_fast(arca, remote, make):
    """`allow_internet_access=False` and `denyOut: ["0.0.0.0/0"]` each refuse TCP, UDP and ICMP
    to both remote addresses at once (reset / ICMP error), and a name lookup gets NXDOMAIN without
    reaching the remote DNS; a sandbox without rules reaches everything (the control)."""
    offline = make(allow_internet_access=False)
    walled = make(network={"deny_out": ["0.0.0.0/0"]})
    control = make()
    ip2, ip3 = remote.ip2, remote.ip3

    def probes(ok: bool) -> dict:
        return {
            "http2": curl(f"http://{ip2}/", ok=ok),
            "http3": curl(f"http://{ip3}:8080/", ok=ok),
            "tcp2": tcp(ip2, 7, ok=ok),
            "tcp3": tcp(ip3, 7, ok=ok),
            "udp2": udp(ip2, 7, ok=ok),
            "udp3": udp(ip3, 7, ok=ok),
            "icmp2": icmp(ip2, ok=ok),
            "icmp3": icmp(ip3, ok=ok),
        }

    res = probe(control, probes(ok=True))
    expect(res, ok=list(res), what="a sandbox without rules")
    assert f"host={ip3}:8080" in res["http3"]["body"], res["http3"]
    if icmp_unsupported(res):
        print(f"ICMP not checked: no ping sockets in the sandbox ({res['icmp2']})")
    for name, sbx in (("allow_internet_access=False", offline), ("denyOut 0.0.0.0/0", walled)):
        res = probe(sbx, probes(ok=False))
        expect(res, refused=list(res), what=name)
        assert res["http2"]["rc"] == 7 and res["http3"]["rc"] == 7, res  # refused, not cut

    # Deny-all: DNS is answered by the node, never forwarded.
    dns_guard(arca, remote, offline)
    name = f"tunnel-{unique()}.test"
    seen = remote.seen()
    res = probe(offline, {"a": lookup(name, ok=False), "b": lookup("allowed.test", ok=False)})
    assert nxdomain(res["a"]) and nxdomain(res["b"]), res
    assert remote.query_count(name) == 0, remote.seen()
    assert grew(remote, seen, "dns", "allowed.test") == 0, remote.seen()
    # Without deny-all the forwarder asks the sandbox's dnsServers.
    dns_guard(arca, remote, control)
    res = probe(control, {"other": lookup("other.test")})
    assert res["other"].get("addrs") == [ip3], res
    assert grew(remote, seen, "dns", "other.test") >= 1, remote.seen()

    info = offline.get_info()
    assert info.allow_internet_access is False
    assert detail(arca, offline)["allowInternetAccess"] is False
    info = walled.get_info()
    assert info.network is not None and info.network.get("deny_out") == ["0.0.0.0/0"], info.network
    net = detail(arca, walled)["network"]
    assert (net["denyOut"], net["dnsServers"]) == (["0.0.0.0/0"], [remote.dns]), net


# --- 2. CIDR rules -----------------------------------------------------------------------------


def test_cidr_allow_and_deny_and_allow_wins(arca, remote, make):
    """Deny all but `.3/32`: `.3` works for TCP, UDP and ICMP, `.2` is refused. A deny list alone
    (`.3`): `.2` works, `.3` is refused. Allow wins over deny: deny the /24, allow `.3`."""
    ip2, ip3 = remote.ip2, remote.ip3
    only3 = make(network={"allow_out": [f"{ip3}/32"], "deny_out": ["0.0.0.0/0"]})
    not3 = make(network={"deny_out": [ip3]})
    wins = make(network={"allow_out": [ip3], "deny_out": [remote.cidr]})

    def probes(ok2: bool, ok3: bool) -> dict:
        return {
            "http2": curl(f"http://{ip2}/", ok=ok2),
            "tcp2": tcp(ip2, 7, ok=ok2),
            "udp2": udp(ip2, 7, ok=ok2),
            "icmp2": icmp(ip2, ok=ok2),
            "http3": curl(f"http://{ip3}:8080/", ok=ok3),
            "tcp3": tcp(ip3, 7, ok=ok3),
            "udp3": udp(ip3, 7, ok=ok3),
            "icmp3": icmp(ip3, ok=ok3),
        }

    two = ["http2", "tcp2", "udp2", "icmp2"]
    three = ["http3", "tcp3", "udp3", "icmp3"]
    res = probe(only3, probes(ok2=False, ok3=True))
    expect(res, ok=three, refused=two, what="allowOut .3/32, denyOut 0.0.0.0/0")
    res = probe(not3, probes(ok2=True, ok3=False))
    expect(res, ok=two, refused=three, what="denyOut .3 only")
    res = probe(wins, probes(ok2=False, ok3=True))
    expect(res, ok=three, refused=two, what=f"allowOut .3, denyOut {remote.cidr}")

    net = detail(arca, wins)["network"]
    assert (net["allowOut"], net["denyOut"]) == ([ip3], [remote.cidr]), net
    info = only3.get_info()
    assert info.network is not None and info.network.get("allow_out") == [f"{ip3}/32"], info.network


def test_rules_follow_forks_and_resumes_on_files(arca, remote, make):
    """A fork gets its source's rules (the api copies them) and a sandbox resumed from a
    filesystem-only pause boots again with its rules loaded before anything of it runs: `.3`
    stays reachable and `.2` refused in every one of them."""
    ip2, ip3 = remote.ip2, remote.ip3
    src = make(network={"allow_out": [ip3], "deny_out": ["0.0.0.0/0"]})
    probes = {"tcp2": tcp(ip2, 7, ok=False), "tcp3": tcp(ip3, 7, ok=True)}
    expect(probe(src, probes), ok=["tcp3"], refused=["tcp2"], what="source")
    (fork,) = src.fork(count=1, timeout=120)
    try:
        assert detail(arca, fork)["network"]["allowOut"] == [ip3]
        fork.files.write("/tmp/np_probe.py", PROBE)
        expect(probe(fork, probes), ok=["tcp3"], refused=["tcp2"], what="fork")
    finally:
        Sandbox.kill(fork.sandbox_id)
    paused = src.pause(mode="filesystem") if "mode" in inspect.signature(src.pause).parameters \
        else src.pause(keep_memory=False)
    assert paused is not False
    back = Sandbox.connect(src.sandbox_id)
    back.files.write("/tmp/np_probe.py", PROBE)
    expect(probe(back, probes), ok=["tcp3"], refused=["tcp2"], what="resumed on its files")


# --- 3. domains --------------------------------------------------------------------------------

DOMAINS = {"allow_out": ["allowed.test", "*.wild.test"], "deny_out": ["0.0.0.0/0"]}


def test_domains_allow_only_named_http_and_tls(arca, remote, make):
    """Deny all, allow `allowed.test` and `*.wild.test`: HTTP and HTTPS to the allowed names (a
    CNAME included) work; the apex `wild.test`, `denied.test` and the CNAME target get NXDOMAIN
    (the remote DNS never sees them); a wrong SNI, a wrong Host (also as a second request on a
    kept-alive connection), TLS without SNI, a bare IP, another port and UDP are refused."""
    sbx = make(network=DOMAINS)
    ip2, ip3 = remote.ip2, remote.ip3
    dns_guard(arca, remote, sbx)
    seen = remote.seen()

    res = probe(sbx, {
        "http": curl("http://allowed.test/"),
        "https": curl("https://allowed.test/"),
        "wild.test": lookup("wild.test", ok=False),
        "denied.test": lookup("denied.test", ok=False),
        "edge.cdn.test": lookup("edge.cdn.test", ok=False),
        "ip3": curl(f"http://{ip3}:8080/", ok=False),
    })  # fmt: skip
    expect(res, ok=["http", "https"], what="allowed.test")
    assert res["http"]["body"].startswith("host=allowed.test\n"), res["http"]
    assert res["https"]["body"].startswith("sni=allowed.test\nhost=allowed.test\n"), res["https"]
    for n in ("wild.test", "denied.test", "edge.cdn.test"):
        assert nxdomain(res[n]), (n, res[n])
    assert curl_refused(res["ip3"]), res["ip3"]

    # An allowed name is admitted only for the address its own lookup returned: `.2` is
    # admitted (for allowed.test) but b.c.wild.test was never looked up.
    res = probe(sbx, {"early": curl("https://b.c.wild.test/", "--resolve", f"b.c.wild.test:443:{ip2}", ok=False)})
    assert curl_refused(res["early"]), res["early"]
    assert grew(remote, seen, "sni", "b.c.wild.test") == 0, remote.seen()

    names = ["a.wild.test", "b.c.wild.test", "alias.wild.test"]
    res = probe(sbx, {f"{s}:{n}": curl(f"{s}://{n}/") for n in names for s in ("http", "https")})
    expect(res, ok=list(res), what="names under *.wild.test")
    for n in names:
        assert res[f"http:{n}"]["body"].startswith(f"host={n}\n"), res[f"http:{n}"]
        assert res[f"https:{n}"]["body"].startswith(f"sni={n}\nhost={n}\n"), res[f"https:{n}"]

    res = probe(sbx, {
        "sni": curl("https://denied.test/", "--resolve", f"denied.test:443:{ip2}", ok=False),
        "host": curl("http://allowed.test/", "-H", "Host: denied.test", ok=False),
        "keepalive": keepalive("allowed.test", ["allowed.test", "denied.test"]),
        "no-sni": curl(f"https://{ip2}/", ok=False),
        "bare-ip": curl(f"http://{ip2}/", ok=False),
        "port": curl("http://allowed.test:8080/", ok=False),
        "udp": udp(ip2, 7, ok=False),
        "tcp7": tcp(ip2, 7, ok=False),
        "curl-wild.test": curl("https://wild.test/", ok=False),
        "curl-denied.test": curl("http://denied.test/", ok=False),
        "curl-edge.cdn.test": curl("https://edge.cdn.test/", ok=False),
    })  # fmt: skip
    assert curl_refused(res["sni"]), res["sni"]
    assert res["host"]["code"] == 403 and refused_fast(res["host"]), res["host"]
    first, *rest = res["keepalive"]["responses"]
    assert first.get("status") == 200 and first["body"].startswith("host=allowed.test\n"), res["keepalive"]
    assert rest and rest[0].get("status") != 200, res["keepalive"]  # 403, or the connection cut
    assert curl_refused(res["no-sni"]), res["no-sni"]
    assert res["bare-ip"]["code"] == 403 or curl_refused(res["bare-ip"]), res["bare-ip"]
    assert res["port"].get("rc") == 7 and refused_fast(res["port"]), res["port"]
    expect(res, refused=["udp", "tcp7"], what="other ports of an admitted address")
    for n in ("wild.test", "denied.test", "edge.cdn.test"):
        assert res[f"curl-{n}"].get("rc") == 6 and refused_fast(res[f"curl-{n}"]), res[f"curl-{n}"]

    # What reached the remote: lookups of allowed names only; no denied name in DNS, SNI or Host.
    for n in ("allowed.test", "a.wild.test", "b.c.wild.test", "alias.wild.test"):
        assert grew(remote, seen, "dns", n) >= 1, (n, remote.seen())
    for n in ("denied.test", "wild.test"):
        assert grew(remote, seen, "dns", n) == 0, (n, remote.seen())
    for kind, key in (("sni", "denied.test"), ("sni", ""), ("http", "denied.test"), ("http", ip2),
                      ("http", f"{ip3}:8080"), ("http", "allowed.test:8080")):
        assert grew(remote, seen, kind, key) == 0, (kind, key, remote.seen())

    net = detail(arca, sbx)["network"]
    assert (net["allowOut"], net["denyOut"], net["dnsServers"]) == (
        DOMAINS["allow_out"], DOMAINS["deny_out"], [remote.dns]
    ), net


# --- 3b. forged sources -------------------------------------------------------------------------

SPOOF = r"""
import json, socket, struct, sys
source, gateway, name = sys.argv[1], sys.argv[2], sys.argv[3]
q = struct.pack(">HHHHHH", 0x5151, 0x0100, 1, 0, 0, 0)
q += b"".join(bytes([len(p)]) + p.encode() for p in name.split(".")) + b"\0" + struct.pack(">HH", 1, 1)
out = {}
# IP_FREEBIND (15) binds an address the sandbox does not have; IP_TRANSPARENT (19) also lets it
# send from one (it needs CAP_NET_ADMIN over the netns).
for label, opt in (("freebind", 15), ("transparent", 19)):
    try:
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.setsockopt(socket.IPPROTO_IP, opt, 1)
        s.bind((source, 0))
        for _ in range(3):
            s.sendto(q, (gateway, 53))
        out[label] = "sent"
    except OSError as e:
        out[label] = f"errno {e.errno}"
print(json.dumps(out))
"""


def test_a_forged_source_address_cannot_borrow_another_sandboxes_dns(arca, remote, make):
    """The node's DNS forwarder tells sandboxes apart by source address. A deny-all sandbox that
    sends queries from another sandbox's address must not get them forwarded under that
    sandbox's open policy. Two layers stop it: the kernel will not send from an address the
    sandbox lacks without CAP_NET_ADMIN (which it does not have), and the host firewall drops
    forged sources before NAT, so before the forwarder (ADR 0005, as built)."""
    locked = make({"deny_out": ["0.0.0.0/0"]})
    open_ = make({})
    dns_guard(arca, remote, locked)
    dns_guard(arca, remote, open_)
    _, victim_ip = sh(open_, "hostname -I")
    victim_ip = victim_ip.split()[0]
    _, conf = sh(locked, "cat /etc/resolv.conf")
    gateway = re.findall(r"^\s*nameserver\s+(\S+)", conf, re.M)[0]
    tag = os.urandom(4).hex()
    # Control: the open sandbox's own lookups do reach the remote's DNS.
    sh(open_, f"getent hosts ctl-{tag}.nope.test || true")
    deadline = time.monotonic() + 10
    while remote.query_count(f"ctl-{tag}.nope.test") == 0 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert remote.query_count(f"ctl-{tag}.nope.test") >= 1, remote.seen()
    locked.files.write("/tmp/spoof.py", SPOOF)
    rc, out = sh(locked, f"python3 /tmp/spoof.py {victim_ip} {gateway} spoof-{tag}.nope.test")
    assert rc == 0, out
    print("forged-source attempts:", out.strip())  # the kernel may refuse to send them at all
    time.sleep(2)
    assert remote.query_count(f"spoof-{tag}.nope.test") == 0, "a forged query was forwarded"
    # The forger's own query for the same kind of name is answered by the node alone.
    rc, _ = sh(locked, f"getent hosts own-{tag}.nope.test")
    assert rc != 0
    assert remote.query_count(f"own-{tag}.nope.test") == 0, remote.seen()


DNSQ = r"""
import socket, struct, sys
server, name = sys.argv[1], sys.argv[2]
q = struct.pack(">HHHHHH", 0x4e50, 0x0100, 1, 0, 0, 0)
q += b"".join(bytes([len(p)]) + p.encode() for p in name.split(".")) + b"\0" + struct.pack(">HH", 1, 1)
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.settimeout(3)
s.sendto(q, (server, 53))
r = s.recv(4096)
rcode, answers = r[3] & 15, struct.unpack(">H", r[6:8])[0]
sys.exit(0 if rcode == 0 and answers else 2 if rcode == 3 else 1)
"""


def test_a_template_ready_command_resolves_allowed_names_during_a_cold_create(
    arca, remote, make, tmp_path
):
    """Rules are loaded as soon as a cold create takes its slot, so the template's start and
    ready commands run under them, before the sandbox is handed out: the node's forwarder must
    already admit allowed names for it then (the ready command's lookup passes; the sandbox is
    created), and answer the others NXDOMAIN.

    The commands send their queries straight to the remote's DNS: in the build, which checks
    them in a sandbox without rules, that is where they go; in the sandbox, deny-all mode
    redirects every DNS query to the node's forwarder. Nothing asks the host's resolvers."""
    (tmp_path / "dnsq.py").write_text(DNSQ)
    q = f"python3 /usr/local/bin/np-dnsq.py {remote.dns}"
    name = "np-ready-" + os.urandom(4).hex()
    template = (
        Template(file_context_path=str(tmp_path))
        .from_template("base")
        .copy("dnsq.py", "/usr/local/bin/np-dnsq.py")
        .set_start_cmd(
            f"{q} denied.test; echo $? > /tmp/denied-rc; sleep infinity",
            f"{q} allowed.test",
        )
    )
    Template.build(template, name)
    sbx = make(network=dict(DOMAINS), template=name)
    dns_guard(arca, remote, sbx)
    _, out = sh(sbx, "cat /tmp/denied-rc")
    assert out.strip() == "2", out  # NXDOMAIN from the node for a name no rule allows
    res = probe(sbx, {"http": curl("http://allowed.test/")})
    assert res["http"]["body"].startswith("host=allowed.test\n"), res["http"]


# --- 4. what gets a 400 ------------------------------------------------------------------------

BAD_NETWORKS = [
    ("domain-without-deny-all", {"allowOut": ["allowed.test"]}, "allowOut"),
    ("domain-with-partial-deny", {"allowOut": ["allowed.test"], "denyOut": ["198.18.0.0/15"]}, "allowOut"),
    ("rules", {"rules": {"allowed.test": [{"transform": {"headers": {"X-Test": "1"}}}]}}, "rules"),
    ("egress-proxy", {"egressProxy": {"address": "127.0.0.1:1080"}}, "egressProxy"),
    ("https-ports", {"httpsPorts": [8443]}, "httpsPorts"),
    ("ipv6-allow", {"allowOut": ["2001:db8::1"], "denyOut": ["0.0.0.0/0"]}, "ipv6"),
    ("ipv6-deny", {"denyOut": ["::/0"]}, "ipv6"),
    ("domain-in-deny", {"denyOut": ["denied.test"]}, "denyOut"),
]


def assert_400(r, key: str) -> None:
    assert r.status == 400, (r.status, r.body)
    body = r.json()
    assert body["code"] == 400 and isinstance(body["message"], str), body
    assert key.lower() in body["message"].lower(), (key, body["message"])


def test_unsupported_or_invalid_network_settings_are_400(arca, remote, make):
    """Create (raw REST and the SDK) and `PUT .../network` refuse, naming the key: domains without
    deny-all, `rules`, `egressProxy`, `httpsPorts` (create only), IPv6 entries, a domain in
    `denyOut`; nothing is created and a running sandbox keeps its settings."""
    before = {s["sandboxID"] for s in arca.list_sandboxes()}
    for case, network, key in BAD_NETWORKS:
        body = {"templateID": "base", "timeout": 60, "network": {**network, "dnsServers": [remote.dns]}}
        r = arca.api("POST", "/v2/sandboxes", body)
        if r.status < 300:
            Sandbox.kill(r.json()["sandboxID"])
        assert_400(r, key)
    with pytest.raises(SandboxException) as e:
        net = {"allow_out": ["allowed.test"]}
        if "dns_servers" in SDK_CREATE_KEYS:
            net["dns_servers"] = [remote.dns]
        leaked = Sandbox.create(timeout=60, network=net)
        leaked.kill()
    assert getattr(e.value, "status_code", 400) == 400 and "allowOut" in str(e.value), e.value
    assert {s["sandboxID"] for s in arca.list_sandboxes()} == before

    sbx = make(network={"deny_out": [remote.ip3]})
    for case, network, key in BAD_NETWORKS:
        if "httpsPorts" in network:
            continue  # not part of an update
        r = arca.api("PUT", f"/sandboxes/{sbx.sandbox_id}/network", {**network, "dnsServers": [remote.dns]})
        assert_400(r, key)
    assert detail(arca, sbx)["network"]["denyOut"] == [remote.ip3]
    res = probe(sbx, {"tcp3": tcp(remote.ip3, 7, ok=False), "tcp2": tcp(remote.ip2, 7)})
    expect(res, ok=["tcp2"], refused=["tcp3"], what="rules kept after refused updates")


# --- 5. live update ----------------------------------------------------------------------------


def test_live_update_keeps_processes_and_cuts_removed_destinations(arca, remote, make):
    """`update_network` on a running sandbox: a TCP echo stream to `.3` and a background process
    keep running while `allowed.test` is added (usable at once, same envd and boot id); removing
    `.3` cuts the stream within CUT_WITHIN_S; on a paused sandbox the PUT is a 409."""
    ip2, ip3 = remote.ip2, remote.ip3
    sbx = make(network={"allow_out": [ip3], "deny_out": ["0.0.0.0/0"]})
    dns_guard(arca, remote, sbx)
    res = probe(sbx, {"before": curl("https://allowed.test/", ok=False)})
    assert res["before"].get("rc") == 6 and refused_fast(res["before"]), res["before"]

    sbx.files.write("/tmp/stream.py", STREAM)
    sh(sbx, f"nohup python3 /tmp/stream.py {ip3} 7 /tmp/stream.log >/dev/null 2>&1 &")
    sleeper = int(sh(sbx, BACKGROUND_SLEEP)[1].split()[-1])
    envd = envd_process(arca, sbx)
    boot_id = sbx.files.read("/proc/sys/kernel/random/boot_id")

    def oks() -> int:
        return sum(1 for line in read_lines(sbx, "/tmp/stream.log") if line[1] == "ok")

    wait_until(lambda: oks() >= 5, "the echo stream to .3 to run", limit_s=30)

    update_network(arca, remote, sbx, {"allow_out": [ip3, "allowed.test"], "deny_out": ["0.0.0.0/0"]})
    dns_guard(arca, remote, sbx)
    res = probe(sbx, {"https": curl("https://allowed.test/"), "http": curl("http://allowed.test/")})
    expect(res, ok=["https", "http"], what="allowed.test right after it was added")
    n = oks()
    wait_until(lambda: oks() >= n + 5, "the stream to go on after the update", limit_s=30)
    lines = read_lines(sbx, "/tmp/stream.log")
    assert not [line for line in lines if line[1] == "err"], lines[-5:]
    assert sh(sbx, f"cat /proc/{sleeper}/cmdline | tr '\\0' ' '")[1] == "sleep 1000 "
    assert envd_process(arca, sbx) == envd
    assert sbx.files.read("/proc/sys/kernel/random/boot_id") == boot_id
    net = detail(arca, sbx)["network"]
    assert net["allowOut"] == [ip3, "allowed.test"], net

    update_network(arca, remote, sbx, {"allow_out": ["allowed.test"], "deny_out": ["0.0.0.0/0"]})
    done = time.time()
    dns_guard(arca, remote, sbx)

    def cut():
        return next((line for line in read_lines(sbx, "/tmp/stream.log") if line[1] == "err"), None)

    err = wait_until(cut, "the stream to .3 to be cut", limit_s=15)
    assert float(err[0]) - done <= CUT_WITHIN_S, (err, done)
    res = probe(sbx, {
        "tcp3": tcp(ip3, 7, ok=False),
        "https": curl("https://allowed.test/"),
        "tcp2": tcp(ip2, 7, ok=False),
    })  # fmt: skip
    expect(res, ok=["https"], refused=["tcp3", "tcp2"], what="after removing .3")
    assert sh(sbx, f"cat /proc/{sleeper}/cmdline | tr '\\0' ' '")[1] == "sleep 1000 "
    assert envd_process(arca, sbx) == envd
    assert sbx.files.read("/proc/sys/kernel/random/boot_id") == boot_id

    assert sbx.pause() is True
    r = arca.api(
        "PUT",
        f"/sandboxes/{sbx.sandbox_id}/network",
        {"allowOut": [ip3], "denyOut": ["0.0.0.0/0"], "dnsServers": [remote.dns]},
    )
    assert r.status == 409, (r.status, r.body)
    assert r.json()["code"] == 409, r.body
    assert detail(arca, sbx)["network"]["allowOut"] == ["allowed.test"]


# --- 6. the egress log -------------------------------------------------------------------------

ENTRY_KEYS = {"timestamp", "protocol", "destination", "verdict", "rule", "count"}


def network_logs(arca, sbx, limit: int = LOG_RING) -> list[dict]:
    r = arca.api("GET", f"/sandboxes/{sbx.sandbox_id}/network/logs?limit={limit}")
    assert r.status == 200, (r.status, r.body)
    return r.json()["entries"]


def cli_network_logs(sbx) -> list[dict]:
    r = subprocess.run(
        [str(arca_bin()), "sandbox", "logs", "--network", "--json", sbx.sandbox_id],
        capture_output=True, text=True, timeout=60, env=dict(os.environ),
    )  # fmt: skip
    assert r.returncode == 0, (r.returncode, r.stderr)
    return [json.loads(line) for line in r.stdout.splitlines() if line.strip()]


def matches(entry: dict, want: dict) -> bool:
    for k, v in want.items():
        got = entry.get(k)
        if k == "name" and isinstance(got, str):
            got = got.lower().rstrip(".")
        if got != v:
            return False
    return True


def missing(entries: list[dict], wanted: list[dict]) -> list[dict]:
    return [w for w in wanted if not any(matches(e, w) for e in entries)]


def timestamp_key(ts: str) -> tuple:
    """RFC 3339 in UTC with any number of fraction digits, as a sortable tuple."""
    m = re.fullmatch(r"(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)(?:\.(\d+))?(Z|\+00:00)", ts)
    assert m, ts
    return m.group(1), (m.group(2) or "").ljust(9, "0")


def test_egress_log_records_verdicts_and_keeps_2000_entries(arca, remote, make):
    """`GET /sandboxes/{id}/network/logs` and `arca sandbox logs --network --json` hold allowed
    and denied entries for tcp, udp, dns, tls and http, with names, in the documented shape;
    repeats are merged into `count`; 3000 refused lookups of distinct names leave exactly 2000
    entries, the newest."""
    ip2, ip3 = remote.ip2, remote.ip3
    sbx = make(network={"allow_out": ["allowed.test", ip3], "deny_out": ["0.0.0.0/0"]})
    dns_guard(arca, remote, sbx)
    res = probe(sbx, {
        "tls": curl("https://allowed.test/"),
        "http": curl("http://allowed.test/"),
        "tcp3": tcp(ip3, 7),
        "dns-denied": lookup("denied.test", ok=False),
    })  # fmt: skip
    expect(res, ok=["tls", "http", "tcp3"], what="allowed traffic")
    res = probe(sbx, {
        "tls": curl("https://denied.test/", "--resolve", f"denied.test:443:{ip2}", ok=False),
        "http": curl("http://allowed.test/", "-H", "Host: denied.test", ok=False),
        "udp2": udp(ip2, 7, ok=False),
        **{f"tcp2-{i}": tcp(ip2, 7, ok=False) for i in range(5)},
    })  # fmt: skip
    expect(res, refused=["tls", "udp2"] + [f"tcp2-{i}" for i in range(5)], what="denied traffic")
    assert res["http"]["code"] == 403, res["http"]

    wanted = [
        {"protocol": "dns", "verdict": "allowed", "name": "allowed.test"},
        {"protocol": "dns", "verdict": "denied", "name": "denied.test"},
        {"protocol": "tls", "verdict": "allowed", "name": "allowed.test", "destination": ip2, "port": 443},
        {"protocol": "tls", "verdict": "denied", "name": "denied.test", "destination": ip2, "port": 443},
        {"protocol": "http", "verdict": "allowed", "name": "allowed.test", "destination": ip2, "port": 80},
        {"protocol": "http", "verdict": "denied", "name": "denied.test", "destination": ip2, "port": 80},
        {"protocol": "tcp", "verdict": "allowed", "destination": ip3, "port": 7, "rule": "allowOut"},
        {"protocol": "tcp", "verdict": "denied", "destination": ip2, "port": 7, "rule": "denyOut"},
        {"protocol": "udp", "verdict": "denied", "destination": ip2, "port": 7, "rule": "denyOut"},
    ]
    wait_until(lambda: not missing(network_logs(arca, sbx), wanted), "the log to hold every verdict", limit_s=30)
    entries = network_logs(arca, sbx)
    for e in entries:
        assert ENTRY_KEYS <= set(e), e
        assert e["verdict"] in ("allowed", "denied"), e
        assert e["protocol"] in ("tcp", "udp", "icmp", "dns", "tls", "http"), e
        assert isinstance(e["count"], int) and e["count"] >= 1, e
        assert isinstance(e["rule"], str) and e["rule"], e
    assert [timestamp_key(e["timestamp"]) for e in entries] == sorted(
        timestamp_key(e["timestamp"]) for e in entries
    ), "not oldest first"
    tcp2 = [e for e in entries if matches(e, wanted[7])]
    assert sum(e["count"] for e in tcp2) >= 5 and any(e["count"] >= 2 for e in tcp2), tcp2
    cli = cli_network_logs(sbx)
    assert not missing(cli, wanted), missing(cli, wanted)
    assert all(ENTRY_KEYS <= set(e) for e in cli), cli[:3]

    # The ring: 3000 refused lookups of distinct names, none of them forwarded.
    tag = unique()
    sbx.files.write(
        "/tmp/lookups.py",
        "import os, socket\n"
        "os.environ['RES_OPTIONS'] = 'timeout:2 attempts:1'\n"
        "refused = 0\n"
        "for i in range(3000):\n"
        "    try:\n"
        f"        socket.gethostbyname('n%d-{tag}.nope.test' % i)\n"
        "    except OSError:\n"
        "        refused += 1\n"
        "print(refused)\n",
    )
    assert sh(sbx, "python3 /tmp/lookups.py", timeout=200)[1].strip() == "3000"
    last = f"n2999-{tag}.nope.test"

    def newest_logged():
        e = network_logs(arca, sbx)
        return e if any(matches(x, {"protocol": "dns", "name": last}) for x in e) else None

    entries = wait_until(newest_logged, "the last lookup in the log", limit_s=30)
    assert len(entries) == LOG_RING, len(entries)
    assert not any(matches(e, {"name": f"n0-{tag}.nope.test"}) for e in entries), "oldest kept"
    assert all(matches(e, {"protocol": "dns", "verdict": "denied"}) for e in entries[-100:])
    assert len(cli_network_logs(sbx)) == LOG_RING
    assert not [n for n in remote.seen()["dns"] if tag in n], "a refused name reached the remote"


# --- 7. ingress --------------------------------------------------------------------------------


def test_private_ports_need_the_traffic_token_and_hosts_are_masked(arca, remote, make):
    """`allowPublicTraffic: false` and `maskRequestHost: "${PORT}-masked.test"`: a user port
    without the `e2b-traffic-access-token` header (or with a wrong one) is a 403 and the server
    sees nothing; with the token it is a 200, the server sees Host `8000-masked.test` and not the
    token; envd (commands) needs no token."""
    sbx = make(network={"allow_public_traffic": False, "mask_request_host": "${PORT}-masked.test"})
    token = sbx.traffic_access_token
    assert token, "create returned no traffic access token"
    assert Sandbox.connect(sbx.sandbox_id).traffic_access_token == token
    sbx.files.write("/tmp/host_echo.py", HOST_ECHO)
    sh(sbx, "nohup python3 /tmp/host_echo.py >/dev/null 2>&1 &")
    with_token = {"e2b-traffic-access-token": token}
    wait_until(
        lambda: through_proxy(sbx.sandbox_id, 8000, headers=with_token)[0] == 200,
        "the server in the sandbox to answer through the proxy",
        limit_s=30,
    )
    status, body = through_proxy(sbx.sandbox_id, 8000, "/x")
    assert status == 403, (status, body)
    assert json.loads(body)["code"] == 403, body
    assert b"host=" not in body
    status, body = through_proxy(sbx.sandbox_id, 8000, headers={"e2b-traffic-access-token": token + "x"})
    assert status == 403, (status, body)
    status, body = through_proxy(sbx.sandbox_id, 8000, "/y", headers=with_token)
    assert (status, body.decode()) == (200, "host=8000-masked.test\ntoken=\n"), (status, body)
    # envd's port needs no traffic token, and keeps the Host it was sent.
    assert sbx.commands.run("echo unaffected").stdout == "unaffected\n"
    assert through_proxy(sbx.sandbox_id, 49983, "/health")[0] in (200, 204)
    info = sbx.get_info()
    assert info.network is not None, info
    assert info.network.get("allow_public_traffic") is False, info.network
    assert info.network.get("mask_request_host") == "${PORT}-masked.test", info.network


# --- 8. restart --------------------------------------------------------------------------------


def test_rules_hold_while_the_node_is_down_and_are_removed_at_kill(arca, remote, make):
    """Deny all but `allowed.test`; `kill -9` of `arca up`: the deny holds while the node is down
    (a loop in the sandbox keeps trying `.3`); after the restart the allowed name works and `.3`
    is still refused. Killing the sandbox removes its slot's nft objects and map elements, and a
    later sandbox on that slot is unrestricted."""
    ip2, ip3 = remote.ip2, remote.ip3
    sbx = make(network={"allow_out": ["allowed.test"], "deny_out": ["0.0.0.0/0"]})
    dns_guard(arca, remote, sbx)
    res = probe(sbx, {"https": curl("https://allowed.test/"), "tcp3": tcp(ip3, 7, ok=False)})
    expect(res, ok=["https"], refused=["tcp3"], what="before the restart")
    index = slot_index(arca, sbx)
    assert slot_objects(arca, index), "no per-slot nft objects while the sandbox runs"

    sbx.files.write("/tmp/attempts.py", ATTEMPTS)
    sh(sbx, f"nohup python3 /tmp/attempts.py {ip3} 7 /tmp/attempts.log >/dev/null 2>&1 &")
    wait_until(lambda: len(read_lines(sbx, "/tmp/attempts.log")) >= 3, "the attempts loop to run", limit_s=30)

    killed = time.time()
    arca.kill9()
    time.sleep(3)
    assert arca.nft_table(), "the nft table went with the node"
    restarting = time.time()
    os.environ.update(arca.start())

    lines = read_lines(sbx, "/tmp/attempts.log")
    down = [line for line in lines if killed + 0.5 < float(line[0]) < restarting]
    assert len(down) >= 5, lines
    assert all(line[1] == "fail" for line in lines), [line for line in lines if line[1] != "fail"]

    def allowed_again():
        r = probe(sbx, {"https": curl("https://allowed.test/")})
        return r["https"]["ok"] and r

    wait_until(allowed_again, "allowed.test to work after the restart", limit_s=60, every_s=1)
    res = probe(sbx, {
        "http": curl("http://allowed.test/"),
        "tcp3": tcp(ip3, 7, ok=False),
        "http3": curl(f"http://{ip3}:8080/", ok=False),
        "tcp2": tcp(ip2, 7, ok=False),
    })  # fmt: skip
    expect(res, ok=["http"], refused=["tcp3", "http3", "tcp2"], what="after the restart")
    assert all(line[1] == "fail" for line in read_lines(sbx, "/tmp/attempts.log"))

    Sandbox.kill(sbx.sandbox_id)
    wait_until(lambda: not slot_objects(arca, index), f"slot {index}'s nft objects removed", limit_s=30)

    # A later sandbox on the same slot (when one gets it) starts without rules.
    later = []
    for _ in range(3):
        s = make()
        later.append(s)
        res = probe(s, {"tcp3": tcp(ip3, 7), "tcp2": tcp(ip2, 7), "http3": curl(f"http://{ip3}:8080/")})
        expect(res, ok=list(res), what=f"a new sandbox on slot {slot_index(arca, s)}")
        if slot_index(arca, s) == index:
            break
    else:
        print(f"no new sandbox got slot {index}; checked slots {[slot_index(arca, s) for s in later]}")
