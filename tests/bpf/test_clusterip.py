"""ClusterIP translation through BPF_PROG_TEST_RUN: DNAT of new and tracked
flows, reverse NAT of replies, and everything that must pass untouched.

Maps are filled only through MapWriter.apply(LBState); each row names its
input packet, the exact expected output packet and the verdict.
"""

from __future__ import annotations

import pytest
from scapy.layers.inet import ICMP, IP, IPOption_NOP, IPOption_RR, TCP, UDP
from scapy.layers.inet6 import IPv6
from scapy.layers.l2 import ARP, Ether

from ebpfsvc.lbmodel import Algorithm, Frontend, FrontendKey, Protocol, Scope, ServicePortName

from .packets import (
    A, BACKEND1, BACKEND2, BACKEND3, CLIENT, CLIENT2, OK, OTHER, VIP, VIP2, Case, be, check,
    expected_backend, from_pod, frontend, run, state, tcp, tcp_exchange_rows, to_pod, udp, udp_exchange_rows,
)

pytestmark = pytest.mark.root

WEB = frontend(VIP, 80, [be(BACKEND1), be(BACKEND2), be(BACKEND3)])
DNS = frontend(VIP, 53, [be(BACKEND1, 5353, Protocol.UDP), be(BACKEND2, 5353, Protocol.UDP)],
               proto=Protocol.UDP, name="dns")


def test_tcp_flow_dnat_and_reply_rev_nat(datapath, writer):
    writer.apply(state(WEB))
    b = expected_backend(WEB, CLIENT, 40000)
    rows = tcp_exchange_rows(CLIENT, VIP, b)
    for row in rows:
        check(datapath, row)


def test_second_flow_from_same_client_is_balanced_on_its_own(datapath, writer):
    writer.apply(state(WEB))
    # Find a source port whose flow hashes to a different backend than port 40000.
    first = expected_backend(WEB, CLIENT, 40000)
    sport = next(p for p in range(40001, 41000) if expected_backend(WEB, CLIENT, p) != first)
    second = expected_backend(WEB, CLIENT, sport)
    check(datapath, Case("first flow", "from_pod", from_pod(tcp(CLIENT, VIP, 40000, 80)), OK,
                         from_pod(tcp(CLIENT, first, 40000, 8080))))
    check(datapath, Case("second flow, other backend", "from_pod", from_pod(tcp(CLIENT, VIP, sport, 80)), OK,
                         from_pod(tcp(CLIENT, second, sport, 8080))))
    # Each reply finds its own flow.
    check(datapath, Case("reply of the first", "to_pod", to_pod(tcp(first, CLIENT, 8080, 40000, "SA")), OK,
                         to_pod(tcp(VIP, CLIENT, 80, 40000, "SA"))))
    check(datapath, Case("reply of the second", "to_pod", to_pod(tcp(second, CLIENT, 8080, sport, "SA")), OK,
                         to_pod(tcp(VIP, CLIENT, 80, sport, "SA"))))


def test_udp_dnat_and_reply(datapath, writer):
    writer.apply(state(DNS))
    for row in udp_exchange_rows(CLIENT2, VIP, expected_backend(DNS, CLIENT2, 5000)):
        check(datapath, row)


def test_udp_without_checksum_keeps_zero_checksum(datapath, writer):
    writer.apply(state(DNS))
    b = expected_backend(DNS, CLIENT2, 5001)
    pkt = from_pod(udp(CLIENT2, VIP, 5001, 53, b"query"))
    pkt[UDP].chksum = 0
    want = from_pod(udp(CLIENT2, b, 5001, 5353, b"query"))
    want[UDP].chksum = 0
    check(datapath, Case("UDP checksum 0 means none: it stays 0", "from_pod", pkt, OK, want))


@pytest.mark.parametrize("options", [
    [IPOption_NOP(), IPOption_NOP(), IPOption_NOP(), IPOption_NOP()],            # IHL 6
    [IPOption_RR(routers=["198.18.9.%d" % i for i in range(1, 10)])],            # IHL 15, the maximum
], ids=["ihl6", "ihl15"])
def test_ip_options_shift_l4_header(datapath, writer, options):
    writer.apply(state(WEB))
    b = expected_backend(WEB, CLIENT, 40100)
    pkt = from_pod(tcp(CLIENT, VIP, 40100, 80, "S", options=options))
    assert pkt[IP].ihl is None or pkt[IP].ihl > 5
    check(datapath, Case("SYN with IP options", "from_pod", pkt, OK,
                         from_pod(tcp(CLIENT, b, 40100, 8080, "S", options=options))))
    check(datapath, Case("reply with IP options", "to_pod",
                         to_pod(tcp(b, CLIENT, 8080, 40100, "SA", options=options)), OK,
                         to_pod(tcp(VIP, CLIENT, 80, 40100, "SA", options=options))))


UNTOUCHED = [
    Case("TCP to a non-Service address", "from_pod", from_pod(tcp(CLIENT, OTHER, 40000, 80)), OK),
    Case("TCP to the ClusterIP on a port that is not a Service port", "from_pod",
         from_pod(tcp(CLIENT, VIP, 40000, 81)), OK),
    Case("UDP to a ClusterIP:port that is TCP only", "from_pod", from_pod(udp(CLIENT, VIP, 40000, 80)), OK),
    Case("TCP to a second address with no Service", "from_pod", from_pod(tcp(CLIENT, VIP2, 40000, 80)), OK),
    Case("ICMP echo to the ClusterIP", "from_pod", from_pod(IP(src=CLIENT, dst=VIP) / ICMP()), OK),
    Case("ARP request", "from_pod",
         Ether(src="02:00:00:00:01:05", dst="ff:ff:ff:ff:ff:ff") / ARP(psrc=CLIENT, pdst=VIP), OK),
    Case("IPv6 TCP", "from_pod", Ether(src="02:00:00:00:01:05", dst="02:00:00:00:00:fe") /
         IPv6(src="2001:2::5", dst="2001:2::10") / TCP(sport=40000, dport=80), OK),
    Case("a packet into the pod that is no reply of a tracked flow", "to_pod",
         to_pod(tcp(BACKEND1, CLIENT, 8080, 40000, "SA")), OK),
    Case("IPv6 into the pod", "to_pod", Ether(src="02:00:00:00:00:fe", dst="02:00:00:00:01:05") /
         IPv6(src="2001:2::10", dst="2001:2::5") / TCP(sport=80, dport=40000), OK),
    Case("ARP reply into the pod", "to_pod",
         Ether(src="02:00:00:00:00:fe", dst="02:00:00:00:01:05") / ARP(op=2, psrc=VIP, pdst=CLIENT), OK),
]


@pytest.mark.parametrize("case", UNTOUCHED, ids=[c.desc for c in UNTOUCHED])
def test_untouched(datapath, writer, case):
    writer.apply(state(WEB))
    check(datapath, case)


def test_random_algorithm_spreads_and_sticks(datapath, writer):
    rnd = frontend(VIP, 80, [be(BACKEND1), be(BACKEND2), be(BACKEND3)], algorithm=Algorithm.RANDOM)
    writer.apply(state(rnd))
    chosen = {}
    for sport in range(42000, 42060):
        res = run(datapath, "from_pod", from_pod(tcp(CLIENT, VIP, sport, 80, "S")))
        assert res.verdict == "TC_ACT_OK"
        chosen[sport] = Ether(res.data)[IP].dst
    assert set(chosen.values()) <= {BACKEND1, BACKEND2, BACKEND3}
    # 60 flows on one backend out of three by chance: p = 3 * 3**-60.
    assert len(set(chosen.values())) > 1
    for sport, b in chosen.items():       # every flow keeps its random pick
        check(datapath, Case("tracked random flow", "from_pod", from_pod(tcp(CLIENT, VIP, sport, 80, "A")), OK,
                             from_pod(tcp(CLIENT, b, sport, 8080, "A"))))


def test_external_scope_frontend_is_not_used_for_pod_traffic(datapath, writer):
    ext = Frontend(key=FrontendKey(A(VIP), 80, Protocol.TCP, Scope.EXTERNAL),
                   service=ServicePortName("default", "web"), backends=(be(BACKEND1),))
    writer.apply(state(ext))
    check(datapath, Case("only the INTERNAL scope serves pods", "from_pod",
                         from_pod(tcp(CLIENT, VIP, 40000, 80)), OK))



@pytest.mark.parametrize("target_port", [3868, 13868], ids=["same-port", "port-translated"])
def test_sctp_translation_keeps_crc32c_valid(datapath, writer, target_port):
    """SCTP's CRC32c covers no pseudo-header: an address rewrite keeps it valid, a
    port rewrite is compensated (scapy computes the expected CRC of each packet)."""
    from scapy.layers.sctp import SCTP, SCTPChunkData, SCTPChunkInit
    assoc = frontend(VIP, 3868, [be(BACKEND1, target_port, Protocol.SCTP)], proto=Protocol.SCTP, name="diameter")
    writer.apply(state(assoc))
    init = SCTPChunkInit(init_tag=7, a_rwnd=65535, n_out_streams=1, n_in_streams=1, init_tsn=1)
    check(datapath, Case("SCTP INIT to the service port", "from_pod",
                         from_pod(IP(src=CLIENT, dst=VIP) / SCTP(sport=3000, dport=3868) / init), OK,
                         from_pod(IP(src=CLIENT, dst=BACKEND1) / SCTP(sport=3000, dport=target_port) / init)))
    data = SCTPChunkData(tsn=2, stream_id=0, stream_seq=0, proto_id=46, data=bytes(range(256)) * 4)
    check(datapath, Case("SCTP reply with 1 KiB of data: the service port restored", "to_pod",
                         to_pod(IP(src=BACKEND1, dst=CLIENT) / SCTP(sport=target_port, dport=3000) / data), OK,
                         to_pod(IP(src=VIP, dst=CLIENT) / SCTP(sport=3868, dport=3000) / data)))
