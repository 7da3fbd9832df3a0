"""The isolation ladder (issue 8): sandboxes under gVisor (`gvisor`) and in a QEMU microVM
(`vm`, TCG on this kind of host) through the official SDK, chosen per create (the metadata key
`arca.runtime`) or per template (`LABEL arca.runtime=...`), and reported in get_info. The
isolation attempts of test_isolation.py run under `gvisor` there; the vm backend gets the
attacks that mean something for a guest kernel here."""

from __future__ import annotations

import os
import subprocess
import time
import urllib.request

import pytest
from e2b import CommandExitException, Sandbox, SandboxException

import harness
from conftest import create_sandbox, unique, wait_until
from test_isolation import HostServer, host_ipv4_addresses, probe_all


def sh(sbx, cmd: str, user: str = "root", timeout: float = 120) -> str:
    try:
        return sbx.commands.run("exec 2>&1; " + cmd, user=user, timeout=timeout).stdout
    except CommandExitException as e:
        return e.stdout


@pytest.mark.parametrize("runtime", ["gvisor", "vm"])
def test_sandbox_runs_under_the_runtime_asked_for(arca, runtime):
    sbx = create_sandbox(runtime, timeout=600, metadata={"owner": "e2e"})
    sid = sbx.sandbox_id
    try:
        # Reported where every SDK sees it, beside the caller's own metadata.
        info = Sandbox.get_info(sid)
        assert info.metadata == {"owner": "e2e", "arca.runtime": runtime}
        listed = {s["sandboxID"]: s for s in arca.list_sandboxes()}
        assert listed[sid]["metadata"]["arca.runtime"] == runtime

        # It really is that kernel: gVisor's own, or the guest's (not the host's).
        out = sh(sbx, "uname -r; dmesg | head -2")
        if runtime == "gvisor":
            assert "gVisor" in out, out
        else:
            assert os.uname().release not in out and "cloud-amd64" in out, out

        # Commands: user, exit codes, stdout and stderr apart.
        r = sbx.commands.run("id -un; echo to-stderr >&2", user="user")
        assert (r.stdout, r.stderr) == ("user\n", "to-stderr\n")
        with pytest.raises(CommandExitException) as e:
            sbx.commands.run("exit 7")
        assert e.value.exit_code == 7

        # Files both ways, binary, owned by the user who wrote them.
        data = os.urandom(256 * 1024) + bytes(range(256))
        sbx.files.write("/home/user/blob.bin", data, user="user")
        assert sbx.files.read("/home/user/blob.bin", format="bytes") == bytes(data)
        assert sh(sbx, "stat -c '%U %s' /home/user/blob.bin").strip() == f"user {len(data)}"
        sh(sbx, "echo made-inside > /tmp/inside.txt")
        assert sbx.files.read("/tmp/inside.txt") == "made-inside\n"

        # A port through the proxy (a VM's service listens on its own address).
        token = "served-" + unique()
        sh(sbx, f"mkdir -p /tmp/www && echo {token} > /tmp/www/index.html", user="user")
        sbx.commands.run(
            "cd /tmp/www && exec python3 -m http.server 8000 --bind 0.0.0.0",
            background=True,
            user="user",
        )
        # Host routing through the proxy on loopback (CONTRACT 1.7, recipe A).
        url = f"http://127.0.0.1:{arca.proxy_port}/index.html"
        host = sbx.get_host(8000)

        def served():
            req = urllib.request.Request(url, headers={"Host": host})
            try:
                with urllib.request.urlopen(req, timeout=5) as resp:
                    return token in resp.read().decode()
            except OSError:
                return False

        wait_until(served, "the sandbox's web server through the proxy", limit_s=60, every_s=0.5)

        # Pause keeps processes and files; resume brings them back.
        sbx.commands.run("sleep 3000", background=True)
        assert "sleep 3000" in sh(sbx, "ps -eo args")
        sbx.pause()
        assert Sandbox.get_info(sid).state == "paused"
        back = Sandbox.connect(sid)
        assert Sandbox.get_info(sid).state == "running"
        assert "sleep 3000" in sh(back, "ps -eo args")
        assert back.files.read("/tmp/inside.txt") == "made-inside\n"
        wait_until(served, "the web server again after the resume", limit_s=60, every_s=0.5)
    finally:
        Sandbox.kill(sid)
    # Killed: gone from the api, and nothing of it runs on the host.
    assert sid not in {s["sandboxID"] for s in arca.list_sandboxes()}
    wait_until(lambda: sid not in arca.handed_out(), "the sandbox's host resources freed", limit_s=30)


def test_unknown_or_conflicting_runtime_is_a_clear_400(arca):
    with pytest.raises(SandboxException) as e:
        Sandbox.create(metadata={"arca.runtime": "firecracker"}, timeout=30)
    msg = str(e.value)
    assert "400" in msg and "unknown runtime 'firecracker'" in msg and "ns, gvisor, vm" in msg, msg
    r = arca.api(
        "POST",
        "/sandboxes",
        {"templateID": "base", "runtime": "gvisor", "metadata": {"arca.runtime": "vm"}},
    )
    assert r.status == 400 and "disagree" in r.json()["message"], r.json()
    # Nothing was made.
    assert arca.list_sandboxes() == [] or all(
        s["metadata"].get("arca.runtime") != "firecracker" for s in arca.list_sandboxes()
    )


def test_template_label_chooses_the_runtime_and_a_create_can_override_it(arca, tmp_path):
    (tmp_path / "Dockerfile").write_text(
        "FROM e2bdev/base\nLABEL arca.runtime=gvisor\nRUN echo labelled > /opt/label.txt\n"
    )
    name = "rt-" + unique()
    env = {**os.environ, "ARCA_HOME": str(arca.home)}
    r = subprocess.run(
        [str(harness.arca_bin()), "template", "build", str(tmp_path), "--name", name],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    sbx = create_sandbox("ns", template=name, timeout=120)
    try:
        assert Sandbox.get_info(sbx.sandbox_id).metadata["arca.runtime"] == "gvisor"
        assert "gVisor" in sh(sbx, "dmesg | head -1; cat /opt/label.txt")
        assert sh(sbx, "cat /opt/label.txt") == "labelled\n"
    finally:
        sbx.kill()
    # The create's own choice wins over the template's.
    sbx = create_sandbox("ns", template=name, timeout=120, metadata={"arca.runtime": "ns"})
    try:
        assert Sandbox.get_info(sbx.sandbox_id).metadata["arca.runtime"] == "ns"
        assert "gVisor" not in sh(sbx, "dmesg | head -1")
    finally:
        sbx.kill()
    # A label naming no runtime fails the build, saying so.
    (tmp_path / "Dockerfile").write_text("FROM e2bdev/base\nLABEL arca.runtime=kvm\n")
    r = subprocess.run(
        [str(harness.arca_bin()), "template", "build", str(tmp_path), "--name", name + "-bad"],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode != 0 and "unknown runtime 'kvm'" in r.stdout + r.stderr, r.stdout + r.stderr


def test_vm_guest_cannot_reach_the_host_or_its_files(arca):
    """The attacks of test_isolation.py that mean something for a guest kernel: host files,
    host services, the host's clock and sysctls; the guest's root can do anything to its own
    kernel, none of which reaches the host."""
    secret = f"/tmp/arca-e2e-vm-secret-{unique()}"
    token = "host-file-" + unique()
    with open(secret, "w") as f:
        f.write(token)
    sbx = create_sandbox("vm", timeout=600)
    try:
        out = sh(sbx, f"cat {secret}; grep -rs {token} /tmp /root /home /proc/1/root/tmp; "
                 "mount -t 9p host /mnt; mount -t virtiofs host /mnt; ls /dev | tr '\\n' ' '")
        assert token not in out
        # No shared file system device exists at all: only its own disk.
        assert "vda" in out and "vdb" not in out, out
        # The guest's root changes its own kernel freely...
        out = sh(sbx, "sysctl -w kernel.hostname=evil-vm; date -s '2001-01-01'; "
                 "echo 1 > /proc/sys/vm/drop_caches && echo dropped")
        assert "dropped" in out
        # ...and the host's stays as it was.
        assert subprocess.run(["hostname"], capture_output=True, text=True).stdout.strip() != "evil-vm"
        assert time.gmtime().tm_year > 2001
        # Host services on every host address (the guest's loopback is its own).
        addresses = [a for a in host_ipv4_addresses() if a != "127.0.0.1"]
        srv = HostServer(addresses)
        try:
            got = probe_all(sbx, [(a, srv.port) for a in addresses])
            assert not any(v.strip() for v in got.values()), got
        finally:
            srv.close()
    finally:
        sbx.kill()
        os.unlink(secret)


def _host_pids_with(marker: str) -> list[int]:
    """Host pids whose command line holds `marker`."""
    found = []
    for p in os.listdir("/proc"):
        if p.isdigit():
            try:
                with open(f"/proc/{p}/cmdline", "rb") as f:
                    if marker.encode() in f.read():
                        found.append(int(p))
            except OSError:
                pass
    return found


def _qemu_of(sandbox_id: str) -> list[int]:
    """The QEMU running the VM of a sandbox (its disk is in its directory)."""
    return _host_pids_with(f"/{sandbox_id}/disk.qcow2")


def _runsc_of(sandbox_id: str) -> list[int]:
    """runsc's processes of a sandbox (their state is in its directory)."""
    return _host_pids_with(f"/{sandbox_id}/runsc")


def test_vm_saved_to_a_file_survives_a_node_restart_and_resumes(arca):
    """A paused VM moved to disk (`--pause-to-disk-after 0`) is QEMU's migration saved to a
    file: QEMU ends and gives its memory back; after `kill -9` and a restart of `arca up`,
    connect loads the machine again, with its processes and what only its memory held."""
    os.environ.update(arca.restart("--pause-to-disk-after", "0"))
    sbx = create_sandbox("vm", timeout=900)
    sid = sbx.sandbox_id
    try:
        pid = sbx.commands.run("nohup sleep 1000 >/dev/null 2>&1 & echo $!").stdout.strip()
        sbx.files.write("/home/user/kept.txt", "on its disk")
        # /dev/shm is the guest's memory: only a saved machine brings it back.
        sh(sbx, "head -c 2000000 /dev/urandom > /dev/shm/in-memory")
        digest = sh(sbx, "md5sum < /dev/shm/in-memory")
        assert _qemu_of(sid)
        assert sbx.pause() is True
        wait_until(lambda: _qemu_of(sid) == [], "QEMU to end once the VM is saved", limit_s=180)
        saved = list((arca.home / "sandboxes").glob(f"{sid}/checkpoint/vm.state"))
        assert saved and saved[0].stat().st_size > 0, "no saved machine"
        info = arca.api("GET", f"/sandboxes/{sid}").json()
        assert (info["state"], info.get("pauseMode")) == ("paused", "full"), info
        arca.kill9()
        os.environ.update(arca.start())
        assert Sandbox.get_info(sid).state == "paused"
        again = Sandbox.connect(sid, timeout=300)
        assert f"{pid} " in sh(again, "ps -eo pid,args | grep 'sleep 1000'")
        assert sh(again, "md5sum < /dev/shm/in-memory") == digest
        assert again.files.read("/home/user/kept.txt") == "on its disk"
        assert "checkpoint" not in {p.name for p in (arca.home / "sandboxes" / sid).iterdir()}
    finally:
        Sandbox.kill(sid)
        os.environ.update(arca.restart())


def test_gvisor_moved_to_disk_comes_back_on_its_files(arca):
    """runsc cannot checkpoint a sandbox on the host network: a gVisor sandbox moved to disk
    keeps its files (every change synced out of gVisor's caches first), ends runsc, and a
    connect boots it again under gVisor in the same directory."""
    os.environ.update(arca.restart("--pause-to-disk-after", "0"))
    sbx = create_sandbox("gvisor", timeout=600)
    sid = sbx.sandbox_id
    try:
        sbx.files.write("/home/user/kept.txt", "kept on disk")
        sh(sbx, "mkdir /home/user/d && mv /home/user/kept.txt /home/user/d/moved.txt", user="user")
        assert _runsc_of(sid)
        assert sbx.pause() is True
        wait_until(lambda: _runsc_of(sid) == [], "runsc to end once the sandbox is on disk", limit_s=60)
        again = Sandbox.connect(sid, timeout=120)
        assert again.files.read("/home/user/d/moved.txt") == "kept on disk"
        assert "gVisor" in sh(again, "dmesg | head -1")
        assert Sandbox.get_info(sid).metadata["arca.runtime"] == "gvisor"
        # And again: a second move to disk and back.
        assert again.pause() is True
        wait_until(lambda: _runsc_of(sid) == [], "runsc to end the second time", limit_s=60)
        third = Sandbox.connect(sid, timeout=120)
        assert third.files.read("/home/user/d/moved.txt") == "kept on disk"
    finally:
        Sandbox.kill(sid)
        os.environ.update(arca.restart())


def test_gvisor_snapshot_keeps_its_files_and_its_runtime(arca):
    if not hasattr(Sandbox, "create_snapshot"):
        pytest.skip("this SDK version has no snapshots")
    src = create_sandbox("gvisor", timeout=300)
    made = []
    try:
        src.files.write("/home/user/a.txt", "in the snapshot")
        sh(src, "mv /home/user/a.txt /home/user/b.txt && mkdir -p /home/user/dir/sub", user="user")
        snap = src.create_snapshot()
        s = Sandbox.create(snap.snapshot_id, timeout=300)
        made.append(s)
        assert s.files.read("/home/user/b.txt") == "in the snapshot"
        assert sh(s, "test -d /home/user/dir/sub && echo yes").strip() == "yes"
        # The snapshot runs under what its source ran under, not the template's default.
        assert Sandbox.get_info(s.sandbox_id).metadata["arca.runtime"] == "gvisor"
        assert "gVisor" in sh(s, "dmesg | head -1")
    finally:
        for s in made:
            s.kill()
        src.kill()
