"""Bad input on the REST api (issue 3, CONTRACT.md 2.1-2.3): every refusal is an E2B error body
`{"code": <status>, "message": ...}` with the right status, and nothing is half-created."""

from __future__ import annotations

import json
import socket

import pytest

from conftest import unique, wait_until
from harness import Response

V2, V1 = "/v2/sandboxes", "/sandboxes"


def assert_error(r, *statuses: int):
    assert r.status in statuses, (r.status, r.body)
    assert r.headers.get("Content-Type", r.headers.get("content-type", "")).startswith(
        "application/json"
    ), r.headers
    body = json.loads(r.body)
    assert body["code"] == r.status, body
    assert isinstance(body["message"], str) and body["message"], body


def snapshot(arca) -> tuple[set[str], set[str] | None]:
    """Sandboxes as the api lists them and as the host shows them (state dirs, cgroups)."""
    return {s["sandboxID"] for s in arca.list_sandboxes()}, arca.node_sandboxes()


@pytest.fixture
def unchanged(arca):
    """Checks afterwards that nothing was created: the list, the node's files and cgroups are
    as before (taken once earlier teardowns have finished)."""
    before = wait_until(
        lambda: (s := snapshot(arca))[0] == s[1] and s, "a quiet node", limit_s=30
    )
    yield
    assert snapshot(arca) == before


@pytest.mark.parametrize("path", [V2, V1])
@pytest.mark.parametrize(
    "raw",
    [
        b'{"templateID": "base",',
        b"not json at all",
        b"",
        b"[]",
        b'{"templateID": 5}',
        b'{"timeout": 30}',
        b'{"templateID": "base", "metadata": {"k": 1}}',
        b'{"templateID": "base", "envVars": "A=B"}',
    ],
    ids=["truncated", "not-json", "empty", "array", "id-not-string", "no-template",
         "metadata-not-strings", "envs-not-map"],
)  # fmt: skip
def test_malformed_create(arca, unchanged, path, raw):
    assert_error(arca.api("POST", path, raw=raw), 400)


@pytest.mark.parametrize("path", [V2, V1])
def test_unknown_template(arca, unchanged, path):
    r = arca.api("POST", path, {"templateID": "no-such-template-" + unique(), "timeout": 30})
    assert_error(r, 404)


@pytest.mark.parametrize("path", [V2, V1])
@pytest.mark.parametrize("timeout", [-1, 0, 86_400 + 1, 10**12, 10**30, 1.5, "30"])
def test_bad_timeout(arca, unchanged, path, timeout):
    r = arca.api("POST", path, {"templateID": "base", "timeout": timeout})
    assert_error(r, 400)


def post_raw(arca, path: str, body: bytes) -> Response:
    """POST over a raw socket: a server may answer (413) and close before the whole body is
    sent, which urllib reports as a broken pipe instead of the answer."""
    with socket.create_connection(("127.0.0.1", arca.api_port), timeout=30) as s:
        s.sendall(
            f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nX-API-Key: {arca.key}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
            "Connection: close\r\n\r\n".encode()
        )
        try:
            s.sendall(body)
        except (BrokenPipeError, ConnectionResetError):
            pass
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    headers = dict(line.split(": ", 1) for line in lines[1:])
    return Response(int(lines[0].split()[1]), headers, rest)


def test_oversized_body(arca, unchanged):
    big = {"templateID": "base", "metadata": {"k": "x" * (8 << 20)}}
    assert_error(post_raw(arca, V2, json.dumps(big).encode()), 413)
    # Just under any sensible limit still works (the limit is not tiny).
    r = arca.api("POST", V2, {"templateID": "base", "metadata": {"k": "x" * 30_000}})
    assert r.status == 201, (r.status, r.body)
    assert arca.api("DELETE", f"/sandboxes/{r.json()['sandboxID']}").status == 204


def test_unknown_fields_are_accepted(arca):
    r = arca.api(
        "POST",
        V2,
        {"templateID": "base", "timeout": 30, "someFutureField": {"x": [1, 2]}, "secure": True},
    )
    assert r.status == 201, (r.status, r.body)
    sid = r.json()["sandboxID"]
    assert arca.api("GET", f"/sandboxes/{sid}").status == 200
    assert arca.api("DELETE", f"/sandboxes/{sid}").status == 204


@pytest.fixture
def live(arca):
    r = arca.api("POST", V2, {"templateID": "base", "timeout": 120})
    assert r.status == 201
    sid = r.json()["sandboxID"]
    yield sid
    arca.api("DELETE", f"/sandboxes/{sid}")


@pytest.mark.parametrize(
    "raw", [b'{"timeout": -1}', b'{"timeout": "x"}', b"{", b"{}", b'{"timeout": 1e40}']
)
def test_bad_set_timeout(arca, live, raw):
    end_at = arca.api("GET", f"/sandboxes/{live}").json()["endAt"]
    assert_error(arca.api("POST", f"/sandboxes/{live}/timeout", raw=raw), 400)
    # The sandbox is untouched.
    assert arca.api("GET", f"/sandboxes/{live}").json()["endAt"] == end_at


@pytest.mark.parametrize("method,suffix", [("GET", ""), ("DELETE", ""), ("POST", "/timeout")])
def test_malformed_sandbox_id(arca, unchanged, method, suffix):
    body = {"timeout": 10} if method == "POST" else None
    r = arca.api(method, f"/sandboxes/BAD.ID-{unique()}{suffix}", body)
    assert_error(r, 400, 404)


def test_wrong_key_is_401_with_body(arca, unchanged):
    r = arca.api("POST", V2, {"templateID": "base"}, key="e2b_" + "f" * 40)
    assert_error(r, 401)
    assert_error(arca.api("GET", V2, key=""), 401)


def test_list_bad_query(arca):
    assert_error(arca.api("GET", V2 + "?order=sideways"), 400)
    assert_error(arca.api("GET", V2 + "?limit=0"), 400)
    assert_error(arca.api("GET", V2 + "?limit=101"), 400)
    assert_error(arca.api("GET", V2 + "?nextToken=%00garbage"), 400)
