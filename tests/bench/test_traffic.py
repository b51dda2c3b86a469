"""Traffic drivers against direct pod addresses in the benchmark topology (root)."""

from __future__ import annotations

import pytest

from ebpfsvc.bench import traffic
from tests.bench.conftest import ECHO_PORT, IPERF_PORT

pytestmark = pytest.mark.root


@pytest.fixture
def echo(topology):
    with traffic.echo_server(topology.server, ECHO_PORT) as server:
        yield server


@pytest.fixture
def iperf(topology):
    with traffic.iperf3_server(topology.server, IPERF_PORT) as server:
        yield server


def test_request_response_stops_at_its_count(topology, echo):
    r = traffic.tcp_request_response(topology.client, topology.backends[0], ECHO_PORT, count=2000, duration=10)
    assert r["transactions"] == 2000
    assert 0 < r["latency_min_us"] <= r["latency_p50_us"] <= r["latency_p99_us"] <= r["latency_max_us"]
    assert r["transactions_per_s"] > 0
    print("rr direct:", {k: round(v, 1) for k, v in r.items()})


def test_request_response_stops_at_its_duration(topology, echo):
    r = traffic.tcp_request_response(topology.client, topology.backends[0], ECHO_PORT, count=10**9, duration=0.5)
    assert 0 < r["transactions"] < 10**9
    assert r["seconds"] < 5


def test_request_response_larger_messages(topology, echo):
    r = traffic.tcp_request_response(topology.client, topology.backends[1], ECHO_PORT, count=200, duration=10,
                                     size=3000)
    assert r["transactions"] == 200


def test_connect_rate(topology, echo):
    r = traffic.tcp_connect_rate(topology.client, topology.backends[0], ECHO_PORT, count=1000, duration=20)
    assert r["connections"] == 1000 and r["errors"] == {}
    assert r["connections_per_s"] > 0
    print("crr direct:", r)


def test_connect_rate_counts_refusals_and_stops(topology):
    # Nothing listens: every connect is refused; the driver gives up after its error budget.
    r = traffic.tcp_connect_rate(topology.client, topology.backends[0], ECHO_PORT, count=1000, duration=20)
    assert r["connections"] == 0
    assert r["errors"].get("ConnectionRefusedError", 0) >= 50


def test_backend_spread_names_the_address_reached(topology, echo):
    for address in topology.backends:
        r = traffic.backend_spread(topology.client, address, ECHO_PORT, count=5)
        assert r["backends"] == {address: 5}


def test_tcp_throughput(topology, iperf):
    r = traffic.tcp_throughput(topology.client, topology.backends[2], IPERF_PORT, duration=1)
    assert r["gbit_per_s"] > 0 and r["bytes"] > 0
    assert r["cpu_seconds"] > 0 and r["cpu_seconds_per_gb"] > 0
    print("iperf3 direct:", r)


def test_udp_packet_rate(topology, echo):
    r = traffic.udp_packet_rate(topology.client, topology.backends[2], ECHO_PORT, count=200_000, duration=1,
                                server_netns=topology.server)
    assert 0 < r["sent_packets"] <= 200_000
    assert r["received_packets"] is not None and 0 < r["received_packets"] <= r["sent_packets"]
    # What reached the server's UDP layer is at least what the server read (plus at most the queries).
    assert r["received_packets"] <= r["arrived_packets"] <= r["sent_packets"] + 25
    print("udp direct:", r)


def test_udp_packet_rate_stops_at_its_count(topology, echo):
    r = traffic.udp_packet_rate(topology.client, topology.backends[0], ECHO_PORT, count=1000, duration=10)
    assert r["sent_packets"] + r["send_errors"] == 1000
    assert r["seconds"] < 5


def test_cpu_times_advance():
    before = traffic.cpu_times()
    sum(i * i for i in range(2_000_000))
    busy = traffic.busy_seconds(before, traffic.cpu_times())
    assert busy["total"] > 0 and busy["user"] > 0


def test_measure_suite_gives_every_report_metric(topology, echo, iperf):
    from ebpfsvc.bench import report

    m = traffic.measure_suite(topology.client, (topology.backends[0], ECHO_PORT), (topology.backends[0], IPERF_PORT),
                              server_netns=topology.server, quick=True)
    assert set(m) == {"tcp_throughput_gbps", "cpu_s_per_gb", "tcp_rr_p50_us", "tcp_rr_p99_us", "tcp_rr_tps",
                      "tcp_crr_cps", "udp_pps"}
    assert set(m) <= set(report.METRICS) and all(v > 0 for v in m.values())
    recs = report.records("direct", 0, m, repeat=0)
    assert {r["metric"] for r in recs} == set(m) and all(r["repeat"] == 0 for r in recs)
    print("suite direct:", {k: round(v, 2) for k, v in m.items()})
