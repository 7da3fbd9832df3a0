"""Starts and stops one `arca up` for the end-to-end suites, and counts what it leaves on the host.

Builds nothing: it runs the binaries named by ARCA_BIN (default target/debug/arca) and
ARCA_ENVD_BIN (default: the musl release build). Each run gets a fresh ARCA_HOME in a temp dir,
random ports on 127.0.0.1, a random network prefix (`ate` + 3 letters + `x`: never `arca*`, so
a developer's `arca up` is never touched) and a free 10.x.0.0/16 sandbox range.

The `base` template is built once by `arca up` itself into a cache home (ARCA_E2E_CACHE,
default /var/cache/arca-test/home) and every run's home links the cache's base layer and
copies its build record.

Used by conftest.py (pytest) and as a wrapper for other runners:

    python harness.py run -- node --test sdk.test.mjs

starts `arca up`, exports E2B_API_URL, E2B_SANDBOX_URL, E2B_API_KEY, E2B_DOMAIN (recipe A,
CONTRACT.md 1.7) and ARCA_HOME to the command, and afterwards kills every sandbox, stops `arca up`, removes
what it leaves by design (warm network slots, the nft table, empty cgroup parents) and fails
if anything else is left.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import signal
import socket
import string
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
DEFAULT_CACHE = "/var/cache/arca-test/home"
# Network slots and booted sandboxes kept ready; small, so the leak counts are easy to read.
WARM_SLOTS = 2
WARM_POOL = 2
# Disk of one template build step, MiB.
BUILD_DISK_MB = 768
# The first start builds the base template with debootstrap.
FIRST_START_LIMIT_S = 900
START_LIMIT_S = 60


def arca_bin() -> Path:
    return Path(os.environ.get("ARCA_BIN") or REPO / "target/debug/arca")


def envd_bin() -> Path:
    return Path(
        os.environ.get("ARCA_ENVD_BIN")
        or REPO / "target/x86_64-unknown-linux-musl/release/arca-envd"
    )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def random_prefix() -> str:
    return "ate" + "".join(random.choices(string.ascii_lowercase, k=3)) + "x"


def free_cidr() -> str:
    """A 10.x.0.0/16 that no host address or route uses."""
    used = subprocess.run(
        ["sh", "-c", "ip -4 -o addr; ip -4 route"], capture_output=True, text=True
    ).stdout
    taken = {int(m) for m in re.findall(r"\b10\.(\d+)\.", used)}
    choices = [x for x in range(200, 250) if x not in taken]
    return f"10.{random.choice(choices)}.0.0/16"


def run(*cmd: str) -> str:
    return subprocess.run(cmd, capture_output=True, text=True, check=False).stdout


@dataclass
class Response:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self):
        return json.loads(self.body) if self.body else None


@dataclass
class Arca:
    """One `arca up`: its home, ports and names, and the process while it runs."""

    home: Path
    log: Path
    prefix: str = field(default_factory=random_prefix)
    cidr: str = field(default_factory=free_cidr)
    api_port: int = field(default_factory=free_port)
    proxy_port: int = field(default_factory=free_port)
    # The firewall's verdict log group (one reader per group on a host).
    nflog_group: int = field(default_factory=lambda: random.randint(20000, 60000))
    proc: subprocess.Popen | None = None
    env: dict[str, str] = field(default_factory=dict)
    # More `arca up` flags for the next start (a test that needs other settings restarts;
    # `harness.py run` takes them from ARCA_UP_ARGS, split on spaces).
    extra_args: list[str] = field(default_factory=list)

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.api_port}"

    @property
    def key(self) -> str:
        return self.env["E2B_API_KEY"]

    # --- process -------------------------------------------------------------------------

    def start(self, limit_s: float = START_LIMIT_S) -> dict[str, str]:
        """Starts `arca up` and waits for the four `export` lines it prints when ready."""
        assert self.proc is None or self.proc.poll() is not None, "already running"
        self.home.mkdir(parents=True, exist_ok=True)
        out = self.log.with_suffix(".stdout")
        cmd = [
            str(arca_bin()), "up",
            "--home", str(self.home),
            "--envd", str(envd_bin()),
            "--api-listen", f"127.0.0.1:{self.api_port}",
            "--proxy-listen", f"127.0.0.1:{self.proxy_port}",
            "--net-prefix", self.prefix,
            "--sandbox-cidr", self.cidr,
            "--warm-slots", str(WARM_SLOTS),
            # Free ports and a group of its own: another Arca may run on this host.
            "--egress-ports", "0,0,0",
            "--nflog-group", str(self.nflog_group),
            "--warm-pool", str(WARM_POOL),
            # Template tests pull from a registry the test starts on 127.0.0.1.
            "--insecure-registry", "127.0.0.1",
            # Small, so that the test of the limit writes little.
            "--build-disk-mb", str(BUILD_DISK_MB),
            *self.extra_args,
        ]  # fmt: skip
        with open(self.log, "ab") as err, open(out, "wb") as so:
            err.write(f"\n=== {' '.join(cmd)}\n".encode())
            err.flush()
            env = {k: v for k, v in os.environ.items() if not k.startswith("E2B_")}
            self.proc = subprocess.Popen(cmd, stdout=so, stderr=err, env=env)
        deadline = time.monotonic() + limit_s
        while True:
            lines = re.findall(r"^export (E2B_\w+)=(.*)$", out.read_text(), re.M)
            if len(lines) == 4:
                self.env = dict(lines)
                return self.env
            if self.proc.poll() is not None:
                raise RuntimeError(f"arca up exited with {self.proc.returncode}:\n{self.tail()}")
            if time.monotonic() > deadline:
                self.proc.kill()
                raise RuntimeError(f"arca up not ready within {limit_s} s:\n{self.tail()}")
            time.sleep(0.1)

    def stop(self) -> None:
        """SIGTERM, as a user stops it; sandboxes keep running by design."""
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def restart(self, *extra_args: str) -> dict[str, str]:
        """Stops `arca up` and starts it again with these extra flags (none: the defaults)."""
        self.stop()
        self.extra_args = list(extra_args)
        return self.start()

    def kill9(self) -> None:
        assert self.proc and self.proc.poll() is None, "arca up is not running"
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()

    def tail(self, n: int = 40) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    # --- REST ----------------------------------------------------------------------------

    def api(
        self,
        method: str,
        path: str,
        body: object = None,
        *,
        raw: bytes | None = None,
        key: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> Response:
        """A request to the REST API with the stdlib; error statuses are returned, not raised."""
        data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
        h = {"X-API-Key": key if key is not None else self.key}
        if data is not None:
            h["Content-Type"] = "application/json"
        h.update(headers or {})
        req = urllib.request.Request(self.api_url + path, data=data, method=method, headers=h)
        try:
            with urllib.request.urlopen(req, timeout=60) as r:
                return Response(r.status, dict(r.headers), r.read())
        except urllib.error.HTTPError as e:
            return Response(e.code, dict(e.headers), e.read())

    def list_sandboxes(self) -> list[dict]:
        """Every sandbox of the team, through all pages of GET /v2/sandboxes."""
        items: list[dict] = []
        token = None
        for _ in range(1000):
            q = "?limit=100" + (f"&nextToken={urllib.request.quote(token)}" if token else "")
            r = self.api("GET", "/v2/sandboxes" + q)
            assert r.status == 200, (r.status, r.body)
            items += r.json()
            token = r.headers.get("X-Next-Token") or r.headers.get("x-next-token")
            if not token:
                return items
        raise RuntimeError("list paging does not end")

    def kill_all(self) -> None:
        for s in self.list_sandboxes():
            self.api("DELETE", f"/sandboxes/{s['sandboxID']}")

    # --- host state ----------------------------------------------------------------------

    def netns(self) -> list[str]:
        names = [line.split()[0] for line in run("ip", "netns", "list").splitlines() if line]
        return [n for n in names if re.fullmatch(rf"{self.prefix}-\d+", n)]

    def veths(self) -> list[str]:
        names = re.findall(r"^\d+: ([^:@]+)", run("ip", "-o", "link", "show"), re.M)
        return [n for n in names if re.fullmatch(rf"{self.prefix}\d+h", n)]

    def nft_table(self) -> bool:
        return f"table inet {self.prefix}" in run("nft", "list", "tables").splitlines()

    def cgroup_parents(self) -> list[Path]:
        return sorted(Path("/sys/fs/cgroup").glob(f"*/{self.prefix}")) + sorted(
            Path("/sys/fs/cgroup").glob(self.prefix)
        )

    def cgroup_dirs(self) -> list[Path]:
        """Sandbox cgroups: directories under this instance's cgroup parents."""
        return [d for p in self.cgroup_parents() for d in p.iterdir() if d.is_dir()]

    def cgroup_processes(self) -> list[int]:
        """Processes in a cgroup under this instance's prefix (sandbox processes)."""
        pids = []
        needle = f"/{self.prefix}/"
        for p in Path("/proc").iterdir():
            if not p.name.isdigit():
                continue
            try:
                if needle in (p / "cgroup").read_text():
                    pids.append(int(p.name))
            except OSError:
                pass
        return pids

    def cgroup_file(self, sandbox_id: str, name: str) -> Path | None:
        """A control file of a sandbox's cgroup (v1: the controller's hierarchy; v2: the
        unified one), or None when there is none."""
        dir_name = self.handed_out().get(sandbox_id)
        if dir_name is None:
            return None
        for pattern in (f"*/{self.prefix}/{dir_name}/{name}", f"{self.prefix}/{dir_name}/{name}"):
            for p in Path("/sys/fs/cgroup").glob(pattern):
                return p
        return None

    def mounts(self) -> list[str]:
        home = str(self.home)
        return [m for m in Path("/proc/mounts").read_text().splitlines() if home in m]

    def sandbox_files(self) -> list[Path]:
        d = self.home / "sandboxes"
        return sorted(d.rglob("*")) if d.is_dir() else []

    def sandbox_dirs(self) -> dict[str, dict | None]:
        """Every directory under `<home>/sandboxes`, with its state file (None if unreadable)."""
        d = self.home / "sandboxes"
        found = {}
        for p in sorted(d.iterdir()) if d.is_dir() else []:
            try:
                found[p.name] = json.loads((p / "state.json").read_text())
            except (OSError, ValueError):
                found[p.name] = None
        return found

    def handed_out(self) -> dict[str, str]:
        """Sandboxes the node handed out (a state file with a spec), as opposed to warm ones:
        sandbox id -> name of its directory and cgroups (a claimed warm sandbox keeps its
        warm name)."""
        return {
            st["spec"]["sandbox_id"]: n
            for n, st in self.sandbox_dirs().items()
            if st and st.get("spec")
        }

    def warm(self) -> set[str]:
        """Booted sandboxes waiting in the warm pool, or still booting: no spec yet."""
        return {n for n, st in self.sandbox_dirs().items() if st and not st.get("spec")}

    def loop_devices(self) -> list[str]:
        """Loop devices whose backing file is under this home."""
        found = []
        for f in Path("/sys/block").glob("loop*/loop/backing_file"):
            try:
                if str(self.home) in f.read_text():
                    found.append(f.parent.parent.name)
            except OSError:
                pass
        return found

    def node_sandboxes(self) -> set[str] | None:
        """Handed-out sandboxes as the host shows them: state directories with a spec, and
        the same names as cgroups (None while the two disagree)."""
        ids = self.handed_out()
        cgroups = {d.name for d in self.cgroup_dirs()} - self.warm()
        return set(ids) if set(ids.values()) == cgroups else None

    def counts(self) -> dict[str, int]:
        """What a user would count to see whether sandboxes leak."""
        return {
            "mounts": len(self.mounts()),
            "host_mount_table": len(Path("/proc/self/mountinfo").read_text().splitlines()),
            "netns": len(self.netns()),
            "veths": len(self.veths()),
            "cgroups": len(self.cgroup_dirs()),
            "processes": len(self.cgroup_processes()),
            "loop_devices": len(self.loop_devices()),
            "sandbox_dirs": len(list((self.home / "sandboxes").iterdir()))
            if (self.home / "sandboxes").is_dir()
            else 0,
        }

    def clean_host(self) -> list[str]:
        """After `stop()`: removes what a stopped `arca up` leaves by design (warm network slots,
        booted warm sandboxes, the nft table, empty cgroup parents) and anything else it finds.
        Returns a description of what was found beyond the by-design leftovers."""
        assert self.proc is None or self.proc.poll() is not None, "stop arca up first"
        found = []
        warm = self.warm()
        for name in self.handed_out():
            found.append(f"sandbox {name} still on the host")
        for _ in range(50):
            pids = self.cgroup_processes()
            if not pids:
                break
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            time.sleep(0.1)
        for pid in self.cgroup_processes():
            found.append(f"process {pid} cannot be killed")
        for d in self.cgroup_dirs():
            if d.name not in warm:
                found.append(f"cgroup {d}")
            for sub in sorted(d.rglob("*"), reverse=True) + [d]:
                if sub.is_dir():
                    for _ in range(20):
                        try:
                            sub.rmdir()
                            break
                        except OSError:
                            time.sleep(0.1)
        for p in self.cgroup_parents():
            try:
                p.rmdir()
            except OSError as e:
                found.append(f"cgroup {p}: {e}")
        for v in self.veths():
            run("ip", "link", "del", v)
        for n in self.netns():
            run("ip", "netns", "del", n)
        if self.nft_table():
            run("nft", "delete", "table", "inet", self.prefix)
        for m in self.mounts():
            found.append(f"mount {m}")
        for dev in self.loop_devices():
            found.append(f"loop device {dev}")
            run("losetup", "-d", f"/dev/{dev}")
        found += remote_host_leftovers()
        if not self.mounts():
            for name in warm:
                shutil.rmtree(self.home / "sandboxes" / name, ignore_errors=True)
        # Re-check: everything must be gone now.
        for what, left in [
            ("netns", self.netns()),
            ("veth", self.veths()),
            ("cgroup", self.cgroup_parents()),
            ("nft table", [self.prefix] if self.nft_table() else []),
            ("loop device", self.loop_devices()),
        ]:
            found += [f"{what} {x} could not be removed" for x in left]
        return found


def remote_host_leftovers() -> list[str]:
    """Fake remote networks (remote_host.py: netns and veth `rmt*`, a server process) that this
    process made and that are still on the host: removed, and reported as leaks."""
    module = sys.modules.get("remote_host")
    return module.leftovers() if module is not None else []


# Where a home keeps the base template (crates/node/src/templates.rs, crates/image store).
BASE_LAYER = "debian-bookworm-base-v1"
BASE_BUILD = "00000000-0000-4000-8000-000000000000"


def base_layer_dir(home: Path) -> Path:
    return home / "layers" / "layers" / BASE_LAYER


def base_record(home: Path) -> Path:
    return home / "templates" / "base" / f"{BASE_BUILD}.json"


def link_base(cache: Path, home: Path) -> None:
    """Gives `home` the cache's base template without copying it."""
    (home / "layers" / "layers").mkdir(parents=True, exist_ok=True)
    base_layer_dir(home).symlink_to(base_layer_dir(cache))
    base_record(home).parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(base_record(cache), base_record(home))


def ensure_template_cache(cache: Path) -> None:
    """Builds the base template into the cache home through `arca up`, once (a cache of an
    older layout is moved into the layer store by the same start)."""
    if (base_layer_dir(cache) / "diff").is_dir() and base_record(cache).is_file():
        return
    cache.mkdir(parents=True, exist_ok=True)
    builder = Arca(home=cache, log=cache / "arca-up-build.log")
    print(f"[e2e] building the base template in {cache} (once; a few minutes)", file=sys.stderr)
    try:
        builder.start(limit_s=FIRST_START_LIMIT_S)
        builder.kill_all()
    finally:
        builder.stop()
        builder.clean_host()


def new_instance() -> Arca:
    """A fresh home linked to the cached template; not started."""
    for b, what in [(arca_bin(), "ARCA_BIN"), (envd_bin(), "ARCA_ENVD_BIN")]:
        if not b.is_file():
            raise RuntimeError(f"{b} not found: build it or set {what}")
    cache = Path(os.environ.get("ARCA_E2E_CACHE") or DEFAULT_CACHE)
    ensure_template_cache(cache)
    work = Path(tempfile.mkdtemp(prefix="arca-e2e-"))
    home = work / "home"
    link_base(cache, home)
    return Arca(home=home, log=work / "arca-up.log")


def finish(arca: Arca) -> list[str]:
    """Kills every sandbox through the API, stops `arca up`, cleans and checks the host.
    Returns the leftovers (empty when clean); removes the temp home when clean."""
    problems: list[str] = []
    if arca.proc and arca.proc.poll() is not None:
        problems.append(f"arca up had exited by itself with {arca.proc.returncode}")
    if arca.proc and arca.proc.poll() is None:
        try:
            arca.kill_all()
        except Exception as e:  # noqa: BLE001 - report, then clean up anyway
            problems.append(f"killing the sandboxes through the API failed: {e}")
        # Give teardowns still running in the background a moment.
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and arca.handed_out():
            time.sleep(0.1)
    arca.stop()
    problems += arca.clean_host()
    problems += [f"file {f}" for f in arca.sandbox_files()]
    if not problems:
        shutil.rmtree(arca.home.parent, ignore_errors=True)
    return problems


def _interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def stop_on_sigterm() -> None:
    """Turns SIGTERM (a suite timeout) into KeyboardInterrupt, so cleanup still runs."""
    signal.signal(signal.SIGTERM, _interrupt)


def main(argv: list[str]) -> int:
    if argv[1:] == ["cache"]:
        # Build (once) and print the cached base template for other suites.
        cache = Path(os.environ.get("ARCA_E2E_CACHE") or DEFAULT_CACHE)
        ensure_template_cache(cache)
        print(cache)
        return 0
    if len(argv) < 3 or argv[1] != "run" or "--" not in argv:
        print(__doc__, file=sys.stderr)
        return 2
    cmd = argv[argv.index("--") + 1 :]
    stop_on_sigterm()
    arca = new_instance()
    arca.extra_args = os.environ.get("ARCA_UP_ARGS", "").split()
    rc = 1
    try:
        env = arca.start()
        run_env = {**os.environ, **env, "ARCA_HOME": str(arca.home)}
        rc = subprocess.run(cmd, env=run_env, check=False).returncode
    finally:
        problems = finish(arca)
        if rc != 0:
            print(f"--- last lines of {arca.log}\n{arca.tail()}", file=sys.stderr)
        for p in problems:
            print(f"[e2e] left behind: {p}", file=sys.stderr)
    return rc if rc != 0 else (1 if problems else 0)


if __name__ == "__main__":
    sys.exit(main(sys.argv))
