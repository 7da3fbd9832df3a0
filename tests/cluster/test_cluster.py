"""Cluster mode end to end (issue 7): PostgreSQL, one api (and a second replica), one proxy and
three nodes in network namespaces of their own (cluster.py), driven with the official Python
SDK and the REST API.

The tests run in file order and share the cluster: spread, node loss and return, api restart,
two replicas.
"""

from __future__ import annotations

import concurrent.futures as cf
import os
import threading
import time
import urllib.request

import pytest
from e2b import Sandbox

from cluster import Cluster, LOST_AFTER_S, wait_for


@pytest.fixture(scope="module")
def cluster(request):
    c = Cluster()
    try:
        os.environ.update(c.start())
        yield c
    except BaseException:
        print(c.logs())
        raise
    finally:
        if request.session.testsfailed:
            print(c.logs())
        problems = c.close()
        if problems:
            pytest.fail("the cluster left these behind:\n  " + "\n  ".join(problems))


def by_node(c: Cluster) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for s in c.listed():
        out.setdefault(s["nodeID"], []).append(s["sandboxID"])
    return out


def echo(sbx: Sandbox, text: str) -> str:
    return sbx.commands.run(f"echo {text}", timeout=30).stdout.strip()


def test_thirty_sandboxes_spread_over_three_nodes(cluster):
    def make(i: int) -> Sandbox:
        sbx = Sandbox.create(timeout=600)
        assert echo(sbx, f"hello-{i}") == f"hello-{i}"
        return sbx

    with cf.ThreadPoolExecutor(6) as pool:
        made = list(pool.map(make, range(30)))
    assert len({s.sandbox_id for s in made}) == 30
    placed = by_node(cluster)
    counts = {n: len(ids) for n, ids in placed.items()}
    print(f"placement: {counts}")
    assert set(counts) == {"node1", "node2", "node3"}, counts
    assert sum(counts.values()) == 30
    # Least loaded of K=3: no node gets far more than its share.
    assert min(counts.values()) >= 6, counts
    # Each node really runs what the api says it placed there.
    for n in cluster.nodes:
        wait_for(
            f"{n.node_id} runs its sandboxes",
            lambda n=n: set(n.host.handed_out()) == set(placed[n.node_id]),
            10,
        )
    # Every sandbox answers through the proxy, whichever node holds it.
    for sbx in made[:: 5]:
        assert echo(sbx, "again") == "again"


def test_lost_node_is_reported_and_avoided_then_reconciles(cluster):
    placed = by_node(cluster)
    lost = cluster.node("node3")
    keep = Sandbox.connect(placed["node1"][0])
    victims = placed["node3"]
    assert len(victims) >= 2
    lost.proc.kill9()
    killed_at = time.monotonic()

    def reported_lost() -> bool:
        items = {s["sandboxID"]: s for s in cluster.listed()}
        return all(items[v].get("nodeStatus") == "lost" for v in victims)

    wait_for("node3's sandboxes reported lost", reported_lost, LOST_AFTER_S + 10)
    print(f"node kill -> sandboxes reported lost: {time.monotonic() - killed_at:.1f} s")
    info = cluster.request("GET", f"/sandboxes/{victims[0]}")
    assert info.status == 200 and info.json()["nodeStatus"] == "lost"
    assert info.json()["state"] in ("running", "paused")  # still a state the SDKs know
    # The others keep serving.
    assert echo(keep, "still-here") == "still-here"
    # Through the proxy a lost node's sandbox is "not found" (E2B's 502).
    req = urllib.request.Request(
        cluster.env["E2B_SANDBOX_URL"] + "/health",
        headers={"E2b-Sandbox-Id": victims[0], "E2b-Sandbox-Port": "49983"},
    )
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(req, timeout=10)
    assert e.value.code == 502
    assert b"not found" in e.value.read().lower()
    # New sandboxes go elsewhere.
    fresh = [Sandbox.create(timeout=300) for _ in range(3)]
    for s in fresh:
        assert cluster.request("GET", f"/sandboxes/{s.sandbox_id}").json()["nodeID"] != "node3"
        s.kill()
    # Killed while its node is away: the record goes now, the sandbox when the node returns.
    gone = victims[0]
    assert cluster.request("DELETE", f"/sandboxes/{gone}").status == 204
    assert cluster.request("GET", f"/sandboxes/{gone}").status == 404

    cluster.restart_node(lost)
    wait_for(
        "node3 ready again",
        lambda: any(n["node_id"] == "node3" and n["status"] == "ready" for n in cluster.node_infos()),
        60,
    )
    # It reconciled: the sandbox killed meanwhile is gone from the host, the others run on.
    wait_for("node3 killed what the api no longer knows", lambda: gone not in lost.host.handed_out(), 30)
    survivors = victims[1:]
    assert set(lost.host.handed_out()) == set(survivors)
    items = {s["sandboxID"]: s for s in cluster.listed()}
    for v in survivors:
        assert items[v]["nodeStatus"] == "ready"
    sbx = Sandbox.connect(survivors[0])
    assert echo(sbx, "back") == "back"


def test_api_restart_mid_traffic_loses_no_record(cluster):
    placed = by_node(cluster)
    target = Sandbox.connect(placed["node1"][0])
    short = Sandbox.create(timeout=3)
    short_node = cluster.node(cluster.request("GET", f"/sandboxes/{short.sandbox_id}").json()["nodeID"])
    before = {s["sandboxID"] for s in cluster.listed()} - {short.sandbox_id}
    stop = threading.Event()
    results: list[tuple[float, bool]] = []

    def traffic():
        while not stop.is_set():
            try:
                ok = echo(target, "tick") == "tick"
            except Exception:  # noqa: BLE001 - counted, not raised
                ok = False
            results.append((time.monotonic(), ok))
            time.sleep(0.05)

    t = threading.Thread(target=traffic)
    t.start()
    try:
        time.sleep(1)
        api = cluster.apis[0]
        api.kill9()
        # The sandbox's deadline passes while no api runs: its node ends it anyway.
        wait_for(
            "the short-lived sandbox expired on its node",
            lambda: short.sandbox_id not in short_node.host.handed_out(),
            20,
        )
        api.start()
        restarted = time.monotonic()
        wait_for("api back", lambda: cluster.get_health(cluster.api_port), 60)
        time.sleep(2)
    finally:
        stop.set()
        t.join()
    after = {s["sandboxID"] for s in cluster.listed()}
    assert after == before, (before - after, after - before)
    assert cluster.request("GET", f"/sandboxes/{short.sandbox_id}").status == 404
    later = [ok for ts, ok in results if ts > restarted + 1]
    assert later and all(later), results[-10:]
    assert echo(target, "after") == "after"


def test_two_api_replicas_never_double_place_or_double_kill(cluster):
    second = cluster.new_api()
    ports = [cluster.api_port, second.port]

    def create(port: int) -> str:
        r = cluster.request("POST", "/sandboxes", {"templateID": "base", "timeout": 300}, port=port)
        assert r.status == 201, (r.status, r.body)
        return r.json()["sandboxID"]

    with cf.ThreadPoolExecutor(8) as pool:
        ids = list(pool.map(create, [ports[i % 2] for i in range(16)]))
    assert len(set(ids)) == 16
    items = {s["sandboxID"]: s for s in cluster.listed(port=second.port)}
    for n in cluster.nodes:
        mine = {i for i in ids if items[i]["nodeID"] == n.node_id}
        on_host = set(n.host.handed_out()) & set(ids)
        assert on_host == mine, (n.node_id, on_host ^ mine)
    # Both replicas kill the same sandboxes at once: each ends exactly once.
    with cf.ThreadPoolExecutor(8) as pool:
        statuses = list(
            pool.map(
                lambda a: cluster.request("DELETE", f"/sandboxes/{a[0]}", port=a[1]).status,
                [(i, p) for i in ids for p in ports],
            )
        )
    for k, i in enumerate(ids):
        pair = sorted(statuses[2 * k : 2 * k + 2])
        assert pair in ([204, 404], [204, 204]), (i, pair)
    for port in ports:
        assert not set(ids) & {s["sandboxID"] for s in cluster.listed(port=port)}
    for n in cluster.nodes:
        wait_for(f"{n.node_id} ended them", lambda n=n: not set(ids) & set(n.host.handed_out()), 20)
