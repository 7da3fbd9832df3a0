"""Directory watches: sync `watch_dir` (CreateWatcher/GetWatcherEvents) and async (WatchDir stream).

Event lists are compared exactly. To know that all events of an operation have arrived, each
test writes a sentinel file afterwards and waits for the sentinel's WRITE: inotify keeps one
ordered queue per watch, so everything before the sentinel has been delivered by then.
"""

from __future__ import annotations

import asyncio
import time

import pytest
from e2b import (
    AsyncSandbox,
    FileNotFoundException,
    FilesystemEventType as Ev,
    InvalidArgumentException,
)

LIMIT_S = 15.0


def kinds(events, name: str) -> list:
    return [e.type for e in events if e.name == name]


def collect_until(handle, name: str, kind=Ev.WRITE) -> list:
    """Poll a sync watch handle until an event (name, kind) shows up; return all events."""
    events = []
    deadline = time.monotonic() + LIMIT_S
    while not any(e.name == name and e.type == kind for e in events):
        if time.monotonic() > deadline:
            pytest.fail(f"no {kind} event for {name!r}; got {[(e.name, e.type) for e in events]}")
        events.extend(handle.get_new_events())
        time.sleep(0.05)
    return events


# --- sync -------------------------------------------------------------------------------------


def test_new_file_yields_create_chmod_write(sandbox, workdir):
    h = sandbox.files.watch_dir(workdir)
    try:
        sandbox.files.write(f"{workdir}/new.txt", "data")
        sandbox.files.write(f"{workdir}/zz-sentinel", "s")
        events = collect_until(h, "zz-sentinel")
    finally:
        h.stop()
    assert kinds(events, "new.txt") == [Ev.CREATE, Ev.CHMOD, Ev.WRITE]
    assert kinds(events, "zz-sentinel") == [Ev.CREATE, Ev.CHMOD, Ev.WRITE]


def test_overwrite_yields_chmod_then_write(sandbox, workdir):
    sandbox.files.write(f"{workdir}/existing.txt", "first")
    h = sandbox.files.watch_dir(workdir)
    try:
        sandbox.files.write(f"{workdir}/existing.txt", "second")
        sandbox.files.write(f"{workdir}/zz-sentinel", "s")
        events = collect_until(h, "zz-sentinel")
    finally:
        h.stop()
    got = kinds(events, "existing.txt")
    assert got[0] == Ev.CHMOD, got
    assert len(got) >= 2 and set(got[1:]) == {Ev.WRITE}, got


def test_rename_and_remove_events(sandbox, workdir):
    sandbox.files.write(f"{workdir}/a.txt", "a")
    h = sandbox.files.watch_dir(workdir)
    try:
        sandbox.files.rename(f"{workdir}/a.txt", f"{workdir}/b.txt")
        sandbox.files.remove(f"{workdir}/b.txt")
        sandbox.files.write(f"{workdir}/zz-sentinel", "s")
        events = collect_until(h, "zz-sentinel")
    finally:
        h.stop()
    assert kinds(events, "a.txt") == [Ev.RENAME]
    assert kinds(events, "b.txt") == [Ev.CREATE, Ev.REMOVE]


def test_command_side_effects_are_seen(sandbox, workdir):
    h = sandbox.files.watch_dir(workdir)
    try:
        sandbox.commands.run(f"cd {workdir} && echo x > by-shell && chmod 600 by-shell && rm by-shell")
        sandbox.files.write(f"{workdir}/zz-sentinel", "s")
        events = collect_until(h, "zz-sentinel")
    finally:
        h.stop()
    assert kinds(events, "by-shell") == [Ev.CREATE, Ev.WRITE, Ev.CHMOD, Ev.REMOVE]


def test_non_recursive_watch_ignores_subdirectories(sandbox, workdir):
    sandbox.files.make_dir(f"{workdir}/sub")
    h = sandbox.files.watch_dir(workdir)
    try:
        sandbox.files.write(f"{workdir}/sub/inner.txt", "x")
        sandbox.files.write(f"{workdir}/zz-sentinel", "s")
        events = collect_until(h, "zz-sentinel")
    finally:
        h.stop()
    assert [e.name for e in events if e.name != "zz-sentinel"] == []


def test_recursive_watch_follows_new_subdirectory(sandbox, workdir):
    h = sandbox.files.watch_dir(workdir, recursive=True)
    try:
        sandbox.files.make_dir(f"{workdir}/later")
        sandbox.files.write(f"{workdir}/later/file.txt", "written right away")
        sandbox.files.write(f"{workdir}/later/zz-sentinel", "s")
        events = collect_until(h, "later/zz-sentinel")
    finally:
        h.stop()
    assert kinds(events, "later")[0] == Ev.CREATE
    got = kinds(events, "later/file.txt")
    assert got and got[0] == Ev.CREATE, got
    assert Ev.WRITE in got, got


def test_include_entry(sandbox, workdir):
    h = sandbox.files.watch_dir(workdir, include_entry=True)
    try:
        sandbox.files.write(f"{workdir}/with-entry.txt", "12345")
        sandbox.files.remove(f"{workdir}/with-entry.txt")
        sandbox.files.write(f"{workdir}/zz-sentinel", "s")
        events = collect_until(h, "zz-sentinel")
    finally:
        h.stop()
    mine = [e for e in events if e.name == "with-entry.txt"]
    create = next(e for e in mine if e.type == Ev.CREATE)
    assert create.entry is not None
    assert create.entry.path == f"{workdir}/with-entry.txt"
    assert create.entry.name == "with-entry.txt"
    removed = [e for e in mine if e.type == Ev.REMOVE]
    assert len(removed) == 1 and removed[0].entry is None


def test_watch_missing_directory(sandbox, workdir):
    with pytest.raises(FileNotFoundException):
        sandbox.files.watch_dir(f"{workdir}/missing")


def test_watch_a_file_is_rejected(sandbox, workdir):
    sandbox.files.write(f"{workdir}/plain", "x")
    with pytest.raises(InvalidArgumentException):
        sandbox.files.watch_dir(f"{workdir}/plain")


# --- async (WatchDir server stream) -----------------------------------------------------------


async def async_collect_until(events: list, name: str, kind=Ev.WRITE) -> None:
    async def poll():
        while not any(e.name == name and e.type == kind for e in events):
            await asyncio.sleep(0.02)

    try:
        await asyncio.wait_for(poll(), LIMIT_S)
    except asyncio.TimeoutError:
        pytest.fail(f"no {kind} event for {name!r}; got {[(e.name, e.type) for e in events]}")


def test_async_watch_new_file(envd, workdir):
    async def flow():
        sbx = await AsyncSandbox.create()
        events = []
        exits = []
        h = await sbx.files.watch_dir(workdir, on_event=events.append, on_exit=exits.append)
        await sbx.files.write(f"{workdir}/async.txt", "data")
        await sbx.files.write(f"{workdir}/zz-sentinel", "s")
        await async_collect_until(events, "zz-sentinel")
        await h.stop()
        assert kinds(events, "async.txt") == [Ev.CREATE, Ev.CHMOD, Ev.WRITE]
        assert exits in ([], [None])

    asyncio.run(asyncio.wait_for(flow(), 60))


def test_async_recursive_watch(envd, workdir):
    async def flow():
        sbx = await AsyncSandbox.create()
        events = []
        h = await sbx.files.watch_dir(workdir, on_event=events.append, recursive=True)
        await sbx.files.make_dir(f"{workdir}/a/b")
        await sbx.files.write(f"{workdir}/a/b/deep.txt", "deep")
        await sbx.files.write(f"{workdir}/a/b/zz-sentinel", "s")
        await async_collect_until(events, "a/b/zz-sentinel")
        await h.stop()
        assert kinds(events, "a")[0] == Ev.CREATE
        got = kinds(events, "a/b/deep.txt")
        assert got and got[0] == Ev.CREATE and Ev.WRITE in got, got

    asyncio.run(asyncio.wait_for(flow(), 60))


def test_async_watch_missing_directory(envd, workdir):
    async def flow():
        sbx = await AsyncSandbox.create()
        with pytest.raises(FileNotFoundException):
            await sbx.files.watch_dir(f"{workdir}/missing", on_event=lambda e: None)

    asyncio.run(asyncio.wait_for(flow(), 60))


def test_recursive_watch_sees_files_in_directories_made_by_a_command(sandbox, workdir):
    # mkdir -p and the write happen back to back, before envd can add watches for the new
    # directories: envd has to scan them and report what it missed (CONTRACT 3.4).
    h = sandbox.files.watch_dir(workdir, recursive=True)
    try:
        sandbox.commands.run(f"cd {workdir} && mkdir -p x/y/z && echo hi > x/y/z/f.txt")
        sandbox.files.write(f"{workdir}/x/y/z/zz-sentinel", "s")
        events = collect_until(h, "x/y/z/zz-sentinel")
    finally:
        h.stop()
    for d in ("x", "x/y", "x/y/z"):
        assert kinds(events, d)[:1] == [Ev.CREATE], (d, kinds(events, d))
    got = kinds(events, "x/y/z/f.txt")
    assert got[:1] == [Ev.CREATE] and Ev.WRITE in got, got
