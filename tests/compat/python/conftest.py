"""Shared fixtures: one arca-envd per test session, driven through the official `e2b` SDK.

The SDK runs in debug mode (`E2B_DEBUG=true`), where `Sandbox.create()` makes no API call and
every sandbox maps to `E2B_SANDBOX_URL`, i.e. straight to our envd (CONTRACT.md 1.3).

Environment:
  ARCA_ENVD_BIN   envd binary to test (default: the musl release build, else the debug build)
  ARCA_ENVD_PORT  port of the shared instance (default 29999); the access-token module uses
                  ARCA_ENVD_PORT + 1
"""

from __future__ import annotations

import json
import os
import subprocess
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[3]
RUN_ENVD = REPO / "tests" / "compat" / "run-envd.sh"
STOP_ENVD = REPO / "tests" / "compat" / "stop-envd.sh"

PORT = int(os.environ.get("ARCA_ENVD_PORT", "29999"))
BASE_URL = f"http://127.0.0.1:{PORT}"

# Read by the SDK whenever a sandbox object is built; set before any test runs.
os.environ["E2B_DEBUG"] = "true"
os.environ["E2B_SANDBOX_URL"] = BASE_URL
os.environ.setdefault("E2B_API_KEY", "e2b_" + "0123456789abcdef" * 2 + "01234567")

# What the shared instance is told through /init, like an orchestrator would for `base`.
SANDBOX_ENV = {"ARCA_SANDBOX_WIDE": "from-init", "ARCA_OVERRIDDEN": "from-init"}
INIT_BODY = {
    "defaultUser": "user",
    "defaultWorkdir": "/home/user",
    "envVars": SANDBOX_ENV,
}


def envd_binary() -> str:
    explicit = os.environ.get("ARCA_ENVD_BIN")
    if explicit:
        return explicit
    for rel in (
        "target/x86_64-unknown-linux-musl/release/arca-envd",
        "target/debug/arca-envd",
    ):
        if (REPO / rel).is_file():
            return str(REPO / rel)
    raise RuntimeError("no arca-envd binary: set ARCA_ENVD_BIN or build it first")


def start_envd(port: int) -> int:
    """Start envd through run-envd.sh on `port`; return its pid once /health answers 204."""
    out = subprocess.run(
        [str(RUN_ENVD), envd_binary(), str(port)],
        check=True,
        capture_output=True,
        text=True,
        timeout=60,
    )
    return int(out.stdout.strip().splitlines()[-1])


def stop_envd(pid: int) -> None:
    subprocess.run([str(STOP_ENVD), str(pid)], check=True, timeout=60)


def http(
    method: str,
    url: str,
    body: bytes | None = None,
    headers: dict[str, str] | None = None,
) -> tuple[int, dict[str, str], bytes]:
    """Plain HTTP request; returns (status, headers, body) also for error statuses."""
    req = urllib.request.Request(url, data=body, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.status, dict(resp.headers), resp.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()


def post_init(base_url: str, body: dict) -> None:
    status, headers, _ = http(
        "POST",
        f"{base_url}/init",
        json.dumps(body).encode(),
        {"Content-Type": "application/json"},
    )
    assert status == 204, f"/init answered {status}"


@pytest.fixture(scope="session", autouse=True)
def envd() -> str:
    pid = start_envd(PORT)
    try:
        post_init(BASE_URL, INIT_BODY)
        yield BASE_URL
    finally:
        stop_envd(pid)


@pytest.fixture
def sandbox(envd):
    from e2b import Sandbox

    sbx = Sandbox.create()
    yield sbx
    sbx.kill()


@pytest.fixture
def workdir(sandbox) -> str:
    """A fresh directory under /home/user (owned by `user`), removed afterwards."""
    path = f"/home/user/t-{uuid.uuid4().hex[:10]}"
    assert sandbox.files.make_dir(path) is True
    yield path
    sandbox.files.remove(path)


def sdk_version() -> tuple[int, ...]:
    import importlib.metadata

    return tuple(int(x) for x in importlib.metadata.version("e2b").split(".")[:3])
