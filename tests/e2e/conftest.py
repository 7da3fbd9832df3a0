"""Fixtures of the end-to-end suite: one `arca up` per session (see harness.py), the official
`e2b` SDK pointed at it with recipe A (CONTRACT.md 1.7), and helpers the tests share.

Environment: ARCA_BIN, ARCA_ENVD_BIN, ARCA_E2E_CACHE (see harness.py).
"""

from __future__ import annotations

import os
import time
import uuid

import pytest

import harness

# Processes the SDK starts in a second process (connect) see the same variables.
os.environ.pop("E2B_DEBUG", None)
# A suite timeout (SIGTERM) still runs the teardown that cleans the host.
harness.stop_on_sigterm()


@pytest.fixture(scope="session")
def arca():
    instance = harness.new_instance()
    try:
        os.environ.update(instance.start())
        yield instance
    finally:
        problems = harness.finish(instance)
        if problems:
            pytest.fail(
                "arca up left these behind:\n  "
                + "\n  ".join(problems)
                + f"\n--- last lines of {instance.log}\n{instance.tail()}"
            )


@pytest.fixture(scope="session")
def remote(arca):
    """A fake remote network for network-policy tests (remote_host.py): netns `rmt*` with DNS,
    HTTP, TLS and echo on 198.18.<k>.2 and .3. Needs `arca` so that it is gone before the
    session's leak check, which reports it if not."""
    from remote_host import RemoteHost, unavailable

    why = unavailable()
    if why:
        pytest.skip(f"no remote host: {why}")
    with RemoteHost() as r:
        yield r


@pytest.fixture
def runtime() -> str:
    """The isolation backend of the `sandbox` fixtures; a module overrides it with a
    parametrized fixture to run its tests under every backend."""
    return "ns"


def create_sandbox(runtime: str = "ns", **kwargs):
    """Sandbox.create under `runtime` (the `arca.runtime` metadata key); a backend this host
    cannot run skips the test with the server's reason."""
    from e2b import Sandbox
    from e2b.exceptions import SandboxException

    metadata = dict(kwargs.pop("metadata", None) or {})
    if runtime != "ns":
        metadata["arca.runtime"] = runtime
    kwargs.setdefault("timeout", 300)
    try:
        return Sandbox.create(metadata=metadata, **kwargs)
    except SandboxException as e:
        if "is not available on this node" in str(e):
            # CI names the runtimes it installs: there, missing is a failure.
            required = os.environ.get("ARCA_E2E_REQUIRE_RUNTIMES", "").split(",")
            if runtime in required:
                pytest.fail(f"runtime {runtime} is required (ARCA_E2E_REQUIRE_RUNTIMES): {e}")
            pytest.skip(f"runtime {runtime} unavailable here: {e}")
        raise


@pytest.fixture
def sandbox(arca, runtime):
    sbx = create_sandbox(runtime)
    yield sbx
    sbx.kill()


@pytest.fixture
def sandbox_b(arca, runtime):
    sbx = create_sandbox(runtime)
    yield sbx
    sbx.kill()


def unique() -> str:
    return uuid.uuid4().hex[:12]


def wait_until(predicate, what: str, limit_s: float = 15.0, every_s: float = 0.1):
    """Polls `predicate` until it returns something truthy, which is returned; bounded, so a
    missing behaviour fails the test instead of hanging it."""
    deadline = time.monotonic() + limit_s
    while True:
        got = predicate()
        if got:
            return got
        if time.monotonic() > deadline:
            pytest.fail(f"gave up waiting for: {what}")
        time.sleep(every_s)


def wait_until_or_false(predicate, limit_s: float = 15.0, every_s: float = 0.1) -> bool:
    """Like wait_until, but returns False at the limit so the caller can assert with detail."""
    deadline = time.monotonic() + limit_s
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(every_s)
    return True


def sdk_version() -> tuple[int, ...]:
    import importlib.metadata

    return tuple(int(x) for x in importlib.metadata.version("e2b").split(".")[:3])
