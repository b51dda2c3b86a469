"""Until the lb6 maps exist, MapWriter leaves IPv6 frontends (dual-stack Services, issue 14) out of the
maps and serves the IPv4 ones exactly as if the IPv6 ones were not there: after a full apply, after
applies with a delta naming IPv6 keys, and after the IPv6 frontends go away.  The datapath work that
adds the lb6 maps replaces the writer's filter and this file."""

from __future__ import annotations

from ipaddress import IPv6Address

import pytest

from ebpfsvc.datapath.writer import ApplyStats, MapWriter
from ebpfsvc.desired import LBDelta
from ebpfsvc.lbmodel import Backend, Frontend, FrontendKey, LBState, ServicePortName

from .conftest import TEST_LIMITS
from .packets import be, frontend

pytestmark = pytest.mark.root


def v6_frontend(vip: str, name="web") -> Frontend:
    return Frontend(FrontendKey(IPv6Address(vip), 80), ServicePortName("default", name),
                    backends=(Backend(IPv6Address("2001:2:0:2::10"), 8080),))


def v4_only(st: LBState) -> LBState:
    return LBState({k: fe for k, fe in st.frontends.items() if k.address.version == 4})


@pytest.fixture
def second_datapath(compiled):
    """A datapath on maps of its own, for a writer given the IPv4 frontends alone."""
    return compiled.load(TEST_LIMITS, maps="second")


def test_ipv6_frontends_are_left_out_and_ipv4_ones_served_as_without_them(datapath, second_datapath):
    v4 = frontend("198.19.0.10", 80, [be("198.18.2.10")])
    dual = LBState.of([v4, v6_frontend("2001:2:0:ff::10")])
    writer = MapWriter(datapath.maps)
    assert writer.apply(dual) == MapWriter(second_datapath.maps).apply(v4_only(dual)) != ApplyStats()
    assert MapWriter(datapath.maps).apply(v4_only(dual)) == ApplyStats()   # exactly the IPv4 part

    # An incremental apply whose delta names an IPv6 key and an IPv4 one.
    v4b = frontend("198.19.0.11", 80, [be("198.18.2.11")], name="other")
    more = LBState.of([*dual.frontends.values(), v4b, v6_frontend("2001:2:0:ff::11", "other")])
    writer.apply(more, delta=LBDelta(dual, frozenset(set(more.frontends) - set(dual.frontends))))
    assert MapWriter(datapath.maps).apply(v4_only(more)) == ApplyStats()

    # The IPv6 frontends go; then an IPv4-only delta follows the state given last.
    plain = v4_only(more)
    writer.apply(plain, delta=LBDelta(more, frozenset(set(more.frontends) - set(plain.frontends))))
    fewer = LBState.of([v4])
    writer.apply(fewer, delta=LBDelta(plain, frozenset({v4b.key})))
    assert MapWriter(datapath.maps).apply(fewer) == ApplyStats()
