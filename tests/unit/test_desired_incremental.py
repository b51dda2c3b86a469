"""DesiredStateBuilder: the incremental result equals a fresh computation after any sequence of changes.

Property-style: a seeded random generator drives ClusterState through Services added, changed
and removed (ClusterIP / NodePort / LoadBalancer, traffic policies, hints, affinity, source
ranges), EndpointSlices changed, Services claiming the same frontends (shared clusterIPs,
externalIPs, nodePorts) and Node zone changes.  After every step the builder's result
(state and conflicts) must equal build_desired_state() on the same snapshot, and its LBDelta must
name every frontend key that differs from the previous result.
"""

from __future__ import annotations

import random

import pytest

from ebpfsvc.config import NodeConfig
from ebpfsvc.desired import DesiredStateBuilder, build_desired_state
from ebpfsvc.sources.base import Event, EventType
from ebpfsvc.tracker import ClusterSnapshot, ClusterState

NODE = NodeConfig("node-1", node_addresses=("198.18.0.11",))     # zone from its Node object
NAMES = [("default", f"s{i}") for i in range(6)] + [("other", f"s{i}") for i in range(3)]
NODES = ["node-1", "node-2", "node-3"]
ZONES = ["zone-a", "zone-b"]


def random_service(rng: random.Random, ns: str, name: str) -> dict:
    kind = rng.choice(["ClusterIP", "ClusterIP", "NodePort", "LoadBalancer"])
    ports = []
    for pname, proto in rng.sample([("http", "TCP"), ("dns", "UDP"), ("web", "TCP")], rng.randint(1, 2)):
        port = {"name": pname, "protocol": proto, "port": rng.choice([80, 53, 8080]), "targetPort": pname}
        if kind != "ClusterIP":
            port["nodePort"] = rng.randint(30000, 30003)          # small range: Services collide
        ports.append(port)
    if len({(p["port"], p["protocol"]) for p in ports}) < len(ports):
        ports = ports[:1]
    spec = {"type": kind, "clusterIP": f"198.19.0.{rng.randint(1, 7)}", "ports": ports,
            "internalTrafficPolicy": rng.choice(["Cluster", "Local"])}
    if kind != "ClusterIP":
        spec["externalTrafficPolicy"] = rng.choice(["Cluster", "Local"])
    if rng.random() < 0.3:
        spec["externalIPs"] = [f"198.18.200.{rng.randint(1, 3)}"]
    if rng.random() < 0.2:
        spec["sessionAffinity"] = "ClientIP"
    if rng.random() < 0.2:
        spec["publishNotReadyAddresses"] = True
    meta = {"name": name, "namespace": ns}
    if rng.random() < 0.3:
        meta["annotations"] = {"service.kubernetes.io/topology-mode": "Auto"}
    obj = {"apiVersion": "v1", "kind": "Service", "metadata": meta, "spec": spec}
    if kind == "LoadBalancer" and rng.random() < 0.7:
        obj["status"] = {"loadBalancer": {"ingress": [{"ip": f"198.18.201.{rng.randint(1, 3)}"}]}}
        if rng.random() < 0.5:
            spec["loadBalancerSourceRanges"] = [f"198.18.{rng.randint(0, 3)}.0/24"]
    return obj


def random_slice(rng: random.Random, ns: str, name: str, index: int) -> dict:
    endpoints = []
    for _ in range(rng.randint(0, 4)):
        ep = {"addresses": [f"198.18.2.{rng.randint(1, 9)}"], "nodeName": rng.choice(NODES),
              "conditions": {"ready": rng.random() < 0.8, "serving": rng.random() < 0.8,
                             "terminating": rng.random() < 0.2}}
        if rng.random() < 0.5:
            ep["zone"] = rng.choice(ZONES)
        if rng.random() < 0.6:
            ep["hints"] = {"forZones": [{"name": rng.choice(ZONES)}]}
        endpoints.append(ep)
    ports = [{"name": pname, "protocol": proto, "port": rng.choice([8080, 9090])}
             for pname, proto in (("http", "TCP"), ("dns", "UDP"), ("web", "TCP")) if rng.random() < 0.7]
    return {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {"name": f"{name}-{index}", "namespace": ns,
                         "labels": {"kubernetes.io/service-name": name}},
            "addressType": "IPv4", "ports": ports, "endpoints": endpoints}


def random_node(rng: random.Random, name: str) -> dict:
    labels = {"kubernetes.io/hostname": name}
    if rng.random() < 0.8:
        labels["topology.kubernetes.io/zone"] = rng.choice(ZONES)
    return {"apiVersion": "v1", "kind": "Node", "metadata": {"name": name, "labels": labels},
            "status": {"addresses": [{"type": "InternalIP", "address": f"198.18.0.{11 + NODES.index(name)}"}]}}


def random_event(rng: random.Random) -> Event:
    ns, name = rng.choice(NAMES)
    roll = rng.random()
    if roll < 0.3:
        return Event("Service", EventType.MODIFIED, random_service(rng, ns, name))
    if roll < 0.4:
        return Event("Service", EventType.DELETED, {"kind": "Service", "metadata": {"name": name, "namespace": ns}})
    if roll < 0.8:
        return Event("EndpointSlice", EventType.MODIFIED, random_slice(rng, ns, name, rng.randint(0, 1)))
    if roll < 0.88:
        return Event("EndpointSlice", EventType.DELETED,
                     {"kind": "EndpointSlice", "metadata": {"name": f"{name}-{rng.randint(0, 1)}", "namespace": ns}})
    return Event("Node", EventType.MODIFIED, random_node(rng, rng.choice(NODES)))


def check(builder: DesiredStateBuilder, snap: ClusterSnapshot, previous) -> None:
    got = builder.build(snap)
    want = build_desired_state(snap, builder.node)
    assert got.state == want.state
    assert got.conflicts == want.conflicts
    if previous is None:
        return
    if got is previous:
        assert previous.state == want.state
        return
    delta = got.delta
    if delta is None:
        return                                  # a context change: the writer finds the difference
    assert delta.base is previous.state
    for key in previous.state.frontends.keys() | got.state.frontends.keys():
        if key not in delta.keys:
            assert previous.state.frontends.get(key) is got.state.frontends.get(key), key


@pytest.mark.parametrize("seed", range(12))
def test_incremental_equals_fresh_over_random_changes(seed):
    rng = random.Random(seed)
    state = ClusterState(NodeConfig("any"))
    builder = DesiredStateBuilder(NODE)
    previous = None
    for _ in range(60):
        for _ in range(rng.randint(1, 4)):
            state.on_event(random_event(rng))
        assert state.problems == []
        snap = state.snapshot()
        if rng.random() < 0.1:
            # A snapshot the builder never sees: the next one's `changed` is not relative to the
            # builder's, so it must find the differences by comparing.
            for _ in range(rng.randint(1, 3)):
                state.on_event(random_event(rng))
            snap = state.snapshot()
        check(builder, snap, previous)
        previous = builder.result


def test_conflicts_move_when_the_holder_goes():
    state = ClusterState(NodeConfig("any"))
    builder = DesiredStateBuilder(NODE)
    rng = random.Random(1)
    a, b = random_service(rng, "default", "a"), random_service(rng, "default", "b")
    for svc in (a, b):
        svc["spec"].update(type="ClusterIP", clusterIP="198.19.0.9", externalIPs=[])
        svc["spec"]["ports"] = [{"name": "http", "port": 80, "protocol": "TCP"}]
        svc.pop("status", None)
        state.on_event(Event("Service", EventType.ADDED, svc))
    first = builder.build(state.snapshot())
    (fe,) = first.state.frontends.values()
    assert fe.service.name == "a" and [p.name for p in first.conflicts] == ["b"]
    state.on_event(Event("Service", EventType.DELETED, a))
    second = builder.build(state.snapshot())
    (fe,) = second.state.frontends.values()
    assert fe.service.name == "b" and second.conflicts == ()
    assert second.delta.keys == {fe.key}
    check(builder, state.snapshot(), second)


def test_unchanged_snapshot_returns_the_same_result():
    state = ClusterState(NodeConfig("any"))
    rng = random.Random(7)
    for _ in range(30):
        state.on_event(random_event(rng))
    builder = DesiredStateBuilder(NODE)
    first = builder.build(state.snapshot())
    assert builder.build(state.snapshot()) is first
    # A snapshot built by hand (no origin) is compared object by object: still nothing changed.
    snap = state.snapshot()
    same = ClusterSnapshot(services=dict(snap.services), endpoints=dict(snap.endpoints),
                           nodes=dict(snap.nodes), synced=True)
    assert builder.build(same) is first


def test_desired_state_is_pure():
    state = ClusterState(NodeConfig("any"))
    rng = random.Random(3)
    for _ in range(40):
        state.on_event(random_event(rng))
    snap = state.snapshot()
    assert build_desired_state(snap, NODE) == build_desired_state(snap, NODE)
