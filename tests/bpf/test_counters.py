"""Per-frontend and per-backend traffic counters, and drop counters by reason."""

from __future__ import annotations

import pytest

from ebpfsvc.datapath import stats
from ebpfsvc.lbmodel import Protocol

from .packets import (
    BACKEND1, BACKEND2, CLIENT, VIP, VIP2, be, expected_backend, from_pod, frontend,
    run, state, tcp, to_pod, udp,
)

pytestmark = pytest.mark.root

WEB = frontend(VIP, 80, [be(BACKEND1), be(BACKEND2)])
EMPTY = frontend(VIP2, 53, [], proto=Protocol.UDP, name="dns")


def test_traffic_counters_per_frontend_and_backend(datapath, writer):
    writer.apply(state(WEB, EMPTY))
    b = expected_backend(WEB, CLIENT, 40000)
    other = BACKEND2 if b == BACKEND1 else BACKEND1
    pkts = [
        ("from_pod", from_pod(tcp(CLIENT, VIP, 40000, 80, "S"))),
        ("to_pod", to_pod(tcp(b, CLIENT, 8080, 40000, "SA"))),
        ("from_pod", from_pod(tcp(CLIENT, VIP, 40000, 80, "PA", payload=b"x" * 300))),
    ]
    for prog, p in pkts:
        assert run(datapath, prog, p).verdict == "TC_ACT_OK"
    total = sum(len(p) for _, p in pkts)
    fid = writer.frontend_id(WEB)
    assert stats.traffic(datapath.maps, "frontend", fid) == (3, total)
    assert stats.traffic(datapath.maps, "backend", writer.backend_id(be(b))) == (3, total)
    assert stats.traffic(datapath.maps, "backend", writer.backend_id(be(other))) == (0, 0)
    # Untranslated traffic counts nowhere.
    run(datapath, "from_pod", from_pod(tcp(CLIENT, "198.18.3.3", 1, 2)))
    assert stats.traffic(datapath.maps, "frontend", fid) == (3, total)


def test_drop_counters_by_reason(datapath, writer):
    writer.apply(state(WEB, EMPTY))
    assert set(stats.drops(datapath.maps).values()) == {0}
    run(datapath, "from_pod", from_pod(udp(CLIENT, VIP2, 5000, 53)))        # no backend: rejected
    run(datapath, "from_pod", from_pod(udp(CLIENT, VIP2, 5001, 53)))
    bad = bytearray(bytes(from_pod(tcp(CLIENT, VIP, 40000, 80))))
    bad[14] = 0x44                                                          # IHL 4
    run(datapath, "from_pod", bytes(bad))
    counts = stats.drops(datapath.maps)
    assert counts["no_backend"] == 2 and counts["malformed"] == 1
    assert sum(counts.values()) == 3

