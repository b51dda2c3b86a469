"""MapWriter with IPv6 frontends: an LBState of both families lands in lb4_* and lb6_* maps, with
ids, Maglev ranges and stats from one space; updates, removals and a restart diff as for IPv4."""

from __future__ import annotations

import ipaddress

import pytest

from ebpfsvc import abi, maglev
from ebpfsvc.datapath import batch
from ebpfsvc.datapath.writer import ApplyStats, MapWriter, service_name
from ebpfsvc.lbmodel import Protocol

from .packets import (
    BACKEND1, BACKEND6_1, BACKEND6_2, BACKEND6_3, VIP, VIP6, be, be6, frontend, frontend6, state,
)

pytestmark = pytest.mark.root


def fe6_entry(dp, fe):
    t = dp.maps["lb6_frontends"]
    k = t.Key(abi.be128(fe.key.address), abi.be16(fe.key.port), fe.key.protocol.number, int(fe.key.scope))
    return t[k]


def backends6(dp) -> dict[int, tuple[str, int, int, int]]:
    return {k.value: (abi.ip_of_be128(v.address), abi.port_of_be16(v.port), v.proto, v.flags)
            for k, v in dp.maps["lb6_backends"].items()}


def test_ipv6_frontend_lands_in_the_lb6_maps(datapath, writer):
    fe = frontend6(VIP6, 80, [be6(BACKEND6_1), be6(BACKEND6_2), be6(BACKEND6_3, terminating=True)],
                   affinity_timeout=30)
    st = writer.apply(state(fe))
    size = maglev.table_size(2)         # the terminating one is kept out of the table
    assert st == ApplyStats(backends_written=3, services_written=1, tables_written=1, slots_written=size,
                            frontends_written=2, stats_zeroed=4)
    v = fe6_entry(datapath, fe)
    assert (v.maglev_size, v.backend_count, v.affinity_timeout) == (size, 2, 30)
    assert v.flags == abi.LB_SVC_F_AFFINITY and v.service_id == writer.service_id(fe.service)
    names = datapath.maps["lb_service_names"]
    assert names[names.Key(v.service_id)].name.decode() == service_name(fe.service)
    # The backends, by id, with their flags; nothing in the IPv4 maps.
    assert backends6(datapath) == {
        writer.backend_id(b): (str(b.address), 8080, 6, abi.LB_BE_F_TERMINATING if b.terminating else 0)
        for b in fe.backends}
    assert not list(datapath.maps["lb4_backends"].keys()) and not list(datapath.maps["lb4_frontends"].keys())
    # The table holds the ready backends' ids in Maglev order (names bracketed, sorted).
    ready = sorted((b for b in fe.backends if not b.terminating), key=lambda b: b.name)
    slots = batch.read_slots(datapath.maps["lb_maglev"], v.maglev_offset + size)[v.maglev_offset:].tolist()
    assert slots == [writer.backend_id(ready[i]) for i in maglev.build_table([b.name for b in ready], size)]
    # The address marker (port 0) of the VIP.
    t = datapath.maps["lb6_frontends"]
    marker = t[t.Key(abi.be128(VIP6), 0, 6, 1)]
    assert marker.flags == abi.LB_SVC_F_ADDRESS


def test_dual_stack_state_update_and_removal(datapath, writer):
    v4 = frontend(VIP, 80, [be(BACKEND1)], name="web")
    v6 = frontend6(VIP6, 80, [be6(BACKEND6_1), be6(BACKEND6_2)], name="web")
    writer.apply(state(v4, v6))
    ids = {writer.backend_id(b) for b in v4.backends + v6.backends}
    assert len(ids) == 3 and writer.frontend_id(v4) != writer.frontend_id(v6)
    # One Service, both families: one service id (same ServicePortName), two frontends.
    assert fe6_entry(datapath, v6).service_id == writer.service_id(v4.service)

    # An endpoint change on the IPv6 side: only its backend and table move.
    v6b = frontend6(VIP6, 80, [be6(BACKEND6_1), be6(BACKEND6_3)], name="web")
    st = writer.apply(state(v4, v6b))
    assert st.backends_written == 1 and st.backends_deleted == 1 and st.tables_written == 1
    assert sorted(a for a, *_ in backends6(datapath).values()) == [BACKEND6_1, BACKEND6_3]
    assert len(list(datapath.maps["lb4_backends"].keys())) == 1

    # A restart reads both families back: the same state writes nothing.
    again = MapWriter(datapath.maps)
    assert not again.apply(state(v4, v6b))
    assert again.backend_id(v6b.backends[1]) == writer.backend_id(v6b.backends[1])

    # The IPv6 frontend goes: its entries, marker, backends leave; IPv4 stays.
    st = again.apply(state(v4))
    assert st.frontends_deleted == 2 and st.backends_deleted == 2
    assert not list(datapath.maps["lb6_frontends"].keys()) and not list(datapath.maps["lb6_backends"].keys())
    assert len(list(datapath.maps["lb4_frontends"].keys())) == 2
    assert again.apply(state()).frontends_deleted == 2
    assert not list(datapath.maps["lb_service_names"].keys())


def test_an_ipv6_frontend_added_to_an_ipv4_only_state(datapath, writer):
    """The first apply had IPv4 frontends only, so its backends went to lb4_backends without a
    split; an IPv6 frontend added later (a change, not a full apply) puts its backends in
    lb6_backends, and the IPv4 ones stay where they are."""
    v4 = frontend(VIP, 80, [be(BACKEND1)], name="web")
    writer.apply(state(v4))
    v6 = frontend6(VIP6, 80, [be6(BACKEND6_1), be6(BACKEND6_2)], name="web")
    st = writer.apply(state(v4, v6))
    assert st.backends_written == 2
    assert sorted(a for a, *_ in backends6(datapath).values()) == [BACKEND6_1, BACKEND6_2]
    assert len(list(datapath.maps["lb4_backends"].keys())) == 1
    # And a backend change of both families in one apply: each to its own map.
    v4b = frontend(VIP, 80, [be(BACKEND1, terminating=True)], name="web")
    v6b = frontend6(VIP6, 80, [be6(BACKEND6_1), be6(BACKEND6_2, terminating=True)], name="web")
    assert writer.apply(state(v4b, v6b)).backends_written == 2
    assert sorted(f for *_, f in backends6(datapath).values()) == [0, abi.LB_BE_F_TERMINATING]
    assert [v.flags for v in datapath.maps["lb4_backends"].values()] == [abi.LB_BE_F_TERMINATING]


def test_source_ranges_per_family(datapath, writer):
    nets = (ipaddress.ip_network("198.18.9.0/24"), ipaddress.ip_network("2001:2:0:9::/64"))
    v6 = frontend6(VIP6, 443, [be6(BACKEND6_1, 8443)], name="lb", source_ranges=nets)
    only4 = frontend6(VIP6, 444, [be6(BACKEND6_1, 8444)], name="lb4only",
                      source_ranges=(ipaddress.ip_network("198.18.9.0/24"),))
    writer.apply(state(v6, only4))
    fid = writer.frontend_id(v6)
    keys = [(k.frontend_id, k.prefixlen, abi.ip_of_be128(k.address))
            for k in datapath.maps["lb6_source_ranges"].keys()]
    assert keys == [(fid, 32 + 64, "2001:2:0:9::")]
    assert fe6_entry(datapath, v6).flags & abi.LB_SVC_F_SOURCE_RANGES
    # Ranges of the other family only: none applies, as kube-proxy filters them, so none is enforced.
    assert not fe6_entry(datapath, only4).flags & abi.LB_SVC_F_SOURCE_RANGES
    assert not list(datapath.maps["lb4_source_ranges"].keys())
    writer.apply(state())
    assert not list(datapath.maps["lb6_source_ranges"].keys())


def test_backend_of_the_other_family_is_refused(datapath, writer):
    bad = frontend6(VIP6, 80, [be(BACKEND1)], proto=Protocol.TCP)
    with pytest.raises(ValueError, match="not of the frontend's IP family"):
        writer.apply(state(bad))
    assert not list(datapath.maps["lb6_frontends"].keys())


def test_pinned_maps_read_back_ipv6_frontends(datapath, writer):
    """What admission keeps for a Service whose current version is invalid (datapath/pinned.py)."""
    from ebpfsvc.datapath.pinned import pinned_frontends

    nets = (ipaddress.ip_network("2001:2:0:9::/64"),)
    v6 = frontend6(VIP6, 443, [be6(BACKEND6_1, 8443), be6(BACKEND6_2, 8443)], name="web",
                   affinity_timeout=60, source_ranges=nets)
    v4 = frontend(VIP, 80, [be(BACKEND1)], name="web")
    writer.apply(state(v4, v6))
    got = pinned_frontends(datapath.maps)[("default", "web")]
    assert sorted(got, key=lambda f: f.key.address.version) == [v4, v6]


def test_drift_and_metrics_see_both_families(datapath, writer, pin_dir):
    from ebpfsvc.inspect import views
    from ebpfsvc.inspect.node import NodeMaps

    v4 = frontend(VIP, 80, [be(BACKEND1)], name="web")
    v6 = frontend6(VIP6, 80, [be6(BACKEND6_1), be6(BACKEND6_2)], name="web")
    writer.apply(state(v4, v6))
    with NodeMaps.open(pin_dir) as node:
        assert views.drift(state(v4, v6), node) == []
        # A desired IPv6 backend the maps do not hold is named, bracketed.
        missing = frontend6(VIP6, 80, [be6(BACKEND6_1), be6(BACKEND6_3)], name="web")
        (row,) = views.drift(state(v4, missing), node)
        assert f"[{BACKEND6_3}]:8080/TCP" in row["problem"] and f"[{BACKEND6_2}]:8080/TCP" in row["problem"]
        assert {"lb6_frontends", "lb6_backends", "ct6"} <= set(node.fill())
        assert node.fill()["lb6_backends"][0] == 2
