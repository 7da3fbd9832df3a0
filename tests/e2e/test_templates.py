"""Templates end to end: the official SDK's `Template` builder and `arca template build` with a
Dockerfile, against a real `arca up`; the results checked from inside sandboxes of them.

No step downloads anything: every RUN works with what the base template has.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest
from e2b import BuildException, Sandbox, Template

import harness
from conftest import unique

BUILD_LIMIT_S = 600


def build(template, name: str, **kw) -> list:
    """Builds with the SDK; returns the log entries it reported."""
    logs: list = []
    Template.build(template, name, on_build_logs=logs.append, **kw)
    return logs


def messages(logs) -> list[str]:
    return [getattr(e, "message", str(e)) for e in logs]


def cached_steps(logs) -> int:
    return sum(1 for m in messages(logs) if m.endswith("CACHED"))


def sh(sbx, cmd: str, user: str | None = None) -> str:
    kw = {"user": user} if user else {}
    return sbx.commands.run(cmd, **kw).stdout.strip()


@pytest.fixture
def context(tmp_path: Path) -> Path:
    (tmp_path / "app").mkdir()
    (tmp_path / "app" / "main.py").write_text("print('from the template')\n")
    (tmp_path / "app" / "lib").mkdir()
    (tmp_path / "app" / "lib" / "util.py").write_text("X = 1\n")
    (tmp_path / "config.txt").write_text("v1\n")
    return tmp_path


def sdk_template(context: Path, marker: str = "one"):
    return (
        Template(file_context_path=str(context))
        .from_template("base")
        .set_envs({"GREETING": "hello from env"})
        .run_cmd(f"echo $GREETING > /opt/greeting && echo {marker} > /opt/marker", user="root")
        .run_cmd("whoami > /home/user/build-user")
        .copy("app", "/srv/app/")
        .copy("config.txt", "/etc/arca-test/config.txt", mode=0o640)
        .run_cmd("mkdir -p /srv/data && chown user:user /srv/data", user="root")
        .set_workdir("/srv/app")
        .set_user("user")
        .set_start_cmd(
            "python3 -m http.server 8123 --bind 127.0.0.1",
            "curl -sf http://127.0.0.1:8123/ >/dev/null",
        )
    )


def test_sdk_builder_result_is_what_sandboxes_run(arca, context):
    name = "sdk-" + unique()
    logs = build(sdk_template(context), name)
    assert any("built" in m for m in messages(logs)), messages(logs)[-5:]
    assert Template.exists(name)
    sbx = Sandbox.create(template=name, timeout=120)
    try:
        # RUN saw the ENV set before it; the env is in every process too.
        assert sh(sbx, "cat /opt/greeting") == "hello from env"
        assert sh(sbx, "echo $GREETING") == "hello from env"
        # E2B runs build steps as `user` unless a step says otherwise.
        assert sh(sbx, "cat /home/user/build-user") == "user"
        # COPY of a directory keeps its tree; mode applies; owner is the step's user.
        assert sh(sbx, "python3 /srv/app/main.py") == "from the template"
        assert sh(sbx, "cat /srv/app/lib/util.py") == "X = 1"
        assert sh(sbx, "stat -c '%a %U' /etc/arca-test/config.txt") == "640 user"
        # WORKDIR and USER are the sandbox's defaults.
        assert sh(sbx, "pwd") == "/srv/app"
        assert sh(sbx, "whoami") == "user"
        assert sh(sbx, "stat -c %U /srv/data") == "user"
        # The start command runs, and create returned only once the ready command passed.
        assert sh(sbx, "curl -s http://127.0.0.1:8123/ | grep -c main.py") == "1"
        assert "http.server" in sh(sbx, "ps -eo args")
        # The base template is untouched by the build.
        info = sbx.get_info()
        assert info.template_id != "base"
    finally:
        sbx.kill()
    with Sandbox.create(timeout=60) as plain:
        assert sh(plain, "test -e /opt/greeting && echo yes || echo no") == "no"


def test_rebuild_reuses_layers_and_changes_invalidate_from_the_changed_step(arca, context):
    name, marker = "cache-" + unique(), unique()
    first = build(sdk_template(context, marker), name)
    # Only the layer that adds E2B's user on top of `base` can be shared with other tests.
    assert cached_steps(first) <= 1, messages(first)
    # Nothing changed: every layer step is a cache hit.
    again = build(sdk_template(context, marker), name)
    assert cached_steps(again) >= 5, messages(again)
    # A changed COPY input: the steps before it stay cached, it and the later ones run again.
    (context / "config.txt").write_text("v2\n")
    changed = build(sdk_template(context, marker), name)
    hits = cached_steps(changed)
    assert 1 <= hits < cached_steps(again), messages(changed)
    with Sandbox.create(template=name, timeout=60) as sbx:
        assert sh(sbx, "cat /etc/arca-test/config.txt") == "v2"
    # A changed RUN line: only the steps before it are reused.
    changed_run = build(sdk_template(context, marker + "-2"), name)
    assert cached_steps(changed_run) <= 1, messages(changed_run)
    with Sandbox.create(template=name, timeout=60) as sbx:
        assert sh(sbx, "cat /opt/marker") == marker + "-2"
    # skip_cache rebuilds everything.
    forced = build(sdk_template(context, marker + "-2"), name, skip_cache=True)
    assert cached_steps(forced) == 0, messages(forced)


def test_failing_step_is_reported_with_its_step_and_registers_nothing(arca, context):
    name = "fail-" + unique()
    t = (
        Template(file_context_path=str(context))
        .from_template("base")
        .run_cmd("echo before-the-failure")
        .run_cmd("echo about to fail >&2; exit 7")
        .run_cmd("echo never")
    )
    with pytest.raises(BuildException) as e:
        build(t, name)
    text = str(e.value)
    assert "exit" in text and "7" in text, text
    # No sandbox can be made from a template without a finished build.
    with pytest.raises(Exception) as create_error:
        Sandbox.create(template=name, timeout=30)
    assert "build" in str(create_error.value).lower() or "not found" in str(
        create_error.value
    ).lower()


def test_start_command_that_fails_fails_the_build(arca, context):
    t = (
        Template(file_context_path=str(context))
        .from_template("base")
        .set_start_cmd("echo starting; exit 3", "false")
    )
    with pytest.raises(BuildException) as e:
        build(t, "start-" + unique())
    assert "start command" in str(e.value), str(e.value)


def test_copy_of_a_missing_file_is_refused_by_the_sdk_or_the_server(arca, context):
    t = Template(file_context_path=str(context)).from_template("base").copy("nope.txt", "/x")
    with pytest.raises(Exception) as e:
        build(t, "missing-" + unique())
    assert "nope.txt" in str(e.value) or "no such" in str(e.value).lower(), str(e.value)


# --- the CLI with a Dockerfile --------------------------------------------------------------

DOCKERFILE = """\
# syntax=docker/dockerfile:1
ARG GREETING=hello
FROM e2bdev/base
ARG GREETING
ENV APP_HOME=/opt/app \\
    MODE=test
LABEL org.example.purpose="arca e2e"
SHELL ["/bin/bash", "-c"]
WORKDIR $APP_HOME
COPY --chown=user:user --chmod=750 run.sh ./bin/
COPY data/ ./data/
ADD notes.txt /opt/notes/
RUN echo "$GREETING from $MODE" > greeting.txt && [[ -n "$BASH_VERSION" ]]
RUN ["/bin/sh", "-c", "echo exec-form > /opt/app/exec.txt"]
RUN rm /etc/debian_version && rm -rf /usr/share/doc && mkdir /usr/share/doc && touch /usr/share/doc/only
RUN <<EOF
set -e
echo heredoc > /opt/app/heredoc.txt
EOF
EXPOSE 8124
USER user
CMD ["python3", "-m", "http.server", "8124", "--bind", "127.0.0.1"]
"""


def arca_cli(arca, *args: str, check: bool = False) -> subprocess.CompletedProcess:
    env = {**os.environ, "ARCA_HOME": str(arca.home)}
    return subprocess.run(
        [str(harness.arca_bin()), *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=BUILD_LIMIT_S,
        check=check,
    )


@pytest.fixture
def docker_context(tmp_path: Path) -> Path:
    (tmp_path / "Dockerfile").write_text(DOCKERFILE)
    (tmp_path / "run.sh").write_text("#!/bin/sh\necho run\n")
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "a.txt").write_text("A\n")
    (tmp_path / "data" / "skip.log").write_text("ignored\n")
    (tmp_path / "notes.txt").write_text("notes\n")
    (tmp_path / ".dockerignore").write_text("**/*.log\n")
    return tmp_path


def test_cli_dockerfile_build_with_every_instruction(arca, docker_context):
    name = "df-" + unique()
    r = arca_cli(arca, "template", "build", str(docker_context), "--name", name)
    assert r.returncode == 0, r.stdout + r.stderr
    with Sandbox.create(template=name, timeout=120) as sbx:
        assert sh(sbx, "pwd") == "/opt/app"
        assert sh(sbx, "whoami") == "user"
        assert sh(sbx, "cat greeting.txt") == "hello from test"
        assert sh(sbx, "cat exec.txt heredoc.txt") == "exec-form\nheredoc"
        assert sh(sbx, "stat -c '%a %U:%G' bin/run.sh") == "750 user:user"
        assert sh(sbx, "cat data/a.txt; ls data") == "A\na.txt"
        assert sh(sbx, "cat /opt/notes/notes.txt") == "notes"
        assert sh(sbx, "echo $APP_HOME $MODE") == "/opt/app test"
        # A deleted file and a replaced directory stay so in the layers (whiteout, opaque dir).
        assert sh(sbx, "test -e /etc/debian_version && echo there || echo gone") == "gone"
        assert sh(sbx, "ls /usr/share/doc") == "only"
        # CMD is the start command: it runs in every sandbox of the template.
        assert "http.server 8124" in sh(sbx, "ps -eo args")

    # One changed line: the steps above it come from the cache.
    changed = DOCKERFILE.replace("echo heredoc", "echo heredoc2")
    (docker_context / "Dockerfile").write_text(changed)
    r = arca_cli(arca, "--json", "template", "build", str(docker_context), "--name", name)
    assert r.returncode == 0, r.stdout + r.stderr
    cached = [line for line in r.stdout.splitlines() if '"CACHED"' in line]
    assert len(cached) >= 5, r.stdout
    with Sandbox.create(template=name, timeout=60) as sbx:
        assert sh(sbx, "cat heredoc.txt") == "heredoc2"

    listed = arca_cli(arca, "template", "list")
    assert name in listed.stdout
    assert arca_cli(arca, "template", "delete", name).returncode == 0
    with pytest.raises(Exception):
        Sandbox.create(template=name, timeout=30)


@pytest.mark.parametrize(
    "dockerfile, expect",
    [
        ("FROM e2bdev/base\nRUN echo ok\nFROOM x\n", "line 3"),
        ("FROM 127.0.0.1:1/arca-test/does-not-exist:1\n", "does-not-exist"),
        ("FROM e2bdev/base\nCOPY missing.txt /x\n", "missing.txt"),
        ("FROM e2bdev/base\nRUN echo bad >&2 && exit 4\n", "code 4"),
        # Refused before any connection: builds run on the host's network.
        ("FROM 10.255.255.1:5000/x:1\n", "--insecure-registry"),
        ("FROM --platform=linux/s390x e2bdev/base\n", "runs linux/amd64 only"),
    ],
    ids=["syntax", "unknown-base", "missing-copy", "failing-run", "private-registry", "platform"],
)
def test_cli_bad_builds_say_what_is_wrong(arca, tmp_path, dockerfile, expect):
    (tmp_path / "Dockerfile").write_text(dockerfile)
    name = "bad-" + unique()
    r = arca_cli(arca, "template", "build", str(tmp_path), "--name", name)
    assert r.returncode != 0, r.stdout + r.stderr
    assert expect in (r.stdout + r.stderr), r.stdout + r.stderr
    with pytest.raises(Exception):
        Sandbox.create(template=name, timeout=30)


# --- registry images ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def registry():
    import registry as reg

    why = reg.available()
    if why:
        pytest.skip(why)
    r = reg.Registry()
    try:
        digest = r.push("arca-test/busybox", "1", reg.busybox_layers(), {"Env": ["FROM_IMAGE=yes"]})
        yield r, digest
    finally:
        r.stop()


def test_sdk_from_registry_image_by_tag_and_digest(arca, registry, context):
    r, digest = registry
    for ref in (f"{r.host}/arca-test/busybox:1", f"{r.host}/arca-test/busybox@{digest}"):
        name = "img-" + unique()
        t = (
            Template(file_context_path=str(context))
            .from_image(ref)
            .copy("config.txt", "/data/config.txt")
        )
        build(t, name)
        with Sandbox.create(template=name, timeout=60) as sbx:
            # Both layers, in order: the whiteout removed a file of the first.
            assert sbx.files.read("/etc/added-later") == "second layer\n"
            assert not sbx.files.exists("/etc/removed-later")
            assert sbx.files.read("/data/config.txt") == "v1\n"
            # The account E2B's SDKs run as was added to the image.
            assert "user:x:1000:1000" in sbx.files.read("/etc/passwd")


def test_cli_multi_stage_dockerfile_from_a_registry_image(arca, registry, tmp_path):
    r, _ = registry
    (tmp_path / "Dockerfile").write_text(
        f"FROM {r.host}/arca-test/busybox:1 AS build\n"
        "RUN mkdir -p /out && echo \"built in stage with $FROM_IMAGE\" > /out/artifact.txt\n"
        "FROM e2bdev/base\n"
        "COPY --from=build /out/artifact.txt /opt/artifact.txt\n"
        "COPY --from=0 /bin/busybox /opt/busybox\n"
    )
    name = "multi-" + unique()
    out = arca_cli(arca, "template", "build", str(tmp_path), "--name", name)
    assert out.returncode == 0, out.stdout + out.stderr
    with Sandbox.create(template=name, timeout=60) as sbx:
        assert sh(sbx, "cat /opt/artifact.txt") == "built in stage with yes"
        assert sh(sbx, "/opt/busybox echo ok") == "ok"
        # Nothing of the first stage but what was copied.
        assert sh(sbx, "test -e /out && echo leaked || echo clean") == "clean"


def test_a_build_step_cannot_fill_the_host_disk(arca, tmp_path):
    """A RUN writes to a disk of its own: past the limit it gets ENOSPC, and the build fails."""
    mb = harness.BUILD_DISK_MB + 64
    (tmp_path / "Dockerfile").write_text(
        f"FROM e2bdev/base\nRUN dd if=/dev/zero of=/big bs=1M count={mb} status=none\n"
    )
    r = arca_cli(arca, "template", "build", str(tmp_path), "--name", "fill-" + unique())
    assert r.returncode != 0, r.stdout + r.stderr
    assert "No space left on device" in r.stdout + r.stderr, r.stdout + r.stderr


def test_a_layer_cannot_make_the_node_touch_host_files(arca, tmp_path):
    """A RUN step that turns /etc into a symlink to a host path: the node cleans files out of
    every finished layer (`etc/hosts` and the like) and must not follow the link."""
    canary = Path(tempfile.mkdtemp(prefix="arca-e2e-canary-"))
    try:
        for f in ("hosts", "hostname", "resolv.conf"):
            (canary / f).write_text("host file\n")
        (tmp_path / "Dockerfile").write_text(
            f"FROM e2bdev/base\nRUN rm -rf /etc; ln -s {canary} /etc\n"
        )
        arca_cli(arca, "template", "build", str(tmp_path), "--name", "evil-" + unique())
        for f in ("hosts", "hostname", "resolv.conf"):
            assert (canary / f).read_text() == "host file\n", f
    finally:
        shutil.rmtree(canary, ignore_errors=True)


def test_from_scratch_and_from_another_template(arca, tmp_path, context):
    # FROM scratch: nothing but what is copied (and the account the SDKs run as).
    (tmp_path / "hello.txt").write_text("from scratch\n")
    (tmp_path / "Dockerfile").write_text("FROM scratch\nCOPY hello.txt /data/hello.txt\n")
    name = "scratch-" + unique()
    r = arca_cli(arca, "template", "build", str(tmp_path), "--name", name)
    assert r.returncode == 0, r.stdout + r.stderr
    with Sandbox.create(template=name, timeout=60) as sbx:
        assert sbx.files.read("/data/hello.txt") == "from scratch\n"
        assert not sbx.files.exists("/bin/bash")
        assert "user:x:" in sbx.files.read("/etc/passwd")
    # fromTemplate of a template built here: its files and ENV carry over.
    parent = "parent-" + unique()
    build(
        Template(file_context_path=str(context))
        .from_template("base")
        .set_envs({"FROM_PARENT": "yes"})
        .run_cmd("echo parent > /home/user/parent.txt"),
        parent,
    )
    child = "child-" + unique()
    build(
        Template(file_context_path=str(context))
        .from_template(parent)
        .run_cmd("cat /home/user/parent.txt > /home/user/child.txt"),
        child,
    )
    with Sandbox.create(template=child, timeout=60) as sbx:
        assert sh(sbx, "cat /home/user/child.txt") == "parent"
        assert sh(sbx, "echo $FROM_PARENT") == "yes"


def test_a_registry_name_that_resolves_to_this_host_is_refused(arca, tmp_path):
    """Builds run on the host's network: a registry *name* resolving to a loopback or private
    address (here the host's own name) needs the operator's --insecure-registry, like an IP."""
    import ipaddress
    import socket

    name = socket.gethostname()
    try:
        addrs = {ai[4][0] for ai in socket.getaddrinfo(name, 5000)}
    except OSError:
        pytest.skip(f"the host name {name} does not resolve here")
    # Never risk traffic to an address the test did not make: only run when every address of
    # the name is this host's or private (the build is refused before connecting).
    if not addrs or not all(
        ipaddress.ip_address(a).is_private or ipaddress.ip_address(a).is_loopback for a in addrs
    ):
        pytest.skip(f"{name} resolves to {addrs}, not only to internal addresses")
    (tmp_path / "Dockerfile").write_text(f"FROM {name}:5000/arca-test/x:1\n")
    r = arca_cli(arca, "template", "build", str(tmp_path), "--name", "resolve-" + unique())
    assert r.returncode != 0, r.stdout + r.stderr
    assert "--insecure-registry" in r.stdout + r.stderr, r.stdout + r.stderr
