"""At takeover the agent deletes, from the kernel's conntrack, only the entries of closed TCP
connections another proxy translated from a frontend it serves (root: real entries in a netns)."""

from __future__ import annotations

import ipaddress
import logging
import socket

import pytest
from pyroute2 import netns
from pyroute2.netlink.nfnetlink.nfctsocket import (TCP_CONNTRACK_CLOSE as CLOSE, TCP_CONNTRACK_ESTABLISHED as ESTABLISHED,
                                                   TCP_CONNTRACK_FIN_WAIT as FIN_WAIT, TCP_CONNTRACK_TIME_WAIT as TIME_WAIT,
                                                   NFCTAttrTuple)

from ebpfsvc import takeover
from ebpfsvc.datapath import nsenter
from ebpfsvc.lbmodel import Frontend, FrontendKey, LBState, Protocol, ServicePortName

VIP, VIP6, POD, POD6, CLIENT, CLIENT6 = ("198.19.0.10", "2001:2:0:1::10", "198.18.1.4", "2001:2:0:2::4",
                                        "198.18.1.2", "2001:2:0:2::2")


def _state(*keys: FrontendKey) -> LBState:
    return LBState.of(Frontend(k, ServicePortName("default", f"s{i}", "http")) for i, k in enumerate(keys))


def _add(ct, family, orig: tuple, reply: tuple, proto: int = socket.IPPROTO_TCP, state: int | None = TIME_WAIT):
    kw = {}
    if proto == socket.IPPROTO_TCP:
        kw["protoinfo"] = {"attrs": [["CTA_PROTOINFO_TCP", {"attrs": [["CTA_PROTOINFO_TCP_STATE", state]]}]]}
    (s, sp, d, dp), (rs, rsp, rd, rdp) = orig, reply
    ct.entry("add", timeout=120,
             tuple_orig=NFCTAttrTuple(family=family, saddr=s, daddr=d, proto=proto, sport=sp, dport=dp),
             tuple_reply=NFCTAttrTuple(family=family, saddr=rs, daddr=rd, proto=proto, sport=rsp, dport=rdp),
             **kw)


def _entries() -> set[tuple]:
    from pyroute2 import Conntrack

    out = set()
    for family in (socket.AF_INET, socket.AF_INET6):
        ct = Conntrack(nfgen_family=family)
        try:
            out |= {(e.tuple_orig.saddr, e.tuple_orig.sport, e.tuple_orig.daddr, e.tuple_orig.dport)
                    for e in ct.dump_entries()}
        finally:
            ct.close()
    return out


def _fill() -> None:
    from pyroute2 import Conntrack

    v4, v6 = Conntrack(nfgen_family=socket.AF_INET), Conntrack(nfgen_family=socket.AF_INET6)
    try:
        # kube-proxy's closed connections to the Service: translated, TIME_WAIT and CLOSE
        _add(v4, socket.AF_INET, (CLIENT, 40001, VIP, 80), (POD, 8080, CLIENT, 40001))
        _add(v4, socket.AF_INET, (CLIENT, 40002, VIP, 80), (POD, 8080, CLIENT, 40002), state=CLOSE)
        _add(v6, socket.AF_INET6, (CLIENT6, 40003, VIP6, 80), (POD6, 8080, CLIENT6, 40003))
        # kept: open and half-closed connections (their translation lives in these entries)
        _add(v4, socket.AF_INET, (CLIENT, 40011, VIP, 80), (POD, 8080, CLIENT, 40011), state=ESTABLISHED)
        _add(v4, socket.AF_INET, (CLIENT, 40012, VIP, 80), (POD, 8080, CLIENT, 40012), state=FIN_WAIT)
        # kept: closed, but to no frontend served here, or to another port, or not translated
        _add(v4, socket.AF_INET, (CLIENT, 40013, "198.19.0.99", 80), (POD, 8080, CLIENT, 40013))
        _add(v4, socket.AF_INET, (CLIENT, 40014, VIP, 81), (POD, 8080, CLIENT, 40014))
        _add(v4, socket.AF_INET, (CLIENT, 40015, VIP, 80), (VIP, 80, CLIENT, 40015))
        # kept: UDP (no closed state; kube-proxy clears its own on endpoint changes)
        _add(v4, socket.AF_INET, (CLIENT, 40016, VIP, 80), (POD, 8080, CLIENT, 40016), proto=socket.IPPROTO_UDP)
    finally:
        v4.close()
        v6.close()


@pytest.mark.root
def test_only_closed_translated_connections_to_served_frontends_are_deleted(unique_prefix):
    ns = f"{unique_prefix}-tko"
    netns.create(ns)
    try:
        nsenter.run_in(ns, _fill)
        state = _state(FrontendKey(ipaddress.ip_address(VIP), 80), FrontendKey(ipaddress.ip_address(VIP6), 80),
                       FrontendKey(ipaddress.ip_address(VIP), 80, Protocol.UDP))
        deleted = nsenter.run_in(ns, lambda: takeover.forget_closed_translations(takeover.tcp_frontends(state)))
        assert deleted == 3
        left = nsenter.run_in(ns, _entries)
        assert {port for _, port, _, _ in left} == {40011, 40012, 40013, 40014, 40015, 40016}, left
        assert nsenter.run_in(ns, lambda: takeover.forget_closed_translations(takeover.tcp_frontends(state))) == 0
    finally:
        netns.remove(ns)


def test_a_failed_clear_is_one_warning(monkeypatch, caplog):
    def refuse(frontends, families=()):
        raise PermissionError("Operation not permitted")

    monkeypatch.setattr(takeover, "forget_closed_translations", refuse)
    with caplog.at_level(logging.INFO, logger="ebpfsvc.takeover"):
        takeover.clear_after_takeover(_state(FrontendKey(ipaddress.ip_address(VIP), 80)))
    assert [r.levelname for r in caplog.records] == ["WARNING"]
    assert "Operation not permitted" in caplog.records[0].getMessage()
