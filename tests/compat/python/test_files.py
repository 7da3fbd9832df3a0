"""`sandbox.files` (filesystem.Filesystem RPCs and the /files routes) through the official SDK."""

from __future__ import annotations

import io
import uuid

import e2b.sandbox.filesystem.filesystem as sdk_fs
import pytest
from e2b import (
    AuthenticationException,
    FileNotFoundException,
    FileType,
    InvalidArgumentException,
)

from conftest import http


def multipart(parts: list[tuple[str, str, bytes]]) -> tuple[bytes, str]:
    """Encode (field name, filename, content) parts as multipart/form-data."""
    boundary = "arca" + uuid.uuid4().hex
    body = b""
    for name, filename, content in parts:
        body += (
            f"--{boundary}\r\n"
            f'Content-Disposition: form-data; name="{name}"; filename="{filename}"\r\n'
            "Content-Type: application/octet-stream\r\n\r\n"
        ).encode() + content + b"\r\n"
    body += f"--{boundary}--\r\n".encode()
    return body, f"multipart/form-data; boundary={boundary}"


def stat_owner(sandbox, path: str) -> str:
    return sandbox.commands.run(f"stat -c '%u:%g %a' '{path}'", user="root").stdout.strip()


# --- write / read -----------------------------------------------------------------------------


def test_write_and_read_text(sandbox, workdir):
    path = f"{workdir}/hello.txt"
    info = sandbox.files.write(path, "hello žluťoučký kůň\n")
    assert (info.name, info.type, info.path) == ("hello.txt", FileType.FILE, path)
    assert sandbox.files.read(path) == "hello žluťoučký kůň\n"
    assert sandbox.files.read(path, format="bytes") == "hello žluťoučký kůň\n".encode()


def test_write_and_read_bytes_and_stream(sandbox, workdir):
    path = f"{workdir}/all-bytes.bin"
    data = bytes(range(256)) * 4096  # 1 MiB, every byte value
    sandbox.files.write(path, data)
    got = sandbox.files.read(path, format="bytes")
    assert isinstance(got, bytearray)
    assert bytes(got) == data
    stream = sandbox.files.read(path, format="stream")
    assert b"".join(stream) == data


def test_write_file_object_is_streamed(sandbox, workdir):
    path = f"{workdir}/from-file-object.bin"
    data = b"0123456789abcdef" * 300_000  # 4.6 MiB
    sandbox.files.write(path, io.BytesIO(data))
    assert bytes(sandbox.files.read(path, format="bytes")) == data


def test_write_iterable_of_chunks(sandbox, workdir):
    if not hasattr(sdk_fs, "SyncWriteEntry"):
        pytest.skip("writing an iterable of byte chunks is not supported by this SDK version")
    path = f"{workdir}/chunks.txt"
    sandbox.files.write(path, (f"chunk {i}\n".encode() for i in range(1000)))
    assert sandbox.files.read(path) == "".join(f"chunk {i}\n" for i in range(1000))


def test_gzip_upload_and_download(sandbox, workdir):
    path = f"{workdir}/gz.txt"
    data = "compress me\n" * 10_000
    sandbox.files.write(path, data, gzip=True)
    assert sandbox.files.read(path, gzip=True) == data
    assert sandbox.files.read(path) == data


def test_overwrite_truncates(sandbox, workdir):
    path = f"{workdir}/over.txt"
    sandbox.files.write(path, "a much longer first version\n")
    sandbox.files.write(path, "short\n")
    assert sandbox.files.read(path) == "short\n"


def test_write_empty_file(sandbox, workdir):
    path = f"{workdir}/empty"
    sandbox.files.write(path, b"")
    assert sandbox.files.read(path) == ""
    assert sandbox.files.get_info(path).size == 0


def test_write_files_many(sandbox, workdir):
    entries = [{"path": f"{workdir}/many/f{i}.txt", "data": f"file {i}"} for i in range(5)]
    entries.append({"path": f"{workdir}/many/raw.bin", "data": b"\x00\x01\x02"})
    infos = sandbox.files.write_files(entries)
    assert [i.path for i in infos] == [e["path"] for e in entries]
    assert [i.name for i in infos] == [e["path"].rsplit("/", 1)[1] for e in entries]
    for i in range(5):
        assert sandbox.files.read(f"{workdir}/many/f{i}.txt") == f"file {i}"
    assert bytes(sandbox.files.read(f"{workdir}/many/raw.bin", format="bytes")) == b"\x00\x01\x02"


def test_relative_paths_resolve_against_home(sandbox):
    name = f"rel-{uuid.uuid4().hex[:8]}.txt"
    try:
        info = sandbox.files.write(name, "relative")
        assert info.path == f"/home/user/{name}"
        assert sandbox.files.read(f"/home/user/{name}") == "relative"
        assert sandbox.files.read(f"~/{name}") == "relative"
        assert sandbox.commands.run(f"cat {name}").stdout == "relative"
    finally:
        sandbox.files.remove(f"/home/user/{name}")


def test_write_creates_parents_owned_by_user(sandbox, workdir):
    path = f"{workdir}/deep/er/file.txt"
    sandbox.files.write(path, "x")
    assert stat_owner(sandbox, f"{workdir}/deep") == "1000:1000 755"
    assert stat_owner(sandbox, f"{workdir}/deep/er") == "1000:1000 755"
    assert stat_owner(sandbox, path) == "1000:1000 644"


def test_write_as_root_is_owned_by_root(sandbox, workdir):
    path = f"{workdir}/root-owned.txt"
    sandbox.files.write(path, "r", user="root")
    assert stat_owner(sandbox, path) == "0:0 644"
    assert sandbox.files.get_info(path).owner == "root"
    assert sandbox.files.read(path, user="root") == "r"


def test_metadata_roundtrip(sandbox, workdir):
    path = f"{workdir}/meta.txt"
    info = sandbox.files.write(path, "m", metadata={"origin": "arca-test", "n": "1"})
    assert info.metadata == {"origin": "arca-test", "n": "1"}
    assert sandbox.files.get_info(path).metadata == {"origin": "arca-test", "n": "1"}
    # An upload without metadata clears the old metadata.
    sandbox.files.write(path, "m2")
    assert not sandbox.files.get_info(path).metadata


# --- list / exists / get_info -----------------------------------------------------------------


def test_list_depth_1_and_2(sandbox, workdir):
    sandbox.files.write(f"{workdir}/a.txt", "a")
    sandbox.files.write(f"{workdir}/b/c.txt", "c")
    sandbox.files.write(f"{workdir}/b/d/e.txt", "e")

    one = sandbox.files.list(workdir)
    assert [(e.path, e.name, e.type) for e in one] == [
        (f"{workdir}/a.txt", "a.txt", FileType.FILE),
        (f"{workdir}/b", "b", FileType.DIR),
    ]
    two = sandbox.files.list(workdir, depth=2)
    assert [(e.path, e.name, e.type) for e in two] == [
        (f"{workdir}/a.txt", "a.txt", FileType.FILE),
        (f"{workdir}/b", "b", FileType.DIR),
        (f"{workdir}/b/c.txt", "c.txt", FileType.FILE),
        (f"{workdir}/b/d", "d", FileType.DIR),
    ]


def test_list_missing_and_non_directory(sandbox, workdir):
    with pytest.raises(FileNotFoundException):
        sandbox.files.list(f"{workdir}/missing")
    sandbox.files.write(f"{workdir}/plain", "x")
    with pytest.raises(InvalidArgumentException):
        sandbox.files.list(f"{workdir}/plain")


def test_exists(sandbox, workdir):
    sandbox.files.write(f"{workdir}/here", "x")
    assert sandbox.files.exists(f"{workdir}/here") is True
    assert sandbox.files.exists(workdir) is True
    assert sandbox.files.exists(f"{workdir}/not-here") is False


def test_get_info_of_file(sandbox, workdir):
    path = f"{workdir}/info.txt"
    sandbox.files.write(path, "hello")
    info = sandbox.files.get_info(path)
    assert info.name == "info.txt"
    assert info.type == FileType.FILE
    assert info.path == path
    assert info.size == 5
    assert info.mode == 0o644
    assert info.permissions == "-rw-r--r--"
    assert (info.owner, info.group) == ("user", "user")
    assert info.symlink_target is None
    mtime = int(sandbox.commands.run(f"stat -c %Y {path}").stdout)
    assert int(info.modified_time.timestamp()) == mtime


def test_get_info_of_directory(sandbox, workdir):
    info = sandbox.files.get_info(workdir)
    assert info.type == FileType.DIR
    assert info.name == workdir.rsplit("/", 1)[1]
    assert info.mode == 0o755
    assert info.permissions == "drwxr-xr-x"
    assert info.size > 0
    assert (info.owner, info.group) == ("user", "user")


def test_get_info_of_symlink(sandbox, workdir):
    sandbox.files.write(f"{workdir}/target.txt", "t")
    sandbox.commands.run(f"ln -s target.txt {workdir}/link")
    info = sandbox.files.get_info(f"{workdir}/link")
    assert info.path == f"{workdir}/link"
    assert info.symlink_target == f"{workdir}/target.txt"
    assert info.permissions == "Lrwxrwxrwx"
    assert info.mode == 0o644
    # 2.63 reads `is_symlink`; older SDKs see the target's type.
    assert info.type in (FileType.SYMLINK, FileType.FILE)
    if hasattr(sdk_fs, "SyncWriteEntry"):
        assert info.type == FileType.SYMLINK
    assert sandbox.files.read(f"{workdir}/link") == "t"


def test_get_info_missing(sandbox, workdir):
    with pytest.raises(FileNotFoundException):
        sandbox.files.get_info(f"{workdir}/nope")


# --- make_dir / rename / remove ---------------------------------------------------------------


def test_make_dir_true_then_false(sandbox, workdir):
    path = f"{workdir}/new/nested/dir"
    assert sandbox.files.make_dir(path) is True
    assert sandbox.files.make_dir(path) is False
    assert sandbox.files.get_info(path).type == FileType.DIR
    assert stat_owner(sandbox, f"{workdir}/new") == "1000:1000 755"


def test_make_dir_over_file_fails(sandbox, workdir):
    sandbox.files.write(f"{workdir}/file", "x")
    with pytest.raises(InvalidArgumentException):
        sandbox.files.make_dir(f"{workdir}/file")


def test_rename(sandbox, workdir):
    sandbox.files.write(f"{workdir}/old.txt", "moving")
    info = sandbox.files.rename(f"{workdir}/old.txt", f"{workdir}/sub/new.txt")
    assert (info.path, info.name, info.type) == (f"{workdir}/sub/new.txt", "new.txt", FileType.FILE)
    assert sandbox.files.exists(f"{workdir}/old.txt") is False
    assert sandbox.files.read(f"{workdir}/sub/new.txt") == "moving"


def test_rename_missing_source(sandbox, workdir):
    with pytest.raises(FileNotFoundException):
        sandbox.files.rename(f"{workdir}/ghost", f"{workdir}/other")


def test_remove_file_directory_and_missing(sandbox, workdir):
    sandbox.files.write(f"{workdir}/rm/a/b.txt", "x")
    sandbox.files.write(f"{workdir}/single.txt", "x")
    sandbox.files.remove(f"{workdir}/single.txt")
    assert sandbox.files.exists(f"{workdir}/single.txt") is False
    sandbox.files.remove(f"{workdir}/rm")
    assert sandbox.files.exists(f"{workdir}/rm") is False
    sandbox.files.remove(f"{workdir}/never-existed")  # not an error


# --- errors -----------------------------------------------------------------------------------


def test_read_missing_file_raises_file_not_found(sandbox, workdir):
    with pytest.raises(FileNotFoundException):
        sandbox.files.read(f"{workdir}/missing.txt")


def test_read_directory_raises_invalid_argument(sandbox, workdir):
    with pytest.raises(InvalidArgumentException):
        sandbox.files.read(workdir)


def test_write_onto_directory_raises_invalid_argument(sandbox, workdir):
    sandbox.files.make_dir(f"{workdir}/adir")
    with pytest.raises(InvalidArgumentException):
        sandbox.files.write(f"{workdir}/adir", "x")


def test_unknown_user_on_files(sandbox, workdir):
    with pytest.raises(AuthenticationException):
        sandbox.files.read(f"{workdir}/x", user="nosuchuser")
    with pytest.raises(AuthenticationException):
        sandbox.files.write(f"{workdir}/x", "x", user="nosuchuser")
    with pytest.raises(AuthenticationException):
        sandbox.files.list(workdir, user="nosuchuser")


# --- URLs and raw /files ----------------------------------------------------------------------


def test_upload_url_and_download_url(sandbox, workdir):
    path = f"{workdir}/via-url.txt"
    up = sandbox.upload_url(path)
    body, ctype = multipart([("file", "ignored-name.txt", b"uploaded through a URL\n")])
    status, _, resp = http("POST", up, body, {"Content-Type": ctype})
    assert status == 200, resp
    down = sandbox.download_url(path)
    status, headers, content = http("GET", down)
    assert status == 200
    assert content == b"uploaded through a URL\n"
    assert sandbox.files.get_info(path).owner == "user"


def test_multipart_filenames_carry_full_paths(envd, sandbox, workdir):
    body, ctype = multipart(
        [
            ("file", f"{workdir}/mp/one.txt", b"1"),
            ("other", f"{workdir}/mp/ignored.txt", b"ignored"),
            ("file", f"{workdir}/mp/two/two.txt", b"2"),
        ]
    )
    status, _, resp = http("POST", f"{envd}/files", body, {"Content-Type": ctype})
    assert status == 200, resp
    import json

    assert [(f["path"], f["name"], f["type"]) for f in json.loads(resp)] == [
        (f"{workdir}/mp/one.txt", "one.txt", "file"),
        (f"{workdir}/mp/two/two.txt", "two.txt", "file"),
    ]
    assert sandbox.files.read(f"{workdir}/mp/one.txt") == "1"
    assert sandbox.files.read(f"{workdir}/mp/two/two.txt") == "2"
    assert sandbox.files.exists(f"{workdir}/mp/ignored.txt") is False


def test_raw_download_statuses(envd, workdir):
    import urllib.parse

    q = urllib.parse.urlencode({"path": f"{workdir}/absent"})
    assert http("GET", f"{envd}/files?{q}")[0] == 404
    q = urllib.parse.urlencode({"path": workdir})
    assert http("GET", f"{envd}/files?{q}")[0] == 400
    q = urllib.parse.urlencode({"path": workdir, "username": "nosuchuser"})
    assert http("GET", f"{envd}/files?{q}")[0] == 401


def test_error_replies_to_uploads_are_clean(sandbox, workdir):
    # An upload rejected before envd read its body must still reach the SDK as the mapped
    # error, never as a broken connection (httpx.WriteError): repeat to catch the race.
    sandbox.files.make_dir(f"{workdir}/adir")
    for _ in range(150):
        with pytest.raises(InvalidArgumentException):
            sandbox.files.write(f"{workdir}/adir", "x" * 1000)
        with pytest.raises(AuthenticationException):
            sandbox.files.write(f"{workdir}/f", "x" * 100_000, user="nosuchuser")


def test_unicode_and_space_in_names(sandbox, workdir):
    path = f"{workdir}/žluťoučký kůň & co.txt"
    info = sandbox.files.write(path, "ü")
    assert (info.path, info.name) == (path, "žluťoučký kůň & co.txt")
    assert [e.name for e in sandbox.files.list(workdir)] == ["žluťoučký kůň & co.txt"]
    assert sandbox.files.read(path) == "ü"
    status, _, body = http("GET", sandbox.download_url(path))
    assert (status, body) == (200, "ü".encode())


def test_list_does_not_descend_through_symlinks(sandbox, workdir):
    sandbox.files.write(f"{workdir}/real/inside.txt", "x")
    sandbox.commands.run(f"ln -s real {workdir}/link")
    entries = sandbox.files.list(workdir, depth=3)
    assert [e.path for e in entries] == [
        f"{workdir}/link",
        f"{workdir}/real",
        f"{workdir}/real/inside.txt",
    ]
    link = entries[0]
    assert link.symlink_target == f"{workdir}/real"
    # Listing the link itself follows it.
    assert [e.name for e in sandbox.files.list(f"{workdir}/link")] == ["inside.txt"]
