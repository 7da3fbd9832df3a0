"""A real container registry on 127.0.0.1 for template tests: Debian's `docker-registry`
(distribution v2) started on a free port, and a small pusher that builds test images from the
host's static busybox with our own code (blob uploads and a manifest PUT, as any client does).

Only 127.0.0.1 is ever contacted.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import shutil
import socket
import subprocess
import tarfile
import tempfile
import time
import urllib.request
from pathlib import Path

REGISTRY_BIN = Path("/usr/bin/docker-registry")
BUSYBOX = Path("/bin/busybox")
APPLETS = ["sh", "ls", "cat", "echo", "test", "id", "sleep", "env", "pwd"]


def available() -> str | None:
    """Why a registry test cannot run here, or None."""
    if not REGISTRY_BIN.is_file():
        return "docker-registry is not installed (scripts/setup.sh installs it)"
    if not BUSYBOX.is_file():
        return "busybox-static is not installed (scripts/setup.sh installs it)"
    return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Registry:
    """One docker-registry process with its storage in a temp dir; stop() kills it by pid."""

    def __init__(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="arca-e2e-registry-"))
        self.port = free_port()
        self.host = f"127.0.0.1:{self.port}"
        config = self.dir / "config.yml"
        config.write_text(
            "version: 0.1\nlog:\n  level: error\n  accesslog:\n    disabled: true\n"
            f"storage:\n  filesystem:\n    rootdirectory: {self.dir / 'data'}\n"
            f"http:\n  addr: {self.host}\n  secret: arca-e2e\n"
        )
        self.proc = subprocess.Popen(
            [str(REGISTRY_BIN), "serve", str(config)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 20
        while True:
            try:
                urllib.request.urlopen(f"http://{self.host}/v2/", timeout=1).read()
                break
            except Exception:  # noqa: BLE001 - not up yet
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    self.stop()
                    raise RuntimeError("docker-registry did not start")
                time.sleep(0.05)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        shutil.rmtree(self.dir, ignore_errors=True)

    def _blob(self, repo: str, data: bytes) -> str:
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        req = urllib.request.Request(
            f"http://{self.host}/v2/{repo}/blobs/uploads/", method="POST", data=b""
        )
        with urllib.request.urlopen(req) as r:
            location = r.headers["Location"]
        if location.startswith("/"):
            location = f"http://{self.host}{location}"
        sep = "&" if "?" in location else "?"
        req = urllib.request.Request(
            f"{location}{sep}digest={digest}",
            method="PUT",
            data=data,
            headers={"Content-Type": "application/octet-stream"},
        )
        urllib.request.urlopen(req).read()
        return digest

    def push(self, repo: str, tag: str, layers: list[bytes], config: dict) -> str:
        """Pushes an image of gzip-compressed layer tars; returns the manifest digest."""
        diff_ids, descriptors = [], []
        for layer in layers:
            diff_ids.append("sha256:" + hashlib.sha256(gzip.decompress(layer)).hexdigest())
            descriptors.append(
                {
                    "mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
                    "digest": self._blob(repo, layer),
                    "size": len(layer),
                }
            )
        cfg = json.dumps(
            {
                "architecture": "amd64",
                "os": "linux",
                "config": config,
                "rootfs": {"type": "layers", "diff_ids": diff_ids},
            }
        ).encode()
        manifest = json.dumps(
            {
                "schemaVersion": 2,
                "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "config": {
                    "mediaType": "application/vnd.oci.image.config.v1+json",
                    "digest": self._blob(repo, cfg),
                    "size": len(cfg),
                },
                "layers": descriptors,
            }
        ).encode()
        req = urllib.request.Request(
            f"http://{self.host}/v2/{repo}/manifests/{tag}",
            method="PUT",
            data=manifest,
            headers={"Content-Type": "application/vnd.oci.image.manifest.v1+json"},
        )
        urllib.request.urlopen(req).read()
        return "sha256:" + hashlib.sha256(manifest).hexdigest()


def layer(files: dict[str, bytes | str | None], modes: dict[str, int] | None = None) -> bytes:
    """A gzip-compressed layer tar: path -> bytes (file), str (symlink target), None (dir).
    A name `.wh.<x>` is a whiteout of x."""
    modes = modes or {}
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for path, content in sorted(files.items()):
            info = tarfile.TarInfo(path)
            info.mtime = 0
            if content is None:
                info.type = tarfile.DIRTYPE
                info.mode = modes.get(path, 0o755)
                tar.addfile(info)
            elif isinstance(content, str):
                info.type = tarfile.SYMTYPE
                info.linkname = content
                tar.addfile(info)
            else:
                info.size = len(content)
                info.mode = modes.get(path, 0o644)
                tar.addfile(info, io.BytesIO(content))
    return gzip.compress(buf.getvalue(), mtime=0)


def busybox_layers() -> list[bytes]:
    """Two layers: busybox with a shell and accounts; then a file deleted (whiteout) and one
    added, so the result shows both layers were applied in order."""
    base: dict[str, bytes | str | None] = {
        "bin": None,
        "etc": None,
        "tmp": None,
        "root": None,
        "bin/busybox": BUSYBOX.read_bytes(),
        "etc/passwd": b"root:x:0:0:root:/root:/bin/sh\n",
        "etc/group": b"root:x:0:\n",
        "etc/removed-later": b"gone\n",
    }
    for applet in APPLETS:
        base[f"bin/{applet}"] = "busybox"
    top: dict[str, bytes | str | None] = {
        "etc": None,
        "etc/.wh.removed-later": b"",
        "etc/added-later": b"second layer\n",
    }
    return [
        layer(base, {"bin/busybox": 0o755, "tmp": 0o1777, "root": 0o700}),
        layer(top),
    ]
