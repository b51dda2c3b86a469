"""sessionAffinity: ClientIP: a client's new flows follow its last backend while
the entry is fresh, then Maglev again; a terminating backend loses affinity."""

from __future__ import annotations

import pytest

from ipaddress import IPv4Address as A

from ebpfsvc.lbmodel import Frontend, FrontendKey, FrontendKind, Protocol

from .conftest import age
from .packets import (
    BACKEND1, BACKEND2, BACKEND3, CLIENT, CLIENT2, OK, VIP, VIP2, Case, be, check, expected_backend,
    from_pod, frontend, state, tcp,
)

pytestmark = pytest.mark.root

TIMEOUT = 10800
STICKY = frontend(VIP, 80, [be(BACKEND1), be(BACKEND2), be(BACKEND3)], affinity_timeout=TIMEOUT)


def syn(client, sport, b):
    return Case(f"SYN {client}:{sport} -> {b}", "from_pod", from_pod(tcp(client, VIP, sport, 80, "S")), OK,
                from_pod(tcp(client, b, sport, 8080, "S")))


def _port_hashing_elsewhere(fe, client, avoid):
    return next(p for p in range(41000, 45000) if expected_backend(fe, client, p) != avoid)


def test_affinity_hit_then_expiry(datapath, writer):
    writer.apply(state(STICKY))
    first = expected_backend(STICKY, CLIENT, 40000)
    check(datapath, syn(CLIENT, 40000, first))
    other = _port_hashing_elsewhere(STICKY, CLIENT, first)
    check(datapath, syn(CLIENT, other, first))           # affinity beats the hash
    # Another client is balanced on its own.
    c2 = expected_backend(STICKY, CLIENT2, other)
    check(datapath, syn(CLIENT2, other, c2))

    assert age(datapath, "lb4_affinity", "last_used_ns", TIMEOUT + 1) == 2
    late = _port_hashing_elsewhere(STICKY, CLIENT, first)
    late = next(p for p in range(late + 1, 46000) if expected_backend(STICKY, CLIENT, p) != first)
    check(datapath, syn(CLIENT, late, expected_backend(STICKY, CLIENT, late)))


def test_affinity_within_timeout_is_refreshed_by_new_flows(datapath, writer):
    writer.apply(state(STICKY))
    first = expected_backend(STICKY, CLIENT, 40000)
    check(datapath, syn(CLIENT, 40000, first))
    age(datapath, "lb4_affinity", "last_used_ns", TIMEOUT - 60)
    p1 = _port_hashing_elsewhere(STICKY, CLIENT, first)
    check(datapath, syn(CLIENT, p1, first))              # still fresh: hit, and refreshed
    age(datapath, "lb4_affinity", "last_used_ns", TIMEOUT - 60)
    p2 = next(p for p in range(p1 + 1, 46000) if expected_backend(STICKY, CLIENT, p) != first)
    check(datapath, syn(CLIENT, p2, first))              # fresh again thanks to the refresh


def test_affinity_stamped_after_the_packet_read_the_clock_is_fresh(datapath, writer):
    """Another CPU may use the entry between this packet's clock read and its lookup: a stamp
    a little in the future is fresh, not (by an unsigned wrap) ages old."""
    writer.apply(state(STICKY))
    first = expected_backend(STICKY, CLIENT, 40000)
    check(datapath, syn(CLIENT, 40000, first))
    age(datapath, "lb4_affinity", "last_used_ns", -5)
    check(datapath, syn(CLIENT, _port_hashing_elsewhere(STICKY, CLIENT, first), first))


def test_no_affinity_without_the_flag(datapath, writer):
    plain = frontend(VIP, 80, [be(BACKEND1), be(BACKEND2), be(BACKEND3)])
    writer.apply(state(plain))
    first = expected_backend(plain, CLIENT, 40000)
    check(datapath, syn(CLIENT, 40000, first))
    other = _port_hashing_elsewhere(plain, CLIENT, first)
    check(datapath, syn(CLIENT, other, expected_backend(plain, CLIENT, other)))
    assert len(list(datapath.maps["lb4_affinity"].items())) == 0


def test_affinity_skips_terminating_backend(datapath, writer):
    writer.apply(state(STICKY))
    sport = next(p for p in range(40000, 42000) if expected_backend(STICKY, CLIENT, p) == BACKEND1)
    check(datapath, syn(CLIENT, sport, BACKEND1))
    draining = frontend(VIP, 80, [be(BACKEND1, terminating=True), be(BACKEND2), be(BACKEND3)],
                        affinity_timeout=TIMEOUT)
    writer.apply(state(draining))
    p = sport + 1
    b = expected_backend(draining, CLIENT, p)
    assert b != BACKEND1
    check(datapath, syn(CLIENT, p, b))
    # ... and the new backend becomes the client's affinity.
    q = next(x for x in range(p + 1, 46000) if expected_backend(draining, CLIENT, x) != b)
    check(datapath, syn(CLIENT, q, b))


def test_affinity_to_removed_backend_falls_back_to_table(datapath, writer):
    writer.apply(state(STICKY))
    first = expected_backend(STICKY, CLIENT, 40000)
    check(datapath, syn(CLIENT, 40000, first))
    rest = frontend(VIP, 80, [be(a) for a in (BACKEND1, BACKEND2, BACKEND3) if a != first],
                    affinity_timeout=TIMEOUT)
    writer.apply(state(rest))
    check(datapath, syn(CLIENT, 40001, expected_backend(rest, CLIENT, 40001)))


def test_affinity_backend_that_left_the_service_is_not_used(datapath, writer):
    """A backend removed from a Service but still listed by another Service stays in lb4_backends:
    the first Service's affinity entries must not keep sending its clients there
    (lb4_affinity_match, bpf/lib/affinity.h)."""
    other = frontend(VIP2, 80, [be(BACKEND1), be(BACKEND2), be(BACKEND3)], name="other")
    writer.apply(state(STICKY, other))
    first = expected_backend(STICKY, CLIENT, 40000)
    check(datapath, syn(CLIENT, 40000, first))
    rest = frontend(VIP, 80, [be(a) for a in (BACKEND1, BACKEND2, BACKEND3) if a != first],
                    affinity_timeout=TIMEOUT)
    writer.apply(state(rest, other))
    assert writer.backend_id(be(first)) is not None          # still in lb4_backends, for "other"
    for sport in (40001, 40002, 40003):
        check(datapath, syn(CLIENT, sport, expected_backend(rest, CLIENT, sport)))
    # ... and the new backend becomes the client's affinity.
    b = expected_backend(rest, CLIENT, 40001)
    q = next(x for x in range(40004, 46000) if expected_backend(rest, CLIENT, x) != b)
    check(datapath, syn(CLIENT, q, b))


def test_services_whose_joined_names_collide_have_their_own_affinity(datapath, writer):
    """Service `h-coll:x` (no port name) and Service `h-coll` port `x` were one service id (one
    joined string): a client's affinity on one sent it to the other's backend."""
    from ebpfsvc.lbmodel import ServicePortName

    a = Frontend(key=FrontendKey(A(VIP), 80, Protocol.TCP), service=ServicePortName("default", "h-coll:x"),
                 backends=(be(BACKEND1),), affinity_timeout=TIMEOUT)
    b = Frontend(key=FrontendKey(A(VIP2), 80, Protocol.TCP),
                 service=ServicePortName("default", "h-coll", "x"),
                 backends=(be(BACKEND2), be(BACKEND3)), affinity_timeout=TIMEOUT)
    writer.apply(state(a, b))
    assert writer.service_id(a.service) != writer.service_id(b.service)
    check(datapath, syn(CLIENT, 40000, BACKEND1))         # affinity on a: BACKEND1
    for sport in (40001, 40002, 40003):
        want = expected_backend(b, CLIENT, sport) if sport == 40001 else expected_backend(b, CLIENT, 40001)
        check(datapath, Case(f"SYN {CLIENT}:{sport} -> {want}", "from_pod",
                             from_pod(tcp(CLIENT, VIP2, sport, 80, "S")), OK,
                             from_pod(tcp(CLIENT, want, sport, 8080, "S"))))


def test_affinity_match_map_follows_the_services(datapath, writer):
    other = frontend(VIP2, 80, [be(BACKEND1)], name="other")        # no affinity: no pairs
    writer.apply(state(STICKY, other))
    fid = writer.frontend_id(STICKY)
    pairs = {(k.backend_id, k.frontend_id) for k in datapath.maps["lb4_affinity_match"].keys()}
    assert pairs == {(writer.backend_id(be(x)), fid) for x in (BACKEND1, BACKEND2, BACKEND3)}
    writer.apply(state(other))
    assert len(list(datapath.maps["lb4_affinity_match"].keys())) == 0
    # A new writer (agent restart) reads the pairs back and a full apply removes leftovers.
    writer.apply(state(STICKY, other))
    from ebpfsvc.datapath.writer import MapWriter
    again = MapWriter(datapath.maps)
    again.apply(state(other))
    assert len(list(datapath.maps["lb4_affinity_match"].keys())) == 0


NODE_ADDR, NODE_PORT = "198.18.0.2", 30080


def _syn_to(vip, port, client, sport, backend):
    return Case(f"SYN {client}:{sport} -> {vip}:{port} -> {backend}", "from_pod",
                from_pod(tcp(client, vip, sport, port, "S")), OK, from_pod(tcp(client, backend, sport, 8080, "S")))


def test_affinity_stays_inside_the_set_the_frontend_uses(datapath, writer):
    """One Service, internalTrafficPolicy Local and a NodePort (externalTrafficPolicy Cluster): its
    clusterIP balances to the local endpoint only, its NodePort to all. A pod pinned to a remote
    endpoint through the NodePort, still listed by the Service, goes to the local one through the
    clusterIP, as kube-proxy's affinity lives inside the KUBE-SVL chain of the set in use."""
    local = be(BACKEND1, local=True)
    everyone = (local, be(BACKEND2), be(BACKEND3))
    cluster_ip = frontend(VIP, 80, [local], affinity_timeout=TIMEOUT, local_only=True)
    node_port = Frontend(key=FrontendKey(A(NODE_ADDR), NODE_PORT, Protocol.TCP), service=cluster_ip.service,
                         kind=FrontendKind.NODE_PORT, backends=everyone, affinity_timeout=TIMEOUT)
    writer.apply(state(cluster_ip, node_port))
    assert writer.service_id(cluster_ip.service) == writer.service_id(node_port.service)   # one affinity entry
    sport = next(p for p in range(40000, 42000) if expected_backend(node_port, CLIENT, p) == BACKEND2)
    check(datapath, _syn_to(NODE_ADDR, NODE_PORT, CLIENT, sport, BACKEND2))             # pinned to BACKEND2
    check(datapath, _syn_to(NODE_ADDR, NODE_PORT, CLIENT, sport + 1, BACKEND2))         # the pin holds there
    check(datapath, _syn_to(VIP, 80, CLIENT, sport + 2, BACKEND1))      # outside the clusterIP's set: ignored
    # ... and the clusterIP's pick is the client's affinity now, which the NodePort's set holds.
    check(datapath, _syn_to(NODE_ADDR, NODE_PORT, CLIENT, sport + 3, BACKEND1))


def test_affinity_ends_with_the_terminating_fallback(datapath, writer):
    """A pin made while only a terminating endpoint served (the fallback) is not followed once a
    ready endpoint is back, although the terminating one is still listed (it keeps its flows)."""
    draining = be(BACKEND1, terminating=True)
    fallback = frontend(VIP, 80, [draining], affinity_timeout=TIMEOUT)
    writer.apply(state(fallback))
    check(datapath, syn(CLIENT, 40000, BACKEND1))
    back = frontend(VIP, 80, [draining, be(BACKEND2)], affinity_timeout=TIMEOUT)
    writer.apply(state(back))
    fid = writer.frontend_id(back)
    pairs = {(k.backend_id, k.frontend_id) for k in datapath.maps["lb4_affinity_match"].keys()}
    assert pairs == {(writer.backend_id(be(BACKEND2)), fid)}            # the table's backends only
    check(datapath, syn(CLIENT, 40001, BACKEND2))
