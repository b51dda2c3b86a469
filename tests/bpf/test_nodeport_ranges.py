"""loadBalancerSourceRanges on the uplink: allowed and refused clients, and the
write ordering that keeps a LoadBalancer frontend from ever being open to
everyone while its ranges change (probed with real packets after every single
map write the writer makes)."""

from __future__ import annotations

import ipaddress
import itertools

import pytest

from ebpfsvc import abi
from ebpfsvc.datapath import writer as writer_mod
from ebpfsvc.lbmodel import FrontendKind, LBState

from .northsouth import (
    CLIENT, CLIENT2, CLIENT2_MAC, LB_IP, LOCAL_BE, OK, SHOT, be, ext_frontend, from_client,
)
from .packets import tcp

pytestmark = pytest.mark.root

OUTSIDER = "198.18.0.102"
N = ipaddress.IPv4Network


def lb(ranges=()):
    return ext_frontend(LB_IP, 443, [be(LOCAL_BE, local=True)], kind=FrontendKind.LOAD_BALANCER, name="lb",
                        source_ranges=tuple(N(r) for r in ranges))


_sports = itertools.count(20000)


def admitted(uplink, client: str) -> bool:
    """Does a new flow from `client` get through (a fresh source port each time, so no CT entry helps)?"""
    res = uplink.run("from_uplink", from_client(tcp(client, LB_IP, next(_sports), 443, "S")))
    assert res.verdict in ("TC_ACT_OK", "TC_ACT_SHOT"), res.verdict
    return res.verdict == "TC_ACT_OK"


def test_allowed_and_refused_clients(uplink):
    uplink.writer.apply(LBState.of([lb(["198.18.0.100/32", "198.18.0.96/30"])]))
    before = uplink.drops(abi.REASON_SOURCE_RANGE)
    uplink.check("client inside a range: DNAT as usual", "from_uplink",
                 from_client(tcp(CLIENT, LB_IP, 40000, 443, "S")), OK,
                 from_client(tcp(CLIENT, LOCAL_BE, 40000, 8080, "S")))
    uplink.check("client in the other range (/30)", "from_uplink",
                 from_client(tcp("198.18.0.97", LB_IP, 40000, 443, "S")), OK,
                 from_client(tcp("198.18.0.97", LOCAL_BE, 40000, 8080, "S")))
    uplink.check("client outside every range: dropped", "from_uplink",
                 from_client(tcp(CLIENT2, LB_IP, 40000, 443, "S"), mac=CLIENT2_MAC), SHOT)
    assert uplink.drops(abi.REASON_SOURCE_RANGE) == before + 1


def test_no_ranges_admit_everyone(uplink):
    uplink.writer.apply(LBState.of([lb()]))
    assert admitted(uplink, CLIENT) and admitted(uplink, OUTSIDER)


@pytest.fixture
def probe_every_write(monkeypatch, uplink):
    """After each batch write or delete the writer makes, run `probe` (set by the test)."""
    probes = {"fn": None, "count": 0}
    update, delete, records = writer_mod._update_batch, writer_mod._delete_batch, writer_mod._update_records

    def after(fn):
        def wrapped(*args, **kwargs):
            fn(*args, **kwargs)
            if probes["fn"] is not None:
                probes["fn"]()
                probes["count"] += 1
        return wrapped

    monkeypatch.setattr(writer_mod, "_update_batch", after(update))
    monkeypatch.setattr(writer_mod, "_delete_batch", after(delete))
    monkeypatch.setattr(writer_mod, "_update_records", after(records))
    return probes


def test_changing_ranges_never_opens_the_port(uplink, probe_every_write):
    uplink.writer.apply(LBState.of([lb(["198.18.0.100/32"])]))
    assert admitted(uplink, CLIENT) and not admitted(uplink, OUTSIDER)

    def outsider_refused():
        assert not admitted(uplink, OUTSIDER), "the frontend admitted a client outside old and new ranges"

    probe_every_write["fn"] = outsider_refused
    stats = uplink.writer.apply(LBState.of([lb(["198.18.0.101/32"])]))
    probe_every_write["fn"] = None
    assert probe_every_write["count"] >= 2 and stats.ranges_written == 1 and stats.ranges_deleted == 1
    assert admitted(uplink, CLIENT2) and not admitted(uplink, CLIENT) and not admitted(uplink, OUTSIDER)


def test_adding_ranges_enforces_from_the_frontend_switch_on(uplink, probe_every_write):
    uplink.writer.apply(LBState.of([lb()]))
    assert admitted(uplink, OUTSIDER)
    seen = []

    def record():
        seen.append((admitted(uplink, CLIENT), admitted(uplink, OUTSIDER)))

    probe_every_write["fn"] = record
    uplink.writer.apply(LBState.of([lb(["198.18.0.100/32"])]))
    probe_every_write["fn"] = None
    # The allowed client is never refused on the way; once the outsider is refused, it stays so.
    assert all(client for client, _ in seen)
    first_closed = next(i for i, (_, outsider) in enumerate(seen) if not outsider)
    assert not any(outsider for _, outsider in seen[first_closed:])
    assert admitted(uplink, CLIENT) and not admitted(uplink, OUTSIDER)


def test_removing_ranges_opens_only_when_asked_and_leaves_no_entries(uplink):
    uplink.writer.apply(LBState.of([lb(["198.18.0.100/32"])]))
    assert not admitted(uplink, OUTSIDER)
    stats = uplink.writer.apply(LBState.of([lb()]))
    assert stats.ranges_deleted == 1
    assert admitted(uplink, OUTSIDER)
    assert len(list(uplink.dp.maps["lb4_source_ranges"].keys())) == 0


def test_a_new_frontend_with_ranges_is_never_open(uplink, probe_every_write):
    def outsider_refused_or_absent():
        # Before the frontend exists the packet passes untouched (OK) but is no DNAT: check the output.
        res = uplink.run("from_uplink", from_client(tcp(OUTSIDER, LB_IP, next(_sports), 443, "S")))
        if res.verdict == "TC_ACT_OK":
            assert bytes(res.data)[30:34] == ipaddress.IPv4Address(LB_IP).packed, "outsider DNATed"

    probe_every_write["fn"] = outsider_refused_or_absent
    uplink.writer.apply(LBState.of([lb(["198.18.0.100/32"])]))
    probe_every_write["fn"] = None
    assert admitted(uplink, CLIENT) and not admitted(uplink, OUTSIDER)
