"""A fake remote network for the network-policy tests (ADR 0005 section 7): a network namespace
`rmt<rand6>` joined to the host by a veth pair, with one Python process inside serving DNS, HTTP,
TLS and echo on two addresses. Nothing here sends a packet anywhere but into that namespace.

    with RemoteHost() as remote:
        remote.dns            # "198.18.<k>.2": give it to sandboxes as `dnsServers`
        remote.ip2, remote.ip3, remote.cidr, remote.k
        remote.query_count("denied.test")   # DNS queries the remote saw for a name

Layout (k: a free 198.18.<k>.0/24, the benchmark range, routed nowhere):

- root netns: `rmt<rand6>h` with 198.18.<k>.1/24 (the connected route sends the /24 there);
  sandboxes reach it through the host's forwarding and Arca's masquerade.
- inside `rmt<rand6>`: `rmt<rand6>p` with .2/24 and .3/24 (secondary) and no default route:
  it answers only 198.18.<k>.0/24 (sandbox traffic arrives masqueraded as .1), so nothing
  the remote does can leave for any other address.
  The kernel answers ping on both.
- DNS on .2:53 UDP and TCP (hand-made wire format): `allowed.test`, `denied.test`, `wild.test`,
  `a.wild.test`, `b.c.wild.test`, `edge.cdn.test` A .2; `other.test` A .3; `alias.wild.test`
  CNAME `edge.cdn.test` plus its A in the same answer; TTL 30; AAAA (and other types) of a known
  name: NOERROR without answers; any other name NXDOMAIN. Case-insensitive.
- HTTP/1.1 (keep-alive, Content-Length) on .2:80, .2:8080, .3:80 and .3:8080; the body echoes
  `host=<Host>`, `path=<path>` and `server=<addr>:<port>`.
- TLS on .2:443 (self-signed, made at start with `openssl req -x509`, SANs for every name and
  for .2); an HTTP request over it answers `sni=<server name or empty>` plus the lines above.
- TCP and UDP echo on port 7 of .2 and .3.

The server process writes what it saw (DNS names, HTTP Hosts, TLS server names) to
`<tmp>/seen.json` after every event; `query_count`, `http_count` and `sni_count` read it.

Run it alone as root for a self-check from the host: `python3 tests/e2e/remote_host.py`.
The same file is the server: `python3 remote_host.py --serve <dir>` (inside the namespace).
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import signal
import socket
import socketserver
import ssl
import string
import struct
import subprocess
import sys
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

# Names the remote DNS knows; values: the last octet of their A record.
A_RECORDS = {
    "allowed.test": 2,
    "denied.test": 2,
    "wild.test": 2,
    "a.wild.test": 2,
    "b.c.wild.test": 2,
    "edge.cdn.test": 2,
    "other.test": 3,
}
CNAMES = {"alias.wild.test": "edge.cdn.test"}
TTL = 30
CERT_NAMES = ["allowed.test", "denied.test", "*.wild.test", "wild.test", "edge.cdn.test"]

# Remote hosts made by this process: name -> server pid (None before it starts). The e2e
# harness's leak check (harness.clean_host) reports any that are still on the host.
CREATED: dict[str, int | None] = {}


def _run(*cmd: str, check: bool = True) -> str:
    r = subprocess.run(cmd, capture_output=True, text=True)
    if check and r.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({r.returncode}): {r.stderr.strip()}")
    return r.stdout


def unavailable() -> str | None:
    """Why a remote host cannot be made here, or None."""
    if os.geteuid() != 0:
        return "needs root (network namespaces, veth)"
    for tool in ("ip", "openssl"):
        if shutil.which(tool) is None:
            return f"`{tool}` is not installed"
    return None


def free_k() -> int:
    """A k with 198.18.<k>.0/24 in no host address or route."""
    used = _run("sh", "-c", "ip -4 -o addr; ip -4 route", check=False)
    taken = {int(m) for m in re.findall(r"\b198\.18\.(\d+)\.", used)}
    choices = [k for k in range(1, 255) if k not in taken]
    if not choices:
        raise RuntimeError("no free 198.18.<k>.0/24 on this host")
    return random.choice(choices)


def _netns_names() -> set[str]:
    return {line.split()[0] for line in _run("ip", "netns", "list", check=False).splitlines() if line}


def _link_names() -> set[str]:
    return set(re.findall(r"^\d+: ([^:@]+)", _run("ip", "-o", "link", "show", check=False), re.M))


def _is_our_server(pid: int) -> bool:
    try:
        return b"remote_host" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


def leftovers() -> list[str]:
    """Remote hosts of this process still on the host (netns, veth, server process): each is
    removed and described. Used by the harness's leak check."""
    found = []
    netns, links = _netns_names(), _link_names()
    for name, pid in CREATED.items():
        if pid is not None and _is_our_server(pid):
            found.append(f"remote host server process {pid} ({name})")
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if name + "h" in links:
            found.append(f"remote host veth {name}h")
            _run("ip", "link", "del", name + "h", check=False)
        if name in netns:
            found.append(f"remote host netns {name}")
            _run("ip", "netns", "del", name, check=False)
    return found


class RemoteHost:
    """One fake remote network; a context manager (see the module docstring)."""

    def __init__(self, start_limit_s: float = 30.0):
        self.name = "rmt" + "".join(random.choices(string.ascii_lowercase + string.digits, k=6))
        self.k = free_k()
        self.start_limit_s = start_limit_s
        self.dir: Path | None = None
        self.proc: subprocess.Popen | None = None

    # --- addresses -----------------------------------------------------------------------

    @property
    def host_veth(self) -> str:
        return self.name + "h"

    @property
    def peer_veth(self) -> str:
        return self.name + "p"

    @property
    def ip1(self) -> str:
        return f"198.18.{self.k}.1"

    @property
    def ip2(self) -> str:
        return f"198.18.{self.k}.2"

    @property
    def ip3(self) -> str:
        return f"198.18.{self.k}.3"

    @property
    def dns(self) -> str:
        return self.ip2

    @property
    def cidr(self) -> str:
        return f"198.18.{self.k}.0/24"

    # --- what the remote saw -------------------------------------------------------------

    def seen(self) -> dict:
        """{"dns": {name: n}, "dns_types": {name: {qtype: n}}, "http": {host: n},
        "https": {host: n}, "sni": {name: n}} (names lowercased)."""
        assert self.dir is not None, "not started"
        try:
            return json.loads((self.dir / "seen.json").read_text())
        except (OSError, ValueError):
            return {"dns": {}, "dns_types": {}, "http": {}, "https": {}, "sni": {}}

    def query_count(self, name: str) -> int:
        """DNS queries (any type, UDP or TCP) the remote DNS got for `name`."""
        return self.seen()["dns"].get(name.lower().rstrip("."), 0)

    def http_count(self, host: str) -> int:
        """Plain HTTP requests (any of the HTTP ports) that carried this Host header."""
        return self.seen()["http"].get(host.lower(), 0)

    def sni_count(self, name: str) -> int:
        """TLS handshakes on .2:443 that named this server (the empty string: no SNI)."""
        return self.seen()["sni"].get(name.lower(), 0)

    def log(self) -> str:
        try:
            return (self.dir / "server.log").read_text(errors="replace") if self.dir else ""
        except OSError:
            return ""

    # --- lifecycle -----------------------------------------------------------------------

    def __enter__(self) -> "RemoteHost":
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def start(self) -> None:
        CREATED[self.name] = None
        self.dir = Path(tempfile.mkdtemp(prefix=f"arca-{self.name}-"))
        n, k = self.name, self.k
        _run("ip", "netns", "add", n)
        _run("ip", "link", "add", self.host_veth, "type", "veth", "peer", "name", self.peer_veth)
        _run("ip", "link", "set", self.peer_veth, "netns", n)
        _run("ip", "addr", "add", f"{self.ip1}/24", "dev", self.host_veth)
        _run("ip", "link", "set", self.host_veth, "up")
        _run("ip", "-n", n, "link", "set", "lo", "up")
        _run("ip", "-n", n, "addr", "add", f"{self.ip2}/24", "dev", self.peer_veth)
        _run("ip", "-n", n, "addr", "add", f"{self.ip3}/24", "dev", self.peer_veth)
        _run("ip", "-n", n, "link", "set", self.peer_veth, "up")
        san = ",".join([f"DNS:{d}" for d in CERT_NAMES] + [f"IP:{self.ip2}"])
        _run(
            "openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
            "-subj", "/CN=allowed.test", "-addext", f"subjectAltName={san}",
            "-keyout", str(self.dir / "key.pem"), "-out", str(self.dir / "cert.pem"),
        )  # fmt: skip
        (self.dir / "config.json").write_text(json.dumps({"k": k}))
        with open(self.dir / "server.log", "wb") as err:
            self.proc = subprocess.Popen(
                ["ip", "netns", "exec", n, sys.executable, str(Path(__file__).resolve()),
                 "--serve", str(self.dir)],
                stdout=subprocess.PIPE, stderr=err, stdin=subprocess.DEVNULL,
            )  # fmt: skip
        # `ip netns exec` execs the command: this pid is the server itself.
        CREATED[self.name] = self.proc.pid
        ready = threading.Event()

        def wait_ready():
            if self.proc.stdout.readline().strip() == b"READY":
                ready.set()

        threading.Thread(target=wait_ready, daemon=True).start()
        if not ready.wait(self.start_limit_s):
            raise RuntimeError(
                f"remote host server not ready within {self.start_limit_s} s "
                f"(exit {self.proc.poll()}):\n{self.log()}"
            )

    def close(self) -> None:
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.send_signal(signal.SIGTERM)
                try:
                    self.proc.wait(5)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait()
            if self.proc.stdout:
                self.proc.stdout.close()
        if self.host_veth in _link_names():
            _run("ip", "link", "del", self.host_veth, check=False)  # takes the peer with it
        if self.name in _netns_names():
            _run("ip", "netns", "del", self.name, check=False)
        if self.dir is not None:
            shutil.rmtree(self.dir, ignore_errors=True)


# --- the server (runs inside the namespace) --------------------------------------------------


class Seen:
    """What the servers saw, written to `seen.json` (atomically) after every event."""

    def __init__(self, path: Path):
        self.path = path
        self.lock = threading.Lock()
        self.data: dict[str, dict] = {"dns": {}, "dns_types": {}, "http": {}, "https": {}, "sni": {}}
        self.flush()

    def add(self, kind: str, key: str, sub: str | None = None) -> None:
        with self.lock:
            d = self.data[kind]
            d[key] = d.get(key, 0) + 1
            if sub is not None:
                t = self.data["dns_types"].setdefault(key, {})
                t[sub] = t.get(sub, 0) + 1
            self.flush()

    def flush(self) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data))
        os.replace(tmp, self.path)


def encode_name(name: str) -> bytes:
    out = b""
    for label in name.split("."):
        raw = label.encode()
        out += bytes([len(raw)]) + raw
    return out + b"\0"


def rr(owner: bytes, rtype: int, rdata: bytes) -> bytes:
    return owner + struct.pack("!HHIH", rtype, 1, TTL, len(rdata)) + rdata


def dns_reply(query: bytes, k: int, seen: Seen | None) -> bytes | None:
    """The answer to one DNS message, or None to drop it (not a query)."""
    if len(query) < 12:
        return None
    qid, flags, qdcount = struct.unpack("!HHH", query[:6])
    if flags & 0x8000:
        return None
    opcode = (flags >> 11) & 0xF
    base = 0x8000 | (opcode << 11) | 0x0400 | (flags & 0x0100) | 0x0080  # QR AA RD RA

    def reply(rcode: int, question: bytes = b"", answers: list[bytes] = ()) -> bytes:
        head = struct.pack(
            "!HHHHHH", qid, base | rcode, 1 if question else 0, len(answers), 0, 0
        )
        return head + question + b"".join(answers)

    if opcode != 0:
        return reply(4)  # NOTIMP
    if qdcount != 1:
        return reply(1)  # FORMERR
    pos, labels = 12, []
    while True:
        if pos >= len(query):
            return reply(1)
        n = query[pos]
        pos += 1
        if n == 0:
            break
        if n & 0xC0 or pos + n > len(query):
            return reply(1)
        labels.append(query[pos : pos + n])
        pos += n
    if pos + 4 > len(query):
        return reply(1)
    qtype, _qclass = struct.unpack("!HH", query[pos : pos + 4])
    question = query[12 : pos + 4]
    name = b".".join(labels).decode("ascii", "replace").lower()
    if seen is not None:
        seen.add("dns", name, str(qtype))
    if name not in A_RECORDS and name not in CNAMES:
        return reply(3, question)  # NXDOMAIN
    answers = []
    if qtype in (1, 5, 255):  # A, CNAME, ANY
        owner, target = b"\xc0\x0c", name
        if name in CNAMES:
            target = CNAMES[name]
            answers.append(rr(owner, 5, encode_name(target)))
            owner = encode_name(target)
        if qtype != 5:
            answers.append(rr(owner, 1, bytes([198, 18, k, A_RECORDS[target]])))
    # AAAA and other types of a known name: NOERROR, no answers.
    return reply(0, question, answers)


def serve(directory: Path) -> None:
    # This process never resolves a name: nothing it does may reach the host's resolvers.
    def no_lookups(*args, **kwargs):
        raise OSError("remote_host: name lookups are disabled in the server")

    socket.getfqdn = socket.gethostbyaddr = socket.gethostbyname = no_lookups
    cfg = json.loads((directory / "config.json").read_text())
    k = cfg["k"]
    ip2, ip3 = f"198.18.{k}.2", f"198.18.{k}.3"
    seen = Seen(directory / "seen.json")

    class Quiet:
        def handle_error(self, request, client_address):
            print(f"error from {client_address}: {sys.exc_info()[1]!r}", file=sys.stderr)

    class UDPServer(Quiet, socketserver.ThreadingUDPServer):
        daemon_threads = True
        allow_reuse_address = True

    class TCPServer(Quiet, socketserver.ThreadingTCPServer):
        daemon_threads = True
        allow_reuse_address = True

    class DNSUDP(socketserver.BaseRequestHandler):
        def handle(self):
            data, sock = self.request
            out = dns_reply(data, k, seen)
            if out is not None:
                sock.sendto(out, self.client_address)

    class DNSTCP(socketserver.BaseRequestHandler):
        def handle(self):
            self.request.settimeout(30)
            f = self.request.makefile("rb")
            while True:
                head = f.read(2)
                if len(head) < 2:
                    return
                (n,) = struct.unpack("!H", head)
                msg = f.read(n)
                if len(msg) < n:
                    return
                out = dns_reply(msg, k, seen)
                if out is not None:
                    self.request.sendall(struct.pack("!H", len(out)) + out)

    class EchoTCP(socketserver.BaseRequestHandler):
        def handle(self):
            self.request.settimeout(600)
            while True:
                data = self.request.recv(65536)
                if not data:
                    return
                self.request.sendall(data)

    class EchoUDP(socketserver.BaseRequestHandler):
        def handle(self):
            data, sock = self.request
            sock.sendto(data, self.client_address)

    class Echo(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        timeout = 60

        def answer(self, head_only: bool = False):
            length = int(self.headers.get("Content-Length") or 0)
            if length:
                self.rfile.read(length)
            host = self.headers.get("Host", "")
            addr, port = self.connection.getsockname()[:2]
            lines = []
            if isinstance(self.connection, ssl.SSLSocket):
                sni = getattr(self.connection, "sni_name", None) or ""
                lines.append(f"sni={sni}")
                seen.add("https", host.lower())
            else:
                seen.add("http", host.lower())
            lines += [f"host={host}", f"path={self.path}", f"server={addr}:{port}"]
            body = ("\n".join(lines) + "\n").encode()
            self.send_response(200)
            self.send_header("Content-Type", "text/plain")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if not head_only:
                self.wfile.write(body)

        def do_GET(self):
            self.answer()

        def do_POST(self):
            self.answer()

        def do_HEAD(self):
            self.answer(head_only=True)

        def log_message(self, fmt, *args):
            pass

    class HTTPServer(Quiet, ThreadingHTTPServer):
        daemon_threads = True

        def server_bind(self):
            # Not HTTPServer's: it calls socket.getfqdn, a reverse DNS lookup through the
            # host's resolvers, i.e. traffic leaving the host.
            socketserver.TCPServer.server_bind(self)
            self.server_name, self.server_port = self.server_address[:2]

    def on_sni(sock, server_name, _ctx):
        try:
            sock.sni_name = server_name or ""
        except AttributeError:
            pass
        seen.add("sni", (server_name or "").lower())

    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(directory / "cert.pem", directory / "key.pem")
    ctx.sni_callback = on_sni

    class TLSServer(HTTPServer):
        def finish_request(self, request, client_address):
            # In the request's own thread: a client that stalls blocks nobody else.
            request.settimeout(15)
            tls = ctx.wrap_socket(request, server_side=True)
            try:
                if getattr(tls, "sni_name", None) is None:
                    tls.sni_name = ""
                    seen.add("sni", "")
                tls.settimeout(60)
                self.RequestHandlerClass(tls, client_address, self)
            finally:
                tls.close()

    servers = [
        UDPServer((ip2, 53), DNSUDP),
        TCPServer((ip2, 53), DNSTCP),
        HTTPServer((ip2, 80), Echo),
        HTTPServer((ip2, 8080), Echo),
        HTTPServer((ip3, 80), Echo),
        HTTPServer((ip3, 8080), Echo),
        TLSServer((ip2, 443), Echo),
        TCPServer((ip2, 7), EchoTCP),
        TCPServer((ip3, 7), EchoTCP),
        UDPServer((ip2, 7), EchoUDP),
        UDPServer((ip3, 7), EchoUDP),
    ]
    for s in servers:
        threading.Thread(target=s.serve_forever, daemon=True).start()
    print("READY", flush=True)
    while True:
        signal.pause()  # SIGTERM ends the process


# --- self-check (run as root: python3 remote_host.py) -----------------------------------------


def _dns_query(server: str, name: str, qtype: int = 1, tcp: bool = False):
    """(rcode, [(type, ttl, rdata)]) from a hand-made query."""
    qid = random.randrange(65536)
    msg = struct.pack("!HHHHHH", qid, 0x0100, 1, 0, 0, 0) + encode_name(name) + struct.pack("!HH", qtype, 1)
    if tcp:
        with socket.create_connection((server, 53), timeout=5) as s:
            s.sendall(struct.pack("!H", len(msg)) + msg)
            f = s.makefile("rb")
            (n,) = struct.unpack("!H", f.read(2))
            data = f.read(n)
    else:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.settimeout(5)
            s.sendto(msg, (server, 53))
            data = s.recv(4096)
    rid, flags, qd, an = struct.unpack("!HHHH", data[:8])
    assert rid == qid and flags & 0x8000, data
    pos = 12
    for _ in range(qd):
        while data[pos] != 0:
            pos += 1 + data[pos]
        pos += 5

    def skip_name(p):
        while True:
            if data[p] & 0xC0:
                return p + 2
            if data[p] == 0:
                return p + 1
            p += 1 + data[p]

    def read_name(p):
        labels = []
        while data[p]:
            labels.append(data[p + 1 : p + 1 + data[p]].decode())
            p += 1 + data[p]
        return ".".join(labels)

    out = []
    for _ in range(an):
        pos = skip_name(pos)
        rtype, _cls, ttl, rdlen = struct.unpack("!HHIH", data[pos : pos + 10])
        pos += 10
        rdata = data[pos : pos + rdlen]
        value = socket.inet_ntoa(rdata) if rtype == 1 else read_name(pos) if rtype == 5 else rdata
        out.append((rtype, ttl, value))
        pos += rdlen
    return flags & 0xF, out


def _http(ip: str, port: int, hosts: list[str], tls_name: str | None = None, cafile=None):
    """Requests on one keep-alive connection; returns the bodies."""
    import http.client

    if tls_name is None:
        c = http.client.HTTPConnection(ip, port, timeout=5)
    else:
        ctx = ssl.create_default_context(cafile=cafile)
        ctx.check_hostname = False  # the SAN check is done separately below

        class Conn(http.client.HTTPSConnection):
            def connect(self):
                socket_ = socket.create_connection((ip, port), timeout=5)
                self.sock = ctx.wrap_socket(socket_, server_hostname=tls_name)

        c = Conn(ip, port, timeout=5)
    bodies, ports = [], set()
    for h in hosts:
        c.putrequest("GET", "/p", skip_host=True)
        c.putheader("Host", h)
        c.endheaders()
        ports.add(c.sock.getsockname()[1])
        r = c.getresponse()
        assert r.status == 200, r.status
        bodies.append(r.read().decode())
    c.close()
    assert len(ports) == 1, "keep-alive: the requests used more than one connection"
    return bodies


def _icmp_echo(ip: str) -> bool:
    """One ping with a raw socket (root), so it works whatever ping_group_range says."""
    with socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP) as s:
        s.settimeout(3)
        ident = os.getpid() & 0xFFFF
        payload = b"arca-selfcheck"
        hdr = struct.pack("!BBHHH", 8, 0, 0, ident, 1)
        csum_data = hdr + payload
        total = sum(struct.unpack(f"!{len(csum_data) // 2}H", csum_data.ljust((len(csum_data) + 1) // 2 * 2, b"\0")))
        total = (total >> 16) + (total & 0xFFFF)
        total += total >> 16
        csum = ~total & 0xFFFF
        s.sendto(struct.pack("!BBHHH", 8, 0, csum, ident, 1) + payload, (ip, 0))
        deadline = time.monotonic() + 3
        while time.monotonic() < deadline:
            data, addr = s.recvfrom(2048)
            ihl = (data[0] & 0xF) * 4
            t, _c, _s, rid, _seq = struct.unpack("!BBHHH", data[ihl : ihl + 8])
            if addr[0] == ip and t == 0 and rid == ident:
                return True
    return False


def self_check() -> None:
    why = unavailable()
    if why:
        print(f"cannot run: {why}", file=sys.stderr)
        sys.exit(2)
    with RemoteHost() as r:
        print(f"remote host {r.name}: k={r.k} dns={r.dns} ip3={r.ip3} dir={r.dir}")
        assert r.name in _netns_names() and r.host_veth in _link_names()
        for tcp in (False, True):
            assert _dns_query(r.dns, "allowed.test", tcp=tcp) == (0, [(1, TTL, r.ip2)])
            assert _dns_query(r.dns, "ALLOWED.Test", tcp=tcp) == (0, [(1, TTL, r.ip2)])
            assert _dns_query(r.dns, "other.test", tcp=tcp) == (0, [(1, TTL, r.ip3)])
            assert _dns_query(r.dns, "b.c.wild.test", tcp=tcp) == (0, [(1, TTL, r.ip2)])
            assert _dns_query(r.dns, "alias.wild.test", tcp=tcp) == (
                0, [(5, TTL, "edge.cdn.test"), (1, TTL, r.ip2)]
            ), _dns_query(r.dns, "alias.wild.test", tcp=tcp)
            assert _dns_query(r.dns, "allowed.test", qtype=28, tcp=tcp) == (0, [])
            assert _dns_query(r.dns, "nope.test", tcp=tcp) == (3, [])
        assert r.query_count("allowed.test") == 6, r.seen()
        assert r.query_count("nope.test") == 2
        assert r.query_count("denied.test") == 0
        print("dns ok:", r.seen()["dns"])

        b = _http(r.ip2, 80, ["allowed.test", "denied.test"])
        assert b[0].startswith("host=allowed.test\npath=/p\n") and f"server={r.ip2}:80" in b[0], b
        assert b[1].startswith("host=denied.test\n"), b
        for ip, port in ((r.ip2, 8080), (r.ip3, 80), (r.ip3, 8080)):
            (body,) = _http(ip, port, ["other.test"])
            assert "host=other.test\n" in body and f"server={ip}:{port}" in body, body
        assert r.http_count("denied.test") == 1 and r.http_count("other.test") == 3
        print("http ok")

        cafile = str(r.dir / "cert.pem")
        b = _http(r.ip2, 443, ["allowed.test", "x.wild.test"], tls_name="allowed.test", cafile=cafile)
        assert b[0].startswith("sni=allowed.test\nhost=allowed.test\n"), b
        assert b[1].startswith("sni=allowed.test\nhost=x.wild.test\n"), b
        # No SNI (an IP as the server name sends none).
        ctx = ssl.create_default_context(cafile=cafile)
        ctx.check_hostname = False
        with socket.create_connection((r.ip2, 443), timeout=5) as raw:
            with ctx.wrap_socket(raw) as s:
                s.sendall(b"GET / HTTP/1.1\r\nHost: " + r.ip2.encode() + b"\r\nConnection: close\r\n\r\n")
                data = b""
                while chunk := s.recv(4096):
                    data += chunk
        assert b"\r\n\r\nsni=\nhost=" + r.ip2.encode() in data, data
        # The certificate names every test name and .2.
        for name in ("allowed.test", "denied.test", "a.wild.test", "wild.test", "edge.cdn.test", r.ip2):
            strict = ssl.create_default_context(cafile=cafile)
            with socket.create_connection((r.ip2, 443), timeout=5) as raw:
                strict.wrap_socket(raw, server_hostname=name).close()
        assert r.sni_count("allowed.test") >= 1 and r.sni_count("") >= 1, r.seen()
        print("tls ok:", r.seen()["sni"])

        for ip in (r.ip2, r.ip3):
            with socket.create_connection((ip, 7), timeout=5) as s:
                for i in range(3):
                    s.sendall(b"line %d\n" % i)
                    assert s.recv(100) == b"line %d\n" % i
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
                s.settimeout(5)
                s.connect((ip, 7))
                s.send(b"udp hello")
                assert s.recv(100) == b"udp hello"
            assert _icmp_echo(ip), f"no ping answer from {ip}"
        print("echo and ping ok")
        name, pid = r.name, r.proc.pid
    assert name not in _netns_names() and name + "h" not in _link_names(), "not torn down"
    assert not _is_our_server(pid), "server still running"
    assert leftovers() == []
    print("torn down; self-check passed")


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--serve":
        serve(Path(sys.argv[2]))
    else:
        self_check()
