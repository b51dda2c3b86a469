"""/metrics numbers read from the live maps at scrape time, after real packets
through the real programs: they must be the packets and bytes sent, the drops
caused, the kernel's entry counts, and the drift made; for both families."""

from __future__ import annotations

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families
from scapy.layers.inet import IP
from scapy.layers.inet6 import IPv6
from scapy.layers.l2 import Ether

from ebpfsvc.collectors import DatapathCollector
from ebpfsvc.lbmodel import Protocol

from .conftest import TEST_LIMITS
from .packets import (
    BACKEND1, BACKEND2, BACKEND6_1, BACKEND6_2, CLIENT, CLIENT2, CLIENT6, VIP, VIP2, VIP6, be, from_pod, frontend,
    run, state, tcp, tcp6, to_pod, udp,
)

pytestmark = pytest.mark.root

WEB = frontend(VIP, 80, [be(BACKEND1), be(BACKEND2)])
DNS = frontend(VIP, 53, [be(BACKEND1, 5353, Protocol.UDP)], proto=Protocol.UDP, name="dns")
EMPTY = frontend(VIP2, 80, [], name="empty")


def scrape(registry) -> dict[tuple, float]:
    text = generate_latest(registry).decode()
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(samples, name, **labels):
    return samples[(name, tuple(sorted(labels.items())))]


def handshakes(datapath, segment, layer, client: str, vip: str, sports) -> tuple[list[int], dict[str, list[int]]]:
    """Per source port, a SYN to `vip`:80 through from_pod and its backend's SYN-ACK (a few bytes of
    payload, so lengths differ) through to_pod: [packets, bytes] in all and per backend address."""
    total: list[int] = [0, 0]
    per_backend: dict[str, list[int]] = {}
    for sport in sports:
        syn = from_pod(segment(client, vip, sport, 80, "S"))
        b = Ether(run(datapath, "from_pod", syn).data)[layer].dst
        reply = to_pod(segment(b, client, 8080, sport, "SA", payload=b"z" * (sport % 7)))
        assert run(datapath, "to_pod", reply).verdict == "TC_ACT_OK"
        for acc in (total, per_backend.setdefault(b, [0, 0])):
            acc[0] += 2
            acc[1] += len(syn) + len(reply)
    return total, per_backend


@pytest.fixture
def registry(pin_dir, datapath):
    applied = {"state": None}
    reg = CollectorRegistry()
    collector = DatapathCollector(pin_dir, applied=lambda: applied["state"], drift_interval=0)
    reg.register(collector)
    reg.applied = applied
    yield reg
    collector.close()


def test_traffic_drops_and_fill_levels_match_what_was_sent(datapath, writer, registry):
    s = state(WEB, DNS, EMPTY)
    writer.apply(s)
    registry.applied["state"] = s
    web, per_backend = handshakes(datapath, tcp, IP, CLIENT, VIP, range(50000, 50010))
    dns_pkt = from_pod(udp(CLIENT2, VIP, 6000, 53, b"query"))
    run(datapath, "from_pod", dns_pkt)
    for sport in (1, 2, 3):                       # no backend: rejected, three times
        run(datapath, "from_pod", from_pod(tcp(CLIENT, VIP2, sport, 80)))
    bad = bytearray(bytes(from_pod(tcp(CLIENT, VIP, 1, 80))))
    bad[14] = 0x44                                # IHL 4: malformed
    run(datapath, "from_pod", bytes(bad))

    m = scrape(registry)
    assert value(m, "ebpfsvc_service_packets_total", service_port="default/web/TCP") == web[0]
    assert value(m, "ebpfsvc_service_bytes_total", service_port="default/web/TCP") == web[1]
    assert value(m, "ebpfsvc_frontend_packets_total", service_port="default/web/TCP",
                 frontend=f"{VIP}:80/TCP", scope="internal", kind="ClusterIP") == web[0]
    assert value(m, "ebpfsvc_service_packets_total", service_port="default/dns/UDP") == 1
    assert value(m, "ebpfsvc_service_bytes_total", service_port="default/dns/UDP") == len(dns_pkt)
    assert value(m, "ebpfsvc_service_packets_total", service_port="default/empty/TCP") == 0
    for addr in (BACKEND1, BACKEND2):
        pk, by = per_backend.get(addr, [0, 0])
        assert value(m, "ebpfsvc_backend_packets_total", backend=f"{addr}:8080/TCP") == pk
        assert value(m, "ebpfsvc_backend_bytes_total", backend=f"{addr}:8080/TCP") == by
    assert value(m, "ebpfsvc_backend_packets_total", backend=f"{BACKEND1}:5353/UDP") == 1
    assert value(m, "ebpfsvc_drops_total", reason="no_backend") == 3
    assert value(m, "ebpfsvc_drops_total", reason="malformed") == 1
    assert value(m, "ebpfsvc_drops_total", reason="backend_gone") == 0

    # Fill levels: the kernel's counts. 3 frontends + 2 address markers (VIP/TCP, VIP/UDP, VIP2/TCP: 3).
    assert value(m, "ebpfsvc_map_entries", map="lb4_frontends") == 3 + 3
    assert value(m, "ebpfsvc_map_entries", map="lb4_backends") == 3
    assert value(m, "ebpfsvc_map_entries", map="lb_service_names") == 3
    assert value(m, "ebpfsvc_map_entries", map="ct4") == 2 * 11          # 10 TCP flows + 1 UDP flow
    assert value(m, "ebpfsvc_map_max_entries", map="ct4") == TEST_LIMITS.ct_entries
    assert value(m, "ebpfsvc_map_max_entries", map="lb4_backends") == TEST_LIMITS.backends
    from ebpfsvc import maglev
    assert value(m, "ebpfsvc_map_entries", map="lb_maglev") == maglev.table_size(2) + maglev.table_size(1)
    assert value(m, "ebpfsvc_drift_frontends") == 0


def test_ipv6_frontends_and_backends_have_their_own_unambiguous_series(datapath, writer, registry):
    """A dual-stack Service port: its IPv6 frontend's label is bracketed as `bpf ct list` writes it
    ([addr]:port, so the port cannot be read as part of the address), its IPv6 backends have their
    own series, and the service-port series adds both families."""
    web6 = frontend(VIP6, 80, [be(BACKEND6_1), be(BACKEND6_2)])          # same Service port as WEB
    writer.apply(state(WEB, web6))
    v6, per_backend = handshakes(datapath, tcp6, IPv6, CLIENT6, VIP6, range(41000, 41008))
    assert len(per_backend) == 2, "8 flows over Maglev reached only one backend"
    syn4 = from_pod(tcp(CLIENT, VIP, 50000, 80, "S"))
    run(datapath, "from_pod", syn4)

    m = scrape(registry)
    assert value(m, "ebpfsvc_frontend_packets_total", service_port="default/web/TCP",
                 frontend=f"[{VIP6}]:80/TCP", scope="internal", kind="ClusterIP") == v6[0]
    assert value(m, "ebpfsvc_frontend_bytes_total", service_port="default/web/TCP",
                 frontend=f"[{VIP6}]:80/TCP", scope="internal", kind="ClusterIP") == v6[1]
    assert value(m, "ebpfsvc_frontend_packets_total", service_port="default/web/TCP",
                 frontend=f"{VIP}:80/TCP", scope="internal", kind="ClusterIP") == 1
    assert value(m, "ebpfsvc_service_packets_total", service_port="default/web/TCP") == v6[0] + 1
    assert value(m, "ebpfsvc_service_bytes_total", service_port="default/web/TCP") == v6[1] + len(syn4)
    for addr, (pk, by) in per_backend.items():
        assert value(m, "ebpfsvc_backend_packets_total", backend=f"[{addr}]:8080/TCP") == pk
        assert value(m, "ebpfsvc_backend_bytes_total", backend=f"[{addr}]:8080/TCP") == by
    frontends = {dict(k[1])["frontend"] for k in m if k[0] == "ebpfsvc_frontend_packets_total"}
    assert frontends == {f"{VIP}:80/TCP", f"[{VIP6}]:80/TCP"}
    # The IPv6 maps' fill levels: one frontend and its address marker, two backends, two
    # conntrack entries per flow (as ct4).
    assert value(m, "ebpfsvc_map_entries", map="lb6_frontends") == 1 + 1
    assert value(m, "ebpfsvc_map_entries", map="lb6_backends") == 2
    assert value(m, "ebpfsvc_map_entries", map="ct6") == 2 * 8
    assert value(m, "ebpfsvc_map_max_entries", map="ct6") == TEST_LIMITS.ct_entries


def test_drift_gauge_counts_frontends_that_differ(datapath, writer, registry):
    writer.apply(state(WEB, DNS))
    # The agent believes it applied a state with one more backend and one more frontend.
    registry.applied["state"] = state(frontend(VIP, 80, [be(BACKEND1), be(BACKEND2), be("198.18.2.9")]), DNS,
                                      EMPTY)
    assert value(scrape(registry), "ebpfsvc_drift_frontends") == 2
    registry.applied["state"] = state(WEB, DNS)
    assert value(scrape(registry), "ebpfsvc_drift_frontends") == 0


def test_no_maps_yet_means_no_datapath_metrics(tmp_path):
    reg = CollectorRegistry()
    reg.register(DatapathCollector(tmp_path / "not-pinned-yet"))
    assert not [k for k in scrape(reg) if k[0].startswith("ebpfsvc_")]
