"""Drives the network settings of arca-api with the official E2B Python SDK.

Run by tests/sdk.rs with E2B_API_URL/E2B_API_KEY pointing at a test server
whose node is a fake: nothing here talks to envd or reaches a sandbox.
"""

import e2b
from e2b import Sandbox
from e2b.sandbox.network import ALL_TRAFFIC
from e2b.sandbox.sandbox_api import SandboxNetworkOpts, SandboxNetworkUpdate

version = e2b.__version__ if hasattr(e2b, "__version__") else "?"
# 2.63 knows dnsServers and httpsPorts; 2.45 does not.
has_dns = "dns_servers" in SandboxNetworkOpts.__annotations__
has_https_ports = "https_ports" in SandboxNetworkOpts.__annotations__
update_has_dns = "dns_servers" in SandboxNetworkUpdate.__annotations__


def refused(fn, needle):
    try:
        fn()
    except e2b.SandboxException as e:
        assert needle in str(e), (needle, e)
        return e
    raise AssertionError(f"expected a refusal mentioning {needle!r}")


network = {
    "allow_out": ["10.1.0.0/16", "allowed.test", "*.wild.test"],
    "deny_out": [ALL_TRAFFIC],
    "allow_public_traffic": False,
    "mask_request_host": "${PORT}-masked.test",
}
if has_dns:
    network["dns_servers"] = ["198.18.0.2"]

sbx = Sandbox.create(template="base", network=network, allow_internet_access=False)
sid = sbx.sandbox_id
token = sbx.traffic_access_token
assert isinstance(token, str) and len(token) == 64, token

info = sbx.get_info()
assert info.allow_internet_access is False, info
want = {
    "allow_out": ["10.1.0.0/16", "allowed.test", "*.wild.test"],
    "deny_out": [ALL_TRAFFIC],
    "allow_public_traffic": False,
    "mask_request_host": "${PORT}-masked.test",
}
if has_dns:
    want["dns_servers"] = ["198.18.0.2"]
assert info.network == want, info.network

# connect hands out the same token.
again = Sandbox.connect(sid)
assert again.traffic_access_token == token, again.traffic_access_token

# A public sandbox has none, and no network in its info.
public = Sandbox.create(template="base")
assert public.traffic_access_token is None, public.traffic_access_token
pinfo = public.get_info()
assert pinfo.network is None, pinfo.network
# 2.45 always sends allow_internet_access: true; 2.63 omits it.
assert pinfo.allow_internet_access in (None, True), pinfo

# Live replacement: egress changes, ingress stays.
update = {"allow_out": ["1.2.3.4", "new.test"], "deny_out": [ALL_TRAFFIC]}
if update_has_dns:
    update["dns_servers"] = ["9.9.9.9"]
sbx.update_network(update)
info = Sandbox.get_info(sid)
want = {
    "allow_out": ["1.2.3.4", "new.test"],
    "deny_out": [ALL_TRAFFIC],
    "allow_public_traffic": False,
    "mask_request_host": "${PORT}-masked.test",
}
if update_has_dns:
    want["dns_servers"] = ["9.9.9.9"]
assert info.network == want, info.network
# Omitted allow_internet_access is cleared.
assert info.allow_internet_access is None, info

# The static form; allow_internet_access alone.
Sandbox.update_network(sid, {"allow_internet_access": False})
info = sbx.get_info()
assert info.allow_internet_access is False, info
assert info.network == {
    "allow_public_traffic": False,
    "mask_request_host": "${PORT}-masked.test",
}, info.network

# What cannot be enforced is refused with the reason.
refused(lambda: sbx.update_network({"allow_out": ["example.com"]}), "0.0.0.0/0")
refused(lambda: sbx.update_network({"deny_out": ["example.com"]}), "no domains")
refused(
    lambda: sbx.update_network(
        {"rules": {"api.test": [{"transform": {"headers": {"X-Key": "v"}}}]}}
    ),
    "network.rules",
)
refused(
    lambda: Sandbox.create(
        template="base",
        network={
            "deny_out": [ALL_TRAFFIC],
            "rules": {"api.test": [{"transform": {"headers": {"X-Key": "v"}}}]},
        },
    ),
    "network.rules",
)
refused(
    lambda: Sandbox.create(
        template="base", network={"egress_proxy": {"address": "127.0.0.1:1080"}}
    ),
    "network.egressProxy",
)
if has_https_ports:
    refused(
        lambda: Sandbox.create(template="base", network={"https_ports": [3000]}),
        "network.httpsPorts",
    )
refused(
    lambda: Sandbox.create(template="base", network={"allow_out": ["allowed.test"]}),
    "0.0.0.0/0",
)

try:
    Sandbox.update_network("inope", {"deny_out": [ALL_TRAFFIC]})
    raise AssertionError("update_network of an unknown sandbox must raise")
except e2b.NotFoundException:
    pass

# Paused: 409.
sbx.pause()
refused(lambda: sbx.update_network({"deny_out": [ALL_TRAFFIC]}), "paused")

for s in [sbx, public]:
    assert s.kill() is True
print("sdk network ok", version)
