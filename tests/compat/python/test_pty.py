"""`sandbox.pty` (Start with a PTY, SendInput.pty, Update) through the async SDK."""

from __future__ import annotations

import asyncio

import pytest
from e2b import AsyncSandbox, CommandExitException, PtySize


async def wait_for_output(buf: bytearray, needle: bytes, limit_s: float = 15.0) -> None:
    async def poll():
        while needle not in buf:
            await asyncio.sleep(0.02)

    try:
        await asyncio.wait_for(poll(), limit_s)
    except asyncio.TimeoutError:
        pytest.fail(f"PTY output never contained {needle!r}; got {bytes(buf)!r}")


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 60))


def test_pty_input_output_resize_and_kill(envd):
    async def flow():
        sbx = await AsyncSandbox.create()
        buf = bytearray()
        h = await sbx.pty.create(PtySize(rows=24, cols=80), on_data=buf.extend)
        assert h.pid > 0

        # The shell echoes the typed line; only evaluation produces "hi-42".
        await sbx.pty.send_stdin(h.pid, b"echo hi-$((40+2))\n")
        await wait_for_output(buf, b"hi-42")

        await sbx.pty.send_stdin(h.pid, b'echo "size=$(tput cols)x$(tput lines)"\n')
        await wait_for_output(buf, b"size=80x24")

        await sbx.pty.resize(h.pid, PtySize(rows=30, cols=123))
        await sbx.pty.send_stdin(h.pid, b'echo "size=$(tput cols)x$(tput lines)"\n')
        await wait_for_output(buf, b"size=123x30")

        listed = {p.pid: p for p in await sbx.commands.list()}
        assert listed[h.pid].cmd == "/bin/bash"
        assert listed[h.pid].args == ["-i", "-l"]

        assert await sbx.pty.kill(h.pid) is True
        with pytest.raises(CommandExitException) as ei:
            await h.wait()
        assert ei.value.exit_code == -1
        assert h.pid not in [p.pid for p in await sbx.commands.list()]

    run(flow())


def test_pty_environment_user_and_clean_exit(envd):
    async def flow():
        sbx = await AsyncSandbox.create()
        buf = bytearray()
        h = await sbx.pty.create(
            PtySize(rows=24, cols=80), on_data=buf.extend, envs={"ARCA_PTY": "set"}
        )
        await sbx.pty.send_stdin(
            h.pid, b'echo "env=$TERM,$LANG,$ARCA_PTY,$(whoami),$(pwd),$(tty)"\n'
        )
        await wait_for_output(buf, b"env=xterm-256color,C.UTF-8,set,user,/home/user,/dev/pts/")
        await sbx.pty.send_stdin(h.pid, b"exit 0\n")
        r = await h.wait()
        assert r.exit_code == 0

    run(flow())


def test_pty_as_root(envd):
    async def flow():
        sbx = await AsyncSandbox.create()
        buf = bytearray()
        h = await sbx.pty.create(PtySize(rows=24, cols=80), on_data=buf.extend, user="root")
        await sbx.pty.send_stdin(h.pid, b'echo "who=$(id -u)"\nexit 3\n')
        await wait_for_output(buf, b"who=0")
        with pytest.raises(CommandExitException) as ei:
            await h.wait()
        assert ei.value.exit_code == 3

    run(flow())
