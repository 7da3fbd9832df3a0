"""Drives arca-api with the official E2B Python SDK (control plane only).

Run by tests/sdk.rs with E2B_API_URL/E2B_API_KEY pointing at a test server
whose node is a fake: nothing here talks to envd.
"""

from datetime import datetime, timezone

import e2b
from e2b import Sandbox, SandboxQuery

version = e2b.__version__ if hasattr(e2b, "__version__") else "?"

# Create through whichever endpoint this SDK generation uses (v1 or v2).
sbx = Sandbox.create(template="base", metadata={"who": "sdk"}, timeout=60)
sid = sbx.sandbox_id
other = Sandbox.create(template="base", metadata={"who": "else"})

info = Sandbox.get_info(sid)
assert info.sandbox_id == sid, info
assert info.template_id == "base", info
assert info.metadata == {"who": "sdk"}, info
assert info.cpu_count == 2 and info.memory_mb == 512, info
assert info.envd_version == "0.6.13", info
assert 50 < (info.end_at - datetime.now(timezone.utc)).total_seconds() <= 60, info

paginator = Sandbox.list(query=SandboxQuery(metadata={"who": "sdk"}))
items = paginator.next_items()
assert [s.sandbox_id for s in items] == [sid], items
assert not paginator.has_next

paginator = Sandbox.list(limit=1)
seen = []
while paginator.has_next:
    seen.extend(s.sandbox_id for s in paginator.next_items())
assert sorted(seen) == sorted([sid, other.sandbox_id]), seen

Sandbox.set_timeout(sid, 600)
info = Sandbox.get_info(sid)
assert 590 < (info.end_at - datetime.now(timezone.utc)).total_seconds() <= 600, info

metrics = Sandbox.get_metrics(sid)
assert len(metrics) == 3 and metrics[0].cpu_count == 2, metrics

assert Sandbox.kill(sid) is True
assert Sandbox.kill(sid) is False
try:
    Sandbox.get_info(sid)
    raise AssertionError("get_info of a killed sandbox must raise")
except e2b.NotFoundException:
    pass
try:
    Sandbox.set_timeout(sid, 10)
    raise AssertionError("set_timeout of a killed sandbox must raise")
except e2b.NotFoundException:
    pass
assert other.kill() is True
print("sdk ok", version)
