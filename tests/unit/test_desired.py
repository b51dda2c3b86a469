"""desired_state(): from real manifests (examples/ + fixture slices) to the frontends a node serves.

Each row of SCENARIOS loads manifests through ClusterState, computes the LBState for one node
and compares the whole result, written as a table:

    "<address>:<port>/<protocol> <scope>[ local-only]": ["<backend address:port/protocol>[ terminating]", ...]
"""

from __future__ import annotations

from ipaddress import IPv4Address, IPv4Network
from pathlib import Path

import pytest
import yaml

from ebpfsvc.config import NodeConfig
from ebpfsvc import desired
from ebpfsvc.desired import build_desired_state, desired_state, node_zone
from ebpfsvc.lbmodel import Algorithm, FrontendKey, FrontendKind, LBState, Protocol, Scope, ServicePortName
from ebpfsvc.sources.base import Event, EventType
from ebpfsvc.tracker import ClusterSnapshot, ClusterState

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples"
FIXTURES = Path(__file__).parent / "manifests" / "desired"

NODE1 = NodeConfig("node-1", node_addresses=("198.18.0.11",), zone="zone-a")
NODE2 = NodeConfig("node-2", node_addresses=("198.18.0.12",), zone="zone-b")
NODE3 = NodeConfig("node-3", node_addresses=("198.18.0.13",), zone="zone-c")   # no endpoints of its own


def documents(*files: str) -> list[dict]:
    docs = []
    for name in files:
        path = EXAMPLES / name if (EXAMPLES / name).exists() else FIXTURES / name
        docs += [d for d in yaml.safe_load_all(path.read_text()) if d]
    return docs


def load(*files: str, order=1) -> ClusterSnapshot:
    state = ClusterState(NodeConfig("any"))
    for doc in documents(*files)[::order]:
        state.on_event(Event(doc["kind"], EventType.ADDED, doc))
    assert state.problems == []
    return state.snapshot()


def table(lb: LBState) -> dict[str, list[str]]:
    out = {}
    for key, fe in sorted(lb.frontends.items()):
        label = f"{key.address}:{key.port}/{key.protocol.value} {key.scope.name.lower()}"
        label += " local-only" if fe.local_only else ""
        out[label] = [b.name + (" terminating" if b.terminating else "") + (" not-ready" if b.not_ready else "")
                      for b in fe.backends]
    return out


BOTH_PY = ["198.18.1.30:443/TCP", "198.18.2.30:443/TCP"]
TERMINATING_FALLBACK = ["198.18.1.80:8080/TCP terminating", "198.18.1.82:8080/TCP not-ready",
                        "198.18.2.80:8080/TCP terminating", "198.18.2.81:8080/TCP not-ready"]
DRAINING = ["198.18.1.85:8080/TCP", "198.18.1.86:8080/TCP terminating", "198.18.2.85:8080/TCP terminating",
            "198.18.2.86:8080/TCP not-ready"]

SCENARIOS = [
    # --- seed 000 §2.1: ClusterIP, endpoints merged from two slices
    ("clusterip", ("01-my-service.yaml", "my-service-slices.yaml"), NODE1, {
        "198.19.0.10:80/TCP internal": ["198.18.1.10:9376/TCP", "198.18.2.10:9376/TCP"],
    }),
    # --- seed 000 §2.1: named targetPort, resolved per endpoint by its slice
    ("named targetPort", ("02-nginx-service.yaml", "nginx-service-slices.yaml"), NODE1, {
        "198.19.0.11:80/TCP internal": ["198.18.1.20:8080/TCP", "198.18.2.20:8081/TCP"],
    }),
    # --- seed 000 §4.1
    ("service-python clusterip", ("05-service-python-clusterip.yaml", "pod-python-slices.yaml"), NODE1, {
        "198.19.0.20:3000/TCP internal": BOTH_PY,
    }),
    # --- seed 000 §4.2: NodePort on every node address, both scopes
    ("nodeport", ("06-service-python-nodeport.yaml", "pod-python-slices.yaml"), NODE1, {
        "198.18.0.11:30080/TCP external": BOTH_PY,
        "198.18.0.11:30080/TCP internal": BOTH_PY,
        "198.19.0.21:3000/TCP internal": BOTH_PY,
    }),
    ("nodeport, two node addresses",
     ("06-service-python-nodeport.yaml", "pod-python-slices.yaml"),
     NodeConfig("node-1", node_addresses=("198.18.0.11", "198.18.10.1")), {
        "198.18.0.11:30080/TCP external": BOTH_PY,
        "198.18.0.11:30080/TCP internal": BOTH_PY,
        "198.18.10.1:30080/TCP external": BOTH_PY,
        "198.18.10.1:30080/TCP internal": BOTH_PY,
        "198.19.0.21:3000/TCP internal": BOTH_PY,
    }),
    # --- seed 000 §4.3: LoadBalancer, externalTrafficPolicy Local: outside traffic only to this node's
    # endpoint (and dropped where there is none), pods on the node still reach every endpoint.
    ("loadbalancer etp=Local on node-1", ("07-service-python-loadbalancer.yaml", "pod-python-slices.yaml"), NODE1, {
        "198.18.0.11:30081/TCP external local-only": ["198.18.1.30:443/TCP"],
        "198.18.0.11:30081/TCP internal": BOTH_PY,
        "198.18.200.10:3000/TCP external local-only": ["198.18.1.30:443/TCP"],
        "198.18.200.10:3000/TCP internal": BOTH_PY,
        "198.19.0.22:3000/TCP internal": BOTH_PY,
    }),
    ("loadbalancer etp=Local on node-2", ("07-service-python-loadbalancer.yaml", "pod-python-slices.yaml"), NODE2, {
        "198.18.0.12:30081/TCP external local-only": ["198.18.2.30:443/TCP"],
        "198.18.0.12:30081/TCP internal": BOTH_PY,
        "198.18.200.10:3000/TCP external local-only": ["198.18.2.30:443/TCP"],
        "198.18.200.10:3000/TCP internal": BOTH_PY,
        "198.19.0.22:3000/TCP internal": BOTH_PY,
    }),
    ("loadbalancer etp=Local on a node without endpoints",
     ("07-service-python-loadbalancer.yaml", "pod-python-slices.yaml"), NODE3, {
        "198.18.0.13:30081/TCP external local-only": [],
        "198.18.0.13:30081/TCP internal": BOTH_PY,
        "198.18.200.10:3000/TCP external local-only": [],
        "198.18.200.10:3000/TCP internal": BOTH_PY,
        "198.19.0.22:3000/TCP internal": BOTH_PY,
    }),
    # --- seed 000 §4.5 externalIPs: both scopes, port is the Service port
    ("externalIPs", ("10-my-service-external-ips.yaml", "my-service-external-ips-slices.yaml"), NODE1, {
        "198.18.200.32:80/TCP external": ["198.18.2.40:49152/TCP"],
        "198.18.200.32:80/TCP internal": ["198.18.2.40:49152/TCP"],
        "198.19.0.24:80/TCP internal": ["198.18.2.40:49152/TCP"],
    }),
    # --- seed 000 §4.4 ExternalName, §5 headless: nothing, even with endpoints
    ("headless and ExternalName", ("09-service-python-externalname.yaml", "11-mysql-balance-svc-headless.yaml",
                                   "not-programmed-slices.yaml"), NODE1, {}),
    # --- seed 000 §6.1: selectorless Service with manual Endpoints
    ("manual endpoints plat-dev", ("12-plat-dev-manual-endpoints.yaml",), NODE1, {
        "198.19.0.30:3306/TCP internal": ["198.18.1.109:3306/TCP"],
    }),
    # --- seed 002: manual Endpoints with a named port
    ("manual endpoints mwish-bot-svc-redis", ("18-mwish-bot-svc-redis.yaml",), NODE2, {
        "198.19.0.51:6379/TCP internal": ["198.18.1.11:6379/TCP", "198.18.2.22:6379/TCP"],
    }),
    # --- seed 000 §6.2: a hand-written EndpointSlice
    ("hand-written slice", ("13-example-endpointslice.yaml",), NODE2, {
        "198.19.0.31:80/TCP internal": ["198.18.1.3:80/TCP"],
    }),
    # --- seed 000 §6.3: topology-aware hints, per zone
    ("hints zone-a", ("14-topology-aware-hints.yaml",), NODE1, {
        "198.19.0.32:80/TCP internal": ["198.18.1.4:80/TCP"],
    }),
    ("hints zone-b", ("14-topology-aware-hints.yaml",), NODE2, {
        "198.19.0.32:80/TCP internal": ["198.18.2.4:80/TCP"],
    }),
    ("hints: no endpoint for this zone -> all", ("14-topology-aware-hints.yaml",), NODE3, {
        "198.19.0.32:80/TCP internal": ["198.18.1.4:80/TCP", "198.18.2.4:80/TCP"],
    }),
    ("hints: zone unknown -> all", ("14-topology-aware-hints.yaml",), NodeConfig("node-9"), {
        "198.19.0.32:80/TCP internal": ["198.18.1.4:80/TCP", "198.18.2.4:80/TCP"],
    }),
    ("hints: zone from the Node object", ("14-topology-aware-hints.yaml", "nodes.yaml"), NodeConfig("node-2"), {
        "198.19.0.32:80/TCP internal": ["198.18.2.4:80/TCP"],
    }),
    ("hints: a Node with the beta zone label only -> all, as kube-proxy",
     ("14-topology-aware-hints.yaml", "node-beta-zone.yaml"), NodeConfig("node-beta"), {
        "198.19.0.32:80/TCP internal": ["198.18.1.4:80/TCP", "198.18.2.4:80/TCP"],
    }),
    ("hints: one usable endpoint without hints -> all", ("partial-hints.yaml",), NODE1, {
        "198.19.1.1:80/TCP internal": ["198.18.1.60:8080/TCP", "198.18.2.60:8080/TCP",
                                       "198.18.2.61:8080/TCP not-ready"],
    }),
    ("hints are used without the annotation, as kube-proxy", ("hints-without-annotation.yaml",), NODE1, {
        "198.19.1.2:80/TCP internal": ["198.18.1.62:8080/TCP"],
    }),
    # --- trafficDistribution: PreferSameNode: node hints, then zone hints, then all
    ("node hints on node-1", ("node-hints.yaml",), NODE1, {
        "198.19.1.12:80/TCP internal": ["198.18.1.63:8080/TCP"],
        "198.19.1.13:80/TCP internal": ["198.18.1.65:8080/TCP", "198.18.1.66:8080/TCP"],
    }),
    ("node hints on node-2", ("node-hints.yaml",), NODE2, {
        "198.19.1.12:80/TCP internal": ["198.18.2.63:8080/TCP", "198.18.2.64:8080/TCP"],
        "198.19.1.13:80/TCP internal": ["198.18.2.65:8080/TCP"],
    }),
    ("node hints: none for this node -> zone hints", ("node-hints.yaml",), NODE3, {
        "198.19.1.12:80/TCP internal": ["198.18.2.64:8080/TCP"],
        "198.19.1.13:80/TCP internal": ["198.18.1.65:8080/TCP", "198.18.1.66:8080/TCP", "198.18.2.65:8080/TCP"],
    }),
    ("node hints: none for this node nor zone -> all", ("node-hints.yaml",), NodeConfig("node-9"), {
        "198.19.1.12:80/TCP internal": ["198.18.1.63:8080/TCP", "198.18.2.63:8080/TCP", "198.18.2.64:8080/TCP"],
        "198.19.1.13:80/TCP internal": ["198.18.1.65:8080/TCP", "198.18.1.66:8080/TCP", "198.18.2.65:8080/TCP"],
    }),
    # --- seed 000 §2.4.1: internalTrafficPolicy Local
    ("itp=Local on the node with the endpoint", ("internal-traffic-local.yaml",), NODE1, {
        "198.19.1.3:53/TCP internal local-only": ["198.18.1.70:5353/TCP"],
        "198.19.1.3:53/UDP internal local-only": ["198.18.1.70:5353/UDP"],
    }),
    ("itp=Local elsewhere: drop", ("internal-traffic-local.yaml",), NODE2, {
        "198.19.1.3:53/TCP internal local-only": [],
        "198.19.1.3:53/UDP internal local-only": [],
    }),
    ("Local policies, no endpoint anywhere: reject on node-1", ("local-policy-no-endpoints.yaml",), NODE1, {
        "198.18.0.11:30420/TCP external": ["198.18.1.67:8080/TCP not-ready"],
        "198.18.0.11:30420/TCP internal": ["198.18.1.67:8080/TCP not-ready"],
        "198.19.1.14:80/TCP internal": ["198.18.1.67:8080/TCP not-ready"],
    }),
    ("Local policies, no endpoint anywhere: reject on node-2", ("local-policy-no-endpoints.yaml",), NODE2, {
        "198.18.0.12:30420/TCP external": [],
        "198.18.0.12:30420/TCP internal": ["198.18.1.67:8080/TCP not-ready"],
        "198.19.1.14:80/TCP internal": [],
    }),
    # --- endpoint conditions: serving+terminating fallback, cluster-wide and per node
    # (not ready, or terminating and not serving: listed only so their TCP connections carry on)
    ("terminating fallback on node-1", ("terminating.yaml",), NODE1, {
        "198.18.0.11:30400/TCP external local-only": ["198.18.1.80:8080/TCP terminating",
                                                      "198.18.1.82:8080/TCP not-ready"],
        "198.18.0.11:30400/TCP internal": TERMINATING_FALLBACK,
        "198.19.1.4:80/TCP internal": TERMINATING_FALLBACK,
    }),
    ("terminating fallback on node-3", ("terminating.yaml",), NODE3, {
        "198.18.0.13:30400/TCP external local-only": [],
        "198.18.0.13:30400/TCP internal": TERMINATING_FALLBACK,
        "198.19.1.4:80/TCP internal": TERMINATING_FALLBACK,
    }),
    # ready and serving+terminating endpoints together: the terminating ones drain (kept, marked)
    ("draining beside ready ones on node-1", ("draining.yaml",), NODE1, {
        "198.18.0.11:30410/TCP external local-only": ["198.18.1.85:8080/TCP", "198.18.1.86:8080/TCP terminating"],
        "198.18.0.11:30410/TCP internal": DRAINING,
        "198.19.1.40:80/TCP internal": DRAINING,
    }),
    ("draining beside ready ones on node-2", ("draining.yaml",), NODE2, {
        "198.18.0.12:30410/TCP external local-only": ["198.18.2.85:8080/TCP terminating",
                                                      "198.18.2.86:8080/TCP not-ready"],
        "198.18.0.12:30410/TCP internal": DRAINING,
        "198.19.1.40:80/TCP internal": DRAINING,
    }),
    ("publishNotReadyAddresses", ("publish-not-ready.yaml",), NODE1, {
        "198.19.1.5:7946/TCP internal": ["198.18.1.90:7946/TCP", "198.18.2.90:7946/TCP"],
    }),
    # --- several protocols on one port number
    ("UDP, TCP and SCTP", ("multi-protocol.yaml",), NODE1, {
        "198.19.1.7:5060/SCTP internal": ["198.18.1.110:5070/SCTP"],
        "198.19.1.7:5060/TCP internal": ["198.18.1.110:5060/TCP"],
        "198.19.1.7:5060/UDP internal": ["198.18.1.110:5060/UDP"],
    }),
    # --- labels that hand a Service to someone else
    ("service-proxy-name and headless labels", ("proxy-name.yaml",), NODE1, {}),
    ("proxy_name ebpfsvc answers to its label only", ("proxy-name.yaml", "01-my-service.yaml"),
     NodeConfig("node-1", proxy_name="ebpfsvc"), {
        "198.19.1.10:80/TCP internal": [],
    }),
]


@pytest.mark.parametrize("files,node,expected", [s[1:] for s in SCENARIOS], ids=[s[0] for s in SCENARIOS])
def test_scenario(files, node, expected):
    assert table(desired_state(load(*files), node)) == expected


# --- frontend attributes ------------------------------------------------------------------------

def frontend(lb: LBState, address: str, port: int, scope: Scope, protocol: Protocol = Protocol.TCP):
    return lb.frontends[FrontendKey(IPv4Address(address), port, protocol, scope)]


def test_frontend_kinds_and_service_port_names():
    lb = desired_state(load("07-service-python-loadbalancer.yaml", "10-my-service-external-ips.yaml"), NODE1)
    kinds = {(str(k.address), k.port, k.scope): fe.kind for k, fe in lb.frontends.items()}
    assert kinds[("198.19.0.22", 3000, Scope.INTERNAL)] is FrontendKind.CLUSTER_IP
    assert kinds[("198.18.0.11", 30081, Scope.EXTERNAL)] is FrontendKind.NODE_PORT
    assert kinds[("198.18.200.10", 3000, Scope.INTERNAL)] is FrontendKind.LOAD_BALANCER
    assert kinds[("198.18.200.32", 80, Scope.EXTERNAL)] is FrontendKind.EXTERNAL_IP
    assert frontend(lb, "198.18.200.32", 80, Scope.EXTERNAL).service == \
        ServicePortName("default", "my-service-external-ips", "http", Protocol.TCP)


def test_source_ranges_affinity_algorithm_app_protocol():
    lb = desired_state(load("source-ranges.yaml"), NODE1)
    ranges = (IPv4Network("198.18.0.100/32"), IPv4Network("198.18.0.0/28"))
    for scope in Scope:
        fe = frontend(lb, "198.18.200.60", 443, scope)
        assert fe.source_ranges == ranges
    assert frontend(lb, "198.18.0.11", 30443, Scope.EXTERNAL).source_ranges == ()
    assert frontend(lb, "198.19.1.6", 443, Scope.INTERNAL).source_ranges == ()
    for fe in lb.frontends.values():
        assert (fe.affinity_timeout, fe.algorithm, fe.app_protocol) == (600, Algorithm.RANDOM, "https")


@pytest.mark.parametrize("file,timeout", [("19-mwish-bot-session-affinity.yaml", 10800),
                                          ("22-myapp-session-affinity.yaml", 10800),
                                          ("21-myapp-svc.yaml", 0)])
def test_session_affinity_from_the_seeds(file, timeout):
    (fe,) = desired_state(load(file), NODE1).frontends.values()
    assert fe.affinity_timeout == timeout


@pytest.mark.parametrize("file,app_protocol", [("03-app-protocol.yaml", "HTTP"), ("16-aryido-external-ips.yaml", "http")])
def test_app_protocol_from_the_seeds(file, app_protocol):
    lb = desired_state(load(file), NODE1)
    assert {fe.app_protocol for fe in lb.frontends.values()} == {app_protocol}


def test_default_algorithm_comes_from_the_node():
    snap = load("01-my-service.yaml")
    (fe,) = desired_state(snap, NodeConfig("node-1", default_algorithm=Algorithm.RANDOM)).frontends.values()
    assert fe.algorithm is Algorithm.RANDOM
    (fe,) = desired_state(snap, NODE1).frontends.values()
    assert fe.algorithm is Algorithm.MAGLEV


def test_backend_local_node_and_zone():
    lb = desired_state(load("01-my-service.yaml", "my-service-slices.yaml"), NODE1)
    (fe,) = lb.frontends.values()
    assert [(b.local, b.node, b.zone) for b in fe.backends] == [(True, "node-1", "zone-a"), (False, "node-2", "zone-b")]


def test_backend_zone_falls_back_to_the_node_object():
    # Manual Endpoints carry no zone; the Node objects do.
    lb = desired_state(load("18-mwish-bot-svc-redis.yaml", "nodes.yaml"), NODE1)
    (fe,) = lb.frontends.values()
    assert [(str(b.address), b.local, b.zone) for b in fe.backends] == \
        [("198.18.1.11", True, "zone-a"), ("198.18.2.22", False, "zone-b")]


def test_unnamed_endpoints_port_does_not_match_a_named_service_port():
    # kube-proxy matches Endpoints ports to Service ports by name; a mismatch means no endpoints.
    docs = documents("18-mwish-bot-svc-redis.yaml")
    del docs[1]["subsets"][0]["ports"][0]["name"]
    state = ClusterState(NodeConfig("any"))
    for doc in docs:
        state.on_event(Event(doc["kind"], EventType.ADDED, doc))
    (fe,) = desired_state(state.snapshot(), NODE1).frontends.values()
    assert fe.backends == ()


# --- determinism and conflicts ----------------------------------------------------------------------

def test_event_order_does_not_matter():
    files = ("01-my-service.yaml", "my-service-slices.yaml", "02-nginx-service.yaml", "nginx-service-slices.yaml",
             "07-service-python-loadbalancer.yaml", "pod-python-slices.yaml", "14-topology-aware-hints.yaml")
    assert desired_state(load(*files), NODE2) == desired_state(load(*files, order=-1), NODE2)


def test_backends_are_sorted_by_name():
    lb = desired_state(load("01-my-service.yaml", "my-service-slices.yaml", "nginx-service-slices.yaml",
                            "02-nginx-service.yaml"), NODE1)
    for fe in lb.frontends.values():
        assert [b.name for b in fe.backends] == sorted(b.name for b in fe.backends)


def test_conflicting_frontends_first_service_wins_and_is_reported():
    result = build_desired_state(load("conflict.yaml"), NODE1)
    assert frontend(result.state, "198.18.200.70", 80, Scope.EXTERNAL).service.name == "a-first"
    assert frontend(result.state, "198.19.1.9", 80, Scope.INTERNAL).service.name == "b-second"
    assert [str(p) for p in result.conflicts] == [
        "Service default/b-second: spec.externalIPs: 198.18.200.70:80/TCP is already served by default/a-first; "
        "not programmed"]


def test_node_zone_prefers_the_config():
    snap = load("nodes.yaml")
    assert node_zone(snap, NodeConfig("node-1")) == "zone-a"
    assert node_zone(snap, NodeConfig("node-1", zone="zone-x")) == "zone-x"
    assert node_zone(snap, NodeConfig("node-7")) == ""


def test_empty_snapshot_gives_an_empty_state():
    assert desired_state(ClusterSnapshot(), NODE1) == LBState()


def test_every_example_together_on_both_nodes():
    files = sorted(p.name for p in EXAMPLES.glob("*.yaml"))
    snap = load(*files, "nodes.yaml")
    for node in (NODE1, NODE2):
        result = build_desired_state(snap, node)
        assert result.conflicts == ()
        services = {(fe.service.namespace, fe.service.name) for fe in result.state.frontends.values()}
        assert ("mysql-space", "mysql-balance-svc") not in services
        assert ("default", "service-python-externalname") not in services
        assert len(services) == 20
        # pure: the same input gives an equal (and equally hashed) state
        again = desired_state(snap, node)
        assert again == result.state and hash(again) == hash(result.state)


# --- reuse between calls ------------------------------------------------------------------------------

def fresh(snapshot, node) -> LBState:
    """desired_state without anything remembered from earlier calls."""
    return desired_state(snapshot, node)


def test_reuse_between_calls_gives_what_a_fresh_computation_gives():
    state = ClusterState(NodeConfig("any"))
    for doc in documents("01-my-service.yaml", "my-service-slices.yaml", "14-topology-aware-hints.yaml",
                         "18-mwish-bot-svc-redis.yaml", "nodes.yaml"):
        state.on_event(Event(doc["kind"], EventType.ADDED, doc))
    first = state.snapshot()
    node = NodeConfig("node-1", node_addresses=("198.18.0.11",))       # zone from the Node object
    builder = desired.DesiredStateBuilder(node)
    assert builder.build(first).state == fresh(first, node)
    # One slice loses an endpoint, and node-1 moves to zone-b: both must show in the next result.
    changed = documents("my-service-slices.yaml")[1]
    changed["endpoints"] = []
    state.on_event(Event("EndpointSlice", EventType.MODIFIED, changed))
    moved = documents("nodes.yaml")[0]
    moved["metadata"]["labels"]["topology.kubernetes.io/zone"] = "zone-b"
    state.on_event(Event("Node", EventType.MODIFIED, moved))
    second = state.snapshot()
    reused = builder.build(second).state
    assert reused == fresh(second, node)
    assert [b.name for b in frontend(reused, "198.19.0.10", 80, Scope.INTERNAL).backends] == ["198.18.1.10:9376/TCP"]
    assert [b.name for b in frontend(reused, "198.19.0.32", 80, Scope.INTERNAL).backends] == ["198.18.2.4:80/TCP"]
    # Another node's view is computed for that node, not reused from node-1's.
    assert desired.DesiredStateBuilder(NODE2).build(second).state == fresh(second, NODE2)


def test_external_ips_are_fenced_by_source_ranges_only_on_opt_in():
    lb = desired_state(load("external-ip-source-ranges.yaml"), NODE1)
    for scope in Scope:
        assert frontend(lb, "198.18.200.61", 80, scope).source_ranges == (IPv4Network("198.18.0.100/32"),)
        assert frontend(lb, "198.18.200.62", 80, scope).source_ranges == ()
    assert frontend(lb, "198.19.1.7", 80, Scope.INTERNAL).source_ranges == ()


def test_external_ip_source_ranges_annotation_must_be_a_boolean():
    doc = {"apiVersion": "v1", "kind": "Service",
           "metadata": {"name": "bad", "namespace": "default",
                        "annotations": {"ebpfsvc.io/external-ips-source-ranges": "yes please"}},
           "spec": {"clusterIP": "198.19.1.9", "ports": [{"port": 80}]}}
    state = ClusterState(NodeConfig("any"))
    state.on_event(Event("Service", EventType.ADDED, doc))
    (problem,) = state.problems
    assert problem.field == "metadata.annotations[ebpfsvc.io/external-ips-source-ranges]"
    assert "Service default/bad" in str(problem)


def _svc(name, created=None, cluster_ip="198.19.1.20", node_port=None, external_ips=()):
    port = {"name": "http", "port": 80, "targetPort": 8080}
    spec = {"clusterIP": cluster_ip, "ports": [port], "externalIPs": list(external_ips)}
    if node_port:
        spec["type"], port["nodePort"] = "NodePort", node_port
    meta = {"name": name, "namespace": "default"}
    if created:
        meta["creationTimestamp"] = created
    return {"apiVersion": "v1", "kind": "Service", "metadata": meta, "spec": spec}


def _snapshot(*objs) -> ClusterSnapshot:
    state = ClusterState(NodeConfig("any"))
    for obj in objs:
        state.on_event(Event(obj["kind"], EventType.ADDED, obj))
    assert state.problems == []
    return state.snapshot()


def test_conflicts_oldest_service_wins_whatever_its_name():
    # "a-newer" sorts first by name but was created later: the older "z-older" keeps the clusterIP,
    # the NodePort and the externalIP, on every node, whatever order the events came in.
    older = _svc("z-older", "2026-01-01T00:00:00Z", node_port=30080, external_ips=["198.18.200.71"])
    newer = _svc("a-newer", "2026-01-02T10:00:00+02:00", node_port=30080, external_ips=["198.18.200.71"])
    for objs in ((older, newer), (newer, older)):
        result = build_desired_state(_snapshot(*objs), NODE1)
        assert {fe.service.name for fe in result.state.frontends.values()} == {"z-older"}
        assert sorted({p.field for p in result.conflicts}) == ["spec.clusterIP", "spec.externalIPs",
                                                              "spec.ports[0].nodePort"]
        assert {p.name for p in result.conflicts} == {"a-newer"}
        assert ("Service default/a-newer: spec.ports[0].nodePort: 198.18.0.11:30080/TCP is already served by "
                "default/z-older; not programmed") in [str(p) for p in result.conflicts]


def test_same_creation_time_goes_by_name():
    a, b = _svc("b-svc", "2026-01-01T00:00:00Z"), _svc("a-svc", "2026-01-01T00:00:00Z")
    result = build_desired_state(_snapshot(a, b), NODE1)
    assert {fe.service.name for fe in result.state.frontends.values()} == {"a-svc"}


def test_a_service_whose_frontends_fail_costs_only_itself(monkeypatch):
    real = desired._port_frontends

    def flaky(snapshot, node, zone, svc, *args):
        if svc.name == "broken":
            raise RuntimeError("boom")
        return real(snapshot, node, zone, svc, *args)

    monkeypatch.setattr(desired, "_port_frontends", flaky)
    builder = desired.DesiredStateBuilder(NODE1)
    first = builder.build(_snapshot(_svc("broken", cluster_ip="198.19.1.21"), _svc("fine")))
    assert {fe.service.name for fe in first.state.frontends.values()} == {"fine"}
    assert [str(p) for p in first.failures] == [
        "Service default/broken: frontends cannot be computed (RuntimeError: boom); not programmed"]
    monkeypatch.setattr(desired, "_port_frontends", real)
    again = builder.build(_snapshot(_svc("broken", cluster_ip="198.19.1.22"), _svc("fine")))
    assert {fe.service.name for fe in again.state.frontends.values()} == {"fine", "broken"}
    assert again.failures == ()
