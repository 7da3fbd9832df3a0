"""Drives forks and snapshots of arca-api with the official E2B Python SDK.

Run by tests/sdk.rs with E2B_API_URL/E2B_API_KEY pointing at a test server
whose node is a fake: nothing here talks to envd.
"""

import inspect

import e2b
from e2b import Sandbox

version = e2b.__version__ if hasattr(e2b, "__version__") else "?"

sbx = Sandbox.create(template="base", metadata={"who": "sdk"}, timeout=60)
sid = sbx.sandbox_id

# Fork: instance and static forms; each fork is a Sandbox of its own.
forks = sbx.fork(count=2, timeout=30)
assert len(forks) == 2, forks
assert all(isinstance(f, Sandbox) for f in forks), forks
ids = {f.sandbox_id for f in forks}
assert len(ids) == 2 and sid not in ids, ids
for f in forks:
    info = Sandbox.get_info(f.sandbox_id)
    assert info.metadata == {"who": "sdk"}, info
    assert info.template_id == "base", info
(one,) = Sandbox.fork(sid)
assert isinstance(one, Sandbox) and one.sandbox_id not in ids | {sid}, one
try:
    Sandbox.fork("inope")
    raise AssertionError("fork of an unknown sandbox must raise")
except e2b.NotFoundException:
    pass

# Snapshots: named and unnamed, instance and static forms.
named = sbx.create_snapshot(name="sdk-snap")
assert named.snapshot_id == "sdk-snap:default", named
assert named.names == ["sdk-snap"], named
unnamed = Sandbox.create_snapshot(sid)
assert unnamed.snapshot_id.endswith(":default"), unnamed
assert unnamed.names == [], unnamed
# SDKs with snapshot modes (2.63) send memory: true for mode="full".
if "mode" in inspect.signature(Sandbox._cls_create_snapshot).parameters:
    try:
        sbx.create_snapshot(mode="full")
        raise AssertionError("a memory snapshot must be refused")
    except e2b.SandboxException as e:
        assert "memory" in str(e), e

# Sandboxes start from a snapshot by its id.
child = Sandbox.create(template=named.snapshot_id)
assert Sandbox.get_info(child.sandbox_id).template_id != "base"
child2 = Sandbox.create(template=unnamed.snapshot_id)

# Listing: all, by source, by name, paged.
def all_ids(paginator):
    seen = []
    while paginator.has_next:
        seen.extend(s.snapshot_id for s in paginator.next_items())
    return seen

assert all_ids(Sandbox.list_snapshots()) == [unnamed.snapshot_id, named.snapshot_id]
assert all_ids(sbx.list_snapshots()) == [unnamed.snapshot_id, named.snapshot_id]
assert all_ids(Sandbox.list_snapshots(sandbox_id=child.sandbox_id)) == []
assert all_ids(Sandbox.list_snapshots(name="sdk-snap")) == [named.snapshot_id]
assert all_ids(Sandbox.list_snapshots(name="nope")) == []
assert all_ids(Sandbox.list_snapshots(limit=1)) == [
    unnamed.snapshot_id,
    named.snapshot_id,
]

# Deleting: True, then False; gone from the list.
assert Sandbox.delete_snapshot(named.snapshot_id) is True
assert Sandbox.delete_snapshot(named.snapshot_id) is False
assert all_ids(Sandbox.list_snapshots()) == [unnamed.snapshot_id]
assert Sandbox.delete_snapshot(unnamed.snapshot_id) is True
assert all_ids(Sandbox.list_snapshots()) == []

for s in [sbx, *forks, one, child, child2]:
    assert s.kill() is True
print("sdk snapshots ok", version)
