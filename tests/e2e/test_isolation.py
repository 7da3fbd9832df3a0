"""Isolation (issue 3): untrusted code inside a sandbox, run through `commands.run` (as the
sandbox's root where that is the stronger attempt), tries to break out and fails. Every
attempt is judged by its effect seen from the host or from the other sandbox, not only by an
exit code."""

from __future__ import annotations

import hashlib
import os
import re
import socket
import socketserver
import subprocess
import threading
import time
from pathlib import Path

import pytest
from e2b import CommandExitException, NotFoundException, Sandbox, SandboxException

from conftest import create_sandbox, unique, wait_until
from harness import base_layer_dir


@pytest.fixture(params=["ns", "gvisor"])
def runtime(request) -> str:
    """Every attempt is made against each isolation backend that runs here (issue 8)."""
    return request.param


def sh(sbx, cmd: str, user: str = "root", timeout: float = 60):
    """Runs `cmd` in the sandbox with stderr folded into stdout; never raises on exit codes."""
    try:
        r = sbx.commands.run("exec 2>&1; " + cmd, user=user, timeout=timeout)
        return r.exit_code, r.stdout
    except CommandExitException as e:
        return e.exit_code, e.stdout


def sha256(path: str) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def host_ipv4_addresses() -> list[str]:
    out = subprocess.run(["ip", "-4", "-o", "addr", "show"], capture_output=True, text=True)
    return re.findall(r"inet (\d+\.\d+\.\d+\.\d+)/", out.stdout)


def sandbox_ip(sbx) -> str:
    ip = sh(sbx, "hostname -I")[1].split()[0]
    assert re.fullmatch(r"\d+\.\d+\.\d+\.\d+", ip), ip
    return ip


class _Token(socketserver.BaseRequestHandler):
    def handle(self):
        self.request.sendall(b"HTTP/1.0 200 OK\r\n\r\n" + self.server.token.encode() + b"\n")


class HostServer:
    """A TCP service on the host answering a secret token, on one port of the given addresses."""

    def __init__(self, addresses: list[str]):
        self.token = "host-secret-" + unique()
        self.port = None
        self.servers = []
        for addr in addresses:
            srv = socketserver.ThreadingTCPServer((addr, self.port or 0), _Token)
            srv.daemon_threads = True
            srv.token = self.token
            self.port = srv.server_address[1]
            threading.Thread(target=srv.serve_forever, daemon=True).start()
            self.servers.append(srv)

    def close(self):
        for s in self.servers:
            s.shutdown()
            s.server_close()


def probe_all(sbx, targets: list[tuple[str, int]]) -> dict[str, str]:
    """From inside the sandbox, tries every (address, port) at once with curl; returns what each
    printed (empty when it could not connect)."""
    parts = [
        f'(echo "{a}:{p} $(curl -s -m 3 http://{a}:{p}/ 2>/dev/null | head -c 200)") &'
        for a, p in targets
    ]
    _, out = sh(sbx, " ".join(parts) + " wait", user="user")
    got = {}
    for line in out.splitlines():
        k, _, v = line.partition(" ")
        got[k] = v
    assert len(got) == len(targets), out
    return got


# --- files ------------------------------------------------------------------------------------


def test_host_files_invisible_and_unwritable(arca, sandbox, runtime):
    secret = f"/tmp/arca-e2e-secret-{unique()}"
    token = "host-file-" + unique()
    Path(secret).write_text(token)
    name = "arca-e2e-" + unique()
    before = {p: sha256(p) for p in ("/etc/passwd", "/etc/hostname", "/etc/resolv.conf")}
    template_etc = base_layer_dir(arca.home) / "diff" / "etc"
    template_passwd = sha256(str(template_etc / "passwd"))
    try:
        # Read: not at its path, not through any /proc/<pid>/root, not by searching.
        rc, out = sh(
            sandbox,
            f"cat {secret}; for p in /proc/[0-9]*; do cat $p/root{secret}; done; "
            f"grep -rs {token} /tmp /root /home /run /proc/1/root/tmp; true",
        )
        assert token not in out
        # Write: the sandbox's / and /etc are its own.
        rc, out = sh(
            sandbox,
            f"echo pwned > /{name} && echo pwned > /etc/{name} && "
            f"echo 'evil:x:0:0::/:/bin/sh' >> /etc/passwd && echo evil > /etc/hostname && "
            f"echo written; echo pwned > /proc/1/root/etc/{name}-2",
        )
        # Inside the sandbox these succeed (the last one may be refused: gVisor does not let
        # a shell into envd's /proc/1/root; under ns it is the sandbox's own root).
        assert "written" in out, out
        for p in (f"/{name}", f"/etc/{name}", f"/etc/{name}-2", f"{template_etc}/{name}"):
            assert not os.path.exists(p), f"sandbox wrote {p} on the host"
        assert {p: sha256(p) for p in before} == before
        assert sha256(str(template_etc / "passwd")) == template_passwd
        # A fresh sandbox from the same template does not see the changes either.
        other = create_sandbox(runtime, timeout=60)
        try:
            _, out = sh(other, f"ls /{name} /etc/{name}; grep -c evil /etc/passwd")
            assert "No such file" in out and out.strip().endswith("0"), out
        finally:
            other.kill()
    finally:
        os.unlink(secret)


def test_envd_binary_cannot_be_replaced(arca, sandbox):
    from harness import envd_bin

    before = sha256(str(envd_bin()))
    _, out = sh(
        sandbox,
        "echo x >> /run/arca/envd; cp /bin/true /run/arca/envd; rm -f /run/arca/envd; "
        "mv /run/arca/envd /tmp/x; mount -o remount,rw /run/arca/envd; "
        "mount -o remount,rw,bind /run/arca /run/arca; "
        "echo x >> /proc/1/exe; cp /bin/true /proc/1/exe; "
        "sha256sum /run/arca/envd",
    )
    assert sha256(str(envd_bin())) == before
    assert before in out, out  # still the same binary inside
    # envd still serves this sandbox.
    assert sandbox.commands.run("echo ok").stdout == "ok\n"


# --- processes --------------------------------------------------------------------------------


def test_host_and_other_sandbox_processes_invisible(sandbox, sandbox_b):
    host_tag = f"1000.{int(unique()[:6], 16)}"
    host_proc = subprocess.Popen(["sleep", host_tag])
    b_tag = f"1000.{int(unique()[:6], 16)}"
    try:
        sandbox_b.commands.run(f"sleep {b_tag}", background=True)
        # Positive control: B sees its own process.
        assert b_tag in sh(sandbox_b, "ps -eo args")[1]

        _, out = sh(sandbox, "ps -eo pid,args; cat /proc/[0-9]*/cmdline | tr '\\0' ' '")
        assert host_tag not in out and b_tag not in out
        assert "process_api" not in out and "arca up" not in out
        _, pid1 = sh(sandbox, "cat /proc/1/cmdline | tr '\\0' ' '")
        assert pid1.strip() == "/run/arca/envd"
        # Only this sandbox's handful of processes exist: envd and this command.
        _, n = sh(sandbox, "ls -d /proc/[0-9]* | wc -l")
        assert int(n) < 10, n
        # The host's pid of the host process means nothing inside.
        _, out = sh(sandbox, f"cat /proc/{host_proc.pid}/cmdline; kill -9 {host_proc.pid}")
        assert host_tag not in out
        assert host_proc.poll() is None, "the sandbox killed a host process"
    finally:
        host_proc.kill()
        host_proc.wait()


# --- network ----------------------------------------------------------------------------------


def test_host_services_unreachable(arca, sandbox):
    """A service on the host's loopback and on every host address, and the api and proxy ports,
    cannot be reached from a sandbox."""
    addresses = host_ipv4_addresses()
    assert "127.0.0.1" in addresses
    srv = HostServer(addresses)
    try:
        # Positive control: the service answers on every address from the host itself.
        for a in addresses:
            with socket.create_connection((a, srv.port), timeout=5) as c:
                assert srv.token.encode() in c.recv(200)
        targets = [(a, p) for a in addresses for p in (srv.port, arca.api_port, arca.proxy_port)]
        got = probe_all(sandbox, targets)
        leaked = {k: v for k, v in got.items() if v.strip()}
        assert not leaked, f"reachable from the sandbox: {leaked}"
    finally:
        srv.close()


def test_other_sandbox_unreachable(sandbox, sandbox_b):
    ip_a, ip_b = sandbox_ip(sandbox), sandbox_ip(sandbox_b)
    assert ip_a != ip_b
    token = "b-file-" + unique()
    sh(sandbox_b, f"mkdir -p /tmp/www && echo {token} > /tmp/www/index.html", user="user")
    sandbox_b.commands.run(
        "cd /tmp/www && exec python3 -m http.server 8000 --bind 0.0.0.0", background=True
    )

    # Positive control: inside B the server answers on its own address and on loopback.
    def b_serves():
        return token in sh(sandbox_b, f"curl -s -m 2 http://{ip_b}:8000/index.html")[1]

    wait_until(b_serves, "the http server in sandbox B")
    assert token in sh(sandbox_b, "curl -s -m 2 http://127.0.0.1:8000/index.html")[1]

    got = probe_all(sandbox, [(ip_b, 8000), (ip_b, 49983)])
    assert not any(v.strip() for v in got.values()), got
    # A's own envd answers on its own address: the probe itself works.
    assert sh(sandbox, f"curl -s -o /dev/null -w '%{{http_code}}' http://{ip_a}:49983/health")[
        1
    ].strip() in ("200", "204")


# --- kernel -----------------------------------------------------------------------------------


def test_mount_and_remount_refused(arca, sandbox):
    def host_mounts():
        # Network slots come and go in the background; they are not what is tested here.
        lines = Path("/proc/self/mountinfo").read_text().splitlines()
        return sorted(m for m in lines if " /run/netns/" not in m)

    before = host_mounts()
    rc, out = sh(
        sandbox,
        "mount -t tmpfs none /mnt && echo MOUNTED-tmpfs; "
        "mount -t proc proc /mnt && echo MOUNTED-proc; "
        "mount -o remount,rw /sys && echo REMOUNTED-sys; "
        "mount -o remount,rw / && touch /sys/x && echo WROTE-sys; "
        "mount --bind /proc/1/root /mnt && echo MOUNTED-bind; "
        "unshare -m true && echo UNSHARED; "
        "mount -o remount,rw /run/arca/envd && echo REMOUNTED-envd; true",
    )
    assert "MOUNTED" not in out and "UNSHARED" not in out and "WROTE" not in out, out
    assert host_mounts() == before
    assert arca.mounts() == []


def test_network_and_host_name_cannot_be_changed_from_inside(arca, sandbox, sandbox_b, runtime):
    """The sandbox's user namespace owns its network and uts namespaces (ADR 0004), but sandbox
    root has no CAP_NET_ADMIN, CAP_SYS_ADMIN or CAP_NET_RAW: it cannot take its interface down,
    give itself another address (to pose as another sandbox), rename the host or open raw and
    packet sockets (hand-made frames); the sandbox keeps working."""
    ip = sandbox_ip(sandbox)
    other = sandbox_ip(sandbox_b)
    code = (
        "import ctypes, fcntl, socket, struct\n"
        "s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
        "req = struct.pack('16sH14s', b'eth0', 0, b'')\n"
        "try:\n"
        "    fcntl.ioctl(s, 0x8914, req); print('DOWN')\n"  # SIOCSIFFLAGS with no IFF_UP
        "except OSError as e: print('down refused', e.errno)\n"
        f"addr = struct.pack('16sH2s4s8s', b'eth0', socket.AF_INET, b'', socket.inet_aton('{other}'), b'')\n"
        "try:\n"
        "    fcntl.ioctl(s, 0x8916, addr); print('READDRESSED')\n"  # SIOCSIFADDR
        "except OSError as e: print('address refused', e.errno)\n"
        "try:\n"
        "    socket.sethostname('evil'); print('RENAMED')\n"
        "except OSError as e: print('rename refused', e.errno)\n"
        "try:\n"
        "    socket.socket(socket.AF_PACKET, socket.SOCK_RAW); print('PACKET')\n"
        "except OSError as e: print('packet refused', e.errno)\n"
        "try:\n"
        "    socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP); print('RAW')\n"
        "except OSError as e: print('raw refused', e.errno)\n"
    )
    sandbox.files.write("/tmp/net.py", code)
    _, out = sh(sandbox, "python3 /tmp/net.py")
    for made in ("DOWN", "READDRESSED", "RENAMED", "PACKET", "RAW"):
        assert made not in out, out
    if runtime == "ns":
        assert out.count("refused 1") == 5, out  # EPERM each time
    else:
        # gVisor refuses too, interface ioctls with ENOTTY (its kernel has none of them).
        assert out.count("refused") == 5, out
    # Ping still works without raw sockets (ping sockets), to the sandbox's own address.
    assert sh(sandbox, f"python3 -c \"import socket; socket.socket(socket.AF_INET, socket.SOCK_DGRAM, socket.IPPROTO_ICMP); print('ok')\"")[1].strip() == "ok"
    assert sandbox_ip(sandbox) == ip
    assert sh(sandbox, "hostname")[1].strip() == sandbox.sandbox_id
    assert sandbox.commands.run("echo still reachable").stdout.strip() == "still reachable"


def test_module_loading_refused(sandbox):
    modules = Path("/proc/modules")  # absent on a kernel without module support
    lsmod = modules.read_text() if modules.exists() else None
    # finit_module(2) and init_module(2) on x86_64, called directly (no modprobe needed).
    code = (
        "import ctypes,os; l=ctypes.CDLL(None,use_errno=True); fd=os.open('/dev/null',0); "
        "print(l.syscall(313,fd,b'',0), ctypes.get_errno()); "
        "print(l.syscall(175,b'\\x7fELF'+bytes(60),64,b''), ctypes.get_errno())"
    )
    _, out = sh(sandbox, f'python3 -c "{code}"; modprobe dummy; insmod /dev/null')
    lines = out.splitlines()
    assert lines[0].startswith("-1 ") and lines[1].startswith("-1 "), out
    assert (modules.read_text() if modules.exists() else None) == lsmod


def test_host_sysctls_and_clock_unchanged(sandbox):
    knobs = {
        "/proc/sys/vm/swappiness": None,
        "/proc/sys/kernel/pid_max": None,
        "/proc/sys/net/ipv4/ip_forward": None,
        "/proc/sys/kernel/randomize_va_space": None,
        "/proc/sys/fs/file-max": None,
    }
    for k in knobs:
        knobs[k] = Path(k).read_text()
    host_name = socket.gethostname()
    host_before = time.time()
    def other(k: str, v: str) -> int:
        n = int(v.split()[0])
        return n // 2 + 1 if n > 2 else 1 - min(n, 1)

    writes = "; ".join(
        f"echo {other(k, v)} > {k}; sysctl -w {k[10:].replace('/', '.')}={other(k, v)}"
        for k, v in knobs.items()
    )
    # The clock: date(1), settimeofday(2) and clock_settime(2) with a date in 2001.
    clock = (
        "date -s '2001-01-01 00:00:00'; hwclock --set --date 2001-01-01; "
        "python3 -c \"import ctypes,struct; l=ctypes.CDLL(None,use_errno=True); "
        "t=struct.pack('qq',978307200,0); print('settime', l.clock_settime(0,t), "
        "l.settimeofday(t,None), l.adjtimex(ctypes.create_string_buffer(208)) )\""
    )
    _, out = sh(sandbox, f"{writes}; {clock}; hostname evil-host; sysctl kernel.hostname=evil-host")
    for k, v in knobs.items():
        assert Path(k).read_text() == v, f"{k} changed on the host: {out}"
    assert socket.gethostname() == host_name
    assert time.time() >= host_before, "host clock went backwards"
    assert time.gmtime().tm_year > 2001
    # Inside, the clock is the host's: it was not changed there either.
    assert int(sh(sandbox, "date +%Y")[1]) > 2001


# --- limits -----------------------------------------------------------------------------------


def test_fork_bomb_contained(arca, sandbox, sandbox_b, runtime):
    name = arca.handed_out()[sandbox.sandbox_id]  # its cgroups' name on the host
    pids_max = arca.cgroup_file(sandbox.sandbox_id, "pids.max")
    assert pids_max is not None, "no pids cgroup for the sandbox"
    limit = int(pids_max.read_text())
    events = pids_max.with_name("pids.events")

    def limit_hit_or_ended():
        try:
            return int(events.read_text().split()[-1]) > 0
        except FileNotFoundError:
            # gVisor's tasks are not host processes: the bomb grows runsc's memory until the
            # sandbox's memory limit ends the whole sandbox (its cgroups go with it).
            return runtime != "ns"

    sandbox.commands.run("bomb() { bomb | bomb & }; bomb", background=True, timeout=0)
    wait_until(limit_hit_or_ended, "the fork bomb hitting a limit", limit_s=90, every_s=0.5)
    current = pids_max.with_name("pids.current")
    if current.exists():
        assert int(current.read_text()) <= limit
    # The host, the api and the other sandbox stay responsive.
    assert subprocess.run(["true"], timeout=30).returncode == 0
    assert arca.api("GET", "/health").status == 200
    assert sandbox_b.commands.run("echo fine", timeout=60).stdout == "fine\n"
    # And the bombed sandbox can be killed, with all its processes (or has ended already).
    assert Sandbox.kill(sandbox.sandbox_id) or runtime != "ns"
    wait_until(
        lambda: name not in {d.name for d in arca.cgroup_dirs()},
        "the bombed sandbox's cgroups removed",
        limit_s=60,
    )
    wait_until(
        lambda: not [p for p in arca.cgroup_processes() if f"/{name}" in _cgroup_of(p)],
        "the bombed sandbox's processes gone",
        limit_s=60,
    )


def _cgroup_of(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cgroup").read_text()
    except OSError:
        return ""


def test_oom_stays_inside(arca, sandbox, sandbox_b, runtime):
    r = arca.api("GET", f"/sandboxes/{sandbox.sandbox_id}").json()
    mem_mb = r["memoryMB"]
    # Touch three times the sandbox's memory.
    try:
        rc, out = sh(
            sandbox,
            f"python3 -c 'b = bytearray({3 * mem_mb} * 1024 * 1024); print(\"allocated\")'",
            user="user",
            timeout=120,
        )
        assert rc != 0 and "allocated" not in out, out
    except SandboxException:
        # Under gVisor the memory limit holds runsc itself: the whole sandbox ends.
        assert runtime != "ns"
    assert arca.proc.poll() is None, "arca up died"
    assert sandbox_b.commands.run("echo fine").stdout == "fine\n"
    try:
        # envd survived the OOM kill of the memory hog: the sandbox goes on.
        assert sandbox.commands.run("echo survived").stdout == "survived\n"
    except Exception:
        # Or the sandbox ended alone: then it is gone from the api.
        wait_until(
            lambda: _gone(sandbox.sandbox_id), "the ended sandbox gone from the api", limit_s=30
        )


def _gone(sandbox_id: str) -> bool:
    try:
        Sandbox.get_info(sandbox_id)
        return False
    except NotFoundException:
        return True


def test_disk_limit(arca, sandbox):
    disk_mb = arca.api("GET", f"/sandboxes/{sandbox.sandbox_id}").json()["diskSizeMB"]
    count = disk_mb + 256
    rc, out = sh(
        sandbox,
        f"dd if=/dev/zero of=/home/user/fill bs=1M count={count} conv=fsync status=none; "
        "echo rc=$?; stat -c %s /home/user/fill",
        user="user",
        timeout=240,
    )
    size = int(out.split()[-1])
    sh(sandbox, "rm -f /home/user/fill")
    if size >= count * 1024 * 1024:
        pytest.skip(
            f"diskSizeMB ({disk_mb} MiB) is not enforced yet: a {count} MiB write succeeded"
        )
    assert "rc=0" not in out, out
    assert size <= disk_mb * 1024 * 1024, out
    # Freeing the space makes the sandbox usable again.
    assert sandbox.commands.run("echo ok > /home/user/after && cat /home/user/after").stdout == "ok\n"
