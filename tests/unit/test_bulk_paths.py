"""The full sync's fast paths give exactly what the per-object paths give (issue 12).

A full sync reads 100,000 endpoints and derives 100,000 backends: the bulk paths skip the generic
field readers and the per-address merge for the usual shapes.  Each is compared here with the
path it shortcuts, over generated inputs that vary what those paths read (conditions, hints,
families, odd types, bad values), so a shortcut can only ever decide what the slow path decides.
"""

from __future__ import annotations

import copy
import ipaddress
import pickle
import random

import pytest

from ebpfsvc import maglev
from ebpfsvc.config import NodeConfig
from ebpfsvc.k8s import endpointslice, service
from ebpfsvc.k8s.endpointslice import Endpoint
from ebpfsvc.k8s.endpointslice import _endpoint, _plain_endpoint
from ebpfsvc.k8s.fields import Fields, Invalid
from ebpfsvc.lbmodel import Backend, Protocol


def _outcome(fn):
    try:
        return ("ok", fn())
    except Invalid as err:
        return ("invalid", err.field, err.message)


# Values each endpoint field may take: (usual ones, odd types or bad values).
_FIELDS = {
    "addresses": ([["198.18.0.1"], ["198.18.0.2", "198.18.0.3"], [" 198.18.0.4 "], ["2001:2::1"],
                   ["2001:2::2", "2001:2::3"]],
                  [[], None, ["198.18.0.300"], [5], "198.18.0.1", ["198.18.0.1", "2001:2::1"], ["01.2.3.4"],
                   ["198.18.0.1"] * 101]),
    "conditions": ([None, {}, {"ready": True}, {"ready": False},
                    {"ready": False, "serving": True, "terminating": True},
                    {"ready": False, "serving": False, "terminating": True}, {"serving": None, "terminating": False}],
                   [{"ready": "true"}, {"ready": 1}, [], "ready"]),
    "nodeName": ([None, "", "node-1", "node-2"], [7, ["x"]]),
    "zone": ([None, "", "zone-a"], [7]),
    "hostname": ([None, "", "pod-1"], [False]),
    "hints": ([None], [{}, {"forZones": [{"name": "zone-a"}]}, {"forNodes": [{"name": "node-1"}]},
                       {"forZones": "x"}]),
}


def _random_endpoint(rng: random.Random):
    e = {}
    for key, (usual, odd) in _FIELDS.items():
        if rng.random() < 0.85:
            e[key] = rng.choice(usual if rng.random() < 0.9 else odd)
    return e if rng.random() < 0.97 else rng.choice([None, [], "endpoint"])


def _shortcut_agrees(cases, slow, fast, whole=None) -> int:
    """For each case (the arguments of both paths): the shortcut's result, where it gives one, is the
    slow path's, of the same type, hash and repr, and where it raises (a slice's bad endpoint), it
    names the slow path's field and problem; `whole` (the public entry) decides as the slow path
    always.  Returns how many cases the shortcut took, for the caller to check it is reached."""
    hits = 0
    for args in cases:
        want = _outcome(lambda: slow(*args))
        got = _outcome(lambda: fast(*args))
        if got[0] == "invalid":
            assert got == want, args
        elif (got := got[1]) is not None:
            hits += 1
            assert want == ("ok", got), args
            assert type(got) is type(want[1]) and hash(got) == hash(want[1]) and repr(got) == repr(want[1])
        if whole is not None:
            assert _outcome(lambda: whole(*args)) == want, args
    return hits


@pytest.mark.parametrize("seed", range(4))
def test_plain_endpoint_decides_as_the_field_reader(seed):
    rng = random.Random(seed)
    cases = [(_random_endpoint(rng), rng.choice((4, 6))) for _ in range(2000)]
    hits = _shortcut_agrees(cases, lambda e, version: _endpoint(Fields(e, "endpoints[0]"), version), _plain_endpoint)
    assert hits > 200        # the generator does reach the fast path


def test_endpoints_of_a_slice_equal_the_field_readers_and_name_the_bad_one():
    rng = random.Random(7)
    for _ in range(300):
        items = [_random_endpoint(rng) for _ in range(rng.randint(0, 5))]
        version, port = rng.choice((4, 6)), rng.choice((None, 8080))
        top = Fields({"endpoints": items})
        want = _outcome(lambda: tuple(_endpoint(e, version, port) for e in top.objects("endpoints", 1000)))
        assert _outcome(lambda: endpointslice._endpoints(top, version, port)) == want


def test_too_many_or_not_a_list_of_endpoints_is_the_field_readers_problem():
    for value in ([{"addresses": ["198.18.0.1"]}] * 1001, {"addresses": ["198.18.0.1"]}, "x"):
        top = Fields({"endpoints": value})
        with pytest.raises(Invalid) as fast:
            endpointslice._endpoints(top, 4, None)
        with pytest.raises(Invalid) as slow:
            tuple(top.objects("endpoints", endpointslice.MAX_ENDPOINTS))
        assert (fast.value.field, fast.value.message) == (slow.value.field, slow.value.message)


# Values each Service field may take: (usual ones, odd types or bad values), by where they sit.
_SERVICE_TOP = {
    "kind": (["Service", None], ["Endpoints", "", 5]),
    "apiVersion": (["v1", None], ["v2", ["v1"]]),
}
_SERVICE_META = {
    "name": (["svc-a", "b"], [None, "", "Svc", "1svc", "a" * 64, 5]),
    "namespace": (["ns-a", None, ""], ["NS", 5, "a" * 64]),
    "creationTimestamp": ([None, "2026-12-01T10:00:00Z", "2026-12-01T12:00:00+02:00"], ["yesterday", 5]),
    "labels": ([None, {}, {"app": "a"}, {"service.kubernetes.io/service-proxy-name": "other"},
                {"service.kubernetes.io/headless": ""}], [{"app": 5}, "", [], {5: "a"}]),
    "annotations": ([None, {}, {"note": "x"}, {"ebpfsvc.io/lb-algorithm": "random"},
                     {"service.kubernetes.io/topology-mode": "Auto"},
                     {"ebpfsvc.io/external-ips-source-ranges": "true"},
                     {"service.beta.kubernetes.io/load-balancer-source-ranges": "198.18.0.0/16"}],
                    [{"note": 5}, "", {"ebpfsvc.io/lb-algorithm": "best"}]),
}
_SERVICE_SPEC = {
    "type": ([None, "ClusterIP", "NodePort", "LoadBalancer"], ["ExternalName", "", "clusterip", 5, ["ClusterIP"]]),
    "clusterIP": (["198.19.0.10", "198.19.0.11", "2001:2::10", None, "None"],
                  ["198.19.0.300", "127.0.0.1", " 198.19.0.12", 5, "", "224.0.0.1"]),
    "clusterIPs": ([None, [], ["198.19.0.10"], ["2001:2::10"], ["198.19.0.10", "2001:2::10"]],
                   [["198.19.0.99"], "198.19.0.10", [5]]),
    "ipFamilies": ([None, [], ["IPv4"], ["IPv6"], ["IPv4", "IPv6"]], [["IPv5"], ["IPv4", "IPv4"], "IPv4"]),
    "ipFamilyPolicy": ([None, "SingleStack", "PreferDualStack", "RequireDualStack"], ["Dual", 5]),
    "selector": ([None, {}, {"app": "a"}], [{"app": 5}, "", []]),
    "sessionAffinity": ([None, "None", "ClientIP"], ["Sticky", 5]),
    "sessionAffinityConfig": ([None, {"clientIP": {"timeoutSeconds": 60}}], [{"clientIP": {"timeoutSeconds": 0}}]),
    "externalTrafficPolicy": ([None, "Cluster", "Local"], ["", "local", 5]),
    "internalTrafficPolicy": ([None, "Cluster", "Local"], ["Global", ["Local"]]),
    "publishNotReadyAddresses": ([None, False, True], ["true", 1]),
    "externalIPs": ([None, [], ["198.18.5.5"]], [["x"], "198.18.5.5"]),
    "loadBalancerSourceRanges": ([None, [], ["198.18.0.0/16"]], [["198.18.0.0/40"], ""]),
    "trafficDistribution": ([None, "PreferClose", "Other"], [5]),
    "healthCheckNodePort": ([None, 30500], [0, "x"]),
    "externalName": ([None, "example.com"], [5]),
}
_SERVICE_PORT = {
    "name": (["http", "", None, "metrics"], ["HTTP", "a_b", 5, "a" * 64]),
    "protocol": ([None, "TCP", "UDP", "SCTP"], ["tcp", "", 6, ["TCP"]]),
    "port": ([80, 8080, 53, 1, 65535], [0, 65536, "80", None, True, 80.0]),
    "targetPort": ([None, 8080, "http", 0, "8443", False], [70000, "", "a-very-long-port-name", True, 8.5, [1]]),
    "nodePort": ([None, 30080, 31000], [29999, 40000, "30080", True]),
    "appProtocol": ([None, "http"], [5]),
}


def _pick(rng: random.Random, fields: dict, present: float = 0.8) -> dict:
    out = {}
    for key, (usual, odd) in fields.items():
        if rng.random() < present:
            out[key] = rng.choice(usual if rng.random() < 0.93 else odd)
    return out


def _change_some(rng: random.Random, where: list[tuple[dict, dict]]) -> None:
    """One to three fields of a valid object changed, in place, to another usual value or to an odd
    one (or removed): `where` pairs each part of the object with the values its fields may take."""
    for _ in range(rng.randint(1, 3)):
        target, fields = rng.choice(where)
        key = rng.choice(list(fields))
        usual, odd = fields[key]
        value = rng.choice(usual if rng.random() < 0.7 else odd)
        if value is None and rng.random() < 0.5:
            target.pop(key, None)
        else:
            target[key] = copy.deepcopy(value)


def _random_service(rng: random.Random):
    """Mostly a valid ClusterIP or NodePort Service with one to three fields changed (to another usual
    value or to an odd one), so both paths are reached; else a Service of random fields."""
    if rng.random() < 0.25:
        obj = _pick(rng, _SERVICE_TOP, 0.9)
        obj["metadata"] = _pick(rng, _SERVICE_META, 0.7)
        obj["spec"] = _pick(rng, _SERVICE_SPEC, 0.35)
        obj["spec"]["ports"] = [_pick(rng, _SERVICE_PORT, 0.75) for _ in range(rng.choice([0, 1, 2]))]
        return obj if rng.random() < 0.95 else rng.choice([None, [], "Service"])
    node_port = rng.random() < 0.3
    ports = [{"name": name, "port": number, "protocol": "TCP", "targetPort": 8000 + number}
             for name, number in rng.choice([[("", 80)], [("http", 80)], [("http", 80), ("https", 443)]])]
    for i, p in enumerate(ports):
        if node_port:
            p["nodePort"] = 30080 + i
    obj = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "svc-a", "namespace": "ns-a"},
           "spec": {"type": "NodePort" if node_port else "ClusterIP",
                    "clusterIP": rng.choice(["198.19.0.10", "198.19.1.7"]), "selector": {"app": "a"},
                    "ports": ports}}
    where = [(obj, _SERVICE_TOP), (obj["metadata"], _SERVICE_META), (obj["spec"], _SERVICE_SPEC),
             *((p, _SERVICE_PORT) for p in ports)]
    _change_some(rng, where)
    return obj


_NODES = [NodeConfig("node-1"), NodeConfig("node-1", service_cidr="198.19.0.0/24"),
          NodeConfig("node-1", ip_families=("IPv6",)), NodeConfig("node-1", ip_families=("IPv4", "IPv6")),
          NodeConfig("node-1", nodeport_range="30000-30100", legacy_source_ranges=False)]


@pytest.mark.parametrize("seed", range(4))
def test_plain_service_decides_as_the_field_readers(seed):
    rng = random.Random(seed)
    cases = [(_random_service(rng), rng.choice(_NODES)) for _ in range(3000)]
    hits = _shortcut_agrees(cases, service._read_service, service._plain_service, whole=service.parse_service)
    assert hits > 300        # the generator does reach the fast path


# Values each EndpointSlice field may take, by where they sit (endpoints: _FIELDS).
_SLICE_TOP = {
    "kind": (["EndpointSlice", None], ["Endpoints", "", 5]),
    "apiVersion": (["discovery.k8s.io/v1", None], ["discovery.k8s.io/v1beta1", "v1", 5]),
    "addressType": (["IPv4", "IPv6"], ["FQDN", None, "ipv4", "", 4]),
}
_SLICE_META = {
    "name": (["svc-a-x7k2p", "svc.a"], [None, "", "Svc-a", "-a", "a" * 254, 5]),
    "namespace": (["ns-a", None, ""], ["NS", 5, "a.b"]),
    "creationTimestamp": ([None, "2026-12-01T10:00:00Z", "2026-12-01T12:00:00+02:00"], ["0999-01-01T00:00:00Z", 5]),
    "labels": ([None, {}, {"kubernetes.io/service-name": "svc-a"}, {"kubernetes.io/service-name": "svc-b", "x": "y"}],
               [{"kubernetes.io/service-name": "-bad-"}, {"kubernetes.io/service-name": 5}, {5: "a"}, "", []]),
    "annotations": ([None, {}, {"endpoints.kubernetes.io/last-change-trigger-time": "2026-12-01T10:00:00Z"}],
                    [{"note": 5}, ""]),
}
_SLICE_PORT = {
    "name": (["http", "", None], ["HTTP", "a_b", 5]),
    "protocol": ([None, "TCP", "UDP", "SCTP"], ["tcp", 6]),
    "port": ([80, 8080, 1, 65535], [0, 65536, "80", None, True]),
    "appProtocol": ([None, "http"], [5]),
}


def _random_slice(rng: random.Random):
    """Mostly a valid slice with one to three fields changed (to another usual value or to an odd
    one), its endpoints from _random_endpoint; else a slice of random fields."""
    if rng.random() < 0.2:
        obj = _pick(rng, _SLICE_TOP, 0.9)
        obj["metadata"] = _pick(rng, _SLICE_META, 0.7)
        obj["ports"] = [_pick(rng, _SLICE_PORT, 0.75) for _ in range(rng.choice([0, 1, 2]))]
        obj["endpoints"] = [_random_endpoint(rng) for _ in range(rng.randint(0, 3))]
        return obj if rng.random() < 0.95 else rng.choice([None, [], "EndpointSlice"])
    ports = [{"name": name, "port": number, "protocol": "TCP"}
             for name, number in rng.choice([[("", 8080)], [("http", 8080)], [("http", 8080), ("https", 8443)]])]
    family = rng.choice((4, 6))
    obj = {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice", "addressType": f"IPv{family}",
           "metadata": {"name": "svc-a-x7k2p", "namespace": "ns-a",
                        "labels": {"kubernetes.io/service-name": "svc-a"}},
           "ports": ports,
           "endpoints": [{"addresses": [f"198.18.0.{i + 1}" if family == 4 else f"2001:2::{i + 1}"],
                          "conditions": {"ready": True}, "nodeName": "node-1"} for i in range(rng.randint(0, 4))]}
    where = [(obj, _SLICE_TOP), (obj["metadata"], _SLICE_META), *((p, _SLICE_PORT) for p in ports),
             *((e, _FIELDS) for e in obj["endpoints"])]
    _change_some(rng, where)
    if rng.random() < 0.05:
        obj["ports"] = rng.choice([None, "ports", [None], ports + ports])
    return obj


@pytest.mark.parametrize("seed", range(3))
def test_plain_slice_decides_as_the_field_readers(seed):
    rng = random.Random(seed)
    cases = [(_random_slice(rng),) for _ in range(3000)]
    hits = _shortcut_agrees(cases, endpointslice._read_slice, endpointslice._plain_slice,
                            whole=endpointslice.parse_endpoint_slice)
    assert hits > 600        # the generator does reach the fast path


def test_a_backend_name_is_always_its_address_port_and_protocol():
    b = Backend(ipaddress.ip_address("198.18.0.1"), 8080, Protocol.UDP, False, True, True, "n", "z")
    assert b.name == "198.18.0.1:8080/UDP" and b == Backend(*b[:-1]) and hash(b) == hash(Backend(*b[:-1]))
    assert b._replace(port=80, zone="y").name == "198.18.0.1:80/UDP"
    assert Backend(ipaddress.ip_address("2001:2::1"), 80).name == "[2001:2::1]:80/TCP"
    assert copy.deepcopy(b) == b and pickle.loads(pickle.dumps(b)) == b
    with pytest.raises(ValueError):
        b._replace(name="other:80/UDP")
    with pytest.raises(ValueError):
        b._replace(prot=1)
    with pytest.raises(AttributeError):
        b.port = 1


def _random_backends(rng: random.Random) -> list[Backend]:
    """Backends of one family, in any order, some listed twice with other flags, nodes or zones."""
    base = rng.choice(("198.18.0.", "2001:2::"))
    out = []
    for _ in range(rng.randint(0, 7)):
        out.append(Backend(ipaddress.ip_address(f"{base}{rng.randint(1, 5)}"), rng.choice((80, 8080)),
                           rng.choice((Protocol.TCP, Protocol.UDP)), rng.random() < 0.2, rng.random() < 0.2,
                           rng.random() < 0.5, rng.choice(("", "node-1")), rng.choice(("", "zone-a"))))
    return out


def test_backend_rows_are_the_backends_they_list():
    """BackendRows.of: one Backend per name, in name order, with a repeated name's flags merged as
    the writer merges a backend several frontends list; equal to (and hashed as) the tuple of those
    Backends; indexing, slicing, copying and pickling give the same Backends; table_rows() is
    table_backends()'s rule."""
    from ebpfsvc.lbmodel import BackendRows, backend_rows, table_backends

    rng = random.Random(5)
    for _ in range(1500):
        backends = _random_backends(rng)
        rows = BackendRows.of(backends)
        copies: dict[str, list[Backend]] = {}
        for b in backends:
            copies.setdefault(b.name, []).append(b)
        want = tuple(bs[0]._replace(terminating=any(b.terminating for b in bs), local=any(b.local for b in bs),
                                    not_ready=all(b.not_ready for b in bs))
                     for _, bs in sorted(copies.items()))
        assert tuple(rows) == want and rows == want and want == rows and hash(rows) == hash(want)
        assert len(rows) == len(want) and rows[1:3] == want[1:3] and all(rows[i] == want[i] for i in range(len(want)))
        assert rows.names == tuple(b.name for b in want) and backend_rows(rows) is rows
        assert rows.family == (want[0].address.version if want else 0)
        assert copy.deepcopy(rows) == rows and pickle.loads(pickle.dumps(rows)) == rows
        assert rows != want[:-1] if want else rows == ()
        usable = [b for b in want if not b.not_ready]
        table = [b for b in usable if not b.terminating] or usable
        assert [rows[i] for i in rows.table_rows()] == table == table_backends(backends)
        assert rows.plain == (not any(b.terminating or b.not_ready for b in want))
    changed = BackendRows.of([Backend(ipaddress.ip_address("198.18.0.1"), 80, zone="zone-a")])
    assert changed != BackendRows.of([Backend(ipaddress.ip_address("198.18.0.1"), 80, zone="zone-b")])
    assert changed != BackendRows.of([Backend(ipaddress.ip_address("198.18.0.1"), 80, node="n", zone="zone-a")])


def test_backend_names_in_bulk_are_backend_name():
    from ebpfsvc.lbmodel import backend_name, backend_names

    for base in ("198.18.0.", "2001:2::"):
        addresses = [ipaddress.ip_address(f"{base}{i}") for i in range(1, 40)]
        texts = [str(a) for a in addresses]
        # Ports of each endpoint's own, and one port for all (one slice's: the suffix made once).
        for ports in ([1 + 997 * i % 65535 for i in range(1, 40)], [8080] * 39, [8080] * 38 + [8081]):
            for protocol in Protocol:
                assert backend_names(texts, ports, protocol, addresses[0].version) == [
                    backend_name(a, p, protocol) for a, p in zip(addresses, ports)]
    assert backend_names([], [], Protocol.TCP, 4) == []


@pytest.mark.parametrize("seed", range(2))
def test_desired_rows_are_the_backends_made_one_by_one(seed):
    """desired._backends' rows against a Backend made for each endpoint of a set (the draining ones
    terminating, the not-ready ones not ready, the zone from the Node when the endpoint has none),
    sorted by name."""
    from types import SimpleNamespace

    from ebpfsvc import desired
    from ebpfsvc.k8s import topology
    from ebpfsvc.k8s.service import ServicePort

    rng = random.Random(seed)
    kinds = set()
    for _ in range(1500):
        eps = _random_endpoints(rng)
        me = rng.choice(("node-1", "node-2"))
        nodes = rng.choice(({}, {"node-1": SimpleNamespace(zone="zone-n1")}))
        port = ServicePort("", rng.choice((Protocol.TCP, Protocol.UDP)), 80, 8080)
        sets = topology.categorize_endpoints(eps, node_name=me, zone="zone-a", publish_not_ready=rng.random() < 0.2)
        for chosen in (sets.cluster, sets.local):
            made = [Backend(ep.address, ep.port, port.protocol, terminating, not_ready,
                            bool(ep.node_name) and ep.node_name == me, ep.node_name,
                            ep.zone or (nodes[ep.node_name].zone if ep.node_name in nodes else ""))
                    for group, terminating, not_ready in ((chosen.endpoints, chosen.terminating, False),
                                                          (chosen.draining, True, False),
                                                          (chosen.not_ready, False, True))
                    for ep in group]
            snapshot = SimpleNamespace(nodes=nodes)
            rows = desired._backends(snapshot, NodeConfig(node_name=me), chosen, port)
            assert rows == tuple(sorted(made, key=lambda b: b.name)), chosen
            kinds.update((b.terminating, b.not_ready, b.local) for b in made)
    assert len(kinds) >= 5            # plain, draining, not ready and local backends all met


def _random_endpoints(rng: random.Random) -> tuple[Endpoint, ...]:
    """Endpoints of one service port: conditions, nodes, zones and hints varied, usually all plain."""
    plain = rng.random() < 0.5
    out = []
    for i in range(rng.randint(0, 6)):
        ready = plain or rng.random() < 0.7
        terminating = not plain and rng.random() < 0.2
        out.append(Endpoint(ipaddress.ip_address(f"198.18.0.{i + 1}"), 8080, ready,
                            ready or rng.random() < 0.5, terminating,
                            rng.choice(("", "node-1", "node-2")), rng.choice(("", "zone-a", "zone-b")),
                            frozenset() if plain or rng.random() < 0.6 else frozenset({rng.choice(("zone-a", "zone-b"))}),
                            frozenset() if plain or rng.random() < 0.7 else frozenset({rng.choice(("node-1", "node-2"))})))
    return tuple(out)


@pytest.mark.parametrize("seed", range(3))
def test_categorize_of_plain_endpoints_equals_the_general_rules(seed):
    from ebpfsvc.k8s import topology

    rng = random.Random(seed)
    plain = 0
    for _ in range(1500):
        eps = _random_endpoints(rng)
        pnr = rng.random() < 0.3
        node, zone = rng.choice(("node-1", "node-2", "")), rng.choice(("zone-a", ""))
        got = topology.categorize_endpoints(eps, node_name=node, zone=zone, publish_not_ready=pnr)
        assert got == topology._categorize(eps, node, zone, pnr), eps
        plain += topology._plain(eps, pnr)
    assert 300 < plain < 1500         # both paths are exercised


def test_merged_endpoints_are_sorted_and_deduplicated_as_before():
    from ebpfsvc.k8s import endpointmerge
    from ebpfsvc.k8s.endpointmerge import merge_endpoint_slices
    from ebpfsvc.k8s.endpointslice import EndpointPort, EndpointSlice
    from ebpfsvc.lbmodel import ServicePortName

    rng = random.Random(3)
    addrs = [ipaddress.ip_address(a) for a in ("198.18.0.9", "198.18.0.10", "198.18.1.1", "2001:2::1", "2001:2::a")]
    for _ in range(300):
        slices = []
        for n in range(rng.randint(1, 3)):
            family = rng.choice((4, 6))
            chosen = rng.sample([a for a in addrs if a.version == family], rng.randint(0, 2))
            if chosen and rng.random() < 0.2:
                chosen.append(chosen[0])        # one address twice in one slice: the general path
            # As parsed: a one-port slice's endpoints carry its port number (handed on as they are),
            # or not (made again with it).
            number = rng.choice((80, 81))
            carried = number if rng.random() < 0.5 else None
            eps = tuple(Endpoint(a, carried, rng.random() < 0.7, True, rng.random() < 0.2, "n", "z") for a in chosen)
            slices.append(EndpointSlice("ns", f"s-{n}", "svc", f"IPv{family}",
                                        (EndpointPort("http", Protocol.TCP, number),), eps))
        merged = merge_endpoint_slices("ns", "svc", slices)
        for spn, eps in merged.items():
            assert spn == ServicePortName("ns", "svc", "http", Protocol.TCP)
            assert list(eps) == sorted(eps, key=lambda e: e.sort_key)
            assert len({e.sort_key for e in eps}) == len(eps)
            for e in eps:           # the winner of a duplicated address: ready, then not terminating
                copies = [se for sl in slices for se in sl.endpoints
                          if se.address == e.address and sl.ports[0].port == e.port]
                assert (e.ready, not e.terminating) == max((c.ready, not c.terminating) for c in copies)
                assert type(e) is Endpoint and e == Endpoint(e.address, e.port, e.ready, e.serving, e.terminating,
                                                              e.node_name, e.zone, e.zone_hints, e.node_hints)
                assert e.port in {sl.ports[0].port for sl in slices if e.address in [x.address for x in sl.endpoints]}
                assert (e.node_name, e.zone) == ("n", "z")
        if len(slices) == 1:            # the one-slice path, or the general one for a duplicate
            assert merged == endpointmerge._merge_general("ns", "svc", slices)


@pytest.mark.parametrize("seed", range(2))
def test_frontend_want_table_and_flags_as_defined(seed):
    """The writer's per-frontend derivation (its shortcut for frontends without terminating or not-ready
    backends included) against the definition: one entry per distinct backend, in name order,
    terminating or local if any copy is, not ready only if every copy is; the table from those
    neither not ready nor terminating, else from the terminating ones, sorted by name."""
    from ebpfsvc import abi
    from ebpfsvc.datapath import writer
    from ebpfsvc.lbmodel import Frontend, FrontendKey, ServicePortName

    rng = random.Random(seed)
    for _ in range(500):
        family = rng.choice((4, 6))
        base = "198.18.0." if family == 4 else "2001:2::"
        # Half the frontends with no flagged backend: the shortcut's.
        p_term, p_not_ready, p_local = rng.choice(((0.15, 0.1, 0.5), (0, 0, 0)))
        backends = tuple(Backend(ipaddress.ip_address(f"{base}{rng.randint(1, 6)}"), rng.choice((80, 8080)),
                                 rng.choice((Protocol.TCP, Protocol.UDP)), rng.random() < p_term,
                                 rng.random() < p_not_ready, rng.random() < p_local)
                         for _ in range(rng.randint(0, 8)))
        fe = Frontend(FrontendKey(ipaddress.ip_address("198.19.0.1" if family == 4 else "2001:2::ff"), 80),
                      ServicePortName("ns", "svc"), backends=backends)
        w = writer._frontend_want(fe)
        assert w.key == writer._frontend_key(fe) and w.marker == (w.key[0], 0, w.key[2], w.key[3])
        assert w.name == writer.service_name(fe.service) and w.table_size == maglev.table_size(len(w.table_names))
        copies = {}
        for b in sorted(backends, key=lambda b: b.name):
            copies.setdefault((b.name, writer._backend_key(b)), []).append(b)
        flags = {}
        for (_, k), bs in copies.items():
            flags[k] = ((abi.LB_BE_F_TERMINATING if any(b.terminating for b in bs) else 0)
                        | (abi.LB_BE_F_LOCAL if any(b.local for b in bs) else 0)
                        | (abi.LB_BE_F_NOT_READY if all(b.not_ready for b in bs) else 0))
        usable = [nk for nk in copies if not flags[nk[1]] & abi.LB_BE_F_NOT_READY]
        table = [nk for nk in usable if not flags[nk[1]] & abi.LB_BE_F_TERMINATING] or usable
        assert w.table_names == tuple(n for n, _ in table) and w.table_keys == tuple(k for _, k in table)
        assert dict(zip(w.backend_keys, w.backend_flags)) == flags and list(w.backend_keys) == [k for _, k in copies]
        assert len(w.backend_keys) == len(w.backend_flags)


def test_counting_every_frontend_at_once_equals_counting_one_by_one():
    """A full apply's reference counts (Counter over all frontends) against _count's, one frontend
    at a time: the same counts, and the same touched entries in the same order (ids follow it)."""
    from ebpfsvc.datapath import writer
    from ebpfsvc.lbmodel import Frontend, FrontendKey, ServicePortName

    rng = random.Random(3)
    fes = []
    for i in range(300):
        backends = tuple(Backend(ipaddress.ip_address(f"198.18.{rng.randint(0, 3)}.{rng.randint(1, 9)}"),
                                 rng.choice((80, 8080)), Protocol.TCP, rng.random() < 0.1, rng.random() < 0.1,
                                 rng.random() < 0.2) for _ in range(rng.randint(0, 6)))
        fes.append(Frontend(FrontendKey(ipaddress.ip_address(f"198.19.{i // 100}.{rng.randint(1, 3)}"), 80 + i),
                            ServicePortName("ns", f"svc-{rng.randint(0, 99)}"), backends=backends))
    wants = [writer._frontend_want(fe) for fe in fes]
    at_once, each = writer.MapWriter.__new__(writer.MapWriter), writer.MapWriter.__new__(writer.MapWriter)
    at_once._reset_refs()
    each._reset_refs()
    got, want = at_once._count_all(wants), each._recount_each([], wants)
    assert list(got.backends) == list(want.backends) and got.names == want.names
    assert list(got.frontends) == list(want.frontends)
    for attr in ("_want", "_by_fe", "_be_refs", "_be_terminating", "_be_local", "_be_not_ready", "_svc_refs",
                 "_marker_refs"):
        assert getattr(at_once, attr) == getattr(each, attr), attr
    assert each._be_terminating and each._be_local and each._be_not_ready


def test_admission_totals_at_once_equal_adding_each_frontend():
    """A full sync's totals (_Totals.of, counted in C) against adding each frontend's needs in turn:
    the same counts, in the same order."""
    from ebpfsvc.admission import _Need, _Totals
    from ebpfsvc.lbmodel import Frontend, FrontendKey, ServicePortName

    rng = random.Random(11)
    needs = []
    for i in range(400):
        backends = tuple(b for b in _random_backends(rng) if b.address.version == 4)
        fe = Frontend(FrontendKey(ipaddress.ip_address(f"198.19.0.{i % 250 + 1}"), 80 + i // 250),
                      ServicePortName("ns", f"svc-{rng.randint(0, 60)}", rng.choice(("", "http"))),
                      backends=backends, affinity_timeout=rng.choice((0, 0, 60)),
                      source_ranges=rng.choice(((), (ipaddress.ip_network("198.18.0.0/16"),))))
        needs.append(_Need(fe))
    each = _Totals()
    for n in needs:
        each.add(n, 1)
    at_once = _Totals.of(needs)
    for attr in ("frontends", "slots", "ranges", "matches"):
        assert getattr(at_once, attr) == getattr(each, attr), attr
    assert list(at_once.ports.items()) == list(each.ports.items())
    assert list(at_once.backends.items()) == list(each.backends.items())
    assert each.slots and each.ranges and each.matches and len(each.backends) < sum(len(n.backends) for n in needs)


def test_service_name_skips_quoting_only_what_quoting_leaves_alone():
    import string
    from urllib.parse import quote

    from ebpfsvc.datapath.writer import service_name
    from ebpfsvc.lbmodel import ServicePortName

    rng = random.Random(5)
    odd = string.printable + "é\udc80/:%"
    for _ in range(5000):
        parts = ["".join(rng.choice(odd if rng.random() < 0.3 else "abc-.9_~") for _ in range(rng.randint(0, 8)))
                 for _ in range(3)]
        ns, name, port = (quote(p.encode("utf-8", "surrogatepass"), safe="") for p in parts)
        want = f"{ns}/{name}:{port}/UDP" if parts[2] else f"{ns}/{name}/UDP"
        assert service_name(ServicePortName(*parts, Protocol.UDP)) == want


@pytest.mark.parametrize("make", [lambda a: Endpoint(a, None, False, node_name="n"),
                                  lambda a: Endpoint(a, 8080, False, node_name="n"),
                                  lambda a: Backend(a, 8080, not_ready=True, node="n")])
def test_a_derived_last_field_says_what_it_is_derived_from(make):
    """The endpoints' text (str(address)) and Backend.name are made with the tuple: copies, pickles
    and _replace make them again, and they cannot be set to something else."""
    for text in ("198.18.0.7", "2001:2::7"):
        made = make(ipaddress.ip_address(text))
        assert text in made[-1]
        assert copy.deepcopy(made) == made and pickle.loads(pickle.dumps(made)) == made
        other = ipaddress.ip_address(text[:-1] + "9")
        assert made._replace(address=other) == make(other) and text not in make(other)[-1]
        with pytest.raises(ValueError):
            made._replace(**{made._fields[-1]: "x"})
        with pytest.raises(ValueError):
            made._replace(hostname_or_port="x")


def test_the_plain_path_keeps_the_apis_text_of_an_ipv4_address():
    """inet_pton takes a dotted quad only as str() writes it, so the API's text is the endpoint's;
    an IPv6 address's is made (the API may write it otherwise: 2001:0002::1)."""
    for text, want in (("198.18.0.7", "198.18.0.7"), ("2001:0002::0001", "2001:2::1")):
        version = ipaddress.ip_address(text).version
        ep = _plain_endpoint({"addresses": [text]}, version)
        assert ep.text == want == str(ep.address) and ep == Endpoint(ep.address)


def test_a_plain_service_is_a_service_as_its_constructor_makes_it():
    """_plain makes a Service by its fields at once: equal, hashed and frozen as Service(...) is."""
    import dataclasses

    values = dict(namespace="ns", name="web", type=service.ServiceType.NODE_PORT,
                  cluster_ip=ipaddress.ip_address("198.19.0.10"), cluster_ips=(ipaddress.ip_address("198.19.0.10"),),
                  has_selector=True, created="2026-12-01T10:00:00Z")
    made, want = service._plain(**values), service.Service(**values)
    assert made == want and hash(made) == hash(want) and vars(made) == vars(want)
    with pytest.raises(dataclasses.FrozenInstanceError):
        made.name = "other"


def test_the_named_tuples_made_from_their_fields_in_order_have_those_fields():
    """desired state makes Frontend and FrontendKey, the writer _TableSource and _FeWant, from a
    tuple of their fields in order (tuple.__new__, without NamedTuple's __new__): a field added or
    moved must be added or moved there too."""
    from ebpfsvc.datapath import writer
    from ebpfsvc.lbmodel import Frontend, FrontendKey

    assert Frontend._fields == ("key", "service", "kind", "backends", "algorithm", "affinity_timeout",
                                "local_only", "source_ranges", "app_protocol")
    assert FrontendKey._fields == ("address", "port", "protocol", "scope")
    assert writer._TableSource._fields == ("names", "ids", "size")
    assert writer._FeWant._fields == ("fe", "key", "marker", "name", "backend_keys", "backend_flags",
                                      "table_names", "table_keys", "table_size")


def test_an_objects_key_is_read_as_the_field_readers_default_it():
    """object_key's usual-object path gives what its general one does (the reference below)."""
    from collections import UserDict
    from collections.abc import Mapping

    from ebpfsvc.k8s.fields import CLUSTER_SCOPED, object_key

    class Name(str):
        pass

    def reference(kind, obj):
        meta = obj.get("metadata") if isinstance(obj, Mapping) else None
        meta = meta if isinstance(meta, Mapping) else {}
        name = meta.get("name") if isinstance(meta.get("name"), str) else ""
        if kind in CLUSTER_SCOPED:
            return ("", name)
        ns = meta.get("namespace") if isinstance(meta.get("namespace"), str) else ""
        return (ns or "default", name)

    rng = random.Random(11)
    values = [None, "", "web", "kube-system", Name("n"), 5, ["x"], {"a": 1}]
    for _ in range(3000):
        meta = {k: rng.choice(values) for k in ("name", "namespace") if rng.random() < 0.8}
        meta = rng.choice([meta, UserDict(meta), None, "x"]) if rng.random() < 0.2 else meta
        obj = {"metadata": meta} if rng.random() < 0.9 else rng.choice([UserDict({"metadata": meta}), [], "x"])
        kind = rng.choice(["Service", "EndpointSlice", "Node", "ServiceCIDR"])
        assert object_key(kind, obj) == reference(kind, obj), (kind, obj)
