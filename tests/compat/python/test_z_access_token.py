"""Access-token enforcement and v1 file URL signatures (CONTRACT 3.5, 3.6), with raw HTTP.

Runs its own envd instance (port ARCA_ENVD_PORT + 1), because once a token is set through
/init the debug-mode SDK (which sends no token) can no longer talk to it.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import secrets
import time
import urllib.parse
import uuid

import pytest
from e2b import AuthenticationException, Sandbox, get_signature

from conftest import PORT, http, start_envd, stop_envd

AUTH_PORT = PORT + 1
AUTH_URL = f"http://127.0.0.1:{AUTH_PORT}"
TOKEN = secrets.token_hex(16)
WORKDIR = f"/home/user/auth-{uuid.uuid4().hex[:8]}"


def sign(path: str, operation: str, user: str, token: str, exp: int | None = None) -> str:
    raw = f"{path}:{operation}:{user}:{token}"
    if exp is not None:
        raw += f":{exp}"
    digest = hashlib.sha256(raw.encode()).digest()
    return "v1_" + base64.b64encode(digest).decode().rstrip("=")


def files_url(path: str, **extra) -> str:
    return f"{AUTH_URL}/files?" + urllib.parse.urlencode({"path": path, **extra})


def upload(url: str, content: bytes, headers: dict | None = None):
    return http("POST", url, content, {"Content-Type": "application/octet-stream", **(headers or {})})


def rpc(method: str, body: dict, headers: dict | None = None):
    return http(
        "POST",
        f"{AUTH_URL}/{method}",
        json.dumps(body).encode(),
        {"Content-Type": "application/json", "Connect-Protocol-Version": "1", **(headers or {})},
    )


@pytest.fixture(scope="module")
def secured():
    pid = start_envd(AUTH_PORT)
    try:
        # Before any /init: the SDK works without a token and the default user is root.
        sbx = Sandbox.create(sandbox_url=AUTH_URL)
        before = {
            "whoami": sbx.commands.run("whoami").stdout,
            "home": sbx.commands.run("echo $HOME").stdout,
        }
        status, headers, _ = http(
            "POST",
            f"{AUTH_URL}/init",
            json.dumps(
                {"accessToken": TOKEN, "defaultUser": "user", "defaultWorkdir": "/home/user"}
            ).encode(),
            {"Content-Type": "application/json"},
        )
        assert status == 204
        version = {k.lower(): v for k, v in headers.items()}.get("x-envd-version", "")
        yield {"before": before, "sandbox": sbx, "envd_version": version}
    finally:
        stop_envd(pid)


def test_default_user_before_init_is_root(secured):
    assert secured["before"] == {"whoami": "root\n", "home": "/root\n"}


def test_init_reports_envd_version(secured):
    assert re.fullmatch(r"\d+\.\d+\.\d+", secured["envd_version"]), secured["envd_version"]


def test_health_stays_open(secured):
    status, _, body = http("GET", f"{AUTH_URL}/health")
    assert (status, body) == (204, b"")


def test_rpc_without_token_is_401_json(secured):
    status, headers, body = rpc("process.Process/List", {})
    assert status == 401
    err = json.loads(body)
    assert err["code"] == 401
    assert isinstance(err.get("message"), str)


def test_rpc_with_wrong_token_is_401(secured):
    status, _, _ = rpc("process.Process/List", {}, {"X-Access-Token": TOKEN + "x"})
    assert status == 401


def test_rpc_with_token_works(secured):
    status, _, body = rpc("process.Process/List", {}, {"X-Access-Token": TOKEN})
    assert status == 200
    assert isinstance(json.loads(body), dict)


def test_sdk_without_token_gets_authentication_exception(secured):
    with pytest.raises(AuthenticationException):
        secured["sandbox"].commands.list()
    with pytest.raises(AuthenticationException):
        secured["sandbox"].files.list("/")


@pytest.mark.parametrize("route", ["/envs", "/metrics"])
def test_token_protected_get_routes(secured, route):
    assert http("GET", f"{AUTH_URL}{route}")[0] == 401
    status, _, body = http("GET", f"{AUTH_URL}{route}", headers={"X-Access-Token": TOKEN})
    assert status == 200
    assert isinstance(json.loads(body), dict)


def test_metrics_fields(secured):
    _, _, body = http("GET", f"{AUTH_URL}/metrics", headers={"X-Access-Token": TOKEN})
    m = json.loads(body)
    for key in ("ts", "cpu_count", "cpu_used_pct", "mem_total", "mem_used", "disk_used", "disk_total"):
        assert key in m, key
    assert m["cpu_count"] >= 1 and m["mem_total"] > 0 and m["disk_total"] > 0


def test_signature_matches_sdk(secured):
    sdk = get_signature("/a/b.txt", "read", "user", TOKEN, 60)
    assert sdk["signature"] == sign("/a/b.txt", "read", "user", TOKEN, sdk["expiration"])
    assert get_signature("/a/b.txt", "write", None, TOKEN)["signature"] == sign(
        "/a/b.txt", "write", "", TOKEN
    )


def test_signed_upload_and_download(secured):
    path = f"{WORKDIR}/signed.txt"
    url = files_url(path, signature=sign(path, "write", "", TOKEN))
    status, _, body = upload(url, b"signed content")
    assert status == 200, body
    assert json.loads(body)[0]["path"] == path

    url = files_url(path, signature=sign(path, "read", "", TOKEN))
    status, _, body = http("GET", url)
    assert (status, body) == (200, b"signed content")


def test_signed_with_username_and_expiration(secured):
    path = f"{WORKDIR}/signed-user.txt"
    exp = int(time.time()) + 300
    url = files_url(
        path,
        username="root",
        signature=sign(path, "write", "root", TOKEN, exp),
        signature_expiration=exp,
    )
    assert upload(url, b"as root")[0] == 200
    url = files_url(
        path,
        username="root",
        signature=sign(path, "read", "root", TOKEN, exp),
        signature_expiration=exp,
    )
    status, _, body = http("GET", url)
    assert (status, body) == (200, b"as root")
    # The signature covers the username: the same signature without it is rejected.
    url = files_url(path, signature=sign(path, "read", "root", TOKEN, exp), signature_expiration=exp)
    assert http("GET", url)[0] == 401


def test_expired_signature_is_401(secured):
    path = f"{WORKDIR}/expired.txt"
    exp = int(time.time()) - 10
    url = files_url(path, signature=sign(path, "write", "", TOKEN, exp), signature_expiration=exp)
    assert upload(url, b"x")[0] == 401
    url = files_url(path, signature=sign(path, "read", "", TOKEN, exp), signature_expiration=exp)
    assert http("GET", url)[0] == 401


def test_wrong_signatures_are_401(secured):
    path = f"{WORKDIR}/wrong.txt"
    assert upload(files_url(path, signature=sign(path, "write", "", "not-the-token")), b"x")[0] == 401
    # A read signature does not authorise a write, nor one for another path.
    assert upload(files_url(path, signature=sign(path, "read", "", TOKEN)), b"x")[0] == 401
    assert upload(files_url(path, signature=sign(path + "2", "write", "", TOKEN)), b"x")[0] == 401
    # Expiration not covered by the signature.
    exp = int(time.time()) + 300
    url = files_url(path, signature=sign(path, "write", "", TOKEN), signature_expiration=exp)
    assert upload(url, b"x")[0] == 401
    assert http("GET", files_url(path, signature="v1_garbage"))[0] == 401


def test_files_without_token_or_signature_is_401(secured):
    path = f"{WORKDIR}/unsigned.txt"
    assert upload(files_url(path), b"x")[0] == 401
    assert http("GET", files_url(path))[0] == 401


def test_files_with_token_header(secured):
    path = f"{WORKDIR}/header.txt"
    assert upload(files_url(path), b"via header", {"X-Access-Token": TOKEN})[0] == 200
    status, _, body = http("GET", files_url(path), headers={"X-Access-Token": TOKEN})
    assert (status, body) == (200, b"via header")
    # A wrong header is rejected even when the signature is valid.
    url = files_url(path, signature=sign(path, "read", "", TOKEN))
    assert http("GET", url, headers={"X-Access-Token": "wrong"})[0] == 401
